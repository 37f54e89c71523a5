"""Qwen2.5-VL for vLLM with SAINT image-token pruning after the vision tower.

Registered over ``Qwen2_5_VLForConditionalGeneration`` by the ``saint`` plugin; without
``saint_keep_ratio`` in the HF config it is vLLM's class unchanged. With it:

- the processor gives every image ``kept_tokens(N)`` placeholders instead of ``N`` (the
  count follows from the image grid, known before the tower runs);
- after the tower and merger, SAINT's fixed-budget drop (``saint.core.fixed_budget_keep_mask``
  on the merged embeddings) keeps exactly that many tokens, in their original order;
- each kept embedding carries its M-RoPE (t, h, w) of the full grid, so vLLM's
  ``recompute_mrope_positions`` (the EVS helper, which handles images) gives the kept
  tokens their unpruned positions; the 4th channel (the text offset after the image) is
  the largest offset + 1, so text after an image keeps its unpruned positions too (vLLM's
  EVS puts the grid width there, which shifts the text after a portrait image).

Videos are not pruned by SAINT, and ``--video-pruning-rate`` (EVS) is refused with it (an EVS
video crashed the runner's positions); an unpruned video carries its positions the same way,
as vLLM's pruning path requires.
"""

from __future__ import annotations

from typing import Any

import torch

from .compat import install_torchvision_shim

install_torchvision_shim()  # vLLM's qwen2_vl module imports a torchvision-only one

from vllm.config import VllmConfig  # noqa: E402
from vllm.model_executor.models.qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .qwen_common import SaintBudgetPromptMixin, SaintImagePruningMixin, media_positions  # noqa: E402
from .settings import settings_from_config  # noqa: E402


class SaintQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Reads (and so validates) the SAINT settings when vLLM builds its input processor, in
    the front-end process before the engine starts: a bad setting fails ``LLM(...)`` /
    ``vllm serve`` at once with the setting's name."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.saint = settings_from_config(self.get_hf_config())


class SaintQwen2_5_VLMultiModalProcessor(SaintBudgetPromptMixin, Qwen2_5_VLMultiModalProcessor):
    """Gives each image as many placeholder tokens as SAINT will keep."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintQwen2_5_VLMultiModalProcessor,
    info=SaintQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class SaintQwen2_5_VLForConditionalGeneration(SaintImagePruningMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.saint_setup(vllm_config)
        if self.saint is not None and self.video_pruning_rate:
            # an EVS video's run is shorter than its grid, which the prompt's positions read as
            # whole: every video request crashed in the runner (IndexError), ratio 1.0 included
            raise ValueError("--video-pruning-rate (EVS) together with saint_keep_ratio is not supported on "
                             "Qwen2.5-VL; use one of them")

    def _postprocess_video_embeds_evs(
        self, video_embeds_split: tuple[torch.Tensor, ...], video_input: Any
    ) -> tuple[torch.Tensor, ...]:
        if self.video_pruning_rate:  # EVS, vLLM's own video pruning
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
        merge = self.visual.spatial_merge_size
        seconds = video_input.get("second_per_grid_ts")
        tps = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        out = []
        grids = video_input["video_grid_thw"].tolist()
        for i, (emb, grid) in enumerate(zip(video_embeds_split, grids, strict=True)):
            spg = 1.0 if seconds is None else float(seconds[i])
            pos = media_positions(grid, merge, tokens_per_second=tps, video_second_per_grid=spg)
            out.append(torch.cat([emb, pos.to(emb.device, emb.dtype)], dim=1))
        return tuple(out)


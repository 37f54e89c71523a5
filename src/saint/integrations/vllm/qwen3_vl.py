"""Qwen3-VL and Qwen3-VL-MoE for vLLM with SAINT image-token pruning after the vision tower.

Registered over ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration``
by the ``saint`` plugin; without
``saint_keep_ratio`` in the HF config it is vLLM's class unchanged. With it, as for
Qwen2.5-VL (``qwen2_5_vl.py``):

- the processor gives every image ``kept_tokens(N)`` placeholders instead of ``N``;
- after the tower, SAINT's fixed-budget drop picks that many of the image's merged tokens
  from the tower's main output (the features that replace the placeholders). vLLM's tower
  returns each token's main features and its deepstack features (one slice per level,
  added to the first decoder layers) side by side in one row, so keeping rows keeps every
  level of the same tokens;
- positions: each kept row carries 5 extra channels, the layout vLLM's Qwen3-VL strips in
  ``recompute_mrope_positions``: (t, h, w) in the full grid, the step to the text after the
  image (largest offset + 1) and 0 (not a video token). The shared
  ``recompute_mrope_positions`` (``qwen_common``) reads the first four as a 4-channel
  (Qwen2.5-style) image, so the text after the image keeps its unpruned positions. (vLLM's 5-channel rule takes the step
  from the largest kept offset instead: a kept set without the image's last row or column
  would shift all later text.)

Videos are refused while pruning is on (``--limit-mm-per-prompt '{"video": 0}'`` is
required): once pruning is on, vLLM's Qwen3-VL sends every video through its EVS path,
which needs ``--video-pruning-rate`` and its own prompt layout for videos (timestamps and
frame markers embedded by the model); SAINT with EVS videos is untested.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .compat import install_torchvision_shim

install_torchvision_shim()  # vLLM's qwen3_vl module imports a torchvision-only one

from vllm.config import VllmConfig  # noqa: E402
from vllm.model_executor.models.qwen3_vl import (  # noqa: E402
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import (  # noqa: E402
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .qwen_common import (  # noqa: E402
    SaintBudgetPromptMixin,
    SaintImagePruningMixin,
    media_positions,
)
from .settings import ImagesOnlyInfo  # noqa: E402

POSITION_CHANNELS = 5  # what vLLM's Qwen3-VL appends to (and strips from) each media row


class SaintQwen3VLProcessingInfo(ImagesOnlyInfo, Qwen3VLProcessingInfo):
    """Qwen3-VL's processing info with the SAINT settings read in the front end (images only)."""

    saint_family = "Qwen3-VL"


class SaintQwen3VLMultiModalProcessor(SaintBudgetPromptMixin, Qwen3VLMultiModalProcessor):
    """Gives each image as many placeholder tokens as SAINT will keep."""


def image_position_channels(grid_thw: Sequence[int], merge_size: int) -> torch.Tensor:
    """``[N, 5]`` per merged token of an image: (t, h, w) in the full grid, the step to the
    text after the image, and 0 (the video flag of vLLM's 5-channel layout)."""
    pos = media_positions(grid_thw, merge_size)
    return torch.cat([pos, torch.zeros_like(pos[:, :1])], dim=1)


class SaintQwen3VLMoeProcessingInfo(SaintQwen3VLProcessingInfo, Qwen3VLMoeProcessingInfo):
    """Qwen3-VL-MoE's processing info (its own HF config class) with the same checks."""


class SaintQwen3VLModel(SaintImagePruningMixin):
    """The model side shared by Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 (the same tower and prompt; the
    MoE's experts sit in the language model, which sees the kept tokens like any others)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.saint_setup(vllm_config)

    def saint_features(self, emb: torch.Tensor) -> torch.Tensor:
        return emb[:, : self.visual_dim]  # main features, not the deepstack levels

    saint_channels = POSITION_CHANNELS

    def saint_positions(self, grid_thw: Sequence[int], merge_size: int) -> torch.Tensor:
        return image_position_channels(grid_thw, merge_size)


@MULTIMODAL_REGISTRY.register_processor(
    SaintQwen3VLMultiModalProcessor,
    info=SaintQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class SaintQwen3VLForConditionalGeneration(SaintQwen3VLModel, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintQwen3VLMultiModalProcessor,
    info=SaintQwen3VLMoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class SaintQwen3VLMoeForConditionalGeneration(SaintQwen3VLModel, Qwen3VLMoeForConditionalGeneration):
    """vLLM's Qwen3-VL-MoE; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

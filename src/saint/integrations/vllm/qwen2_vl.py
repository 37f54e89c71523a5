"""Qwen2-VL for vLLM with SAINT image-token pruning after the vision tower.

Registered over ``Qwen2VLForConditionalGeneration`` by the ``saint`` plugin; without
``saint_keep_ratio`` in the HF config it is vLLM's class unchanged. With it, the same three
steps as the Qwen2.5-VL override (:mod:`saint.integrations.vllm.qwen2_5_vl`): every image
gets ``kept_tokens(N)`` placeholders, the fixed-budget drop keeps that many merged
embeddings, and each kept row carries its M-RoPE (t, h, w) of the full grid plus the step
to the text after the image, which vLLM's ``recompute_mrope_positions`` turns into the
kept tokens' unpruned positions.

vLLM's own Qwen2-VL has no multimodal-pruning path (it never prunes), so this class adds
it: it declares :class:`~vllm.model_executor.models.interfaces.SupportsMultiModalPruning`,
rewrites the kept tokens' positions with the shared ``recompute_mrope_positions`` (Qwen2.5-VL's
4-channel layout), and prunes in ``_process_image_input``. Videos would reach the runner without
position channels, so they are refused while pruning is on (``--limit-mm-per-prompt
'{"video": 0}'``), as for Qwen3-VL.
"""

from __future__ import annotations

from typing import Any

import torch

from .compat import install_torchvision_shim

install_torchvision_shim()  # vLLM's qwen2_vl module imports a torchvision-only one

from vllm.config import VllmConfig  # noqa: E402
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning  # noqa: E402
from vllm.model_executor.models.qwen2_vl import (  # noqa: E402
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .qwen_common import SaintBudgetPromptMixin, SaintImagePruningMixin  # noqa: E402
from .settings import images_only_settings  # noqa: E402


class SaintQwen2VLProcessingInfo(Qwen2VLProcessingInfo):
    """Reads (and so validates) the SAINT settings in the front end, before the engine
    starts; with pruning on, refuses a configuration that allows videos."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.saint = images_only_settings(self, ctx, "Qwen2-VL")


class SaintQwen2VLMultiModalProcessor(SaintBudgetPromptMixin, Qwen2VLMultiModalProcessor):
    """Gives each image as many placeholder tokens as SAINT will keep."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintQwen2VLMultiModalProcessor,
    info=SaintQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class SaintQwen2VLForConditionalGeneration(
    SaintImagePruningMixin, Qwen2VLForConditionalGeneration, SupportsMultiModalPruning
):
    """vLLM's Qwen2-VL; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config is not None and mm_config.is_multimodal_pruning_enabled():
            # this class declares the pruning interface for SAINT's images; vLLM's Qwen2-VL
            # has no EVS for videos, which would then reach the runner without positions
            raise ValueError("--video-pruning-rate: vLLM's Qwen2-VL has no video pruning (EVS); serve it without")
        self.saint_setup(vllm_config)

    def _process_image_input(self, image_input: Any) -> tuple[torch.Tensor, ...]:
        embeds = super()._process_image_input(image_input)
        if self.saint is None:
            return embeds
        return self._postprocess_image_embeds_evs(embeds, image_input)

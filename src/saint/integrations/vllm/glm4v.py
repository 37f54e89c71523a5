"""GLM-4.1V and GLM-4.5V / 4.6V (MoE) for vLLM with SAINT image-token pruning after the vision tower.

Registered over ``Glm4vForConditionalGeneration`` and ``Glm4vMoeForConditionalGeneration`` by
the ``saint`` plugin; without ``saint_keep_ratio`` in the HF config they are vLLM's classes
unchanged. With it, the steps of the Qwen2-VL override (:mod:`saint.integrations.vllm.qwen2_vl`):
every image gets ``kept_tokens(N)`` ``<|image|>`` placeholders, the fixed-budget drop keeps that
many merged embeddings, and each kept row carries its M-RoPE (t, h, w) of the full grid plus
the step to the text after the image, which vLLM's ``recompute_mrope_positions`` turns into the
kept tokens' unpruned positions. GLM's prompt positions are Qwen2-VL's for images (the text
after an image starts one past its largest offset), so the shared helpers apply as they are.

vLLM's GLM-4.1V has no multimodal-pruning path, so these classes add it (the interface, the shared
``recompute_mrope_positions``, the cut in ``_process_image_input``). Its video frames are runs
of image tokens that would reach the runner without position channels, so videos are refused
while pruning is on (``--limit-mm-per-prompt '{"video": 0}'``).
"""

from __future__ import annotations

from typing import Any

import torch

from .compat import install_torchvision_shim

install_torchvision_shim()  # vLLM's glm4_1v and qwen2_vl modules import torchvision-only ones

from vllm.config import VllmConfig  # noqa: E402
from vllm.model_executor.models.glm4_1v import (  # noqa: E402
    Glm4vDummyInputsBuilder,
    Glm4vForConditionalGeneration,
    Glm4vMoeForConditionalGeneration,
    Glm4vMultiModalProcessor,
    Glm4vProcessingInfo,
)
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .qwen_common import SaintBudgetPromptMixin, SaintImagePruningMixin  # noqa: E402
from .settings import images_only_settings  # noqa: E402


class SaintGlm4vProcessingInfo(Glm4vProcessingInfo):
    """Reads (and so validates) the SAINT settings in the front end, before the engine
    starts; with pruning on, refuses a configuration that allows videos."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.saint = images_only_settings(self, ctx, "GLM-4.1V")


class SaintGlm4vMultiModalProcessor(SaintBudgetPromptMixin, Glm4vMultiModalProcessor):
    """Gives each image as many ``<|image|>`` placeholders as SAINT will keep."""


class SaintGlm4vPruningMixin(SaintImagePruningMixin):
    """The pruning path vLLM's GLM-4.1V lacks: the cut (the positions' rewrite is the shared
    mixin's; the classes below declare the interface, last among their bases, as a protocol
    must be)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config is not None and mm_config.is_multimodal_pruning_enabled():
            # this class declares the pruning interface for SAINT's images; vLLM's GLM-4.1V
            # has no EVS for videos, which would then reach the runner without positions
            raise ValueError("--video-pruning-rate: vLLM's GLM-4.1V has no video pruning (EVS); serve it without")
        self.saint_setup(vllm_config)

    def _process_image_input(self, image_input: Any) -> tuple[torch.Tensor, ...]:
        embeds = super()._process_image_input(image_input)  # type: ignore[misc]
        if self.saint is None:
            return embeds
        return self._postprocess_image_embeds_evs(embeds, image_input)


@MULTIMODAL_REGISTRY.register_processor(
    SaintGlm4vMultiModalProcessor, info=SaintGlm4vProcessingInfo, dummy_inputs=Glm4vDummyInputsBuilder
)
class SaintGlm4vForConditionalGeneration(
    SaintGlm4vPruningMixin, Glm4vForConditionalGeneration, SupportsMultiModalPruning
):
    """vLLM's GLM-4.1V; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintGlm4vMultiModalProcessor, info=SaintGlm4vProcessingInfo, dummy_inputs=Glm4vDummyInputsBuilder
)
class SaintGlm4vMoeForConditionalGeneration(
    SaintGlm4vPruningMixin, Glm4vMoeForConditionalGeneration, SupportsMultiModalPruning
):
    """vLLM's GLM-4.5V / GLM-4.6V (MoE); with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

"""PaddleOCR-VL for vLLM with SAINT image-token pruning after the projector.

Registered over ``PaddleOCRVLForConditionalGeneration`` by the ``saint`` plugin; without
``saint_keep_ratio`` it is vLLM's class unchanged. With it, the steps of the GLM-4.1V and
Qwen2-VL overrides (:mod:`saint.integrations.vllm.qwen_common`): every image gets
``kept_tokens(N)`` placeholders, the fixed-budget drop keeps that many merged embeddings, and
each kept row carries its M-RoPE (t, h, w) of the full grid plus the step to the text after
the image, which the runner's ``recompute_mrope_positions`` turns into the kept tokens'
unpruned positions. PaddleOCR-VL's prompt positions follow Qwen2-VL's rule for images (the
text after an image starts one past its largest offset). vLLM's PaddleOCR-VL has no
multimodal-pruning path, so this class adds it; it takes images only.
"""

from __future__ import annotations

from .compat import install_torchvision_shim

install_torchvision_shim()

from vllm.model_executor.models.interfaces import SupportsMultiModalPruning  # noqa: E402
from vllm.model_executor.models.paddleocr_vl import (  # noqa: E402
    PaddleOCRVLDummyInputsBuilder,
    PaddleOCRVLForConditionalGeneration,
    PaddleOCRVLMultiModalProcessor,
    PaddleOCRVLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .qwen_common import SaintAddedPruningMixin, SaintBudgetPromptMixin  # noqa: E402
from .settings import ImagesOnlyInfo  # noqa: E402


class SaintPaddleOCRVLProcessingInfo(ImagesOnlyInfo, PaddleOCRVLProcessingInfo):
    """PaddleOCR-VL's processing info with the SAINT settings read in the front end."""

    saint_family = "PaddleOCR-VL"


class SaintPaddleOCRVLMultiModalProcessor(SaintBudgetPromptMixin, PaddleOCRVLMultiModalProcessor):
    """Gives each image as many image placeholders as SAINT will keep."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintPaddleOCRVLMultiModalProcessor, info=SaintPaddleOCRVLProcessingInfo,
    dummy_inputs=PaddleOCRVLDummyInputsBuilder,
)
class SaintPaddleOCRVLForConditionalGeneration(
    SaintAddedPruningMixin, PaddleOCRVLForConditionalGeneration, SupportsMultiModalPruning
):
    """vLLM's PaddleOCR-VL; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    saint_family = "PaddleOCR-VL"

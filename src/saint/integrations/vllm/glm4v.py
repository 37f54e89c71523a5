"""GLM-4.1V, GLM-4.5V (MoE) and GLM-OCR for vLLM with SAINT image-token pruning after the vision
tower.

Registered over ``Glm4vForConditionalGeneration``, ``Glm4vMoeForConditionalGeneration`` and
``GlmOcrForConditionalGeneration`` (vLLM's GLM-4.1V with GLM-OCR's tower) by the ``saint`` plugin; without ``saint_keep_ratio`` in the HF config they are vLLM's classes
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

from .compat import install_torchvision_shim

install_torchvision_shim()  # vLLM's glm4_1v and qwen2_vl modules import torchvision-only ones

from vllm.model_executor.models.glm4_1v import (  # noqa: E402
    Glm4vDummyInputsBuilder,
    Glm4vForConditionalGeneration,
    Glm4vMoeForConditionalGeneration,
    Glm4vMultiModalProcessor,
    Glm4vProcessingInfo,
)
from vllm.model_executor.models.glm_ocr import GlmOcrForConditionalGeneration  # noqa: E402
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .qwen_common import SaintAddedPruningMixin, SaintBudgetPromptMixin  # noqa: E402
from .settings import ImagesOnlyInfo  # noqa: E402


class SaintGlm4vProcessingInfo(ImagesOnlyInfo, Glm4vProcessingInfo):
    """GLM-4.1V's processing info with the SAINT settings read in the front end (images only)."""

    saint_family = "GLM-4.1V"


class SaintGlm4vMultiModalProcessor(SaintBudgetPromptMixin, Glm4vMultiModalProcessor):
    """Gives each image as many ``<|image|>`` placeholders as SAINT will keep."""


class SaintGlm4vPruningMixin(SaintAddedPruningMixin):
    """GLM-4.1V's name in the refusals (the classes below declare the pruning interface, last
    among their bases, as a protocol must be)."""

    saint_family = "GLM-4.1V"


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
    """vLLM's GLM-4.5V (MoE); with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""


class SaintGlmOcrProcessingInfo(SaintGlm4vProcessingInfo):
    """GLM-OCR's: GLM-4.1V's processing, its own name in the refusals."""

    saint_family = "GLM-OCR"


@MULTIMODAL_REGISTRY.register_processor(
    SaintGlm4vMultiModalProcessor, info=SaintGlmOcrProcessingInfo, dummy_inputs=Glm4vDummyInputsBuilder
)
class SaintGlmOcrForConditionalGeneration(
    SaintGlm4vPruningMixin, GlmOcrForConditionalGeneration, SupportsMultiModalPruning
):
    """vLLM's GLM-OCR; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    saint_family = "GLM-OCR"

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

from .compat import install_torchvision_shim

install_torchvision_shim()  # vLLM's qwen2_vl module imports a torchvision-only one

from vllm.model_executor.models.interfaces import SupportsMultiModalPruning  # noqa: E402
from vllm.model_executor.models.qwen2_vl import (  # noqa: E402
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .qwen_common import SaintAddedPruningMixin, SaintBudgetPromptMixin  # noqa: E402
from .settings import ImagesOnlyInfo  # noqa: E402


class SaintQwen2VLProcessingInfo(ImagesOnlyInfo, Qwen2VLProcessingInfo):
    """Qwen2-VL's processing info with the SAINT settings read in the front end (images only)."""

    saint_family = "Qwen2-VL"


class SaintQwen2VLMultiModalProcessor(SaintBudgetPromptMixin, Qwen2VLMultiModalProcessor):
    """Gives each image as many placeholder tokens as SAINT will keep."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintQwen2VLMultiModalProcessor,
    info=SaintQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class SaintQwen2VLForConditionalGeneration(
    SaintAddedPruningMixin, Qwen2VLForConditionalGeneration, SupportsMultiModalPruning
):
    """vLLM's Qwen2-VL; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    saint_family = "Qwen2-VL"

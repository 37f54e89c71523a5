"""Qwen3.5 and Qwen3.5-MoE for vLLM with SAINT image-token pruning after the vision tower.

Registered over ``Qwen3_5ForConditionalGeneration`` and ``Qwen3_5MoeForConditionalGeneration``
by the ``saint`` plugin; without ``saint_keep_ratio`` in the HF config it is vLLM's class
unchanged. vLLM's Qwen3.5 is its Qwen3-VL with Qwen3-VL's tower (no deepstack levels) and a
hybrid language model (Gated DeltaNet layers between full-attention ones), so the Qwen3-VL
override's model side applies as it is (``qwen3_vl.py``): each image's placeholder run is
cut to SAINT's budget, the tower's merged tokens are cut to match after it, and the kept
rows carry their full-grid positions. The language model then reads a shorter prompt like
any other, its recurrent layers included: nothing leaves it between layers.

Videos are refused while pruning is on, as for Qwen3-VL. On CPU vLLM runs Qwen3.5 in
bfloat16 only (its Gated DeltaNet kernel)."""

from __future__ import annotations

from .compat import install_torchvision_shim

install_torchvision_shim()  # vLLM's qwen3_vl module imports a torchvision-only one

from vllm.model_executor.models.qwen3_5 import (  # noqa: E402
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeProcessingInfo,
    Qwen3_5ProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .qwen3_vl import SaintQwen3VLModel, SaintQwen3VLMultiModalProcessor  # noqa: E402
from .settings import ImagesOnlyInfo  # noqa: E402


class SaintQwen3_5ProcessingInfo(ImagesOnlyInfo, Qwen3_5ProcessingInfo):
    """Qwen3.5's processing info with the SAINT settings read in the front end (images only)."""

    saint_family = "Qwen3.5"


class SaintQwen3_5MoeProcessingInfo(ImagesOnlyInfo, Qwen3_5MoeProcessingInfo):
    """Qwen3.5-MoE's processing info (its own HF config class) with the same checks."""

    saint_family = "Qwen3.5"


@MULTIMODAL_REGISTRY.register_processor(
    SaintQwen3VLMultiModalProcessor,
    info=SaintQwen3_5ProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class SaintQwen3_5ForConditionalGeneration(SaintQwen3VLModel, Qwen3_5ForConditionalGeneration):
    """vLLM's Qwen3.5; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintQwen3VLMultiModalProcessor,
    info=SaintQwen3_5MoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class SaintQwen3_5MoeForConditionalGeneration(SaintQwen3VLModel, Qwen3_5MoeForConditionalGeneration):
    """vLLM's Qwen3.5-MoE; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

"""PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``) for vLLM with SAINT
image-token pruning after the projector.

Registered over vLLM's class by the ``saint`` plugin; without ``saint_keep_ratio`` it is
vLLM's class unchanged. With it, the image (one per prompt, as vLLM serves PaliGemma) enters
the prompt as ``kept_tokens(N)`` image tokens instead of its ``N`` patches: the processing
info's token count and the HF processor's ``image_seq_length`` (a copy of the processor
with it cut) give vLLM the shortened prompt, and the projector's output is cut to the same
count by the fixed-budget drop. Positions are 1-D. Precomputed embeddings are refused while
pruning is on.
"""

from __future__ import annotations

from typing import Any

from .compat import install_torchvision_shim

install_torchvision_shim()

from vllm.model_executor.models.paligemma import (  # noqa: E402
    PaliGemmaDummyInputsBuilder,
    PaliGemmaForConditionalGeneration,
    PaliGemmaMultiModalProcessor,
    PaliGemmaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .tiles import KeptImageTokens, SaintTilePruningMixin, processor_with_kept_tiles  # noqa: E402


class SaintPaliGemmaProcessingInfo(KeptImageTokens, PaliGemmaProcessingInfo):
    """PaliGemma's processing info with SAINT's kept count of image tokens (vLLM calls the
    HF processor too, so its ``image_seq_length`` is cut as well)."""

    def get_hf_processor(self, **kwargs: object) -> Any:
        return processor_with_kept_tiles(super().get_hf_processor(**kwargs), self.saint, "image_seq_length")


@MULTIMODAL_REGISTRY.register_processor(
    PaliGemmaMultiModalProcessor, info=SaintPaliGemmaProcessingInfo, dummy_inputs=PaliGemmaDummyInputsBuilder
)
class SaintPaliGemmaForConditionalGeneration(SaintTilePruningMixin, PaliGemmaForConditionalGeneration):
    """vLLM's PaliGemma; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    def _process_image_input(self, image_input: Any) -> Any:
        self.saint_refuse_embeddings(image_input)
        return self.saint_prune_images(super()._process_image_input(image_input))  # [images, N, D]

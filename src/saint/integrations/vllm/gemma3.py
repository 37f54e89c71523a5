"""Gemma 3 (``Gemma3ForConditionalGeneration``) for vLLM with SAINT image-token pruning
after the projector.

Registered over vLLM's class by the ``saint`` plugin; without ``saint_keep_ratio`` it is
vLLM's class unchanged. With it, every image (and every pan-and-scan crop) gets
``kept_tokens(mm_tokens_per_image)`` image tokens between its ``<start_of_image>`` and
``<end_of_image>`` instead of ``mm_tokens_per_image``: the processing info hands vLLM and the
HF processor a copy of the processor with ``image_seq_length`` and its expanded image
sequence cut, so the prompt text, the token counts and vLLM's budgets all follow. The
projector's output of each image or crop is cut to the same count by the fixed-budget
drop. Positions are 1-D. vLLM gives the image tokens bidirectional attention (its "mm
prefix") from the placeholder ranges of the shortened prompt.
"""

from __future__ import annotations

from typing import Any

from .compat import install_torchvision_shim

install_torchvision_shim()

from vllm.model_executor.models.gemma3_mm import (  # noqa: E402
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .settings import SaintSettingsError, settings_from_config  # noqa: E402
from .tiles import SaintTilePruningMixin, processor_with_kept_tiles  # noqa: E402


class SaintGemma3ProcessingInfo(Gemma3ProcessingInfo):
    """Gemma 3's processing info whose processor gives every image (and crop) SAINT's kept
    count of image tokens."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.saint = settings_from_config(self.get_hf_config())

    def get_hf_processor(self, **kwargs: object) -> Any:
        processor = super().get_hf_processor(**kwargs)
        kept = processor_with_kept_tiles(processor, self.saint, "image_seq_length")
        if kept is not processor:  # the processor expands each image from this string
            token = processor.tokenizer.image_token
            full = token * int(processor.image_seq_length)
            if processor.full_image_sequence.count(full) != 1:
                raise SaintSettingsError("saint_keep_ratio: Gemma 3's processor does not expand an image to one "
                                         f"run of {processor.image_seq_length} image tokens; cannot cut it")
            kept.full_image_sequence = processor.full_image_sequence.replace(full, token * kept.image_seq_length)
        return kept


@MULTIMODAL_REGISTRY.register_processor(
    Gemma3MultiModalProcessor, info=SaintGemma3ProcessingInfo, dummy_inputs=Gemma3DummyInputsBuilder
)
class SaintGemma3ForConditionalGeneration(SaintTilePruningMixin, Gemma3ForConditionalGeneration):
    """vLLM's Gemma 3; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    def _process_image_input(self, image_input: Any) -> list[Any]:
        embeds = super()._process_image_input(image_input)
        return list(self.saint_prune_tiles(embeds, int(self.config.mm_tokens_per_image)))

"""Mistral 3 (Mistral-Small-3.1 / 3.2: a Pixtral tower, a 2x2 patch merger) for vLLM with
SAINT image-token pruning after the projector.

Registered over ``Mistral3ForConditionalGeneration`` by the ``saint`` plugin; without
``saint_keep_ratio`` it is vLLM's class unchanged. An image's prompt is its grid of merged
tokens row by row, each row of ``W`` ``[IMG]`` tokens ended by ``[IMG_BREAK]`` (the last by
``[IMG_END]``). vLLM fixes that layout before the tower runs, so with pruning on every row
keeps ``kept_tokens(W)`` of its tokens, chosen in the row by the fixed-budget drop, and
every break and end token stays (the language model still sees where the rows end). The
processor's replacement and token count follow the same rule. Positions are 1-D, as for
LLaVA-1.5. Precomputed image embeddings are refused while pruning is on.
"""

from __future__ import annotations

from typing import Any

from .compat import install_torchvision_shim

install_torchvision_shim()

from vllm.model_executor.models.mistral3 import (  # noqa: E402
    Mistral3DummyInputsBuilder,
    Mistral3ForConditionalGeneration,
    Mistral3MultiModalProcessor,
    Mistral3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .rows import KeptRowPrompts, KeptRowTokens, row_keep_masks  # noqa: E402
from .tiles import SaintTilePruningMixin  # noqa: E402


class SaintMistral3ProcessingInfo(KeptRowTokens, Mistral3ProcessingInfo):
    """Mistral 3's processing info with each image's token count cut row by row."""


class SaintMistral3MultiModalProcessor(KeptRowPrompts, Mistral3MultiModalProcessor):
    """Mistral 3's processor with every row's ``[IMG]`` run cut."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintMistral3MultiModalProcessor, info=SaintMistral3ProcessingInfo, dummy_inputs=Mistral3DummyInputsBuilder
)
class SaintMistral3ForConditionalGeneration(SaintTilePruningMixin, Mistral3ForConditionalGeneration):
    """vLLM's Mistral 3; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    def _process_image_input(self, image_input: Any) -> Any:
        self.saint_refuse_embeddings(image_input)
        embeds = super()._process_image_input(image_input)
        if self.saint is None:
            return embeds
        merged_patch = self.config.vision_config.patch_size * self.config.spatial_merge_size
        return self.saint_keep(embeds, row_keep_masks(embeds, image_input["pixel_values"], merged_patch, self.saint))

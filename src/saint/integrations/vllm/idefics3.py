"""Idefics3 and SmolVLM for vLLM with SAINT image-token pruning after the connector.

Registered over ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``
by the ``saint`` plugin; without ``saint_keep_ratio`` they are vLLM's classes unchanged.
With it, every tile (and the global view) of an image gets ``kept_tokens(image_seq_len)``
placeholders instead of ``image_seq_len`` (the processing info's prompt text and token
count, which vLLM also uses for its budgets), and the connector's output of each tile is
cut to the same count by SAINT's fixed-budget drop. Positions are 1-D, as for LLaVA-1.5:
the shortened prompt is numbered 0..L-1 as vLLM numbers any prompt. Precomputed image
embeddings are refused while pruning is on.
"""

from __future__ import annotations

from typing import Any

from .compat import install_torchvision_shim

install_torchvision_shim()

from vllm.model_executor.models.idefics3 import (  # noqa: E402
    Idefics3DummyInputsBuilder,
    Idefics3ForConditionalGeneration,
    Idefics3MultiModalProcessor,
    Idefics3ProcessingInfo,
)
from vllm.model_executor.models.smolvlm import (  # noqa: E402
    SmolVLMForConditionalGeneration,
    SmolVLMProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .settings import settings_from_config  # noqa: E402
from .tiles import SaintTilePruningMixin, processor_with_kept_tiles  # noqa: E402


class _KeptTileTokens:
    """Processing info whose tiles each hold SAINT's kept count of image tokens."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)  # type: ignore[call-arg]
        self.saint = settings_from_config(self.get_hf_config())  # type: ignore[attr-defined]

    def get_image_repl(self, *, image_width: int, image_height: int, processor: Any, mm_kwargs: Any) -> str:
        return super().get_image_repl(  # type: ignore[misc]
            image_width=image_width, image_height=image_height,
            processor=processor_with_kept_tiles(processor, self.saint, "image_seq_len"), mm_kwargs=mm_kwargs)

    def get_num_image_tokens(self, *, image_width: int, image_height: int, processor: Any, mm_kwargs: Any) -> int:
        return super().get_num_image_tokens(  # type: ignore[misc]
            image_width=image_width, image_height=image_height,
            processor=processor_with_kept_tiles(processor, self.saint, "image_seq_len"), mm_kwargs=mm_kwargs)


class SaintIdefics3ProcessingInfo(_KeptTileTokens, Idefics3ProcessingInfo):
    """Idefics3's processing info with each tile's token count cut to SAINT's budget."""


class SaintSmolVLMProcessingInfo(_KeptTileTokens, SmolVLMProcessingInfo):
    """SmolVLM's processing info with each tile's token count cut to SAINT's budget."""


class _PrunedTiles(SaintTilePruningMixin):
    """The model side: each tile's connector output cut to SAINT's kept count."""

    def _process_image_input(self, image_input: Any) -> Any:
        self.saint_refuse_embeddings(image_input)
        embeds = super()._process_image_input(image_input)  # type: ignore[misc]
        return self.saint_prune_tiles(embeds, int(self.model.image_seq_len))  # type: ignore[attr-defined]


@MULTIMODAL_REGISTRY.register_processor(
    Idefics3MultiModalProcessor, info=SaintIdefics3ProcessingInfo, dummy_inputs=Idefics3DummyInputsBuilder
)
class SaintIdefics3ForConditionalGeneration(_PrunedTiles, Idefics3ForConditionalGeneration):
    """vLLM's Idefics3; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""


@MULTIMODAL_REGISTRY.register_processor(
    Idefics3MultiModalProcessor, info=SaintSmolVLMProcessingInfo, dummy_inputs=Idefics3DummyInputsBuilder
)
class SaintSmolVLMForConditionalGeneration(_PrunedTiles, SmolVLMForConditionalGeneration):
    """vLLM's SmolVLM; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

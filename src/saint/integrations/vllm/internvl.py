"""InternVL for vLLM with SAINT image-token pruning after the projector, in both formats:
the transformers one (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints, which
vLLM serves with its InternS1 classes) and the remote-code one (``InternVLChatModel``, e.g.
``OpenGVLab/InternVL3-8B``, vLLM's own InternVL classes).

The ``saint`` plugin registers a subclass over each; without ``saint_keep_ratio`` it is
vLLM's class unchanged. With it, every tile (and the thumbnail) of an image gets
``kept_tokens(image_seq_length)`` context tokens instead of ``image_seq_length``: the
processing info hands vLLM and the HF processor a copy of the processor with that count
cut, so the prompt text, the token counts and vLLM's budgets all follow. The projector's
output of each tile is cut to the same count by the fixed-budget drop, tile by tile.
Positions are 1-D: the shortened prompt is numbered 0..L-1 as vLLM numbers any prompt.
While pruning, videos are refused (set ``limit_mm_per_prompt={"video": 0}``), and so are
precomputed embeddings.
"""

from __future__ import annotations

from typing import Any

from .compat import import_with_pil_transforms, install_torchvision_shim

install_torchvision_shim()
# vLLM's InternVL processor (the remote-code format's) imports torchvision's transforms.
import_with_pil_transforms(
    "vllm.transformers_utils.processors.internvl",
    "transformers.processing_utils", "vllm.multimodal.image", "vllm.multimodal.processing", "vllm.tokenizers.hf",
)

from vllm.model_executor.models.interns1 import (  # noqa: E402
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.model_executor.models.internvl import (  # noqa: E402
    InternVLChatModel,
    InternVLDummyInputsBuilder,
    InternVLMultiModalProcessor,
    InternVLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .settings import ImagesOnlyInfo  # noqa: E402
from .tiles import SaintTilePruningMixin, processor_with_kept_tiles  # noqa: E402


class _KeptContextTokens(ImagesOnlyInfo):
    """InternVL's processing info whose processor gives every tile SAINT's kept count of
    context tokens; with pruning on, a configuration that allows videos is refused."""

    saint_family = "InternVL"

    def get_hf_processor(self, **kwargs: object) -> Any:
        processor = super().get_hf_processor(**kwargs)  # type: ignore[misc]
        return processor_with_kept_tiles(processor, self.saint, "image_seq_length")


class SaintInternVLProcessingInfo(_KeptContextTokens, InternS1ProcessingInfo):
    """The transformers format's processing info with SAINT's per-tile count."""


class SaintInternVLChatProcessingInfo(_KeptContextTokens, InternVLProcessingInfo):
    """The remote-code format's processing info with SAINT's per-tile count."""


class _PrunedTiles(SaintTilePruningMixin):
    """Every tile's projector output cut to SAINT's kept count."""

    num_image_token: int

    def _process_vision_input(self, image_input: Any) -> Any:
        self.saint_refuse_embeddings(image_input)
        return self.saint_prune_tiles(super()._process_vision_input(image_input), self.num_image_token)  # type: ignore[misc]


@MULTIMODAL_REGISTRY.register_processor(
    InternS1MultiModalProcessor, info=SaintInternVLProcessingInfo, dummy_inputs=InternS1DummyInputsBuilder
)
class SaintInternVLForConditionalGeneration(_PrunedTiles, InternS1ForConditionalGeneration):
    """vLLM's InternVL (transformers format); with ``saint_keep_ratio`` set, image tokens are
    pruned by SAINT."""


@MULTIMODAL_REGISTRY.register_processor(
    InternVLMultiModalProcessor, info=SaintInternVLChatProcessingInfo, dummy_inputs=InternVLDummyInputsBuilder
)
class SaintInternVLChatModel(_PrunedTiles, InternVLChatModel):
    """vLLM's InternVL (remote-code format); with ``saint_keep_ratio`` set, image tokens are
    pruned by SAINT."""

"""InternVL (the transformers format, ``InternVLForConditionalGeneration``) for vLLM with
SAINT image-token pruning after the projector.

vLLM serves this format with its InternS1 classes; the ``saint`` plugin registers this
subclass over ``InternVLForConditionalGeneration``, and without ``saint_keep_ratio`` it is
vLLM's class unchanged. With it, every tile (and the thumbnail) of an image gets
``kept_tokens(image_seq_length)`` context tokens instead of ``image_seq_length``: the
processing info hands vLLM and the HF processor a copy of the processor with that count
cut, so the prompt text, the token counts and vLLM's budgets all follow. The projector's
output of each tile is cut to the same count by the fixed-budget drop, tile by tile.
Positions are 1-D: the shortened prompt is numbered 0..L-1 as vLLM numbers any prompt.
While pruning, videos are refused (set ``limit_mm_per_prompt={"video": 0}``), and so are
precomputed embeddings. The remote-code format (``InternVLChatModel``) is not overridden.
"""

from __future__ import annotations

from typing import Any

from .compat import install_torchvision_shim

install_torchvision_shim()

from vllm.config import VllmConfig  # noqa: E402
from vllm.model_executor.models.interns1 import (  # noqa: E402
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .settings import images_only_settings  # noqa: E402
from .tiles import SaintTilePruningMixin, processor_with_kept_tiles  # noqa: E402


class SaintInternVLProcessingInfo(InternS1ProcessingInfo):
    """InternVL's processing info whose processor gives every tile SAINT's kept count of
    context tokens; with pruning on, a configuration that allows videos is refused."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.saint = images_only_settings(self, ctx, "InternVL")

    def get_hf_processor(self, **kwargs: object) -> Any:
        return processor_with_kept_tiles(super().get_hf_processor(**kwargs), self.saint, "image_seq_length")


@MULTIMODAL_REGISTRY.register_processor(
    InternS1MultiModalProcessor, info=SaintInternVLProcessingInfo, dummy_inputs=InternS1DummyInputsBuilder
)
class SaintInternVLForConditionalGeneration(SaintTilePruningMixin, InternS1ForConditionalGeneration):
    """vLLM's InternVL (transformers format); with ``saint_keep_ratio`` set, image tokens are
    pruned by SAINT."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.saint_setup()

    def _process_vision_input(self, image_input: Any) -> Any:
        self.saint_refuse_embeddings(image_input)
        return self.saint_prune_tiles(super()._process_vision_input(image_input), self.num_image_token)

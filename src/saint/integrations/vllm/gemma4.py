"""Gemma 4 (``Gemma4ForConditionalGeneration``) for vLLM with SAINT image-token pruning after
the vision embedder.

Registered over vLLM's class by the ``saint`` plugin; without ``saint_keep_ratio`` it is
vLLM's class unchanged. Gemma 4 gives an image as many soft tokens as its size allows (up to
the processor's ``max_soft_tokens``), between ``<|image>`` and ``<image|>``; with pruning on,
an image of ``N`` soft tokens gets ``kept_tokens(N)`` image tokens instead (the processing
info's replacement, which vLLM's budgets follow too), and the embedder's output of each image
is cut to the same count by the fixed-budget drop. Video frames and audio pass unpruned.
Positions are 1-D. vLLM's encoder CUDA graphs (``cudagraph_mm_encoder``) run the tower outside
``_process_image_input`` and are refused while pruning is on (:mod:`.compat`).
"""

from __future__ import annotations

from typing import Any

from .compat import install_torchvision_shim

install_torchvision_shim()

from vllm.model_executor.models.gemma4_mm import (  # noqa: E402
    Gemma4DummyInputsBuilder,
    Gemma4ForConditionalGeneration,
    Gemma4MultiModalProcessor,
    Gemma4ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.processing import PromptUpdateDetails  # noqa: E402

from .rows import kept_rows  # noqa: E402
from .settings import settings_from_config  # noqa: E402
from .tiles import SaintTilePruningMixin  # noqa: E402


class SaintGemma4ProcessingInfo(Gemma4ProcessingInfo):
    """Gemma 4's processing info whose image replacement holds SAINT's kept count of image
    tokens (its ``<|image>`` and ``<image|>`` stay)."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.saint = settings_from_config(self.get_hf_config())

    def get_image_repl(self, *, image_width: int, image_height: int, processor: Any,
                       max_soft_tokens: int | None = None) -> PromptUpdateDetails:
        details = super().get_image_repl(image_width=image_width, image_height=image_height, processor=processor,
                                         max_soft_tokens=max_soft_tokens)
        if self.saint is None:
            return details
        token = int(self.get_hf_config().image_token_id)
        return PromptUpdateDetails.select_token_id(kept_rows(details.full, token, self.saint), token)


@MULTIMODAL_REGISTRY.register_processor(
    Gemma4MultiModalProcessor, info=SaintGemma4ProcessingInfo, dummy_inputs=Gemma4DummyInputsBuilder
)
class SaintGemma4ForConditionalGeneration(SaintTilePruningMixin, Gemma4ForConditionalGeneration):
    """vLLM's Gemma 4; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    def _process_image_input(self, image_input: Any) -> list[Any]:
        return list(self.saint_prune_images(super()._process_image_input(image_input)))

"""LightOnOCR (Mistral 3's Pixtral tower and patch merger before a Qwen3 language model) for
vLLM with SAINT image-token pruning after the projector.

Registered over ``LightOnOCRForConditionalGeneration`` by the ``saint`` plugin; without
``saint_keep_ratio`` it is vLLM's class unchanged. Unlike Mistral 3, an image's prompt is one
run of ``rows x columns`` image tokens, with no row breaks or image end (vLLM's and
transformers' LightOnOCR processors alike), so with pruning on each image keeps
``kept_tokens(rows x columns)`` of them, chosen over the whole image by the fixed-budget
drop. Positions are 1-D, as for Mistral 3. Precomputed image embeddings are refused while
pruning is on.
"""

from __future__ import annotations

from typing import Any

from .compat import install_torchvision_shim

install_torchvision_shim()

from vllm.model_executor.models.lightonocr import (  # noqa: E402
    LightOnOCRForConditionalGeneration,
    LightOnOCRMultiModalProcessor,
    LightOnOCRProcessingInfo,
)
from vllm.model_executor.models.mistral3 import Mistral3DummyInputsBuilder  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .rows import KeptRowPrompts  # noqa: E402
from .tiles import KeptImageTokens, SaintTilePruningMixin  # noqa: E402


class SaintLightOnOCRProcessingInfo(KeptImageTokens, LightOnOCRProcessingInfo):
    """LightOnOCR's processing info with each image's token count cut to SAINT's budget of
    its ``rows x columns`` tokens."""

    def saint_kept_count(self, n: int, image_width: int, image_height: int) -> int:
        assert self.saint is not None
        columns, rows = self.get_vision_encoder_info().get_patch_grid_size(
            image_width=image_width, image_height=image_height)
        return self.saint.kept_tokens(rows * columns)


class SaintLightOnOCRMultiModalProcessor(KeptRowPrompts, LightOnOCRMultiModalProcessor):
    """LightOnOCR's processor with each image's run of image tokens cut (an image is one run:
    it has no row ends)."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintLightOnOCRMultiModalProcessor, info=SaintLightOnOCRProcessingInfo, dummy_inputs=Mistral3DummyInputsBuilder
)
class SaintLightOnOCRForConditionalGeneration(SaintTilePruningMixin, LightOnOCRForConditionalGeneration):
    """vLLM's LightOnOCR; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    def _process_image_input(self, image_input: Any) -> Any:
        self.saint_refuse_embeddings(image_input)
        return self.saint_prune_images(super()._process_image_input(image_input))

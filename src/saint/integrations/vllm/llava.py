"""LLaVA-1.5 (CLIP / SigLIP tower) and Pixtral-based LLaVA (e.g. Pixtral-12B in the
transformers format) for vLLM with SAINT image-token pruning after the projector.

Registered over ``LlavaForConditionalGeneration`` by the ``saint`` plugin; without
``saint_keep_ratio`` it is vLLM's class unchanged. With it, a CLIP / SigLIP image gets
``kept_tokens(N)`` placeholders (the processing info's ``get_num_image_tokens``, which vLLM
also uses for its budgets) and the projector's output is cut to the same count by SAINT's
fixed-budget drop; a Pixtral image's rows are cut row by row, as Mistral 3's
(:mod:`saint.integrations.vllm.rows`). LLaVA's positions are 1-D: the shortened prompt is
numbered 0..L-1 as vLLM numbers any prompt, so no runner flag or position rewrite is
involved. Precomputed image embeddings are refused while pruning is on.
"""

from __future__ import annotations

from typing import Any

from .compat import install_torchvision_shim

install_torchvision_shim()

from transformers import PixtralVisionConfig  # noqa: E402
from vllm.model_executor.models.llava import (  # noqa: E402
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .rows import KeptRowPrompts, KeptRowTokens, row_keep_masks  # noqa: E402
from .tiles import KeptImageTokens, SaintTilePruningMixin  # noqa: E402


class SaintLlavaProcessingInfo(KeptImageTokens, LlavaProcessingInfo):
    """LLaVA's processing info with each image's token count cut to SAINT's budget."""


class SaintPixtralHFProcessingInfo(KeptRowTokens, PixtralHFProcessingInfo):
    """Pixtral-based LLaVA's processing info with each image's token count cut row by row."""


class SaintPixtralHFMultiModalProcessor(KeptRowPrompts, PixtralHFMultiModalProcessor):
    """Pixtral-based LLaVA's processor with every row's ``[IMG]`` run cut."""


def _info(ctx: Any) -> Any:
    """vLLM's own choice of tower (CLIP / SigLIP, or Pixtral), with SAINT's counts."""
    if isinstance(ctx.get_hf_config().vision_config, PixtralVisionConfig):
        return SaintPixtralHFProcessingInfo(ctx)
    return SaintLlavaProcessingInfo(ctx)


def _processor(info: Any, dummy_inputs: Any) -> Any:
    """vLLM's LLaVA processor, or for a Pixtral tower the one that cuts every row."""
    if isinstance(info, PixtralHFProcessingInfo):
        return SaintPixtralHFMultiModalProcessor(info, dummy_inputs)
    return LlavaMultiModalProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder)
class SaintLlavaForConditionalGeneration(SaintTilePruningMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    def _process_image_input(self, image_input: Any) -> Any:
        self.saint_refuse_embeddings(image_input)
        embeds = super()._process_image_input(image_input)
        if self.saint is None or image_input["type"] != "pixel_values_pixtral":
            return self.saint_prune_images(embeds)
        patch = self.config.vision_config.patch_size  # rows of [IMG] tokens, each ended by a break
        return self.saint_keep(embeds, row_keep_masks(embeds, image_input["pixel_values"], patch, self.saint))

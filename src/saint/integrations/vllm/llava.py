"""LLaVA-1.5 (CLIP / SigLIP tower) for vLLM with SAINT image-token pruning after the projector.

Registered over ``LlavaForConditionalGeneration`` by the ``saint`` plugin; without
``saint_keep_ratio`` it is vLLM's class unchanged. With it, each image gets
``kept_tokens(N)`` placeholders (the processing info's ``get_num_image_tokens``, which vLLM
also uses for its budgets) and the projector's output is cut to the same count by SAINT's
fixed-budget drop. LLaVA's positions are 1-D: the shortened prompt is numbered 0..L-1 as
vLLM numbers any prompt, so no runner flag or position rewrite is involved. Pixtral-based
LLaVA checkpoints and precomputed image embeddings are refused while pruning is on.
"""

from __future__ import annotations

from typing import Any

from .compat import install_torchvision_shim

install_torchvision_shim()

from transformers import PixtralVisionConfig  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402
from vllm.model_executor.models.llava import (  # noqa: E402
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .settings import SaintSettingsError, settings_from_config  # noqa: E402


class SaintLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with each image's token count cut to SAINT's budget."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.saint = settings_from_config(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return n if self.saint is None else self.saint.kept_tokens(n)


def _info(ctx: Any) -> Any:
    """vLLM's own choice (LLaVA or Pixtral), with SAINT's info for LLaVA."""
    info = _build_llava_or_pixtral_hf_info(ctx)
    if not isinstance(info, LlavaProcessingInfo):
        if settings_from_config(ctx.get_hf_config()) is not None:
            raise SaintSettingsError(
                "saint_keep_ratio: SAINT pruning in vLLM supports LLaVA with a CLIP or SigLIP "
                f"tower, not {type(ctx.get_hf_config().vision_config).__name__}"
            )
        return info
    return SaintLlavaProcessingInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder
)
class SaintLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.saint = settings_from_config(self.config)
        self.saint_last_keep: list = []
        if self.saint is not None and isinstance(self.config.vision_config, PixtralVisionConfig):
            raise SaintSettingsError("saint_keep_ratio: Pixtral-based LLaVA is not supported")

    def embed_multimodal(self, **kwargs: object) -> Any:
        if self.saint is not None and kwargs.get("image_embeds") is not None:
            raise SaintSettingsError(
                "saint_keep_ratio: precomputed image embeddings cannot be pruned (their "
                "placeholder count is their own length); send pixels or switch SAINT off"
            )
        embeds = super().embed_multimodal(**kwargs)
        if self.saint is None or len(embeds) == 0:
            return embeds
        masks = [self.saint.keep_mask(e) for e in embeds]
        self.saint_last_keep = masks
        return tuple(e[m] for e, m in zip(embeds, masks, strict=True))

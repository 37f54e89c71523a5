"""LLaVA-NeXT and LLaVA-OneVision (anyres tiling) for vLLM with SAINT image-token pruning
after the projector.

Registered over ``LlavaNextForConditionalGeneration`` and
``LlavaOnevisionForConditionalGeneration`` by the ``saint`` plugin; without
``saint_keep_ratio`` they are vLLM's classes unchanged. An image's tokens are its base view
(``B`` tokens), then its unpadded crop grid of ``H`` rows of ``W`` tokens, each row ended by
the ``image_newline`` token. With pruning on, the base view keeps ``kept_tokens(B)`` and the
grid ``kept_tokens(H * W)`` of its tokens, each by SAINT's fixed-budget drop, in order; every
newline stays (the language model still sees where the rows end). The processing info's
token count (vLLM's placeholders and budgets) follows the same rule. Positions are 1-D, as
for LLaVA-1.5. While pruning, precomputed embeddings are refused, and for OneVision videos
too (set ``limit_mm_per_prompt={"video": 0}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .compat import install_torchvision_shim

install_torchvision_shim()

import torch  # noqa: E402
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder  # noqa: E402
from vllm.model_executor.models.llava_next import (  # noqa: E402
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (  # noqa: E402
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.model_executor.models.vision import get_num_selected_vision_tokens  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .settings import (  # noqa: E402
    SaintSettingsError,
    SaintVllmSettings,
    images_only_settings,
    settings_from_config,
)
from .tiles import SaintTilePruningMixin  # noqa: E402


def anyres_keep_mask(
    embeds: torch.Tensor, newline: torch.Tensor, base_tokens: int, saint: SaintVllmSettings
) -> torch.Tensor:
    """``[N]`` bool over one image's packed ``[N, D]`` embeddings (``base_tokens`` of its base
    view, then its grid rows, each ended by ``newline``): the base view's and the grid's
    kept tokens, each by the fixed-budget drop, and every newline."""
    n = embeds.shape[0]
    rows = (embeds[base_tokens:] == newline).all(-1)
    ends = rows.nonzero().flatten()
    height = len(ends)
    width = (n - base_tokens) // max(height, 1)
    expected = torch.arange(1, height + 1, device=ends.device) * width - 1
    if height == 0 or height * width != n - base_tokens or not torch.equal(ends, expected):
        raise SaintSettingsError(
            f"saint_keep_ratio: an image's {n} embeddings do not follow LLaVA-NeXT's layout ({base_tokens} base "
            "tokens, then grid rows each ended by image_newline); switch SAINT off for this model"
        )
    keep = torch.zeros(n, dtype=torch.bool, device=embeds.device)
    keep[:base_tokens] = saint.keep_mask(embeds[:base_tokens])
    grid = torch.zeros(n, dtype=torch.bool, device=embeds.device)
    grid[base_tokens:] = ~rows
    if grid.any():  # an image of its base view alone has one newline and no grid
        keep[grid] = saint.keep_mask(embeds[grid])
    keep[base_tokens:] |= rows
    return keep


class _KeptAnyresTokens:
    """Processing info whose images hold SAINT's kept counts: of the base view, of the grid,
    and every newline."""

    def _saint_settings(self, ctx: Any) -> SaintVllmSettings | None:
        return settings_from_config(self.get_hf_config())  # type: ignore[attr-defined]

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)  # type: ignore[call-arg]
        self.saint = self._saint_settings(ctx)

    def _get_num_unpadded_features(self, **kwargs: Any) -> tuple[int, int]:
        grid, newlines = super()._get_num_unpadded_features(**kwargs)  # type: ignore[misc]
        return (grid if self.saint is None else self.saint.kept_tokens(grid)), newlines

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)  # type: ignore[misc]
        if self.saint is None:
            return n
        base = get_num_selected_vision_tokens(
            self.get_vision_encoder_info().get_num_image_tokens(  # type: ignore[attr-defined]
                image_width=image_width, image_height=image_height),
            self.get_hf_config().vision_feature_select_strategy,  # type: ignore[attr-defined]
        )
        return n - base + self.saint.kept_tokens(base)


class SaintLlavaNextProcessingInfo(_KeptAnyresTokens, LlavaNextProcessingInfo):
    """LLaVA-NeXT's processing info with each image's token count cut to SAINT's budget."""


class SaintLlavaOnevisionProcessingInfo(_KeptAnyresTokens, LlavaOnevisionProcessingInfo):
    """LLaVA-OneVision's processing info with each image's token count cut to SAINT's
    budget; with pruning on, a configuration that allows videos is refused."""

    def _saint_settings(self, ctx: Any) -> SaintVllmSettings | None:
        return images_only_settings(self, ctx, "LLaVA-OneVision")


class _PrunedAnyres(SaintTilePruningMixin):
    """The model side: each image's base view and grid cut to SAINT's kept counts."""

    def _process_image_input(self, image_input: Any) -> Sequence[torch.Tensor]:
        self.saint_refuse_embeddings(image_input)
        embeds = super()._process_image_input(image_input)  # type: ignore[misc]
        if self.saint is None:
            return embeds
        vision = self.config.vision_config  # type: ignore[attr-defined]
        base = (vision.image_size // vision.patch_size) ** 2
        newline = self.image_newline.to(embeds[0].dtype)  # type: ignore[attr-defined]
        return self.saint_keep(embeds, [anyres_keep_mask(e, newline, base, self.saint) for e in embeds])


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=SaintLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class SaintLlavaNextForConditionalGeneration(_PrunedAnyres, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionMultiModalProcessor, info=SaintLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class SaintLlavaOnevisionForConditionalGeneration(_PrunedAnyres, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

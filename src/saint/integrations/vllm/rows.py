"""What the overrides of Pixtral-tower models share (Mistral 3, Pixtral-based LLaVA): an
image's prompt is its grid of tokens row by row, each row of ``W`` ``[IMG]`` tokens ended by
``[IMG_BREAK]`` (the last by ``[IMG_END]``), a layout vLLM fixes before the tower runs. So
with pruning on every row keeps ``kept_tokens(W)`` of its tokens, chosen within the row by
the fixed-budget drop, and every break and end token stays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vllm.multimodal.processing import PromptReplacement, PromptUpdate, PromptUpdateDetails

from .settings import SaintVllmSettings
from .tiles import KeptImageTokens, tile_keep_mask


def kept_rows(tokens: Sequence[int], image_token: int, settings: SaintVllmSettings) -> list[int]:
    """An image's placeholder tokens with every row's run of ``image_token`` cut to
    ``settings.kept_tokens`` of its length; the row ends stay."""
    out: list[int] = []
    run = 0
    for token in [*tokens, None]:
        if token == image_token:
            run += 1
            continue
        out += [image_token] * (settings.kept_tokens(run) if run else 0)
        run = 0
        if token is not None:
            out.append(token)
    return out


class KeptRowTokens(KeptImageTokens):
    """Processing info (Pixtral-tower models) whose images' token count is cut row by row."""

    def saint_kept_count(self, n: int, image_width: int, image_height: int) -> int:
        assert self.saint is not None
        columns, rows = self.get_vision_encoder_info().get_patch_grid_size(  # type: ignore[attr-defined]
            image_width=image_width, image_height=image_height)
        return rows * self.saint.kept_tokens(columns)


class KeptRowPrompts:
    """Multimodal processor (Pixtral-tower models) that gives every row of an image as many
    ``[IMG]`` tokens as SAINT will keep of it."""

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # type: ignore[misc]
        saint = self.info.saint  # type: ignore[attr-defined]
        if saint is None:
            return updates
        token = self.info.get_hf_config().image_token_index  # type: ignore[attr-defined]

        def replacement(item_idx: int, full: Any) -> PromptUpdateDetails:
            return PromptUpdateDetails.select_token_id(kept_rows(full(item_idx).full, token, saint), token)

        return [PromptReplacement(modality=u.modality, target=u.target,
                                  replacement=lambda i, full=u.replacement: replacement(i, full))
                for u in updates]


def row_keep_masks(embeds: Sequence[Any], pixel_values: Sequence[Any], merged_patch: int,
                   settings: SaintVllmSettings) -> list[Any]:
    """Each image's keep mask, row by row: an image of width ``w`` px has
    ``ceil(w / merged_patch)`` tokens per row (as vLLM counts them)."""
    columns = [(img.shape[-1] - 1) // merged_patch + 1 for img in pixel_values]
    return [tile_keep_mask(e, c, settings) for e, c in zip(embeds, columns, strict=True)]

"""What the overrides of models with fixed-size image runs share (Idefics3 / SmolVLM,
InternVL, Gemma 3, PaliGemma, LLaVA, and the row layouts of ``rows.py``): every tile (or
whole image) is a run of a fixed number of tokens, so SAINT's budget is a per-run count. The
prompt side gets that count (a copy of the HF processor with it cut, or the processing
info's token count); the model side cuts each run's projector output to it by the
fixed-budget drop, run by run, in order."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from .settings import SaintSettingsError, SaintVllmSettings, settings_from_config

EMBEDDING_INPUTS = ("image_embeds", "video_embeds")


def processor_with_kept_tiles(processor: Any, saint: SaintVllmSettings | None, field: str) -> Any:
    """``processor`` as the prompt side sees it: a shallow copy with its per-tile token count
    ``field`` (e.g. ``image_seq_len``) cut to SAINT's kept count; itself when pruning is off."""
    if saint is None:
        return processor
    kept = copy.copy(processor)
    setattr(kept, field, saint.kept_tokens(int(getattr(processor, field))))
    return kept


def tile_keep_mask(embeds: torch.Tensor, per_tile: int, settings: SaintVllmSettings) -> torch.Tensor:
    """``[tiles * per_tile]`` bool over one image's embeddings in runs of ``per_tile`` (tiles,
    or Mistral 3's rows): each run's kept tokens, by the fixed-budget drop within the run."""
    if embeds.shape[0] % per_tile:
        raise ValueError(f"an image's {embeds.shape[0]} embeddings are not runs of {per_tile}")
    return torch.cat([settings.keep_mask(run) for run in embeds.view(-1, per_tile, embeds.shape[-1])])


class KeptImageTokens:
    """Processing info whose every image is one run: it keeps SAINT's count of its tokens."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)  # type: ignore[call-arg]
        self.saint = settings_from_config(self.get_hf_config())  # type: ignore[attr-defined]

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)  # type: ignore[misc]
        return n if self.saint is None else self.saint_kept_count(n, image_width, image_height)

    def saint_kept_count(self, n: int, image_width: int, image_height: int) -> int:
        """The kept count of an image of ``n`` tokens (one run: SAINT's budget of ``n``)."""
        assert self.saint is not None
        return self.saint.kept_tokens(n)


class SaintTilePruningMixin:
    """For vLLM's model classes whose images are runs of a fixed token count (tiles, crops,
    rows): put first among the bases, it reads the SAINT settings after the vLLM class has
    been built and cuts every run's tokens."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.saint = settings_from_config(self.config)  # type: ignore[attr-defined]
        self.saint_last_keep: list[torch.Tensor] = []  # keep masks of the last image batch
        mm_config = vllm_config.model_config.multimodal_config
        if self.saint is not None and getattr(mm_config, "enable_mm_embeds", False):
            # refused at start: one request's embeddings refused in the worker stopped the whole engine
            raise SaintSettingsError(
                "saint_keep_ratio with enable_mm_embeds: precomputed image embeddings cannot be pruned (their "
                "placeholder count is their own length); serve without --enable-mm-embeds or switch SAINT off")

    def saint_refuse_embeddings(self, image_input: Any) -> None:
        """Precomputed embeddings carry their own length as their placeholder count."""
        if self.saint is not None and image_input["type"] in EMBEDDING_INPUTS:
            raise SaintSettingsError(
                "saint_keep_ratio: precomputed image embeddings cannot be pruned (their placeholder count is "
                "their own length); send pixels or switch SAINT off"
            )

    def saint_keep(self, embeds: Sequence[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each image's kept embeddings by its ``[N]`` mask (the masks stay for
        ``last_kept_indices``)."""
        self.saint_last_keep = masks
        return [e[m] for e, m in zip(embeds, masks, strict=True)]

    def saint_prune_images(self, embeds: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Each image's ``[N, D]`` embeddings, one run, cut to the kept count."""
        if self.saint is None:
            return embeds
        return self.saint_keep(embeds, [self.saint.keep_mask(e) for e in embeds])

    def saint_prune_tiles(self, embeds: Sequence[torch.Tensor], per_tile: int) -> Sequence[torch.Tensor]:
        """Each image's ``[tiles * per_tile, D]`` embeddings, every tile cut to the kept count."""
        if self.saint is None:
            return embeds
        return self.saint_keep(embeds, [tile_keep_mask(e, per_tile, self.saint) for e in embeds])

"""What the Qwen2.5-VL and Qwen3-VL overrides share: each image's placeholder run cut to
SAINT's budget in the prompt, and the M-RoPE positions a kept token carries into vLLM's
``recompute_mrope_positions``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from .settings import SaintVllmSettings


def media_positions(grid_thw: Sequence[int], merge_size: int, **time: float) -> torch.Tensor:
    """``[N, 4]`` per merged token: its (t, h, w) M-RoPE offsets in the full grid, and the
    position step from the media's start to the text after it (largest offset + 1, as in
    the unpruned prompt; vLLM's EVS helper puts the grid width there instead)."""
    pos = compute_mrope_for_media(list(grid_thw), merge_size, **time)
    pos[:, 3] = pos[:, :3].max() + 1
    return pos


def budget_image_updates(
    updates: Sequence[PromptUpdate],
    settings: SaintVllmSettings,
    merge_size: int,
    out_mm_kwargs: Mapping[str, Any],
) -> list[PromptUpdate]:
    """The processor's prompt updates with each image's run of placeholder tokens cut from
    its ``N`` merged tokens to ``settings.kept_tokens(N)``; video updates unchanged."""

    def image_replacement(item_idx: int, token: int) -> list[int]:
        grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
        return [token] * settings.kept_tokens(int(grid.prod()) // merge_size**2)

    out = []
    for update in updates:
        if update.modality == "image":
            (token,) = update.target
            update = PromptReplacement(
                modality="image",
                target=update.target,
                replacement=lambda i, t=token: image_replacement(i, t),
            )
        out.append(update)
    return out

"""Per-instance wrappers of a Qwen-VL's feature functions: ``get_image_features`` /
``get_video_features`` mark every per-image feature tensor with the merge groups that
stay (``KEEP_ATTR``: the tower's choice, the ``random`` baseline's subset, or the
anchors of ``pool``'s windows, whose means they now carry), and Qwen3-VL's
``_deepstack_process`` indexes the deepstack features by the visual positions the
language-model side kept."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

KEEP_ATTR = "_saint_keep"  # set on every per-image feature tensor: bool [groups] kept (raster order)
FEATURE_FNS = {"image": "get_image_features", "video": "get_video_features"}


def random_keep(n: int, ratio: float, seed: int, device: torch.device) -> torch.Tensor:
    """A seeded random ``ratio`` of ``n`` groups (the same subset for every sample of size ``n``)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=gen)[: max(1, round(ratio * n))]] = True
    return keep.to(device)



def make_features(handle: Any, modality: str, original: Any):
    """``get_image_features`` / ``get_video_features`` that mark every per-image feature
    tensor (and deepstack feature) with its kept groups (``KEEP_ATTR``, raster order)."""
    cfg = handle.config

    unit = int(handle.mm.visual.spatial_merge_size)

    @functools.wraps(original)  # generate reads the signature to pre-encode the pixels
    def features(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        grid = kwargs.get(f"{modality}_grid_thw", args[1] if len(args) > 1 else None)
        if cfg.method == "pool":
            return _pooled(out, grid, unit, cfg.pool_size)
        feats = out.pooler_output
        if handle.tower is not None and handle.tower.keep_raster is not None:
            keep = handle.tower.keep_raster
        else:
            groups_per_frame = (grid[:, 1] * grid[:, 2] // int(handle.mm.visual.spatial_merge_size) ** 2).tolist()
            parts = []
            for (t, *_), n in zip(grid.tolist(), groups_per_frame, strict=True):
                frame = random_keep(n, cfg.keep_ratio, cfg.seed, feats[0].device) if cfg.method == "random" \
                    else torch.ones(n, dtype=torch.bool, device=feats[0].device)
                parts.append(frame.repeat(t))
            keep = torch.cat(parts)
        sizes = [int(f.shape[0]) for f in feats]
        for f, k in zip(feats, keep.split(sizes), strict=True):
            setattr(f, KEEP_ATTR, k)
        for layer in getattr(out, "deepstack_features", None) or []:
            for f, k in zip(layer, keep.split(sizes), strict=True):
                setattr(f, KEEP_ATTR, k)
        return out

    return features


def _pool_plan(grid: torch.Tensor, unit: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For the merged tokens of ``grid`` (raster order per frame, frames in order): the
    pooled cell of every token (cells numbered across all frames) and whether the token
    is its cell's top-left one (the anchor that carries the pooled value)."""
    cells, anchors, offset = [], [], 0
    for t, h, w in grid.tolist():
        rows, cols = h // unit, w // unit
        r = torch.arange(rows, device=device)[:, None].expand(rows, cols)
        c = torch.arange(cols, device=device)[None, :].expand(rows, cols)
        ncols = -(-cols // size)
        cell = ((r // size) * ncols + c // size).flatten()
        anchor = ((r % size == 0) & (c % size == 0)).flatten()
        per = int(cell.max()) + 1
        for _ in range(t):
            cells.append(cell + offset)
            anchors.append(anchor)
            offset += per
    return torch.cat(cells), torch.cat(anchors)


def _pooled(out: Any, grid: torch.Tensor, unit: int, size: int) -> Any:
    """Average pooling of every frame's merged-token grid: each window's mean is written
    at its top-left token (new feature tensors), which is the only one kept."""
    sizes = [int(f.shape[0]) for f in out.pooler_output]
    cell, anchor = _pool_plan(grid, unit, size, out.pooler_output[0].device)
    counts = torch.bincount(cell)

    def pool(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x = torch.cat(list(feats))
        means = torch.zeros(len(counts), x.shape[-1], dtype=torch.float32, device=x.device)
        means.index_add_(0, cell, x.float())
        means = (means / counts[:, None]).to(x.dtype)
        x = x.clone()
        x[anchor] = means[cell[anchor]]
        parts = x.split(sizes)
        for f, k in zip(parts, anchor.split(sizes), strict=True):
            setattr(f, KEEP_ATTR, k)
        return parts

    out.pooler_output = pool(out.pooler_output)
    if getattr(out, "deepstack_features", None) is not None:
        out.deepstack_features = [pool(layer) for layer in out.deepstack_features]
    return out


def make_deepstack(handle: Any, original: Any):
    """Qwen3-VL adds deepstack features at the visual positions after the first decoder
    layers; once the LLM side dropped tokens, index them by the surviving positions."""

    def process(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
        pruner = handle.pruner
        stage = pruner.stage
        if pruner.phase != "prefill" or stage is None or stage.identity:
            return original(hidden_states, visual_pos_masks, visual_embeds)
        vm = visual_pos_masks.to(stage.idx.device)
        rank = vm.flatten().long().cumsum(0).view_as(vm) - 1
        kept = torch.gather(vm, 1, stage.idx) & stage.valid
        rows = torch.gather(rank, 1, stage.idx)[kept]
        return original(hidden_states, kept, visual_embeds[rows.to(visual_embeds.device)])

    return process



def keep_of(f: torch.Tensor, modality: str) -> torch.Tensor:
    keep = getattr(f, KEEP_ATTR, None)
    if keep is None:
        raise ValueError(
            f"the {modality} features were computed outside the patched model; pass pixel values (or features "
            "from the patched model's get_image_features/get_video_features)"
        )
    return keep

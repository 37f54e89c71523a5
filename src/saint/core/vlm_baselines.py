"""The VLM baselines as pure tensor functions: FastV's drop by the last query's
attention, and the projector-side random subset / average pooling of the patch grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gather import drop_top_ranked


def fastv_keep_counts(eligible: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per sample, how many of the ``eligible [B, N]`` tokens FastV keeps: ``floor(n (1 - ratio))``."""
    n = eligible.sum(dim=1)
    return torch.floor(n.double() * (1.0 - ratio) + 1e-9).long()


def fastv_keep_mask(attention: torch.Tensor, eligible: torch.Tensor, ratio: float) -> torch.Tensor:
    """FastV: among ``eligible [B, N]`` tokens drop the ``ratio`` the last query attends
    to least (``attention [B, N]``); returns the keep mask ``[B, N]`` (True outside ``eligible``)."""
    n = eligible.sum(dim=1)
    return ~drop_top_ranked(-attention, eligible, n - fastv_keep_counts(eligible, ratio))


def grid_subset(num_patches: int, keep: int, seed: int) -> torch.Tensor:
    """Sorted positions of a seeded random subset of ``keep`` patches (the same for every image)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(num_patches, generator=gen)[:keep].sort().values


def pool_grid(tokens: torch.Tensor, side: int, rows: int, cols: int) -> torch.Tensor:
    """Adaptive average pooling of ``tokens [N, side*side, C]`` (a square patch grid,
    row-major) to ``rows x cols`` tokens ``[N, rows*cols, C]``."""
    n, p, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(n, c, side, side)
    return F.adaptive_avg_pool2d(x, (rows, cols)).flatten(2).transpose(1, 2)

"""ToMe bipartite soft matching (Bolya et al., 2023), written from the paper:
merge the ``r`` candidates most similar to some anchor into that anchor, averaging
by token size; sizes then bias attention by ``log(size)`` (proportional attention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gather import EPS, prunable_valid


@dataclass
class MergePlan:
    """Where merged tokens go, in full-sequence positions: ``src[b, i] -> dst[b, i]``.

    ``keep`` is the bool mask of survivors (everything but the sources). ``active``
    (optional, ``[B, r]`` bool) marks which pairs really merge, so that rows may
    merge different numbers of tokens (ragged per-sample plans).
    """

    src: torch.Tensor  # [B, r] long
    dst: torch.Tensor  # [B, r] long
    keep: torch.Tensor  # [B, N] bool
    active: torch.Tensor | None = None


def max_tome_r(num_prunable: int) -> int:
    """Largest r bipartite matching can merge from ``num_prunable`` tokens."""
    return num_prunable // 2


def tome_plan(
    metric: torch.Tensor, r: int, num_protected: int = 0, valid: torch.Tensor | None = None
) -> MergePlan:
    """Match the ``r`` most redundant candidates (even prunable positions) to anchors."""
    b, n, _ = metric.shape
    valid = prunable_valid(valid, b, n, metric.device)
    pv = valid[:, num_protected:]
    limit = max_tome_r(int(pv.sum(dim=1).min()) if b else 0)
    if r < 0 or r > limit:
        raise ValueError(f"ToMe r={r} must be in [0, {limit}] at this layer (half the prunable tokens)")
    m = F.normalize(metric[:, num_protected:].float(), dim=-1, eps=EPS)
    a, anc = m[:, 0::2], m[:, 1::2]
    va, vb = pv[:, 0::2], pv[:, 1::2]
    sim = (a @ anc.transpose(1, 2)).masked_fill(~(va[:, :, None] & vb[:, None, :]), float("-inf"))
    node_max, node_idx = sim.max(dim=-1)
    order = torch.argsort(node_max, dim=-1, descending=True, stable=True)[:, :r]
    src = num_protected + 2 * order
    dst = num_protected + 2 * torch.gather(node_idx, 1, order) + 1
    keep = valid.clone()
    keep.scatter_(1, src, False)
    return MergePlan(src, dst, keep)


def merge_weighted(x: torch.Tensor, sizes: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of each source into its destination (full length kept).

    ``x [B, N, C]``, ``sizes [B, N, 1]``; returns updated ``(x, sizes)``; callers then
    gather the survivors with ``plan.keep``.
    """
    c = x.shape[-1]
    weighted = (x * sizes).float()
    src_w = torch.gather(weighted, 1, plan.src[..., None].expand(-1, -1, c))
    src_s = torch.gather(sizes.float(), 1, plan.src[..., None])
    if plan.active is not None:
        src_w = src_w * plan.active[..., None]
        src_s = src_s * plan.active[..., None]
    weighted = weighted.scatter_add(1, plan.dst[..., None].expand(-1, -1, c), src_w)
    new_sizes = sizes.float().scatter_add(1, plan.dst[..., None], src_s)
    return (weighted / new_sizes).to(x.dtype), new_sizes.to(sizes.dtype)

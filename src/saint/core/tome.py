"""ToMe bipartite soft matching (Bolya et al., 2023), written from the paper:
merge the ``r`` candidates most similar to some anchor into that anchor, averaging
by token size; sizes then bias attention by ``log(size)`` (proportional attention).

Two layouts of the survivors (``order``): ``"keep"`` alternates candidates and
anchors over the prunable tokens and leaves the survivors in their original order;
``"reference"`` is facebookresearch/ToMe's: the alternation runs over every token
(protected ones are never candidates nor anchors) and the survivors come out as the
protected prefix, the unmerged candidates, then the anchors, so the order changes at
every step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bipartite import match_anchors
from .gather import EPS, prunable_valid

ORDERS = ("keep", "reference")


@dataclass
class MergePlan:
    """Where merged tokens go, in full-sequence positions: ``src[b, i] -> dst[b, i]``.

    ``keep`` is the bool mask of survivors (everything but the sources). ``active``
    (optional, ``[B, r]`` bool) marks which pairs really merge, so that rows may
    merge different numbers of tokens (ragged per-sample plans). ``order`` (optional,
    ``[B, N]`` long) is a sort key: survivors are laid out by increasing key (None:
    their original order).
    """

    src: torch.Tensor  # [B, r] long
    dst: torch.Tensor  # [B, r] long
    keep: torch.Tensor  # [B, N] bool
    active: torch.Tensor | None = None
    order: torch.Tensor | None = None


def max_tome_r(num_prunable: int) -> int:
    """Largest r bipartite matching can merge from ``num_prunable`` tokens."""
    return num_prunable // 2


def tome_plan(
    metric: torch.Tensor, r: int, num_protected: int = 0, valid: torch.Tensor | None = None,
    order: str = "keep",
) -> MergePlan:
    """Match the ``r`` most redundant candidates (set A) to their nearest anchors (set B).

    As in the reference, ``r`` is at most half the prunable tokens (``min(r, (t -
    protected) // 2)``); on a ragged batch (``valid``) each image's own half, so an image
    merges what it would alone (the plan's ``active`` marks the pairs when counts differ).

    ``order="keep"``: A and B alternate over the prunable tokens (A first) and the plan
    has no ``order``. ``order="reference"``: A = even, B = odd positions of the whole
    sequence, protected tokens excluded from both, and ``plan.order`` lays the survivors
    out as the reference does (protected prefix, unmerged A, then B; unmerged A by
    position when a prefix is protected, else by decreasing similarity, as the
    reference does with and without its class token)."""
    if order not in ORDERS:
        raise ValueError(f"ToMe order must be one of {ORDERS}, got {order!r}")
    if r < 0:
        raise ValueError(f"ToMe r={r} must be >= 0")
    b, n, _ = metric.shape
    p = num_protected
    rectangular = valid is None  # every token real: the limit and masks are known on the host
    valid = prunable_valid(valid, b, n, metric.device)
    per_image = None
    if rectangular or not b:
        r = min(r, max_tome_r(n - p)) if b else 0
    else:
        per_image = torch.clamp(max_tome_r(valid[:, p:].sum(dim=1)), max=r)
        counts = per_image.tolist()  # one read: the plan's width
        r = max(counts)
        if min(counts) == r:
            per_image = None
    if r == 0:  # nothing merges, nothing moves (the reference returns its input as is)
        empty = torch.zeros(b, 0, dtype=torch.long, device=metric.device)
        return MergePlan(empty, empty.clone(), valid.clone())
    start = p if order == "keep" else 0
    a_pos = torch.arange(start, n, 2, device=metric.device)
    b_pos = torch.arange(start + 1, n, 2, device=metric.device)
    m = F.normalize(metric.float(), dim=-1, eps=EPS)
    all_anchors = rectangular and start + 1 >= p  # no anchor (b_pos[0] = start + 1 on) is padding or protected
    all_candidates = rectangular and start >= p  # nor any candidate
    vb = None if all_anchors else valid[:, b_pos] & (b_pos >= p)
    va = None if all_candidates else valid[:, a_pos] & (a_pos >= p)
    node_max, node_idx = match_anchors(m[:, a_pos], m[:, b_pos], vb, va)
    edges = torch.argsort(node_max, dim=-1, descending=True, stable=True)
    src = a_pos[edges[:, :r]]
    dst = b_pos[torch.gather(node_idx, 1, edges[:, :r])]
    keep = valid.clone()
    active = None
    if per_image is not None:  # images whose half is below r merge fewer (real pairs only)
        ranked = torch.arange(r, device=metric.device).expand(b, r)
        active = (ranked < per_image[:, None]) & torch.isfinite(torch.gather(node_max, 1, edges[:, :r]))
        keep.scatter_(1, src, ~active & torch.gather(valid, 1, src))
    else:
        keep.scatter_(1, src, False)
    plan = MergePlan(src, dst, keep, active)
    if order == "reference":
        plan.order = _reference_order(edges, a_pos, b_pos, p, n)
    return plan


def _reference_order(edges: torch.Tensor, a_pos: torch.Tensor, b_pos: torch.Tensor, p: int, n: int) -> torch.Tensor:
    """Sort key ``[B, N]`` of the reference layout: protected tokens by position, then
    set A (by position when ``p > 0``, else in ``edges`` order: decreasing similarity),
    then set B by position."""
    key = torch.arange(n, device=edges.device).expand(edges.shape[0], n).clone()
    if p == 0:
        rank = torch.empty_like(edges)
        rank.scatter_(1, edges, torch.arange(edges.shape[1], device=edges.device).expand_as(edges).contiguous())
        key[:, a_pos] = rank
    key[:, b_pos] = torch.where(b_pos >= p, n + b_pos, b_pos)
    return key


def merge_weighted(
    x: torch.Tensor, sizes: torch.Tensor, plan: MergePlan, keep_norm: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of each source into its destination (full length kept).

    ``x [B, N, C]``, ``sizes [B, N, 1]``; returns updated ``(x, sizes)``; callers then
    gather the survivors with ``plan.keep`` (laid out by ``plan.order`` when given).
    ``keep_norm``: a merged token's norm is the size-weighted mean of its parts' norms
    (an average of vectors that point apart is shorter than they are; see
    :func:`with_mean_norm`); tokens that receive nothing are untouched.
    """
    c = x.shape[-1]
    acc = accumulator_dtype(x)
    weighted = (x * sizes).to(acc)
    src_w = torch.gather(weighted, 1, plan.src[..., None].expand(-1, -1, c))
    src_s = torch.gather(sizes.float(), 1, plan.src[..., None])
    if plan.active is not None:
        src_w = src_w * plan.active[..., None]
        src_s = src_s * plan.active[..., None]
    weighted = weighted.scatter_add(1, plan.dst[..., None].expand(-1, -1, c), src_w)
    new_sizes = sizes.float().scatter_add(1, plan.dst[..., None], src_s)
    out = weighted / new_sizes
    if keep_norm:
        norms = x.to(acc).norm(dim=-1, keepdim=True) * sizes.float()
        src_n = torch.gather(norms, 1, plan.src[..., None])
        if plan.active is not None:
            src_n = src_n * plan.active[..., None]
        norms = norms.scatter_add(1, plan.dst[..., None], src_n) / new_sizes
        received = new_sizes > sizes.float()  # every source adds a size >= 1
        out = torch.where(received, with_mean_norm(out, norms), out)
    return out.to(x.dtype), new_sizes.to(sizes.dtype)


def accumulator_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a merge sums ``x``'s rows in: float32 for half precision (its sums would
    round), ``x``'s own when wider (a float64 model stays float64)."""
    return x.dtype if x.dtype.is_floating_point and x.dtype.itemsize > 4 else torch.float32


def with_mean_norm(merged: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``merged`` rescaled to the given norm ``[..., 1]`` (a zero row stays zero): the
    norm-keeping merge of ToFu's MLERP (Kim et al., 2024), with the parts' size-weighted
    mean norm in place of their largest."""
    return merged * (norm / merged.norm(dim=-1, keepdim=True).clamp_min(EPS))

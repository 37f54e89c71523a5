"""SAINT-matched merging: SAINT's similarity graph decides how many tokens each image
loses, ToMe's bipartite matching decides which ones merge and where.

Per image, the candidates (even prunable positions) are matched to their most similar
anchor (odd positions), as in ToMe. The image merges ``round(fraction * n_b)`` of them,
most similar first, where ``n_b`` counts its candidates whose best-match cosine reaches
``tau`` (the graph's redundancy count with ``k=1``). A redundant image therefore merges
more than a detailed one, but softly: ``fraction`` spreads the layer's budget over the
images in proportion to their redundancy instead of dropping every flagged token.
"""

from __future__ import annotations

import torch

from .bipartite import anchor_similarity, best_anchors, split_candidates
from .gather import prunable_valid
from .tome import MergePlan


def best_matches(
    metric: torch.Tensor, num_protected: int = 0, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each candidate's best anchor: ``(similarity, anchor index, candidate valid)``, all
    ``[B, A]`` over the even prunable positions of ``metric [B, N, D]``; invalid
    candidates (padding, or no valid anchor) get similarity ``-inf``."""
    b, n, _ = metric.shape
    pv = prunable_valid(valid, b, n, metric.device)[:, num_protected:]
    a, anc, va, vb = split_candidates(metric[:, num_protected:], pv)
    best, idx = best_anchors(anchor_similarity(a, anc, None if valid is None else vb), va)
    return best, idx, va & torch.isfinite(best)


def match_counts(best: torch.Tensor, candidate_valid: torch.Tensor, tau: float, fraction: float) -> torch.Tensor:
    """Tokens each image merges: ``round(fraction * n_b)`` (half up), ``n_b`` its valid
    candidates whose best match reaches ``tau``; never more than its valid candidates."""
    redundant = ((best >= tau) & candidate_valid).sum(dim=1)
    r = torch.floor(fraction * redundant.double() + 0.5).long()
    return torch.minimum(r, candidate_valid.sum(dim=1))


def match_plan(
    metric: torch.Tensor,
    tau: float,
    fraction: float,
    num_protected: int = 0,
    valid: torch.Tensor | None = None,
) -> MergePlan:
    """The ragged merge plan of one step: image ``b`` merges its :func:`match_counts`
    most similar candidates into their best anchors (``active`` marks them)."""
    b, n, _ = metric.shape
    valid = prunable_valid(valid, b, n, metric.device)
    best, idx, cand_valid = best_matches(metric, num_protected, valid)
    counts = match_counts(best, cand_valid, tau, fraction)
    a = best.shape[1]
    order = torch.argsort(best, dim=-1, descending=True, stable=True)
    rank = torch.arange(a, device=metric.device).expand(b, a)
    active = rank < counts[:, None]
    src = num_protected + 2 * order
    dst = num_protected + 2 * torch.gather(idx, 1, order) + 1
    keep = valid.clone()
    keep.scatter_(1, src, ~active & torch.gather(valid, 1, src))
    return MergePlan(src, dst, keep, active)

"""SAINT-matched merging: SAINT's similarity graph decides how many tokens each image
loses, ToMe's bipartite matching decides which ones merge and where.

Per image, the candidates (even prunable positions) are matched to their most similar
anchor (odd positions), as in ToMe. The image merges ``round(fraction * n_b)`` of them,
most similar first, where ``n_b`` counts its candidates whose best-match cosine reaches
``tau`` (the graph's redundancy count with ``k=1``). A redundant image therefore merges
more than a detailed one, but softly: ``fraction`` spreads the layer's budget over the
images in proportion to their redundancy instead of dropping every flagged token.

With a ``guard`` the merge order also spares what the class token reads: a pair's score is
its cosine minus ``guard`` times the :func:`attention_excess` of both its tokens, so among
the flagged candidates the ones the class token attends to more than average merge last.
The counts stay the graph's, so the guard changes which tokens merge, never how many.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .bipartite import match_anchors, split_candidates
from .gather import prunable_valid
from .paths import accelerator_path
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
    best, idx = match_anchors(a, anc, None if valid is None else vb, None if valid is None else va)
    return best, idx, va & torch.isfinite(best)


def match_counts(best: torch.Tensor, candidate_valid: torch.Tensor, tau: float, fraction: float) -> torch.Tensor:
    """Tokens each image merges: ``round(fraction * n_b)`` (half up), ``n_b`` its valid
    candidates whose best match reaches ``tau``; never more than its valid candidates."""
    redundant = ((best >= tau) & candidate_valid).sum(dim=1)
    r = torch.floor(fraction * redundant.double() + 0.5).long()
    return torch.minimum(r, candidate_valid.sum(dim=1))


def attention_excess(cls_attention: torch.Tensor, valid: torch.Tensor | None, num_protected: int = 0
                     ) -> torch.Tensor:
    """How much more than an even share the class token reads each prunable token:
    ``max(0, log(n_b * attention))`` ``[B, P]``, ``n_b`` being image ``b``'s real prunable
    tokens (0 for a token at or below ``1 / n_b``, and for padding; ``valid`` None: every
    token is real, so nothing is masked)."""
    if valid is None:
        share = cls_attention[:, num_protected:].float() * (cls_attention.shape[1] - num_protected)
        return torch.log(share.clamp(min=1e-30)).clamp(min=0.0)
    pv = valid[:, num_protected:]
    share = cls_attention[:, num_protected:].float() * pv.sum(dim=1, keepdim=True)
    return torch.log(share.clamp(min=1e-30)).clamp(min=0.0).masked_fill(~pv, 0.0)


def match_plan(
    metric: torch.Tensor,
    tau: float,
    fraction: float,
    num_protected: int = 0,
    valid: torch.Tensor | None = None,
    cls_attention: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    guard: float = 0.0,
) -> MergePlan:
    """The ragged merge plan of one step: image ``b`` merges its :func:`match_counts`
    candidates into their best anchors (``active`` marks them), most similar first; with
    ``guard > 0`` and ``cls_attention [B, N]`` (the class token's attention, averaged over
    heads; or a function that computes it), by cosine minus ``guard`` times both tokens'
    :func:`attention_excess`. On a CPU a step where no image merges anything does not compute
    the attention: the order of what does not merge is never read (an accelerator would
    have to wait to know, so it computes it)."""
    b, n, _ = metric.shape
    if guard and cls_attention is None:
        raise ValueError("a merge guard ranks by the class token's attention; pass cls_attention")
    rectangular = valid is None  # every token real: the masks below are all True and left out
    best, idx, cand_valid = best_matches(metric, num_protected, valid)  # None: every anchor is real
    valid = prunable_valid(valid, b, n, metric.device)
    counts = _plan_counts(best, cand_valid, tau, fraction)
    a = best.shape[1]
    score = best
    if guard and (accelerator_path(metric.device) or bool(counts.any())):
        if callable(cls_attention):
            cls_attention = cls_attention()
        if cls_attention.shape != (b, n):
            raise ValueError(f"cls_attention must be [B, N] = {(b, n)}, got {tuple(cls_attention.shape)}")
        excess = attention_excess(cls_attention, None if rectangular else valid, num_protected)
        anchor_excess = torch.gather(excess[:, 1::2], 1, idx) if excess.shape[1] > 1 else torch.zeros_like(best)
        score = best - guard * (excess[:, 0::2] + anchor_excess)
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    rank = torch.arange(a, device=metric.device).expand(b, a)
    active = rank < counts[:, None]
    src = order * 2 + num_protected if num_protected else order * 2
    dst = torch.gather(idx, 1, order) * 2 + (num_protected + 1)
    keep = valid.clone()
    keep.scatter_(1, src, ~active if rectangular else ~active & torch.gather(valid, 1, src))
    return MergePlan(src, dst, keep, active)


def _plan_counts(best: torch.Tensor, candidate_valid: torch.Tensor, tau: float, fraction: float) -> torch.Tensor:
    """:func:`match_counts` of :func:`best_matches`' output in fewer ops (each costs a batch
    of one image or a launch-bound GPU more than its arithmetic): a best match at or above a
    finite ``tau`` is a valid candidate's (the others' are ``-inf``), and ``round(fraction *
    n) <= n`` for ``fraction <= 1``."""
    if not math.isfinite(tau) or fraction > 1:
        return match_counts(best, candidate_valid, tau, fraction)
    return torch.floor(fraction * (best >= tau).sum(dim=1).double() + 0.5).long()


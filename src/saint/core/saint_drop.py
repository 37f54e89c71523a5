"""SAINT graph-based drop with a dynamic rate (SAINT paper, arXiv:2503.11549, "SAINT drop").

Candidates are the even prunable positions, anchors the odd ones; a candidate is
linked to every anchor whose cosine similarity reaches ``tau``; a candidate with at
least ``k`` links is redundant. The batch drops ``floor(mean n_b)`` (``rate="batch"``,
the paper) or each sample its own ``n_b`` (``rate="sample"``); the dropped ones are
the highest scorers ``d * exp(gamma * (mean linked sim - tau))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bipartite import (
    count_at_least,
    nearest_anchor,
    reduce_similarity,
    split_candidates,
    sum_at_least_,
)
from .gather import drop_top_ranked, prunable_valid, without_autocast
from .tome import MergePlan

RATES = ("batch", "sample")


@dataclass
class SaintGraph:
    """Per-candidate quantities of one SAINT step (all ``[B, num_candidates]``)."""

    degree: torch.Tensor  # long: valid anchors with cosine >= tau (0 for invalid candidates)
    score: torch.Tensor | None  # the paper's score (None when not asked for)
    rank_key: torch.Tensor  # monotone in score, overflow-free (log space); -2 for every unlinked one without scores
    candidate_valid: torch.Tensor  # bool
    anchor_valid: torch.Tensor  # bool [B, B']
    best_anchor: torch.Tensor | None = None  # long: most similar valid anchor (when asked for)


def saint_graph(
    metric: torch.Tensor,
    tau: float,
    gamma: float,
    valid: torch.Tensor | None = None,
    nearest: bool = False,
    scores: bool = True,
) -> SaintGraph:
    """Build the candidate/anchor graph on ``metric [B, P, D]`` (prunable tokens only);
    with ``nearest`` also each candidate's most similar anchor (what SAINT+ folds into).
    ``scores=False`` leaves out the paper's score and the order among unlinked candidates
    (their mean cosine to all anchors), which only matter when a step may drop more
    candidates than an image has linked (the batch vote, ``k < 1``): ops saved per block.

    The ``[B, A, A']`` similarity is made once (a chunk of images at a time on a CPU),
    masked in place and read two or three times (nearest anchor, degree, linked sum); the
    mean over all anchors comes from the anchors' sum instead.
    """
    b, p, _ = metric.shape
    a, anc, va, vb = split_candidates(metric, prunable_valid(valid, b, p, metric.device))

    def passes(sim: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nearest_ones = (nearest_anchor(sim),) if nearest else ()
        degree = count_at_least(sim, tau)
        return (degree, sum_at_least_(sim, tau), *nearest_ones)  # sum_at_least_ spends sim: read it last

    degree, linked_sum, *nearest_ones = reduce_similarity(a, anc, None if valid is None else vb, passes)
    best_anchor = nearest_ones[0] if nearest_ones else None
    degree = degree * va
    has_edge = degree > 0
    deg_f = degree.to(torch.float32)
    linked_mean = linked_sum / deg_f.clamp(min=1)
    linked_key = deg_f.clamp(min=1).log() + gamma * (linked_mean - tau)
    if not scores:  # linked candidates' keys are >= 0, so every unlinked one ranks below them all
        return SaintGraph(degree, None, torch.where(has_edge, linked_key, -2.0), va, vb, best_anchor)
    n_anchor = vb.sum(-1, keepdim=True).clamp(min=1)
    anchor_sum = (anc * vb[..., None]).sum(dim=1)
    with without_autocast(a.device):
        all_mean = (a @ anchor_sum[..., None]).squeeze(-1) / n_anchor
    score = torch.where(has_edge, deg_f * torch.exp(gamma * (linked_mean - tau)), all_mean)
    # log(d) + gamma*(mean - tau) >= 0 for linked candidates; unlinked ones sit in [-3, -1].
    rank_key = torch.where(has_edge, linked_key, all_mean - 2.0)
    return SaintGraph(degree, score, rank_key, va, vb, best_anchor)


def redundant_counts(graph: SaintGraph, k: int) -> torch.Tensor:
    """``n_b``: number of valid candidates with degree >= k, per sample."""
    return ((graph.degree >= k) & graph.candidate_valid).sum(dim=1)


def drop_counts(n: torch.Tensor, rate: str) -> torch.Tensor:
    """Tokens to drop per sample: the batch vote ``floor(mean n_b)`` or ``n_b`` itself."""
    if rate == "sample":
        return n
    if rate == "batch":
        r = torch.div(n.sum(), n.numel(), rounding_mode="floor")
        return r.expand_as(n).clone()
    raise ValueError(f"rate must be one of {RATES}, got {rate!r}")


def saint_fold_plan(graph: SaintGraph, keep: torch.Tensor, num_protected: int = 0) -> MergePlan:
    """Fold every candidate that ``keep`` drops into its most similar anchor, reusing the
    step's own similarity graph.

    Anchors always survive a SAINT step, so each dropped candidate has a surviving
    destination; rows may fold different numbers of tokens (``active`` marks them).
    """
    if graph.best_anchor is None:
        raise ValueError("saint_fold_plan needs the graph's nearest anchors: build it with saint_graph(..., nearest=True)")
    b, a = graph.best_anchor.shape
    src = torch.arange(num_protected, num_protected + 2 * a, 2, device=graph.best_anchor.device).expand(b, a)
    dst = graph.best_anchor * 2 + (num_protected + 1)
    active = graph.candidate_valid & ~keep[:, num_protected::2][:, :a]
    return MergePlan(src, dst, keep, active)


def saint_select(
    metric: torch.Tensor,
    tau: float,
    k: int,
    gamma: float,
    rate: str = "sample",
    num_protected: int = 0,
    valid: torch.Tensor | None = None,
    nearest: bool = True,
) -> tuple[torch.Tensor, SaintGraph]:
    """Bool keep mask ``[B, N]`` over all tokens of ``metric [B, N, D]``, and the graph
    it was decided on (with ``nearest``, ready for :func:`saint_fold_plan`).

    The first ``num_protected`` tokens always survive; padded tokens (``valid`` False)
    never do; anchors always survive this step.
    """
    b, n, _ = metric.shape
    prunable = None if valid is None else valid[:, num_protected:]
    # per sample with k >= 1 a step drops at most the image's linked candidates, whose keys (gamma >= 0)
    # rank above every unlinked one: no scores needed
    graph = saint_graph(metric[:, num_protected:], tau, gamma, prunable, nearest,
                        scores=rate != "sample" or k < 1 or gamma < 0)
    counts = drop_counts(redundant_counts(graph, k), rate)
    dropped_a = drop_top_ranked(graph.rank_key, graph.candidate_valid, counts)
    keep = prunable_valid(valid, b, n, metric.device).clone()
    keep[:, num_protected::2] &= ~dropped_a
    return keep, graph


def saint_keep_mask(
    metric: torch.Tensor,
    tau: float,
    k: int,
    gamma: float,
    rate: str = "sample",
    num_protected: int = 0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool keep mask ``[B, N]`` of one SAINT step (see :func:`saint_select`)."""
    return saint_select(metric, tau, k, gamma, rate, num_protected, valid, nearest=False)[0]

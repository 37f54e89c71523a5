"""The candidate/anchor split shared by SAINT, SAINT-matched merging and ToMe, and the
``[B, A, A']`` cosine-similarity passes over it.

The similarity matrix is the only quadratic tensor a selection step makes, so these
helpers touch it as few times as they can and never allocate a second one: on a CPU a
fresh tensor of that size costs more in page faults than the arithmetic done on it
(batch 32 at 518px: ~30 ms to allocate, ~5 ms for an in-place pass). Every caller only
reduces it row by row, so on a CPU :func:`reduce_similarity` makes it a few images at a
time, small enough to stay in cache and to be reused by the allocator (the product and
its row maxima: 1.75 s -> 0.66 s of op time at 518px, batch 32, 12 blocks); on a GPU it is
made at once.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .gather import EPS, without_autocast
from .paths import accelerator_path


def split_candidates(
    metric: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-norm candidates (even positions) and anchors (odd positions) of ``metric [B,
    P, D]``, with their validity: ``(a [B, A, D], anc [B, A', D], va [B, A], vb [B, A'])``."""
    m = F.normalize(metric.float(), dim=-1, eps=EPS)
    return m[:, 0::2], m[:, 1::2], valid[:, 0::2], valid[:, 1::2]


def anchor_similarity(a: torch.Tensor, anc: torch.Tensor, anchor_valid: torch.Tensor | None) -> torch.Tensor:
    """``a @ anc^T`` ``[B, A, A']`` with ``-inf`` in the columns of invalid anchors
    (masked in place, written over whatever a padded view holds there, NaN included: an
    added ``-inf`` leaves NaN, and a NaN column would be a real candidate's best match;
    rows of invalid candidates are left to the caller, who masks the ``[B, A]`` results
    instead of the matrix)."""
    with without_autocast(a.device):
        sim = a @ anc.transpose(1, 2)
    if anchor_valid is not None:
        sim.masked_fill_(~anchor_valid[:, None, :], float("-inf"))
    return sim


CPU_CHUNK_BYTES = 2 << 20  # one 518px image's [685, 684] float32 similarity is 1.9 MB


def reduce_similarity(
    a: torch.Tensor,
    anc: torch.Tensor,
    anchor_valid: torch.Tensor | None,
    reduce: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
) -> tuple[torch.Tensor, ...]:
    """``reduce`` applied to :func:`anchor_similarity` ``[B, A, A']``, each of its outputs
    ``[B, ...]``. On a CPU (:func:`~saint.core.paths.accelerator_path` False) the matrix is made and reduced a chunk of images at a time
    (at most :data:`CPU_CHUNK_BYTES` each, but at least one image), without the anchor
    mask when every anchor is valid; the outputs are the same as from the whole matrix, since
    every image's rows are its own."""
    b = a.shape[0]
    if accelerator_path(a.device):
        return reduce(anchor_similarity(a, anc, anchor_valid))
    if anchor_valid is not None and bool(anchor_valid.all()):  # a free check on a CPU, a sync on a GPU
        anchor_valid = None
    step = max(1, CPU_CHUNK_BYTES // max(1, a.shape[1] * anc.shape[1] * a.element_size()))
    if step >= b:
        return reduce(anchor_similarity(a, anc, anchor_valid))
    outputs: list[torch.Tensor] = []
    for i in range(0, b, step):
        chunk_valid = None if anchor_valid is None else anchor_valid[i : i + step]
        parts = reduce(anchor_similarity(a[i : i + step], anc[i : i + step], chunk_valid))
        if not outputs:  # written in place: a cat of the chunks would be one more copy
            outputs = [part.new_empty((b, *part.shape[1:])) for part in parts]
        for out, part in zip(outputs, parts, strict=True):
            out[i : i + step].copy_(part)
    return tuple(outputs)


def nearest_anchor(sim: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar anchor, long ``[B, A]`` (0 when there is none)."""
    if sim.shape[-1] == 0:
        return torch.zeros(sim.shape[:2], dtype=torch.long, device=sim.device)
    return sim.argmax(dim=-1)


def best_anchors(sim: torch.Tensor, candidate_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's best anchor, ``(cosine, index)`` ``[B, A]``: ``(-inf, 0)`` for
    invalid candidates and when there is no valid anchor (ToMe's and ``saint_match``'s edges)."""
    return _only_valid(*_row_max(sim), candidate_valid)


def match_anchors(
    a: torch.Tensor, anc: torch.Tensor, anchor_valid: torch.Tensor | None, candidate_valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`best_anchors` of :func:`anchor_similarity`, made a chunk at a time
    (:func:`reduce_similarity`); ``candidate_valid`` None: every candidate is valid."""
    best, idx = reduce_similarity(a, anc, anchor_valid, _row_max)
    return (best, idx) if candidate_valid is None else _only_valid(best, idx, candidate_valid)


def _row_max(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if sim.shape[-1] == 0:
        return sim.new_full(sim.shape[:2], float("-inf")), nearest_anchor(sim)
    best, idx = sim.max(dim=-1)
    return best, idx


def _only_valid(best: torch.Tensor, idx: torch.Tensor, candidate_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return best.masked_fill(~candidate_valid, float("-inf")), idx.masked_fill(~candidate_valid, 0)


def count_at_least(sim: torch.Tensor, tau: float) -> torch.Tensor:
    """Entries ``>= tau`` per row of ``sim [B, A, A']``, as long ``[B, A]`` (accumulated
    in int16 when a row is short enough: the default int64 sum of a bool tensor is
    several times slower on CPU)."""
    acc = torch.int16 if sim.shape[-1] < 2**15 else torch.int32
    return (sim >= tau).sum(dim=-1, dtype=acc).long()


def sum_at_least_(sim: torch.Tensor, tau: float) -> torch.Tensor:
    """Sum per row of the entries ``>= tau`` of ``sim [B, A, A']`` (float32); zeroes the
    other entries of ``sim`` in place. ``threshold_`` keeps ``x > t``; ``t`` is the
    float32 just below ``tau``, so it keeps exactly the entries ``sim >= tau`` selects."""
    if sim.dtype != torch.float32:
        raise TypeError(f"sum_at_least_ works on float32 similarities, got {sim.dtype}")
    return F.threshold_(sim, float32_below(tau), 0.0).sum(dim=-1)


def float32_below(x: float) -> float:
    """The largest float32 below ``x`` rounded to float32 (``torch.nextafter`` on the host,
    without making a tensor)."""
    (f,) = struct.unpack("<f", struct.pack("<f", x))
    if math.isnan(f) or f == float("-inf"):
        return f
    if f == 0.0:
        return -struct.unpack("<f", struct.pack("<I", 1))[0]  # the smallest negative subnormal
    (bits,) = struct.unpack("<I", struct.pack("<f", f))
    return struct.unpack("<f", struct.pack("<I", bits - 1 if f > 0 else bits + 1))[0]

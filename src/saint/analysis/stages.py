"""A reproducible rule for the three stages of token evolution.

The SAINT paper names three stages across depth ("aligner", "explorer",
"aggregator") but we do not have its definition, so this project uses its own,
fixed before looking at any photo set:

1. Take the mean curves across depth of the statistics in :data:`STAGE_STATS`
   (key cosine, hidden-state cosine, effective rank, class-token attention entropy;
   SAINT's redundant fraction is left out because it is a thresholded function of
   the key cosine and depends on ``tau``). Drop curves that are constant or contain
   NaN; z-score each remaining curve over depth (so units and direction do not
   matter).
2. Fit all curves jointly with a *continuous* piecewise-linear function of the block
   index with two kinks, each curve with its own coefficients, the kinks shared;
   kinks sit between blocks (at ``b - 0.5``), so boundary ``b`` means "stage starts at
   block ``b``". Every stage has at least ``min_blocks`` blocks (default 2).
3. The boundaries are the pair ``(b1, b2)`` with the least total squared residual
   (exhaustive search; ties go to the earliest pair). Stages: aligner
   ``[0, b1)``, explorer ``[b1, b2)``, aggregator ``[b2, L)``.

A fit always returns three stages, so :class:`StageFit` also reports how much
variance a straight line, one kink and two kinks explain (``r2``): if the second
kink adds little, the curves do not really show three stages.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

STAGE_NAMES: tuple[str, str, str] = ("aligner", "explorer", "aggregator")
STAGE_STATS: tuple[str, ...] = ("key_cosine", "hidden_cosine", "effective_rank", "cls_entropy")


@dataclass
class StageFit:
    """Result of :func:`find_stages`.

    ``boundaries (b1, b2)``: first block of the explorer and of the aggregator stage.
    ``r2[n]``: fraction of the z-scored curves' variance explained by the best
    continuous piecewise-linear fit with ``n`` kinks (0 = one straight line).
    ``kinks[n]``: where those best fits put their kinks. ``used``: curves fitted.
    """

    boundaries: tuple[int, int]
    num_blocks: int
    r2: dict[int, float]
    kinks: dict[int, tuple[int, ...]]
    used: list[str]

    @property
    def stages(self) -> dict[str, tuple[int, int]]:
        """Stage name -> (first block, last block), inclusive."""
        b1, b2 = self.boundaries
        return {
            STAGE_NAMES[0]: (0, b1 - 1),
            STAGE_NAMES[1]: (b1, b2 - 1),
            STAGE_NAMES[2]: (b2, self.num_blocks - 1),
        }

    def stage_of(self, block: int) -> str:
        """The stage a block index belongs to."""
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block} out of range 0..{self.num_blocks - 1}")
        b1, b2 = self.boundaries
        return STAGE_NAMES[0] if block < b1 else STAGE_NAMES[1] if block < b2 else STAGE_NAMES[2]


def hinge_design(num_blocks: int, boundaries: Sequence[int]) -> np.ndarray:
    """Design matrix ``[L, 2 + len(boundaries)]`` of a continuous piecewise-linear fit:
    intercept, slope, and one hinge ``max(0, x - (b - 0.5))`` per boundary."""
    x = np.arange(num_blocks, dtype=np.float64)
    cols = [np.ones_like(x), x] + [np.maximum(0.0, x - (b - 0.5)) for b in boundaries]
    return np.stack(cols, axis=1)


def fit_residual(curves: np.ndarray, boundaries: Sequence[int]) -> float:
    """Total squared residual of the least-squares hinge fit of every column of
    ``curves [L, S]`` with kinks before ``boundaries``."""
    design = hinge_design(curves.shape[0], boundaries)
    coef, *_ = np.linalg.lstsq(design, curves, rcond=None)
    resid = curves - design @ coef
    return float((resid**2).sum())


def candidate_boundaries(num_blocks: int, n: int, min_blocks: int) -> list[tuple[int, ...]]:
    """All increasing tuples of ``n`` boundaries leaving every segment ``min_blocks`` long."""
    out = []
    for combo in itertools.combinations(range(1, num_blocks), n):
        edges = (0, *combo, num_blocks)
        if all(b - a >= min_blocks for a, b in itertools.pairwise(edges)):
            out.append(combo)
    return out


def _standardise(curves: Mapping[str, Sequence[float]], names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    cols, used, length = [], [], None
    for name in names:
        if name not in curves:
            continue
        y = np.asarray(curves[name], dtype=np.float64)
        if y.ndim != 1:
            raise ValueError(f"curve {name!r} must be 1-D, got shape {y.shape}")
        if length is None:
            length = y.shape[0]
        elif y.shape[0] != length:
            raise ValueError(f"curve {name!r} has {y.shape[0]} blocks, others have {length}")
        if not np.all(np.isfinite(y)):
            continue
        sd = y.std()
        if sd <= 1e-12 * max(1.0, float(np.abs(y).max())):
            continue
        cols.append((y - y.mean()) / sd)
        used.append(name)
    if not cols:
        raise ValueError(
            f"no usable curve among {list(names)}: each is missing, constant across depth or has NaN"
        )
    return np.stack(cols, axis=1), used


def find_stages(
    curves: Mapping[str, Sequence[float]],
    names: Sequence[str] = STAGE_STATS,
    min_blocks: int = 2,
) -> StageFit:
    """Apply the stage rule (module docstring) to mean curves across depth.

    ``curves``: statistic name -> value per block (extra names are ignored).
    Raises ``ValueError`` when the network is too shallow for three stages of
    ``min_blocks`` blocks or when no curve varies.
    """
    if min_blocks < 1:
        raise ValueError(f"min_blocks={min_blocks} must be >= 1")
    y, used = _standardise(curves, names)
    num_blocks = y.shape[0]
    if num_blocks < 3 * min_blocks:
        raise ValueError(
            f"{num_blocks} blocks cannot hold three stages of at least {min_blocks} blocks each"
        )
    total = float((y**2).sum())  # z-scored: mean 0 per curve
    r2: dict[int, float] = {}
    kinks: dict[int, tuple[int, ...]] = {}
    for n in (0, 1, 2):
        best, best_sse = (), math.inf
        for combo in candidate_boundaries(num_blocks, n, min_blocks):
            sse = fit_residual(y, combo)
            if sse < best_sse - 1e-12 * total:
                best, best_sse = combo, sse
        kinks[n] = best
        r2[n] = 1.0 - best_sse / total
    b1, b2 = kinks[2]
    return StageFit((b1, b2), num_blocks, r2, kinks, used)

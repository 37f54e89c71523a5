"""Timing that measures only the model: inputs already on the device in the right dtype,
warm-up, repeats interleaved round-robin across variants (so drifting clocks, thermal
state and noisy neighbours hit every variant alike), a device sync around each call,
and min/median reported."""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
                       "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_CONF")
"""Environment variables that change the C allocator (glibc malloc, an ``LD_PRELOAD``-ed
tcmalloc/jemalloc): CPU timings depend on them (docs/results.md, timing noise)."""


def allocator_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allocator variables set in ``environ`` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in ALLOCATOR_VARIABLES if environ.get(k)}


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (CUDA/XPU/MPS); a no-op on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


@dataclass
class Timing:
    """Seconds per call of one variant, over the timed repeats."""

    times: list[float]
    batch_size: int

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def images_per_s(self) -> float:
        """Throughput from the median time (robust to the odd slow repeat)."""
        return self.batch_size / self.median

    @property
    def images_per_s_best(self) -> float:
        """Throughput from the fastest repeat."""
        return self.batch_size / self.min

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "ms_min": 1e3 * self.min,
            "ms_median": 1e3 * self.median,
            "images_per_s": self.images_per_s,
            "images_per_s_best": self.images_per_s_best,
            "repeats": len(self.times),
            "times_ms": [1e3 * t for t in self.times],
        }


def paired_speedup(base: Sequence[float], variant: Sequence[float]) -> float:
    """Median over rounds of ``base[i] / variant[i]``: the two ran back to back in round
    ``i``, so a slow spell of the machine moves both and cancels in the ratio, and the
    median ignores the odd disturbed round (a ratio of minima does neither)."""
    if len(base) != len(variant) or not base:
        raise ValueError(f"paired_speedup needs the same number (>= 1) of rounds, got {len(base)} and {len(variant)}")
    if min(variant) <= 0:
        raise ValueError("paired_speedup: a variant's time must be positive")
    return statistics.median(b / v for b, v in zip(base, variant, strict=True))


def median_interval(values: Sequence[float], level: float = 0.95, draws: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap interval of the median of ``values`` (e.g. per-round paired
    ratios): resample them ``draws`` times, take each resample's median, return the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles. Seeded: the same values give
    the same interval."""
    if not values:
        raise ValueError("median_interval needs at least one value")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must be in (0, 1)")
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1")
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    tail = (1.0 - level) / 2.0
    low = medians[math.floor(tail * (draws - 1))]
    high = medians[math.ceil((1.0 - tail) * (draws - 1))]
    return low, high


def timed_calls(fn: Callable[[], object], repeats: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (one variant
    alone; :func:`time_round_robin` interleaves several)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return times


def time_round_robin(
    setups: Sequence[Callable[[], Callable[[], object]]],
    *,
    batch_size: int,
    device: torch.device | str,
    warmup: int = 2,
    repeats: int = 10,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Timing]:
    """Time several variants, interleaved.

    ``setups[i]()`` prepares variant ``i`` (e.g. patches the model; not timed) and returns
    the callable to time (the model call only). Each round runs every variant once; the
    starting variant rotates per round so no variant always runs right after another.
    ``warmup`` untimed rounds come first. ``progress(n)`` is called after each round.
    ``clock`` is wall time by default; ``time.process_time`` (this process's CPU time, with
    one thread) measures work on a machine shared with other jobs.
    """
    calls: list[Callable[[], object]] = [lambda: None] * len(setups)

    def prepare(i: int) -> None:
        calls[i] = setups[i]()

    times = time_stages_round_robin(
        [lambda i=i: prepare(i) for i in range(len(setups))],
        [[lambda _, i=i: calls[i]()] for i in range(len(setups))],
        device=device, warmup=warmup, repeats=repeats, progress=progress, clock=clock,
    )
    return [Timing(t[0], batch_size) for t in times]


PAIRINGS = ("round_robin", "paired")
"""How several variants share their timed rounds: ``round_robin``, all of them in one
rotation (one baseline time per round for every variant); ``paired``, each variant in a
rotation of its own with the baseline (the first variant), as a calibration times it,
so a variant's speed-up does not depend on which other variants were timed with it."""


def timed_rounds(pairing: str, variants: int, warmup: int, repeats: int) -> int:
    """How many rounds timing ``variants`` (the baseline included) runs: one rotation for
    all of them, or one per variant after the baseline when paired (for progress bars)."""
    return (warmup + repeats) * (max(variants - 1, 1) if pairing == "paired" else 1)


def time_paired(setups: Sequence[Callable[[], Callable[[], object]]], *, batch_size: int,
                **timing: Any) -> tuple[list[Timing], list[Timing]]:
    """:func:`time_round_robin` (``timing``: its other keyword arguments) of the baseline
    ``setups[0]`` with each other variant in turn. Returns ``(timings, baselines)``:
    ``timings[i]`` is variant ``i``'s (``timings[0]``, the baseline's, pools its rounds of
    every pair) and ``baselines[i]`` the baseline's in the same rounds as variant ``i``
    (for :func:`paired_speedup`)."""
    if len(setups) < 2:
        raise ValueError("paired timing needs the baseline and at least one variant")
    timings: list[Timing] = [Timing([], batch_size)]
    baselines: list[Timing] = [Timing([], batch_size)]
    for setup in setups[1:]:
        base, variant = time_round_robin([setups[0], setup], batch_size=batch_size, **timing)
        timings[0].times.extend(base.times)
        timings.append(variant)
        baselines.append(base)
    baselines[0] = timings[0]
    return timings, baselines


def time_stages_round_robin(
    setups: Sequence[Callable[[], object]],
    stages: Sequence[Sequence[Callable[[Any], Any]]],
    *,
    device: torch.device | str,
    warmup: int = 2,
    repeats: int = 10,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[list[float]]]:
    """The one round-robin timer: per round every variant runs once (the start rotates);
    a run is ``setups[i]()`` (not timed), then its stages in order, each timed alone and
    fed the previous stage's result (e.g. a prefill, then decoding on its cache).
    Returns ``times[variant][stage]`` in seconds over the ``repeats`` timed rounds."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not setups:
        raise ValueError("nothing to time: no variants given")
    n = len(setups)
    times: list[list[list[float]]] = [[[] for _ in stages[i]] for i in range(n)]
    for rnd in range(warmup + repeats):
        for j in range(n):
            i = (rnd + j) % n
            setups[i]()
            value: Any = None
            for k, stage in enumerate(stages[i]):
                synchronize(device)
                t0 = clock()
                value = stage(value)
                synchronize(device)
                if rnd >= warmup:
                    times[i][k].append(clock() - t0)
            del value
        if progress is not None:
            progress(1)
    return times

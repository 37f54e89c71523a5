"""Timing that measures only the model: inputs already on the device in the right dtype,
warm-up, repeats interleaved round-robin across variants (so drifting clocks, thermal
state and noisy neighbours hit every variant alike), a device sync around each call,
and min/median reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


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


def time_round_robin(
    setups: Sequence[Callable[[], Callable[[], object]]],
    *,
    batch_size: int,
    device: torch.device | str,
    warmup: int = 2,
    repeats: int = 10,
    progress: Callable[[int], None] | None = None,
) -> list[Timing]:
    """Time several variants, interleaved.

    ``setups[i]()`` prepares variant ``i`` (e.g. patches the model; not timed) and returns
    the callable to time (the model call only). Each round runs every variant once; the
    starting variant rotates per round so no variant always runs right after another.
    ``warmup`` untimed rounds come first. ``progress(n)`` is called after each round.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not setups:
        raise ValueError("nothing to time: no variants given")
    n = len(setups)
    times: list[list[float]] = [[] for _ in range(n)]
    for rnd in range(warmup + repeats):
        for j in range(n):
            i = (rnd + j) % n
            fn = setups[i]()
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            dt = time.perf_counter() - t0
            if rnd >= warmup:
                times[i].append(dt)
        if progress is not None:
            progress(1)
    return [Timing(t, batch_size) for t in times]

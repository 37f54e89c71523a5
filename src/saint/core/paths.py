"""Which of two equivalent implementations a device runs.

A CPU runs the selections' cache-friendly forms: images a few at a time, per-image
loops, values read back where that saves work. An accelerator runs them as a fixed
number of batched ops per block, whatever the batch size, and reads nothing back that
it can work out on the device: a small model's forward pass there is bound by the host
(about ten microseconds per op, docs/packed.md), and each read-back makes the host wait.
Both give the same answer (to rounding); tests and ``benchmarks/op_census.py`` run the
accelerator forms on a CPU with :func:`accelerator_paths_everywhere`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_EVERYWHERE = threading.local()


def accelerator_path(device: torch.device) -> bool:
    """Whether work on ``device`` takes the accelerators' implementation: any device but
    a CPU, and a CPU too inside :func:`accelerator_paths_everywhere`."""
    return device.type != "cpu" or getattr(_EVERYWHERE, "on", False)


@contextlib.contextmanager
def accelerator_paths_everywhere() -> Iterator[None]:
    """Take the accelerators' implementations on a CPU too, in this thread (to count or
    test them there)."""
    before = getattr(_EVERYWHERE, "on", False)
    _EVERYWHERE.on = True
    try:
        yield
    finally:
        _EVERYWHERE.on = before

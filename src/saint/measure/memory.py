"""Peak memory of one call, above what was allocated before it.

CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak (tensor memory only,
exact). CPU on Linux: the process's peak resident set size (``VmHWM``) after resetting it
through ``/proc/self/clear_refs``, minus the resident size before the call; this counts
the allocator's and the OS's behaviour too, so treat it as an approximate figure: in a
long-lived process the allocator may reuse memory that is already resident and the
figure then reads low, and when the call needed no new resident memory at all the
result is ``None``, not 0. Elsewhere the result is ``None`` (reported as n/a), never a
guess.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .timing import synchronize

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_memory_method(device: torch.device | str) -> str | None:
    """How :func:`peak_memory_mb` measures on ``device``, or None when it cannot."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "cuda max_memory_allocated above the pre-call allocation"
    if dev.type == "cpu" and _status_kib("VmHWM") is not None and _CLEAR_REFS.exists():
        return "process peak RSS (VmHWM, reset via /proc/self/clear_refs) above the pre-call RSS; approximate"
    return None


def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str) -> float | None:
    """Run ``fn()`` once; return the memory it needed at its peak, in MiB, or None."""
    dev = torch.device(device)
    if dev.type == "cuda":
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    if dev.type == "cpu" and peak_memory_method(dev) is not None:
        before = _status_kib("VmRSS")
        if before is None or not _reset_rss_peak():
            fn()
            return None
        fn()
        peak = _status_kib("VmHWM")
        if peak is None or peak <= before:  # served from memory already resident: not measurable
            return None
        return (peak - before) / 1024
    fn()
    return None

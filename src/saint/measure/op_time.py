"""Where a forward pass's time goes on a CPU: every dispatched op timed by the wall clock,
with its FLOPs (the formulas of :mod:`saint.measure.flops`), in one of five categories by
what it is and which part of saint called it.

- ``products``: the model's own matmuls and convolutions (saint's partial q/k/v
  projections included: they are the model's work on fewer rows);
- ``attention``: the attention kernels, and the copies and views around saint's packed
  attention;
- ``selection``: whatever runs to decide what goes (the method's ``select``, the head-mean
  keys and the class token's attention it reads);
- ``packing and merging``: applying the decision (the token state's gathers, merges and
  stream bookkeeping);
- ``other model ops``: the model's norms, activations, residual adds and the rest.

So a pruned model's products and attention can be set against the unpruned model's (at
their FLOPs ratio), and what pruning adds is seen apart. On a CPU an op's wall time is its
cost (ops run synchronously); an accelerator queues them, so this refuses one.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .flops import has_flop_formula, op_flops

CATEGORIES = ("products", "attention", "selection", "packing and merging", "other model ops")

_PACKAGE = str(Path(__file__).resolve().parents[1])  # .../saint
_SELECTION_FUNCTIONS = frozenset({"_context", "_captured_context"})
_ATTENTION_FUNCTIONS = frozenset({"attention_of", "packed_attention_of", "packed_attention"})
_PACKING_FILES = frozenset({"packing.py", "gather.py"})
_PACKING_QUALNAMES = ("TokenState.", "Runs.", "TokenStateHandle.enter_site", "TokenStateHandle.leave_site")


def _is_packing(file: str, qualname: str) -> bool:
    """saint's token-state bookkeeping: its stream helpers, the token state and the
    handle's block entry and exit (Python 3.10 has no qualified names: there every
    function of the token state's module but a wrapper's ``__call__`` counts)."""
    if file in _PACKING_FILES or qualname.startswith(_PACKING_QUALNAMES):
        return True
    if "." in qualname:
        return False
    return qualname in ("enter_site", "leave_site") or (file == "common.py" and qualname != "__call__")


def caller_category(frames: list[tuple[str, str]]) -> str | None:
    """The category that saint's calling code gives an op, from the saint frames on the
    stack ``[(file name, qualified function name)]``, outermost first: the first marked
    frame decides (the method's selection, saint's attention, the token state's packing),
    None when no frame is marked (the model's own work, also when saint's measuring or
    adapter code called the model)."""
    for file, qualname in frames:
        name = qualname.rpartition(".")[2]
        if name in _ATTENTION_FUNCTIONS:
            return "attention"
        if file == "methods.py" or name in _SELECTION_FUNCTIONS:
            return "selection"
        if _is_packing(file, qualname):
            return "packing and merging"
    return None


def op_category(op: str, flops: int, frames: list[tuple[str, str]]) -> str:
    """The category of one dispatched op (``op`` its aten name, ``flops`` what it computes,
    ``frames`` as in :func:`caller_category`): an attention kernel is ``attention``
    wherever it runs; otherwise the calling code decides, and the model's own ops are
    ``products`` when they compute FLOPs, else ``other model ops``."""
    if "scaled_dot_product" in op:
        return "attention"
    marked = caller_category(frames)
    if marked is not None:
        return marked
    return "products" if flops else "other model ops"


def _saint_frames(frame: FrameType | None) -> list[tuple[str, str]]:
    """The frames of saint's own code on the stack above ``frame``, outermost first, as
    ``(file name, qualified function name)``."""
    out = []
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(_PACKAGE):
            out.append((Path(code.co_filename).name, getattr(code, "co_qualname", code.co_name)))
        frame = frame.f_back
    return out[::-1]


@dataclass
class OpTimes:
    """Per category: wall seconds, ops dispatched and FLOPs of one call; ``by_op`` the
    same per ``(category, aten op)``."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    flops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    by_op: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


class _Timing(TorchDispatchMode):
    def __init__(self, times: OpTimes) -> None:
        super().__init__()
        self.times = times

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        for a in args:
            if isinstance(a, torch.Tensor) and a.device.type != "cpu":
                raise ValueError(f"op timing runs on a CPU only (an op's wall time is its cost there); got {a.device}")
        if not has_flop_formula(func) and func is not torch.ops.prim.device.default:
            # a composite op (e.g. linear in inference mode) is timed as the ops it runs, as
            # torch's FLOP counter counts it: those have formulas
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        start = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - start
        name = func.overloadpacket.__name__
        flops = op_flops(func, args, kwargs, out)
        category = op_category(name, flops, _saint_frames(sys._getframe(1)))
        t = self.times
        t.seconds[category] += seconds
        t.calls[category] += 1
        t.flops[category] += flops
        t.by_op[(category, name)] += seconds
        return out


@contextlib.contextmanager
def timing_ops() -> Iterator[OpTimes]:
    """Time and categorise every op dispatched inside the block (on a CPU)."""
    times = OpTimes()
    with _Timing(times):
        yield times


def op_times(fn: Callable[[], Any]) -> OpTimes:
    """Run ``fn()`` once (no grad) and time its ops by category."""
    with torch.no_grad(), timing_ops() as times:
        fn()
    return times

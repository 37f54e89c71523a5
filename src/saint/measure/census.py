"""How many ops one forward pass dispatches, and how many of them make a GPU wait for the
host, counted on any device (a CPU included).

On a fast GPU a small model's forward pass is bound by the host: each op costs about ten
microseconds of Python, dispatch and launch whatever its size (DINOv2-S/14 at 224px,
batch 64, bf16 ran 356 ops in 4 ms on an H200, see docs/packed.md). And each *host sync*
(a value the host reads back: ``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``, a
boolean-mask index, ``unique``, ``repeat_interleave`` without ``output_size``) stops the
host from running ahead, so the GPU idles while the next ops are launched. Counting both
here is what can be checked without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEW_OPS = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "reshape", "t", "transpose", "permute", "expand", "slice", "select",
    "unsqueeze", "squeeze", "unbind", "split", "split_with_sizes", "alias", "as_strided", "detach", "chunk",
    "narrow", "view_as", "expand_as", "lift_fresh", "unfold", "diagonal",
})
"""Ops that make a view (or wrap host data) and launch no kernel."""

SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                      "unique_consecutive"})
"""Ops whose output size or value the host must read back."""


@dataclass
class Census:
    """Per-op counts of one call: ``ops`` every dispatched op, ``syncs`` the host syncs
    (by op, plus ``tolist``), ``host_tensors`` tensors made from host data (``torch.tensor``:
    a host-to-device copy on a GPU, which PyTorch makes wait for the device)."""

    ops: collections.Counter[str] = field(default_factory=collections.Counter)
    syncs: collections.Counter[str] = field(default_factory=collections.Counter)
    host_tensors: int = 0

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """Ops that run a kernel (views left out): on a GPU, about one launch each."""
        return sum(n for op, n in self.ops.items() if op not in VIEW_OPS)

    @property
    def host_syncs(self) -> int:
        return sum(self.syncs.values())


def _bool_index(args: tuple[Any, ...]) -> bool:
    """Whether an ``index`` / ``index_put`` call has a boolean mask among its indices."""
    indices = args[1] if len(args) > 1 else ()
    return isinstance(indices, (list, tuple)) and any(
        isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices)


class _Counting(TorchDispatchMode):
    def __init__(self, census: Census) -> None:
        super().__init__()
        self.census = census

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.census.ops[name] += 1
        if name == "lift_fresh":
            self.census.host_tensors += 1
        if name in SYNC_OPS:
            self.census.syncs[name] += 1
        elif name in ("index", "index_put", "index_put_") and _bool_index(args):
            self.census.syncs[f"{name} (boolean mask)"] += 1
        elif name == "repeat_interleave" and "Tensor" in func._overloadname and kwargs.get("output_size") is None:
            self.census.syncs["repeat_interleave (no output_size)"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting() -> Iterator[Census]:
    """Count every op dispatched inside the block (``Tensor.tolist`` too, which dispatches
    nothing on a CPU but copies to the host on a GPU)."""
    census = Census()
    original = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        census.syncs["tolist"] += 1
        return original(self)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    try:
        with _Counting(census):
            yield census
    finally:
        torch.Tensor.tolist = original  # type: ignore[method-assign]


def op_census(fn: Callable[[], Any]) -> Census:
    """Run ``fn()`` once (no grad) and count its ops and host syncs."""
    with torch.no_grad(), counting() as census:
        fn()
    return census

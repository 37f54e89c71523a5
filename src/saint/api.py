"""The public entry points: ``patch``, ``unpatch``, ``stats``, ``is_patched``."""

from __future__ import annotations

from typing import Any

import torch

from .adapters import find_adapter
from .adapters.common import TokenStats, get_handle


def patch(model: torch.nn.Module, method: str = "saint", **kwargs: Any) -> torch.nn.Module:
    """Prune ``model``'s tokens with ``method`` (in place, reversible); returns the model.

    Keyword arguments are the method's settings (see ``saint.methods``); settings
    marked per-layer take a scalar, a list aligned with ``layers`` or a
    ``{block: value}`` dict. Patching a patched model replaces its config cleanly.
    ``trace=True`` records where every original token goes (for visualisation).
    """
    adapter = find_adapter(model)
    if get_handle(model) is not None:
        unpatch(model)
    adapter.patch(model, method, **kwargs)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch`: the model computes exactly what it did before."""
    if get_handle(model) is None:
        raise ValueError(f"{type(model).__name__} is not patched by saint")
    find_adapter(model).unpatch(model)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return get_handle(model) is not None


def stats(model: torch.nn.Module) -> TokenStats:
    """Tokens entering each block in the model's last forward, per sample."""
    handle = get_handle(model)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by saint")
    return handle.stats()

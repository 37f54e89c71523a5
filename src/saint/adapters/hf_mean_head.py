"""Hugging Face image classifiers whose head averages the tower's tokens
(``CLIPForImageClassification``, ``MetaClip2ForImageClassification``,
``SiglipForImageClassification``, ``IJepaForImageClassification``, and DINOv2's, which puts
the class token before the mean). Siglip2's is refused: its forward masks the mean with the
input's padding mask, which no longer lines up with the tokens once any are removed.

The model's own ``forward`` runs (its tower, classifier, loss and output); after a step
that pads or merges, its plain mean over the padded positions would average padding (NaN
when packed) and weigh a merged token as one. So the classifier is handed, in that call,
each image's mean over its real tokens after the protected prefix, a merged token weighted
by how many it stands for (:meth:`~saint.adapters.base.TokenStateHandle.output_weights`):
the mean over the original patches of the token each one became. With every token real and
whole the classifier gets the model's own input, untouched.

Pieces, all per instance and removed on unpatch: the classifier model's ``forward`` opens
a slot for its call (its class's own ``forward`` inside), a forward hook on the tower puts
the call's ``last_hidden_state`` there, and a forward pre-hook on ``classifier`` replaces
its input with the weighted mean. Outside such a call (the tower or the classifier called
on their own) nothing is replaced.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import Any

import torch

from .base import TokenStateHandle, refuse_foreign_forwards
from .common import Hooked

# classifier class -> whether the class token goes before the mean (DINOv2's head)
MEAN_HEADS: dict[str, bool] = {
    "CLIPForImageClassification": False,
    "MetaClip2ForImageClassification": False,
    "SiglipForImageClassification": False,
    "IJepaForImageClassification": False,
    "Dinov2ForImageClassification": True,
    "Dinov2WithRegistersForImageClassification": True,
}

_CALLS = "_saint_mean_head_calls"  # where the model, its tower and its classifier keep the :class:`_Calls`


def _head_class(model: torch.nn.Module) -> str | None:
    """The name of the classifier class of :data:`MEAN_HEADS` that ``model`` is (or subclasses)."""
    return next((c.__name__ for c in type(model).__mro__ if c.__name__ in MEAN_HEADS), None)


def averages_tokens(model: torch.nn.Module) -> bool:
    """Whether ``model`` is (or subclasses) one of the classifiers that average their tower's tokens."""
    return _head_class(model) is not None


def check(model: torch.nn.Module) -> None:
    """Refuse, before anything is patched, a classifier whose ``forward`` another library
    replaced per instance (saint's would drop it)."""
    if averages_tokens(model):
        refuse_foreign_forwards({type(model).__name__: model})


def install(model: torch.nn.Module, tower: torch.nn.Module, handle: TokenStateHandle) -> None:
    """Make ``model``'s classifier read each image's size-weighted mean over its real tokens
    (a no-op for other models; :func:`check` it first); the hooks go with ``handle``'s, the
    forward is removed by :func:`uninstall`. What the hooks need lives in the modules'
    ``__dict__``, not in closures, so a deep copy of the model carries its own."""
    if not averages_tokens(model):
        return
    calls = _Calls(handle, MEAN_HEADS[_head_class(model)])
    for module in (model, tower, model.classifier):
        module.__dict__[_CALLS] = calls
    handle.hooks.append(tower.register_forward_hook(_keep))
    handle.hooks.append(model.classifier.register_forward_pre_hook(_replace))
    handle.hooked.append(Hooked(model, _classifier, model.classifier, f"{type(model).__name__}'s classifier"))
    model.forward = types.MethodType(_classifier_forward, model)


def uninstall(model: torch.nn.Module) -> None:
    """Undo :func:`install` (its hooks go with the handle's)."""
    calls = model.__dict__.pop(_CALLS, None)
    if calls is None:
        return
    model.__dict__.pop("forward", None)
    for module in (model.classifier, getattr(calls.handle, "tower", None)):
        if module is not None and module.__dict__.get(_CALLS) is calls:
            del module.__dict__[_CALLS]


class _Calls(dict):
    """Thread id -> the tower's output in that thread's call of the classifier model (None
    until the tower returns), with the handle and whether the class token goes first."""

    def __init__(self, handle: TokenStateHandle, with_cls: bool) -> None:
        super().__init__()
        self.handle = handle
        self.with_cls = with_cls


def _classifier(model: torch.nn.Module) -> torch.nn.Module:
    return model.classifier


def _classifier_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The classifier model's own forward, with a slot open for its tower's output."""
    calls = self.__dict__[_CALLS]
    slot = threading.get_ident()
    calls[slot] = None
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        calls.pop(slot, None)


def _keep(tower: torch.nn.Module, args: Any, out: Any) -> None:
    """Forward hook on the tower: its output, for this thread's call of the classifier model."""
    calls = tower.__dict__[_CALLS]
    slot = threading.get_ident()
    if slot in calls:
        calls[slot] = out.last_hidden_state


def _replace(classifier: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook on the classifier: the real tokens' weighted mean in place of the
    model's plain one, inside the model's call once its tower has run and pruned."""
    calls = classifier.__dict__[_CALLS]
    hidden = calls.get(threading.get_ident())
    if hidden is None:  # not inside the model's call, or its tower has not run
        return None
    calls[threading.get_ident()] = None
    handle = calls.handle
    pooled = mean_of_real_tokens(hidden, handle.output_weights(), handle.num_protected, calls.with_cls)
    if pooled is None:
        return None
    if args[0].shape != pooled.shape:
        raise RuntimeError(f"the classifier got {tuple(args[0].shape)} features where saint pooled "
                           f"{tuple(pooled.shape)}; the model's head is not the one saint supports")
    return (pooled, *args[1:])


def mean_of_real_tokens(hidden: torch.Tensor, weights: torch.Tensor | None, skip: int,
                        with_cls: bool = False) -> torch.Tensor | None:
    """Each image's mean over the positions of ``hidden [B, M, C]`` after the first
    ``skip``, weighted by ``weights [B, M]`` (tokens per position, 0 at padding), with
    position 0 before it when ``with_cls``; None when ``weights`` is None (every position
    one real token: the model's own plain mean is right)."""
    if weights is None:
        return None
    if weights.shape != hidden.shape[:2]:
        raise RuntimeError(f"{tuple(weights.shape)} token weights for {tuple(hidden.shape[:2])} tokens")
    w = weights[:, skip:].to(hidden.device, hidden.dtype)[..., None]
    tokens = hidden[:, skip:].masked_fill(w == 0, 0.0)  # padding holds NaN when packed
    mean = (tokens * w).sum(dim=1) / w.sum(dim=1)
    return torch.cat([hidden[:, 0], mean], dim=1) if with_cls else mean


def embed(model: torch.nn.Module, forward: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier's embedding and logits from one ``forward()``: the features its
    classifier read (the weighted mean when saint pooled) and its logits."""
    seen: dict[str, torch.Tensor] = {}
    caller = threading.get_ident()

    def keep(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() == caller:
            seen.setdefault("features", args[0])

    hook = model.classifier.register_forward_pre_hook(keep)  # after saint's: it sees what the classifier reads
    try:
        out = forward()
    finally:
        hook.remove()
    return seen["features"], out.logits


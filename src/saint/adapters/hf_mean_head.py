"""Hugging Face image classifiers whose head averages the tower's tokens
(``CLIPForImageClassification``, ``MetaClip2ForImageClassification``,
``SiglipForImageClassification``, ``Siglip2ForImageClassification``,
``IJepaForImageClassification``, DINOv2's, which puts the class token before the mean, and
the video classifier ``VideoMAEForVideoClassification``, whose ``fc_norm`` reads the mean).

The model's own ``forward`` runs (its tower, classifier, loss and output); after a step
that pads or merges, its plain mean over the padded positions would average padding (NaN
when packed) and weigh a merged token as one. So the classifier is handed, in that call,
each image's mean over its real tokens after the protected prefix, a merged token weighted
by how many it stands for (:meth:`~saint.adapters.base.TokenStateHandle.output_weights`):
the mean over the original patches of the token each one became. With every token real and
whole the classifier gets the model's own input, untouched.

Pieces, all per instance and removed on unpatch: the classifier model's ``forward`` opens
a slot for its call (its class's own ``forward`` inside), a forward hook on the tower puts
the call's ``last_hidden_state`` there, and a forward pre-hook on the module that reads the
mean (``classifier``; VideoMAE's ``fc_norm``) replaces its input with the weighted mean. Outside such a call (the tower or the classifier called
on their own) nothing is replaced. Siglip2's forward averages under the input's
``pixel_attention_mask`` before its classifier, which no longer lines up with the tokens
once any are removed (and would read NaN padding): inside its call, when saint pools, the
tower hands it zeros of the mask's length in place of ``last_hidden_state`` (the classifier
output does not return it), and the pre-hook replaces the mean of them.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .base import TokenStateHandle, refuse_foreign_forwards
from .common import Hooked, get_handle


@dataclass(frozen=True)
class MeanHead:
    """How a classifier averages its tower's tokens: ``with_cls``, the class token goes
    before the mean (DINOv2's); ``reader``, the attribute of the module that reads the mean
    (VideoMAE's ``fc_norm``, then its classifier); ``masked``, the forward averages under the
    input's ``pixel_attention_mask`` (Siglip2's)."""

    with_cls: bool = False
    reader: str = "classifier"
    masked: bool = False


MEAN_HEADS: dict[str, MeanHead] = {
    "CLIPForImageClassification": MeanHead(),
    "MetaClip2ForImageClassification": MeanHead(),
    "SiglipForImageClassification": MeanHead(),
    "Siglip2ForImageClassification": MeanHead(masked=True),
    "IJepaForImageClassification": MeanHead(),
    "Dinov2ForImageClassification": MeanHead(with_cls=True),
    "Dinov2WithRegistersForImageClassification": MeanHead(with_cls=True),
    "VideoMAEForVideoClassification": MeanHead(reader="fc_norm"),
}

_CALLS = "_saint_mean_head_calls"  # where the model, its tower and its reader keep the :class:`_Calls`


def _head(model: torch.nn.Module) -> MeanHead | None:
    """How ``model`` averages, if it is (or subclasses) a classifier of :data:`MEAN_HEADS`."""
    return next((MEAN_HEADS[c.__name__] for c in type(model).__mro__ if c.__name__ in MEAN_HEADS), None)


def averages_tokens(model: torch.nn.Module) -> bool:
    """Whether ``model`` is (or subclasses) one of the classifiers that average their tower's
    tokens (and is configured to: VideoMAE's may read position 0 instead)."""
    head = _head(model)
    return head is not None and getattr(model, head.reader, None) is not None


def check(model: torch.nn.Module) -> None:
    """Refuse, before anything is patched, a classifier whose ``forward`` another library
    replaced per instance (saint's would drop it), or one that reads position 0 of a tower
    without a class token (a patch that pruning merges, drops or pads)."""
    head = _head(model)
    if head is None:
        return
    if getattr(model, head.reader, None) is None:
        raise TypeError(f"this {type(model).__name__} classifies position 0 (no mean pooling), a patch that pruning "
                        "merges, drops or pads; saint supports it with mean pooling (use_mean_pooling=True)")
    refuse_foreign_forwards({type(model).__name__: model})


def install(model: torch.nn.Module, tower: torch.nn.Module, handle: TokenStateHandle) -> None:
    """Make ``model``'s classifier read each image's size-weighted mean over its real tokens
    (a no-op for other models; :func:`check` it first); the hooks go with ``handle``'s, the
    forward is removed by :func:`uninstall`. What the hooks need lives in the modules'
    ``__dict__``, not in closures, so a deep copy of the model carries its own."""
    if not averages_tokens(model):
        return
    head = _head(model)
    reader = _reader(model)
    calls = _Calls(handle, head.with_cls)
    for module in (model, tower, reader):
        module.__dict__[_CALLS] = calls
    if head.masked:
        handle.hooks.append(tower.register_forward_hook(_keep_for_masked_mean, with_kwargs=True))
    else:
        handle.hooks.append(tower.register_forward_hook(_keep))
    handle.hooks.append(reader.register_forward_pre_hook(_replace))
    handle.hooked.append(Hooked(model, _reader, reader, f"{type(model).__name__}'s {head.reader}"))
    model.forward = types.MethodType(_classifier_forward, model)


def uninstall(model: torch.nn.Module) -> None:
    """Undo :func:`install` (its hooks go with the handle's)."""
    calls = model.__dict__.pop(_CALLS, None)
    if calls is None:
        return
    model.__dict__.pop("forward", None)
    for module in (_reader(model), getattr(calls.handle, "tower", None)):
        if module is not None and module.__dict__.get(_CALLS) is calls:
            del module.__dict__[_CALLS]


class _Calls(dict):
    """Thread id -> the tower's output and its positions' token weights in that thread's call
    of the classifier model (None until the tower returns), with the handle and whether the
    class token goes first."""

    def __init__(self, handle: TokenStateHandle, with_cls: bool) -> None:
        super().__init__()
        self.handle = handle
        self.with_cls = with_cls


def _reader(model: torch.nn.Module) -> torch.nn.Module:
    """The module that reads ``model``'s mean (its classifier, or VideoMAE's ``fc_norm``)."""
    return getattr(model, _head(model).reader)  # type: ignore[union-attr]


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
    """Forward hook on the tower: its output and how many tokens each of its positions
    stands for, for this thread's call of the classifier model."""
    calls = tower.__dict__[_CALLS]
    slot = threading.get_ident()
    if slot in calls:
        calls[slot] = (out.last_hidden_state, calls.handle.output_weights())


def _keep_for_masked_mean(tower: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """:func:`_keep` for a head that averages under ``pixel_attention_mask``. Its own masked
    mean can only run where the output still lines up with the mask and holds no padding;
    elsewhere saint pools (each position one token where none merged), and the model's mean
    gets zeros of the mask's length (finite, and shaped as the mask) in place of the pruned
    ``last_hidden_state``."""
    calls = tower.__dict__[_CALLS]
    slot = threading.get_ident()
    if slot not in calls:
        return None
    hidden, weights = out.last_hidden_state, calls.handle.output_weights()
    mask = kwargs.get("pixel_attention_mask", args[1] if len(args) > 1 else None)
    length = hidden.shape[1] if mask is None else mask.shape[1]
    if weights is None and length == hidden.shape[1]:
        calls[slot] = (hidden, None)
        return None
    if weights is None:  # tokens dropped from a batch left rectangular: each position one token
        weights = hidden.new_ones(hidden.shape[:2])
    calls[slot] = (hidden, weights)
    return type(out)(**{**out, "last_hidden_state": hidden.new_zeros(hidden.shape[0], length, hidden.shape[2])})


def _replace(reader: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook on the module that reads the mean: the real tokens' weighted mean in
    place of the model's plain one, inside the model's call once its tower has run and pruned."""
    calls = reader.__dict__[_CALLS]
    kept = calls.get(threading.get_ident())
    if kept is None:  # not inside the model's call, or its tower has not run
        return None
    calls[threading.get_ident()] = None
    hidden, weights = kept
    pooled = mean_of_real_tokens(hidden, weights, calls.handle.num_protected, calls.with_cls)
    if pooled is None:
        return None
    if args[0].shape != pooled.shape:
        raise RuntimeError(f"the {type(reader).__name__} got {tuple(args[0].shape)} features where saint pooled "
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
    features, out = read_input(_reader(model), forward)  # after saint's hook: what the reader reads
    return features, out.logits


def read_input(module: torch.nn.Module, forward: Callable[[], Any]) -> tuple[torch.Tensor, Any]:
    """What ``module`` is first called with (its first argument) while ``forward()`` runs in
    this thread, and ``forward()``'s output; read by a forward pre-hook registered after the
    module's others, so it sees what the module reads."""
    seen: dict[str, torch.Tensor] = {}
    caller = threading.get_ident()

    def keep(m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() == caller:
            seen.setdefault("input", args[0])

    hook = module.register_forward_pre_hook(keep)
    try:
        out = forward()
    finally:
        hook.remove()
    return seen["input"], out


def token_mean(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Each image's mean over the real tokens of ``hidden [B, M, C]`` (the last forward's
    output of ``model``), a merged token weighted by how many it stands for; the plain mean
    where every position is one real token (or ``model`` is not patched)."""
    handle = get_handle(model)
    mean = mean_of_real_tokens(hidden, None if handle is None else handle.output_weights(), 0)
    return hidden.mean(dim=1) if mean is None else mean

"""The public entry points: ``patch``, ``unpatch``, ``stats``, ``is_patched``."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .adapters import find_adapter
from .adapters.common import Runs, TokenStats, get_handle


def patch(model: torch.nn.Module, method: str = "saint", **kwargs: Any) -> torch.nn.Module:
    """Prune ``model``'s tokens with ``method`` (in place, reversible); returns the model.

    Keyword arguments are the method's settings (see ``saint.methods``); settings
    marked per-layer take a scalar, a list aligned with ``layers`` or a
    ``{block: value}`` dict. Patching a patched model replaces its config cleanly.
    ``trace=True`` records where every original token goes (for visualisation).
    Vision models also take ``layout="packed"`` (default: once images keep different
    counts, their tokens run as one stream without padding) or ``"padded"`` (pad and
    mask, for comparison), and ``kernel`` (see :data:`saint.core.packing.KERNELS`).
    A model inside a patched one, or holding one, is refused: patch one of the two.
    """
    if not isinstance(kwargs.get("trace", False), bool):
        raise TypeError(f"trace must be True or False, got {kwargs['trace']!r}")
    adapter = find_adapter(model)
    if get_handle(model) is not None:
        unpatch(model)
    _refuse_nested(model)
    adapter.patch(model, method, **kwargs)
    _PATCHED.add(model)
    return model


_PATCHED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # the models saint.patch patched


def _refuse_nested(model: torch.nn.Module) -> None:
    """Refuse ``model`` when a module inside it is patched on its own (a VLM's vision tower or
    inner ``*Model``), or when it is inside a patched model: both patches would prune the
    same tokens (the forward failed on a shape or an index, or ran unpruned tokens through
    a pruned prompt)."""
    for name, sub in model.named_modules():
        if sub is not model and get_handle(sub) is not None:
            raise ValueError(
                f"the {type(sub).__name__} inside this {type(model).__name__} ({name}) is already patched by saint "
                f"on its own; unpatch it first (saint.unpatch(<the {type(sub).__name__}>)), then patch the "
                f"{type(model).__name__} (a VLM's mode='vit' or 'hybrid' prunes inside its vision tower)"
            )
    for root in list(_PATCHED):
        if root is not model and get_handle(root) is not None and any(m is model for m in root.modules()):
            raise ValueError(
                f"this {type(model).__name__} is inside a {type(root).__name__} that saint patched; patch one of "
                f"the two: saint.unpatch(<the {type(root).__name__}>) first (a VLM's mode='vit' or 'hybrid' prunes "
                "inside its vision tower)"
            )


def _handle(model: torch.nn.Module) -> Any:
    """The patch handle of ``model``; a clear error when it is not patched."""
    handle = get_handle(model)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by saint")
    return handle


def _runs_handle(model: torch.nn.Module, lacks: str) -> Any:
    """The handle of a patch that keeps per-call token state (the vision adapters);
    ``lacks`` says what another patch does not have."""
    handle = _handle(model)
    if not isinstance(getattr(handle, "runs", None), Runs):  # (a Qwen-VL patch's "runs" are its media runs)
        raise TypeError(f"{type(model).__name__}'s patch has {lacks}")
    return handle


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch`: the model computes exactly what it did before. The inner model
    of a patched wrapper (an HF tower patched through its classifier or dual encoder, timm's
    model inside a patched ``features_only`` wrapper) is refused on its own."""
    handle = _handle(model)
    if hasattr(handle, "check_unpatch"):
        handle.check_unpatch(model)
    find_adapter(model).unpatch(model)
    _PATCHED.discard(model)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return get_handle(model) is not None


def stats(model: torch.nn.Module) -> TokenStats:
    """Tokens entering each block in the model's last forward, per sample."""
    return _handle(model).stats()


def token_mask(model: torch.nn.Module, block: int = -1) -> torch.Tensor | None:
    """Which positions of block ``block``'s output in the last forward hold real tokens:
    ``[B, M]`` bool, or None when every position does (negative ``block`` counts from
    the end). Outputs that leave a packed model (``forward_features``,
    ``forward_intermediates``, HF ``hidden_states``) are padded with NaN there."""
    handle = _handle(model)
    if hasattr(handle, "output_mask"):  # a VLM: its output's positions (the input's) that have a token
        if block != -1:
            raise ValueError("a VLM's token mask describes its output (the input's positions that kept a token): "
                             "call saint.token_mask(model) without a block")
        return handle.output_mask()
    run = _runs_handle(model, "no per-block token mask; its outputs are not padded").runs.current()
    valid = [] if run is None else run.layer_valid
    if not -len(valid) <= block < len(valid):
        raise IndexError(f"block {block} did not run in the last forward ({len(valid)} blocks ran)")
    return valid[block]


def token_sizes(model: torch.nn.Module) -> torch.Tensor | None:
    """How many original tokens each position of the last forward's output stands for:
    ``[B, M]`` float (1 for a token nothing merged into, 0 at padding), or None when every
    position is one real token. A mean over tokens weighted by it is what the unpruned
    model's mean is when a merged token stands for its parts."""
    if hasattr(_handle(model), "output_mask"):
        raise TypeError(f"{type(model).__name__}'s patch keeps no per-token sizes (a VLM's pruning removes "
                        "tokens); saint.token_mask(model) marks the positions of its output that kept one")
    return _runs_handle(model, "no per-token sizes; its outputs are not merged or padded").output_weights()


def per_image(tokens: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Split a padded ``[B, M, C]`` output by its :func:`token_mask` into one ``[n_i, C]``
    tensor of real tokens per image."""
    if mask is None:
        return list(tokens.unbind(0))
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (saint.token_mask), got {mask.dtype}")
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        hint = ""
        if tuple(mask.shape) == (tokens.shape[0], tokens.shape[1] - 1):
            hint = "; a CaiT's forward_features puts its class token first: split features[:, 1:]"
        elif tuple(mask.shape) == (tokens.shape[0], tokens.shape[1] + 1):
            hint = "; open_clip's output tokens leave out the class token: split them by mask[:, 1:]"
        raise ValueError(f"mask {tuple(mask.shape)} does not match tokens {tuple(tokens.shape[:2])}{hint}")
    if tokens.is_floating_point() and bool((tokens[..., 0].isnan() & mask.to(tokens.device)).any()):
        raise ValueError(
            "the mask marks padding (NaN) as real tokens: it belongs to another forward; take "
            "saint.token_mask(model) after the forward that returned these tokens"
        )
    return [t[m] for t, m in zip(tokens, mask, strict=True)]

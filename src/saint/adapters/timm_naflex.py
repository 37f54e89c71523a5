"""timm ``NaFlexVit`` with timm ViT blocks (NaFlex SigLIP, RADIO and the other NaFlex
configurations without rotary embedding).

NaFlexVit takes either image batches ``[B, 3, H, W]`` (then it runs as a ViT) or NaFlex
batches: each image patchified at its own size, padded, with ``patch_coord`` and
``patch_valid``. Such a batch is ragged before any pruning, and saint starts it that way:
the padding (``patch_valid``, with the prefix tokens real) becomes the token state's
validity at the first block, so with ``layout="packed"`` padding is never computed and
every method continues as after a ragged step. The blocks run through the timm ViT
adapter's block forward (:mod:`saint.adapters.timm_vit`), which accepts the model's own
padding mask only inside such a call, because the state carries it. Pooling runs per
image (merged tokens weighted by their sizes in an average); ``forward_features`` of a
NaFlex batch returns the padded view with the state's ``patch_valid``, so the model's own
``forward_head`` pools it per image.

Refused with the reason: rotary configurations (their blocks are Eva blocks with
per-image rotary tables), patch dropout in training, a caller's own ``attn_mask``, and
``forward_intermediates`` of NaFlex batches (its ``patch_valid`` would not follow the
pruning; image batches are served).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from ..methods import MethodSpec
from .base import Grid, Probe
from .common import SAINT_ATTR
from .timm_vit import (
    TimmPatch,
    TimmProbe,
    TimmViT,
    _block_forward,
    _forward_intermediates,
    _key_proj,
    begin_patch,
    check_blocks,
    install,
    pool_per_image,
    resolve_settings,
    state_of_tokens,
    tag_tokens,
    uninstall,
)


def _classes() -> tuple[type, type, type] | None:
    try:
        from timm.models.naflexvit import NaFlexVit
        from timm.models.vision_transformer import Attention, Block
    except ImportError:  # timm not installed, or too old for NaFlexVit
        return None
    return NaFlexVit, Block, Attention


def matches(model: torch.nn.Module) -> bool:
    classes = _classes()
    return classes is not None and isinstance(model, classes[0])


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
    layout: str = "packed", kernel: str = "auto", **kwargs: Any,
) -> TimmPatch:
    """Patch a timm NaFlexVit in place (see :func:`saint.patch`)."""
    _, block_cls, attn_cls = _classes()  # type: ignore[misc]
    spec, config = begin_patch(model, method, layout, kernel, kwargs)
    blocks = list(model.blocks)
    check_blocks(blocks, lambda blk: type(blk) is block_cls and isinstance(blk.attn, attn_cls),
                 "NaFlexVit with timm ViT blocks (Block with Attention); rotary NaFlexVit configurations "
                 "use Eva blocks with per-image rotary tables, which saint does not patch")
    settings, num_protected = resolve_settings(model, spec, config, model.embeds.cls_token is not None)
    handle = TimmPatch(spec, config, settings, num_protected, trace=trace, kernel=kernel)
    return install(model, handle, _block_forward, _key_proj, layout, _methods())


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    uninstall(model, _methods())


def _methods() -> dict[str, Callable[..., Any]]:
    """The per-instance methods a patched NaFlexVit gets."""
    return {"forward_features": _forward_features, "_pool": _pool,
            "forward_intermediates": _forward_intermediates_of_images}


def _forward_features(self: torch.nn.Module, patches: torch.Tensor, patch_coord: torch.Tensor | None = None,
                      patch_valid: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> Any:
    """NaFlexVit's own ``forward_features``, its first block starting from the real
    patches (and the prefix tokens); a NaFlex batch's ``patch_valid`` is the state's after."""
    handle = self.__dict__[SAINT_ATTR]
    if attn_mask is not None:
        raise ValueError("a pruned NaFlexVit builds its masks from patch_valid; call it without attn_mask")
    if self.training and self.patch_drop is not None:
        raise ValueError("patch dropout in training reorders the patches before the blocks; unpatch to train with it")
    valid = None
    if patch_valid is not None:
        prefix = patch_valid.new_ones(patch_valid.shape[0], self.num_prefix_tokens, dtype=torch.bool)
        valid = torch.cat([prefix, patch_valid.bool()], dim=1)
    with handle.runs.input_padding(valid):
        out = type(self).forward_features(self, patches, patch_coord=patch_coord, patch_valid=patch_valid)
    if isinstance(out, dict):  # a NaFlex batch: the real tokens of the padded view that follows
        state = handle.state
        out["patch_valid"] = None if state.valid is None else state.valid[:, self.num_prefix_tokens :]
    return tag_tokens(self, out)


def _pool(self: torch.nn.Module, x: torch.Tensor, pool_type: str | None = None,
          patch_valid: torch.Tensor | None = None) -> torch.Tensor:
    """NaFlexVit's pooling, per image over its real tokens (the state's, whatever
    ``patch_valid`` says), merged tokens weighted by their sizes in an average."""
    state = state_of_tokens(self, x)
    if state.valid is None and state.sizes is None:
        return type(self)._pool(self, x, pool_type, patch_valid)
    return pool_per_image(self, x, pool_type, lambda t, pool: _pool_image(self, t, pool))


def _pool_image(model: torch.nn.Module, x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """The model's pooling of one image's real tokens ``[1, n, C]``; an image with no patch
    (a NaFlex image whose every patch is padding) pooled as timm pools it in its batch, from
    one padding patch (an average of none is 0, not NaN)."""
    if x.shape[1] > model.num_prefix_tokens:
        return type(model)._pool(model, x, pool_type, None)
    padding = x.new_zeros(1, 1, x.shape[2])
    return type(model)._pool(model, torch.cat([x, padding], 1), pool_type, x.new_zeros(1, 1, dtype=torch.bool))


def _forward_intermediates_of_images(self: torch.nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    """``forward_intermediates`` of image batches (unpadded per block, as for timm's ViT)."""
    if isinstance(x, dict) or kwargs.get("patch_coord") is not None:
        raise ValueError("forward_intermediates of a NaFlex batch would return a patch_valid that does not "
                         "follow the pruning; call it with image batches, or use forward_features")
    return _forward_intermediates(self, x, *args, **kwargs)


# ---------------------------------------------------------------------------- protocol
class TimmNaFlex(TimmViT):
    """timm ``NaFlexVit``: sites are ``model.blocks``; the protocol takes image batches."""

    name = "timm_naflex"
    family = sys.modules[__name__]

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        ph, pw = (int(v) for v in model.embeds.patch_size)
        if inputs is not None:
            return Grid(int(inputs.shape[-2]) // ph, int(inputs.shape[-1]) // pw, (ph, pw))
        from timm.data import resolve_data_config

        size = model.embeds.default_img_size or resolve_data_config({}, model=model)["input_size"][-2:]
        return Grid(int(size[0]) // ph, int(size[1]) // pw, (ph, pw))  # the size its data config asks for

    def probe(self, model: torch.nn.Module) -> Probe:
        probe = TimmProbe(model, self.sites(model))
        probe.has_cls = model.embeds.cls_token is not None
        return probe


ADAPTER = TimmNaFlex()

"""timm's ViTs with a relative position bias per pair of tokens: ``Beit`` (BEiT, BEiT v2; the
bias per block, ``use_rel_pos_bias``, or shared by every block, ``use_shared_rel_pos_bias``)
and ``VisionTransformerRelPos`` (``vit_relpos_*``, ``vit_srelpos_*``: a bias table or a small
MLP over log-spaced offsets, per block or shared; a class token or none), both averaging their
patch tokens for the head by default (``global_pool="avg"``).

As for timm's other ViTs (:mod:`saint.adapters.timm_vit`, :mod:`saint.adapters.timm_eva`),
each block's ``forward`` is wrapped per instance and runs the block's own modules in timm's
order. Until a step removes a token a block runs exactly as timm runs it. After that the
state tracks each token's original index (a merged token keeps its destination's), and the
attention adds the rows and columns of the full grid's bias at those indices to saint's key
mask (:mod:`saint.adapters.pair_bias`, per image on a packed stream): each image attends as
the unpruned model would bias its remaining tokens. q/k/v come from the attention's own fused
``qkv`` (with BEiT's separate q/v bias) and q/k norms, the projection is its own ``proj``;
the class-attention guard reads the class token's row of the bias. The head's average is
size-weighted over each image's real patch tokens. The post-norm blocks of the ``*_rpn``
models (``ResPostRelPosBlock``) are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..methods import LayerContext, MethodSpec
from .base import Probe, Site
from .common import (
    SITE_ATTR,
    TokenState,
    attention_of,
    cls_attention,
    drop_path_of,
    output_unshared,
)
from .pair_bias import check_pair_kernel, first_token_attention, pair_attention
from .timm_eva import (
    EvaProbe,
    TimmEva,
    _apply_to_projections,
    _eva_bias,
    _keys_first,
    _scaled,
    fused_projections,
    layer_context,
)
from .timm_vit import (
    TimmPatch,
    _forward_features,
    _forward_intermediates,
    _weighted_mean,
    begin_patch,
    block_sites,
    check_blocks,
    install,
    qkv_part,
    resolve_settings,
    state_of_tokens,
    uninstall,
)


@dataclass(frozen=True)
class Family:
    """A timm model class with a pair bias: its block and attention classes, and the keyword
    its blocks take the model's shared bias by."""

    model: type
    block: type
    attention: type
    shared_keyword: str


def _families() -> list[Family]:
    try:
        from timm.models import beit
        from timm.models import vision_transformer_relpos as relpos
    except ImportError:  # timm not installed, or too old to have them
        return []
    return [Family(beit.Beit, beit.Block, beit.Attention, "shared_rel_pos_bias"),
            Family(relpos.VisionTransformerRelPos, relpos.RelPosBlock, relpos.RelPosAttention, "shared_rel_pos")]


def _family_of(model: torch.nn.Module) -> Family | None:
    return next((f for f in _families() if isinstance(model, f.model)), None)


def matches(model: torch.nn.Module) -> bool:
    return _family_of(model) is not None


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
    layout: str = "packed", kernel: str = "auto", **kwargs: Any,
) -> TimmPatch:
    """Patch a timm ``Beit`` or ``VisionTransformerRelPos`` in place (see :func:`saint.patch`)."""
    family = _family_of(model)
    spec, config = begin_patch(model, method, layout, kernel, kwargs)
    check_pair_kernel(kernel)
    check_blocks(list(model.blocks),
                 lambda blk: type(blk) is family.block and type(getattr(blk, "attn", None)) is family.attention,
                 "timm Beit's Block and VisionTransformerRelPos's pre-norm RelPosBlock (not the post-norm "
                 "ResPostRelPosBlock of the *_rpn models)")
    settings, num_protected = resolve_settings(model, spec, config)
    handle = TimmPatch(spec, config, settings, num_protected, trace=trace, kernel=kernel)
    forward = _beit_block_forward if family.shared_keyword == "shared_rel_pos_bias" else _relpos_block_forward
    return install(model, handle, forward, None, layout, _methods(), track_positions=True)


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper: the model is the original object again."""
    uninstall(model, _methods())


def _methods() -> dict[str, Callable[..., Any]]:
    """The per-instance methods a patched model gets: tagged features, the per-image head,
    unpadded intermediates."""
    return {"forward_features": _forward_features, "forward_head": _forward_head,
            "forward_intermediates": _forward_intermediates}


def _forward_head(self: torch.nn.Module, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """timm's ``forward_head``; its average (``global_pool="avg"``) taken per image over
    the real patch tokens, each weighted by its size, once tokens were removed or merged."""
    if self.global_pool == "avg":
        state = state_of_tokens(self, x)
        if state.valid is not None or state.sizes is not None:
            x = self.head_drop(self.fc_norm(_weighted_mean(self, x, state)))
            return x if pre_logits else self.head(x)
    return type(self).forward_head(self, x, pre_logits=pre_logits)


# ---------------------------------------------------------------------------- the block
def _beit_block_forward(self: torch.nn.Module, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """A BEiT block of a patched model (:func:`_block_forward`)."""
    return _block_forward(self, x, shared_rel_pos_bias, {"shared_rel_pos_bias": shared_rel_pos_bias})


def _relpos_block_forward(self: torch.nn.Module, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """A ``RelPosBlock`` of a patched model (:func:`_block_forward`)."""
    return _block_forward(self, x, shared_rel_pos, {"shared_rel_pos": shared_rel_pos})


def _block_forward(self: torch.nn.Module, x: torch.Tensor, shared: torch.Tensor | None, own_kwargs: dict[str, Any]
                   ) -> torch.Tensor:
    """timm's own forward of the block until a step removes a token; after that, each token's
    rows of the pair bias, and the selection between the attention residual and the MLP (or
    before attention, ``select_at="attention"``)."""
    handle, index = self.__dict__[SITE_ATTR]
    run, x, settings = handle.enter_site(index, x)
    state = run.state
    if settings is None and state.positions is None:  # nothing removed so far: the block as timm runs it
        return handle.leave_site(index, run, type(self).forward(self, x, **own_kwargs))
    handle.attention_from_parts(index)
    attn = self.attn
    full = full_bias(attn, shared)
    normed = self.norm1(x)
    sel = None
    if settings is not None and handle.config.select_at == "attention":
        x, q, k, v = _select_before_attention(self, handle, run, index, x, normed, settings, full)
    else:
        q, k, v = _projections(attn, normed)
        if settings is not None:
            sel = handle.spec.select(_context(handle, run, attn, index, x, _first_query(state, q), k, full),
                                     settings, handle.config)
    x = x + drop_path_of(self.drop_path1, _branch(self, 1, _attend(attn, q, k, v, state, handle, full)), state)
    if sel is not None:
        x = state.apply(x, sel)
    x = x + drop_path_of(self.drop_path2, _branch(self, 2, self.mlp(self.norm2(x))), state)
    return handle.leave_site(index, run, x)


def _branch(blk: torch.nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
    """A residual branch scaled as the block scales it: ``RelPosBlock``'s layer-scale module
    ``ls{i}``, BEiT's bare ``gamma_{i}`` (or none)."""
    ls = getattr(blk, f"ls{i}", None)
    return ls(x) if ls is not None else _scaled(getattr(blk, f"gamma_{i}"), x)


def _projections(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, N, H, D]`` through the attention's fused qkv (BEiT's q/v bias) and its
    q/k norms (``RelPosAttention``'s; BEiT has none)."""
    q, k, v = fused_projections(attn, x)
    return _norm(attn, "q_norm", q), _norm(attn, "k_norm", k), v


def _norm(attn: torch.nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    norm = getattr(attn, name, None)
    return t if norm is None else norm(t)


def full_bias(attn: torch.nn.Module, shared: torch.Tensor | None) -> torch.Tensor | None:
    """The bias the unpruned block adds to every pair of tokens, as timm adds it: BEiT's own
    relative position bias ``[1, H, N0, N0]`` plus the model's shared one (timm's ``[H, N0,
    N0]``); ``RelPosAttention``'s own (``rel_pos.get_bias()``) or else the shared one; None
    when there is none."""
    if hasattr(attn, "rel_pos"):
        return attn.rel_pos.get_bias() if attn.rel_pos is not None else shared
    own = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
    if own is None:
        return shared
    return own if shared is None else own + shared


def _attend(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: TokenState,
            handle: TimmPatch, full: torch.Tensor | None) -> torch.Tensor:
    """The rest of the attention from q, k, v ``[B, N, H, D]``: each image over its own
    real tokens, biased by ``full``'s pairs at the tokens' original indices; proj, dropouts."""
    dropout = attn.attn_drop.p if attn.training else 0.0
    prop = handle.config.size_bias
    if full is None:
        out = attention_of(q, k, v, state, prop, attn.scale, dropout, handle.kernel)
    else:
        out = pair_attention(q, k, v, state, prop, attn.scale, dropout, full, handle.kernel)
    return attn.proj_drop(attn.proj(out))


def _first_query(state: TokenState, q: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The class token's query ``[B, H, D]`` out of every token's ``q [B, N, H, D]``."""
    return lambda: state.first(q.flatten(2)).unflatten(-1, q.shape[2:])


def _select_before_attention(blk: torch.nn.Module, handle: TimmPatch, run: Any, index: int, x: torch.Tensor,
                             normed: torch.Tensor, settings: dict[str, Any], full: torch.Tensor | None
                             ) -> tuple[torch.Tensor, ...]:
    """The selection on the block's keys, then the survivors' tokens and q, k, v: only the
    keys of every token where the qkv runs in parts (the queries and values projected from
    the survivors' merged inputs, which equals merging every token's: a merge is a mean,
    the projection affine), else every token's q/k/v merged with the tokens."""
    state, attn = run.state, blk.attn
    if not _keys_first(attn):
        q, k, v = _projections(attn, normed)
        sel = handle.spec.select(_context(handle, run, attn, index, x, _first_query(state, q), k, full), settings,
                                 handle.config)
        return _apply_to_projections(state, sel, x, q, k, v, None)[:4]
    bias = _eva_bias(attn)
    heads = (attn.num_heads, -1)
    k = _norm(attn, "k_norm", qkv_part(attn.qkv, 1, normed, bias).unflatten(-1, heads))
    ctx = _context(handle, run, attn, index, x,
                   lambda: qkv_part(attn.qkv, 0, state.first(normed), bias).unflatten(-1, heads), k, full)
    sel = handle.spec.select(ctx, settings, handle.config)
    x, normed, k_rows = state.apply_many([x, normed, k.flatten(2)], sel, in_place=[
        False, output_unshared(blk.norm1), not torch.is_grad_enabled()])
    q, v = (qkv_part(attn.qkv, part, normed, bias).unflatten(-1, heads) for part in (0, 2))
    return x, q, k_rows.unflatten(2, k.shape[2:]), v


def _context(handle: TimmPatch, run: Any, attn: torch.nn.Module, index: int, x: torch.Tensor,
             q_first: Callable[[], torch.Tensor], k: torch.Tensor, full: torch.Tensor | None) -> LayerContext:
    """What the selection sees, in the padded view: the keys averaged over heads, the class
    token's attention (lazy) with its row of the pair bias, as the block's attention reads."""
    state = run.state
    prop = handle.config.size_bias

    def cls_attn() -> torch.Tensor:
        if full is None:
            return cls_attention(q_first(), k, state, attn.scale, prop)
        return first_token_attention(q_first(), k, state, prop, attn.scale, full)

    return layer_context(handle, run, index, x, k, cls_attn)


# ---------------------------------------------------------------------------- protocol
class RelPosProbe(EvaProbe):
    """Queries/keys of each block from its normed input through the attention's own fused
    qkv (with BEiT's q/v bias) and q/k norms; hidden states at each block's output."""

    def qk(self, i: int, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = _projections(self.sites[i].attn, store.pop("normed"))
        return q, k


class TimmRelPos(TimmEva):
    """timm ``Beit`` and ``VisionTransformerRelPos``: sites are ``model.blocks``; grid,
    protected prefix, embedding and the FLOPs model (a fused qkv, GELU or SwiGLU MLP) as for
    timm's Eva. A ``RelPosMlp`` bias costs one small MLP per block and call, whatever the
    tokens: it is not counted."""

    name = "timm_relpos"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return block_sites(model)

    def probe(self, model: torch.nn.Module) -> Probe:
        return RelPosProbe(model, self.sites(model))


ADAPTER = TimmRelPos()

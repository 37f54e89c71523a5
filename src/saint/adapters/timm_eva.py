"""timm ``Eva`` family: EVA-02, DINOv3, Perception Encoder, the RoPE ViTs (``vit_*_rope_*``)
and any ``Eva`` built of ``EvaBlock`` with ``EvaAttention`` or ``AttentionRope``.

As for timm's ``VisionTransformer`` (:mod:`saint.adapters.timm_vit`), each block's
``forward`` is wrapped per instance and runs the block's own modules in timm's order;
what is new here is rotary position embedding. timm hands every block one table of
rotary rows, one row per patch of the full grid. Once a step removes tokens, the state
tracks each surviving token's original index (a merged token keeps its destination's),
and every block takes the rows of its own tokens: a per-image table ``[B, 1, N, D]``
for the module's own attention on a rectangular or padded batch, one row per token
for per-image attention on a packed stream.

Until a step removes a token the block runs exactly as timm runs it. A pruning block
and a packed stream compute q/k/v through the attention's own projections (fused qkv
with EVA's separate q/v bias, or separate q/k/v projections, grouped key/value heads),
q/k norms, the rotation, per-image attention, scale norm, gate and proj: the attention
call is the only thing written here, and it is tested against the module's. The
selection reads the keys after the k norm and before the rotation (what a token is,
not where it is); class-token attention is read after it (what the class token reads).

Selecting before attention projects only the keys of every entering token when it can:
queries, values and gate logits are then projected from the survivors' merged normed
inputs, which equals merging every token's projections because a merge is a mean with
weights summing to 1 and the projections are affine. That needs no q norm (a norm does
not commute with a mean) and, for a fused qkv, a plain ``nn.Linear`` with no hook (its
rows run as products on slices of its own weight); otherwise every token's q/k/v rows
are projected and merged with the tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..core import head_mean
from ..methods import LayerContext, MethodSpec
from .base import (
    Probe,
    Site,
    save_output,
    select_at_of,
)
from .common import (
    SITE_ATTR,
    TokenState,
    attention_of,
    cls_attention,
    drop_path_of,
    output_unshared,
    patch_table_rows,
)
from .timm_vit import (
    OUTPUT_METHODS,
    TimmPatch,
    TimmViT,
    begin_patch,
    check_blocks,
    install,
    output_methods,
    qkv_part,
    qkv_runs_in_parts,
    qkv_splittable,
    resolve_settings,
    uninstall,
)


def _eva_classes() -> tuple[type, type, tuple[type, ...]] | None:
    try:
        from timm.layers.attention import AttentionRope
        from timm.models.eva import Eva, EvaAttention, EvaBlock
    except ImportError:  # timm not installed, or too old to have them
        return None
    return Eva, EvaBlock, (EvaAttention, AttentionRope)


def matches(model: torch.nn.Module) -> bool:
    classes = _eva_classes()
    return classes is not None and isinstance(model, classes[0])


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
    layout: str = "packed", kernel: str = "auto", **kwargs: Any,
) -> TimmPatch:
    """Patch a timm ``Eva`` in place (see :func:`saint.patch`)."""
    _, block_cls, attn_classes = _eva_classes()  # type: ignore[misc]
    spec, config = begin_patch(model, method, layout, kernel, kwargs)
    blocks = list(model.blocks)
    check_blocks(blocks, lambda blk: type(blk) is block_cls and type(getattr(blk, "attn", None)) in attn_classes,
                 "timm Eva blocks (timm.models.eva.EvaBlock with EvaAttention or AttentionRope), not post-norm blocks")
    settings, num_protected = resolve_settings(model, spec, config)
    handle = TimmPatch(spec, config, settings, num_protected, trace=trace, kernel=kernel)
    # Eva's forward_head pools through self.pool
    return install(model, handle, _block_forward, None, layout, output_methods(model, pool=True), track_positions=True)


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper: the model is the original object again."""
    uninstall(model, OUTPUT_METHODS)


# ---------------------------------------------------------------------------- the block
def _block_forward(self: torch.nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None,
                   attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """An ``EvaBlock`` of a patched model: timm's own forward until a step removes a token;
    after that, each token's rotary rows, and the selection between the attention residual
    and the MLP (or before attention, ``select_at="attention"``)."""
    handle, index = self.__dict__[SITE_ATTR]
    if attn_mask is not None or is_causal:
        raise ValueError("a pruned ViT cannot take attn_mask/is_causal; call the model without them")
    run, x, settings = handle.enter_site(index, x)
    state = run.state
    if settings is None and state.positions is None:  # nothing removed so far: the block as timm runs it
        return handle.leave_site(index, run, type(self).forward(self, x, rope=rope))
    _check_rope(rope)
    attn, npt, prop = self.attn, handle.num_protected, handle.config.size_bias
    normed = self.norm1(x)
    sel = None
    if settings is None and not state.packed:  # the module's own attention, each image's rows
        x_attn = attn(normed, rope=_module_rope(rope, state, npt), attn_mask=state.attn_bias(x.dtype, prop))
    else:
        handle.attention_from_parts(index)
        rows = _token_rope(rope, state.positions_of(x), npt)
        before = settings is not None and handle.config.select_at == "attention"
        if before:  # select on these tokens, then rotate the survivors by their own rows
            x, q, k, v, gate = _select_before_attention(self, handle, run, index, x, normed, rows, settings)
            rows = _token_rope(rope, state.positions_of(x), npt)
        else:
            gate = attn.gate(normed) if attn.gate is not None else None
            q, k, v = _project(attn, normed)
        keys = k  # before the rotation: what the selection reads
        q, k = _rotate(attn, q, rows, v), _rotate(attn, k, rows, v)
        if settings is not None and not before:  # class-token attention reads the rotated keys attention reads
            sel = handle.spec.select(_context(handle, run, attn, index, x, _first_query(attn, state, q), keys,
                                              lambda: k), settings, handle.config)
        x_attn = _attend(attn, q, k, v, gate, state, prop, handle.kernel)
    x = x + drop_path_of(self.drop_path1, _scaled(self.gamma_1, x_attn), state)
    if sel is not None:
        x = state.apply(x, sel)
    x = x + drop_path_of(self.drop_path2, _scaled(self.gamma_2, self.mlp(self.norm2(x))), state)
    return handle.leave_site(index, run, x)


def _scaled(gamma: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """EVA's layer scale (a bare parameter, or none)."""
    return x if gamma is None else gamma * x


def _select_before_attention(blk: torch.nn.Module, handle: TimmPatch, run: Any, index: int, x: torch.Tensor,
                             normed: torch.Tensor, rows: torch.Tensor | None, settings: dict[str, Any]
                             ) -> tuple[Any, ...]:
    """The selection on the block's keys (before the rotation by ``rows``), then the
    survivors' tokens ``x`` and their q, k, v and gate logits: keys first where
    :func:`_keys_first` allows, else every token's projections merged with the tokens."""
    state, attn = run.state, blk.attn
    if not _keys_first(attn):
        gate = attn.gate(normed) if attn.gate is not None else None
        q, k, v = _project(attn, normed)
        ctx = _context(handle, run, attn, index, x, _first_query(attn, state, q), k,
                       lambda: _rotate(attn, k, rows, v))
        return _apply_to_projections(state, handle.spec.select(ctx, settings, handle.config), x, q, k, v, gate)
    bias = _eva_bias(attn)
    k = attn.k_norm(_projection(attn, 1, normed, bias))
    ctx = _context(handle, run, attn, index, x, lambda: _projection(attn, 0, state.first(normed), bias), k,
                   lambda: _rotate(attn, k, rows, k))
    sel = handle.spec.select(ctx, settings, handle.config)
    x, normed, k_rows = state.apply_many([x, normed, k.flatten(2)], sel, in_place=[
        False, output_unshared(blk.norm1), not torch.is_grad_enabled()])
    gate = attn.gate(normed) if attn.gate is not None else None
    q, v = _projection(attn, 0, normed, bias), _projection(attn, 2, normed, bias)
    return x, q, k_rows.unflatten(2, k.shape[2:]), v, gate


def _keys_first(attn: torch.nn.Module) -> bool:
    """Whether the block may project only its keys before a selection: projections that
    split (:func:`_splits_projections`) and, for a fused qkv, no user's hook on it
    (:func:`qkv_runs_in_parts`)."""
    return _splits_projections(attn) and (attn.qkv is None or qkv_runs_in_parts(attn.qkv))


def _splits_projections(attn: torch.nn.Module) -> bool:
    """No q norm, and separate q/k/v projections or a fused qkv that is a plain
    ``nn.Linear``: queries and values of merged tokens may be projected from their merged
    inputs (what the FLOPs model counts before attention)."""
    q_norm = getattr(attn, "q_norm", None)  # BEiT's attention has none
    return (q_norm is None or type(q_norm) is torch.nn.Identity) and (attn.qkv is None or qkv_splittable(attn.qkv))


def _first_query(attn: torch.nn.Module, state: TokenState, q: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The first token's query ``[B, H, D]`` out of every token's ``q [B, N, H, D]``."""
    return lambda: state.first(q.flatten(2)).unflatten(-1, (attn.num_heads, -1))


def _apply_to_projections(state: TokenState, sel: Any, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, gate: torch.Tensor | None) -> tuple[Any, ...]:
    """One selection applied to the tokens and their q/k/v rows (and gate logits) alike."""
    shapes = [t.shape[2:] for t in (q, k, v)]
    parts = [x] + [t.flatten(2) for t in (q, k, v)] + ([gate] if gate is not None else [])
    out = state.apply_many(parts, sel)
    x, q, k, v = out[0], *(t.unflatten(2, s) for t, s in zip(out[1:4], shapes, strict=True))
    return x, q, k, v, (out[4] if gate is not None else None)


def _project(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[B, N, H, D]``, k and v ``[B, N, H_kv, D]`` through the attention's own
    projections and q/k norms, as ``EvaAttention`` / ``AttentionRope`` compute them."""
    b, n = x.shape[:2]
    if attn.qkv is not None:
        q, k, v = fused_projections(attn, x)
    else:
        heads_kv = getattr(attn, "num_kv_heads", attn.num_heads)
        q = attn.q_proj(x).reshape(b, n, attn.num_heads, -1)
        k = attn.k_proj(x).reshape(b, n, heads_kv, -1)
        v = attn.v_proj(x).reshape(b, n, heads_kv, -1)
    return attn.q_norm(q), attn.k_norm(k), v


def fused_projections(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, N, H, D]`` of a fused qkv with EVA's (or BEiT's) separate q/v bias, as
    timm's attention computes them (the bias added to the module's output, or passed to
    ``F.linear`` on its weight)."""
    b, n = x.shape[:2]
    bias = _eva_bias(attn)
    if bias is None or attn.qkv_bias_separate:
        qkv = attn.qkv(x)
        if bias is not None:
            qkv += bias
    else:
        qkv = F.linear(x, weight=attn.qkv.weight, bias=bias)
    return qkv.reshape(b, n, 3, attn.num_heads, -1).unbind(2)


def _eva_bias(attn: torch.nn.Module) -> torch.Tensor | None:
    """EVA's separate q/v bias for its fused qkv (zeros for k), or None."""
    if getattr(attn, "q_bias", None) is None:
        return None
    return torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))


def _projection(attn: torch.nn.Module, part: int, x: torch.Tensor, eva_bias: torch.Tensor | None
                ) -> torch.Tensor:
    """Queries (``part`` 0), keys (1) or values (2) ``[..., H or H_kv, D]`` of ``x``
    before the q/k norms: rows of a fused qkv (its own weight, with EVA's bias
    ``eva_bias`` from :func:`_eva_bias` where it has one) or the attention's own separate
    projection."""
    if attn.qkv is None:
        out = (attn.q_proj, attn.k_proj, attn.v_proj)[part](x)
    else:
        out = qkv_part(attn.qkv, part, x, eva_bias)
    return out.unflatten(-1, (-1, attn.head_dim))


def _rotate(attn: torch.nn.Module, t: torch.Tensor, rows: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    from timm.layers import apply_rot_embed_cat

    if rows is None:
        return t
    return apply_rot_embed_cat(t, rows, half=getattr(attn, "rotate_half", False)).type_as(like)


def _attend(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
            state: TokenState, prop_attn: bool, kernel: str) -> torch.Tensor:
    """The rest of the attention from its (rotated) projections: each image's attention
    over its own real tokens (key mask or packed per image), scale norm, gate, proj."""
    groups = attn.num_heads // k.shape[2]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    dropout = attn.attn_drop.p if attn.training else 0.0
    x = attn.norm(attention_of(q, k, v, state, prop_attn, attn.scale, dropout, kernel))
    if gate is not None:
        x = x * gate.sigmoid()
    return attn.proj_drop(attn.proj(x))


# ---------------------------------------------------------------------------- rotary rows
def _check_rope(rope: torch.Tensor | None) -> None:
    """One table for the whole grid (``[N, D]``, or ``[H, N, D]`` per head for mixed RoPE)."""
    if rope is not None and rope.dim() not in (2, 3):
        raise ValueError(
            f"saint got rotary embeddings of shape {tuple(rope.shape)} (per image: timm's patch dropout in "
            "training); a pruned Eva takes one table for the whole grid: set patch_drop_rate=0 or call model.eval()"
        )


def _module_rope(rope: torch.Tensor | None, state: TokenState, npt: int) -> torch.Tensor | None:
    """Per-image rows ``[B, 1 or H, N - npt, D]`` of the patch tokens of a rectangular or
    padded batch, as the module's attention takes them (it skips the prefix)."""
    if rope is None:
        return None
    return patch_table_rows(rope, state.positions[:, npt:], npt).transpose(1, 2)


def _token_rope(rope: torch.Tensor | None, positions: torch.Tensor, npt: int) -> torch.Tensor | None:
    """One row per token in the tokens' own layout ``[B, N, 1 or H, D]`` (packed: ``B =
    1``); prefix tokens get the identity rotation (sin 0, cos 1), which leaves them exactly
    as the module leaves them."""
    if rope is None:
        return None
    half = rope.shape[-1] // 2
    return patch_table_rows(rope, positions, npt, torch.cat([rope.new_zeros(half), rope.new_ones(half)]))


# ---------------------------------------------------------------------------- selection
def _context(handle: TimmPatch, run: Any, attn: torch.nn.Module, index: int, x: torch.Tensor,
             q_first: Callable[[], torch.Tensor], k: torch.Tensor, rotated_k: Callable[[], torch.Tensor]
             ) -> LayerContext:
    """What the selection sees, in the padded view: keys ``k`` after the k norm and before
    the rotation, averaged over heads; class-token attention of the first token's query
    ``q_first() [B, H, D]`` over ``rotated_k()`` (both lazy; the class token's query is
    never rotated)."""
    state = run.state
    prop = handle.config.size_bias

    def cls_attn() -> torch.Tensor:
        kr = rotated_k()
        groups = attn.num_heads // kr.shape[2]
        if groups > 1:
            kr = kr.repeat_interleave(groups, dim=2)
        return cls_attention(q_first(), kr, state, attn.scale, prop)

    return layer_context(handle, run, index, x, k, cls_attn)


def layer_context(handle: TimmPatch, run: Any, index: int, x: torch.Tensor, k: torch.Tensor,
                  cls_attn: Callable[[], torch.Tensor]) -> LayerContext:
    """The selection's view of block ``index`` (padded when the tokens are packed): the keys
    ``k [..., H, D]`` averaged over heads, the class token's attention ``cls_attn()`` (lazy,
    where the model protects a prefix), the tokens ``x`` (padded when asked for)."""
    state = run.state
    return LayerContext(
        keys=state.padded(head_mean(k)),
        num_protected=handle.num_protected,
        valid=state.valid,
        cls_attention=cls_attn if handle.num_protected > 0 else None,
        tokens=(lambda: state.padded(x)) if state.packed else x,
        layer=index,
    )


# ---------------------------------------------------------------------------- protocol
class EvaProbe(Probe):
    """Queries/keys of each block from its normed input (through the attention's own
    projections and q/k norms, before the rotation), hidden states at each block's output."""

    def __init__(self, model: torch.nn.Module, sites: list[Site]) -> None:
        self.sites = sites
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.has_cls = getattr(model, "cls_token", None) is not None

    def hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        return [self.sites[i].block.norm1.register_forward_hook(save_output(store, "normed"))]

    def qk(self, i: int, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = _project(self.sites[i].attn, store.pop("normed"))
        return q, k


class TimmEva(TimmViT):
    """timm ``Eva``: sites are ``model.blocks``; grid, protected prefix and embedding as
    for timm's ViT."""

    name = "timm_eva"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        out = []
        for i, blk in enumerate(model.blocks):
            attn = blk.attn
            heads = int(getattr(attn, "num_kv_heads", attn.num_heads))
            out.append(Site(i, f"blocks.{i}", blk, attn, heads, float(attn.scale)))
        return out

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        """Every linear layer of the block at its own width (fused or separate q/k/v, grouped
        key/value heads, gate, GELU or SwiGLU MLP) and the attention's two matmuls. Before
        attention the keys run on every entering token, and the queries, values and gate on
        the survivors where the projections split (else every token's q/k/v and gate)."""
        blk = model.blocks[0]
        attn = blk.attn
        before = select_at_of(model, select_at) == "attention"
        n_attn = n_out if before else n_in
        projections = sum(m.in_features * m.out_features for name, m in attn.named_children()
                          if isinstance(m, torch.nn.Linear) and name != "proj")
        keys = (attn.qkv.in_features * attn.qkv.out_features // 3 if attn.qkv is not None
                else attn.k_proj.in_features * attn.k_proj.out_features)
        on_survivors = projections - keys if before and _splits_projections(attn) else 0
        mlp = sum(m.in_features * m.out_features for m in blk.mlp.modules() if isinstance(m, torch.nn.Linear))
        width = attn.proj.in_features  # every head's width
        return (2 * n_in * (projections - on_survivors) + 2 * n_out * on_survivors
                + 2 * n_attn * attn.proj.in_features * attn.proj.out_features
                + 4 * n_attn * n_attn * width + 2 * n_out * mlp)

    def probe(self, model: torch.nn.Module) -> Probe:
        return EvaProbe(model, self.sites(model))


ADAPTER = TimmEva()

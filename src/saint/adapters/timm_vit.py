"""timm ``VisionTransformer`` family (ViT, DeiT incl. distilled, DeiT-III, MAE-style
average pooling, CLIP ViTs, DINOv2 with layer scale and registers).

Each block's ``forward`` is wrapped per instance: the block's own modules run in
the order timm runs them (attention through the model's SDPA/eager kernel), and
the selection is applied between the attention residual and the MLP, as in ToMe.
Keys are read by a forward hook on the block's ``attn.qkv``; nothing is
re-implemented. All prefix tokens (class, distillation, registers) are protected.
The wrappers find the handle through the module they wrap, and each call keeps its
own token state (:class:`saint.adapters.common.Runs`), so a deep copy is an
independent patched model, threads do not share state, and a block recomputed by
gradient checkpointing selects the same tokens.

Once a step leaves images with different token counts, the tokens travel as one
packed stream (``layout="packed"``, the default): norms, qkv, proj, MLP and layer
scale run on it as they are, and attention runs per image over its own tokens
(:func:`saint.core.packed_attention`, through the block's own ``qkv``, ``q_norm``,
``k_norm``, ``norm`` and ``proj``). ``layout="padded"`` pads and masks instead.

No padding leaks out. The last block hands back the padded view ``[B, M, C]`` with
NaN at padding (0 in grad mode: see :meth:`TokenState.leave`), so
``forward_features`` returns that and :func:`saint.token_mask` says which positions
are real; the model's pooling (``token``, ``avg``, ``max``,
``avgmax``, attention pooling) and ``forward`` give per-image results.
``forward_intermediates`` / ``get_intermediate_layers`` return NaN-padded tokens
likewise (``output_fmt="NLC"`` / ``reshape=False``; spatial maps need every patch and
are refused once a pruning block runs before the deepest one returned).
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..core import head_mean
from ..methods import LayerContext, MethodSpec, make_config, require_class_token, require_site
from .base import (
    FamilyAdapter,
    Grid,
    Probe,
    Site,
    TokenStateHandle,
    capture_for_selection,
    install_sites,
    mlp_width,
    remove_sites,
    save_output,
    select_at_of,
    vit_block_flops,
)
from .common import (
    SAINT_ATTR,
    SITE_ATTR,
    TokenState,
    attention_of,
    check_layout,
    check_static_counts,
    cls_attention,
    copies_stamp,
    drop_path_of,
    output_unshared,
)

POOLS_WITH_SIZES = ("token", "avg", "")


def _attention_pool_weighs_sizes(model: torch.nn.Module) -> bool:
    """Whether the model pools by timm's ``AttentionPoolLatent`` (``global_pool="map"``:
    SigLIP, Perception Encoder), which takes the additive key mask that weighs merged
    tokens by ``log(size)``, as the blocks attend (ToMe's proportional attention)."""
    from timm.layers import AttentionPoolLatent

    pool = getattr(model, "attn_pool", None)
    return type(pool) is AttentionPoolLatent and pool.pos_embed is None


def _timm_classes() -> tuple[type, type, type] | None:
    try:
        from timm.models.vision_transformer import Attention, Block, VisionTransformer
    except ImportError:  # timm not installed
        return None
    return VisionTransformer, Block, Attention


def matches(model: torch.nn.Module) -> bool:
    classes = _timm_classes()
    return classes is not None and isinstance(model, classes[0])


class TimmPatch(TokenStateHandle):
    """Everything a patched timm ViT carries: the ViT handle's fields (config, resolved
    per-block settings, the per-call token states in ``runs``, the hooks to remove on
    unpatch)."""


TOKENS_ATTR = "_saint_tokens"  # on the tokens forward_features returned: their call's TokenState


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
    layout: str = "packed", kernel: str = "auto", **kwargs: Any,
) -> TimmPatch:
    """Patch a timm VisionTransformer in place (see :func:`saint.patch`)."""
    _, block_cls, attn_cls = _timm_classes()  # type: ignore[misc]
    spec, config = begin_patch(model, method, layout, kernel, kwargs)
    blocks = list(model.blocks)
    check_blocks(blocks, lambda blk: type(blk) is block_cls and isinstance(blk.attn, attn_cls),
                 "timm ViT blocks (timm.models.vision_transformer.Block with Attention)")
    settings, num_protected = resolve_settings(model, spec, config)
    handle = TimmPatch(spec, config, settings, num_protected, trace=trace, kernel=kernel)
    pools = hasattr(model, "pool") and type(model).forward_head is _timm_classes()[0].forward_head  # type: ignore[index]
    return install(model, handle, _block_forward, _key_proj, layout, output_methods(model, pool=pools))


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    uninstall(model, OUTPUT_METHODS)


def begin_patch(model: torch.nn.Module, method: str | MethodSpec, layout: str, kernel: str,
                kwargs: dict[str, Any]) -> tuple[MethodSpec, Any]:
    """The method and its config, after the layout, kernel and site checks every timm model shares."""
    check_layout(layout, kernel)
    spec, config = make_config(method, **kwargs)
    require_site(spec, "vision", type(model).__name__)
    return spec, config


def check_blocks(blocks: list[torch.nn.Module], supported: Any, what: str) -> None:
    """A clear TypeError naming the first block that ``supported(block)`` rejects, and ``what`` saint supports."""
    for i, blk in enumerate(blocks):
        if not supported(blk):
            attn = getattr(blk, "attn", None)
            has = f"attn={type(attn).__name__}" if attn is not None else "no .attn"
            raise TypeError(f"block {i} is {type(blk).__name__} ({has}); saint supports {what}")


def resolve_settings(model: torch.nn.Module, spec: MethodSpec, config: Any,
                     has_class_token: bool | None = None) -> tuple[dict[int, dict[str, Any]], int]:
    """The per-block settings and the protected prefix of a timm model (ViT, Eva, NaFlexVit),
    after the checks they share: a class token where the method reads one (``model.cls_token``
    unless ``has_class_token`` says), a pooling that can weigh merged tokens, fixed counts
    that fit the default image size."""
    settings = config.resolve(len(model.blocks))
    num_protected = int(model.num_prefix_tokens)
    if has_class_token is None:
        has_class_token = getattr(model, "cls_token", None) is not None
    require_class_token(spec, config, has_class_token, type(model).__name__)
    pool = getattr(model, "global_pool", "token")
    attn_pool = getattr(model, "attn_pool", None)
    weighs = _attention_pool_weighs_sizes(model) if attn_pool is not None else pool in POOLS_WITH_SIZES
    if spec.merges and not weighs:
        raise ValueError(
            f"{spec.public_name} merges tokens, whose sizes global_pool={pool!r} cannot weigh; "
            f"use a model pooled by {POOLS_WITH_SIZES} or timm's attention pooling, or a method that drops tokens"
        )
    _check_static_counts(model, spec, settings, num_protected)
    return settings, num_protected


def install(model: torch.nn.Module, handle: TimmPatch, forward: Callable[..., Any],
            key_proj: Callable[[torch.nn.Module], torch.nn.Module] | None, layout: str,
            methods: dict[str, Callable[..., Any]], track_positions: bool = False) -> TimmPatch:
    """Finish patching a timm model: each of ``model.blocks`` gets the per-instance ``forward``
    (and its key projection a capture hook, where ``key_proj`` names one), the model its
    per-instance ``methods`` and the handle."""
    install_sites(handle, model, "blocks", forward, key_proj, layout, track_positions=track_positions)
    bind_methods(model, methods)
    model.__dict__[SAINT_ATTR] = handle
    return handle


def uninstall(model: torch.nn.Module, names: Any) -> None:
    """Undo :func:`install` (``names``: its methods): the blocks' and the model's own again."""
    handle = model.__dict__.pop(SAINT_ATTR)
    remove_sites(handle)
    unbind_methods(model, names)


def block_sites(model: torch.nn.Module) -> list[Site]:
    """A site per block of ``model.blocks``, with its attention's heads and scale."""
    return [Site(i, f"blocks.{i}", blk, blk.attn, int(blk.attn.num_heads), float(blk.attn.scale))
            for i, blk in enumerate(model.blocks)]


def bind_methods(model: torch.nn.Module, methods: dict[str, Callable[..., Any]]) -> None:
    """Give ``model`` the per-instance methods ``methods`` (name -> function of ``self``)."""
    for name, fn in methods.items():
        setattr(model, name, types.MethodType(fn, model))


def unbind_methods(model: torch.nn.Module, names: Any) -> None:
    """Remove the per-instance methods ``names`` (:func:`bind_methods`): the class's again."""
    for name in names:
        model.__dict__.pop(name, None)


OUTPUT_METHODS = ("pool", "forward_features", "forward_intermediates")  # what output_methods may give


def output_methods(model: torch.nn.Module, pool: bool) -> dict[str, Callable[..., Any]]:
    """The per-instance methods for per-image pooling (when ``pool``: the model's
    ``forward_head`` pools through ``self.pool``) and unpadded ``forward_intermediates``."""
    methods: dict[str, Callable[..., Any]] = {"pool": _pool, "forward_features": _forward_features} if pool else {}
    if hasattr(model, "forward_intermediates"):
        methods["forward_intermediates"] = _forward_intermediates
    return methods


def _key_proj(blk: torch.nn.Module) -> torch.nn.Module:
    return blk.attn.qkv


def _check_static_counts(model: torch.nn.Module, spec: MethodSpec, settings: dict, protected: int) -> None:
    """Reject a fixed-count schedule that cannot fit the model's default image size."""
    n = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if n is not None:
        check_static_counts(int(n), spec, settings, unit="block")


def _cls_attention_of(blk: torch.nn.Module, q_first: Callable[[], torch.Tensor], k: torch.Tensor,
                      state: TokenState, prop_attn: bool) -> Callable[[], torch.Tensor]:
    """The class token's attention over all tokens (padded view), averaged over heads
    (lazy): ``q_first()`` the class tokens' queries ``[B, C]``, ``k`` every token's keys
    in the state's layout (a packed stream's keys are never padded)."""

    def compute() -> torch.Tensor:
        attn = blk.attn
        h = attn.num_heads
        q = attn.q_norm(q_first().unflatten(-1, (h, attn.head_dim)))  # [B, H, D]
        return cls_attention(q, attn.k_norm(k.unflatten(-1, (h, attn.head_dim))), state, attn.scale, prop_attn)

    return compute


def _packed_attention(attn: torch.nn.Module, x: torch.Tensor, state: TokenState, prop_attn: bool,
                      kernel: str) -> torch.Tensor:
    """timm ``Attention`` on a packed stream ``[1, T, C]``: the module's own qkv, q/k norms,
    gate, norm, proj and dropouts around per-image attention."""
    gate = attn.gate(x) if getattr(attn, "gate", None) is not None else None
    return _attention_of_qkv(attn, attn.qkv(x), gate, state, prop_attn, kernel)


def _attention_of_qkv(attn: torch.nn.Module, qkv: torch.Tensor, gate: torch.Tensor | None, state: TokenState,
                      prop_attn: bool, kernel: str) -> torch.Tensor:
    """The rest of timm's ``Attention`` from its qkv projection ``[B, N, 3C]`` (or a packed
    ``[1, T, 3C]``) and gate logits: see :func:`_attention_of_projections`."""
    b, n = qkv.shape[:2]
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).unbind(2)
    return _attention_of_projections(attn, q, k, v, gate, state, prop_attn, kernel)


def _attention_of_projections(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              gate: torch.Tensor | None, state: TokenState, prop_attn: bool,
                              kernel: str) -> torch.Tensor:
    """The rest of timm's ``Attention`` from q, k, v ``[B, N, H, D]`` and gate logits:
    q/k norms, attention over each image's real tokens (the state's key mask or
    per-image packed attention), norm, gate, proj, dropouts."""
    dropout = attn.attn_drop.p if attn.training else 0.0
    x = attn.norm(attention_of(attn.q_norm(q), attn.k_norm(k), v, state, prop_attn, attn.scale, dropout, kernel))
    if gate is not None:
        x = x * gate.sigmoid()
    return attn.proj_drop(attn.proj(x))


def _block_forward(self: torch.nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False) -> torch.Tensor:
    """A block of a patched ViT: its own modules in timm's order, the selection between
    the attention residual and the MLP (per-instance ``forward``); packed tokens take
    per-image attention."""
    handle, index = self.__dict__[SITE_ATTR]
    run, x, settings = handle.enter_site(index, x)
    # a model whose input is padded (timm NaFlexVit) passes its padding mask, which the
    # state carries from the model's call on (a recomputed block, from its first state)
    if is_causal or (attn_mask is not None and not (run.recompute or handle.runs.takes_padding_mask())):
        raise ValueError("a pruned ViT cannot take attn_mask/is_causal; call the model without them")
    state = run.state
    prop_attn = handle.config.size_bias
    if state.packed or (settings is not None and handle.config.select_at == "attention"):
        handle.attention_from_parts(index)
    if settings is not None and handle.config.select_at == "attention":
        return handle.leave_site(index, run, _select_before_attention(self, handle, run, index, x, settings))
    if state.packed:
        x = x + drop_path_of(self.drop_path1, self.ls1(_packed_attention(self.attn, self.norm1(x), state, prop_attn,
                                                                         handle.kernel)), state)
    elif settings is None:
        x = type(self).forward(self, x, attn_mask=state.attn_bias(x.dtype, prop_attn))
    else:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=state.attn_bias(x.dtype, prop_attn))))
    if settings is not None:
        x = state.apply(x, handle.spec.select(_captured_context(handle, run, self, index, x), settings,
                                                  handle.config))
    if settings is not None or state.packed:
        x = x + drop_path_of(self.drop_path2, self.ls2(self.mlp(self.norm2(x))), state)
    return handle.leave_site(index, run, x)


def _select_before_attention(blk: torch.nn.Module, handle: TimmPatch, run: Any, index: int, x: torch.Tensor,
                             settings: dict[str, Any]) -> torch.Tensor:
    """A pruning block with ``select_at="attention"``: the selection reads the block's own
    keys, then the tokens are merged (size-weighted means of rows) or dropped, and
    attention, proj and MLP run on the survivors. Where the qkv projection is a plain
    ``nn.Linear`` that only saint watches, only its key rows run on every token and the
    queries and values are projected from the survivors' merged inputs (a merge is a mean
    with weights summing to 1, so it commutes with the projection); otherwise the whole
    projection runs on every token and its rows are merged with the tokens."""
    state, attn = run.state, blk.attn
    normed = blk.norm1(x)
    if not qkv_runs_in_parts(attn.qkv):
        return _select_after_qkv(blk, handle, run, index, x, normed, settings)
    k = qkv_part(attn.qkv, 1, normed)
    ctx = _context(handle, run, blk, index, x, k, lambda: qkv_part(attn.qkv, 0, state.first(normed)))
    sel = handle.spec.select(ctx, settings, handle.config)
    x, normed, k = state.apply_many([x, normed, k], sel, in_place=[False, output_unshared(blk.norm1),
                                                                   not torch.is_grad_enabled()])
    gate = attn.gate(normed) if getattr(attn, "gate", None) is not None else None
    heads = (attn.num_heads, attn.head_dim)
    q, k, v = (qkv_part(attn.qkv, 0, normed).unflatten(-1, heads), k.unflatten(-1, heads),
               qkv_part(attn.qkv, 2, normed).unflatten(-1, heads))
    x = x + drop_path_of(blk.drop_path1, blk.ls1(_attention_of_projections(attn, q, k, v, gate, state,
                                                                           handle.config.size_bias, handle.kernel)),
                         state)
    return x + drop_path_of(blk.drop_path2, blk.ls2(blk.mlp(blk.norm2(x))), state)


def qkv_splittable(qkv: torch.nn.Module) -> bool:
    """A plain ``nn.Linear``: its q, k and v rows can run as products on slices of its own
    weight (what the FLOPs model counts before attention)."""
    return type(qkv) is torch.nn.Linear


def qkv_runs_in_parts(qkv: torch.nn.Module) -> bool:
    """Whether a fused qkv projection may run in parts now: splittable, with no hook of
    its own but saint's key capture (a user's hook on it sees the whole projection it
    registered on; global module hooks, e.g. a FLOP counter's, see the modules that run)
    and no per-instance ``forward`` (accelerate's offload hook, a user's wrapper)."""
    return (qkv_splittable(qkv) and not qkv._forward_pre_hooks and "forward" not in qkv.__dict__
            and all(h is capture_for_selection for h in qkv._forward_hooks.values()))


def qkv_part(qkv: torch.nn.Linear, part: int, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Queries (``part`` 0), keys (1) or values (2) of ``x`` through a fused qkv's own
    weight rows, with ``bias`` (``[3C]``; default: the module's own) sliced alike."""
    c = qkv.out_features // 3
    bias = qkv.bias if bias is None else bias
    rows = slice(part * c, (part + 1) * c)
    return F.linear(x, qkv.weight[rows], None if bias is None else bias[rows])


def _select_after_qkv(blk: torch.nn.Module, handle: TimmPatch, run: Any, index: int, x: torch.Tensor,
                      normed: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    """``select_at="attention"`` through the module's whole qkv projection: its rows (and
    gate logits) are merged or dropped with the tokens."""
    state, attn = run.state, blk.attn
    qkv = attn.qkv(normed)  # the key hook captures it for the selection
    parts = [x, qkv] + ([attn.gate(normed)] if getattr(attn, "gate", None) is not None else [])
    sel = handle.spec.select(_captured_context(handle, run, blk, index, x), settings, handle.config)
    # the survivors' qkv rows are compacted inside the projection's own output when
    # nothing else reads it: a new tensor the size of the stream per block cost more than
    # the gather itself on a CPU (docs/packed.md)
    x, qkv, *gate = state.apply_many(parts, sel, in_place=[False, output_unshared(attn.qkv, saint_hooks=1)])
    x = x + drop_path_of(blk.drop_path1, blk.ls1(_attention_of_qkv(attn, qkv, gate[0] if gate else None, state,
                                                                   handle.config.size_bias, handle.kernel)), state)
    return x + drop_path_of(blk.drop_path2, blk.ls2(blk.mlp(blk.norm2(x))), state)


def _context(handle: TimmPatch, run: Any, blk: torch.nn.Module, index: int, x: torch.Tensor, k: torch.Tensor,
             q_first: Callable[[], torch.Tensor]) -> LayerContext:
    """What the selection sees, in the padded view when the tokens are packed: the keys
    ``k`` (``[..., C]``, before the k norm) averaged over heads before padding, the class
    token's attention from its query ``q_first()`` (lazy); the rest is padded only when asked for."""
    state, attn = run.state, blk.attn
    return LayerContext(
        keys=state.padded(head_mean(attn.k_norm(k.unflatten(-1, (attn.num_heads, attn.head_dim))))),
        num_protected=handle.num_protected,
        valid=state.valid,
        cls_attention=(_cls_attention_of(blk, q_first, k, state, handle.config.size_bias)
                       if handle.num_protected > 0 else None),
        tokens=(lambda: state.padded(x)) if state.packed else x,
        layer=index,
    )


def _captured_context(handle: TimmPatch, run: Any, blk: torch.nn.Module, index: int, x: torch.Tensor
                      ) -> LayerContext:
    """:func:`_context` from the qkv output the key hook captured in this block."""
    qkv = run.captured.pop(index)
    c = qkv.shape[-1] // 3
    return _context(handle, run, blk, index, x, qkv[..., c : 2 * c], lambda: run.state.first(qkv[..., :c]))


def _forward_features(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """timm's ``forward_features``, its tokens tagged with their call's state (see
    :func:`tag_tokens`)."""
    return tag_tokens(self, type(self).forward_features(self, *args, **kwargs))


def tag_tokens(model: torch.nn.Module, out: Any) -> Any:
    """Tag the tokens of a ``forward_features`` output (a tensor, or NaFlex's dict) with
    the state of the call that made them, so that pooling them later (``forward_head``)
    uses that call's padding and merged sizes, whatever ran since."""
    tokens = out.get("patches") if isinstance(out, dict) else out
    if isinstance(tokens, torch.Tensor):
        state = model.__dict__[SAINT_ATTR].state
        setattr(tokens, TOKENS_ATTR, state)
        state.stamp = tokens[..., 0].detach().clone()  # [B, N]: tells a copy of these tokens from other tokens
    return out


def state_of_tokens(model: torch.nn.Module, x: torch.Tensor) -> TokenState:
    """The state of the call whose ``forward_features`` returned ``x`` (its tag), else
    (a copy: detached, cloned, cast) the last call's, if ``x`` is a copy of that call's
    output (its first channel, value for value) and fits it: its shape, no NaN at its real
    tokens, and NaN or 0 (autograd's padding) at its padding. During a forward (nothing
    returned yet) the fit alone decides."""
    state = getattr(x, TOKENS_ATTR, None)
    if state is not None:
        return state
    state = model.__dict__[SAINT_ATTR].state
    if state.stamp is not None and not copies_stamp(x, state.stamp):
        raise ValueError(
            "pool got tokens that are not the patched model's last output nor a copy of it (another batch "
            "ran since, or they were changed); pool the tensor forward_features returned (it remembers its own "
            "call), or split tokens with saint.per_image"
        )
    if state.valid is not None:
        shape = tuple(state.valid.shape)
    elif state.sizes is not None:
        shape = tuple(state.sizes.shape[:2])
    else:
        return state  # every token real and whole: nothing to fit
    fits = tuple(x.shape[:2]) == shape
    if fits and state.valid is not None:
        first = x[..., 0].detach()
        nan = torch.isnan(first)
        fits = not bool((nan & state.valid).any()) and bool((nan | (first == 0) | state.valid).all())
    if not fits:
        raise ValueError(
            f"pool got tokens {tuple(x.shape[:2])} that are not the patched model's last output "
            f"({shape}{', NaN at its padding' if state.valid is not None else ''}); pool the tensor "
            "forward_features returned (it remembers its own call), or split tokens with saint.per_image"
        )
    return state


def _pool(self: torch.nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """timm's pooling, per image: padding (NaN after packing) never enters it, and
    merged tokens count with their sizes (an average, or the attention pooling)."""
    return pool_per_image(self, x, pool_type, lambda t, pool: type(self).pool(self, t, pool))


def pool_per_image(model: torch.nn.Module, x: torch.Tensor, pool_type: str | None,
                   own: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
    """A timm model's pooling of the patched forward's tokens ``x``: ``own(tokens, pool_type)``
    (the model's pooling) on all of them when every token is real and whole, else on each
    image's real tokens; after merging the size-weighted mean (``avg``) or the attention
    pooling with ``log(size)`` on merged keys."""
    state = state_of_tokens(model, x)
    pool_type = model.global_pool if pool_type is None else pool_type
    if state.valid is None and state.sizes is None:
        return own(x, pool_type)
    if model.attn_pool is None and pool_type in ("token", ""):
        return own(x, pool_type)
    if state.sizes is not None:
        if model.attn_pool is not None:  # one that weighs sizes: resolve_settings refused the others
            return _attention_pool(model, x, state)
        if pool_type != "avg":
            raise ValueError(f"global_pool={pool_type!r} cannot weigh merged tokens; use 'avg' or 'token'")
        return _weighted_mean(model, x, state)
    counts = state.valid.sum(dim=1).tolist()
    return torch.cat([own(x[i : i + 1, :n], pool_type) for i, n in enumerate(counts)])


def _attention_pool(model: torch.nn.Module, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """timm's attention pooling (its own module) per image over its real tokens, merged
    keys biased by ``log(size)`` when the method attends proportionally (as the blocks
    did); prefix tokens enter where the model's own pooling lets them (ViT and NaFlexVit:
    ``pool_include_prefix``; Eva: always)."""
    start = 0 if getattr(model, "pool_include_prefix", True) else model.num_prefix_tokens
    bias = state.attn_bias(x.dtype, model.__dict__[SAINT_ATTR].config.size_bias)
    if state.valid is None:
        return model.attn_pool(x[:, start:], attn_mask=None if bias is None else bias[..., start:])
    counts = state.valid.sum(dim=1).tolist()
    return torch.cat([model.attn_pool(x[i : i + 1, start:n], attn_mask=None if bias is None else bias[i : i + 1, ..., start:n])
                      for i, n in enumerate(counts)])


def _weighted_mean(model: torch.nn.Module, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """Average of the real tokens, each weighted by its size (ToMe); zeros for an image
    without one (a NaFlex image with no valid patch), as timm's NaFlex pooling gives."""
    start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
    w = torch.ones(x.shape[:2] + (1,), dtype=x.dtype, device=x.device)
    if state.sizes is not None:
        w = state.sizes.to(x.dtype)
    if state.valid is not None:
        w = w * state.valid[..., None].to(x.dtype)
        x = x.masked_fill(~state.valid[..., None], 0.0)
    w = w[:, start:]
    return (x[:, start:] * w).sum(1) / w.sum(1).clamp(min=1)


def maps_unmerge(handle: TokenStateHandle, deepest: int, flat_call: str) -> bool:
    """Whether spatial maps of the blocks up to ``deepest`` need every block's output unmerged
    (a merging method prunes before it returns); a dropping method that does is refused
    (a dropped patch has no row), naming ``flat_call``, the call that returns tokens instead."""
    pruned = [i for i in handle.settings if i <= deepest]
    if pruned and not handle.spec.merges:
        raise ValueError(
            f"spatial (NCHW) intermediates need every patch, but block {pruned[0]} drops tokens before block "
            f"{deepest} returns; use a merging method (tome, saint_match, saint_plus or saint_fold: each patch "
            f"then holds the token it became), or {flat_call} and saint.token_mask(model, block) for the real tokens"
        )
    return bool(pruned)


def _forward_intermediates(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """timm's ``forward_intermediates`` with every block's output unpadded (NaN at
    padding; :func:`saint.token_mask` gives the real positions). Spatial (NCHW) maps need
    a row for every patch: with a merging method every block's output then leaves
    unmerged (each patch the row of the token it became, as a backbone's,
    :meth:`~saint.adapters.common.TokenState.unmerge`); a dropping method is refused once
    it prunes before the deepest block returned."""
    handle = self.__dict__[SAINT_ATTR]
    bound = inspect.signature(type(self).forward_intermediates).bind(self, *args, **kwargs)
    bound.apply_defaults()
    unmerge = False
    if bound.arguments.get("output_fmt") == "NCHW":
        from timm.models._features import feature_take_indices

        _, deepest = feature_take_indices(len(self.blocks), bound.arguments.get("indices"))
        unmerge = maps_unmerge(handle, deepest, "output_fmt='NLC' (get_intermediate_layers: reshape=False)")
    with handle.runs.unmerging() if unmerge else handle.runs.unpadding():
        out = type(self).forward_intermediates(self, *args, **kwargs)
    if isinstance(out, tuple):  # (final tokens, intermediates): the final ones may go to forward_head
        if unmerge:  # one row per patch, every row real: pooled as they are (a plain mean is the size-weighted one)
            setattr(out[0], TOKENS_ATTR, TokenState())
        else:
            tag_tokens(self, out[0])
    return out


# ---------------------------------------------------------------------------- protocol
class TimmProbe(Probe):
    """Queries/keys at each block's fused ``attn.qkv`` (after q/k norm), hidden states
    at each block's output."""

    def __init__(self, model: torch.nn.Module, sites: list[Site]) -> None:
        self.sites = sites
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.has_cls = getattr(model, "cls_token", None) is not None

    def hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        return [self.sites[i].attn.qkv.register_forward_hook(save_output(store, "qkv"))]

    def qk(self, i: int, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.sites[i].attn
        qkv = store.pop("qkv")
        b, n, c3 = qkv.shape
        h = self.sites[i].heads
        q, k, _ = qkv.reshape(b, n, 3, h, c3 // (3 * h)).unbind(2)
        q_norm, k_norm = (getattr(attn, name, None) for name in ("q_norm", "k_norm"))  # CaiT's attention has none
        return q if q_norm is None else q_norm(q), k if k_norm is None else k_norm(k)


class TimmViT(FamilyAdapter):
    """timm ``VisionTransformer``: sites are ``model.blocks``."""

    name = "timm_vit"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        out = []
        for i, blk in enumerate(model.blocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(getattr(attn, "qkv", None), torch.nn.Linear) or not hasattr(attn, "num_heads"):
                raise TypeError(
                    f"block {i} ({type(blk).__name__}) has no fused attn.qkv projection; "
                    "saint supports timm ViT blocks with Attention(qkv)"
                )
            out.append(Site(i, f"blocks.{i}", blk, attn, int(attn.num_heads), float(attn.scale)))
        return out

    def protected(self, model: torch.nn.Module) -> int:
        return int(getattr(model, "num_prefix_tokens", 0))

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        """The configured grid, or that of ``inputs`` when the model takes any size
        (``dynamic_img_size``; with ``dynamic_img_pad`` the image is padded to whole patches)."""
        pe = model.patch_embed
        ph, pw = (int(v) for v in pe.patch_size)
        if inputs is None or not getattr(model, "dynamic_img_size", False):
            gh, gw = (int(v) for v in pe.grid_size)
        elif getattr(pe, "dynamic_img_pad", False):
            gh, gw = -(-int(inputs.shape[-2]) // ph), -(-int(inputs.shape[-1]) // pw)
        else:
            gh, gw = int(inputs.shape[-2]) // ph, int(inputs.shape[-1]) // pw
        return Grid(gh, gw, (ph, pw))

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        """Before attention the key rows of a plain ``nn.Linear`` qkv run on every token and
        its query/value rows on the survivors (a user's hook on qkv, which makes the block
        project every token in full, is not counted); any other qkv runs whole on every token."""
        blk = model.blocks[0]
        dim = blk.norm1.normalized_shape[0]
        return vit_block_flops(n_in, n_out, dim, mlp_width(blk.mlp, dim),
                               select_at_of(model, select_at), keys_first=qkv_splittable(blk.attn.qkv))

    def probe(self, model: torch.nn.Module) -> Probe:
        return TimmProbe(model, self.sites(model))



    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        emb = model.forward_head(model.forward_features(inputs), pre_logits=True)
        if int(getattr(model, "num_classes", 0) or 0) <= 0:
            return emb, None
        return emb, model.get_classifier()(emb)


ADAPTER = TimmViT()

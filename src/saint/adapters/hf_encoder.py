"""What the Hugging Face vision encoders share (CLIP/SigLIP towers, DINOv2): a pre-norm
encoder layer run with its own modules and a selection between the attention residual
and the MLP (or before attention), packed per-image attention through the layer's own
q/k/v/out projections, and the tower forward that unpads ``hidden_states``.

A family describes its layers with :class:`LayerParts` (which module is the first norm,
the attention, each projection, the layer scales ...); everything here reads only that,
so a new HF encoder family is a small module that says where its parts are.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core import head_mean
from ..methods import (
    LayerContext,
    MethodConfig,
    MethodSpec,
    Selection,
    make_config,
    require_class_token,
    require_merging,
    require_site,
)
from . import hf_llm, hf_mean_head
from .base import (
    FamilyAdapter,
    Probe,
    Site,
    TokenStateHandle,
    install_sites,
    refuse_foreign_forwards,
    remove_sites,
    save_output,
)
from .common import (
    MASKABLE_ATTENTION,
    SAINT_ATTR,
    SITE_ATTR,
    Hooked,
    TokenState,
    attention_of,
    check_layout,
    check_static_counts,
    cls_attention,
    drop_path_of,
    get_handle,
    output_unshared,
    patch_table_rows,
)
from .pair_bias import check_pair_kernel, first_token_attention, pair_attention


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class LayerParts:
    """Where a pre-norm encoder layer keeps its parts: ``x + drop_path(ls1(attn(norm1(x))))``
    then ``x + drop_path(ls2(mlp(norm2(x))))``. ``attn`` is called as HF calls it
    (``attn(hidden_states=..., attention_mask=...)`` returning ``(out, weights)``); ``q``,
    ``k``, ``v``, ``out`` are its projections. CLIP/SigLIP have no layer scale or drop path.
    ``own_attention``: the attention module cannot take saint's key mask (DPT's passes
    none), so wherever a layer needs one, or selects, saint runs q/k/v/out itself."""

    norm1: torch.nn.Module
    attn: torch.nn.Module
    q: torch.nn.Module
    k: torch.nn.Module
    v: torch.nn.Module
    out: Callable[[torch.Tensor], torch.Tensor]
    heads: int
    head_dim: int
    scale: float
    dropout: float
    norm2: torch.nn.Module
    mlp: Callable[[torch.Tensor], torch.Tensor]
    ls1: Callable[[torch.Tensor], torch.Tensor] = _identity
    ls2: Callable[[torch.Tensor], torch.Tensor] = _identity
    drop_path: Callable[[torch.Tensor], torch.Tensor] = _identity
    rotate_half: Callable[[torch.Tensor], torch.Tensor] | None = None  # rotary families (DINOv3): the model's own
    # rotary by each token's original index (V-JEPA 2): ``rotary(t [B, N, H, D], positions [B, N])``,
    # through the attention's own functions; the layer's own forward takes the positions second
    rotary: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # a bias per pair of tokens (BEiT's relative position bias): ``pair_bias(attention_mask, kwargs)``,
    # from what the layer's forward got, over the full grid ``[1, H, N0, N0]`` (:mod:`pair_bias`)
    pair_bias: Callable[[torch.Tensor | None, dict[str, Any]], torch.Tensor] | None = None
    # a fused projection whose output is ``[q | k | v]`` (BLIP-2): saint's attention calls it once, its
    # keys are captured from it, and ``q`` / ``k`` / ``v`` are its thirds (:func:`fused_part`, no hook)
    qkv: torch.nn.Module | None = None
    own_attention: bool = False
    # with ``own_attention``: the attention module's own output on every token of a batch that needs no
    # mask (nothing removed yet), where its kernel is not SDPA (BLIP's eager products), so that a layer
    # that selects and removes nothing gives the unpatched answer bit for bit
    own_attend: Callable[[torch.Tensor], torch.Tensor] | None = None
    branch_first: bool = False  # the layer adds its residual as ``branch + x`` (transformers' older ViT layout)
    # the layer's second positional argument is no mask and unused (a single-expert ViTPose's dataset_index)
    second_argument_unused: bool = False
    returns_tuple: bool = False  # the layer returns ``(hidden_states, attention weights)`` (V-JEPA 2)


Rows = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) per token, [..., N, 1, D]


def _token_rows(pe: Rows | None, positions: torch.Tensor, npt: int) -> Rows | None:
    """The rotary ``(cos, sin)`` rows of every token, ``[..., N, 1, D]``; prefix tokens get
    the identity (cos 1, sin 0), which leaves them exactly as the model leaves them."""
    if pe is None:
        return None
    return patch_table_rows(pe[0], positions, npt, 1.0), patch_table_rows(pe[1], positions, npt, 0.0)


def _module_rows(pe: Rows | None, state: TokenState, npt: int) -> Rows | None:
    """What the model's own attention takes for a rectangular or padded batch: the grid's
    table before any step removed a token, else each image's patch rows ``[B, 1, N - npt, D]``."""
    if pe is None or state.positions is None:
        return pe
    patches = state.positions[:, npt:]
    return patch_table_rows(pe[0], patches, npt).transpose(1, 2), patch_table_rows(pe[1], patches, npt).transpose(1, 2)


def _rows_of(p: LayerParts, pe: Rows | None, state: TokenState, x: torch.Tensor, npt: int) -> Any:
    """What :func:`_rotate` rotates ``x``'s tokens by: the rotary table's rows of each token
    (DINOv3), each token's original index (V-JEPA 2's rotation reads it), else None."""
    if p.rotary is not None:
        return state.positions_of(x)[..., 0].expand(x.shape[0], -1)  # [B, N]
    return _token_rows(pe, state.positions_of(x), npt)


def _rotate(p: LayerParts, t: torch.Tensor, rows: Any) -> torch.Tensor:
    """``t [..., N, H, D]`` rotated by per-token rows (:func:`_rows_of`), as the model rotates
    its patches."""
    if rows is None:
        return t
    if p.rotary is not None:
        return p.rotary(t, rows)
    return t * rows[0] + p.rotate_half(t) * rows[1]  # type: ignore[misc]


@dataclass
class HFEncoderPatch(TokenStateHandle):
    """Everything a patched HF vision encoder carries: the ViT handle's fields (config,
    resolved per-layer settings, per-call token states, hooks), the tower, how to find a
    layer's parts, and the validity of every layer's output in the last forward."""

    tower: torch.nn.Module | None = None
    parts: Callable[[torch.nn.Module], LayerParts] | None = None
    own_attention: bool = False  # the layers' LayerParts.own_attention

    @property
    def depth(self) -> int:
        return len(self.block_names)

    def hidden_state_valid(self, index: int) -> torch.Tensor | None:
        """Validity ``[B, M]`` of ``hidden_states[index]`` of the last forward (HF
        indexing: 0 = embeddings, ``i + 1`` = output of layer ``i``, negatives from the
        end); None when every position is real."""
        n = self.depth + 1
        if not -n <= index < n:
            raise IndexError(f"hidden state index {index} out of range: the tower has {n} hidden states")
        index %= n
        run = self.runs.current()
        if index == 0:  # the embeddings: padded only where the input was (Siglip2)
            return None if run is None else run.input_valid
        ran = 0 if run is None else len(run.layer_valid)
        if ran < index:
            raise RuntimeError(f"layer {index - 1} did not run in the last forward ({ran} layers ran); call the model first")
        return run.layer_valid[index - 1]


def patch_encoder(
    tower: torch.nn.Module, layers: list[torch.nn.Module], prefix: str, layer_cls: type, attn_cls: type,
    parts: Callable[[torch.nn.Module], LayerParts], num_protected: int, num_patches: int,
    method: str | MethodSpec, method_settings: dict[str, Any], trace: bool, layout: str, kernel: str,
    dense: bool = False, block_forward: Callable[..., Any] | None = None, hf_tower: bool = True,
) -> HFEncoderPatch:
    """Patch an HF encoder in place: check that every layer is ``layer_cls`` with an
    ``attn_cls`` attention and wrapped by no one else, resolve ``method`` with its
    ``method_settings`` against the tower (class token, maskable attention, fixed counts
    that fit ``num_patches``), wrap each layer's forward and the tower's, and store the
    handle on the tower. ``dense``: the tower is a backbone whose outputs lie on the input's
    grid (feature maps): only merging methods, and every layer's output leaves unmerged
    (:func:`backbone_forward`). Another library's encoder of the same shape (open_clip's)
    gives its layers' own ``block_forward`` (which calls :func:`layer_forward`) and
    ``hf_tower=False``: its tower keeps its own forward."""
    check_layout(layout, kernel)
    if get_handle(tower) is not None:
        raise ValueError(f"{type(tower).__name__} is already patched by saint; unpatch it first")
    for i, layer in enumerate(layers):
        attn = parts(layer).attn if type(layer) is layer_cls else None
        if type(attn) is not attn_cls:
            raise TypeError(f"encoder layer {i} is {type(layer).__name__} with {type(attn).__name__}; "
                            f"saint supports {layer_cls.__name__} with {attn_cls.__name__}")
    refuse_foreign_forwards({type(tower).__name__: tower})
    spec, config = make_config(method, **method_settings)
    require_site(spec, "vision", type(tower).__name__)
    settings = config.resolve(len(layers))
    require_class_token(spec, config, num_protected > 0, type(tower).__name__)
    if dense:
        require_merging(spec, f"{type(tower).__name__}'s feature maps")
    first = parts(layers[0]) if layers else None
    if first is not None and first.pair_bias is not None:
        check_pair_kernel(kernel)
    own_attention = first is not None and first.own_attention
    if not own_attention:  # saint's own attention takes any mask
        check_maskable(tower, spec, config, layout)
    check_static_counts(num_patches, spec, settings, unit="layer")
    handle = HFEncoderPatch(spec, config, settings, num_protected, trace=trace, kernel=kernel, tower=tower,
                            parts=parts, own_attention=own_attention)
    # tokens keep their original index for rotations and pair biases
    rotary = first is not None and (first.rotate_half is not None or first.rotary is not None
                                    or first.pair_bias is not None)
    install_sites(handle, tower, prefix, block_forward or layer_forward, _key_proj(parts), layout,
                  track_positions=rotary)
    if hf_tower:
        tower.forward = types.MethodType(backbone_forward if dense else tower_forward, tower)
    tower.__dict__[SAINT_ATTR] = handle
    return handle


def unpatch_encoder(tower: torch.nn.Module) -> HFEncoderPatch:
    """Undo :func:`patch_encoder`: the layers', the tower's and its pooling head's own
    forward, no hooks."""
    handle = tower.__dict__.pop(SAINT_ATTR, None)
    if handle is None:
        raise ValueError(f"{type(tower).__name__} is not patched by saint")
    remove_sites(handle)
    tower.__dict__.pop("forward", None)
    return handle


@dataclass(frozen=True)
class TowerClasses:
    """Where a transformers vision family keeps its classes: the tower, the dual encoder
    that holds it as ``vision_model``, its encoder layer, attention and pooling head, and
    the image classifier that holds it as ``vision_model`` (if the family has one)."""

    module: str
    tower: str
    dual: str
    layer: str
    attn: str
    head: str
    classifier: str | None = None

    def _wrappers(self, m: Any) -> tuple[type, ...]:
        return (getattr(m, self.dual), *(() if self.classifier is None else (getattr(m, self.classifier),)))

    def _module(self) -> Any:
        try:
            return importlib.import_module(self.module)
        except ImportError:  # transformers not installed, or too old for this family
            return None

    def matches(self, model: torch.nn.Module) -> bool:
        """True for the tower and the dual encoder (never imports transformers itself)."""
        if sys.modules.get("transformers") is None:  # a transformers model implies it is imported
            return False
        m = self._module()
        return m is not None and isinstance(model, (getattr(m, self.tower), *self._wrappers(m)))

    def tower_of(self, model: torch.nn.Module) -> torch.nn.Module:
        m = self._module()
        return model.vision_model if m is not None and isinstance(model, self._wrappers(m)) else model

    def patch(self, model: torch.nn.Module, parts: Callable[[torch.nn.Module], LayerParts], num_protected: int,
              num_patches: int, head_forward: Callable[..., Any], method: str | MethodSpec,
              method_settings: dict[str, Any], trace: bool, layout: str, kernel: str) -> HFEncoderPatch:
        """Patch the tower of ``model`` (:func:`patch_encoder`), its pooling head if it uses
        one (``head_forward``), and mark a dual encoder patched through it."""
        m = self._module()
        tower = self.tower_of(model)
        head = tower.head if getattr(tower, "use_head", False) else None
        if head is not None and type(head) is not getattr(m, self.head):
            raise TypeError(f"unsupported pooling head {type(head).__name__}; saint supports {self.head}")
        refuse_foreign_forwards({f"{type(tower).__name__}'s pooling head": head})
        handle = patch_encoder(tower, list(tower.encoder.layers), "encoder.layers", getattr(m, self.layer),
                               getattr(m, self.attn), parts, num_protected, num_patches, method, method_settings,
                               trace, layout, kernel)
        attach_head(handle, head, head_forward)
        return patched_through(model, tower, handle)


def attach_head(handle: HFEncoderPatch, head: torch.nn.Module | None, forward: Callable[..., Any],
                find: Callable[[torch.nn.Module], torch.nn.Module | None] | None = None, what: str = "pooling head"
                ) -> None:
    """Give a tower's pooling head (if any; ``find(tower)`` is where the tower keeps it,
    default its ``head``) its per-instance ``forward``, which runs per image over the real
    tokens of the handle's last call; recorded with the handle's other installed modules
    (checked every call, undone by :func:`unpatch_encoder`)."""
    if head is not None:
        head.__dict__[SITE_ATTR] = (handle, None)
        head.forward = types.MethodType(forward, head)
        handle.hooked.append(Hooked(handle.tower, find or _pooling_head, head, f"{type(handle.tower).__name__}'s {what}"))


def _pooling_head(tower: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(tower, "head", None)


def patched_through(model: torch.nn.Module, tower: torch.nn.Module, handle: HFEncoderPatch) -> HFEncoderPatch:
    """Mark ``model``, a wrapper holding the patched ``tower`` (a dual encoder, a tower
    with a projection, a classifier), as patched with the tower's handle, a classifier that
    averages the tower's tokens reading each image's real ones (:mod:`hf_mean_head`); a
    tower patched alone as is."""
    if tower is not model:
        model.__dict__[SAINT_ATTR] = handle
        handle.patched_through(tower, model)
        hf_mean_head.install(model, tower, handle)
    return handle


def unpatch_tower_of(model: torch.nn.Module) -> HFEncoderPatch:
    """Undo a tower patch made through ``model`` (the tower itself or a wrapper): the
    wrapper's mark and its classifier's pooling, then the layers', the tower's and its
    head's wrappers (:func:`saint.unpatch` refuses a wrapper's tower on its own first)."""
    handle = get_handle(model)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by saint")
    if handle.tower is not model:
        model.__dict__.pop(SAINT_ATTR)
        hf_mean_head.uninstall(model)
    return unpatch_encoder(handle.tower)


def pool_per_image(head: torch.nn.Module, hidden: torch.Tensor,
                   pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   own: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A wrapped pooling head's output: ``own()`` (the model's call) when every token of the
    tower's last call is real and whole, else ``pool(tokens, key bias)`` per image over its
    real tokens (padding, NaN when packed, never reaches the head's matmuls), merged keys
    biased by ``log(size)``."""
    handle = head.__dict__[SITE_ATTR][0]
    state = handle.state
    bias = state.attn_bias(hidden.dtype, handle.config.size_bias)
    if bias is None:
        return own()
    bias = bias[:, 0, 0, :]
    if bias.shape != hidden.shape[:2]:
        raise ValueError(
            f"the pooling head got {tuple(hidden.shape[:2])} tokens but the tower's last forward "
            f"produced {tuple(bias.shape)}; call the head only through the patched model"
        )
    if state.valid is None:
        return pool(hidden, bias)
    counts = state.valid.sum(dim=1).tolist()
    return torch.cat([pool(hidden[i : i + 1, :n], bias[i : i + 1, :n]) for i, n in enumerate(counts)])


def encoder_sites(layers: list[torch.nn.Module], prefix: str, parts: Callable[[torch.nn.Module], LayerParts]
                  ) -> list[Site]:
    """The protocol's sites of an encoder's layers, read through the family's parts."""
    return [Site(i, f"{prefix}.{i}", layer, (p := parts(layer)).attn, p.heads, p.scale) for i, layer in enumerate(layers)]


def _key_proj(parts: Callable[[torch.nn.Module], LayerParts]) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """The layer's key projection (or its fused q/k/v projection), where the selection's keys are captured."""
    return lambda layer: _key_module(parts(layer))


def _key_module(p: LayerParts) -> torch.nn.Module:
    return p.k if p.qkv is None else p.qkv


def _keys(p: LayerParts, captured: torch.Tensor) -> torch.Tensor:
    """The keys ``[B, N, C]`` in what the key capture hook kept (a fused projection's middle third)."""
    return captured if p.qkv is None else captured.chunk(3, dim=-1)[1]


def fused_part(qkv: torch.nn.Linear, part: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Queries (0), keys (1) or values (2) of a fused ``[q | k | v]`` linear projection, through
    its own weight and bias rows (without calling the module: its hooks see its own calls)."""
    c = qkv.out_features // 3
    rows = slice(part * c, (part + 1) * c)

    def project(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])

    return project


def needs_mask(spec: MethodSpec, config: MethodConfig, layout: str) -> bool:
    """Whether the model's own attention may get a key mask: padded ragged sequences,
    or merged tokens' size bias."""
    padded = layout == "padded" and config.pads
    return padded or (spec.merges and config.size_bias)


def check_maskable(tower: torch.nn.Module, spec: MethodSpec, config: MethodConfig, layout: str) -> None:
    """Refuse a method that passes a key mask to an attention implementation that cannot take one."""
    if needs_mask(spec, config, layout):
        impl = tower.config._attn_implementation
        if impl not in MASKABLE_ATTENTION:
            raise ValueError(
                f"{spec.public_name} with these settings passes a key mask to attention, which "
                f"attn_implementation={impl!r} cannot take; load the model with attn_implementation='sdpa' or 'eager'"
            )


def _merges_nothing(plan: Any) -> bool:
    """True for a merge plan that moves no token (empty, or every pair inactive)."""
    active = getattr(plan, "active", None)
    return plan.src.numel() == 0 or (active is not None and not bool(active.any()))


def mean_heads(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, H*D]`` key projection -> keys averaged over heads ``[B, N, D]``."""
    b, n, c = k.shape
    return head_mean(k.reshape(b, n, num_heads, c // num_heads))


def _cls_attention(p: LayerParts, normed: torch.Tensor, k_packed: torch.Tensor, state: TokenState, prop_attn: bool,
                   rows: Any = None, pair: torch.Tensor | None = None):
    """The class token's attention over all tokens (padded view), averaged over heads
    (lazy; only the class token's query is projected; keys rotated by ``rows``)."""

    def compute() -> torch.Tensor:
        first = state.first(normed)[:, None]
        c = k_packed.shape[-1]
        k = _rotate(p, k_packed.unflatten(-1, (p.heads, c // p.heads)), rows)
        q = p.q(first).reshape(first.shape[0], p.heads, c // p.heads)
        if pair is not None:
            return first_token_attention(q, k, state, prop_attn, p.scale, pair)
        return cls_attention(q, k, state, p.scale, prop_attn)

    return compute


def _dropout(p: LayerParts) -> float:
    return p.dropout if p.attn.training else 0.0


def _parts_attention(p: LayerParts, x: torch.Tensor, state: TokenState, prop_attn: bool, kernel: str,
                     rows: Any = None, pair: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's attention on ``x`` (a packed stream ``[1, T, C]``, or a batch): its own
    q/k/v/out projections (q and k rotated by ``rows``) around attention over each image's
    real tokens (:func:`~saint.adapters.common.attention_of`)."""
    b, n = x.shape[:2]
    qkv = (p.q(x), p.k(x), p.v(x)) if p.qkv is None else p.qkv(x).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, p.heads, p.head_dim) for t in qkv)
    q, k = _rotate(p, q, rows), _rotate(p, k, rows)
    return p.out(_attend(p, q, k, v, state, prop_attn, kernel, pair))


def _attend(p: LayerParts, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: TokenState, prop_attn: bool,
            kernel: str, pair: torch.Tensor | None) -> torch.Tensor:
    """Attention over each image's real tokens, ``[B, N, H, D]`` -> ``[B, N, H*D]``, biased
    by the layer's pair bias (BEiT) where it has one."""
    if pair is None:
        return attention_of(q, k, v, state, prop_attn, p.scale, _dropout(p), kernel)
    return pair_attention(q, k, v, state, prop_attn, p.scale, _dropout(p), pair, kernel)


def layer_forward(self: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  **kwargs: Any) -> torch.Tensor:
    """An encoder layer of a patched tower (per-instance ``forward``): its own modules in
    HF order, the selection between the attention residual and the MLP (or before the
    attention with ``select_at="attention"``); packed tokens take per-image attention."""
    handle, index = self.__dict__[SITE_ATTR]
    run, hidden_states, settings = handle.enter_site(index, hidden_states)
    p = handle.parts(self)
    if p.second_argument_unused:
        attention_mask = None
    # BEiT's is its relative position bias; a tower whose input is padded (Siglip2) passes its
    # padding mask, which the state carries from the tower's call on (a recomputed layer, from its first state)
    if (attention_mask is not None and p.pair_bias is None
            and not (run.recompute or handle.runs.takes_padding_mask())):
        raise ValueError("a pruned vision tower cannot take an attention_mask; call the model without one")
    state = run.state
    prop_attn = handle.config.size_bias
    pe = kwargs.pop("position_embeddings", None)  # rotary families: the grid's (cos, sin)
    if pe is not None:
        kwargs["position_embeddings"] = _module_rows(pe, state, handle.num_protected)
    if settings is not None and handle.config.select_at == "attention":
        handle.attention_from_parts(index)
        pair = None if p.pair_bias is None else p.pair_bias(attention_mask, kwargs)
        x = handle.leave_site(index, run, _select_before_attention(p, handle, run, index, hidden_states, settings, pe,
                                                                   pair))
        return (x, None) if p.returns_tuple else x
    bias = None if state.packed else state.attn_bias(hidden_states.dtype, prop_attn)
    if bias is not None and not p.own_attention:
        _check_maskable_now(p)
    # the layer's own forward, where it computes what saint would (BEiT's bias covers every token)
    whole = (not state.packed and settings is None and (bias is None or not p.own_attention)
             and (p.pair_bias is None or state.positions is None))
    pair = None if p.pair_bias is None or whole else p.pair_bias(attention_mask, kwargs)
    rows = None  # per-token rotary rows, where saint's own code reads or rotates keys
    if (pe is not None or p.rotary is not None) and not whole:
        rows = _rows_of(p, pe, state, hidden_states, handle.num_protected)
    if whole:
        x = type(self).forward(self, hidden_states, *_own_forward_args(p, attention_mask, bias, state, hidden_states),
                               **kwargs)
        x = x[0] if p.returns_tuple else x
    else:
        normed = p.norm1(hidden_states)
        if p.own_attend is not None and not state.packed and bias is None and rows is None and pair is None:
            attn_out = p.own_attend(normed)
        elif state.packed or p.own_attention:
            handle.attention_from_parts(index)
            attn_out = _parts_attention(p, normed, state, prop_attn, handle.kernel, rows, pair)
        else:
            attn_out, _ = p.attn(hidden_states=normed, attention_mask=bias, **kwargs)
        x = _residual(p, hidden_states, drop_path_of(p.drop_path, p.ls1(attn_out), state))
    if settings is not None:
        x = state.apply(x, _select(p, handle, run, index, normed, x, settings, rows, pair))
    if not whole:
        x = _residual(p, x, drop_path_of(p.drop_path, p.ls2(p.mlp(p.norm2(x))), state))
    x = handle.leave_site(index, run, x)
    return (x, None) if p.returns_tuple else x


def _own_forward_args(p: LayerParts, attention_mask: torch.Tensor | None, bias: torch.Tensor | None,
                      state: TokenState, x: torch.Tensor) -> tuple[Any, ...]:
    """What the layer's own forward takes after its hidden states: the relative position bias
    it got (BEiT), the tokens' original indices (V-JEPA 2's ``position_mask``), nothing (an
    attention that takes no mask), or saint's key mask."""
    if p.pair_bias is not None:  # BEiT's shared bias (Data2Vec-vision's comes in the keyword arguments)
        return () if attention_mask is None else (attention_mask,)
    if p.rotary is not None:
        return (_rows_of(p, None, state, x, 0),)
    return () if p.own_attention else (bias,)


def _residual(p: LayerParts, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch`` in the layer's own order: the sum is the same, but its memory layout
    follows the first operand, and a mean over tokens of a non-contiguous output (VideoMAE's
    embeddings are a transposed view) sums in another order."""
    return branch + x if p.branch_first else x + branch


def _check_maskable_now(p: LayerParts) -> None:
    """Refuse an attention implementation chosen after patching that cannot take saint's key mask."""
    impl = p.attn.config._attn_implementation
    if impl not in MASKABLE_ATTENTION:
        raise ValueError(
            f"attn_implementation={impl!r} cannot take saint's key mask (padding / ToMe sizes); "
            "use attn_implementation='sdpa' or 'eager'"
        )


def _select(p: LayerParts, handle: HFEncoderPatch, run: Any, index: int, normed: torch.Tensor, x: torch.Tensor,
            settings: dict[str, Any], rows: Any = None, pair: torch.Tensor | None = None) -> Selection:
    """The layer's selection from its captured key projection (``normed``: the attention's
    input, for the class token's query; ``x``: the tokens the selection may read; ``rows``:
    the rotary rows the class token's attention reads its keys with). The selection's keys
    are the projection's, before any rotation."""
    state = run.state
    k = _keys(p, run.captured.pop(index))
    ctx = LayerContext(
        keys=state.padded(mean_heads(k, p.heads)),
        num_protected=handle.num_protected,
        valid=state.valid,
        cls_attention=(_cls_attention(p, normed, k, state, handle.config.size_bias, rows, pair)
                       if handle.num_protected > 0 else None),
        tokens=(lambda: state.padded(x)) if state.packed else x,
        layer=index,
    )
    sel = handle.spec.select(ctx, settings, handle.config)
    if sel.merge is not None and _merges_nothing(sel.merge):
        sel = Selection(sel.keep)  # nothing merged: no sizes, so no mask in later layers
    return sel


def _select_before_attention(p: LayerParts, handle: HFEncoderPatch, run: Any, index: int, x: torch.Tensor,
                             settings: dict[str, Any], pe: Rows | None = None,
                             pair: torch.Tensor | None = None) -> torch.Tensor:
    """A pruning layer with ``select_at="attention"``: the selection reads the layer's own
    keys (the key projection runs on every token), the tokens, their normed inputs and
    keys are merged (size-weighted means of rows) or dropped together, and the query and
    value projections (a merge is a mean with weights summing to 1, so it commutes with
    them), attention, the output projection and the MLP run on the survivors."""
    state = run.state
    normed = p.norm1(x)
    k = _keys(p, _key_module(p)(normed))  # the hook captures it
    npt = handle.num_protected
    sel = _select(p, handle, run, index, normed, x, settings, _rows_of(p, pe, state, x, npt), pair)
    keys_own = p.qkv is None and output_unshared(p.k, saint_hooks=1)  # a fused output's third is a view
    x, normed, k = state.apply_many([x, normed, k], sel, in_place=[False, output_unshared(p.norm1), keys_own])
    if (p.own_attend is not None and not state.packed and pair is None and pe is None and p.rotary is None
            and state.attn_bias(x.dtype, handle.config.size_bias) is None):
        # no mask needed (nothing padded or merged): the module's own (eager) attention, as
        # the layers that select after attention run it, so nothing removed is bit for bit
        attn_out = p.own_attend(normed)  # (its output projection included)
    else:
        q, v = p.q(normed), p.v(normed)
        b, n = q.shape[:2]
        q, k, v = (t.reshape(b, n, p.heads, p.head_dim) for t in (q, k, v))
        rows = _rows_of(p, pe, state, x, npt)  # the survivors' rows
        q, k = _rotate(p, q, rows), _rotate(p, k, rows)
        attn_out = p.out(_attend(p, q, k, v, state, handle.config.size_bias, handle.kernel, pair))
    x = _residual(p, x, drop_path_of(p.drop_path, p.ls1(attn_out), state))
    return _residual(p, x, drop_path_of(p.drop_path, p.ls2(p.mlp(p.norm2(x))), state))


def _refuse_attentions(tower: torch.nn.Module, handle: HFEncoderPatch, args: tuple, kwargs: dict[str, Any],
                       unmerged: bool = False) -> None:
    """Refuse ``output_attentions`` where it cannot be what it says: per-image attention of a
    packed batch (a method whose counts differ per image, or any method on an input whose
    images are padded, NaFlex's: ToMe then merges each image's own share), or a tower whose
    attention saint runs itself (no weights are made), every layer's or a pruning layer's
    (``select_at="attention"``: the tuple would lack those layers and misname the rest), or
    ``unmerged`` hidden states (a dense backbone's, on the input's grid) beside weights over
    the merged tokens."""
    if not kwargs.get("output_attentions", tower.config.output_attentions):
        return
    if handle.own_attention:
        raise ValueError(f"a patched {type(tower).__name__} runs its attention through saint's kernel, which "
                         "makes no attention weights; unpatch it to read output_attentions")
    if unmerged:
        raise ValueError(f"a patched {type(tower).__name__} returns its hidden states unmerged onto the input's grid, "
                         "but its attention weights are over the merged (and padded) tokens, whose rows no mask "
                         "describes; unpatch it to read output_attentions")
    if handle.config.select_at == "attention":
        raise ValueError("with select_at='attention' saint runs each pruning layer's attention itself, which makes "
                         "no attention weights (the tuple would skip those layers); patch with select_at='mlp' "
                         "(and layout='padded') to read output_attentions")
    if handle.runs.layout == "packed" and (handle.config.pads or _padded_input(tower, args, kwargs)):
        raise ValueError("output_attentions cannot describe per-image attention of a packed batch; "
                         "patch with layout='padded' to read attention weights")


def _padded_input(tower: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether the call's own padding mask (a NaFlex tower's ``pixel_attention_mask`` or
    ``attention_mask``) marks padding in some image."""
    try:
        bound = inspect.signature(type(tower).forward).bind_partial(tower, *args, **kwargs).arguments
    except TypeError:  # arguments the forward does not take: its own call says so
        return False
    masks = [bound.get(name) for name in ("pixel_attention_mask", "attention_mask")]
    return any(isinstance(m, torch.Tensor) and not bool(m.bool().all()) for m in masks)


def backbone_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A backbone's own forward with every layer's output left as one row per original token,
    the row of the token it became (:meth:`~saint.adapters.common.TokenState.unmerge`): its
    feature maps lie on the input's grid, and each layer's input is read back from them."""
    handle = self.__dict__[SAINT_ATTR]
    _refuse_attentions(self, handle, args, kwargs, unmerged=True)
    with handle.runs.unmerging():
        return type(self).forward(self, *args, **kwargs)


def tower_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The tower's own forward; while it returns hidden states, every layer's output is
    unpadded (NaN at padding, :meth:`HFEncoderPatch.hidden_state_valid` marks tokens)."""
    handle = self.__dict__[SAINT_ATTR]
    _refuse_attentions(self, handle, args, kwargs)
    if not kwargs.get("output_hidden_states", self.config.output_hidden_states):
        return type(self).forward(self, *args, **kwargs)
    with handle.runs.unpadding():
        return type(self).forward(self, *args, **kwargs)


class ProjectionProbe(Probe):
    """Queries/keys at each layer's query and key projections (its ``parts``), hidden
    states at each encoder layer's output."""

    def __init__(self, sites: list[Site], parts: Callable[[torch.nn.Module], LayerParts], num_prefix: int,
                 has_cls: bool) -> None:
        self.sites = sites
        self.parts = parts
        self.num_prefix = num_prefix
        self.has_cls = has_cls

    def begin(self, inputs: Any) -> None:
        """Refuse a batch padded by its processor (Siglip2's NaFlex ``pixel_attention_mask``):
        the statistics read every token, and would take its padding for patches."""
        mask = inputs.get("pixel_attention_mask") if isinstance(inputs, Mapping) else None
        if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
            raise ValueError("saint.analysis reads every token of a batch, and this batch is padded (its "
                             "pixel_attention_mask marks padding, which would count as patches): analyse images "
                             "whose patches fill max_num_patches")

    def hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        p = self.parts(self.sites[i].block)
        if p.qkv is not None:
            return [p.qkv.register_forward_hook(save_output(store, "qkv"))]
        return [p.q.register_forward_hook(save_output(store, "q")), p.k.register_forward_hook(save_output(store, "k"))]

    def qk(self, i: int, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.sites[i].heads
        q, k = store.pop("qkv").chunk(3, dim=-1)[:2] if "qkv" in store else (store.pop("q"), store.pop("k"))
        b, n, c = q.shape
        return q.reshape(b, n, h, c // h), k.reshape(b, n, h, c // h)


class ClassFreeTower(FamilyAdapter):
    """The protocol of a tower family without a class token whose classes a
    :class:`TowerClasses` names: sites are its ``encoder.layers``, read through ``parts``;
    the dual encoder's image side is ``get_image_features``."""

    classes: TowerClasses
    parts: Callable[[torch.nn.Module], LayerParts]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return encoder_sites(list(self.classes.tower_of(model).encoder.layers), "encoder.layers", self.parts)

    def protected(self, model: torch.nn.Module) -> int:
        return 0

    def probe(self, model: torch.nn.Module) -> Probe:
        return ProjectionProbe(self.sites(model), self.parts, num_prefix=0, has_cls=False)

    def call(self, model: torch.nn.Module, **inputs: Any) -> Any:
        """The tower's or the classifier's output, or the dual encoder's image features (its
        projection applied)."""
        if self.classes.tower_of(model) is not model and not hf_mean_head.averages_tokens(model):
            return model.get_image_features(**inputs)
        return model(**inputs)


def image_key_mask(module: torch.nn.Module, states: torch.Tensor) -> torch.Tensor | None:
    """Saint's 4-D key mask of the tower's last call in this thread for the image tokens
    ``states [B', N, C]`` that ``module`` cross-attends (each image's rows repeated for
    generation's copies: ``B' = k B``, ``repeat_interleave`` along the batch), in the module's
    dtype; None when every token is real and whole."""
    handle = module.__dict__[SITE_ATTR][0]
    dtype = next(module.parameters()).dtype  # the reader runs in its own (fp32) dtype
    bias = handle.state.attn_bias(dtype, handle.config.size_bias)
    if bias is None:
        return None
    if states.shape[0] % bias.shape[0] or bias.shape[-1] != states.shape[1]:
        raise ValueError(f"{type(module).__name__} got {tuple(states.shape[:2])} image tokens but the tower's last "
                         f"forward produced {(bias.shape[0], bias.shape[-1])}; call it only through the patched model")
    if states.shape[0] != bias.shape[0]:
        bias = bias.repeat_interleave(states.shape[0] // bias.shape[0], dim=0)
    return bias


def attach_reader(handle: Any, owner: torch.nn.Module, find: Callable[[torch.nn.Module], torch.nn.Module],
                  what: str, hook: Callable[..., Any] | None = None) -> torch.nn.Module:
    """Give the module that cross-attends the tower's tokens (``find(owner)``) a forward
    pre-hook with kwargs (default :func:`image_key_mask_hook`), recorded with the handle's
    hooks and installed modules (checked every call, removed on unpatching); returns it."""
    reader = find(owner)
    reader.__dict__[SITE_ATTR] = (handle, None)
    handle.hooks.append(reader.register_forward_pre_hook(hook or image_key_mask_hook, with_kwargs=True))
    handle.hooked.append(Hooked(owner, find, reader, f"{type(owner).__name__}'s {what}"))
    return reader


def image_key_mask_hook(reader: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook on the module that cross-attends the image tokens as
    ``encoder_hidden_states`` (BLIP-2's Q-Former; BLIP's text decoder or encoder; a vision
    encoder-decoder's decoder): where the tower's last call in this thread left padding or merged
    tokens, its cross-attention gets saint's key mask (4-D, additive) in place of the wrapper's
    mask of ones, and the padding rows of the image tokens are zeros (not NaN). Generation's
    copies of each image's tokens (beams, several sequences per image: ``repeat_interleave``
    along the batch) get their image's mask."""
    states = kwargs.get("encoder_hidden_states")
    if states is None:
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # (transformers 5's name, and the old one)
    if cache is not None:  # its cross-attention keys will be this patch's tokens
        handle = reader.__dict__[SITE_ATTR][0]
        hf_llm.tie_to_patch(cache, id(handle), lambda: bool(handle.hooks))
    bias = image_key_mask(reader, states)
    if bias is None:
        return None
    kwargs = dict(kwargs)
    kwargs["encoder_hidden_states"] = states.masked_fill(bias[:, 0, 0, :, None] == float("-inf"), 0.0)
    kwargs["encoder_attention_mask"] = bias
    return args, kwargs

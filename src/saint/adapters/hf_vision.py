"""Hugging Face vision towers (transformers 5): ``CLIPVisionModel``,
``CLIPVisionModelWithProjection`` and ``SiglipVisionModel`` — also the vision tower
inside ``LlavaForConditionalGeneration`` (``model.model.vision_tower``).

Each encoder layer's ``forward`` is wrapped per instance: the layer's own modules
run in the order transformers runs them (``layer_norm1 -> self_attn -> residual ->
[selection] -> layer_norm2 -> mlp -> residual``), attention through the model's own
kernel (sdpa or eager). Keys are read by a forward hook on ``self_attn.k_proj``.
Merged (ToMe) sequences reach attention as one additive key mask ``[B, 1, 1, N]``,
which sdpa and eager consume alike; layers that need no mask are called exactly as
unpatched. Once images keep different counts (``rate="sample"``) the tokens travel
as one packed stream (``layout="packed"``, default): layer norms, projections and
MLP run on it as they are and attention runs per image through the layer's own
q/k/v/out projections (:func:`saint.core.packed_attention`). ``layout="padded"``
pads ragged sequences and masks them in the model's own attention instead.

Protected tokens: CLIP's class token (position 0); SigLIP has none, so the
class-attention method ``attn`` is refused for it. CLIP pools the class token
(unaffected); SigLIP's attention-pooling head (MAP) is wrapped to ignore padded keys
and to weight merged keys by ``log(size)``.

``output_hidden_states``: ``hidden_states[0]`` is the embedding sequence and
``hidden_states[i + 1]`` the output of layer ``i``; after a pruning layer these are
shorter, and with ``rate="sample"`` padded to the longest sample in the batch, as is
``last_hidden_state``. The handle says which positions are real:
:meth:`HFVisionPatch.hidden_state_valid` (``saint.token_mask(model, i)`` for layer
``i``; ``None`` when rectangular). With ``layout="packed"`` padded positions hold NaN,
so they can never pass for tokens; with ``"padded"`` they hold dropped token values.
CLIP's pooled class token and SigLIP's pooling head are per image in both layouts.
``output_attentions`` is refused with packed ragged batches.

Limits: transformers 5 has no separate ``*VisionTransformer`` module (the vision
model holds ``embeddings``/``encoder`` itself); per-call state is kept per call (see
:class:`saint.adapters.common.Runs`: threads, copies and gradient checkpointing are
safe); flash/flex attention are refused when a mask is needed.
"""

from __future__ import annotations

import sys
import types
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
    require_site,
)
from .base import (
    FamilyAdapter,
    Grid,
    Probe,
    Site,
    TokenStateHandle,
    install_sites,
    remove_sites,
    save_output,
    select_at_of,
    vit_block_flops,
)
from .common import (
    MASKABLE_ATTENTION,
    SAINT_ATTR,
    SITE_ATTR,
    TokenState,
    attention_of,
    check_layout,
    check_static_counts,
    cls_attention,
    get_handle,
    output_unshared,
    packed_attention_of,
)


def _hf_classes() -> dict[str, type] | None:
    try:
        from transformers.models.clip import modeling_clip as clip
        from transformers.models.siglip import modeling_siglip as siglip
    except ImportError:  # transformers not installed
        return None
    return {
        "clip": clip.CLIPVisionModel,
        "clip_proj": clip.CLIPVisionModelWithProjection,
        "clip_layer": clip.CLIPEncoderLayer,
        "clip_attn": clip.CLIPAttention,
        "siglip": siglip.SiglipVisionModel,
        "siglip_layer": siglip.SiglipEncoderLayer,
        "siglip_attn": siglip.SiglipAttention,
        "siglip_head": siglip.SiglipMultiheadAttentionPoolingHead,
    }


def matches(model: torch.nn.Module) -> bool:
    """True for the supported Hugging Face vision models (never imports transformers itself)."""
    if sys.modules.get("transformers") is None:  # a transformers model implies it is imported
        return False
    c = _hf_classes()
    return c is not None and isinstance(model, (c["clip"], c["clip_proj"], c["siglip"]))


@dataclass
class HFVisionPatch(TokenStateHandle):
    """Everything a patched vision tower carries: the ViT handle's fields (config,
    resolved per-layer settings, per-call token states, hooks), the tower, and the
    validity of every layer's output in the last forward."""

    tower: torch.nn.Module | None = None

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
        if index == 0:
            return None
        run = self.runs.current()
        ran = 0 if run is None else len(run.layer_valid)
        if ran < index:
            raise RuntimeError(f"layer {index - 1} did not run in the last forward ({ran} layers ran); call the model first")
        return run.layer_valid[index - 1]


def _tower_of(model: torch.nn.Module) -> torch.nn.Module:
    c = _hf_classes()
    if c is not None and isinstance(model, c["clip_proj"]):
        return model.vision_model
    return model


def _is_clip(tower: torch.nn.Module) -> bool:
    return isinstance(tower, _hf_classes()["clip"])  # type: ignore[index]


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
    kernel: str = "auto", **kwargs: Any,
) -> HFVisionPatch:
    """Patch a CLIP/SigLIP vision model in place (see :func:`saint.patch`)."""
    tower = _tower_of(model)
    handle = patch_tower(tower, method, trace=trace, layout=layout, kernel=kernel, **kwargs)
    if tower is not model:
        model.__dict__[SAINT_ATTR] = handle
    return handle


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    handle = get_handle(model)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by saint")
    if handle.tower is not model:
        model.__dict__.pop(SAINT_ATTR)
    unpatch_tower(handle.tower)


def patch_tower(
    tower: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
    kernel: str = "auto", **kwargs: Any,
) -> HFVisionPatch:
    """Prune the tokens of a ``CLIPVisionModel`` / ``SiglipVisionModel`` in place.

    Usable on a stand-alone tower or one inside a composite model (LLaVA's
    ``model.model.vision_tower``). Keyword arguments are the method's settings, with
    the same per-layer semantics as every adapter. The returned handle (also stored
    on the tower) exposes ``stats()``, ``state.valid`` (validity of the last layer's
    output in the last forward, None when rectangular) and ``hidden_state_valid(i)``.
    ``layout`` / ``kernel``: see :func:`saint.patch`.
    """
    check_layout(layout, kernel)
    c = _hf_classes()
    if c is None or not isinstance(tower, (c["clip"], c["siglip"])):
        raise TypeError(f"patch_tower expects a CLIPVisionModel or SiglipVisionModel, got {type(tower).__name__}")
    if get_handle(tower) is not None:
        raise ValueError(f"{type(tower).__name__} is already patched by saint; unpatch it first")
    clip = _is_clip(tower)
    layers = _check_layers(tower, c, clip)
    spec, config = make_config(method, **kwargs)
    require_site(spec, "vision", type(tower).__name__)
    settings = config.resolve(len(layers))
    num_protected = 1 if clip else 0
    _check_method(tower, spec, config, settings, num_protected, layout)
    head = getattr(tower, "head", None) if getattr(tower, "use_head", False) else None
    if head is not None and type(head) is not c["siglip_head"]:
        raise TypeError(f"unsupported pooling head {type(head).__name__}; saint supports SiglipMultiheadAttentionPoolingHead")

    handle = HFVisionPatch(spec, config, settings, num_protected, trace=trace, kernel=kernel, tower=tower)
    install_sites(handle, layers, "encoder.layers", _layer_forward, _key_proj, layout)
    if head is not None:
        head.__dict__[SITE_ATTR] = (handle, None)
        head.forward = types.MethodType(_head_forward, head)
    tower.forward = types.MethodType(_tower_forward, tower)
    tower.__dict__[SAINT_ATTR] = handle
    return handle


def _key_proj(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.self_attn.k_proj


def _check_layers(tower: torch.nn.Module, c: dict[str, type], clip: bool) -> list[torch.nn.Module]:
    """The encoder layers, each of the class saint wraps and not wrapped by anyone else."""
    layer_cls, attn_cls = (c["clip_layer"], c["clip_attn"]) if clip else (c["siglip_layer"], c["siglip_attn"])
    layers = list(tower.encoder.layers)
    for i, layer in enumerate(layers):
        if type(layer) is not layer_cls or type(layer.self_attn) is not attn_cls:
            raise TypeError(
                f"encoder layer {i} is {type(layer).__name__} with {type(getattr(layer, 'self_attn', None)).__name__}; "
                f"saint supports {layer_cls.__name__} with {attn_cls.__name__}"
            )
        if "forward" in layer.__dict__:
            raise ValueError(f"encoder layer {i} already has a per-instance forward (patched by something else)")
    return layers


def _check_method(tower: torch.nn.Module, spec: MethodSpec, config: MethodConfig, settings: dict[int, dict[str, Any]],
                  num_protected: int, layout: str) -> None:
    """The method can run on this tower: a class token when it ranks by one, a maskable
    attention when it pads, fixed counts that fit the patches."""
    require_class_token(spec, config, num_protected > 0, type(tower).__name__)
    if _needs_mask(spec, config, layout):
        impl = tower.config._attn_implementation
        if impl not in MASKABLE_ATTENTION:
            raise ValueError(
                f"{spec.name} with these settings passes a key mask to attention, which "
                f"attn_implementation={impl!r} cannot take; load the model with attn_implementation='sdpa' or 'eager'"
            )
    check_static_counts(int(tower.embeddings.num_patches), spec, settings, unit="layer")


def unpatch_tower(tower: torch.nn.Module) -> None:
    """Undo :func:`patch_tower`: the tower computes exactly what it did before."""
    handle = tower.__dict__.pop(SAINT_ATTR, None)
    if handle is None:
        raise ValueError(f"{type(tower).__name__} is not patched by saint")
    remove_sites(handle, tower.encoder.layers, _key_proj)
    tower.__dict__.pop("forward", None)
    head = getattr(tower, "head", None)
    if head is not None:
        head.__dict__.pop("forward", None)
        head.__dict__.pop(SITE_ATTR, None)


def _needs_mask(spec: MethodSpec, config: MethodConfig, layout: str) -> bool:
    """Whether the model's own attention may get a key mask: padded ragged sequences,
    or merged tokens' size bias."""
    padded = layout == "padded" and config.pads
    return padded or (spec.merges and config.size_bias)


def _merges_nothing(plan: Any) -> bool:
    """True for a merge plan that moves no token (empty, or every pair inactive)."""
    active = getattr(plan, "active", None)
    return plan.src.numel() == 0 or (active is not None and not bool(active.any()))


def _mean_heads(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, H*D]`` key projection -> keys averaged over heads ``[B, N, D]``."""
    b, n, c = k.shape
    return head_mean(k.reshape(b, n, num_heads, c // num_heads))


def _cls_attention(attn: torch.nn.Module, normed: torch.Tensor, k_packed: torch.Tensor, state: TokenState,
                   prop_attn: bool):
    """The class token's attention over all tokens (padded view), averaged over heads
    (lazy; only the class token's query is projected)."""

    def compute() -> torch.Tensor:
        bias = state.padded_key_mask(k_packed.dtype, prop_attn)
        first = state.first(normed)[:, None]
        k = state.padded(k_packed)
        b, n, c = k.shape
        h = attn.num_heads
        q = attn.q_proj(first).reshape(b, h, c // h)
        return cls_attention(q, k.reshape(b, n, h, c // h), attn.scale, bias)

    return compute


def _packed_attention(attn: torch.nn.Module, x: torch.Tensor, state: TokenState, prop_attn: bool,
                      kernel: str) -> torch.Tensor:
    """CLIP/SigLIP attention on a packed stream ``[1, T, C]``: the module's own q/k/v/out
    projections around per-image attention."""
    t = x.shape[1]
    q, k, v = (proj(x).reshape(t, attn.num_heads, attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    dropout = attn.dropout if attn.training else 0.0
    return attn.out_proj(packed_attention_of(q, k, v, state, prop_attn, attn.scale, dropout, kernel))


def _layer_forward(self: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   **kwargs: Any) -> torch.Tensor:
    """An encoder layer of a patched tower: its own modules in HF order, the selection
    between the attention residual and the MLP (per-instance ``forward``); packed
    tokens take per-image attention."""
    handle, index = self.__dict__[SITE_ATTR]
    if attention_mask is not None:
        raise ValueError("a pruned vision tower cannot take an attention_mask; call the model without one")
    run, hidden_states, settings = handle.enter_site(index, hidden_states)
    state = run.state
    prop_attn = handle.config.size_bias
    if settings is not None and handle.config.select_at == "attention":
        return handle.leave_site(index, run, _select_before_attention(self, handle, run, index, hidden_states,
                                                                      settings))
    if state.packed:
        normed = self.layer_norm1(hidden_states)
        x = hidden_states + _packed_attention(self.self_attn, normed, state, prop_attn, handle.kernel)
    else:
        bias = state.attn_bias(hidden_states.dtype, prop_attn)
        if bias is not None:
            impl = self.self_attn.config._attn_implementation
            if impl not in MASKABLE_ATTENTION:
                raise ValueError(
                    f"attn_implementation={impl!r} cannot take saint's key mask (padding / ToMe sizes); "
                    "use attn_implementation='sdpa' or 'eager'"
                )
        if settings is None:
            x = type(self).forward(self, hidden_states, bias, **kwargs)
        else:
            normed = self.layer_norm1(hidden_states)
            attn_out, _ = self.self_attn(hidden_states=normed, attention_mask=bias, **kwargs)
            x = hidden_states + attn_out
    if settings is not None:
        x = state.apply(x, _select(handle, run, self, index, normed, x, settings))
    if settings is not None or state.packed:
        x = x + self.mlp(self.layer_norm2(x))
    return handle.leave_site(index, run, x)


def _select(handle: HFVisionPatch, run: Any, layer: torch.nn.Module, index: int, normed: torch.Tensor,
            x: torch.Tensor, settings: dict[str, Any]) -> Selection:
    """The layer's selection from its captured key projection (``normed``: the attention's
    input, for the class token's query; ``x``: the tokens the selection may read)."""
    state = run.state
    k = run.captured.pop(index)
    ctx = LayerContext(
        keys=state.padded(_mean_heads(k, layer.self_attn.num_heads)),
        num_protected=handle.num_protected,
        valid=state.valid,
        cls_attention=_cls_attention(layer.self_attn, normed, k, state, handle.config.size_bias)
        if handle.num_protected > 0 else None,
        tokens=(lambda: state.padded(x)) if state.packed else x,
        layer=index,
    )
    sel = handle.spec.select(ctx, settings, handle.config)
    if sel.merge is not None and _merges_nothing(sel.merge):
        sel = Selection(sel.keep)  # nothing merged: no sizes, so no mask in later layers
    return sel


def _select_before_attention(layer: torch.nn.Module, handle: HFVisionPatch, run: Any, index: int,
                             x: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    """A pruning layer with ``select_at="attention"``: the selection reads the layer's own
    keys, the tokens and their q/k/v projections are merged (size-weighted means of rows)
    or dropped together, and attention, out_proj and MLP run on the survivors."""
    state, attn = run.state, layer.self_attn
    normed = layer.layer_norm1(x)
    q, k, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)  # the hook captures k
    sel = _select(handle, run, layer, index, normed, x, settings)
    unshared = [output_unshared(p, saint_hooks=int(p is attn.k_proj)) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    x, q, k, v = state.apply_many([x, q, k, v], sel, in_place=[False, *unshared])
    b, n = q.shape[:2]
    q, k, v = (p.reshape(b, n, attn.num_heads, attn.head_dim) for p in (q, k, v))
    dropout = attn.dropout if attn.training else 0.0
    x = x + attn.out_proj(attention_of(q, k, v, state, handle.config.size_bias, attn.scale, dropout, handle.kernel))
    return x + layer.mlp(layer.layer_norm2(x))


def _tower_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The tower's own forward; while it returns hidden states, every layer's output is
    unpadded (NaN at padding, :meth:`HFVisionPatch.hidden_state_valid` marks tokens)."""
    handle = self.__dict__[SAINT_ATTR]
    packs = handle.runs.layout == "packed" and handle.config.pads
    if packs and kwargs.get("output_attentions", self.config.output_attentions):
        raise ValueError("output_attentions cannot describe per-image attention of a packed batch; "
                         "patch with layout='padded' to read attention weights")
    if not kwargs.get("output_hidden_states", self.config.output_hidden_states):
        return type(self).forward(self, *args, **kwargs)
    with handle.runs.unpadding():
        return type(self).forward(self, *args, **kwargs)


def _head_forward(self: torch.nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
    """SigLIP's attention-pooling head, run with its own modules in HF order: per image
    over its real tokens, merged keys weighted by ``log(size)``."""
    handle = self.__dict__[SITE_ATTR][0]
    state = handle.state
    bias = state.attn_bias(hidden_state.dtype, handle.config.size_bias)
    if bias is None:
        return type(self).forward(self, hidden_state)
    bias = bias[:, 0, 0, :]
    if bias.shape != hidden_state.shape[:2]:
        raise ValueError(
            f"the pooling head got {tuple(hidden_state.shape[:2])} tokens but the tower's last forward "
            f"produced {tuple(bias.shape)}; call the head only through the patched model"
        )
    if state.valid is None:
        return _pool_head(self, hidden_state, bias)
    counts = state.valid.sum(dim=1).tolist()
    return torch.cat([_pool_head(self, hidden_state[i : i + 1, :n], bias[i : i + 1, :n]) for i, n in enumerate(counts)])


def _pool_head(head: torch.nn.Module, hidden_state: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    probe = head.probe.repeat(hidden_state.shape[0], 1, 1)
    x = head.attention(probe, hidden_state, hidden_state, key_padding_mask=bias)[0]
    residual = x
    x = head.layernorm(x)
    x = residual + head.mlp(x)
    return x[:, 0]


# ---------------------------------------------------------------------------- protocol
class HFProbe(Probe):
    """Queries/keys at each layer's ``self_attn.q_proj``/``k_proj``, hidden states at
    each encoder layer's output."""

    def __init__(self, tower: torch.nn.Module, sites: list[Site]) -> None:
        self.sites = sites
        self.has_cls = hasattr(getattr(tower, "embeddings", None), "class_embedding")
        self.num_prefix = 1 if self.has_cls else 0

    def hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        attn = self.sites[i].attn
        return [
            attn.q_proj.register_forward_hook(save_output(store, "q")),
            attn.k_proj.register_forward_hook(save_output(store, "k")),
        ]

    def qk(self, i: int, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.sites[i].heads
        q, k = store.pop("q"), store.pop("k")
        b, n, c = q.shape
        return q.reshape(b, n, h, c // h), k.reshape(b, n, h, c // h)


class HFVision(FamilyAdapter):
    """Hugging Face CLIP / SigLIP vision towers: sites are ``encoder.layers``."""

    name = "hf_vision"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        out = []
        for i, layer in enumerate(_tower_of(model).encoder.layers):
            attn = layer.self_attn
            out.append(Site(i, f"encoder.layers.{i}", layer, attn, int(attn.num_heads), float(attn.scale)))
        return out

    def protected(self, model: torch.nn.Module) -> int:
        return 1 if _is_clip(_tower_of(model)) else 0

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        cfg = _tower_of(model).config
        p = int(cfg.patch_size)
        g = int(cfg.image_size) // p
        if inputs is not None and tuple(inputs.shape[-2:]) != (g * p, g * p):
            raise ValueError(f"{type(model).__name__} takes {g * p}x{g * p} images, got {tuple(inputs.shape[-2:])}")
        return Grid(g, g, (p, p))

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        layer = _tower_of(model).encoder.layers[0]
        return vit_block_flops(n_in, n_out, int(layer.embed_dim), int(layer.mlp.fc1.out_features),
                               select_at_of(model, select_at))

    def probe(self, model: torch.nn.Module) -> Probe:
        return HFProbe(_tower_of(model), self.sites(model))



    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        return model(pixel_values=inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.forward(model, inputs)
        emb = getattr(out, "image_embeds", None)
        return (out.pooler_output if emb is None else emb), None


ADAPTER = HFVision()

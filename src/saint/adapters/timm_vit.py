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
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch

from ..methods import LayerContext, MethodConfig, MethodSpec, make_config
from .base import Adapter, Grid, Probe, Site, TokenStateHandle, save_output, vit_block_flops
from .common import (
    SAINT_ATTR,
    SITE_ATTR,
    Runs,
    check_static_counts,
    cls_attention,
    keys_from_qkv,
)

POOLS_WITH_PADDING = ("token", "avg", "")


def _timm_classes() -> tuple[type, type, type] | None:
    try:
        from timm.models.vision_transformer import Attention, Block, VisionTransformer
    except ImportError:  # timm not installed
        return None
    return VisionTransformer, Block, Attention


def matches(model: torch.nn.Module) -> bool:
    classes = _timm_classes()
    return classes is not None and isinstance(model, classes[0])


@dataclass
class TimmPatch(TokenStateHandle):
    """Everything a patched timm ViT carries: config, resolved per-layer settings,
    the per-call token states (``runs``) and the hooks to remove on unpatch."""

    spec: MethodSpec
    config: MethodConfig
    settings: dict[int, dict[str, Any]]
    num_protected: int
    trace: bool = False
    hooks: list[Any] = field(default_factory=list)
    block_names: list[str] = field(default_factory=list)
    runs: Runs = field(default_factory=lambda: Runs(0))


def patch(model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, **kwargs: Any) -> TimmPatch:
    """Patch a timm VisionTransformer in place (see :func:`saint.patch`)."""
    _, block_cls, attn_cls = _timm_classes()  # type: ignore[misc]
    spec, config = make_config(method, **kwargs)
    blocks = list(model.blocks)
    for i, blk in enumerate(blocks):
        if type(blk) is not block_cls or not isinstance(blk.attn, attn_cls):
            raise TypeError(
                f"block {i} is {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}; "
                "saint supports timm ViT blocks (timm.models.vision_transformer.Block with Attention)"
            )
    settings = config.resolve(len(blocks))
    num_protected = int(model.num_prefix_tokens)
    if spec.needs_cls_attention and getattr(model, "cls_token", None) is None:
        raise ValueError(f"method {spec.name!r} needs a class token; {type(model).__name__} has none")
    rate = getattr(config, "rate", "batch")
    pool = getattr(model, "global_pool", "token")
    if rate == "sample" and (getattr(model, "attn_pool", None) is not None or pool not in POOLS_WITH_PADDING):
        raise ValueError(
            f"rate='sample' pads ragged sequences, which global_pool={pool!r} cannot ignore; "
            f"use rate='batch' or a model pooled by {POOLS_WITH_PADDING}"
        )
    _check_static_counts(model, spec, settings, num_protected)

    handle = TimmPatch(spec, config, settings, num_protected, trace=trace)
    handle.block_names = [f"blocks.{i}" for i in range(len(blocks))]
    handle.runs = Runs(len(blocks))
    for i, blk in enumerate(blocks):
        blk.__dict__[SITE_ATTR] = (handle, i)
        blk.forward = types.MethodType(_block_forward, blk)
        if i in settings:
            blk.attn.qkv.__dict__[SITE_ATTR] = (handle, i)
            handle.hooks.append(blk.attn.qkv.register_forward_hook(_capture))
    if hasattr(model, "pool") and type(model).forward_head is _timm_classes()[0].forward_head:  # type: ignore[index]
        model.pool = types.MethodType(_pool, model)
    model.__dict__[SAINT_ATTR] = handle
    return handle


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    handle = model.__dict__.pop(SAINT_ATTR)
    for h in handle.hooks:
        h.remove()
    for blk in model.blocks:
        blk.__dict__.pop("forward", None)
        blk.__dict__.pop(SITE_ATTR, None)
        blk.attn.qkv.__dict__.pop(SITE_ATTR, None)
    model.__dict__.pop("pool", None)


def _capture(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
    """Forward hook on a pruning block's ``attn.qkv``: keep its output for the selection."""
    handle, i = module.__dict__[SITE_ATTR]
    handle.runs.executing().captured[i] = output


def _check_static_counts(model: torch.nn.Module, spec: MethodSpec, settings: dict, protected: int) -> None:
    """Reject a fixed-count schedule that cannot fit the model's default image size."""
    n = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if n is not None:
        check_static_counts(int(n), spec, settings, unit="block")


def _cls_attention_of(blk: torch.nn.Module, qkv: torch.Tensor, bias: torch.Tensor | None):
    """The class token's attention over all tokens, averaged over heads (lazy)."""

    def compute() -> torch.Tensor:
        attn = blk.attn
        b, n, c3 = qkv.shape
        h = attn.num_heads
        q = attn.q_norm(qkv.reshape(b, n, 3, h, -1)[:, 0, 0])  # [B, H, D]
        k = attn.k_norm(qkv.reshape(b, n, 3, h, -1)[:, :, 1])  # [B, N, H, D]
        return cls_attention(q, k, attn.scale, bias)

    return compute


def _block_forward(self: torch.nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False) -> torch.Tensor:
    """A block of a patched ViT: its own modules in timm's order, the selection between
    the attention residual and the MLP (per-instance ``forward``)."""
    handle, index = self.__dict__[SITE_ATTR]
    if attn_mask is not None or is_causal:
        raise ValueError("a pruned ViT cannot take attn_mask/is_causal; call the model without them")
    run = handle.runs.enter(index, x, handle.trace)
    state = run.state
    if not run.recompute:
        state.record(x)
    bias = state.attn_bias(x.dtype, bool(getattr(handle.config, "prop_attn", False)))
    settings = handle.settings.get(index)
    if settings is None:
        x = type(self).forward(self, x, attn_mask=bias)
    else:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=bias)))
        qkv = run.captured.pop(index)
        ctx = LayerContext(
            keys=keys_from_qkv(qkv, self.attn.num_heads, self.attn.k_norm),
            num_protected=handle.num_protected,
            valid=state.valid,
            cls_attention=_cls_attention_of(self, qkv, bias) if handle.num_protected > 0 else None,
            tokens=x,
            layer=index,
        )
        x = state.apply(x, handle.spec.select(ctx, settings, handle.config))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    handle.runs.leave(index, run)
    return x


def _pool(self: torch.nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """timm's pooling, ignoring padded positions and weighting merged tokens by size."""
    state = self.__dict__[SAINT_ATTR].state
    pool_type = self.global_pool if pool_type is None else pool_type
    if (state.valid is None and state.sizes is None) or pool_type in ("token", ""):
        return type(self).pool(self, x, pool_type)
    if pool_type != "avg" or self.attn_pool is not None:
        raise ValueError(f"global_pool={pool_type!r} cannot ignore padded/merged tokens; use 'avg' or 'token'")
    start = 0 if self.pool_include_prefix else self.num_prefix_tokens
    w = torch.ones(x.shape[:2] + (1,), dtype=x.dtype, device=x.device)
    if state.sizes is not None:
        w = state.sizes.to(x.dtype)
    if state.valid is not None:
        w = w * state.valid[..., None].to(x.dtype)
    w = w[:, start:]
    return (x[:, start:] * w).sum(1) / w.sum(1)


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
        return attn.q_norm(q), attn.k_norm(k)


class TimmViT(Adapter):
    """timm ``VisionTransformer``: sites are ``model.blocks``."""

    name = "timm_vit"

    def matches(self, model: torch.nn.Module) -> bool:
        return matches(model)

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
        pe = model.patch_embed
        ph, pw = (int(v) for v in pe.patch_size)
        if inputs is None or not getattr(pe, "dynamic_img_size", False):
            gh, gw = (int(v) for v in pe.grid_size)
        else:
            gh, gw = int(inputs.shape[-2]) // ph, int(inputs.shape[-1]) // pw
        return Grid(gh, gw, (ph, pw))

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float) -> float:
        blk = model.blocks[0]
        return vit_block_flops(n_in, n_out, blk.norm1.normalized_shape[0], blk.mlp.fc1.out_features)

    def probe(self, model: torch.nn.Module) -> Probe:
        return TimmProbe(model, self.sites(model))

    def patch(self, model: torch.nn.Module, method: Any = "saint", trace: bool = False, **kwargs: Any) -> TimmPatch:
        return patch(model, method, trace=trace, **kwargs)

    def unpatch(self, model: torch.nn.Module) -> None:
        unpatch(model)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        emb = model.forward_head(model.forward_features(inputs), pre_logits=True)
        if int(getattr(model, "num_classes", 0) or 0) <= 0:
            return emb, None
        return emb, model.get_classifier()(emb)


ADAPTER = TimmViT()

"""Hugging Face AIMv2 (transformers 5): ``Aimv2VisionModel`` and the vision tower of the
dual encoder ``Aimv2Model`` (image features and image-text logits pruned, the text side
untouched).

An AIMv2 layer is a pre-norm layer with RMS norms and a SwiGLU MLP, so it runs through
:mod:`saint.adapters.hf_encoder` (shared with CLIP/SigLIP) once :func:`layer_parts` says
where its parts are. No class token: the class-attention methods are refused. The
attention-pooling head (a learned query over the final tokens) is wrapped to run per image
over its real tokens, merged keys weighted by ``log(size)``. Without a head
(``use_head=False``) the protocol's embedding is each image's mean over its real tokens,
weighted by the number of original tokens each one stands for.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.nn.functional as F

from ..methods import MethodSpec
from .base import FamilyAdapter, Grid, Probe, Site, select_at_of, vit_block_flops
from .common import SAINT_ATTR, SITE_ATTR, get_handle
from .hf_encoder import LayerParts, ProjectionProbe, encoder_sites, patch_encoder, unpatch_encoder


def _classes() -> dict[str, type] | None:
    try:
        from transformers.models.aimv2 import modeling_aimv2 as m
    except ImportError:  # transformers not installed, or too old for AIMv2
        return None
    return {"tower": m.Aimv2VisionModel, "dual": m.Aimv2Model, "layer": m.Aimv2EncoderLayer,
            "attn": m.Aimv2Attention, "head": m.Aimv2AttentionPoolingHead}


def matches(model: torch.nn.Module) -> bool:
    """True for ``Aimv2VisionModel`` and ``Aimv2Model`` (never imports transformers itself)."""
    if sys.modules.get("transformers") is None:
        return False
    c = _classes()
    return c is not None and isinstance(model, (c["tower"], c["dual"]))


def _tower_of(model: torch.nn.Module) -> torch.nn.Module:
    c = _classes()
    return model.vision_model if c is not None and isinstance(model, c["dual"]) else model


def layer_parts(layer: torch.nn.Module) -> LayerParts:
    """Where an AIMv2 encoder layer keeps its parts (RMS norms, SwiGLU ``ffn``; no layer scale)."""
    a = layer.attention
    return LayerParts(layer.rms_norm1, a, a.q_proj, a.k_proj, a.v_proj, a.out_proj, int(a.num_heads),
                      int(a.head_dim), float(a.scale), float(a.dropout), layer.rms_norm2, layer.ffn)


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
    kernel: str = "auto", **kwargs: Any,
) -> Any:
    """Patch an AIMv2 vision model (or an ``Aimv2Model``'s vision tower) in place (see :func:`saint.patch`)."""
    c = _classes()
    tower = _tower_of(model)
    head = tower.head if getattr(tower, "use_head", False) else None
    if head is not None and type(head) is not c["head"]:  # type: ignore[index]
        raise TypeError(f"unsupported pooling head {type(head).__name__}; saint supports Aimv2AttentionPoolingHead")
    cfg = tower.config
    num_patches = (int(cfg.image_size) // int(cfg.patch_size)) ** 2
    handle = patch_encoder(tower, list(tower.encoder.layers), "encoder.layers", c["layer"], c["attn"],  # type: ignore[index]
                           layer_parts, 0, num_patches, method, kwargs, trace, layout, kernel)
    if head is not None:
        head.__dict__[SITE_ATTR] = (handle, None)
        head.forward = types.MethodType(_head_forward, head)
    if tower is not model:
        model.__dict__[SAINT_ATTR] = handle
        handle.patched_through(tower, model)
    return handle


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    handle = get_handle(model)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by saint")
    handle.check_unpatch(model)
    tower = handle.tower
    if tower is not model:
        model.__dict__.pop(SAINT_ATTR)
    unpatch_encoder(tower, list(tower.encoder.layers))
    head = getattr(tower, "head", None)
    if head is not None:
        head.__dict__.pop("forward", None)
        head.__dict__.pop(SITE_ATTR, None)


def _head_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """AIMv2's attention-pooling head with its own projections: per image over its real
    tokens, merged keys weighted by ``log(size)``; the model's own call when every token is
    real and whole."""
    handle = self.__dict__[SITE_ATTR][0]
    state = handle.state
    bias = state.attn_bias(hidden_states.dtype, handle.config.size_bias)
    if bias is None:
        return type(self).forward(self, hidden_states)
    bias = bias[:, 0, 0, :]
    if bias.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"the pooling head got {tuple(hidden_states.shape[:2])} tokens but the tower's last forward "
            f"produced {tuple(bias.shape)}; call the head only through the patched model"
        )
    if state.valid is None:
        return _pool(self, hidden_states, bias)
    counts = state.valid.sum(dim=1).tolist()  # padding (NaN when packed) never reaches the head's matmuls
    return torch.cat([_pool(self, hidden_states[i : i + 1, :n], bias[i : i + 1, :n]) for i, n in enumerate(counts)])


def _pool(head: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    h = head.num_heads
    k = head.k_proj(x).reshape(b, n, h, c // h).transpose(1, 2)
    v = head.v_proj(x).reshape(b, n, h, c // h).transpose(1, 2)
    q = head.cls_token.expand(b, -1, -1).reshape(b, 1, h, c // h).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :].to(q.dtype))
    return head.output_proj(out.transpose(1, 2).reshape(b, 1, c).mean(dim=1))


# ---------------------------------------------------------------------------- protocol
class HFAimv2(FamilyAdapter):
    """AIMv2 vision towers: sites are ``encoder.layers``."""

    name = "hf_aimv2"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return encoder_sites(list(_tower_of(model).encoder.layers), "encoder.layers", layer_parts)

    def protected(self, model: torch.nn.Module) -> int:
        return 0

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        cfg = _tower_of(model).config
        p = int(cfg.patch_size)
        h, w = (int(cfg.image_size),) * 2 if inputs is None else tuple(inputs.shape[-2:])
        return Grid(h // p, w // p, (p, p))

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        cfg = _tower_of(model).config  # SwiGLU: three matmuls count as 1.5x its width's two
        return vit_block_flops(n_in, n_out, int(cfg.hidden_size), 1.5 * int(cfg.intermediate_size),
                               select_at_of(model, select_at))

    def probe(self, model: torch.nn.Module) -> Probe:
        return ProjectionProbe(self.sites(model), num_prefix=0, has_cls=False)

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        if _tower_of(model) is not model:  # the image side of the dual encoder
            return model.get_image_features(pixel_values=inputs)
        return model(pixel_values=inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.forward(model, inputs)
        if out.pooler_output is not None:
            return out.pooler_output, None
        tokens = out.last_hidden_state  # no head: the mean of each image's real tokens, by size
        handle = get_handle(model)
        state = None if handle is None else handle.state
        weight = torch.ones_like(tokens[..., :1])
        if state is not None and state.sizes is not None:
            weight = state.sizes.to(tokens.dtype)
        if state is not None and state.valid is not None:
            weight = weight * state.valid[..., None]
        return (tokens.nan_to_num() * weight).sum(dim=1) / weight.sum(dim=1), None


ADAPTER = HFAimv2()

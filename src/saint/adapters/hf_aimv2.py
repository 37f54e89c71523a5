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
from typing import Any

import torch
import torch.nn.functional as F

from ..methods import MethodSpec
from .base import Grid, select_at_of, vit_block_flops
from .common import get_handle
from .hf_encoder import (
    ClassFreeTower,
    LayerParts,
    TowerClasses,
    pool_per_image,
    unpatch_tower_of,
)

CLASSES = TowerClasses("transformers.models.aimv2.modeling_aimv2", "Aimv2VisionModel", "Aimv2Model",
                       "Aimv2EncoderLayer", "Aimv2Attention", "Aimv2AttentionPoolingHead")
matches = CLASSES.matches
_tower_of = CLASSES.tower_of


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
    cfg = _tower_of(model).config
    num_patches = (int(cfg.image_size) // int(cfg.patch_size)) ** 2
    return CLASSES.patch(model, layer_parts, 0, num_patches, _head_forward, method, kwargs, trace, layout, kernel)


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    unpatch_tower_of(model)


def _head_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """AIMv2's attention-pooling head with its own projections: per image over its real
    tokens, merged keys weighted by ``log(size)``; the model's own call when every token is
    real and whole."""
    return pool_per_image(self, hidden_states, lambda h, bias: _pool(self, h, bias),
                          lambda: type(self).forward(self, hidden_states))


def _pool(head: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    h = head.num_heads
    k = head.k_proj(x).reshape(b, n, h, c // h).transpose(1, 2)
    v = head.v_proj(x).reshape(b, n, h, c // h).transpose(1, 2)
    q = head.cls_token.expand(b, -1, -1).reshape(b, 1, h, c // h).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :].to(q.dtype))
    return head.output_proj(out.transpose(1, 2).reshape(b, 1, c).mean(dim=1))


# ---------------------------------------------------------------------------- protocol
class HFAimv2(ClassFreeTower):
    """AIMv2 vision towers: sites are ``encoder.layers``."""

    name = "hf_aimv2"
    family = sys.modules[__name__]
    classes = CLASSES
    parts = staticmethod(layer_parts)

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        cfg = _tower_of(model).config
        p = int(cfg.patch_size)
        h, w = (int(cfg.image_size),) * 2 if inputs is None else tuple(inputs.shape[-2:])
        return Grid(h // p, w // p, (p, p))

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        cfg = _tower_of(model).config  # SwiGLU: three matmuls count as 1.5x its width's two
        return vit_block_flops(n_in, n_out, int(cfg.hidden_size), 1.5 * int(cfg.intermediate_size),
                               select_at_of(model, select_at))

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        return self.call(model, pixel_values=inputs)

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

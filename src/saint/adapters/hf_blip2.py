"""Hugging Face BLIP-2 and InstructBLIP: the vision tower (``Blip2VisionModel``,
``InstructBlipVisionModel``) alone or inside the models that hold it as ``vision_model``
(``Blip2ForConditionalGeneration``, ``Blip2Model``, ``Blip2VisionModelWithProjection``,
``Blip2ForImageTextRetrieval``, ``InstructBlipForConditionalGeneration``, ``InstructBlipModel``), and
InstructBLIP-Video's (``InstructBlipVideoForConditionalGeneration``, ``InstructBlipVideoModel``,
whose frames reach the tower as a batch of images: each frame gets its own budget).

The tower is a ViT with a class token, a fused q/k/v projection (``LayerParts.qkv``) and an
attention that takes no mask, so its layers run through :mod:`saint.adapters.hf_encoder` with
saint's attention wherever a layer needs a mask or selects. Its tokens reach the language
model only through the Q-Former's cross-attention, which the wrapper calls with a mask of
ones: a forward pre-hook on the Q-Former hands it saint's key mask of the tower's last call
instead (padding masked, a merged token's key biased by ``log(size)``, as in the tower;
transformers passes a prepared 4-D mask through as it is) and zeros in the padding rows. The
query tokens, and so the language model's input, keep their length: pruning saves the
tower's compute, and each image's query outputs are the image's alone.

The protocol (calibration, benchmarks, analysis) reads the vision tower: its pooled class token.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch

from ..methods import MethodSpec
from .base import FamilyAdapter, Grid, Probe, Site, select_at_of, vit_block_flops
from .common import SITE_ATTR, Hooked, transformers_classes
from .hf_encoder import (
    LayerParts,
    ProjectionProbe,
    encoder_sites,
    fused_part,
    patch_encoder,
    patched_through,
    unpatch_tower_of,
)
from .hf_vit import patch_grid

LAYERS = "encoder.layers"
# (transformers module, tower, encoder layer, attention, the models holding the tower as ``vision_model``)
FAMILIES = (
    ("blip_2", "Blip2VisionModel", "Blip2EncoderLayer", "Blip2Attention",
     ("Blip2ForConditionalGeneration", "Blip2Model", "Blip2VisionModelWithProjection", "Blip2ForImageTextRetrieval")),
    ("instructblip", "InstructBlipVisionModel", "InstructBlipEncoderLayer", "InstructBlipAttention",
     ("InstructBlipForConditionalGeneration", "InstructBlipModel")),
    ("instructblipvideo", "InstructBlipVideoVisionModel", "InstructBlipVideoEncoderLayer", "InstructBlipVideoAttention",
     ("InstructBlipVideoForConditionalGeneration", "InstructBlipVideoModel")),
)


@functools.cache
def _families() -> list[tuple[type, type, type, tuple[type, ...]]]:
    """(tower, layer, attention, wrappers) of each family this transformers has."""
    out = []
    for module, tower, layer, attn, wrappers in FAMILIES:
        classes = transformers_classes(module, tower, layer, attn, *wrappers)
        if len(classes) == 3 + len(wrappers):
            out.append((classes[0], classes[1], classes[2], classes[3:]))
    return out


def _find(model: torch.nn.Module) -> tuple[tuple[type, type, type, tuple[type, ...]], torch.nn.Module] | None:
    for family in _families():
        if isinstance(model, family[0]):
            return family, model
        if isinstance(model, family[3]) and isinstance(getattr(model, "vision_model", None), family[0]):
            return family, model.vision_model
    return None


def matches(model: torch.nn.Module) -> bool:
    """True for the towers and the models that hold one (never imports transformers itself)."""
    return sys.modules.get("transformers") is not None and _find(model) is not None


def _found(model: torch.nn.Module) -> tuple[tuple[type, type, type, tuple[type, ...]], torch.nn.Module]:
    found = _find(model)
    if found is None:
        raise TypeError(f"expected a Hugging Face BLIP-2, InstructBLIP or InstructBLIP-Video model, "
                        f"got {type(model).__name__}")
    return found


def layer_parts(layer: torch.nn.Module) -> LayerParts:
    """Where a BLIP-2 / InstructBLIP vision layer keeps its parts: ``layer_norm1``, the fused
    ``qkv`` and ``projection`` of ``self_attn``, ``layer_norm2``, ``mlp``."""
    a = layer.self_attn
    return LayerParts(layer.layer_norm1, a, fused_part(a.qkv, 0), fused_part(a.qkv, 1), fused_part(a.qkv, 2),
                      a.projection, int(a.num_heads), int(a.head_dim), float(a.scale), float(a.attention_dropout),
                      layer.layer_norm2, layer.mlp, qkv=a.qkv, own_attention=True, branch_first=True)


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
    kernel: str = "auto", **kwargs: Any,
) -> Any:
    """Patch the vision tower of ``model`` in place (see :func:`saint.patch`), and the
    Q-Former's key mask where ``model`` holds one."""
    (_, layer_cls, attn_cls, _), tower = _found(model)
    cfg = tower.config
    handle = patch_encoder(tower, list(tower.get_submodule(LAYERS)), LAYERS, layer_cls, attn_cls, layer_parts, 1,
                           (int(cfg.image_size) // int(cfg.patch_size)) ** 2, method, kwargs, trace, layout, kernel)
    qformer = getattr(model, "qformer", None) if tower is not model else None
    if qformer is not None:
        qformer.__dict__[SITE_ATTR] = (handle, None)
        handle.hooks.append(qformer.register_forward_pre_hook(_qformer_mask, with_kwargs=True))
        handle.hooked.append(Hooked(model, _qformer, qformer, f"{type(model).__name__}'s qformer"))
    return patched_through(model, tower, handle)


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    _found(model)
    unpatch_tower_of(model)


def _qformer(model: torch.nn.Module) -> torch.nn.Module:
    return model.qformer


def _qformer_mask(qformer: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook on the Q-Former: where the tower's last call in this thread left padding
    or merged tokens, its cross-attention gets saint's key mask (4-D, additive) in place of the
    wrapper's mask of ones, and the padding rows of the image tokens are zeros (not NaN)."""
    states = kwargs.get("encoder_hidden_states")
    if states is None:
        return None
    handle = qformer.__dict__[SITE_ATTR][0]
    dtype = qformer.dtype  # the Q-Former runs in its own (fp32) dtype
    bias = handle.state.attn_bias(dtype, handle.config.size_bias)
    if bias is None:
        return None
    if bias.shape[0] != states.shape[0] or bias.shape[-1] != states.shape[1]:
        raise ValueError(f"the Q-Former got {tuple(states.shape[:2])} image tokens but the tower's last forward "
                         f"produced {(bias.shape[0], bias.shape[-1])}; call it only through the patched model")
    kwargs = dict(kwargs)
    kwargs["encoder_hidden_states"] = states.masked_fill(bias[:, 0, 0, :, None] == float("-inf"), 0.0)
    kwargs["encoder_attention_mask"] = bias
    return args, kwargs


class HFBlip2(FamilyAdapter):
    """BLIP-2 / InstructBLIP: sites are the vision tower's ``encoder.layers``; inputs are image batches."""

    name = "hf_blip2"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return encoder_sites(list(_found(model)[1].get_submodule(LAYERS)), LAYERS, layer_parts)

    def protected(self, model: torch.nn.Module) -> int:
        return 1

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        return patch_grid(_found(model)[1], inputs)

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        cfg = _found(model)[1].config
        return vit_block_flops(n_in, n_out, int(cfg.hidden_size), int(cfg.intermediate_size),
                               select_at_of(model, select_at))

    def probe(self, model: torch.nn.Module) -> Probe:
        return ProjectionProbe(self.sites(model), layer_parts, num_prefix=1, has_cls=True)

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        return _found(model)[1](pixel_values=inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.forward(model, inputs).pooler_output, None


ADAPTER = HFBlip2()

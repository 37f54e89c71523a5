"""Hugging Face vision towers (transformers 5): ``CLIPVisionModel``,
``CLIPVisionModelWithProjection`` and ``SiglipVisionModel``; the vision tower of the dual
encoders ``CLIPModel`` and ``SiglipModel`` (their ``vision_model``: image features and
image-text logits are pruned, the text side is untouched); MetaCLIP 2's
``MetaClip2VisionModel``, ``MetaClip2VisionModelWithProjection`` and ``MetaClip2Model``,
Chinese-CLIP's ``ChineseCLIPVisionModel`` / ``ChineseCLIPModel`` and AltCLIP's
``AltCLIPVisionModel`` / ``AltCLIPModel`` (CLIP's vision tower under their own class
names); the image classifiers ``CLIPForImageClassification``,
``MetaClip2ForImageClassification`` and ``SiglipForImageClassification``, whose head
averages the tower's tokens (it reads each image's real ones, size-weighted:
:mod:`saint.adapters.hf_mean_head`; Siglip2's: :mod:`saint.adapters.hf_siglip2`); also the vision
tower inside ``LlavaForConditionalGeneration`` (``model.model.vision_tower``).

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
:meth:`HFEncoderPatch.hidden_state_valid` (``saint.token_mask(model, i)`` for layer
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

import functools
import importlib
import sys
from typing import Any

import torch

from ..methods import MethodSpec
from . import hf_mean_head
from .base import FamilyAdapter, Grid, Probe, Site, select_at_of, vit_block_flops
from .hf_encoder import (
    HFEncoderPatch,
    LayerParts,
    ProjectionProbe,
    attach_head,
    encoder_sites,
    patch_encoder,
    patched_through,
    pool_per_image,
    unpatch_encoder,
    unpatch_tower_of,
)

# CLIP's architecture under other class names: (module, tower, tower with projection, dual
# encoder, classifier, encoder layer, attention); MetaCLIP 2, Chinese-CLIP and AltCLIP (whose
# text side is an XLM-R) where this transformers has them
CLIP_LIKE = (
    ("clip", "CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "CLIPForImageClassification",
     "CLIPEncoderLayer", "CLIPAttention"),
    ("metaclip_2", "MetaClip2VisionModel", "MetaClip2VisionModelWithProjection", "MetaClip2Model",
     "MetaClip2ForImageClassification", "MetaClip2EncoderLayer", "MetaClip2Attention"),
    ("chinese_clip", "ChineseCLIPVisionModel", None, "ChineseCLIPModel", None, "ChineseCLIPVisionLayer",
     "ChineseCLIPVisionAttention"),
    ("altclip", "AltCLIPVisionModel", None, "AltCLIPModel", None, "AltCLIPEncoderLayer", "AltCLIPAttention"),
)


@functools.cache
def _hf_classes() -> dict[str, Any] | None:
    """The supported classes; CLIP-like entries are tuples, one class per family of
    :data:`CLIP_LIKE` that this transformers has (``clip_proj`` and ``clip_classifier`` only
    where a family has one)."""
    try:
        from transformers.models.siglip import modeling_siglip as siglip
    except ImportError:  # transformers not installed
        return None
    families = []
    for module, *names in CLIP_LIKE:
        try:
            mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        except ImportError:  # an older transformers
            continue
        families.append([None if n is None else getattr(mod, n) for n in names])
    tower, proj, dual, classifier, layer, attn = zip(*families, strict=True)
    return {
        "clip": tower,
        "clip_proj": tuple(c for c in proj if c is not None),
        "clip_dual": dual,
        "clip_classifier": tuple(c for c in classifier if c is not None),
        "clip_layer": layer,
        "clip_attn": attn,
        "siglip_dual": siglip.SiglipModel,
        "siglip": siglip.SiglipVisionModel,
        "siglip_layer": siglip.SiglipEncoderLayer,
        "siglip_attn": siglip.SiglipAttention,
        "siglip_head": siglip.SiglipMultiheadAttentionPoolingHead,
        "siglip_classifier": siglip.SiglipForImageClassification,
    }


def matches(model: torch.nn.Module) -> bool:
    """True for the supported Hugging Face vision models (never imports transformers itself)."""
    if sys.modules.get("transformers") is None:  # a transformers model implies it is imported
        return False
    c = _hf_classes()
    return c is not None and isinstance(model, (*c["clip"], c["siglip"], *_wrappers(c)))


def _wrappers(c: dict[str, Any]) -> tuple[type, ...]:
    """The classes that hold a tower as ``vision_model``."""
    return (*c["clip_proj"], *c["clip_dual"], c["siglip_dual"], *c["clip_classifier"], c["siglip_classifier"])


def _tower_of(model: torch.nn.Module) -> torch.nn.Module:
    c = _hf_classes()
    if c is not None and isinstance(model, _wrappers(c)):
        return model.vision_model
    return model


def _is_dual(model: torch.nn.Module) -> bool:
    """CLIP / SigLIP with both encoders: images go through ``get_image_features``."""
    c = _hf_classes()
    return c is not None and isinstance(model, (*c["clip_dual"], c["siglip_dual"]))


def _is_clip(tower: torch.nn.Module) -> bool:
    return isinstance(tower, _hf_classes()["clip"])  # type: ignore[index]


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
    kernel: str = "auto", **kwargs: Any,
) -> HFEncoderPatch:
    """Patch a CLIP/SigLIP vision model in place (see :func:`saint.patch`); a classifier's
    head reads each image's real tokens (:mod:`saint.adapters.hf_mean_head`)."""
    tower = _tower_of(model)
    hf_mean_head.check(model)
    return patched_through(model, tower, patch_tower(tower, method, trace=trace, layout=layout, kernel=kernel,
                                                     **kwargs))


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    unpatch_tower_of(model)


def patch_tower(
    tower: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
    kernel: str = "auto", **kwargs: Any,
) -> HFEncoderPatch:
    """Prune the tokens of a ``CLIPVisionModel`` / ``SiglipVisionModel`` in place.

    Usable on a stand-alone tower or one inside a composite model (LLaVA's
    ``model.model.vision_tower``). Keyword arguments are the method's settings, with
    the same per-layer semantics as every adapter. The returned handle (also stored
    on the tower) exposes ``stats()``, ``state.valid`` (validity of the last layer's
    output in the last forward, None when rectangular) and ``hidden_state_valid(i)``.
    ``layout`` / ``kernel``: see :func:`saint.patch`.
    """
    c = _hf_classes()
    if c is None or not isinstance(tower, (*c["clip"], c["siglip"])):
        raise TypeError("patch_tower expects a CLIPVisionModel (or MetaClip2, ChineseCLIP or AltCLIP VisionModel) or "
                        f"SiglipVisionModel, got {type(tower).__name__}")
    clip = _is_clip(tower)
    head = getattr(tower, "head", None) if getattr(tower, "use_head", False) else None
    if head is not None and type(head) is not c["siglip_head"]:
        raise TypeError(f"unsupported pooling head {type(head).__name__}; saint supports SiglipMultiheadAttentionPoolingHead")
    if clip:  # the layer and attention classes of the tower's own family
        which = next(i for i, cls in enumerate(c["clip"]) if isinstance(tower, cls))
        layer_cls, attn_cls = c["clip_layer"][which], c["clip_attn"][which]
    else:
        layer_cls, attn_cls = c["siglip_layer"], c["siglip_attn"]
    handle = patch_encoder(tower, list(tower.encoder.layers), "encoder.layers", layer_cls, attn_cls, layer_parts,
                           1 if clip else 0, int(tower.embeddings.num_patches), method, kwargs, trace, layout, kernel)
    attach_head(handle, head, pooling_head_forward)
    return handle


def layer_parts(layer: torch.nn.Module) -> LayerParts:
    """Where a CLIP/SigLIP/Siglip2 encoder layer keeps its parts (no layer scale, no drop path)."""
    a = layer.self_attn
    return LayerParts(layer.layer_norm1, a, a.q_proj, a.k_proj, a.v_proj, a.out_proj, int(a.num_heads),
                      int(a.head_dim), float(a.scale), float(a.dropout), layer.layer_norm2, layer.mlp)


def unpatch_tower(tower: torch.nn.Module) -> None:
    """Undo :func:`patch_tower`: the tower computes exactly what it did before."""
    unpatch_encoder(tower)


def pooling_head_forward(self: torch.nn.Module, hidden_state: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """SigLIP's (and Siglip2's) attention-pooling head, run with its own modules in HF
    order: per image over its real tokens, merged keys weighted by ``log(size)``. The
    model's own call (with Siglip2's padding mask) when every token is real and whole."""

    def own() -> torch.Tensor:
        mask = args[0] if args else kwargs.get("attention_mask")
        if mask is not None and mask.shape[-1] != hidden_state.shape[1]:  # Siglip2's mask, from before a step
            return type(self).forward(self, hidden_state)
        return type(self).forward(self, hidden_state, *args, **kwargs)

    return pool_per_image(self, hidden_state, lambda h, bias: _pool_head(self, h, bias), own)


def _pool_head(head: torch.nn.Module, hidden_state: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    probe = head.probe.repeat(hidden_state.shape[0], 1, 1)
    x = head.attention(probe, hidden_state, hidden_state, key_padding_mask=bias)[0]
    residual = x
    x = head.layernorm(x)
    x = residual + head.mlp(x)
    return x[:, 0]


# ---------------------------------------------------------------------------- protocol
class HFVision(FamilyAdapter):
    """Hugging Face CLIP / SigLIP vision towers: sites are ``encoder.layers``."""

    name = "hf_vision"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return encoder_sites(list(_tower_of(model).encoder.layers), "encoder.layers", layer_parts)

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
        has_cls = _is_clip(_tower_of(model))
        return ProjectionProbe(self.sites(model), layer_parts, num_prefix=int(has_cls), has_cls=has_cls)



    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        if _is_dual(model):  # the image side of a dual encoder: projected pooled features
            return model.get_image_features(pixel_values=inputs)
        return model(pixel_values=inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hf_mean_head.averages_tokens(model):  # a classifier: the features it reads, and its logits
            return hf_mean_head.embed(model, lambda: self.forward(model, inputs))
        out = self.forward(model, inputs)
        emb = getattr(out, "image_embeds", None)
        return (out.pooler_output if emb is None else emb), None


ADAPTER = HFVision()

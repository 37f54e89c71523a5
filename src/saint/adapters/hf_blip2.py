"""Hugging Face BLIP, BLIP-2 and InstructBLIP: the vision tower (``BlipVisionModel``, ``Blip2VisionModel``,
``InstructBlipVisionModel``) alone or inside the models that hold it as ``vision_model``
(``Blip2ForConditionalGeneration``, ``Blip2Model``, ``Blip2VisionModelWithProjection``,
``Blip2ForImageTextRetrieval``, ``InstructBlipForConditionalGeneration``, ``InstructBlipModel``), and
InstructBLIP-Video's (``InstructBlipVideoForConditionalGeneration``, ``InstructBlipVideoModel``,
whose frames reach the tower as a batch of images: each frame gets its own budget); BLIP's
(``BlipForConditionalGeneration``, ``BlipForQuestionAnswering``, ``BlipForImageTextRetrieval``,
``BlipModel``), whose text decoder or encoder cross-attends the image tokens themselves.

The tower is a ViT with a class token, a fused q/k/v projection (``LayerParts.qkv``) and an
attention that takes no mask, so its layers run through :mod:`saint.adapters.hf_encoder` with
saint's attention wherever a layer needs a mask or selects. Its tokens reach the language
model only through the Q-Former's cross-attention, which the wrapper calls with a mask of
ones: a forward pre-hook on the Q-Former hands it saint's key mask of the tower's last call
instead (padding masked, a merged token's key biased by ``log(size)``, as in the tower;
transformers passes a prepared 4-D mask through as it is) and zeros in the padding rows. The
query tokens, and so the language model's input, keep their length: pruning saves the
tower's compute, and each image's query outputs are the image's alone. BLIP's text model
cross-attends every image token at every step, so there the same hook (on the module that
cross-attends: :data:`READERS`) also shortens what each generated token reads.

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
    attach_reader,
    encoder_sites,
    fused_part,
    image_key_mask,
    patch_encoder,
    patched_through,
    unpatch_tower_of,
)
from .hf_vit import patch_grid

LAYERS = "encoder.layers"
# (transformers module, tower, encoder layer, attention, the models holding the tower as ``vision_model``)
FAMILIES = (
    ("blip", "BlipVisionModel", "BlipEncoderLayer", "BlipAttention",
     ("BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval", "BlipModel")),
    ("blip_2", "Blip2VisionModel", "Blip2EncoderLayer", "Blip2Attention",
     ("Blip2ForConditionalGeneration", "Blip2Model", "Blip2VisionModelWithProjection", "Blip2ForImageTextRetrieval")),
    ("instructblip", "InstructBlipVisionModel", "InstructBlipEncoderLayer", "InstructBlipAttention",
     ("InstructBlipForConditionalGeneration", "InstructBlipModel")),
    ("instructblipvideo", "InstructBlipVideoVisionModel", "InstructBlipVideoEncoderLayer", "InstructBlipVideoAttention",
     ("InstructBlipVideoForConditionalGeneration", "InstructBlipVideoModel")),
)


# the module of each model that cross-attends the image tokens (BLIP-2's and InstructBLIP's: the Q-Former)
READERS = {"BlipForConditionalGeneration": "text_decoder", "BlipForQuestionAnswering": "text_encoder",
           "BlipForImageTextRetrieval": "text_encoder", "BlipModel": "text_model"}


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
        raise TypeError(f"expected a Hugging Face BLIP, BLIP-2, InstructBLIP or InstructBLIP-Video model, "
                        f"got {type(model).__name__}")
    return found


def layer_parts(layer: torch.nn.Module) -> LayerParts:
    """Where a BLIP-2 / InstructBLIP vision layer keeps its parts: ``layer_norm1``, the fused
    ``qkv`` and ``projection`` of ``self_attn``, ``layer_norm2``, ``mlp``."""
    a = layer.self_attn
    dropout = a.attention_dropout if hasattr(a, "attention_dropout") else a.dropout.p  # BLIP's: a Dropout module
    return LayerParts(layer.layer_norm1, a, fused_part(a.qkv, 0), fused_part(a.qkv, 1), fused_part(a.qkv, 2),
                      a.projection, int(a.num_heads), int(a.head_dim), float(a.scale), float(dropout),
                      layer.layer_norm2, layer.mlp, qkv=a.qkv, own_attention=True, branch_first=True,
                      own_attend=lambda x: a(hidden_states=x)[0])


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
    name = _reader_name(model)
    if tower is not model and getattr(model, name, None) is not None:
        reader = attach_reader(handle, model, _reader, name)
        for path, attn in reader.named_modules():
            if path.endswith("crossattention.self"):  # BLIP's text model: see _cross_attention_mask
                attn.__dict__[SITE_ATTR] = (handle, None)
                handle.hooks.append(attn.register_forward_pre_hook(_cross_attention_mask, with_kwargs=True))
                handle.hooked.append(Hooked(reader, functools.partial(_submodule, path=path), attn,
                                            f"{type(model).__name__}'s {name}.{path}"))
    return patched_through(model, tower, handle)


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    _found(model)
    unpatch_tower_of(model)


def _reader_name(model: torch.nn.Module) -> str:
    """The attribute of ``model`` that cross-attends the image tokens (:data:`READERS`)."""
    return READERS.get(type(model).__name__, "qformer")


def _reader(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, _reader_name(model))


def _submodule(owner: torch.nn.Module, path: str) -> torch.nn.Module:
    return owner.get_submodule(path)


def _cross_attention_mask(attn: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook on each cross-attention of BLIP's text model, which in transformers 5
    reads no mask of its own (its layer hands the encoder's mask on as ``attention_mask``, which
    a cross-attention replaces by its ``encoder_attention_mask``, never passed): saint's key mask
    as that ``encoder_attention_mask``."""
    states = kwargs.get("encoder_hidden_states")
    bias = None if states is None else image_key_mask(attn, states)
    if bias is None:
        return None
    return args, {**kwargs, "encoder_attention_mask": bias}


class HFBlip2(FamilyAdapter):
    """BLIP / BLIP-2 / InstructBLIP: sites are the vision tower's ``encoder.layers``; inputs are image batches."""

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

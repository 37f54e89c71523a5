"""Hugging Face Kosmos-2 (``Kosmos2ForConditionalGeneration``, ``Kosmos2Model``, and
``Kosmos2VisionModel`` alone): a CLIP vision tower (``vision_model.model``) whose every token
reaches the language model only through the image-to-text projection, where a fixed set of
latent queries cross-attends the image tokens and themselves.

The tower's layers are CLIP's, so they run through :mod:`saint.adapters.hf_encoder` with CLIP's
parts (:func:`saint.adapters.hf_vision.layer_parts`). The projection's attention is called with
no mask: a forward pre-hook on it hands it saint's key mask of the tower's last call for the
image keys (padding masked, a merged token biased by ``log(size)``, as in the tower) and zeros
for the latent queries' own keys, and zeros the image tokens' padding rows (NaN after the
tower). The latent queries, and so the language model's input, keep their number: pruning
saves the tower's compute and the projection's keys, and each image's features are its alone.

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
    ProjectionProbe,
    encoder_sites,
    image_key_mask,
    patch_encoder,
    patched_through,
    unpatch_tower_of,
)
from .hf_vision import layer_parts
from .hf_vit import patch_grid

LAYERS = "encoder.layers"
NAMES = ("Kosmos2VisionModel", "Kosmos2VisionEncoderLayer", "Kosmos2VisionAttention", "Kosmos2Model",
         "Kosmos2ForConditionalGeneration")


@functools.cache
def _classes() -> tuple[type, ...] | None:
    """(vision model, encoder layer, attention, the two wrappers), or None without them."""
    classes = transformers_classes("kosmos2", *NAMES)
    return classes if len(classes) == len(NAMES) else None


def _tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vision transformer saint patches (``Kosmos2VisionModel.model``), or None."""
    c = _classes()
    if c is None:
        return None
    vision = model.vision_model if isinstance(model, c[3:]) else model
    return vision.model if isinstance(vision, c[0]) else None


def _found(model: torch.nn.Module) -> torch.nn.Module:
    tower = _tower(model)
    if tower is None:
        raise TypeError(f"expected a Hugging Face Kosmos-2 model, got {type(model).__name__}")
    return tower


def matches(model: torch.nn.Module) -> bool:
    """True for Kosmos-2's models and its vision model (never imports transformers itself)."""
    return sys.modules.get("transformers") is not None and _tower(model) is not None


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
    kernel: str = "auto", **kwargs: Any,
) -> Any:
    """Patch the vision tower of ``model`` in place (see :func:`saint.patch`), and the
    image-to-text projection's key mask where ``model`` holds one."""
    tower = _found(model)
    _, layer_cls, attn_cls, *_ = _classes()  # type: ignore[misc]
    cfg = tower.config
    handle = patch_encoder(tower, list(tower.get_submodule(LAYERS)), LAYERS, layer_cls, attn_cls, layer_parts, 1,
                           (int(cfg.image_size) // int(cfg.patch_size)) ** 2, method, kwargs, trace, layout, kernel)
    projection = getattr(model, "image_to_text_projection", None)
    if projection is not None:
        attn = projection.x_attn
        attn.__dict__[SITE_ATTR] = (handle, None)
        handle.hooks.append(attn.register_forward_pre_hook(_projection_mask, with_kwargs=True))
        handle.hooked.append(Hooked(model, _x_attn, attn, f"{type(model).__name__}'s image_to_text_projection"))
    return patched_through(model, tower, handle)


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    _found(model)
    unpatch_tower_of(model)


def _x_attn(model: torch.nn.Module) -> torch.nn.Module:
    return model.image_to_text_projection.x_attn


def _projection_mask(attn: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook on the projection's attention, whose keys are the image tokens then the
    latent queries: where the tower's last call in this thread left padding or merged tokens,
    saint's key mask for the image keys and zeros for the latents' (4-D, additive, as the
    attention takes it), and the image tokens' padding rows zeroed (not NaN)."""
    states = kwargs.get("encoder_hidden_states")
    latents = kwargs.get("hidden_states", args[0] if args else None)
    if states is None or latents is None:
        return None
    n = states.shape[1] - latents.shape[1]
    bias = image_key_mask(attn, states[:, :n])
    if bias is None:
        return None
    padding = (bias[:, 0, 0, :, None] == float("-inf")).expand(-1, -1, states.shape[-1])
    states = torch.cat([states[:, :n].masked_fill(padding, 0.0), states[:, n:]], dim=1)
    mask = torch.cat([bias, bias.new_zeros(*bias.shape[:3], latents.shape[1])], dim=-1)
    return args, {**kwargs, "encoder_hidden_states": states, "attention_mask": mask}


class HFKosmos2(FamilyAdapter):
    """Kosmos-2: sites are the vision tower's ``encoder.layers``; inputs are image batches."""

    name = "hf_kosmos2"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return encoder_sites(list(_found(model).get_submodule(LAYERS)), LAYERS, layer_parts)

    def protected(self, model: torch.nn.Module) -> int:
        return 1

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        return patch_grid(_found(model), inputs)

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        cfg = _found(model).config
        return vit_block_flops(n_in, n_out, int(cfg.hidden_size), int(cfg.intermediate_size),
                               select_at_of(model, select_at))

    def probe(self, model: torch.nn.Module) -> Probe:
        return ProjectionProbe(self.sites(model), layer_parts, num_prefix=1, has_cls=True)

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        return _found(model)(pixel_values=inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.forward(model, inputs).pooler_output, None


ADAPTER = HFKosmos2()

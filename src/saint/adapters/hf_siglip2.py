"""Hugging Face Siglip2 (transformers 5): ``Siglip2VisionModel``, the vision tower of
the dual encoder ``Siglip2Model`` (image features and image-text logits pruned, the text
side untouched) and ``Siglip2ForImageClassification`` (its classifier reads each image's
mean over its real tokens, size-weighted: :mod:`saint.adapters.hf_mean_head`).

Siglip2 takes NaFlex inputs: each image patchified at its own aspect ratio
(``spatial_shapes [B, 2]``), padded to ``max_num_patches`` and marked by
``pixel_attention_mask [B, N]``. A batch is therefore ragged before any pruning, and saint
starts it that way: the padding mask becomes the token state's validity at the first layer,
so with ``layout="packed"`` (default) padding patches are never computed (every layer runs
on the packed stream of real patches, attention per image) and with ``"padded"`` they are
masked as the model masks them. The layers run through :mod:`saint.adapters.hf_encoder`
(shared with CLIP/SigLIP); the model's padding mask is accepted only inside the patched
tower's call, where the state replaces it. The attention-pooling head runs per image over
its real tokens (merged keys weighted by ``log(size)``). ``last_hidden_state`` and
``hidden_states`` are the padded view (NaN at padding with ``layout="packed"``, as long as
the batch's longest image): :func:`saint.token_mask` marks the real tokens.

No class token: the class-attention methods (``attn``, the ``saint_match`` guard) are
refused. The adapter protocol (calibration, benchmarks, analysis) takes image batches
``[B, 3, H, W]``, patchified here exactly as Siglip2's image processor does with no
resizing (:func:`patchify`), or the processor's own dicts.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..methods import MethodSpec
from . import hf_mean_head
from .base import Grid, batch_to, select_at_of, vit_block_flops
from .common import SAINT_ATTR
from .hf_encoder import (
    ClassFreeTower,
    TowerClasses,
    tower_forward,
    unpatch_tower_of,
)
from .hf_vision import layer_parts, pooling_head_forward

INPUT_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


CLASSES = TowerClasses("transformers.models.siglip2.modeling_siglip2", "Siglip2VisionModel", "Siglip2Model",
                       "Siglip2EncoderLayer", "Siglip2Attention", "Siglip2MultiheadAttentionPoolingHead",
                       "Siglip2ForImageClassification")
matches = CLASSES.matches
_tower_of = CLASSES.tower_of


def patchify(images: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """Siglip2's inputs for image batches ``[B, 3, H, W]`` (normalised pixels, H and W
    multiples of ``patch_size``): patches ``[B, N, p * p * 3]`` in the image processor's
    order (row by row, each patch's pixels row by row, channels last), every patch real."""
    if images.dim() != 4 or images.shape[-2] % patch_size or images.shape[-1] % patch_size:
        raise ValueError(f"images must be [B, 3, H, W] with H and W multiples of {patch_size}, got {tuple(images.shape)}")
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    patches = images.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    return {
        "pixel_values": patches.reshape(b, gh * gw, patch_size * patch_size * c),
        "pixel_attention_mask": torch.ones(b, gh * gw, dtype=torch.int32, device=images.device),
        "spatial_shapes": torch.tensor([[gh, gw]] * b, dtype=torch.long, device=images.device),
    }


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
    kernel: str = "auto", **kwargs: Any,
) -> Any:
    """Patch a Siglip2 vision model (or a ``Siglip2Model``'s vision tower) in place (see :func:`saint.patch`)."""
    tower = _tower_of(model)
    handle = CLASSES.patch(model, layer_parts, 0, int(tower.config.num_patches), pooling_head_forward, method,
                           kwargs, trace, layout, kernel)
    tower.forward = types.MethodType(_tower_forward, tower)  # starts the first layer from the real patches
    return handle


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    unpatch_tower_of(model)


def _tower_forward(self: torch.nn.Module, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                   spatial_shapes: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """The tower's own forward, its first layer starting from the real patches that
    ``pixel_attention_mask`` marks."""
    handle = self.__dict__[SAINT_ATTR]
    valid = None if pixel_attention_mask is None else pixel_attention_mask.bool()
    with handle.runs.input_padding(valid):
        return tower_forward(self, pixel_values, pixel_attention_mask, spatial_shapes, **kwargs)


def _as_inputs(model: torch.nn.Module, inputs: Any) -> dict[str, torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return patchify(inputs, int(_tower_of(model).config.patch_size))
    return {k: inputs[k] for k in INPUT_KEYS}


# ---------------------------------------------------------------------------- protocol
class HFSiglip2(ClassFreeTower):
    """Siglip2 vision towers: sites are ``encoder.layers``; inputs are image batches
    ``[B, 3, H, W]`` or Siglip2 processor dicts."""

    name = "hf_siglip2"
    family = sys.modules[__name__]
    classes = CLASSES
    parts = staticmethod(layer_parts)

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        cfg = _tower_of(model).config
        p = int(cfg.patch_size)
        if inputs is None:
            side = int(round(int(cfg.num_patches) ** 0.5))
            return Grid(side, side, (p, p))
        d = _as_inputs(model, inputs)
        shapes = d["spatial_shapes"]
        if not bool((shapes == shapes[:1]).all()) or not bool(d["pixel_attention_mask"].bool().all()):
            raise ValueError("these Siglip2 images have different patch grids (or padding); "
                             "draw kept patches one image at a time")
        return Grid(int(shapes[0, 0]), int(shapes[0, 1]), (p, p))

    def max_patches(self, model: torch.nn.Module, inputs: Any = None) -> int:
        if inputs is None or isinstance(inputs, torch.Tensor):
            return super().max_patches(model, inputs)
        return int(inputs["pixel_attention_mask"].sum(dim=1).max())  # images at their own grids

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        layer = _tower_of(model).encoder.layers[0]
        return vit_block_flops(n_in, n_out, int(layer.embed_dim), int(layer.mlp.fc1.out_features),
                               select_at_of(model, select_at))

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        return self.call(model, **_as_inputs(model, inputs))

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hf_mean_head.averages_tokens(model):  # the classifier: the features it reads, and its logits
            return hf_mean_head.embed(model, lambda: self.forward(model, inputs))
        return self.forward(model, inputs).pooler_output, None

    def check_inputs(self, inputs: Any) -> None:
        if isinstance(inputs, torch.Tensor):
            return super().check_inputs(inputs)
        missing = [k for k in INPUT_KEYS if not isinstance(inputs, Mapping) or k not in inputs]
        if missing:
            raise ValueError(f"Siglip2 inputs are image batches [N, 3, H, W] or processor dicts with {INPUT_KEYS}; "
                             f"missing {missing}")
        return None

    def batch_size(self, inputs: Any) -> int:
        return int((inputs if isinstance(inputs, torch.Tensor) else inputs["pixel_values"]).shape[0])

    def split(self, inputs: Any, size: int) -> Iterator[Any]:
        if isinstance(inputs, torch.Tensor):
            yield from super().split(inputs, size)
            return
        for start in range(0, self.batch_size(inputs), size):
            yield {k: inputs[k][start : start + size] for k in INPUT_KEYS}

    def to(self, inputs: Any, device: torch.device, dtype: torch.dtype) -> Any:
        if isinstance(inputs, torch.Tensor):
            return super().to(inputs, device, dtype)
        return batch_to({k: inputs[k] for k in INPUT_KEYS}, device, dtype)


ADAPTER = HFSiglip2()

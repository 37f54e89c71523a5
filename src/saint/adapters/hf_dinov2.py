"""Hugging Face DINOv2 (transformers 5): ``Dinov2Model`` and ``Dinov2WithRegistersModel``.

Each encoder layer's ``forward`` is wrapped per instance and runs the layer's own modules
in the order transformers runs them (``norm1 -> attention -> layer_scale1 -> drop_path +
residual -> [selection] -> norm2 -> mlp -> layer_scale2 -> drop_path + residual``; the
machinery is shared with CLIP/SigLIP, :mod:`saint.adapters.hf_encoder`), attention through
the model's own kernel (sdpa or eager). Keys are read by a forward hook on
``attention.k_proj``. Ragged batches travel packed, attention per image through the
layer's own q/k/v/o projections; ``layout="padded"`` masks instead.

Protected tokens: the class token and the register tokens. ``pooler_output`` (the final
layer norm's class token) is per image; ``last_hidden_state`` and ``hidden_states`` are
padded with NaN after a ragged step (:func:`saint.token_mask`, :func:`saint.per_image`).

Refused: ``Dinov2ForImageClassification`` (it averages every position of
``last_hidden_state``, padding and merged tokens alike; patch its ``.dinov2`` and pool
with :func:`saint.per_image`) and ``Dinov2Backbone`` (spatial feature maps need every
patch). A ``Dinov2Model`` patched inside a classification model is not detected: its
classifier's mean would read the padding.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch

from ..methods import MethodSpec, make_config, require_site
from .base import (
    FamilyAdapter,
    Grid,
    Probe,
    Site,
    install_sites,
    remove_sites,
    select_at_of,
    vit_block_flops,
)
from .common import SAINT_ATTR, check_layout, check_static_counts, get_handle
from .hf_encoder import (
    HFEncoderPatch,
    LayerParts,
    ProjectionProbe,
    check_maskable,
    layer_forward,
    tower_forward,
)

# models that wrap a supported one but read its tokens in a way a pruned output cannot serve
REFUSED = {
    name: reason for names, reason in [
        (("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"),
         "its classifier averages every position of last_hidden_state (padding and merged tokens alike); "
         "patch its .dinov2 (a Dinov2Model) and pool the real tokens with saint.per_image(out, saint.token_mask(m))"),
        (("Dinov2Backbone", "Dinov2WithRegistersBackbone"),
         "its feature maps need every patch; prune a Dinov2Model instead"),
    ] for name in names
}


def _classes() -> dict[str, tuple[type, type, type]] | None:
    """``{family: (model, layer, attention)}`` classes, or None without transformers."""
    try:
        from transformers.models.dinov2 import modeling_dinov2 as d
        from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as r
    except ImportError:  # transformers not installed
        return None
    return {
        "dinov2": (d.Dinov2Model, d.Dinov2Layer, d.Dinov2Attention),
        "dinov2_registers": (r.Dinov2WithRegistersModel, r.Dinov2WithRegistersLayer, r.Dinov2WithRegistersAttention),
    }


def _family(model: torch.nn.Module) -> tuple[type, type, type] | None:
    c = _classes()
    if c is None:
        return None
    return next((classes for classes in c.values() if isinstance(model, classes[0])), None)


def matches(model: torch.nn.Module) -> bool:
    """True for ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (never imports transformers itself)."""
    return sys.modules.get("transformers") is not None and _family(model) is not None


def _key_proj(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.attention.k_proj


def _parts(layer: torch.nn.Module) -> LayerParts:
    """Where a DINOv2 encoder layer keeps its parts."""
    a = layer.attention
    return LayerParts(layer.norm1, a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, int(a.num_attention_heads),
                      int(a.head_dim), float(a.scaling), float(a.attention_dropout), layer.norm2, layer.mlp,
                      ls1=layer.layer_scale1, ls2=layer.layer_scale2, drop_path=layer.drop_path)


def _num_protected(model: torch.nn.Module) -> int:
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
    kernel: str = "auto", **kwargs: Any,
) -> HFEncoderPatch:
    """Patch a ``Dinov2Model`` / ``Dinov2WithRegistersModel`` in place (see :func:`saint.patch`)."""
    check_layout(layout, kernel)
    family = _family(model)
    if family is None:
        raise TypeError(f"expected a Dinov2Model or Dinov2WithRegistersModel, got {type(model).__name__}")
    if get_handle(model) is not None:
        raise ValueError(f"{type(model).__name__} is already patched by saint; unpatch it first")
    layers = list(model.encoder.layer)
    for i, layer in enumerate(layers):
        if type(layer) is not family[1] or type(layer.attention) is not family[2]:
            raise TypeError(f"encoder layer {i} is {type(layer).__name__}; saint supports {family[1].__name__} "
                            f"with {family[2].__name__}")
        if "forward" in layer.__dict__:
            raise ValueError(f"encoder layer {i} already has a per-instance forward (patched by something else)")
    spec, config = make_config(method, **kwargs)
    require_site(spec, "vision", type(model).__name__)
    settings = config.resolve(len(layers))
    check_maskable(model, spec, config, layout)
    check_static_counts(_grid(model).num_patches, spec, settings, unit="layer")
    handle = HFEncoderPatch(spec, config, settings, _num_protected(model), trace=trace, kernel=kernel, tower=model,
                            parts=_parts)
    install_sites(handle, layers, "encoder.layer", layer_forward, _key_proj, layout)
    model.forward = types.MethodType(tower_forward, model)
    model.__dict__[SAINT_ATTR] = handle
    return handle


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    handle = model.__dict__.pop(SAINT_ATTR, None)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by saint")
    remove_sites(handle, model.encoder.layer, _key_proj)
    model.__dict__.pop("forward", None)


def _grid(model: torch.nn.Module, inputs: Any = None) -> Grid:
    """The patch grid: of ``inputs`` when given (DINOv2 interpolates its position table),
    else of the configured image size."""
    p = int(model.config.patch_size)
    if inputs is None:
        g = int(model.config.image_size) // p
        return Grid(g, g, (p, p))
    return Grid(int(inputs.shape[-2]) // p, int(inputs.shape[-1]) // p, (p, p))


class HFDinov2(FamilyAdapter):
    """Hugging Face DINOv2 (with or without registers): sites are ``encoder.layer``."""

    name = "hf_dinov2"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return [Site(i, f"encoder.layer.{i}", layer, layer.attention, int(layer.attention.num_attention_heads),
                     float(layer.attention.scaling)) for i, layer in enumerate(model.encoder.layer)]

    def protected(self, model: torch.nn.Module) -> int:
        return _num_protected(model)

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        return _grid(model, inputs)

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        cfg = model.config
        hidden = int(cfg.hidden_size * cfg.mlp_ratio)
        if cfg.use_swiglu_ffn:  # three matmuls of 2/3 the width (rounded up to 8): 1.5x that width's two
            hidden = 1.5 * ((int(hidden * 2 / 3) + 7) // 8 * 8)
        return vit_block_flops(n_in, n_out, int(cfg.hidden_size), hidden, select_at_of(model, select_at))

    def probe(self, model: torch.nn.Module) -> Probe:
        return ProjectionProbe(self.sites(model), num_prefix=_num_protected(model), has_cls=True)

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        return model(pixel_values=inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.forward(model, inputs).pooler_output, None


ADAPTER = HFDinov2()

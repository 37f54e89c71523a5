"""Hugging Face V-JEPA 2 (transformers 5): the video encoder ``VJEPA2Model`` and the video
classifier ``VJEPA2ForVideoClassification``.

V-JEPA 2 is a ViT over a clip's tubelets (``pixel_values_videos [N, T, 3, H, W]``) with no
class token and no absolute position embedding: each layer's attention rotates its queries
and keys by every token's 3-D (frame, row, column) position, which it derives from the
token's index in the clip (``position_mask``). Its layers run through
:mod:`saint.adapters.hf_encoder`: once a step removes tokens, each token keeps its original
index (a merged token its destination's) and the attention's own ``get_position_ids`` /
``apply_rotary_embeddings`` rotate it there (``LayerParts.rotary``); the attention takes no
mask, so saint runs it wherever a layer needs one (``own_attention``); the layers return
``(hidden_states, weights)``. The selections read the keys before the rotation.

The classifier's attentive pooler (self-attention layers over the tokens, then a learned
query's cross-attention) runs with a key mask built from the tower's last call: padding
masked, merged keys weighted by ``log(size)``, as in the encoder. The predictor (V-JEPA 2's
pretraining head, run by ``VJEPA2Model``'s forward unless ``skip_predictor=True``) predicts
masked positions of the full clip and is refused on a patched model.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Any

import torch

from ..methods import MethodSpec
from .base import FamilyAdapter, Grid, Probe, Site, select_at_of, vit_block_flops
from .common import SITE_ATTR, Hooked, transformers_classes
from .hf_encoder import (
    LayerParts,
    ProjectionProbe,
    encoder_sites,
    patch_encoder,
    patched_through,
    tower_forward,
    unpatch_tower_of,
)
from .hf_mean_head import read_input, token_mean

LAYERS = "encoder.layer"


@functools.cache
def _classes() -> dict[str, type] | None:
    """V-JEPA 2's classes, where this transformers has them."""
    found = transformers_classes("vjepa2", "VJEPA2Model", "VJEPA2ForVideoClassification", "VJEPA2Layer",
                                 "VJEPA2RopeAttention")
    if len(found) < 4:
        return None
    return dict(zip(("model", "classifier", "layer", "attention"), found, strict=True))


def matches(model: torch.nn.Module) -> bool:
    """True for ``VJEPA2Model`` and ``VJEPA2ForVideoClassification`` (never imports transformers)."""
    if sys.modules.get("transformers") is None:
        return False
    c = _classes()
    return c is not None and isinstance(model, (c["model"], c["classifier"]))


def _tower_of(model: torch.nn.Module) -> torch.nn.Module:
    c = _classes()
    return model.vjepa2 if c is not None and isinstance(model, c["classifier"]) else model


def _rotate(attn: torch.nn.Module, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Queries or keys ``t [B, N, H, D]`` rotated to each token's original index
    ``positions [B, N]``, by the attention's own functions."""
    heads_first = t.transpose(1, 2)
    return attn.apply_rotary_embeddings(heads_first, attn.get_position_ids(heads_first, masks=positions)).transpose(1, 2)


def layer_parts(layer: torch.nn.Module) -> LayerParts:
    """Where a V-JEPA 2 encoder layer keeps its parts: ``norm1``, the rotary attention's
    ``query``/``key``/``value``/``proj``, ``norm2``, ``mlp``, one drop path on both branches."""
    a = layer.attention
    return LayerParts(layer.norm1, a, a.query, a.key, a.value, a.proj, int(a.num_attention_heads),
                      int(a.attention_head_size), float(a.scaling), float(a.dropout_prob), layer.norm2, layer.mlp,
                      drop_path=layer.drop_path, rotary=types.MethodType(_rotate, a), own_attention=True,
                      branch_first=True, returns_tuple=True)


def _grid(tower: torch.nn.Module, inputs: Any = None) -> Grid:
    """The clip's tubelet grid, the tubelet frames' grids stacked row-wise as its tokens lie."""
    cfg = tower.config
    p, tubelet = int(cfg.patch_size), int(cfg.tubelet_size)
    if inputs is None:
        frames, height, width = int(cfg.frames_per_clip), int(cfg.crop_size), int(cfg.crop_size)
    else:
        frames, height, width = (int(n) for n in (inputs.shape[1], inputs.shape[-2], inputs.shape[-1]))
    return Grid(max(1, frames // tubelet) * (height // p), width // p, (p, p))


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
    kernel: str = "auto", **kwargs: Any,
) -> Any:
    """Patch a V-JEPA 2 encoder (or the classifier's) in place (see :func:`saint.patch`)."""
    c = _classes()
    tower = _tower_of(model)
    handle = patch_encoder(tower, list(tower.get_submodule(LAYERS)), LAYERS, c["layer"], c["attention"], layer_parts,
                           0, _grid(tower).num_patches, method, kwargs, trace, layout, kernel)
    tower.forward = types.MethodType(_tower_forward, tower)
    if tower is not model:
        pooler = model.pooler
        pooler.__dict__[SITE_ATTR] = (handle, None)
        pooler.forward = types.MethodType(_pooler_forward, pooler)
        handle.hooked.append(Hooked(model, _pooler, pooler, f"{type(model).__name__}'s pooler"))
    return patched_through(model, tower, handle)


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    unpatch_tower_of(model)


def _pooler(model: torch.nn.Module) -> torch.nn.Module:
    return model.pooler


def _tower_forward(self: torch.nn.Module, *args: Any, skip_predictor: bool = False, **kwargs: Any) -> Any:
    """The encoder's own forward (hidden states unpadded); the predictor, and context or
    target masks (tubelet indices of the whole clip, which its output no longer lines up
    with), are refused."""
    if not skip_predictor:
        raise ValueError(f"a patched {type(self).__name__} prunes the clip's tokens, and its predictor predicts "
                         "positions of the whole clip: call it with skip_predictor=True (or get_vision_features)")
    given = [name for name in ("context_mask", "target_mask") if kwargs.get(name) is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} index tubelets of the whole clip, but a patched "
                         f"{type(self).__name__} prunes them: its output holds the survivors; call it without "
                         f"{'them' if len(given) > 1 else 'it'} (saint.token_mask marks each clip's real tokens), or "
                         "unpatch it")
    return tower_forward(self, *args, skip_predictor=True, **kwargs)


def _pooler_forward(self: torch.nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
    """The attentive pooler's own layers over each clip's real tokens: its self-attention
    layers and its query's cross-attention take the tower's key mask (padding, merged
    keys' ``log(size)``); with every token real and whole, the pooler's own forward."""
    handle = self.__dict__[SITE_ATTR][0]
    bias = handle.state.attn_bias(hidden_state.dtype, handle.config.size_bias)
    if bias is None:
        return type(self).forward(self, hidden_state)
    if bias.shape[-1] != hidden_state.shape[1] or bias.shape[0] != hidden_state.shape[0]:
        raise ValueError(f"the pooler got {tuple(hidden_state.shape[:2])} tokens but the tower's last forward "
                         f"produced {(bias.shape[0], bias.shape[-1])}; call it only through the patched model")
    hidden_state = hidden_state.masked_fill(bias[:, 0, 0, :, None] == float("-inf"), 0.0)  # NaN padding
    for layer in self.self_attention_layers:
        hidden_state = layer(hidden_state, attention_mask=bias)[0]
    queries = self.query_tokens.repeat(hidden_state.shape[0], 1, 1)
    return self.cross_attention_layer(queries, hidden_state, attention_mask=bias)[0].squeeze(1)


class HFVJEPA2(FamilyAdapter):
    """V-JEPA 2: sites are ``encoder.layer``; inputs are clips ``[N, T, 3, H, W]``."""

    name = "hf_vjepa2"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return encoder_sites(list(_tower_of(model).get_submodule(LAYERS)), LAYERS, layer_parts)

    def protected(self, model: torch.nn.Module) -> int:
        return 0

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        return _grid(_tower_of(model), inputs)

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        cfg = _tower_of(model).config
        return vit_block_flops(n_in, n_out, int(cfg.hidden_size), int(cfg.hidden_size * cfg.mlp_ratio),
                               select_at_of(model, select_at))

    def probe(self, model: torch.nn.Module) -> Probe:
        return ProjectionProbe(self.sites(model), layer_parts, num_prefix=0, has_cls=False)

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        if _tower_of(model) is model:
            return model(pixel_values_videos=inputs, skip_predictor=True)
        return model(pixel_values_videos=inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The classifier's pooled features and logits; the encoder's mean over each clip's
        real tokens, weighted by how many each stands for."""
        if _tower_of(model) is not model:
            features, out = read_input(model.classifier, lambda: self.forward(model, inputs))
            return features, out.logits
        return token_mean(model, self.forward(model, inputs).last_hidden_state), None

    def check_inputs(self, inputs: Any) -> None:
        """Clips ``[N, T, 3, H, W]``."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 5:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"V-JEPA 2 takes clips [N, T, 3, H, W] (pixel_values_videos), got {shape}")
        return super().check_inputs(inputs.flatten(0, 1))


ADAPTER = HFVJEPA2()

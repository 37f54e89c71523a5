"""InternVL (transformers 5 ``InternVLForConditionalGeneration`` / ``InternVLModel``, the
``-hf`` checkpoints): SAINT's vit / llm / hybrid modes and FastV, with per-instance
hooks only.

Methods (``saint.patch(model, method=..., **settings)``; see :class:`InternVLPruneConfig`):

- ``"saint"`` with ``mode=``
  - ``"llm"`` (the default here): SAINT's graph drop of the image tokens after every
    decoder layer ``llm_layers = (start, end)`` (:mod:`saint.adapters.hf_llm`);
  - ``"vit"``: after vision layer ``vit_layer`` every tile keeps ``vit_ratio`` of its 2x2
    patch groups (:mod:`saint.adapters.internvl_tower`), the blocks the pixel shuffle
    folds into one token, so later vision layers run on fewer patches and each tile hands
    the language model fewer tokens;
  - ``"hybrid"``: both.
- ``"fastv"``: FastV (``fastv_layer`` K, ``fastv_ratio`` R).
- ``"random"``: a seeded random ``keep_ratio`` of every tile's tokens, after the projector
  (the same positions in every tile; no tower compute saved: the reference point for
  ``vit`` at the same token count).

With a vision-side reduction each image's run of placeholder tokens shrinks to its
tiles' kept tokens before the language model runs, exactly as if the processor had
emitted that many (rows right-aligned, contiguous positions), as LLaVA's ``vit`` mode
does; ``get_image_features`` is wrapped per instance to return the kept tokens only.
Outputs, labels, caches and the refusals are those of :mod:`saint.adapters.llava`.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..methods import MethodSpec
from .base import Grid
from .common import Hooked, TokenStats, transformers_classes, transformers_loaded
from .hf_vlm import HFVlm, multimodal
from .internvl_tower import TilePruner, check_tower
from .llava_vision import image_features, make_expand, shrink_plan, start_prefill
from .qwen_vl_features import random_keep
from .vlm_config import (
    LLM_FIELDS,
    VlmPruneConfig,
    check_random,
    check_vit_ratio,
)
from .vlm_handle import Forward, VlmPatch, installing, unpatch
from .vlm_hooks import Media, install_forward_hooks, make_mm_pre
from .vlm_prompt import continue_prompt
from .vlm_schedule import decoder_pruner, split_method

__all__ = ["ADAPTER", "FIELDS", "InternVL", "InternVLPatch", "InternVLPruneConfig", "make_config", "matches", "patch",
           "unpatch"]

EXPAND = "_expand_multimodal_outputs"  # generate's (private) helper for num_beams / num_return_sequences > 1
VIT_FIELDS = ("vit_ratio", "vit_layer", "vit_step_div")
FIELDS: dict[str, tuple[str, ...]] = {
    "saint/vit": ("mode", *VIT_FIELDS),
    "saint/llm": ("mode", *LLM_FIELDS),
    "saint/hybrid": ("mode", *VIT_FIELDS, *LLM_FIELDS),
    "fastv": ("fastv_layer", "fastv_ratio"),
    "random": ("keep_ratio", "seed"),
}
MEDIA = Media()  # images only: pixel_values / mm_encoder_outputs["image"], image_token_id


def matches(model: torch.nn.Module) -> bool:
    return transformers_loaded() and type(model) in transformers_classes(
        "internvl", "InternVLForConditionalGeneration", "InternVLModel")


@dataclass
class InternVLPruneConfig(VlmPruneConfig):
    """Settings of one InternVL pruning method. ``vit_ratio``: fraction of each tile's 2x2
    patch groups kept after vision layer ``vit_layer`` (at least one group); the
    language-model settings are those of :class:`~saint.adapters.vlm_config.VlmPruneConfig`
    (SAINT after decoder layers 7..16, tau 0.83, K 5, gamma 10, as for LLaVA-1.5-7B)."""

    FAMILY: ClassVar[str] = "InternVL"
    METHODS: ClassVar[tuple[str, ...]] = ("saint", "fastv", "random")
    FIELDS: ClassVar[dict[str, tuple[str, ...]]] = FIELDS

    mode: str = "llm"
    vit_ratio: float = 0.5
    vit_layer: int = 12
    vit_step_div: int = 16
    keep_ratio: float | None = None

    def _check_vision(self) -> None:
        check_vit_ratio(self)

    def _check_baselines(self) -> None:
        if self.method == "random":
            check_random(self.keep_ratio, self.seed, "each tile's tokens")


def make_config(method: str = "saint", **kwargs: Any) -> InternVLPruneConfig:
    """Build and validate an :class:`InternVLPruneConfig`, rejecting settings the chosen
    method/mode does not use (so a typo never silently does nothing)."""
    return InternVLPruneConfig.build(method, **kwargs)


@dataclass
class InternVLPatch(VlmPatch):
    """A patched InternVL: the VLM handle and the tile pruner of ``vit``/``hybrid``."""

    tower: TilePruner | None = None

    def remove(self) -> None:
        super().remove()
        if self.tower is not None:
            self.tower.remove()
            self.tower = None

    def vision_stats(self) -> TokenStats | None:
        """Tokens entering each vision layer in the last forward with images, per tile
        (``vit``/``hybrid`` only)."""
        return None if self.tower is None else self.tower.stats()


def tile_tokens(mm: torch.nn.Module) -> int:
    """Image tokens the processor emits per tile (its ``image_seq_length``)."""
    vc = mm.config.vision_config
    size, patch = (int(v[0]) if isinstance(v, (list, tuple)) else int(v) for v in (vc.image_size, vc.patch_size))
    return round(size // patch * float(mm.config.downsample_ratio)) ** 2


def make_features(handle: InternVLPatch, original: Any) -> Any:
    """``get_image_features`` that returns each tile's kept tokens only, from the
    projector's output in the pixel shuffle's raster order: the tower's keep mask
    (``vit``/``hybrid``), or ``random``'s seeded subset (the same in every tile)."""
    cfg = handle.config

    @functools.wraps(original)  # generate reads the signature to pre-encode the pixels
    def features(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        keep = None if handle.tower is None else handle.tower.keep
        if cfg.method == "random":
            tiles, n = out.pooler_output.shape[:2]
            keep = random_keep(n, cfg.keep_ratio, cfg.seed, out.pooler_output.device).expand(tiles, n)
        if keep is not None:
            feats = out.pooler_output
            out.pooler_output = feats[keep].view(keep.shape[0], -1, feats.shape[-1])
        return out

    return features


def _plan(handle: InternVLPatch):
    def plan(input_ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor | None:
        counts = [int(feats.shape[1])] * int(feats.shape[0])
        return shrink_plan(input_ids, counts, handle.image_token_id, tile_tokens(handle.mm))

    return plan


def prefill(handle: InternVLPatch, module: torch.nn.Module, kwargs: dict[str, Any], fwd: Forward) -> dict[str, Any]:
    """A prompt with images on an empty cache: with ``vit``/``hybrid`` the tower runs now
    and every tile's tokens shrink to its kept groups; the decoder pruner then starts on
    the image tokens."""
    input_ids = kwargs["input_ids"]
    fwd.input_length = input_ids.shape[1]
    if handle.config.reduces_vision:
        if handle.config.prunes_vit and kwargs.get("vision_feature_layer") not in (None, -1):
            raise ValueError(f"vision_feature_layer={kwargs['vision_feature_layer']}: saint's vit mode reads the "
                             "tower's last layer (-1)")
        kwargs = image_features(module, kwargs)
        feats = kwargs["mm_encoder_outputs"]["image"].pooler_output
        return start_prefill(handle, kwargs, _plan(handle)(input_ids, feats), fwd)
    return start_prefill(handle, kwargs, None, fwd)


def patch(model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
          **kwargs: Any) -> InternVLPatch:
    """Patch an InternVL model in place (see the module docstring and :func:`saint.patch`).
    ``method`` may be a SAINT-family :class:`~saint.methods.MethodSpec` (e.g. a calibration
    probe): it then selects the image tokens of ``mode="llm"/"hybrid"``."""
    method, llm_spec = split_method(method, "InternVL")
    cfg = make_config(method, **kwargs)
    mm = multimodal(model)
    pruner = decoder_pruner(cfg, mm.language_model, llm_spec)
    if cfg.prunes_vit:
        check_tower(mm, cfg)
    handle = InternVLPatch(cfg, model, mm, int(mm.config.image_token_id), pruner, trace=trace)
    with installing(handle):
        if cfg.prunes_vit:
            handle.tower = TilePruner(mm.vision_tower, cfg.vit_layer, cfg.vit_ratio, cfg.vit_step_div)
            handle.tower.install()
            handle.hooked.append(Hooked(mm, lambda m: m.vision_tower, mm.vision_tower, "the vision tower"))
        if cfg.reduces_vision:
            handle.wrap(mm, "get_image_features", make_features(handle, mm.get_image_features))
            if model is not mm and hasattr(model, EXPAND) and EXPAND not in model.__dict__:
                handle.wrap(model, EXPAND, make_expand(handle, getattr(model, EXPAND), _plan(handle)))
        install_forward_hooks(handle, model, mm, make_mm_pre(handle, MEDIA, prefill, continue_prompt))
    return handle


class InternVL(HFVlm):
    """InternVL: sites are the language model's decoder layers; inputs are
    processor-output dicts (``input_ids``, ``pixel_values`` of every tile, ``attention_mask``)."""

    name = "internvl"
    family = sys.modules[__name__]

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        """The token grid of one tile: patches per side times the pixel shuffle's ratio."""
        mm = multimodal(model)
        vc = mm.config.vision_config
        size = int(vc.image_size[0]) if isinstance(vc.image_size, (list, tuple)) else int(vc.image_size)
        side = round(tile_tokens(mm) ** 0.5)
        return Grid(side, side, (size // side, size // side))


ADAPTER = InternVL()

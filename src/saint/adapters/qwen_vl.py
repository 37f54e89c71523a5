"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL, dense and MoE (transformers 5
``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration`` and their
``*Model``), and GLM-4.1V / 4.5V / 4.6V (``Glm4vForConditionalGeneration``,
``Glm4vMoeForConditionalGeneration``, ``Glm46VForConditionalGeneration``: the same
interfaces, a conv merge of each 2x2 group, and video frames held in image tokens, told
apart by ``mm_token_type_ids``), and the Qwen2.5-Omni and Qwen3-Omni thinkers
(``Qwen2_5OmniThinkerForConditionalGeneration``: Qwen2.5-VL's tower with separate q/k/v
projections; ``Qwen3OmniMoeThinkerForConditionalGeneration``: Qwen3-VL's tower and an MoE
language model; their audio tokens, a video's interleaved audio included, are never dropped):
SAINT's vit / llm / hybrid modes and the FastV and random baselines, images and video, with
per-instance hooks only.

Methods (``saint.patch(model, method=..., **settings)``; see :class:`QwenPruneConfig`):

- ``"saint"`` with ``mode=``
  - ``"vit"``: fixed-budget similarity drop inside the vision tower after block
    ``vit_layer``, keeping ``vit_ratio`` of the 2x2 merge groups of every sample;
  - ``"llm"``: SAINT graph drop of the image/video tokens after every decoder layer
    ``llm_layers = (start, end)`` (the LLaVA machinery of :mod:`saint.adapters.hf_llm`);
  - ``"hybrid"``: both.
- ``"fastv"``: FastV (``fastv_layer`` K, ``fastv_ratio`` R), as for LLaVA.
- ``"random"``: a seeded random ``keep_ratio`` of every sample's merged tokens, after
  the merger (no tower compute saved; the reference point for the vision side).
- ``"pool"``: average pooling of every sample's merged-token grid in windows of
  ``pool_size x pool_size`` (ragged at the right/bottom edge); each pooled token takes
  the place, and so the M-RoPE position, of its window's top-left token.

A *sample* of the vision side is one frame group of one image or video: the tower
attends within exactly that span (its full-attention ``cu_seqlens`` segment), so an
image is one sample and a video of temporal grid ``t`` is ``t`` samples, each with its
own budget. A sample's answer never depends on the other images of the call.

Vision side, before the merger: the tower runs in window order (Qwen2.5-VL:
``window_index``); after block ``vit_layer`` whole merge groups (the 4 consecutive
tokens the merger concatenates) are dropped, so the merger still sees aligned groups.
Later blocks get shortened ``cu_seqlens`` (full and windowed; empty windows removed)
and the kept rows of the rotary ``position_embeddings``. The metric is each group's
mean of the block's head-averaged keys before the vision RoPE. Every merger (and
Qwen3-VL's deepstack mergers) writes its output back to the full group count (NaN
at dropped groups, 0 under autograd), so the model's own bookkeeping (``reverse_indices``, the split by
``grid_thw``) is unchanged; ``get_image_features``/``get_video_features`` are wrapped
per instance to mark every feature tensor with its kept groups, and before the
language model runs each image's run of placeholder tokens is shrunk to its kept
groups (rows right-aligned again, as the processor would have left-padded them).

Positions: M-RoPE 3-D position ids are computed on the *full* grid (the model's own
``get_rope_index``, or the ids ``generate`` prepared) and the kept tokens keep their
columns; text after an image keeps its original position and ``rope_deltas`` stay
those of the unpruned prompt. Decoding therefore continues exactly where the unpruned
model would (the kept tokens are a subset of an unchanged coordinate system, the
same invariant the LLM-side drop keeps). The 2-D attention mask of later steps is
mapped to the shortened prompt; their positions are ``generate``'s (or, without
explicit ids, the unpruned prompt's mask/cache length plus ``rope_deltas``).

Qwen3-VL's deepstack features (added to the hidden states of the first decoder
layers at the visual positions) are filtered by the same kept groups; when the LLM
side drops tokens before the last deepstack layer, the addition is indexed by the
surviving visual positions (the text model's ``_deepstack_process`` is wrapped per
instance).

Outputs, labels, stats and the limits are those of :mod:`saint.adapters.llava`
(logits keep the input's length with NaN at dropped positions; flash/flex attention,
``inputs_embeds``-only prompts with images, images added to a non-empty cache,
4-D masks/static caches with a vision-side reduction are refused). The vision tower
must run with sdpa or eager attention when ``vit`` pruning is on.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..methods import MethodSpec
from .base import Grid
from .common import Hooked, TokenStats, transformers_classes, transformers_loaded
from .hf_vlm import HFVlm, multimodal
from .qwen_vl_features import FEATURE_FNS, KEEP_ATTR, make_deepstack, make_features
from .qwen_vl_prompt import MEDIA, continuation, make_image_stats, prefill
from .qwen_vl_tower import TowerPruner, check_tower
from .vlm_config import (
    LLM_FIELDS,
    METHODS,
    MODES,
    RATIO_FIELDS,
    RATIO_VIT_FIELDS,
    VlmPruneConfig,
    check_int,
    check_random,
    check_vit_ratio,
)
from .vlm_handle import Forward, VlmPatch, installing, unpatch
from .vlm_hooks import install_forward_hooks, make_mm_pre
from .vlm_schedule import decoder_pruner, split_method

__all__ = [
    "ADAPTER", "FIELDS", "LLM_FIELDS", "METHODS", "MODES", "REFUSED", "VIT_FIELDS",
    "KEEP_ATTR", "QwenPatch", "QwenPruneConfig", "QwenVL", "TowerPruner", "make_config", "matches", "patch",
    "unpatch",
]

VIT_FIELDS = RATIO_VIT_FIELDS
FIELDS: dict[str, tuple[str, ...]] = {**RATIO_FIELDS, "pool": ("pool_size",)}


FAMILY_CLASSES = {  # family -> (transformers module, its model classes)
    "qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLModel"),
    "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel"),
    "qwen3_5": ("qwen3_5", "Qwen3_5ForConditionalGeneration", "Qwen3_5Model"),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeModel"),
    "glm4v": ("glm4v", "Glm4vForConditionalGeneration", "Glm4vModel"),
    "glm4v_moe": ("glm4v_moe", "Glm4vMoeForConditionalGeneration", "Glm4vMoeModel"),
    "glm46v": ("glm46v", "Glm46VForConditionalGeneration", "Glm46VModel"),
    "glm_ocr": ("glm_ocr", "GlmOcrForConditionalGeneration", "GlmOcrModel"),
    # Qwen2.5-Omni's thinker: Qwen2.5-VL's tower (separate q/k/v) and M-RoPE, plus audio
    "qwen2_5_omni": ("qwen2_5_omni", "Qwen2_5OmniThinkerForConditionalGeneration", "Qwen2_5OmniThinkerModel"),
    # Qwen3-Omni's thinker: Qwen3-VL's tower (deepstack) and an MoE M-RoPE language model, plus audio
    "qwen3_omni_moe": ("qwen3_omni_moe", "Qwen3OmniMoeThinkerForConditionalGeneration", "Qwen3OmniMoeThinkerModel"),
}

REFUSED = {  # class name -> why saint does not patch it, and what to do
    name: ("its talker speaks from the thinker's hidden states at every prompt position, and pruning removes "
           "positions; patch its thinker, saint.patch(model.thinker, ...), and generate text with "
           "model.thinker.generate(...)")
    for name in ("Qwen2_5OmniForConditionalGeneration", "Qwen3OmniMoeForConditionalGeneration")
}


def _families() -> dict[type, str]:
    return {cls: family for family, (module, *names) in FAMILY_CLASSES.items()
            for cls in transformers_classes(module, *names)}


def matches(model: torch.nn.Module) -> bool:
    return transformers_loaded() and type(model) in _families()


# ---------------------------------------------------------------------------- config
@dataclass
class QwenPruneConfig(VlmPruneConfig):
    """Settings of one Qwen-VL pruning method. ``vit_ratio``: fraction of each
    sample's merge groups kept after tower block ``vit_layer`` (at least one group);
    the LLM-side settings are those of :class:`saint.adapters.vlm_config.VlmPruneConfig`
    (as for LLaVA; defaults: the reference LLaVA-1.5-7B settings, SAINT after decoder
    layers 7..16, tau 0.83, K 5, gamma 10). ``keep_ratio``: random's kept fraction per
    sample; ``pool_size``: merged tokens per side that pool averages into one."""

    FAMILY: ClassVar[str] = "Qwen-VL"
    FIELDS: ClassVar[dict[str, tuple[str, ...]]] = FIELDS

    vit_ratio: float = 0.65
    vit_layer: int = 16
    vit_step_div: int = 16
    keep_ratio: float | None = None
    pool_size: int | None = None

    def _check_vision(self) -> None:
        check_vit_ratio(self)

    def _check_baselines(self) -> None:
        if self.method == "pool":
            if self.pool_size is None:
                raise ValueError("method 'pool' needs pool_size (merged tokens per side averaged into one)")
            check_int("pool_size", self.pool_size, 1)
        if self.method == "random":
            check_random(self.keep_ratio, self.seed, "each image's merged tokens")


def make_config(method: str = "saint", **kwargs: Any) -> QwenPruneConfig:
    """Build and validate a :class:`QwenPruneConfig`, rejecting settings the chosen
    method/mode does not use (so a typo never silently does nothing)."""
    return QwenPruneConfig.build(method, **kwargs)


# ---------------------------------------------------------------------------- handle
@dataclass
class QwenPatch(VlmPatch):
    """A patched Qwen-VL: the VLM handle's fields (config, decoder pruner, hooks and
    the per-instance wrappers of the feature functions, statistics of the last forward
    with images) plus the tower pruner and the per-image statistics."""

    family: str = ""
    tower: TowerPruner | None = None
    last_image_stats: TokenStats | None = None
    runs: Any = None  # (image index of each input position, kept after the vision side) of this prefill

    def remove(self) -> None:
        super().remove()
        if self.tower is not None:
            self.tower.remove()
            self.tower = None

    def begin_forward(self) -> Forward:
        self.runs = None
        return super().begin_forward()

    def image_stats(self) -> TokenStats:
        """Visual tokens per image/video sample (frame group) in the last forward with
        images: the processor's count (``merger``), after the vision-side step
        (``language_model``: what enters layer 0) and after the last decoder layer
        (``language_model.norm``). Images first (in prompt order), then video frame groups."""
        if self.last_image_stats is None:
            raise RuntimeError("no forward with images has run since patching; call the model first")
        return self.last_image_stats

    def vision_stats(self) -> TokenStats | None:
        """Tokens entering each vision-tower block in the last forward with images, per
        image / video frame group, images first (``vit``/``hybrid`` only)."""
        return None if self.tower is None else self.tower.stats()


def patch(model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
          **kwargs: Any) -> QwenPatch:
    """Patch a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / GLM-4.1V / 4.5V / 4.6V model in place (see
    the module docstring and :func:`saint.patch`).

    ``method`` may be a SAINT-family :class:`~saint.methods.MethodSpec` (e.g. a
    calibration probe): it then selects the visual tokens of ``mode="llm"/"hybrid"``."""
    family = _families()[type(model)]
    method, llm_spec = split_method(method, "Qwen-VL")
    cfg = make_config(method, **kwargs)
    mm = multimodal(model)
    lm = mm.language_model
    pruner = decoder_pruner(cfg, lm, llm_spec)
    if cfg.prunes_vit:
        check_tower(mm.visual, cfg)

    handle = QwenPatch(cfg, model, mm, int(mm.config.image_token_id), pruner, trace=trace, family=family)
    with installing(handle):
        if cfg.prunes_vit:
            handle.tower = TowerPruner(mm.visual, cfg.vit_layer, cfg.vit_ratio, cfg.vit_step_div)
            handle.tower.install()
            handle.hooked.append(Hooked(mm, lambda m: m.visual, mm.visual, "the vision tower"))
        if cfg.reduces_vision:
            for modality, name in FEATURE_FNS.items():
                handle.wrap(mm, name, make_features(handle, modality, getattr(mm, name)))
        if hasattr(lm, "_deepstack_process") and pruner.schedule:  # Qwen3-VL (dense and MoE)
            handle.wrap(lm, "_deepstack_process", make_deepstack(handle, lm._deepstack_process))
        mm_pre = make_mm_pre(handle, MEDIA, prefill, continuation)
        install_forward_hooks(handle, model, mm, mm_pre, lm_post=(make_image_stats(handle),))
    return handle


# ---------------------------------------------------------------------------- protocol
class QwenVL(HFVlm):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL / GLM-4.1V / 4.5V / 4.6V: sites are the language
    model's decoder layers (as for LLaVA); inputs are processor-output dicts (``input_ids``, ``pixel_values``,
    ``image_grid_thw``, ``mm_token_type_ids``, ``attention_mask``)."""

    name = "qwen_vl"
    family = sys.modules[__name__]

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        """The merged-token grid of the first image of ``inputs`` (Qwen-VL has no
        default image size: every image keeps its own)."""
        grid = None if inputs is None else inputs.get("image_grid_thw")
        if grid is None or len(grid) == 0:
            raise ValueError("Qwen-VL resizes every image to its own grid: pass inputs with image_grid_thw")
        vc = multimodal(model).config.vision_config
        m, p = int(vc.spatial_merge_size), int(vc.patch_size)
        return Grid(int(grid[0][1]) // m, int(grid[0][2]) // m, (p * m, p * m))

    def check_inputs(self, inputs: Any) -> None:
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            raise ValueError("Qwen-VL takes batches of processor outputs (dicts with input_ids, pixel_values, "
                             "image_grid_thw)")

    def split(self, inputs: Any, size: int) -> Any:
        """Row batches of at most ``size`` prompts, each with its own images' patches
        and grids (found from ``mm_token_type_ids``: 1 image, 2 video tokens) and its
        videos' seconds per grid."""
        b = self.batch_size(inputs)
        if size < b and inputs.get("input_features") is not None:
            raise ValueError("splitting an Omni batch with audio (input_features) into smaller batches is "
                             f"not supported; pass a batch size of at least its {b} prompts")
        for start in range(0, b, size):
            rows = slice(start, min(start + size, b))
            out = {k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == (b,) else v)
                   for k, v in inputs.items()}
            pos = inputs.get("position_ids")
            if isinstance(pos, torch.Tensor) and pos.dim() == 3:
                out["position_ids"] = pos[:, rows]
            for code, pixels, grid in ((1, "pixel_values", "image_grid_thw"), (2, "pixel_values_videos", "video_grid_thw")):
                if inputs.get(grid) is not None and size < b:
                    out.update(_media_of_rows(inputs, rows, code, pixels, grid))
            yield out


def _media_of_rows(inputs: dict[str, Any], rows: slice, code: int, pixels: str, grid: str) -> dict[str, Any]:
    """The patches and grids of the images (``code`` 1) or videos (2) of prompts ``rows``."""
    types = inputs.get("mm_token_type_ids")
    if types is None:
        raise ValueError(
            "splitting a Qwen-VL batch needs mm_token_type_ids (1 at image tokens, 2 at video tokens; the Qwen-VL "
            "and GLM processors return them, the Omni processors do not: add them, e.g. (ids == image_token_id) + "
            "2 * (ids == video_token_id), which its forward ignores), or pass a batch size of at least its "
            f"{len(inputs['input_ids'])} prompts")
    per_row = (types == code).sum(dim=1)
    patches = inputs[grid].prod(dim=-1)
    if int(per_row.sum()) == 0:
        raise ValueError(f"{grid} is given but no prompt holds its tokens")
    tokens = patches // (int(patches.sum()) // int(per_row.sum()))
    row_end = F.pad(per_row.cumsum(0), (1, 0))
    item_end = F.pad(tokens.cumsum(0), (1, 0))
    first, last = (int(torch.searchsorted(item_end, row_end[i])) for i in (rows.start, rows.stop))
    patch_end = F.pad(patches.cumsum(0), (1, 0))
    out = {pixels: inputs[pixels][int(patch_end[first]):int(patch_end[last])], grid: inputs[grid][first:last]}
    if code == 2:  # one entry per video: Qwen2.5-VL's second_per_grid_ts, the Omni thinkers' video_second_per_grid
        out.update({k: inputs[k][first:last] for k in PER_VIDEO if inputs.get(k) is not None})
    return out


PER_VIDEO = ("second_per_grid_ts", "video_second_per_grid")


ADAPTER = QwenVL()

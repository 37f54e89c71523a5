"""LLaVA (transformers 5 ``LlavaForConditionalGeneration`` / ``LlavaModel``): SAINT's
VLM modes and the VLM baselines, with per-instance hooks only.

Methods (``saint.patch(model, method=..., **settings)``; see :class:`LlavaPruneConfig`):

- ``"saint"`` with ``mode=``
  - ``"vit"``: fixed-budget similarity drop in the vision tower at ``vit_layer`` to
    ``vit_keep`` patches (+ class token), via :func:`saint.adapters.hf_vision.patch_tower`;
  - ``"llm"``: SAINT graph drop of the image tokens only, after every decoder layer
    ``llm_layers = (start, end)`` (inclusive), prefill only;
  - ``"hybrid"`` (default, the reference LLaVA-1.5-7B settings): both.
- ``"fastv"``: FastV. The attention of each row's last token in decoder layer
  ``fastv_layer - 1`` (computed for that layer alone from its q/k projections; sdpa
  stays on) ranks the image tokens; the ``fastv_ratio`` least attended are dropped,
  so layers ``fastv_layer`` and later see the shorter sequence (FastV's ``K``, ``R``).
- ``"random"`` / ``"pool"``: ``visual_keep`` visual tokens right after the projector,
  a seeded random subset of patch positions (the same positions for every image, so
  an image's result never depends on its batch) or adaptive average pooling of the
  patch grid (``visual_keep`` a square number or ``(rows, cols)``).

These baselines act on the image span inside the decoder or on the projector's
output, which the registry's per-block :class:`saint.methods.LayerContext` does not
describe, so they are LLaVA-level methods rather than entries of ``saint.METHODS``.

Image tokens are found per sample from ``config.image_token_id`` (several images per
prompt allowed); text tokens are never dropped, nor is the last token of a prompt.

When the tower yields fewer features per image than the prompt holds image tokens
(``vit``, ``random``, ``pool``), each image's run of tokens is shrunk to its feature
count before the language model runs, exactly as if the processor had emitted that
many tokens: rows are re-aligned to the right (left padding), positions are
contiguous, and ``attention_mask``/``position_ids`` of later decoding steps are mapped
to the shorter prompt. Inside the language model, dropped tokens leave the kept ones
at their original positions (see :mod:`saint.adapters.hf_llm`).

Outputs stay in the coordinates of the input you passed: ``logits`` have the input's
length, and positions whose token was dropped (by either step) carry NaN logits.
With ``labels`` the loss is the model's own loss over the targets that still have a
prediction: a target whose predicting position was dropped is ignored (set to -100),
which never touches a text-only continuation that does not directly follow an image.
``output_hidden_states`` / ``output_attentions`` are refused while pruning. A patched
``LlavaModel`` (no LM head) returns NaN hidden states at dropped positions (0 under
autograd); ``saint.token_mask(model)`` (``[B, L]``) marks the positions that have an output.

SAINT with ``llm_rate="sample"`` (default) gives every sample its own count: ragged
rows are padded and masked, so a prompt's output is the same alone or in a batch.
``"batch"`` is the reference's batch vote (results depend on the batch).

The per-forward state lives on the patch handle (one forward at a time per model
instance: calls from several threads wait for each other; a deep copy or pickle of a
patched LLaVA is refused with "unpatch first"); the maps a cached generation needs are stored on its cache object, so
cached generations may interleave. Not supported (clear errors): flash/flex
attention, sliding-window layers, ``inputs_embeds``-only prompts with images, adding
images to a non-empty cache (so ``generate(prefill_chunk_size=n)`` over several chunks; a prompt that
fits one chunk runs as one prefill), 4-D attention masks (incl. static caches) together
with a vision-side reduction. A cache filled by a pruned prompt must be continued by
the same patched model (not after ``unpatch``). For ``num_beams`` /
``num_return_sequences`` > 1 with a vision-side reduction, generate's private helper
``_expand_multimodal_outputs`` is wrapped per instance to count the kept image tokens.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..methods import MethodSpec
from . import hf_vision
from .common import Hooked, TokenStats, get_handle, transformers_loaded
from .hf_vlm import HFVlm, multimodal
from .llava_vision import (
    check_grid,
    check_vit,
    make_expand,
    make_projector_hook,
    own_tower,
    prefill,
    refuse_patched_tower,
)
from .vlm_config import LLM_FIELDS, METHODS, MODES, VlmPruneConfig, check_int
from .vlm_handle import VlmPatch, installing, unpatch
from .vlm_hooks import Media, install_forward_hooks, make_mm_pre
from .vlm_prompt import continue_prompt
from .vlm_schedule import decoder_pruner, split_method

__all__ = [
    "ADAPTER", "EXPAND", "FIELDS", "LLM_FIELDS", "METHODS", "MODES", "VIT_FIELDS",
    "Llava", "LlavaPatch", "LlavaPruneConfig", "make_config", "matches", "patch", "unpatch",
]

EXPAND = "_expand_multimodal_outputs"  # generate's (private) helper for num_beams / num_return_sequences > 1
VIT_FIELDS = ("vit_keep", "vit_layer", "vit_step_div")
FIELDS: dict[str, tuple[str, ...]] = {
    "saint/vit": ("mode", *VIT_FIELDS),
    "saint/llm": ("mode", *LLM_FIELDS),
    "saint/hybrid": ("mode", *VIT_FIELDS, *LLM_FIELDS),
    "fastv": ("fastv_layer", "fastv_ratio"),
    "random": ("visual_keep", "seed"),
    "pool": ("visual_keep",),
}
MEDIA = Media()  # images only: pixel_values / mm_encoder_outputs["image"], image_token_id


def _llava_classes() -> tuple[type, ...]:
    try:
        from transformers.models.llava.modeling_llava import (
            LlavaForConditionalGeneration,
            LlavaModel,
        )
    except ImportError:  # pragma: no cover - transformers missing
        return ()
    return LlavaForConditionalGeneration, LlavaModel


def matches(model: torch.nn.Module) -> bool:
    if not transformers_loaded():
        return False
    classes = _llava_classes()
    return bool(classes) and isinstance(model, classes)


# ---------------------------------------------------------------------------- config
@dataclass
class LlavaPruneConfig(VlmPruneConfig):
    """Settings of one LLaVA pruning method; defaults are the reference LLaVA-1.5-7B
    settings (576 -> 375 patches at CLIP layer 19; SAINT after LLM layers 7..16,
    tau 0.83, K 5, gamma 10). The language-model settings are those of
    :class:`~saint.adapters.vlm_config.VlmPruneConfig`; ``visual_keep``: visual tokens
    per image after the projector (``random``, ``pool``)."""

    FAMILY: ClassVar[str] = "LLaVA"
    FIELDS: ClassVar[dict[str, tuple[str, ...]]] = FIELDS

    vit_keep: int = 375
    vit_layer: int = 19
    vit_step_div: int = 16
    visual_keep: int | tuple[int, int] | None = None

    def _check_vision(self) -> None:
        check_int("vit_keep", self.vit_keep, 1)
        check_int("vit_layer", self.vit_layer, 0)
        check_int("vit_step_div", self.vit_step_div, 1)

    def _check_baselines(self) -> None:
        if self.method in ("random", "pool"):
            self.grid_keep()
            check_int("seed", self.seed)

    def grid_keep(self) -> tuple[int, int] | int:
        """``visual_keep`` checked: ``(rows, cols)`` of the pooled grid, or the random subset's size."""
        v = self.visual_keep
        if v is None:
            raise ValueError(f"method {self.method!r} needs visual_keep (visual tokens per image after the projector)")
        if self.method == "pool":
            if isinstance(v, (tuple, list)):
                if len(v) != 2:
                    raise ValueError(f"visual_keep={v!r}: give (rows, cols) of the pooled grid")
                return check_int("visual_keep rows", v[0], 1), check_int("visual_keep cols", v[1], 1)
            n = check_int("visual_keep", v, 1)
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"pool needs a square visual_keep (e.g. 144 = 12x12) or (rows, cols); got {n}")
            return side, side
        return check_int("visual_keep", v, 1)


def make_config(method: str = "saint", **kwargs: Any) -> LlavaPruneConfig:
    """Build and validate a :class:`LlavaPruneConfig`, rejecting settings the chosen
    method/mode does not use (so a typo never silently does nothing)."""
    return LlavaPruneConfig.build(method, **kwargs)


# ---------------------------------------------------------------------------- handle
@dataclass
class LlavaPatch(VlmPatch):
    """A patched LLaVA: the VLM handle (config, decoder pruner, hooks, statistics of
    the last forward with images) and the vision-tower patch of ``vit``/``hybrid``."""

    vision: Any = None

    def remove(self) -> None:
        super().remove()
        if self.vision is not None:
            hf_vision.unpatch_tower(self.vision.tower)
            self.vision = None

    def check_installed(self) -> None:
        """Also refuse a tower patched on its own after this patch: its pruning would not
        match the prompts this patch plans (and LLaVA fails on a feature count)."""
        super().check_installed()
        if get_handle(self.mm.vision_tower) is not self.vision:
            raise ValueError(
                f"the vision tower ({type(self.mm.vision_tower).__name__}) was patched by saint on its own after "
                f"this {type(self.model).__name__}; unpatch the tower (saint.unpatch(<the vision tower>)) and prune "
                f"inside it through the {type(self.model).__name__}: saint.patch(model, mode='vit' or 'hybrid', ...)"
            )

    def vision_stats(self) -> TokenStats | None:
        """Tokens entering each vision-tower layer, per image (``vit``/``hybrid`` only)."""
        return None if self.vision is None else self.vision.stats()


# ---------------------------------------------------------------------------- patch
def patch(model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
          **kwargs: Any) -> LlavaPatch:
    """Patch a LLaVA model in place (see the module docstring and :func:`saint.patch`).

    ``method`` may be a SAINT-family :class:`~saint.methods.MethodSpec` (e.g. a
    calibration probe): it then selects the image tokens of ``mode="llm"/"hybrid"``."""
    method, llm_spec = split_method(method, "LLaVA")
    cfg = make_config(method, **kwargs)
    mm = multimodal(model)
    pruner = decoder_pruner(cfg, mm.language_model, llm_spec)
    if cfg.prunes_vit:
        check_vit(mm, cfg)
    if cfg.method in ("random", "pool"):
        check_grid(mm, cfg)

    refuse_patched_tower(model, mm)
    handle = LlavaPatch(cfg, model, mm, int(mm.config.image_token_id), pruner, trace=trace)
    with installing(handle):
        if cfg.prunes_vit:
            handle.vision = hf_vision.patch_tower(
                mm.vision_tower, "budget", layers=[cfg.vit_layer], keep=cfg.vit_keep, step_div=cfg.vit_step_div
            )
            own_tower(handle, model, mm)
        install_forward_hooks(handle, model, mm, make_mm_pre(handle, MEDIA, prefill, continue_prompt))
        if cfg.method in ("random", "pool"):
            projector = mm.multi_modal_projector
            handle.hooks.append(projector.register_forward_hook(make_projector_hook(handle, projector)))
            handle.hooked.append(Hooked(mm, lambda m: m.multi_modal_projector, projector, "the multimodal projector"))
        if model is not mm and hasattr(model, EXPAND) and EXPAND not in model.__dict__:
            handle.wrap(model, EXPAND, make_expand(handle, getattr(model, EXPAND)))
    return handle


# ---------------------------------------------------------------------------- protocol
class Llava(HFVlm):
    """LLaVA: sites are the language model's decoder layers (the vision tower is an
    :class:`~saint.adapters.hf_vision.HFVision` model of its own); inputs are
    processor-output dicts (``input_ids``, ``pixel_values``, ``attention_mask``)."""

    name = "llava"
    family = sys.modules[__name__]


ADAPTER = Llava()

"""Hugging Face VLMs that saint prunes inside their language model only: Mistral 3
(``Mistral3ForConditionalGeneration`` / ``Mistral3Model``, a Pixtral tower). It needs
nothing of the model but a decoder :mod:`saint.adapters.hf_llm` prunes in and
``config.image_token_id``.

Methods (``saint.patch(model, method=..., **settings)``; see :class:`LlmSidePruneConfig`):

- ``"saint"`` with ``mode="llm"`` (the default here): SAINT's graph drop of the image
  tokens after every decoder layer ``llm_layers = (start, end)``;
- ``"fastv"``: FastV (``fastv_layer`` K, ``fastv_ratio`` R).

Both run on the LLaVA machinery of :mod:`saint.adapters.hf_llm` (per-sample counts,
kept tokens at their original positions, cached and batched generation, outputs in
the input's coordinates with NaN logits at dropped positions). The vision side is not
pruned (Mistral 3's patch merger folds every 2x2 block of patches into one token, over
images of their own sizes), so ``mode="vit"`` / ``"hybrid"`` are refused with what works.
Image tokens are the runs of ``config.image_token_id``; everything else (Pixtral's row
breaks and image end) is text and never dropped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..methods import MethodSpec
from .base import Grid
from .common import transformers_classes, transformers_loaded
from .hf_vlm import HFVlm, multimodal
from .llava_vision import start_prefill
from .vlm_config import LLM_FIELDS, VlmPruneConfig
from .vlm_handle import Forward, VlmPatch, installing, unpatch
from .vlm_hooks import Media, install_forward_hooks, make_mm_pre
from .vlm_prompt import continue_prompt
from .vlm_schedule import decoder_pruner, split_method

__all__ = ["ADAPTER", "FIELDS", "LlmSidePruneConfig", "LlmSideVlm", "make_config", "matches", "patch", "unpatch"]

FIELDS: dict[str, tuple[str, ...]] = {
    "saint/llm": ("mode", *LLM_FIELDS),
    "fastv": ("fastv_layer", "fastv_ratio"),
}
MEDIA = Media()  # images only: pixel_values / mm_encoder_outputs["image"], image_token_id
FAMILY = "Mistral 3"  # as errors name it


def matches(model: torch.nn.Module) -> bool:
    return transformers_loaded() and type(model) in transformers_classes(
        "mistral3", "Mistral3ForConditionalGeneration", "Mistral3Model")


@dataclass
class LlmSidePruneConfig(VlmPruneConfig):
    """Settings of SAINT's ``llm`` mode or FastV on a VLM pruned inside its language
    model only (defaults: SAINT after decoder layers 7..16, tau 0.83, K 5, gamma 10, as
    for LLaVA-1.5-7B; see :class:`~saint.adapters.vlm_config.VlmPruneConfig`)."""

    FAMILY: ClassVar[str] = FAMILY
    METHODS: ClassVar[tuple[str, ...]] = ("saint", "fastv")
    FIELDS: ClassVar[dict[str, tuple[str, ...]]] = FIELDS

    mode: str = "llm"

    def _check_vision(self) -> None:
        raise ValueError(
            f"mode={self.mode!r}: saint prunes Mistral 3 inside the language model only (its patch merger folds "
            "every 2x2 block of patches into one token, so the tower must keep every patch); use mode='llm' or "
            "method='fastv'"
        )


def make_config(method: str = "saint", **kwargs: Any) -> LlmSidePruneConfig:
    """Build and validate a :class:`LlmSidePruneConfig`, rejecting settings the chosen
    method does not use (so a typo never silently does nothing)."""
    return LlmSidePruneConfig.build(method, **kwargs)


def prefill(handle: VlmPatch, module: torch.nn.Module, kwargs: dict[str, Any], fwd: Forward) -> dict[str, Any]:
    """A prompt with images on an empty cache: the decoder pruner starts on its image tokens."""
    fwd.input_length = kwargs["input_ids"].shape[1]
    return start_prefill(handle, kwargs, None, fwd)


def patch(model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
          **kwargs: Any) -> VlmPatch:
    """Patch a Mistral 3 model in place (see the module docstring and
    :func:`saint.patch`). ``method`` may be a SAINT-family :class:`~saint.methods.MethodSpec`
    (e.g. a calibration probe): it then selects the image tokens of ``mode="llm"``."""
    method, llm_spec = split_method(method, FAMILY)
    cfg = make_config(method, **kwargs)
    mm = multimodal(model)
    pruner = decoder_pruner(cfg, mm.language_model, llm_spec)
    handle = VlmPatch(cfg, model, mm, int(mm.config.image_token_id), pruner, trace=trace)
    with installing(handle):
        install_forward_hooks(handle, model, mm, make_mm_pre(handle, MEDIA, prefill, continue_prompt))
    return handle


class LlmSideVlm(HFVlm):
    """Mistral 3: sites are the language model's decoder layers; inputs are
    processor-output dicts (``input_ids``, ``pixel_values``, ``attention_mask``,
    ``image_sizes``)."""

    name = "llm_side_vlm"
    family = sys.modules[__name__]

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        """Mistral 3 images keep their own sizes, with a row-break token after every row
        of image tokens: there is no one grid."""
        raise ValueError(f"{type(model).__name__} keeps every image at its own size (row-break tokens between "
                         "its rows of image tokens): there is no one patch grid to map kept tokens to")


ADAPTER = LlmSideVlm()

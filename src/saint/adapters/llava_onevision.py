"""LLaVA-OneVision (transformers 5 ``LlavaOnevisionForConditionalGeneration`` /
``LlavaOnevisionModel``, anyres images): SAINT's ``llm`` mode and FastV inside the
language model, with per-instance hooks only.

An anyres image reaches the language model as the base image's tokens followed by the
unpadded grid of its crops, one ``image_newline`` token at the end of every row. Those
newline tokens carry the layout and are protected: they are found per image as the
feature rows equal to the model's ``image_newline`` vector (``get_image_features`` is
wrapped per instance to mark them) and are never dropped; every other image token may
go. The SAINT graph and FastV's ranking then work per prompt over its image tokens, as
for LLaVA (:mod:`saint.adapters.llava`, :mod:`saint.adapters.hf_llm`: kept tokens keep
their positions, each layer's cache holds what entered it, cached == uncached,
batched == alone).

Not supported yet (clear errors): the vision-side modes (``vit``, ``hybrid``) and the
``random``/``pool`` baselines, whose per-crop budgets would have to keep every crop's
grid intact for ``pack_image_features``; video tokens are never dropped.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch

from ..methods import MethodSpec
from .common import transformers_loaded
from .hf_vlm import HFVlm, multimodal
from .llava import MEDIA, make_config
from .vlm_handle import Forward, VlmPatch, installing, unpatch
from .vlm_hooks import install_forward_hooks, make_mm_pre
from .vlm_prompt import begin_prefill, continue_prompt
from .vlm_schedule import decoder_pruner, split_method

__all__ = ["ADAPTER", "LlavaOnevision", "matches", "patch", "unpatch"]

NEWLINE_ATTR = "_saint_newline"  # set on every per-image feature tensor: bool [tokens], newline rows


def _classes() -> tuple[type, ...]:
    try:
        from transformers.models.llava_onevision import modeling_llava_onevision as ov
    except ImportError:  # pragma: no cover - transformers missing
        return ()
    return ov.LlavaOnevisionForConditionalGeneration, ov.LlavaOnevisionModel


def matches(model: torch.nn.Module) -> bool:
    return transformers_loaded() and type(model) in _classes()


def patch(model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
          **kwargs: Any) -> VlmPatch:
    """Patch a LLaVA-OneVision model in place: ``method="saint", mode="llm"`` or ``"fastv"``
    (settings as for LLaVA: ``llm_layers``, ``llm_tau``, ... / ``fastv_layer``, ``fastv_ratio``)."""
    method, llm_spec = split_method(method, "LLaVA-OneVision")
    if method == "saint" and "mode" not in kwargs:
        kwargs = dict(kwargs, mode="llm")
    cfg = make_config(method, **kwargs)
    if cfg.method not in ("saint", "fastv") or cfg.prunes_vit:
        raise ValueError(
            f"LLaVA-OneVision supports method='saint' with mode='llm' and method='fastv' (inside the language "
            f"model); got {cfg.key!r}: anyres crops need per-crop budgets that keep pack_image_features' grid, "
            "which saint does not do yet"
        )
    mm = multimodal(model)
    pruner = decoder_pruner(cfg, mm.language_model, llm_spec)
    handle = VlmPatch(cfg, model, mm, int(mm.config.image_token_id), pruner, trace=trace)
    with installing(handle):
        handle.wrap(mm, "get_image_features", _make_features(mm, mm.get_image_features))
        install_forward_hooks(handle, model, mm, make_mm_pre(handle, MEDIA, _prefill, continue_prompt))
    return handle


def _make_features(mm: torch.nn.Module, original: Any):
    """``get_image_features`` that marks the newline rows of every image's features."""

    @functools.wraps(original)  # generate reads the signature to pre-encode the pixels
    def features(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        newline = mm.image_newline
        for f in out.pooler_output:
            setattr(f, NEWLINE_ATTR, (f == newline.to(f)).all(dim=-1))
        return out

    return features


def _prefill(handle: VlmPatch, module: torch.nn.Module, kwargs: dict[str, Any], fwd: Forward) -> dict[str, Any]:
    """A prompt with images on an empty cache: the tower runs now (its features mark
    the newline rows), and the decoder pruner starts on every image token but those."""
    mm_out = dict(kwargs.get("mm_encoder_outputs") or {})
    if mm_out.get("image") is None:
        mm_out["image"] = module.get_image_features(
            kwargs["pixel_values"], kwargs.get("image_sizes"),
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
            vision_aspect_ratio=kwargs.get("vision_aspect_ratio"),
            batch_num_images=kwargs.get("batch_num_images"), return_dict=True,
        )
        kwargs = dict(kwargs, pixel_values=None, mm_encoder_outputs=mm_out)
    input_ids = kwargs["input_ids"]
    image = input_ids == handle.image_token_id
    protected = _newline_positions(image, mm_out["image"].pooler_output)
    fwd.input_length = input_ids.shape[1]
    begin_prefill(handle, fwd, image & ~protected)
    return kwargs


def _newline_positions(image: torch.Tensor, features: Any) -> torch.Tensor:
    """``[B, L]``: the image tokens whose features are newline rows (never dropped)."""
    newline = []
    for f in features:
        mark = getattr(f, NEWLINE_ATTR, None)
        if mark is None:
            raise ValueError("the image features were computed outside the patched model; pass pixel_values")
        newline.append(mark)
    marks = torch.cat(newline).to(image.device)
    if int(image.sum()) != len(marks):
        raise ValueError(
            f"input_ids hold {int(image.sum())} image tokens for {len(marks)} image features; build the prompt "
            "with the processor for these images"
        )
    protected = torch.zeros_like(image)
    protected.view(-1)[image.view(-1).nonzero().squeeze(1)] = marks
    return protected


# ---------------------------------------------------------------------------- protocol
class LlavaOnevision(HFVlm):
    """LLaVA-OneVision: sites are the language model's decoder layers; inputs are
    processor-output dicts (``input_ids``, ``pixel_values``, ``image_sizes``)."""

    name = "llava_onevision"
    family = sys.modules[__name__]  # grid: the base image's (every crop has the same one)


ADAPTER = LlavaOnevision()

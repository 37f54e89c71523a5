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

from ..methods import MethodSpec, SaintConfig
from . import hf_llm
from .base import Grid
from .common import SAINT_ATTR, transformers_loaded
from .hf_vlm import HFVlm, install_forward_hooks, multimodal
from .llava import (
    LlavaPatch,
    _bind,
    _flag,
    _Forward,
    llm_schedule,
    make_config,
)

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
          **kwargs: Any) -> LlavaPatch:
    """Patch a LLaVA-OneVision model in place: ``method="saint", mode="llm"`` or ``"fastv"``
    (settings as for LLaVA: ``llm_layers``, ``llm_tau``, ... / ``fastv_layer``, ``fastv_ratio``)."""
    llm_spec = None
    if isinstance(method, MethodSpec):
        if not issubclass(method.config_cls, SaintConfig):
            raise TypeError(f"LLaVA-OneVision's language-model pruning takes a SAINT-family method, not {method.name!r}")
        llm_spec, method = method, "saint"
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
    lm = mm.language_model
    hf_llm.check_decoder(lm)
    schedule, query_layers = llm_schedule(cfg, len(lm.layers), llm_spec)
    pruner = hf_llm.DecoderPruner(lm, schedule, rope_keys=cfg.llm_rope_keys, query_layers=query_layers)
    handle = LlavaPatch(cfg, model, mm, int(mm.config.image_token_id), pruner, trace=trace)
    wrapper = _make_features(mm, mm.get_image_features)
    try:
        mm.__dict__["get_image_features"] = wrapper
        install_forward_hooks(handle, model, mm, _make_mm_pre(handle))
    except Exception:
        _remove(handle)
        raise
    handle.expand = wrapper  # removed with the handle
    model.__dict__[SAINT_ATTR] = handle
    return handle


def unpatch(model: torch.nn.Module) -> None:
    """Remove every hook and wrapper: the model computes exactly what it did before."""
    _remove(model.__dict__.pop(SAINT_ATTR))


def _remove(handle: LlavaPatch) -> None:
    mm = handle.mm
    if handle.expand is not None and mm.__dict__.get("get_image_features") is handle.expand:
        del mm.__dict__["get_image_features"]
    handle.expand = None
    for h in handle.hooks:
        h.remove()
    handle.hooks.clear()
    handle.pruner.remove()


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


def _make_mm_pre(handle: LlavaPatch):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        kwargs = _bind(type(module).forward, args, kwargs)
        handle.fwd = _Forward(labels=handle.pending_labels)
        handle.pending_labels = None
        pruner = handle.pruner
        pruner.finish()
        input_ids = kwargs.get("input_ids")
        cache = kwargs.get("cache")
        past = int(cache.get_seq_length()) if cache is not None else 0
        mm_out = dict(kwargs.get("mm_encoder_outputs") or {})
        has_images = kwargs.get("pixel_values") is not None or mm_out.get("image") is not None
        prompt = hf_llm.pruned_prompt_of(cache)
        if past > 0:
            if has_images or (input_ids is not None and bool((input_ids == handle.image_token_id).any())):
                raise ValueError(
                    "saint cannot add image tokens to a non-empty cache (multi-turn with a new image, chunked "
                    "prefill); run the prompt with its images on an empty cache"
                )
            if prompt is not None and prompt.owner == id(pruner):
                pruner.begin_continuation(prompt)
            return (), kwargs
        if not has_images:
            return (), kwargs
        if input_ids is None:
            raise ValueError("saint locates images by image_token_id: pass input_ids, not inputs_embeds")
        if _flag(kwargs, module, "output_hidden_states") or _flag(kwargs, module, "output_attentions"):
            raise ValueError(
                "output_hidden_states / output_attentions would be misaligned with the pruned sequence; "
                "unpatch the model (saint.unpatch) to read them"
            )
        if mm_out.get("image") is None:
            mm_out["image"] = module.get_image_features(
                kwargs["pixel_values"], kwargs.get("image_sizes"),
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                vision_aspect_ratio=kwargs.get("vision_aspect_ratio"),
                batch_num_images=kwargs.get("batch_num_images"), return_dict=True,
            )
            kwargs = dict(kwargs, pixel_values=None, mm_encoder_outputs=mm_out)
        newline = []
        for f in mm_out["image"].pooler_output:
            mark = getattr(f, NEWLINE_ATTR, None)
            if mark is None:
                raise ValueError("the image features were computed outside the patched model; pass pixel_values")
            newline.append(mark)
        image = input_ids == handle.image_token_id
        marks = torch.cat(newline).to(image.device)
        if int(image.sum()) != len(marks):
            raise ValueError(
                f"input_ids hold {int(image.sum())} image tokens for {len(marks)} image features; build the prompt "
                "with the processor for these images"
            )
        protected = torch.zeros_like(image)
        protected.view(-1)[image.view(-1).nonzero().squeeze(1)] = marks
        handle.fwd.input_length = input_ids.shape[1]
        prunable = image & ~protected
        handle.fwd.tower_counts = prunable.sum(dim=1).cpu()
        pruner.begin_prefill(prunable)
        return (), kwargs

    return hook


# ---------------------------------------------------------------------------- protocol
class LlavaOnevision(HFVlm):
    """LLaVA-OneVision: sites are the language model's decoder layers; inputs are
    processor-output dicts (``input_ids``, ``pixel_values``, ``image_sizes``)."""

    name = "llava_onevision"
    family = sys.modules[__name__]

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        """The base image's patch grid (every crop has the same one)."""
        vc = multimodal(model).config.vision_config
        g, p = int(vc.image_size) // int(vc.patch_size), int(vc.patch_size)
        return Grid(g, g, (p, p))


ADAPTER = LlavaOnevision()

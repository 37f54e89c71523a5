"""LLaVA's anyres families — LLaVA-NeXT (transformers 5 ``LlavaNextForConditionalGeneration``
/ ``LlavaNextModel``), LLaVA-NeXT-Video (``LlavaNextVideo*``: LLaVA-NeXT's images, and
videos) and LLaVA-OneVision (``LlavaOnevision*``): SAINT's ``llm``, ``vit``
and ``hybrid`` modes and FastV, with per-instance hooks and wrappers only. The
families differ only in what a :class:`Family` names (classes, the arguments their
``get_image_features`` takes, videos); :data:`NEXT_ADAPTER`, :data:`NEXT_VIDEO_ADAPTER` and
:data:`ONEVISION_ADAPTER` are their adapters.

An anyres image reaches the language model as the base image's patch grid followed by
the grid of its crops, which the model's own ``pack_image_features`` lays out as one
grid, unpads (cuts the rows or columns the resize padded), for OneVision may shrink by
bilinear interpolation (``vision_aspect_ratio="anyres_max_N"``), and closes with one
``image_newline`` token per row (an image without crops, e.g. one of several in a
OneVision prompt, gets one newline after its grid). The processor emits one placeholder
per packed token.

Newline tokens carry the layout and are protected: ``pack_image_features`` is wrapped
per instance, runs the model's packing once more on a one-channel kept mask with a
marker newline, and marks every image's newline rows (``NEWLINE_ATTR`` on its feature
tensor); they are never dropped, in any mode.

``llm`` / FastV: the SAINT graph and FastV's ranking work per prompt over its image
tokens but the newlines, as for LLaVA (:mod:`saint.adapters.llava`,
:mod:`saint.adapters.hf_llm`: kept tokens keep their positions, each layer's cache holds
what entered it, cached == uncached, batched == alone).

``vit`` (per-crop budgets): every crop and the base image is its own sample of the
vision tower, so SAINT's fixed-budget drop at ``vit_layer`` keeps ``vit_keep`` patches
of each, chosen by that crop's own similarity graph (as LLaVA,
:func:`saint.adapters.hf_vision.patch_tower`, traced to know which patches stayed).
The packing wrapper puts each crop's kept, projected rows back at their grid positions
(zeros elsewhere), lets the model's own packing run on features and kept mask alike,
and removes the positions the packed mask marks as dropped (also those the unpadding
cut, as unpatched). Each image's run of placeholders in the prompt then shrinks to its
kept count before layer 0 (as LLaVA's ``vit`` mode: rows right-aligned, contiguous
positions), so the language model sees the kept tokens plus every newline token.
Where OneVision interpolates the grid, a position blends up to four tower outputs: it
is kept when at least half of its bilinear weight comes from kept outputs, and its
feature is then the blend of the kept outputs alone (renormalised). Without
interpolation the packed mask is exactly 0 or 1 and kept features are untouched.
``hybrid``: ``vit``, then ``llm`` on the shortened prompt.

Videos (OneVision): video tokens are never dropped; in ``vit``/``hybrid`` the tower's
drop is paused while ``get_video_features`` runs, so frames keep every patch.

Not supported (clear errors): the ``random``/``pool`` baselines (LLaVA's take one
square grid per image), and every limit of LLaVA's adapter (flash/flex attention,
images on a non-empty cache, ``inputs_embeds`` with images, static caches or 4-D masks
with ``vit``/``hybrid``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..methods import MethodSpec
from . import hf_vision
from .common import transformers_loaded
from .hf_vlm import HFVlm, multimodal
from .llava import EXPAND, MEDIA, LlavaPatch, LlavaPruneConfig
from .llava import make_config as llava_config
from .llava_vision import (
    check_feature_layer,
    check_vit,
    grid_side,
    make_expand,
    own_tower,
    refuse_patched_tower,
    shrink_inputs,
)
from .vlm_handle import Forward, installing, unpatch
from .vlm_hooks import bind, install_forward_hooks, make_mm_pre
from .vlm_prompt import begin_prefill, continue_prompt, keep_last, refuse_static_cache
from .vlm_schedule import decoder_pruner, split_method

__all__ = ["FULL_ATTR", "NEWLINE_ATTR", "NEXT", "NEXT_ADAPTER", "NEXT_VIDEO", "NEXT_VIDEO_ADAPTER", "ONEVISION",
           "ONEVISION_ADAPTER", "AnyresVlm", "Family", "make_config", "patch"]

NEWLINE_ATTR = "_saint_newline"  # on every per-image feature tensor: bool [tokens], newline rows
FULL_ATTR = "_saint_full"  # on every per-image feature tensor: its token count before the vision-side drop
NEWLINE_MARK = 2.0  # the newline's value in the packed kept mask (kept patches are 1, dropped 0)
WHOLE = 1 - 1e-6  # a packed mask value above this is a kept output (bilinear weights may not sum to 1 exactly)


@dataclass(frozen=True)
class Family:
    """What differs between the anyres families: the adapter's name, the name errors
    use, the model classes (``module`` and ``classes`` inside ``transformers.models``),
    the forward arguments ``get_image_features`` takes besides the pixels and image
    sizes, and whether the model takes videos. Its ``make_config``/``matches``/``patch``/``unpatch``
    are the family functions of its adapter."""

    key: str
    name: str
    module: str
    classes: tuple[str, ...]
    feature_args: tuple[str, ...] = ("vision_feature_layer", "vision_feature_select_strategy")
    videos: bool = False

    def model_classes(self) -> tuple[type, ...]:
        try:
            mod = importlib.import_module(f"transformers.models.{self.module}")
        except ImportError:  # pragma: no cover - transformers missing
            return ()
        return tuple(getattr(mod, c) for c in self.classes)

    def matches(self, model: torch.nn.Module) -> bool:
        return transformers_loaded() and type(model) in self.model_classes()

    def make_config(self, method: str = "saint", **kwargs: Any) -> LlavaPruneConfig:
        return make_config(self, method, **kwargs)

    def patch(self, model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
              **kwargs: Any) -> LlavaPatch:
        return patch(self, model, method, trace=trace, **kwargs)

    def unpatch(self, model: torch.nn.Module) -> None:
        unpatch(model)


NEXT = Family("llava_next", "LLaVA-NeXT", "llava_next.modeling_llava_next",
              ("LlavaNextForConditionalGeneration", "LlavaNextModel"))
NEXT_VIDEO = Family("llava_next_video", "LLaVA-NeXT-Video", "llava_next_video.modeling_llava_next_video",
                    ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel"), videos=True)
ONEVISION = Family(
    "llava_onevision", "LLaVA-OneVision", "llava_onevision.modeling_llava_onevision",
    ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel"), videos=True,
    feature_args=("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio", "batch_num_images"),
)


def patch(family: Family, model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
          **kwargs: Any) -> LlavaPatch:
    """Patch an anyres LLaVA of ``family`` in place: ``method="saint"`` with
    ``mode="llm"`` (default), ``"vit"`` or ``"hybrid"``, or ``method="fastv"``; settings
    as for LLaVA (:class:`saint.adapters.llava.LlavaPruneConfig`; ``vit_keep`` is per crop)."""
    method, llm_spec = split_method(method, family.name)
    cfg = make_config(family, method, **kwargs)
    mm = multimodal(model)
    pruner = decoder_pruner(cfg, mm.language_model, llm_spec)
    if cfg.prunes_vit:
        check_vit(mm, cfg)
    refuse_patched_tower(model, mm)
    handle = LlavaPatch(cfg, model, mm, int(mm.config.image_token_id), pruner, trace=trace)
    with installing(handle):
        if cfg.prunes_vit:
            handle.vision = hf_vision.patch_tower(mm.vision_tower, "budget", trace=True, layers=[cfg.vit_layer],
                                                  keep=cfg.vit_keep, step_div=cfg.vit_step_div)
            own_tower(handle, model, mm)
            if family.videos:
                handle.wrap(mm, "get_video_features", _make_unpruned(handle, mm.get_video_features))
            if model is not mm and hasattr(model, EXPAND) and EXPAND not in model.__dict__:
                plan = functools.partial(_prompt_plan, image_id=handle.image_token_id)
                handle.wrap(model, EXPAND, make_expand(handle, getattr(model, EXPAND), plan))
        handle.wrap(mm, "pack_image_features", _make_pack(handle, mm.pack_image_features))
        prefill = functools.partial(_prefill, family)
        install_forward_hooks(handle, model, mm, make_mm_pre(handle, MEDIA, prefill, continue_prompt))
    return handle


def make_config(family: Family, method: str = "saint", **kwargs: Any) -> LlavaPruneConfig:
    """The validated settings of ``method`` on ``family`` (LLaVA's, with ``mode="llm"`` the
    default of SAINT); the random/pool baselines are refused. Needs no model, so a harness
    can refuse bad settings before it loads any weights."""
    if method == "saint" and "mode" not in kwargs:
        kwargs = dict(kwargs, mode="llm")
    cfg = llava_config(method, **kwargs)
    if cfg.method not in ("saint", "fastv"):
        raise ValueError(
            f"{family.name} supports method='saint' (mode='llm', 'vit' or 'hybrid') and method='fastv'; got "
            f"{cfg.key!r}: the random/pool baselines take one square grid per image, not anyres crops"
        )
    return cfg


# ---------------------------------------------------------------------------- packing
def _make_pack(handle: LlavaPatch, original: Any):
    """``pack_image_features`` that keeps only the kept positions of every image and
    marks its newline rows and unpruned length (see the module docstring)."""

    @functools.wraps(original)
    def pack(*args: Any, **kwargs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        kw = bind(original, args, kwargs)
        feats = list(kw["image_features"])
        kept = _crop_kept(handle, feats)
        if handle.vision is not None:
            feats = [_to_grid(f, k) for f, k in zip(feats, kept, strict=True)]
        packed, _ = original(**dict(kw, image_features=feats))
        newline = kw.get("image_newline")
        marker = None if newline is None else torch.tensor([NEWLINE_MARK], device=newline.device)
        masks, _ = original(**dict(kw, image_features=[k[..., None].float() for k in kept], image_newline=marker))
        out = [_drop(f, m[:, 0].to(f.device)) for f, m in zip(packed, masks, strict=True)]
        device = out[0].device if out else None
        return out, torch.tensor([len(f) for f in out], dtype=torch.long, device=device)

    return pack


def _crop_kept(handle: LlavaPatch, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per image, which patches of each crop the tower kept (``[crops, patches]``)."""
    side = grid_side(handle.mm)
    n = side * side
    if handle.vision is None:
        return [torch.ones(f.shape[0], n, dtype=torch.bool, device=f.device) for f in feats]
    origin = handle.vision.state.origin  # [crops, tower tokens]: slot of each input token, -1 = dropped
    crops = sum(int(f.shape[0]) for f in feats)
    if origin is None or origin.shape[0] != crops:
        raise ValueError(
            f"these {crops} crops' features did not come from the patched vision tower's last call in this thread; "
            "compute them with the patched model (pass pixel_values)"
        )
    kept = origin[:, origin.shape[1] - n:] >= 0
    return list(kept.split([int(f.shape[0]) for f in feats]))


def _to_grid(f: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """A crop stack's kept rows ``[crops, k, C]`` back at their patch positions
    ``[crops, patches, C]`` (zeros at dropped ones)."""
    counts = kept.sum(dim=1)
    if int(counts.min()) != int(counts.max()) or f.shape[1] != int(counts[0]):
        raise ValueError(
            f"the projector gave {f.shape[1]} rows per crop for {counts.tolist()} kept patches; the vision feature "
            "must be the patch grid (a CLIP tower needs vision_feature_select_strategy='default')"
        )
    grid = f.new_zeros(kept.shape[0], kept.shape[1], f.shape[-1])
    grid[kept] = f.reshape(-1, f.shape[-1])
    return grid


def _drop(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """An image's packed features ``[T, C]`` without the positions its packed mask ``m``
    marks as dropped; blended positions (interpolation) renormalised to their kept
    weight. Marks the newline rows and the unpruned length on the result."""
    newline = m == NEWLINE_MARK
    whole = (m > WHOLE) & ~newline
    blended = (m > 0) & ~whole & ~newline
    keep = newline | whole | (blended & (m >= 0.5))
    if bool(blended.any()):
        f = torch.where(blended[:, None], f / m.clamp(min=0.5)[:, None].to(f.dtype), f)
    if not bool(keep.all()):
        f = f[keep]
    setattr(f, NEWLINE_ATTR, newline[keep])
    setattr(f, FULL_ATTR, len(m))
    return f


def _make_unpruned(handle: LlavaPatch, original: Any):
    """``get_video_features`` with the tower's drop paused: frames keep every patch."""

    @functools.wraps(original)  # generate reads the signature to pre-encode the pixels
    def video_features(*args: Any, **kwargs: Any) -> Any:
        with handle.lock:
            vision = handle.vision
            settings, vision.settings = vision.settings, {}
            try:
                return original(*args, **kwargs)
            finally:
                vision.settings = settings

    return video_features


# ---------------------------------------------------------------------------- prompt
def _prefill(family: Family, handle: LlavaPatch, module: torch.nn.Module, kwargs: dict[str, Any],
             fwd: Forward) -> dict[str, Any]:
    """A prompt with images on an empty cache: the tower runs now (its features carry
    their newline marks and unpruned lengths), each image's placeholders shrink to its
    kept count, and the decoder pruner starts on every image token but the newlines."""
    if handle.config.prunes_vit and kwargs.get("vision_feature_layer") is not None:
        check_feature_layer(module, kwargs["vision_feature_layer"], handle.config)
    mm_out = dict(kwargs.get("mm_encoder_outputs") or {})
    if mm_out.get("image") is None:
        args = {k: kwargs.get(k) for k in family.feature_args}
        mm_out["image"] = module.get_image_features(kwargs["pixel_values"], kwargs.get("image_sizes"), **args,
                                                    return_dict=True)
    if family.videos and mm_out.get("video") is None and kwargs.get("pixel_values_videos") is not None:
        mm_out["video"] = module.get_video_features(
            kwargs["pixel_values_videos"], vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"), return_dict=True)
    kwargs = dict(kwargs, pixel_values=None, mm_encoder_outputs=mm_out)
    if family.videos:
        kwargs["pixel_values_videos"] = None
    feats = mm_out["image"].pooler_output
    fwd.input_length = kwargs["input_ids"].shape[1]
    keep0 = _prompt_plan(kwargs["input_ids"], feats, handle.image_token_id)
    if keep0 is not None:
        refuse_static_cache(kwargs)
        kwargs = shrink_inputs(kwargs, keep0, fwd, handle.image_token_id)
    image = kwargs["input_ids"] == handle.image_token_id
    begin_prefill(handle, fwd, image & ~_newline_positions(image, feats), kwargs.get("attention_mask"))
    return kwargs


def _marks(feats: Sequence[torch.Tensor], attr: str) -> list[Any]:
    marks = [getattr(f, attr, None) for f in feats]
    if any(m is None for m in marks):
        raise ValueError("the image features were computed outside the patched model; pass pixel_values")
    return marks


def _prompt_plan(input_ids: torch.Tensor, feats: Sequence[torch.Tensor], image_id: int) -> torch.Tensor | None:
    """Keep mask ``[B, L]`` that shrinks each image's placeholders from its unpruned
    length to its kept count (None when the prompt already has the kept counts)."""
    full, kept = _marks(feats, FULL_ATTR), [len(f) for f in feats]
    total = int((input_ids == image_id).sum())
    if total == sum(kept):
        return None
    if total != sum(full):
        raise ValueError(
            f"input_ids hold {total} image tokens (image_token_id={image_id}) for images of {full} tokens "
            f"({kept} after the vision-side drop); build the prompt with the processor for these images"
        )
    return keep_last(input_ids, image_id, full, kept)


def _newline_positions(image: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, L]``: the image tokens whose features are newline rows (never dropped)."""
    marks = torch.cat(_marks(feats, NEWLINE_ATTR)).to(image.device)
    if int(image.sum()) != len(marks):
        raise ValueError(
            f"input_ids hold {int(image.sum())} image tokens for {len(marks)} image features; build the prompt "
            "with the processor for these images"
        )
    protected = torch.zeros_like(image)
    protected.view(-1)[image.view(-1).nonzero().squeeze(1)] = marks
    return protected


# ---------------------------------------------------------------------------- protocol
class AnyresVlm(HFVlm):
    """An anyres LLaVA: sites are the language model's decoder layers; inputs are
    processor-output dicts (``input_ids``, ``pixel_values``, ``image_sizes``); ``grid``
    is the base image's (every crop has the same one)."""

    def __init__(self, family: Family) -> None:
        self.family = family  # type: ignore[assignment]  # matches/patch/unpatch, as a family module's
        self.name = family.key


NEXT_ADAPTER = AnyresVlm(NEXT)
NEXT_VIDEO_ADAPTER = AnyresVlm(NEXT_VIDEO)
ONEVISION_ADAPTER = AnyresVlm(ONEVISION)

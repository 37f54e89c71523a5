"""The prompt side of a patched Qwen-VL: the prefill that runs the (patched) tower
first and shrinks every image's and video's placeholder tokens to its kept groups
(positions stay those of the full grid: M-RoPE ids from the model's own
``get_rope_index``), the decoding steps that follow such a prompt, and the per-image
statistics of the last forward."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F

from . import hf_llm
from .common import TokenStats
from .qwen_vl_features import FEATURE_FNS, keep_of
from .vlm_handle import Forward
from .vlm_hooks import Media
from .vlm_prompt import (
    begin_prefill,
    continued_mask,
    refuse_static_cache,
    run_index,
    shrink_rows,
    step_shape,
)

MEDIA = Media(pixels=("pixel_values", "pixel_values_videos"), features=tuple(FEATURE_FNS),
              token_ids=("image_token_id", "video_token_id"), tokens="image or video")


def _visual_ids(mm: torch.nn.Module) -> list[int]:
    return [int(mm.config.image_token_id), int(mm.config.video_token_id)]


def _audio(module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The audio tokens of a model that takes audio (the Omni thinkers), else None."""
    audio_id = getattr(module.config, "audio_token_id", None)
    return None if audio_id is None else input_ids == int(audio_id)


def prefill(handle: Any, module: torch.nn.Module, kwargs: dict[str, Any], fwd: Forward) -> dict[str, Any]:
    """A prompt with images or videos on an empty cache: with a vision-side reduction,
    the tower runs now and every image's tokens shrink to its kept groups; the decoder
    pruner then starts on the visual tokens."""
    if handle.tower is not None:
        handle.tower.counts = None  # this forward's tower calls count afresh
    input_ids = kwargs["input_ids"]
    ids = MEDIA.ids(module, input_ids.device)
    fwd.input_length = input_ids.shape[1]
    visual = torch.isin(input_ids, ids)
    keep0 = None
    if handle.config.reduces_vision:
        kwargs, keep0 = _reduce_vision(module, kwargs, visual)
    handle.runs = (run_index(visual, _audio(module, input_ids)), keep0)
    if keep0 is not None and not bool(keep0.all()):
        refuse_static_cache(kwargs)
        kwargs = _shrink_inputs(kwargs, keep0, fwd)
        input_ids = kwargs["input_ids"]
    begin_prefill(handle, fwd, torch.isin(input_ids, ids), kwargs.get("attention_mask"))
    return kwargs


def _reduce_vision(module: torch.nn.Module, kwargs: dict[str, Any],
                   visual: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """Run the (patched) tower now, keep every image's kept groups, and say which
    input positions stay (``keep0 [B, L]``); positions are the full grid's."""
    input_ids = kwargs["input_ids"]
    mm_out = dict(kwargs.get("mm_encoder_outputs") or {})
    keep0 = torch.ones_like(input_ids, dtype=torch.bool)
    for modality, token_id in zip(FEATURE_FNS, _visual_ids(module), strict=True):
        pixels = kwargs.get("pixel_values" if modality == "image" else "pixel_values_videos")
        if mm_out.get(modality) is None and pixels is not None:
            fn = getattr(module, FEATURE_FNS[modality])
            mm_out[modality] = fn(pixels, kwargs.get(f"{modality}_grid_thw"), return_dict=True)
        out = mm_out.get(modality)
        if out is None:
            continue
        keeps = [keep_of(f, modality) for f in out.pooler_output]
        pos = _positions(kwargs, visual, modality, token_id).flatten().nonzero().squeeze(1)
        total = sum(len(k) for k in keeps)
        if len(pos) != total:
            raise ValueError(
                f"input_ids hold {len(pos)} {modality} tokens ({modality}_token_id={token_id}) but the {modality} "
                f"features have {total}; build the prompt with the processor for these {modality}s"
            )
        keep0.view(-1)[pos] = torch.cat(keeps).to(keep0.device)
        reduced = type(out)(**dict(out.items()))
        reduced.pooler_output = tuple(f[k] for f, k in zip(out.pooler_output, keeps, strict=True))
        if getattr(out, "deepstack_features", None) is not None:
            reduced.deepstack_features = [
                [f[keep_of(f, modality)] for f in layer] for layer in out.deepstack_features
            ]
        mm_out[modality] = reduced
    if kwargs.get("position_ids") is None:
        kwargs = dict(kwargs, position_ids=_full_positions(module, kwargs))
    return dict(kwargs, pixel_values=None, pixel_values_videos=None, mm_encoder_outputs=mm_out), keep0


def _positions(kwargs: dict[str, Any], visual: torch.Tensor, modality: str, token_id: int) -> torch.Tensor:
    """Where the ``modality``'s placeholder tokens are: visual tokens of the processor's token
    type (1 image, 2 video) where the types are given, since GLM-4.1V's video frames hold image
    tokens; else by token id."""
    types = kwargs.get("mm_token_type_ids")
    input_ids = kwargs["input_ids"]
    if types is None or types.shape != input_ids.shape:
        return input_ids == token_id
    return visual & (types.to(input_ids.device) == (1 if modality == "image" else 2))


# the per-family inputs of compute_3d_position_ids beyond the grids and the mask: Qwen-VL and
# GLM read the token types (and Qwen2.5-VL the seconds per video grid), the Omni thinkers the
# audio lengths, the seconds per video grid and whether a video's audio is interleaved
_POSITION_EXTRAS = frozenset({"mm_token_type_ids", "second_per_grid_ts", "use_audio_in_video",
                              "audio_feature_lengths", "video_second_per_grid"})


@functools.cache
def _parameter_names(fn: Any) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _parameters(method: Any) -> frozenset[str]:
    """The parameter names of a bound method (its function's signature, read once)."""
    return _parameter_names(getattr(method, "__func__", method))


def _full_positions(module: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """The 3-D (M-RoPE) positions the unpatched model would use for this prompt (and
    its ``rope_deltas``, stored on the model as the unpatched forward does)."""
    input_ids = kwargs["input_ids"]
    extra = {k: kwargs.get(k) for k in _POSITION_EXTRAS & _parameters(module.compute_3d_position_ids) if k in kwargs}
    if "audio_feature_lengths" in extra and kwargs.get("feature_attention_mask") is not None:
        extra["audio_feature_lengths"] = kwargs["feature_attention_mask"].sum(dim=1)  # as the Omni forwards do
    pos = module.compute_3d_position_ids(
        input_ids=input_ids, image_grid_thw=kwargs.get("image_grid_thw"), video_grid_thw=kwargs.get("video_grid_thw"),
        inputs_embeds=None, attention_mask=kwargs.get("attention_mask"), cache=kwargs.get("cache"), **extra,
    )
    if pos is None:  # no grid / token types: the text model's own fallback, plain positions
        b, n = input_ids.shape
        pos = torch.arange(n, device=input_ids.device).expand(b, n)
    return pos


def _shrink_inputs(kwargs: dict[str, Any], keep0: torch.Tensor, fwd: Forward) -> dict[str, Any]:
    """Drop the visual tokens of removed groups from input_ids, token types, the 2-D
    attention mask (always given, see :func:`shrink_rows`) and the (full-grid) position
    ids, right-aligning the rows."""
    input_ids = kwargs["input_ids"]
    src, valid, mask = shrink_rows(kwargs, keep0, fwd)

    def take(t: torch.Tensor, fill: int) -> torch.Tensor:
        lead = t.shape[:-2]
        return torch.gather(t.expand(*lead, *input_ids.shape), -1, src.expand(*lead, *src.shape)).masked_fill(
            ~valid, fill)

    out = dict(kwargs, input_ids=take(input_ids, 0), position_ids=take(kwargs["position_ids"], 0),
               attention_mask=mask)
    types = kwargs.get("mm_token_type_ids")
    if types is not None:
        # generate's assisted decoding runs its candidates (text) without extending the types
        out["mm_token_type_ids"] = take(F.pad(types, (0, input_ids.shape[-1] - types.shape[-1])), 0)
    return out


def continuation(handle: Any, module: torch.nn.Module, prompt: hf_llm.PrunedPrompt,
                  kwargs: dict[str, Any], past: int) -> dict[str, Any]:
    """Map a decoding step's 2-D mask to the shortened prompt; its positions stay those
    of the unpruned prompt (``generate``'s, or mask/length + ``rope_deltas``)."""
    handle.pruner.begin_continuation(prompt)
    if prompt.extra.get("src0") is None:
        return kwargs
    mask = continued_mask(prompt, kwargs, past)
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = _step_positions(module, prompt, kwargs, past)
    return dict(kwargs, attention_mask=mask, position_ids=pos)


def _step_positions(module: torch.nn.Module, prompt: hf_llm.PrunedPrompt, kwargs: dict[str, Any],
                    past: int) -> torch.Tensor:
    """The unpruned prompt's positions of a decoding step's tokens, as the unpatched
    model computes them: from the 2-D mask (or the length so far) plus ``rope_deltas``."""
    b, q, device = step_shape(kwargs)
    length0, t = prompt.input_length, past - prompt.length
    mask = kwargs.get("attention_mask")
    if mask is not None:
        base = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -q:]
    else:
        base = torch.arange(length0 + t, length0 + t + q, device=device).expand(b, q)
    deltas = getattr(module, "rope_deltas", None)
    if deltas is None:
        return base
    return base[None].expand(3, b, q) + deltas.repeat_interleave(b // deltas.shape[0], dim=0).to(base.device)


def make_image_stats(handle: Any):
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if handle.runs is None:
            return
        run, keep0 = handle.runs
        handle.runs = None
        n = int(run.max()) + 1
        final = handle.kept_input if handle.kept_input is not None else torch.ones_like(run, dtype=torch.bool)
        after_vision = keep0 if keep0 is not None else torch.ones_like(final)

        def count(kept: torch.Tensor) -> list[int]:
            sel = (run >= 0) & kept.to(run.device)
            return torch.bincount(run[sel], minlength=n).tolist()

        everything = torch.ones_like(final)
        handle.last_image_stats = TokenStats(
            ["merger", "language_model", "language_model.norm"],
            [count(everything), count(after_vision), count(final)],
        )

    return hook

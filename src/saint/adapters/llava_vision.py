"""LLaVA's vision-side token reductions (SAINT's ``vit`` step in the tower, the
``random``/``pool`` baselines on the projector's output) and the prefill that matches
every image's run of placeholder tokens to the features it got.

When the tower yields fewer features per image than the prompt holds image tokens,
each image's run is shrunk to its feature count before the language model runs,
exactly as if the processor had emitted that many tokens (rows right-aligned,
positions contiguous; see :mod:`saint.adapters.vlm_prompt`). ``generate``'s private
``_expand_multimodal_outputs`` (beams / returned sequences) is wrapped per instance to
count the tokens that will remain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..methods import make_config as registry_config
from . import hf_vision
from .common import Hooked, get_handle
from .vlm_handle import Forward, VlmPatch
from .vlm_prompt import begin_prefill, keep_last, refuse_static_cache, shrink_rows


# ---------------------------------------------------------------------------- checks
def grid_side(mm: torch.nn.Module) -> int:
    """Patches per side of the vision tower's square grid."""
    vc = mm.config.vision_config
    return int(vc.image_size) // int(vc.patch_size)


def _feature_layers(value: int | Sequence[int]) -> list[int]:
    """``vision_feature_layer`` (one hidden state's index, or several) as a list."""
    return [value] if isinstance(value, int) else list(value)


def refuse_patched_tower(model: torch.nn.Module, mm: torch.nn.Module) -> None:
    """Refuse a LLaVA whose vision tower saint patched on its own: the LLaVA patch could
    neither plan its prompts around that tower's pruning nor undo it."""
    if get_handle(mm.vision_tower) is not None:
        name = type(model).__name__
        raise ValueError(
            f"the vision tower of this {name} ({type(mm.vision_tower).__name__}) is patched by saint on its own; "
            f"unpatch it first (saint.unpatch(<the vision tower>)), then patch the {name} "
            "(mode='vit' or 'hybrid' prune inside the tower)"
        )


def own_tower(handle: VlmPatch, model: torch.nn.Module, mm: torch.nn.Module) -> None:
    """Mark the tower patch of ``vit``/``hybrid`` as the VLM's: unpatching or re-patching the
    tower alone is refused with the call that works (as for any wrapper patched whole), and a
    tower put in its place after patching is refused at the next forward."""
    name = type(model).__name__
    handle.vision.owner = name
    handle.hooked.append(Hooked(mm, lambda m: m.vision_tower, mm.vision_tower, f"the vision tower of this {name}"))


def check_vit(mm: torch.nn.Module, cfg: Any) -> None:
    """SAINT's ``vit`` step fits this tower and happens before LLaVA takes its features."""
    tower = mm.vision_tower
    if not hf_vision.matches(tower):
        raise TypeError(f"vit mode needs a CLIP or SigLIP vision tower, this LLaVA has {type(tower).__name__}")
    depth = len(tower.encoder.layers)
    if cfg.vit_layer >= depth:
        raise ValueError(f"vit_layer={cfg.vit_layer} is out of range: the vision tower has {depth} layers (0..{depth - 1})")
    n = int(tower.embeddings.num_patches)
    if cfg.vit_keep > n:
        raise ValueError(f"vit_keep={cfg.vit_keep} exceeds the {n} patches of the vision tower")
    check_feature_layer(mm, mm.config.vision_feature_layer, cfg)


def check_feature_layer(mm: torch.nn.Module, value: int | Sequence[int], cfg: Any) -> None:
    """The hidden states LLaVA takes (``vision_feature_layer``, the config's or a call's)
    come after SAINT's ``vit`` step: an earlier one would hand over the unpruned patches."""
    depth = len(mm.vision_tower.encoder.layers)
    for f in _feature_layers(value):
        idx = f % (depth + 1)
        if idx <= cfg.vit_layer:
            raise ValueError(
                f"vision_feature_layer={f} (hidden state {idx}) is taken before vit_layer={cfg.vit_layer} prunes; "
                f"LLaVA would get the unpruned patches. Use vit_layer < {idx}"
            )


def check_grid(mm: torch.nn.Module, cfg: Any) -> None:
    """The baselines' ``visual_keep`` fits the tower's patch grid, and LLaVA hands them the
    whole grid (the ``default`` strategy drops the first token: a class token, or with a
    tower without one, a patch)."""
    if mm.config.vision_feature_select_strategy == "default" and not _has_class_token(mm):
        raise ValueError(
            f"method={cfg.method!r} reduces the patch grid, and this LLaVA's vision_feature_select_strategy='default' "
            f"drops the first patch of its {type(mm.vision_tower).__name__} (which has no class token), so its "
            "features are not a grid; use mode='vit' or 'llm', or a model with vision_feature_select_strategy='full'"
        )
    g = grid_side(mm)
    keep = cfg.grid_keep()
    if isinstance(keep, tuple):
        if keep[0] > g or keep[1] > g:
            raise ValueError(f"visual_keep={cfg.visual_keep} exceeds the {g}x{g} patch grid of the vision tower")
    elif keep > g * g:
        raise ValueError(f"visual_keep={keep} exceeds the {g * g} patches of the vision tower")


# ---------------------------------------------------------------------------- prefill
def prefill(handle: VlmPatch, module: torch.nn.Module, kwargs: dict[str, Any], fwd: Forward) -> dict[str, Any]:
    """A prompt with images on an empty cache: with a vision-side reduction, the
    tower runs now and every image's tokens shrink to its features; the decoder
    pruner then starts on the image tokens."""
    input_ids = kwargs["input_ids"]
    fwd.input_length = input_ids.shape[1]
    image_id = handle.image_token_id
    keep0 = None
    if handle.config.prunes_vit and kwargs.get("vision_feature_layer") is not None:
        check_feature_layer(module, kwargs["vision_feature_layer"], handle.config)
    if handle.config.reduces_vision:
        kwargs = image_features(module, kwargs)
        feats = kwargs["mm_encoder_outputs"]["image"].pooler_output
        per = _unpruned_count(module, kwargs.get("vision_feature_select_strategy"))
        keep0 = shrink_plan(input_ids, _feature_counts(feats), image_id, per)
    return start_prefill(handle, kwargs, keep0, fwd)


def start_prefill(handle: VlmPatch, kwargs: dict[str, Any], keep0: torch.Tensor | None, fwd: Forward
                  ) -> dict[str, Any]:
    """Shrink every image's run of tokens by ``keep0`` (None: they stay as they are),
    then start the decoder pruner on the image tokens that reach layer 0."""
    if keep0 is not None:
        refuse_static_cache(kwargs)
        kwargs = shrink_inputs(kwargs, keep0, fwd, handle.image_token_id, handle.position_offset)
    begin_prefill(handle, fwd, kwargs["input_ids"] == handle.image_token_id, kwargs.get("attention_mask"))
    return kwargs


def image_features(module: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run the (patched) tower + projector now, so the per-image feature counts are
    known before the image tokens are matched to them (LLaVA, InternVL, Gemma 3,
    Idefics3: the feature options, ``image_sizes`` and ``pixel_attention_mask`` only when
    the call has them)."""
    mm_out = dict(kwargs.get("mm_encoder_outputs") or {})
    if mm_out.get("image") is None:
        options = {k: kwargs[k] for k in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes",
                                          "pixel_attention_mask", "spatial_shapes") if kwargs.get(k) is not None}
        mm_out["image"] = module.get_image_features(pixel_values=kwargs["pixel_values"], **options, return_dict=True)
    kwargs = dict(kwargs, pixel_values=None, mm_encoder_outputs=mm_out)
    return kwargs


def _feature_counts(feats: Any) -> list[int]:
    if isinstance(feats, (list, tuple)):
        return [int(f.shape[0]) for f in feats]
    return [int(feats.shape[1])] * int(feats.shape[0])


def _has_class_token(mm: torch.nn.Module) -> bool:
    """Whether the LLaVA's vision tower puts a class token before its patches (CLIP's)."""
    return getattr(mm.vision_tower.config, "model_type", "") == "clip_vision_model"


def _unpruned_count(mm: torch.nn.Module, strategy: str | None) -> int:
    """Image tokens per image the processor emits for this LLaVA (unpruned features)."""
    n = grid_side(mm) ** 2 + (1 if _has_class_token(mm) else 0)
    strategy = strategy or mm.config.vision_feature_select_strategy
    return n - 1 if strategy == "default" else n


def shrink_plan(input_ids: torch.Tensor, counts: list[int], image_token_id: int,
                 per: int | list[int] | None = None) -> torch.Tensor | None:
    """Keep mask ``[B, L]`` that shrinks every image's run of ``per`` tokens (the
    processor's count; a list: each image's own) to its feature count; None when the
    counts already match."""
    is_img = input_ids == image_token_id
    total, n = int(is_img.sum()), len(counts)
    if total == sum(counts):
        return None
    if per is None and n and total % n == 0:
        per = total // n
    runs = per if isinstance(per, list) else None if per is None else [per] * n  # each image's processor count
    if n == 0 or runs is None or len(runs) != n or total != sum(runs) or any(
            c > r for c, r in zip(counts, runs, strict=True)):
        raise ValueError(
            f"input_ids hold {total} image tokens (image_token_id={image_token_id}) for {n} image(s), but the "
            f"pruned vision tower yields {counts} features per image and the processor emits {per} tokens per "
            f"image; give every image either {per} tokens (saint shrinks them) or exactly its feature count"
        )
    return keep_last(input_ids, image_token_id, runs, counts)


def shrink_inputs(kwargs: dict[str, Any], keep0: torch.Tensor, fwd: Forward, image_id: int,
                  offset: int = 0) -> dict[str, Any]:
    """Drop the surplus image tokens of every image (input_ids, attention mask,
    contiguous positions, ``token_type_ids``), right-aligning rows that lost different
    amounts. Without ``position_ids`` the prompt is numbered from ``offset``, as the model
    numbers it itself."""
    input_ids = kwargs["input_ids"]
    b, length = input_ids.shape
    src, valid, new_mask = shrink_rows(kwargs, keep0, fwd)
    fill = 0 if image_id != 0 else 1
    new_ids = torch.gather(input_ids, 1, src).masked_fill(~valid, fill)
    removed_at = (~keep0).long()
    removed_before = removed_at.cumsum(1) - removed_at
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(offset, offset + length, device=input_ids.device)
    pos = pos.expand(b, length)
    new_pos = (torch.gather(pos, 1, src) - torch.gather(removed_before, 1, src)).masked_fill(~valid, 0)
    rows = {k: torch.gather(kwargs[k], 1, src).masked_fill(~valid, 0)  # Gemma 3's image flags: per token too
            for k in ("token_type_ids",) if kwargs.get(k) is not None}
    return dict(kwargs, input_ids=new_ids, attention_mask=new_mask, position_ids=new_pos, **rows)


# ---------------------------------------------------------------------------- wrappers and hooks
def make_expand(handle: VlmPatch, original: Any, plan: Any = None):
    """``generate`` splits the image features per prompt by counting image tokens
    before it repeats them for beams / returned sequences; with a vision-side
    reduction it must count the tokens that will remain, not the processor's.
    ``plan(input_ids, features)``: the keep mask of the prompt's image tokens (None: all
    stay); LLaVA's by default."""
    if plan is None:
        def plan(input_ids: torch.Tensor, feats: Any) -> torch.Tensor | None:
            per = _unpruned_count(handle.mm, None)
            return shrink_plan(input_ids, _feature_counts(feats), handle.image_token_id, per)

    def expand(input_ids: Any, mm_encoder_output: Any, expand_size: int = 1, inputs_embeds: Any = None) -> Any:
        img = mm_encoder_output.get("image") if mm_encoder_output else None
        feats = getattr(img, "pooler_output", None)
        if input_ids is not None and feats is not None and input_ids.numel():
            keep0 = plan(input_ids, feats)
            if keep0 is not None:
                input_ids = input_ids.masked_fill(~keep0, 0 if handle.image_token_id != 0 else 1)
        return original(input_ids, mm_encoder_output, expand_size=expand_size, inputs_embeds=inputs_embeds)

    return expand


def make_projector_hook(handle: VlmPatch, projector: torch.nn.Module):
    """Random subset / adaptive pooling of the projected patch grid (CLS, when the
    feature strategy keeps it, stays in front), on ``projector`` only: a copy of it that
    carries the hook (PEFT's ``modules_to_save`` copies the module) is left alone."""
    cfg = handle.config
    g = grid_side(handle.mm)
    if cfg.method == "random":
        spec, reduce_cfg = registry_config("subset", keep=cfg.grid_keep(), seed=cfg.seed)
    else:
        rows, cols = cfg.grid_keep()  # type: ignore[misc]
        spec, reduce_cfg = registry_config("pool", rows=rows, cols=cols)
    reduce = spec.reduce
    assert reduce is not None

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if module is not projector:
            return None
        n, p, c = output.shape
        if p == g * g:
            head, grid = output[:, :0], output
        elif p == g * g + 1:
            head, grid = output[:, :1], output[:, 1:]
        else:
            raise ValueError(f"the projector produced {p} tokens per image, not a {g}x{g} patch grid (+ CLS)")
        return torch.cat([head, reduce(grid, g, reduce_cfg)], dim=1)

    return hook

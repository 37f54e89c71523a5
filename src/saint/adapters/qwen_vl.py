"""Qwen2.5-VL and Qwen3-VL (transformers 5 ``Qwen2_5_VLForConditionalGeneration`` /
``Qwen3VLForConditionalGeneration`` and their ``*Model``): SAINT's vit / llm / hybrid
modes and the FastV and random baselines, images and video, with per-instance hooks only.

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
Qwen3-VL's deepstack mergers) writes its output back to the full group count (zeros
at dropped groups), so the model's own bookkeeping (``reverse_indices``, the split by
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

import dataclasses
import functools
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..core import fixed_budget_keep_mask, keep_mask_to_indices
from ..methods import MethodSpec, SaintConfig
from . import hf_llm
from .base import Grid
from .common import SAINT_ATTR, TokenStats, transformers_loaded
from .hf_vlm import HFVlm, install_forward_hooks, multimodal
from .llava import (
    LlavaPatch,
    _bind,
    _flag,
    _int,
    llm_schedule,
)

METHODS = ("saint", "fastv", "random", "pool")
MODES = ("vit", "llm", "hybrid")
VIT_FIELDS = ("vit_ratio", "vit_layer", "vit_step_div")
LLM_FIELDS = ("llm_layers", "llm_tau", "llm_k", "llm_gamma", "llm_rate", "llm_rope_keys")
FIELDS: dict[str, tuple[str, ...]] = {
    "saint/vit": ("mode", *VIT_FIELDS),
    "saint/llm": ("mode", *LLM_FIELDS),
    "saint/hybrid": ("mode", *VIT_FIELDS, *LLM_FIELDS),
    "fastv": ("fastv_layer", "fastv_ratio"),
    "random": ("keep_ratio", "seed"),
    "pool": ("pool_size",),
}
KEEP_ATTR = "_saint_keep"  # set on every per-image feature tensor: bool [groups] kept (raster order)
FEATURE_FNS = {"image": "get_image_features", "video": "get_video_features"}


def _families() -> dict[type, str]:
    out: dict[type, str] = {}
    try:
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25

        out[q25.Qwen2_5_VLForConditionalGeneration] = out[q25.Qwen2_5_VLModel] = "qwen2_5_vl"
    except ImportError:  # pragma: no cover - transformers missing
        pass
    try:
        from transformers.models.qwen3_vl import modeling_qwen3_vl as q3

        out[q3.Qwen3VLForConditionalGeneration] = out[q3.Qwen3VLModel] = "qwen3_vl"
    except ImportError:  # pragma: no cover
        pass
    return out


def matches(model: torch.nn.Module) -> bool:
    return transformers_loaded() and type(model) in _families()


# ---------------------------------------------------------------------------- config
def _fraction(name: str, v: Any, low_open: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1 if low_open else 0 <= v < 1):
        rng = "(0, 1]" if low_open else "[0, 1)"
        raise ValueError(f"{name}={v!r} must be a fraction in {rng}")
    return float(v)


@dataclass
class QwenPruneConfig:
    """Settings of one Qwen-VL pruning method. ``vit_ratio``: fraction of each
    sample's merge groups kept after tower block ``vit_layer`` (at least one group);
    the LLM-side settings are those of :class:`saint.adapters.llava.LlavaPruneConfig`
    (defaults: the reference LLaVA-1.5-7B settings, SAINT after decoder layers 7..16,
    tau 0.83, K 5, gamma 10). ``keep_ratio``: random's kept fraction per sample."""

    method: str = "saint"
    mode: str = "hybrid"
    vit_ratio: float = 0.65
    vit_layer: int = 16
    vit_step_div: int = 16
    llm_layers: tuple[int, int] = (7, 16)
    llm_tau: float | Sequence[float] | Mapping[int, float] = 0.83
    llm_k: int | Sequence[int] | Mapping[int, int] = 5
    llm_gamma: float | Sequence[float] | Mapping[int, float] = 10.0
    llm_rate: str = "sample"
    llm_rope_keys: bool = True
    fastv_layer: int = 2
    fastv_ratio: float = 0.5
    keep_ratio: float | None = None
    seed: int = 0
    pool_size: int | None = None

    @property
    def key(self) -> str:
        return f"saint/{self.mode}" if self.method == "saint" else self.method

    @property
    def prunes_vit(self) -> bool:
        return self.method == "saint" and self.mode in ("vit", "hybrid")

    @property
    def reduces_vision(self) -> bool:
        """Whether fewer visual tokens than the processor's reach the language model."""
        return self.prunes_vit or self.method in ("random", "pool")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown Qwen-VL method {self.method!r}; known: {METHODS}")
        if self.method == "saint" and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.prunes_vit:
            _fraction("vit_ratio", self.vit_ratio)
            _int("vit_layer", self.vit_layer, 0)
            _int("vit_step_div", self.vit_step_div, 1)
        if self.method == "saint" and self.mode in ("llm", "hybrid"):
            self.llm_range()
            if self.llm_rate not in ("sample", "batch"):
                raise ValueError(f"llm_rate must be 'sample' or 'batch', got {self.llm_rate!r}")
            if not isinstance(self.llm_rope_keys, bool):
                raise TypeError(f"llm_rope_keys must be True or False, got {self.llm_rope_keys!r}")
        if self.method == "fastv":
            _int("fastv_layer", self.fastv_layer, 1)
            _fraction("fastv_ratio", self.fastv_ratio, low_open=False)
        if self.method == "pool":
            if self.pool_size is None:
                raise ValueError("method 'pool' needs pool_size (merged tokens per side averaged into one)")
            _int("pool_size", self.pool_size, 1)
        if self.method == "random":
            if self.keep_ratio is None:
                raise ValueError("method 'random' needs keep_ratio (fraction of each image's merged tokens kept)")
            _fraction("keep_ratio", self.keep_ratio)
            _int("seed", self.seed)

    def llm_range(self) -> tuple[int, int]:
        v = self.llm_layers
        if not isinstance(v, (tuple, list)) or len(v) != 2:
            raise TypeError(f"llm_layers must be (start, end), inclusive decoder layer indices; got {v!r}")
        start, end = _int("llm_layers start", v[0], 0), _int("llm_layers end", v[1], 0)
        if end < start:
            raise ValueError(f"llm_layers=({start}, {end}) is empty or reversed: need start <= end")
        return start, end


def make_config(method: str = "saint", **kwargs: Any) -> QwenPruneConfig:
    """Build and validate a :class:`QwenPruneConfig`, rejecting settings the chosen
    method/mode does not use (so a typo never silently does nothing)."""
    if method not in METHODS:
        raise ValueError(f"unknown Qwen-VL method {method!r}; known: {METHODS}")
    names = {f.name for f in dataclasses.fields(QwenPruneConfig)} - {"method"}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"Qwen-VL pruning does not take {unknown}; settings: {sorted(names)}")
    if method != "saint" and "mode" in kwargs:
        raise TypeError(f"mode= is for method='saint'; method {method!r} takes {list(FIELDS[method])}")
    cfg = QwenPruneConfig(method=method, **kwargs)
    allowed = FIELDS[cfg.key] if cfg.mode in MODES or method != "saint" else ("mode",)
    unused = sorted(set(kwargs) - set(allowed))
    if unused and (method != "saint" or cfg.mode in MODES):
        raise TypeError(f"{cfg.key.replace('/', ' mode=')} does not use {unused}; it takes {list(allowed)}")
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------- vision tower
class TowerPruner:
    """Drops whole merge groups after one block of a Qwen-VL vision tower.

    Per call: the tower's token order (window order for Qwen2.5-VL), the samples
    (full-attention segments), the kept groups; later blocks get shortened segment
    boundaries and rotary embeddings, and every merger writes back to all groups."""

    def __init__(self, tower: torch.nn.Module, layer: int, ratio: float, step_div: int) -> None:
        self.tower = tower
        self.layer = layer
        self.ratio = ratio
        self.step_div = step_div
        self.unit = int(tower.spatial_merge_size) ** 2
        self.full_blocks = set(getattr(tower, "fullatt_block_indexes", None) or range(len(tower.blocks)))
        self.hooks: list[Any] = []
        self.keep_raster: torch.Tensor | None = None  # [groups] of the last call, raster order
        self.counts: tuple[list[int], list[int]] | None = None  # tokens per sample before / after the drop
        # (every tower call of one forward: images, then videos; the handle resets it per forward)
        self._reset()

    def _reset(self) -> None:
        self.order: torch.Tensor | None = None  # window position -> raster group (Qwen2.5-VL)
        self.windows: torch.Tensor | None = None  # windowed-attention cu_seqlens (tokens)
        self.segments: torch.Tensor | None = None  # full-attention cu_seqlens (tokens)
        self.keep_tok: torch.Tensor | None = None  # [tokens] kept, tower order (after pruning)
        self.new: dict[str, Any] = {}
        self.k: torch.Tensor | None = None

    def install(self) -> None:
        tower = self.tower
        self.hooks.append(tower.register_forward_pre_hook(self._begin, with_kwargs=True))
        for i, blk in enumerate(tower.blocks):
            if i > self.layer:
                self.hooks.append(blk.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
        blk = tower.blocks[self.layer]
        self.hooks.append(blk.attn.qkv.register_forward_hook(self._capture))
        self.hooks.append(blk.register_forward_hook(self._prune, with_kwargs=True))
        for m in [tower.merger, *getattr(tower, "deepstack_merger_list", [])]:
            self.hooks.append(m.register_forward_hook(self._scatter))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self._reset()

    def _begin(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._reset()
        self.keep_raster = None
        kwargs = _bind(type(module).forward, args, kwargs)
        grid = kwargs["grid_thw"]
        if getattr(module, "window_size", None) is not None and hasattr(module, "fullatt_block_indexes"):
            from transformers.vision_utils import get_vision_window_index

            self.order, self.windows = get_vision_window_index(
                grid, module.spatial_merge_size, module.window_size, module.patch_size)
        sizes = (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0])
        self.segments = F.pad(sizes.cumsum(0), (1, 0))

    def _capture(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.k = output

    def _prune(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor):
        seg = self.segments
        assert seg is not None and self.k is not None
        n, c = output.shape
        heads = module.attn.num_heads
        keys = self.k.view(n, 3, heads, -1)[:, 1].float().mean(dim=1)  # [N, head_dim], before the vision RoPE
        self.k = None
        groups = keys.view(n // self.unit, self.unit, -1).mean(dim=1)
        keep = torch.zeros(n // self.unit, dtype=torch.bool, device=output.device)
        gseg = (seg // self.unit).tolist()
        for a, b in zip(gseg[:-1], gseg[1:], strict=True):
            budget = max(1, round(self.ratio * (b - a)))
            keep[a:b] = fixed_budget_keep_mask(groups[None, a:b], budget, self.step_div)[0]
        order = self.order if self.order is not None else torch.arange(len(keep), device=keep.device)
        raster = torch.empty_like(keep)
        raster[order.to(keep.device)] = keep
        self.keep_raster = raster
        keep_tok = keep.repeat_interleave(self.unit)
        self.keep_tok = keep_tok
        before, after = self.counts or ([], [])
        self.counts = (before + (seg[1:] - seg[:-1]).tolist(),
                       after + [int(keep[a:b].sum()) * self.unit for a, b in zip(gseg[:-1], gseg[1:], strict=True)])
        kept_cum = F.pad(keep_tok.long().cumsum(0), (1, 0))
        cos, sin = kwargs["position_embeddings"]
        idx = keep_tok.nonzero().squeeze(1)
        self.new = {"full": self._bounds(kept_cum, seg), "pos": (cos[idx], sin[idx])}
        if self.windows is not None:
            self.new["window"] = self._bounds(kept_cum, self.windows)
        return output[idx]

    def stats(self) -> TokenStats:
        """Tokens entering each tower block in the last forward with images, per sample
        (image or video frame group; images first)."""
        if self.counts is None:
            raise RuntimeError("no forward with images has run since patching; call the model first")
        before, after = self.counts
        return TokenStats([f"visual.blocks.{i}" for i in range(len(self.tower.blocks))],
                          [before if i <= self.layer else after for i in range(len(self.tower.blocks))])

    @staticmethod
    def _bounds(kept_cum: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        return torch.unique_consecutive(kept_cum[cu.long().to(kept_cum.device)]).to(cu.dtype)

    def _make_pre(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            if not self.new:
                return None
            cu = self.new["full"] if i in self.full_blocks else self.new["window"]
            return args, dict(kwargs, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()),
                              position_embeddings=self.new["pos"])

        return hook

    def _scatter(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.keep_tok is None:
            return None
        keep = self.keep_tok[:: self.unit]
        out = output.new_zeros(len(keep), *output.shape[1:])
        out[keep] = output
        return out


def _random_keep(n: int, ratio: float, seed: int, device: torch.device) -> torch.Tensor:
    """A seeded random ``ratio`` of ``n`` groups (the same subset for every sample of size ``n``)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=gen)[: max(1, round(ratio * n))]] = True
    return keep.to(device)


# ---------------------------------------------------------------------------- handle
@dataclass
class QwenPatch(LlavaPatch):
    """A patched Qwen-VL: the LLaVA handle's fields (config, decoder pruner, hooks,
    statistics of the last forward with images) plus the tower pruner and the
    per-instance wrappers of the feature functions."""

    family: str = ""
    tower: TowerPruner | None = None
    wrapped: dict[str, Any] = field(default_factory=dict)  # name -> (module, wrapper)
    last_image_stats: TokenStats | None = None
    runs: Any = None  # (image index of each input position, kept after the vision side) of this prefill

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
    """Patch a Qwen2.5-VL / Qwen3-VL model in place (see the module docstring and :func:`saint.patch`).

    ``method`` may be a SAINT-family :class:`~saint.methods.MethodSpec` (e.g. a
    calibration probe): it then selects the visual tokens of ``mode="llm"/"hybrid"``."""
    family = _families()[type(model)]
    llm_spec = None
    if isinstance(method, MethodSpec):
        if not issubclass(method.config_cls, SaintConfig):
            raise TypeError(f"Qwen-VL's language-model pruning takes a SAINT-family method, not {method.name!r}")
        llm_spec, method = method, "saint"
    cfg = make_config(method, **kwargs)
    mm = multimodal(model)
    lm = mm.language_model
    hf_llm.check_decoder(lm)
    schedule, query_layers = llm_schedule(cfg, len(lm.layers), llm_spec)
    if cfg.prunes_vit:
        _check_tower(mm.visual, cfg)

    pruner = hf_llm.DecoderPruner(lm, schedule, rope_keys=cfg.llm_rope_keys, query_layers=query_layers)
    handle = QwenPatch(cfg, model, mm, int(mm.config.image_token_id), pruner, trace=trace, family=family)
    try:
        if cfg.prunes_vit:
            handle.tower = TowerPruner(mm.visual, cfg.vit_layer, cfg.vit_ratio, cfg.vit_step_div)
            handle.tower.install()
        if cfg.reduces_vision:
            for modality, name in FEATURE_FNS.items():
                wrapper = _make_features(handle, modality, getattr(mm, name))
                mm.__dict__[name] = wrapper
                handle.wrapped[name] = (mm, wrapper)
        if family == "qwen3_vl" and schedule:
            wrapper = _make_deepstack(handle, lm._deepstack_process)
            lm.__dict__["_deepstack_process"] = wrapper
            handle.wrapped["_deepstack_process"] = (lm, wrapper)
        install_forward_hooks(handle, model, mm, _make_mm_pre(handle), lm_post=(_make_image_stats(handle),))
    except Exception:
        _remove(handle)
        raise
    model.__dict__[SAINT_ATTR] = handle
    return handle


def unpatch(model: torch.nn.Module) -> None:
    """Remove every hook and wrapper: the model computes exactly what it did before."""
    _remove(model.__dict__.pop(SAINT_ATTR))


def _remove(handle: QwenPatch) -> None:
    for name, (owner, wrapper) in handle.wrapped.items():
        if owner.__dict__.get(name) is wrapper:
            del owner.__dict__[name]
    handle.wrapped.clear()
    for h in handle.hooks:
        h.remove()
    handle.hooks.clear()
    handle.pruner.remove()
    if handle.tower is not None:
        handle.tower.remove()
        handle.tower = None


def _check_tower(tower: torch.nn.Module, cfg: QwenPruneConfig) -> None:
    depth = len(tower.blocks)
    if cfg.vit_layer >= depth - 1:
        raise ValueError(
            f"vit_layer={cfg.vit_layer}: the vision tower has {depth} blocks (0..{depth - 1}) and pruning after "
            f"the last one saves nothing; vit_layer must be <= {depth - 2}"
        )
    impl = tower.config._attn_implementation
    if impl not in hf_llm.MASKABLE_ATTENTION:
        raise ValueError(
            f"vision attn_implementation={impl!r}: vit pruning recomputes the tower's segment boundaries per "
            f"block, tested with {hf_llm.MASKABLE_ATTENTION} only; load the model with attn_implementation='sdpa'"
        )
    unit = int(tower.spatial_merge_size) ** 2
    if unit < 1:
        raise ValueError(f"spatial_merge_size={tower.spatial_merge_size} must be >= 1")


# ---------------------------------------------------------------------------- feature functions
def _make_features(handle: QwenPatch, modality: str, original: Any):
    """``get_image_features`` / ``get_video_features`` that mark every per-image feature
    tensor (and deepstack feature) with its kept groups (``KEEP_ATTR``, raster order)."""
    cfg = handle.config

    unit = int(handle.mm.visual.spatial_merge_size)

    @functools.wraps(original)  # generate reads the signature to pre-encode the pixels
    def features(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        grid = kwargs.get(f"{modality}_grid_thw", args[1] if len(args) > 1 else None)
        if cfg.method == "pool":
            return _pooled(out, grid, unit, cfg.pool_size)
        feats = out.pooler_output
        if handle.tower is not None and handle.tower.keep_raster is not None:
            keep = handle.tower.keep_raster
        else:
            groups_per_frame = (grid[:, 1] * grid[:, 2] // int(handle.mm.visual.spatial_merge_size) ** 2).tolist()
            parts = []
            for (t, *_), n in zip(grid.tolist(), groups_per_frame, strict=True):
                frame = _random_keep(n, cfg.keep_ratio, cfg.seed, feats[0].device) if cfg.method == "random" \
                    else torch.ones(n, dtype=torch.bool, device=feats[0].device)
                parts.append(frame.repeat(t))
            keep = torch.cat(parts)
        sizes = [int(f.shape[0]) for f in feats]
        for f, k in zip(feats, keep.split(sizes), strict=True):
            setattr(f, KEEP_ATTR, k)
        for layer in getattr(out, "deepstack_features", None) or []:
            for f, k in zip(layer, keep.split(sizes), strict=True):
                setattr(f, KEEP_ATTR, k)
        return out

    return features


def _pool_plan(grid: torch.Tensor, unit: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For the merged tokens of ``grid`` (raster order per frame, frames in order): the
    pooled cell of every token (cells numbered across all frames) and whether the token
    is its cell's top-left one (the anchor that carries the pooled value)."""
    cells, anchors, offset = [], [], 0
    for t, h, w in grid.tolist():
        rows, cols = h // unit, w // unit
        r = torch.arange(rows, device=device)[:, None].expand(rows, cols)
        c = torch.arange(cols, device=device)[None, :].expand(rows, cols)
        ncols = -(-cols // size)
        cell = ((r // size) * ncols + c // size).flatten()
        anchor = ((r % size == 0) & (c % size == 0)).flatten()
        per = int(cell.max()) + 1
        for _ in range(t):
            cells.append(cell + offset)
            anchors.append(anchor)
            offset += per
    return torch.cat(cells), torch.cat(anchors)


def _pooled(out: Any, grid: torch.Tensor, unit: int, size: int) -> Any:
    """Average pooling of every frame's merged-token grid: each window's mean is written
    at its top-left token (new feature tensors), which is the only one kept."""
    sizes = [int(f.shape[0]) for f in out.pooler_output]
    cell, anchor = _pool_plan(grid, unit, size, out.pooler_output[0].device)
    counts = torch.bincount(cell)

    def pool(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x = torch.cat(list(feats))
        means = torch.zeros(len(counts), x.shape[-1], dtype=torch.float32, device=x.device)
        means.index_add_(0, cell, x.float())
        means = (means / counts[:, None]).to(x.dtype)
        x = x.clone()
        x[anchor] = means[cell[anchor]]
        parts = x.split(sizes)
        for f, k in zip(parts, anchor.split(sizes), strict=True):
            setattr(f, KEEP_ATTR, k)
        return parts

    out.pooler_output = pool(out.pooler_output)
    if getattr(out, "deepstack_features", None) is not None:
        out.deepstack_features = [pool(layer) for layer in out.deepstack_features]
    return out


def _make_deepstack(handle: QwenPatch, original: Any):
    """Qwen3-VL adds deepstack features at the visual positions after the first decoder
    layers; once the LLM side dropped tokens, index them by the surviving positions."""

    def process(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
        pruner = handle.pruner
        stage = pruner.stage
        if pruner.phase != "prefill" or stage is None or stage.identity:
            return original(hidden_states, visual_pos_masks, visual_embeds)
        vm = visual_pos_masks.to(stage.idx.device)
        rank = vm.flatten().long().cumsum(0).view_as(vm) - 1
        kept = torch.gather(vm, 1, stage.idx) & stage.valid
        rows = torch.gather(rank, 1, stage.idx)[kept]
        return original(hidden_states, kept, visual_embeds[rows.to(visual_embeds.device)])

    return process


# ---------------------------------------------------------------------------- forward hooks
def _visual_ids(mm: torch.nn.Module) -> list[int]:
    return [int(mm.config.image_token_id), int(mm.config.video_token_id)]


def _make_mm_pre(handle: QwenPatch):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        kwargs = _bind(type(module).forward, args, kwargs)
        fwd = handle.fwd = type(handle.fwd)(labels=handle.pending_labels)
        handle.pending_labels = None
        handle.runs = None
        pruner = handle.pruner
        pruner.finish()
        input_ids = kwargs.get("input_ids")
        cache = kwargs.get("cache")
        past = int(cache.get_seq_length()) if cache is not None else 0
        mm_out = kwargs.get("mm_encoder_outputs") or {}
        has_visual = any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")) or any(
            mm_out.get(m) is not None for m in FEATURE_FNS)
        ids = torch.tensor(_visual_ids(module), device=input_ids.device) if input_ids is not None else None
        prompt = hf_llm.pruned_prompt_of(cache)
        if prompt is not None and prompt.owner != id(pruner):
            prompt = None
        if past > 0:
            if has_visual or (ids is not None and bool(torch.isin(input_ids, ids).any())):
                raise ValueError(
                    "saint cannot add image or video tokens to a non-empty cache (multi-turn with a new image, "
                    "chunked prefill); run the prompt with its images on an empty cache"
                )
            return (), (kwargs if prompt is None else _continuation(handle, module, prompt, kwargs, past))
        if not has_visual:
            return (), kwargs
        if handle.tower is not None:
            handle.tower.counts = None
        if input_ids is None:
            raise ValueError("saint locates images by image_token_id/video_token_id: pass input_ids, not inputs_embeds")
        if _flag(kwargs, module, "output_hidden_states") or _flag(kwargs, module, "output_attentions"):
            raise ValueError(
                "output_hidden_states / output_attentions would be misaligned with the pruned sequence; "
                "unpatch the model (saint.unpatch) to read them"
            )
        return (), _prefill(handle, module, kwargs, fwd, ids)

    return hook


def _runs(visual: torch.Tensor) -> torch.Tensor:
    """Index of the image/video each visual token belongs to (maximal runs, row-major;
    the processor wraps every image and video in vision start/end tokens), -1 elsewhere."""
    start = visual & ~F.pad(visual[:, :-1], (1, 0), value=False)
    run = start.flatten().long().cumsum(0).view_as(visual) - 1
    return run.masked_fill(~visual, -1)


def _prefill(handle: QwenPatch, module: torch.nn.Module, kwargs: dict[str, Any], fwd: Any,
             ids: torch.Tensor) -> dict[str, Any]:
    input_ids = kwargs["input_ids"]
    fwd.input_length = input_ids.shape[1]
    visual = torch.isin(input_ids, ids)
    keep0 = None
    if handle.config.reduces_vision:
        kwargs, keep0 = _reduce_vision(module, kwargs)
    handle.runs = (_runs(visual), keep0)
    if keep0 is not None and not bool(keep0.all()):
        if getattr(kwargs.get("cache"), "is_compileable", False):
            raise ValueError(
                "a static cache sizes its masks for the processor's prompt, which the vision-side token "
                "reduction shortens; use a dynamic cache (the default) with this method"
            )
        kwargs = _shrink_inputs(kwargs, keep0, fwd)
        input_ids = kwargs["input_ids"]
    image = torch.isin(input_ids, ids)
    if fwd.valid0 is not None:
        image &= fwd.valid0
    fwd.tower_counts = image.sum(dim=1).cpu()
    handle.pruner.begin_prefill(image)
    return kwargs


def _keep_of(f: torch.Tensor, modality: str) -> torch.Tensor:
    keep = getattr(f, KEEP_ATTR, None)
    if keep is None:
        raise ValueError(
            f"the {modality} features were computed outside the patched model; pass pixel values (or features "
            "from the patched model's get_image_features/get_video_features)"
        )
    return keep


def _reduce_vision(module: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
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
        keeps = [_keep_of(f, modality) for f in out.pooler_output]
        pos = (input_ids == token_id).flatten().nonzero().squeeze(1)
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
                [f[_keep_of(f, modality)] for f in layer] for layer in out.deepstack_features
            ]
        mm_out[modality] = reduced
    if kwargs.get("position_ids") is None:
        kwargs = dict(kwargs, position_ids=_full_positions(module, kwargs))
    return dict(kwargs, pixel_values=None, pixel_values_videos=None, mm_encoder_outputs=mm_out), keep0


def _full_positions(module: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """The 3-D (M-RoPE) positions the unpatched model would use for this prompt (and
    its ``rope_deltas``, stored on the model as the unpatched forward does)."""
    input_ids = kwargs["input_ids"]
    extra = {"second_per_grid_ts": kwargs.get("second_per_grid_ts")} if "second_per_grid_ts" in kwargs else {}
    pos = module.compute_3d_position_ids(
        input_ids=input_ids, image_grid_thw=kwargs.get("image_grid_thw"), video_grid_thw=kwargs.get("video_grid_thw"),
        inputs_embeds=None, attention_mask=kwargs.get("attention_mask"), cache=kwargs.get("cache"),
        mm_token_type_ids=kwargs.get("mm_token_type_ids"), **extra,
    )
    if pos is None:  # no grid / token types: the text model's own fallback, plain positions
        b, n = input_ids.shape
        pos = torch.arange(n, device=input_ids.device).expand(b, n)
    return pos


def _shrink_inputs(kwargs: dict[str, Any], keep0: torch.Tensor, fwd: Any) -> dict[str, Any]:
    """Drop the visual tokens of removed groups from input_ids, token types, the 2-D
    attention mask and the (full-grid) position ids, right-aligning the rows."""
    input_ids = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        raise ValueError(
            "a 4-D attention mask cannot follow the vision-side token reduction; pass a 2-D attention_mask "
            "(and a dynamic cache)"
        )
    src, valid = keep_mask_to_indices(keep0, align="right")

    def take(t: torch.Tensor, fill: int) -> torch.Tensor:
        lead = t.shape[:-2]
        return torch.gather(t.expand(*lead, *input_ids.shape), -1, src.expand(*lead, *src.shape)).masked_fill(
            ~valid, fill)

    out = dict(kwargs, input_ids=take(input_ids, 0), position_ids=take(kwargs["position_ids"], 0))
    if kwargs.get("mm_token_type_ids") is not None:
        out["mm_token_type_ids"] = take(kwargs["mm_token_type_ids"], 0)
    if mask is not None:
        out["attention_mask"] = take(mask, 0)
    elif not bool(valid.all()):
        out["attention_mask"] = valid.long()
    fwd.src0, fwd.valid0, fwd.removed = src, valid, (~keep0).sum(dim=1)
    return out


def _continuation(handle: QwenPatch, module: torch.nn.Module, prompt: hf_llm.PrunedPrompt,
                  kwargs: dict[str, Any], past: int) -> dict[str, Any]:
    """Map a decoding step's 2-D mask to the shortened prompt; its positions stay those
    of the unpruned prompt (``generate``'s, or mask/length + ``rope_deltas``)."""
    handle.pruner.begin_continuation(prompt)
    src0 = prompt.extra.get("src0")
    if src0 is None:
        return kwargs
    valid0 = prompt.extra["valid0"]
    x = kwargs.get("input_ids")
    x = kwargs["inputs_embeds"] if x is None else x
    b, q = x.shape[:2]
    length0, t = prompt.input_length, past - prompt.length
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2
                             or mask.shape[1] != length0 + t + q):
        raise ValueError(
            f"attention_mask of shape {tuple(getattr(mask, 'shape', ()))} does not continue the pruned prompt of "
            f"{length0} input tokens + {t} generated; pass the full 2-D mask of the sequence so far (no 4-D masks "
            "or static caches with a vision-side reduction)"
        )
    pos = kwargs.get("position_ids")
    if pos is None:
        if mask is not None:
            base = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -q:]
        else:
            base = torch.arange(length0 + t, length0 + t + q, device=x.device).expand(b, q)
        deltas = getattr(module, "rope_deltas", None)
        pos = base if deltas is None else base[None].expand(3, b, q) + deltas.repeat_interleave(
            b // deltas.shape[0], dim=0).to(base.device)
    if mask is not None:
        head = torch.gather(mask[:, :length0], 1, src0).masked_fill(~valid0, 0)
        mask = torch.cat([head, mask[:, length0:]], dim=1)
    elif not bool(valid0.all()):
        mask = torch.cat([valid0.long(), valid0.new_ones(b, t + q, dtype=torch.long)], dim=1)
    return dict(kwargs, attention_mask=mask, position_ids=pos)


def _make_image_stats(handle: QwenPatch):
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


# ---------------------------------------------------------------------------- protocol
class QwenVL(HFVlm):
    """Qwen2.5-VL / Qwen3-VL: sites are the language model's decoder layers (as for
    LLaVA); inputs are processor-output dicts (``input_ids``, ``pixel_values``,
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
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise ValueError("Qwen-VL takes batches of processor outputs (dicts with input_ids, pixel_values, "
                             "image_grid_thw)")

    def split(self, inputs: Any, size: int) -> Any:
        """Row batches of at most ``size`` prompts, each with its own images' patches
        and grids (found from ``mm_token_type_ids``: 1 image, 2 video tokens)."""
        b = self.batch_size(inputs)
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
        raise ValueError("splitting a Qwen-VL batch needs mm_token_type_ids (the processor returns them)")
    per_row = (types == code).sum(dim=1)
    patches = inputs[grid].prod(dim=-1)
    if int(per_row.sum()) == 0:
        raise ValueError(f"{grid} is given but no prompt holds its tokens")
    tokens = patches // (int(patches.sum()) // int(per_row.sum()))
    row_end = F.pad(per_row.cumsum(0), (1, 0))
    item_end = F.pad(tokens.cumsum(0), (1, 0))
    first, last = (int(torch.searchsorted(item_end, row_end[i])) for i in (rows.start, rows.stop))
    patch_end = F.pad(patches.cumsum(0), (1, 0))
    return {pixels: inputs[pixels][int(patch_end[first]):int(patch_end[last])], grid: inputs[grid][first:last]}


ADAPTER = QwenVL()

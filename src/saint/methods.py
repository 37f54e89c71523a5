"""The one registry of pruning methods: name -> (config dataclass, selection function).

A selection function sees a :class:`LayerContext` (head-averaged keys, validity,
protected prefix, lazily the class-token attention) and the settings of one layer,
and answers which tokens survive (and, for merging, where the others go). Adapters
apply that answer; methods know nothing about models.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from . import core


@dataclass
class LayerContext:
    """What a selection function may look at, for one pruning layer."""

    keys: torch.Tensor  # [B, N, D] attention keys averaged over heads
    num_protected: int
    valid: torch.Tensor | None = None  # [B, N] bool, None = all valid
    cls_attention: Callable[[], torch.Tensor] | None = None  # -> [B, N]
    tokens: torch.Tensor | Callable[[], torch.Tensor] | None = None  # [B, N, C] hidden states (or a thunk)
    layer: int | None = None  # block index, for methods that keep per-layer records
    query_attention: Callable[[], torch.Tensor] | None = None  # -> [B, N]: the last query's attention (LLM)


@dataclass
class Selection:
    """Survivors (``keep [B, N]`` bool), for merging methods the merge plan, and
    optionally the survivors' layout: ``order [B, N]`` a sort key, survivors laid out
    by increasing key (None: their original order). ``keep_norm``: merged tokens of the
    residual stream take their parts' size-weighted mean norm (``core.merge_weighted``).
    ``count``: every image keeps exactly this many tokens, known on the host (ToMe's
    constant ``r`` on a rectangular batch), so applying the selection reads nothing back
    from the device."""

    keep: torch.Tensor
    merge: core.MergePlan | None = None
    order: torch.Tensor | None = None
    keep_norm: bool = False
    count: int | None = None


SELECT_AT = ("mlp", "attention")


@dataclass
class MethodConfig:
    """Base config. Fields named in ``PER_LAYER`` take a scalar, a list aligned with
    ``layers`` (or blocks 0..len-1 when ``layers`` is None) or a ``{block: value}`` dict.

    ``select_at`` says where in a pruning block the selection acts: ``"mlp"`` (default,
    as published by SAINT and ToMe) between the attention residual and the MLP, or
    ``"attention"`` (vision blocks of timm ViTs and CLIP/SigLIP towers) before the
    attention, on the block's own keys: only the key projection runs on every token (the
    whole q/k/v projection on timm ``Eva`` blocks with a q norm, or where a user's hook
    watches a fused timm qkv), so that block's queries, values and attention already run
    on the survivors."""

    layers: Sequence[int] | None = None
    select_at: str = "mlp"
    PER_LAYER: ClassVar[tuple[str, ...]] = ()
    DEFAULT_LAYERS: ClassVar[str] = "first_half"  # or "all" or "required"

    def default_layers(self, depth: int) -> list[int]:
        if self.DEFAULT_LAYERS == "all":
            return list(range(depth))
        if self.DEFAULT_LAYERS == "first_half":
            return list(range(max(1, depth // 2)))
        raise ValueError(f"{type(self).__name__} needs explicit layers=[...] (block indices)")

    def resolve(self, depth: int) -> dict[int, dict[str, Any]]:
        """Expand to ``{block index: {field: value}}`` and validate every value."""
        self.check_flags()
        if self.select_at not in SELECT_AT:
            raise ValueError(f"select_at={self.select_at!r} is not one of {SELECT_AT}")
        layers = None if self.layers is None else _block_indices("layers", self.layers)
        for name in self.PER_LAYER:
            v = getattr(self, name)
            if layers is None and isinstance(v, Mapping):
                layers = sorted(_block_indices(f"the blocks of {name}", list(v)))
            elif layers is None and _is_list(v):
                layers = list(range(len(v)))
        if layers is None:
            layers = self.default_layers(depth)
        if not layers:
            raise ValueError("layers is empty: give at least one block index")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers has repeated block indices: {layers}")
        negative = [i for i in layers if i < 0]
        if negative:
            raise ValueError(f"layer indices {negative} are negative: blocks are counted from 0 (the first block)")
        bad = [i for i in layers if i >= depth]
        if bad:
            raise ValueError(f"layer indices {bad} out of range: the model has {depth} blocks (0..{depth - 1})")
        out: dict[int, dict[str, Any]] = {i: {} for i in sorted(layers)}
        for name in self.PER_LAYER:
            v = getattr(self, name)
            if isinstance(v, Mapping):
                keys = sorted(_block_indices(f"the blocks of {name}", list(v)))
                if keys != sorted(layers):
                    raise ValueError(f"{name} is given for blocks {keys} but layers are {sorted(layers)}")
                per = {operator.index(i): x for i, x in v.items()}
            elif _is_list(v):
                if len(v) != len(layers):
                    raise ValueError(f"{name} has {len(v)} values but there are {len(layers)} layers {layers}")
                if self.layers is None and sorted(layers) != list(range(len(v))):
                    raise ValueError(f"{name}'s list means blocks 0..{len(v) - 1} without layers=, but another "
                                     f"setting is given for blocks {sorted(layers)}: give layers={sorted(layers)} "
                                     f"or {name} as a {{block: value}} dict")
                per = dict(zip(layers, v, strict=True))
            else:
                per = dict.fromkeys(layers, v)
            for i in out:
                out[i][name] = self.check_value(name, per[i])
        self.check_global()
        return out

    @property
    def pads(self) -> bool:
        """Whether samples may keep different counts (ragged: padded and masked)."""
        return False

    @property
    def size_bias(self) -> bool:
        """Whether merged tokens' sizes bias attention (proportional attention)."""
        return False

    @property
    def reads_cls_attention(self) -> bool:
        """Whether these settings rank tokens by the class token's attention (beyond
        what the method's spec always does, ``MethodSpec.needs_cls_attention``)."""
        return False

    def check_value(self, name: str, value: Any) -> Any:  # pragma: no cover - overridden
        return value

    def check_flags(self) -> None:
        """Settings whose default is True/False take only True/False (``"no"`` is not False)."""
        for f in dataclasses.fields(self):
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"{f.name} must be True or False, got {getattr(self, f.name)!r}")

    def check_global(self) -> None:
        """Validate settings that are not per layer."""

    def check_given(self) -> None:
        """Check the settings given without a model's depth (a calibrated spec, before the
        model loads): the flags, each per-layer value given and the global settings."""
        self.check_flags()
        for name in self.PER_LAYER:
            v = getattr(self, name)
            if v is not None:
                for x in v.values() if isinstance(v, Mapping) else v if _is_list(v) else [v]:
                    self.check_value(name, x)
        self.check_global()


def _is_list(v: Any) -> bool:
    """A per-layer list: a list, tuple, or 1-d tensor / NumPy array."""
    return isinstance(v, (list, tuple)) or (isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 1)


def _block_indices(name: str, value: Any) -> list[int]:
    """Block indices as ints: a list/tuple/range of integers (not bools, floats or a string)."""
    if not (_is_list(value) or isinstance(value, range)):
        raise TypeError(f"{name} must be a list of block indices, got {type(value).__name__}: {value!r}")
    out = []
    for i in value:
        if is_bool(i) or isinstance(i, float):
            raise TypeError(f"{name} must hold integer block indices, got {i!r} in {value!r}")
        try:
            out.append(operator.index(i))
        except TypeError:
            raise TypeError(f"{name} must hold integer block indices, got {i!r} in {value!r}") from None
    return out


def is_real(value: Any) -> bool:
    """A real number and not a bool (NumPy's scalars count: they register as ``numbers``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An integer and not a bool (NumPy's integer scalars count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_bool(value: Any) -> bool:
    """True/False in any of Python's, NumPy's or torch's forms (a bool tensor or array too),
    which index and convert as 1/0 but are no block index or number."""
    return isinstance(value, (bool, np.bool_)) or (
        isinstance(value, (torch.Tensor, np.ndarray)) and value.dtype in (torch.bool, np.bool_))


def _number(name: str, value: Any, kind: type = float) -> Any:
    if is_bool(value) or not is_real(value) and not (
        isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0
    ):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    if kind is int and is_integer(value):  # exactly, at any size (a float64 holds 53 bits)
        return int(value)
    if not math.isfinite(float(value)):
        raise ValueError(f"{name}={value} must be a finite number")
    if kind is int and not float(value).is_integer():
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return kind(value)


@dataclass
class SaintConfig(MethodConfig):
    """SAINT graph drop: ``tau`` similarity threshold, ``k`` degree vote, ``gamma``
    score sharpness, ``rate`` = "sample" (each image its own count) or "batch"
    (the paper's batch vote)."""

    tau: float | Sequence[float] | Mapping[int, float] = 0.75
    k: int | Sequence[int] | Mapping[int, int] = 5
    gamma: float | Sequence[float] | Mapping[int, float] = 10.0
    rate: str = "sample"
    metric: str = "keys"
    center: bool = False
    PER_LAYER: ClassVar[tuple[str, ...]] = ("tau", "k", "gamma")
    METRICS: ClassVar[tuple[str, ...]] = ("keys", "hidden")

    def check_value(self, name: str, value: Any) -> Any:
        if name == "tau":
            v = _number("tau", value)
            if not -1.0 <= v <= 1.0:
                raise ValueError(f"tau={v} is outside [-1, 1] (a cosine similarity threshold)")
            return v
        if name == "k":
            v = _number("k", value, int)
            if v < 1:
                raise ValueError(f"k={v} must be >= 1 (minimum number of similar anchors)")
            return v
        v = _number("gamma", value)
        if v < 0:
            raise ValueError(f"gamma={v} must be >= 0")
        return v

    @property
    def pads(self) -> bool:
        return self.rate == "sample"

    def check_global(self) -> None:
        if self.rate not in core.saint_drop.RATES:
            raise ValueError(f"rate must be one of {core.saint_drop.RATES}, got {self.rate!r}")
        if self.metric not in self.METRICS:
            raise ValueError(f"metric must be one of {self.METRICS}, got {self.metric!r}")


@dataclass
class SaintFoldConfig(SaintConfig):
    """SAINT's graph and rate, but each dropped token is folded (size-weighted) into its
    most similar anchor instead of discarded; sizes then bias attention (``prop_attn``).
    ``keep_norm=True``: a merged token keeps its parts' size-weighted mean norm."""

    prop_attn: bool = True
    keep_norm: bool = False

    @property
    def size_bias(self) -> bool:
        return bool(self.prop_attn)


@dataclass
class SaintPlusConfig(SaintFoldConfig):
    """Our improved variant: SAINT's thresholded graph in every block, a candidate is
    redundant as soon as one anchor reaches tau (``k=1``), and redundant tokens are
    folded into their nearest anchor. Pair it with :func:`saint.calibrate`, which
    picks one tau per block."""

    k: int | Sequence[int] | Mapping[int, int] = 1
    DEFAULT_LAYERS: ClassVar[str] = "all"


def _check_r(value: Any) -> int:
    v = _number("r", value, int)
    if v < 0:
        raise ValueError(f"r={v} must be >= 0 (tokens removed at that layer)")
    return v


@dataclass
class ToMeConfig(MethodConfig):
    """ToMe bipartite merging of ``r`` tokens per layer, size-weighted, with
    proportional attention (``prop_attn``). Matching and merge are the reference's
    (facebookresearch/ToMe), its clamp too: a layer merges at most half its prunable
    tokens (each image's own half on a ragged batch). ``order`` picks the survivors' layout:

    - ``"keep"`` (default, ours): survivors keep their original order and the even/odd
      split runs over the prunable tokens only, so from the second step on (and with a
      class token, from the first) the pairs can differ from the reference's;
    - ``"reference"``: exactly the reference: the split runs over every token (the
      protected prefix is never merged) and the survivors come out as the prefix, the
      unmerged even-set tokens (by position with a prefix, else by decreasing
      similarity; ties to the lower position), then the odd set, so the order changes
      at every step. With more than the reference's class and distillation tokens
      protected (registers), the extra prefix tokens are treated alike.
      tests/test_reference.py pins both.

    ``keep_norm=True`` (ours, not the reference's): a merged token keeps its parts'
    size-weighted mean norm instead of the shorter norm of their average.
    """

    r: int | Sequence[int] | Mapping[int, int] | None = None
    prop_attn: bool = True
    keep_norm: bool = False
    inflection: float = 0.0
    order: str = "keep"

    @property
    def size_bias(self) -> bool:
        return bool(self.prop_attn)
    PER_LAYER: ClassVar[tuple[str, ...]] = ("r",)
    DEFAULT_LAYERS: ClassVar[str] = "all"

    def check_value(self, name: str, value: Any) -> Any:
        if value is None:
            raise ValueError("ToMe needs r (tokens merged per layer), e.g. method='tome', r=8")
        return _check_r(value)

    def check_global(self) -> None:
        if self.order not in core.tome.ORDERS:
            raise ValueError(f"ToMe order must be one of {core.tome.ORDERS}, got {self.order!r}")

    def resolve(self, depth: int) -> dict[int, dict[str, Any]]:
        """With ``inflection`` (ToMe's ``(r, inflection)`` schedule) a scalar ``r`` becomes a
        linear ramp over the layers from ``int(r * (1 - inflection))`` to twice ``r`` minus
        that (about ``r`` per layer on average); negative inflection merges more early."""
        inflection = _number("inflection", self.inflection)
        if inflection == 0.0:
            return super().resolve(depth)
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(f"inflection={inflection} must be in [-1, 1] (ToMe's schedule slope)")
        if isinstance(self.r, (Mapping, list, tuple)) or self.r is None:
            raise ValueError("inflection shapes a scalar r into a schedule; give r as one number")
        r = _check_r(self.r)
        layers = list(self.layers) if self.layers is not None else self.default_layers(depth)
        first = int(r * (1.0 - inflection))
        step = (2 * r - 2 * first) / max(1, len(layers) - 1)
        ramp = [int(first + step * i) for i in range(len(layers))]
        return dataclasses.replace(self, r=ramp, layers=layers, inflection=0.0).resolve(depth)


@dataclass
class MatchConfig(MethodConfig):
    """SAINT-matched merging: at each layer an image merges ``round(fraction * n)`` of its
    candidates, ``n`` being how many have a best-match key cosine >= ``tau`` (SAINT's
    graph, ``k=1``); ToMe's matching picks which (most similar first), merges are
    size-weighted and sizes bias attention (``prop_attn``). Get ``tau`` and ``fraction``
    from :func:`saint.calibrate` (``method="saint_match"``): tau is each layer's median
    best-match cosine on the calibration photos, fraction spreads a ToMe-like mean ``r``
    (at most 1: an image never merges more than the candidates its graph flags).
    ``guard`` (>= 0, needs a class token) orders the merges by cosine minus ``guard`` times
    how far above an even share the class token attends to the pair's two tokens (see
    :func:`saint.core.match.attention_excess`): same counts, fewer salient tokens merged.
    ``keep_norm=True``: a merged token keeps its parts' size-weighted mean norm."""

    tau: float | Sequence[float] | Mapping[int, float] | None = None
    fraction: float | Sequence[float] | Mapping[int, float] | None = None
    prop_attn: bool = True
    keep_norm: bool = False
    guard: float = 0.0
    PER_LAYER: ClassVar[tuple[str, ...]] = ("tau", "fraction")
    DEFAULT_LAYERS: ClassVar[str] = "all"

    @property
    def pads(self) -> bool:
        return True

    @property
    def size_bias(self) -> bool:
        return bool(self.prop_attn)

    def check_value(self, name: str, value: Any) -> Any:
        if value is None:
            raise ValueError(
                f"saint_match needs {name} per layer; calibrate it: "
                "saint.calibrate(model, images, method='saint_match', flops_speedup=2)"
            )
        v = _number(name, value)
        if name == "tau" and not -1.0 <= v <= 1.0:
            raise ValueError(f"tau={v} is outside [-1, 1] (a cosine similarity threshold)")
        if name == "fraction" and not 0.0 <= v <= 1.0:
            raise ValueError(f"fraction={v} must be in [0, 1] (share of the redundant candidates merged)")
        return v

    def check_global(self) -> None:
        guard = _number("guard", self.guard)
        if not 0.0 <= guard < float("inf"):
            raise ValueError(f"guard={guard} must be a finite number >= 0 (weight of the class-attention guard)")

    @property
    def reads_cls_attention(self) -> bool:
        return bool(self.guard)


@dataclass
class RandomConfig(MethodConfig):
    """Drop ``r`` random prunable tokens per layer; the draw depends only on ``seed``,
    the layer and each image's token count (the same alone or in any batch, and when
    a block is recomputed)."""

    r: int | Sequence[int] | Mapping[int, int] | None = None
    seed: int = 0
    PER_LAYER: ClassVar[tuple[str, ...]] = ("r",)

    def check_value(self, name: str, value: Any) -> Any:
        if value is None:
            raise ValueError("random drop needs r (tokens dropped per layer)")
        return _check_r(value)

    def check_global(self) -> None:
        _number("seed", self.seed, int)


@dataclass
class AttnConfig(MethodConfig):
    """Drop the ``r`` tokens the class token attends to least (EViT-style)."""

    r: int | Sequence[int] | Mapping[int, int] | None = None
    PER_LAYER: ClassVar[tuple[str, ...]] = ("r",)

    def check_value(self, name: str, value: Any) -> Any:
        if value is None:
            raise ValueError("attn drop needs r (tokens dropped per layer)")
        return _check_r(value)


@dataclass
class BudgetConfig(MethodConfig):
    """Fixed-budget similarity drop to exactly ``keep`` prunable tokens at each layer."""

    keep: int | Sequence[int] | Mapping[int, int] | None = None
    step_div: int = 16
    PER_LAYER: ClassVar[tuple[str, ...]] = ("keep",)
    DEFAULT_LAYERS: ClassVar[str] = "required"

    def check_value(self, name: str, value: Any) -> Any:
        if value is None:
            raise ValueError("budget drop needs keep (prunable tokens left after the layer)")
        v = _number("keep", value, int)
        if v < 1:
            raise ValueError(f"keep={v} must be >= 1")
        return v

    def check_global(self) -> None:
        if _number("step_div", self.step_div, int) < 1:
            raise ValueError(f"step_div={self.step_div} must be >= 1")


def saint_metric(ctx: LayerContext, cfg: SaintConfig) -> torch.Tensor:
    """The similarity metric SAINT uses: head-averaged keys (paper) or hidden states;
    with ``center`` each sample's mean over its real prunable tokens is removed first,
    so a component shared by every token (e.g. the key bias) cannot make all tokens
    look alike."""
    metric = ctx.keys
    if cfg.metric == "hidden":
        if ctx.tokens is None:
            raise ValueError("metric='hidden' needs the hidden states; this adapter does not provide them")
        metric = ctx.tokens() if callable(ctx.tokens) else ctx.tokens
    if cfg.center:
        p = ctx.num_protected
        tokens = metric[:, p:].float()
        if ctx.valid is None:
            mean = tokens.mean(dim=1, keepdim=True)
        else:
            w = ctx.valid[:, p:, None].to(tokens.dtype)
            mean = (tokens * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
        metric = metric.float() - mean
    return metric


def _select_saint(ctx: LayerContext, s: dict[str, Any], cfg: SaintConfig) -> Selection:
    keep = core.saint_keep_mask(
        saint_metric(ctx, cfg), s["tau"], s["k"], s["gamma"], cfg.rate, ctx.num_protected, ctx.valid
    )
    return Selection(keep)


def _select_saint_fold(ctx: LayerContext, s: dict[str, Any], cfg: SaintFoldConfig) -> Selection:
    metric = saint_metric(ctx, cfg)
    keep, graph = core.saint_select(metric, s["tau"], s["k"], s["gamma"], cfg.rate, ctx.num_protected, ctx.valid)
    return Selection(keep, core.saint_fold_plan(graph, keep, ctx.num_protected), keep_norm=cfg.keep_norm)


def _select_tome(ctx: LayerContext, s: dict[str, Any], cfg: ToMeConfig) -> Selection:
    plan = core.tome_plan(ctx.keys, s["r"], ctx.num_protected, ctx.valid, cfg.order)
    count = ctx.keys.shape[1] - plan.src.shape[1] if ctx.valid is None else None  # r after its clamp
    return Selection(plan.keep, plan, plan.order, keep_norm=cfg.keep_norm, count=count)


def _select_match(ctx: LayerContext, s: dict[str, Any], cfg: MatchConfig) -> Selection:
    cls_attention = None
    if cfg.guard:
        if ctx.cls_attention is None:
            raise ValueError("saint_match with guard > 0 ranks by class-token attention; this model has no class token")
        cls_attention = ctx.cls_attention  # computed only where a merge order is read
    plan = core.match_plan(ctx.keys, s["tau"], s["fraction"], ctx.num_protected, ctx.valid, cls_attention, cfg.guard)
    return Selection(plan.keep, plan, keep_norm=cfg.keep_norm)


def _select_random(ctx: LayerContext, s: dict[str, Any], cfg: RandomConfig) -> Selection:
    b, n, _ = ctx.keys.shape
    keep = core.random_keep_mask(
        b, n, s["r"], ctx.num_protected, ctx.valid, cfg.seed, ctx.layer or 0, ctx.keys.device
    )
    return Selection(keep)


def _select_attn(ctx: LayerContext, s: dict[str, Any], cfg: AttnConfig) -> Selection:
    if ctx.cls_attention is None:
        raise ValueError("attn drop needs a class token; this model has none")
    return Selection(core.attention_keep_mask(ctx.cls_attention(), s["r"], ctx.num_protected, ctx.valid))


def _select_budget(ctx: LayerContext, s: dict[str, Any], cfg: BudgetConfig) -> Selection:
    keep = core.fixed_budget_keep_mask(ctx.keys, s["keep"], cfg.step_div, ctx.num_protected, ctx.valid)
    return Selection(keep)


@dataclass
class FastVConfig(MethodConfig):
    """FastV: after decoder layer ``layers[0]`` drop the ``ratio`` of the image tokens the
    last token of each prompt attends to least (LLaVA: ``fastv_layer = layers[0] + 1``)."""

    ratio: float | Sequence[float] | Mapping[int, float] = 0.5
    PER_LAYER: ClassVar[tuple[str, ...]] = ("ratio",)
    DEFAULT_LAYERS: ClassVar[str] = "required"

    def check_value(self, name: str, value: Any) -> Any:
        if not is_real(value) or not 0 <= value < 1:
            raise ValueError(f"fastv_ratio={value!r} must be a fraction in [0, 1) of the image tokens to drop")
        return float(value)


@dataclass
class SubsetConfig(MethodConfig):
    """A seeded random subset of ``keep`` patch positions after the projector, the same
    positions for every image (so an image's result never depends on its batch)."""

    keep: int | None = None
    seed: int = 0

    def check_global(self) -> None:
        if self.keep is None:
            raise ValueError("the projector subset needs visual_keep (visual tokens per image after the projector)")
        if _number("visual_keep", self.keep, int) < 1:
            raise ValueError(f"visual_keep={self.keep} must be >= 1")
        _number("seed", self.seed, int)


@dataclass
class PoolConfig(MethodConfig):
    """Adaptive average pooling of the projected patch grid to ``rows x cols`` tokens."""

    rows: int = 0
    cols: int = 0

    def check_global(self) -> None:
        for name in ("rows", "cols"):
            if _number(f"visual_keep {name}", getattr(self, name), int) < 1:
                raise ValueError(f"visual_keep {name}={getattr(self, name)} must be >= 1")


def _select_fastv(ctx: LayerContext, s: dict[str, Any], cfg: FastVConfig) -> Selection:
    b, n = ctx.keys.shape[:2]
    eligible = core.gather.prunable_valid(ctx.valid, b, n, ctx.keys.device).clone()
    eligible[:, : ctx.num_protected] = False
    if bool((core.fastv_keep_counts(eligible, s["ratio"]) == eligible.sum(dim=1)).all()):
        return Selection(torch.ones_like(eligible))  # nothing to drop: no attention computed
    if ctx.query_attention is None:
        raise ValueError("fastv ranks tokens by the last query's attention, which only a language model gives")
    return Selection(core.fastv_keep_mask(ctx.query_attention(), eligible, s["ratio"]))


def _not_per_token(ctx: LayerContext, s: dict[str, Any], cfg: MethodConfig) -> Selection:
    raise TypeError("this method reduces the projector's patch grid (see MethodSpec.reduce), not a block's tokens")


def _reduce_subset(grid: torch.Tensor, side: int, cfg: SubsetConfig) -> torch.Tensor:
    return grid[:, core.grid_subset(side * side, int(cfg.keep), cfg.seed).to(grid.device)]


def _reduce_pool(grid: torch.Tensor, side: int, cfg: PoolConfig) -> torch.Tensor:
    return core.pool_grid(grid, side, cfg.rows, cfg.cols)


SITES = ("vision", "llm", "projector")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config type, selection function, a one-line summary,
    and flags that adapters read instead of the method's name:

    - ``site``: where it acts: ``"vision"`` (a ViT / vision-tower block, any adapter),
      ``"llm"`` (after a language-model decoder layer, over the image tokens) or
      ``"projector"`` (the projected patch grid of a VLM, through ``reduce``);
    - ``merges``: dropped tokens are folded into kept ones (sizes, merge plan);
    - ``needs_cls_attention`` / ``needs_query_attention``: ranks tokens by the class
      token's attention / by the last query's attention (language models);
    - ``needs_keys``: reads the head-averaged keys (else the adapter may skip them).
    Whether a config pads ragged counts or biases attention by sizes is the config's
    own ``pads`` / ``size_bias``."""

    name: str
    config_cls: type[MethodConfig]
    select: Callable[[LayerContext, dict[str, Any], Any], Selection]
    summary: str
    needs_cls_attention: bool = False
    merges: bool = False
    aliases: tuple[str, ...] = field(default=())
    site: str = "vision"
    needs_query_attention: bool = False
    needs_keys: bool = True
    reduce: Callable[[torch.Tensor, int, Any], torch.Tensor] | None = None

    @property
    def public_name(self) -> str:
        """The registered method's name (a calibration probe's is the method it calibrates),
        for messages."""
        return self.name.removesuffix(PROBE_SUFFIX)


PROBE_SUFFIX = "-calibration"  # a calibration probe's name: the calibrated method's, then this
METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (names must be unique)."""
    for name in (spec.name, *spec.aliases):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = spec
    return spec


register(MethodSpec("saint", SaintConfig, _select_saint, "similarity graph, dynamic rate (SAINT)"))
register(
    MethodSpec(
        "saint_fold", SaintFoldConfig, _select_saint_fold,
        "SAINT graph, dropped tokens folded into their nearest anchor", merges=True,
    )
)
register(
    MethodSpec(
        "saint_plus", SaintPlusConfig, _select_saint_fold,
        "SAINT+: fold into nearest anchor, k=1, every block (calibrate tau)", merges=True,
    )
)
register(MethodSpec("tome", ToMeConfig, _select_tome, "bipartite merging (ToMe)", merges=True))
register(
    MethodSpec(
        "saint_match", MatchConfig, _select_match,
        "SAINT's graph sets each image's merge count, ToMe's matching picks the pairs (calibrate)", merges=True,
    )
)
register(MethodSpec("random", RandomConfig, _select_random, "random drop"))
register(MethodSpec("attn", AttnConfig, _select_attn, "class-token attention drop", needs_cls_attention=True))
register(MethodSpec("budget", BudgetConfig, _select_budget, "fixed-budget similarity drop (SAINT ViT-only)"))
register(
    MethodSpec(
        "fastv", FastVConfig, _select_fastv, "drop the image tokens the last query attends to least (FastV)",
        site="llm", needs_query_attention=True, needs_keys=False,
    )
)
register(
    MethodSpec(
        "subset", SubsetConfig, _not_per_token, "seeded random subset of the projected patch grid",
        site="projector", reduce=_reduce_subset,
    )
)
register(
    MethodSpec(
        "pool", PoolConfig, _not_per_token, "adaptive average pooling of the projected patch grid",
        site="projector", reduce=_reduce_pool,
    )
)


def require_class_token(spec: MethodSpec, config: MethodConfig, has_class_token: bool, model: str) -> None:
    """Refuse a method whose settings rank tokens by the class token's attention
    (``attn``, or ``saint_match`` with ``guard > 0``) on a model without a class token."""
    if has_class_token or not (spec.needs_cls_attention or config.reads_cls_attention):
        return
    why, fix = ((", guard > 0", "use guard=0") if config.reads_cls_attention
                else ("", "use saint, tome, random or budget"))
    raise ValueError(f"method {spec.public_name!r} needs a class token (it ranks by class-token attention{why}); "
                     f"{model} has no class token ({fix})")


def require_merging(spec: MethodSpec, outputs: str) -> None:
    """Refuse a method that drops tokens where ``outputs`` need a row for every patch (a
    backbone's feature maps): a merged token fills the rows of the patches it holds."""
    if not spec.merges:
        raise ValueError(f"{outputs} need a row for every patch, which a dropped token no longer has; method "
                         f"{spec.public_name!r} drops tokens: use a merging method (tome, saint_match, saint_plus or "
                         "saint_fold), whose merged tokens fill the rows of every patch they hold")


def require_site(spec: MethodSpec, site: str, model: str) -> None:
    """Refuse a method that acts elsewhere than ``site`` (e.g. FastV on a vision tower)."""
    if spec.site != site:
        raise ValueError(
            f"method {spec.public_name!r} acts on a VLM's {spec.site} and cannot prune a {model}; "
            f"methods for it: {[n for n, s in METHODS.items() if s.site == site]}"
        )


def vision_methods() -> list[str]:
    """Names of the methods that act inside a vision transformer's blocks."""
    return sorted(n for n, s in METHODS.items() if s.site == "vision")


def get_method(name: str) -> MethodSpec:
    """Look a method up by name, with a clear error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}") from None


PATCH_OPTIONS = ("layout", "kernel", "trace")  # saint.patch's options beside a method's settings


def method_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without :data:`PATCH_OPTIONS`: the settings a method's config takes."""
    return {k: v for k, v in kwargs.items() if k not in PATCH_OPTIONS}


def make_config(method: str | MethodSpec, **kwargs: Any) -> tuple[MethodSpec, MethodConfig]:
    """Build a method's config from keyword arguments, rejecting unknown ones.

    ``method`` is a registered name or a :class:`MethodSpec` (e.g. a calibration probe).
    """
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"method {spec.public_name!r} does not take {unknown}; it takes {sorted(names)}")
    return spec, spec.config_cls(**kwargs)

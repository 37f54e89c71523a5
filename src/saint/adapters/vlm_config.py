"""Settings of VLM pruning shared by the Hugging Face VLM families (LLaVA,
LLaVA-OneVision, Qwen-VL): the language-model side (SAINT's ``llm``/``hybrid`` modes,
FastV), their checks, and the build step that refuses settings the chosen method does
not use (so a typo never silently does nothing).

A family's config is a subclass of :class:`VlmPruneConfig` that adds its vision-side
and baseline settings, names itself (``FAMILY``), lists its methods and the settings
each takes (``FIELDS``), and checks its own additions (``_check_vision``,
``_check_baselines``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..methods import is_integer, is_real

METHODS = ("saint", "fastv", "random", "pool")
MODES = ("vit", "llm", "hybrid")
LLM_FIELDS = ("llm_layers", "llm_tau", "llm_k", "llm_gamma", "llm_rate", "llm_rope_keys")
RATIO_VIT_FIELDS = ("vit_ratio", "vit_layer", "vit_step_div")  # a tower step keeping a share (Qwen-VL, InternVL, Gemma 3)
RATIO_FIELDS: dict[str, tuple[str, ...]] = {  # method key -> settings, for the families with that tower step
    "saint/vit": ("mode", *RATIO_VIT_FIELDS),
    "saint/llm": ("mode", *LLM_FIELDS),
    "saint/hybrid": ("mode", *RATIO_VIT_FIELDS, *LLM_FIELDS),
    "fastv": ("fastv_layer", "fastv_ratio"),
    "random": ("keep_ratio", "seed"),
}

C = TypeVar("C", bound="VlmPruneConfig")


def check_int(name: str, v: Any, low: int | None = None) -> int:
    """``v`` if it is an integer (not a bool) ``>= low``, else a clear error naming ``name``."""
    if not is_integer(v):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}: {v!r}")
    if low is not None and v < low:
        raise ValueError(f"{name}={v} must be >= {low}")
    return int(v)


def check_fraction(name: str, v: Any, low_open: bool = True, of: str = "") -> float:
    """``v`` as a float if it lies in (0, 1] (``low_open``) or [0, 1), else a clear error
    (``of`` says what it is a fraction of)."""
    if not is_real(v) or not (0 < v <= 1 if low_open else 0 <= v < 1):
        rng = "(0, 1]" if low_open else "[0, 1)"
        raise ValueError(f"{name}={v!r} must be a fraction in {rng}{of}")
    return float(v)


def check_vit_ratio(cfg: Any) -> None:
    """The settings of a tower step that keeps a share of every sample's merge groups
    (Qwen-VL, InternVL): ``vit_ratio`` kept after layer ``vit_layer``, ``vit_step_div``."""
    check_fraction("vit_ratio", cfg.vit_ratio)
    check_int("vit_layer", cfg.vit_layer, 0)
    check_int("vit_step_div", cfg.vit_step_div, 1)


def check_random(keep_ratio: Any, seed: Any, of: str) -> None:
    """The ``random`` baseline's settings: ``keep_ratio``, a fraction of ``of``, and ``seed``."""
    if keep_ratio is None:
        raise ValueError(f"method 'random' needs keep_ratio (fraction of {of} kept)")
    check_fraction("keep_ratio", keep_ratio)
    check_int("seed", seed)


@dataclass
class VlmPruneConfig:
    """The settings every VLM family shares: the method, SAINT's mode and its
    language-model settings (defaults: the reference LLaVA-1.5-7B settings, SAINT
    after decoder layers 7..16, tau 0.83, K 5, gamma 10), FastV's ``K``/``R`` and the
    baselines' seed. Per-layer ``llm_tau/llm_k/llm_gamma`` take a scalar, a list
    aligned with the layers ``start..end`` or a ``{layer: value}`` dict.
    ``llm_rope_keys``: the metric is the layer's keys after RoPE (as the reference;
    False = before RoPE), averaged over KV heads."""

    FAMILY: ClassVar[str] = "VLM"  # as errors name it
    METHODS: ClassVar[tuple[str, ...]] = METHODS
    FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {}  # method key -> the settings it takes

    method: str = "saint"
    mode: str = "hybrid"
    llm_layers: tuple[int, int] = (7, 16)
    llm_tau: float | Sequence[float] | Mapping[int, float] = 0.83
    llm_k: int | Sequence[int] | Mapping[int, int] = 5
    llm_gamma: float | Sequence[float] | Mapping[int, float] = 10.0
    llm_rate: str = "sample"
    llm_rope_keys: bool = True
    fastv_layer: int = 2
    fastv_ratio: float = 0.5
    seed: int = 0

    @classmethod
    def build(cls: type[C], method: str = "saint", **kwargs: Any) -> C:
        """Build and validate a config, rejecting settings the chosen method/mode does
        not use (so a typo never silently does nothing)."""
        if method not in cls.METHODS:
            raise ValueError(f"unknown {cls.FAMILY} method {method!r}; known: {cls.METHODS}")
        names = {f.name for f in dataclasses.fields(cls)} - {"method"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"{cls.FAMILY} pruning does not take {unknown}; settings: {sorted(names)}")
        if method != "saint" and "mode" in kwargs:
            raise TypeError(f"mode= is for method='saint'; method {method!r} takes {list(cls.FIELDS[method])}")
        cfg = cls(method=method, **kwargs)
        allowed = cls.FIELDS.get(cfg.key)  # None for an unknown mode: validate() names it
        if allowed is not None:
            unused = sorted(set(kwargs) - set(allowed))
            if unused:
                raise TypeError(f"{cfg.key.replace('/', ' mode=')} does not use {unused}; it takes {list(allowed)}")
        cfg.validate()
        return cfg

    @property
    def key(self) -> str:
        return f"saint/{self.mode}" if self.method == "saint" else self.method

    @property
    def prunes_vit(self) -> bool:
        return self.method == "saint" and self.mode in ("vit", "hybrid")

    @property
    def prunes_llm(self) -> bool:
        return (self.method == "saint" and self.mode in ("llm", "hybrid")) or self.method == "fastv"

    @property
    def reduces_vision(self) -> bool:
        """Whether fewer visual tokens than the processor's reach the language model."""
        return self.prunes_vit or self.method in ("random", "pool")

    def validate(self) -> None:
        """Check every setting that does not depend on the model."""
        if self.method not in self.METHODS:
            raise ValueError(f"unknown {self.FAMILY} method {self.method!r}; known: {self.METHODS}")
        if self.method == "saint" and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.prunes_vit:
            self._check_vision()
        if self.method == "saint" and self.mode in ("llm", "hybrid"):
            self.llm_range()
            if self.llm_rate not in ("sample", "batch"):
                raise ValueError(f"llm_rate must be 'sample' or 'batch', got {self.llm_rate!r}")
            if not isinstance(self.llm_rope_keys, bool):
                raise TypeError(f"llm_rope_keys must be True or False, got {self.llm_rope_keys!r}")
        if self.method == "fastv":
            check_int("fastv_layer", self.fastv_layer, 1)
            check_fraction("fastv_ratio", self.fastv_ratio, low_open=False, of=" of the image tokens to drop")
        self._check_baselines()

    def _check_vision(self) -> None:
        """The family's vision-side settings (when SAINT prunes in the tower)."""

    def _check_baselines(self) -> None:
        """The family's settings of its vision-side baselines (``random``, ``pool``)."""

    def llm_range(self) -> tuple[int, int]:
        """``llm_layers`` as ``(start, end)``, checked."""
        v = self.llm_layers
        if not isinstance(v, (tuple, list)) or len(v) != 2:
            raise TypeError(f"llm_layers must be (start, end), inclusive decoder layer indices; got {v!r}")
        start, end = check_int("llm_layers start", v[0], 0), check_int("llm_layers end", v[1], 0)
        if end < start:
            raise ValueError(f"llm_layers=({start}, {end}) is empty or reversed: need start <= end")
        return start, end

"""The variants at equal visual-token budgets, switching the model between them, and their token counts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ... import api
from ...adapters.common import get_handle
from .geometry import LLM_GAMMA, LLM_K, METHODS, REFERENCE_TAU, Geometry
from .inputs import VlmInputs


@dataclass
class VlmVariant:
    """One row of the benchmark: how the model is patched (``kwargs`` None: unpruned).
    ``llm_input``: visual tokens per image handed to the language model (``llm``/``hybrid``:
    what SAINT's LLM step starts from)."""

    name: str
    method: str  # unpruned | graph-only | vit | llm | hybrid | fastv | random | pool
    budget: int | None
    kwargs: dict[str, Any] | None
    calibration: dict[str, Any] | None = None
    llm_input: int | None = None

    @property
    def needs_tau(self) -> bool:
        return self.method in ("llm", "hybrid")


def fastv_ratio(n: int, budget: int) -> float:
    """FastV's drop ratio that leaves exactly ``budget`` of ``n`` image tokens (the adapter
    keeps ``floor(n * (1 - ratio) + 1e-9)``; checked here)."""
    if not 1 <= budget <= n:
        raise ValueError(f"fastv budget {budget} must be in 1..{n}")
    ratio = (n - budget) / n
    kept = math.floor(n * (1.0 - ratio) + 1e-9)
    if kept != budget:  # pragma: no cover - floating point safety net
        raise RuntimeError(f"fastv_ratio={ratio!r} keeps {kept} of {n}, not {budget}")
    return ratio


def unreachable(geometry: Geometry, budgets: Sequence[int], methods: Sequence[str]) -> list[str]:
    """``method@budget: why`` for each pair whose method cannot keep exactly that budget
    on this geometry (pooling keeps only the counts its window grid gives)."""
    out = []
    for b in budgets:
        if "pool" in methods:
            try:
                geometry.pool_keep(b)
            except ValueError as e:
                out.append(f"pool@{b}: {e}")
    return out


def budget_variants(geometry: Geometry, budgets: Sequence[int], methods: Sequence[str] | None = None, *,
                    llm_layers: tuple[int, int] | None = None, vit_layer: int | None = None,
                    fastv_layer: int | None = None, hybrid_vit_keep: int | None = None,
                    llm_k: int = LLM_K, llm_gamma: float = LLM_GAMMA, graph_only: bool = True) -> list[VlmVariant]:
    """Unpruned, graph-only (when asked) and each method at each budget. ``llm``/``hybrid``
    come without ``llm_tau``: :func:`saint.bench.vlm.calibrate_variant` fills it in.
    ``methods`` None: every method, pooling only at the budgets it can keep exactly (see
    :func:`unreachable`); a method named explicitly must reach every budget."""
    n = geometry.image_tokens
    strict = methods is not None
    methods = list(METHODS if methods is None else methods)
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b < n:
            raise ValueError(f"budget {b!r} must be an integer in 1..{n - 1} (visual tokens per image of {n})")
    layers = tuple(llm_layers or geometry.llm_layers)
    vit_layer = geometry.vit_layer if vit_layer is None else vit_layer
    fastv_layer = geometry.fastv_layer if fastv_layer is None else fastv_layer
    keep_h = geometry.hybrid_vit_keep if hybrid_vit_keep is None else hybrid_vit_keep
    llm = dict(llm_layers=layers, llm_k=llm_k, llm_gamma=llm_gamma)
    out = [VlmVariant("unpruned", "unpruned", None, None)]
    if graph_only:
        out.append(VlmVariant("graph-only (SAINT llm step, drops nothing)", "graph-only", None,
                              dict(mode="llm", llm_layers=layers, llm_tau=REFERENCE_TAU, llm_k=n + 1,
                                   llm_gamma=llm_gamma)))
    for b in sorted(budgets, reverse=True):
        for m in methods:
            llm_input = None
            if m == "vit":
                kw: dict[str, Any] = dict(mode="vit", **geometry.tower_keep(b, vit_layer))
            elif m == "llm":
                kw, llm_input = dict(mode="llm", **llm), n
            elif m == "hybrid":
                if b >= keep_h:
                    raise ValueError(f"hybrid keeps {keep_h} of {n} visual tokens in the tower, so budget {b} leaves nothing "
                                     f"for the LLM step; use a budget < {keep_h} or a larger --hybrid-vit-keep")
                kw, llm_input = dict(mode="hybrid", **geometry.tower_keep(keep_h, vit_layer), **llm), keep_h
            elif m == "fastv":
                kw = dict(method="fastv", fastv_layer=fastv_layer, fastv_ratio=fastv_ratio(n, b))
            elif m == "random":
                kw = geometry.random_keep(b)
            else:
                try:
                    kw = geometry.pool_keep(b)
                except ValueError:
                    if strict:
                        raise
                    continue
            name = f"saint-{m}@{b}" if m in ("vit", "llm", "hybrid") else f"{m}@{b}"
            out.append(VlmVariant(name, m, b, kw, llm_input=llm_input))
    return out


def _activate(model: torch.nn.Module, variant: VlmVariant) -> None:
    if variant.kwargs is None:
        if api.is_patched(model):
            api.unpatch(model)
        return
    if variant.needs_tau and "llm_tau" not in variant.kwargs:
        raise ValueError(f"{variant.name}: calibrate llm_tau first (calibrate_variant)")
    api.patch(model, **variant.kwargs)


def visual_tokens(model: torch.nn.Module, inputs: VlmInputs) -> dict[str, Any]:
    """Visual tokens per image in the last forward: handed to the language model, entering
    each decoder layer, after the last layer (means over the batch)."""
    depth = len(model.model.language_model.layers)
    if not api.is_patched(model):
        n = float(inputs.image_tokens)
        to_llm, per_layer, after, per_sample = n, [n] * depth, n, [inputs.image_tokens] * inputs.batch_size
        vit = None
    else:
        st = api.stats(model)
        means = st.mean()
        to_llm, per_layer, after = means[0], means[1:-1], means[-1]
        per_sample = list(st.tokens[-1])
        vs = get_handle(model).vision_stats()
        vit = None if vs is None else vs.mean()
    return {
        "to_llm": to_llm,
        "after": after,
        "after_per_sample": per_sample,
        "per_layer": per_layer,
        "layer_mean": sum(per_layer) / len(per_layer),
        "vision_tower_per_layer": vit,
    }

"""Timing, the untimed profile pass and the full ``vlm-bench`` run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ... import api
from ...adapters.common import get_handle
from ...measure.flops import count_flops
from ...measure.memory import peak_memory_mb, peak_memory_method
from ...measure.report import environment, jsonable
from ...measure.timing import synchronize, time_stages_round_robin
from .analytic import (
    measured_schedule,
    prefill_flops,
    stretched_schedule,
    tower_llm_ratio,
    unpruned_schedule,
)
from .geometry import LLM_GAMMA, LLM_K, METHODS, Geometry
from .inputs import VlmInputs, decode, kv_cache_bytes, make_inputs, prefill
from .tau import calibrate_variant
from .variants import VlmVariant, _activate, budget_variants, unreachable, visual_tokens


@dataclass
class VlmResult:
    """Timings (seconds) and the profile of one variant."""

    variant: VlmVariant
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)  # whole decode loop per repeat
    profile: dict[str, Any] = field(default_factory=dict)


def _ms(times: Sequence[float], per: int = 1) -> dict[str, Any]:
    """Minimum (the reported figure), median and spread (max - min) in ms."""
    if not times:
        return {"ms_min": None, "ms_median": None, "ms_spread": None, "times_ms": []}
    ms = [1e3 * t / per for t in times]
    return {"ms_min": min(ms), "ms_median": statistics.median(ms), "ms_spread": max(ms) - min(ms), "times_ms": ms}


def time_variants(model: torch.nn.Module, inputs: VlmInputs, variants: Sequence[VlmVariant], *,
                  device: torch.device | str, warmup: int = 1, repeats: int = 5,
                  progress: Callable[[int], None] | None = None,
                  clock: Callable[[], float] = time.perf_counter) -> list[VlmResult]:
    """Interleaved round-robin (:func:`saint.measure.timing.time_stages_round_robin`):
    each round runs every variant once (the start rotates per round); per run, the
    prefill is timed, then the decode loop on its cache. ``clock``: wall time, or
    ``time.process_time`` (this process's CPU time: work, on a shared machine)."""
    with torch.inference_mode():
        times = time_stages_round_robin(
            [lambda v=v: _activate(model, v) for v in variants],
            [[lambda _: prefill(model, inputs), lambda out: decode(model, inputs, out)] for _ in variants],
            device=device, warmup=warmup, repeats=repeats, progress=progress, clock=clock,
        )
    return [VlmResult(v, prefill_s=t[0], decode_s=t[1]) for v, t in zip(variants, times, strict=True)]


class _Stopwatch:
    """Time of wrapped calls on ``clock`` (device-synchronised), summed per forward."""

    def __init__(self, device: torch.device | str, clock: Callable[[], float] = time.perf_counter) -> None:
        self.device = device
        self.clock = clock
        self.total = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            t0 = self.clock()
            out = fn(*args, **kwargs)
            synchronize(self.device)
            self.total += self.clock() - t0
            return out

        return timed


def profile_variant(model: torch.nn.Module, inputs: VlmInputs, variant: VlmVariant, *,
                    device: torch.device | str, memory: bool = True, flops: bool = True,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """One untimed prefill + decode of ``variant``: visual tokens, KV-cache size, peak
    memory, the language model's and the SAINT selection's time (on ``clock``) in that
    prefill, and (a separate prefill) its FLOPs."""
    _activate(model, variant)
    lm = model.model.language_model
    selection = _Stopwatch(device, clock)
    handle = get_handle(model)
    pruner = getattr(handle, "pruner", None)
    saint_llm = variant.method in ("llm", "hybrid", "graph-only")
    if saint_llm and pruner is not None:  # time each selection call of the adapter's DecoderPruner
        pruner.schedule = {i: selection.wrap(fn) for i, fn in pruner.schedule.items()}
    lm_time: list[float] = []

    def lm_pre(*_: Any) -> None:
        synchronize(device)
        lm_time.append(-clock())

    def lm_post(*_: Any) -> None:
        synchronize(device)
        lm_time[-1] += clock()

    seen: dict[str, Any] = {}

    def run() -> None:
        out = prefill(model, inputs)
        seen["tokens"] = visual_tokens(model, inputs)
        seen["kv"] = kv_cache_bytes(out.cache)
        seen["lm_prefill_s"] = lm_time[0]
        seen["selection_s"] = selection.total
        decode(model, inputs, out)

    hooks = [lm.register_forward_pre_hook(lm_pre), lm.register_forward_hook(lm_post)]
    try:
        with torch.inference_mode():
            if memory:
                peak = peak_memory_mb(run, device)
            else:
                run()
                peak = None
    finally:
        for h in hooks:
            h.remove()
        _activate(model, variant)  # a fresh patch: drops the stopwatch wrappers
    total_flops = None
    if flops:
        total_flops, _ = count_flops(lambda: prefill(model, inputs))
    b = inputs.batch_size
    return {
        "visual_tokens": seen["tokens"],
        "kv_cache_mb": None if seen["kv"] is None else seen["kv"] / 2**20,
        "peak_memory_mb": peak,
        "lm_prefill_ms": 1e3 * seen["lm_prefill_s"],
        "selection_ms": 1e3 * seen["selection_s"] if saint_llm else None,
        "prefill_gflops_per_prompt": None if total_flops is None else total_flops / b / 1e9,
    }


def run_vlm_bench(model: torch.nn.Module, inputs: VlmInputs, variants: Sequence[VlmVariant], *,
                  device: torch.device | str, warmup: int = 1, repeats: int = 5, memory: bool = True,
                  flops: bool = True, tau_iters: int = 12, clock: Callable[[], float] = time.perf_counter,
                  progress: Callable[[str, int], Callable[[int], None] | None] | None = None) -> dict[str, Any]:
    """Calibrate the taus of ``llm``/``hybrid`` (:func:`saint.calibrate`), time every
    variant round-robin, profile each once; returns the report's ``variants`` and
    ``graph_overhead`` sections."""
    if api.is_patched(model):
        raise ValueError("give run_vlm_bench an unpatched model; it patches it per variant")
    variants = list(variants)
    if not variants or variants[0].method != "unpruned":
        raise ValueError("the first variant must be the unpruned model (budget_variants puts it first)")
    t_start = time.perf_counter()
    to_cal = [v for v in variants if v.needs_tau]
    bar = progress("calibrating tau", len(to_cal)) if progress and to_cal else None
    for v in to_cal:
        calibrate_variant(model, inputs, v, max_iter=tau_iters)
        if bar:
            bar(1)
    t_cal = time.perf_counter()
    bar = progress("timing (round-robin)", warmup + repeats) if progress else None
    results = time_variants(model, inputs, variants, device=device, warmup=warmup, repeats=repeats, progress=bar,
                            clock=clock)
    t_time = time.perf_counter()
    bar = progress("profile pass", len(variants)) if progress else None
    for r in results:
        r.profile = profile_variant(model, inputs, r.variant, device=device, memory=memory, flops=flops, clock=clock)
        if bar:
            bar(1)
    if api.is_patched(model):
        api.unpatch(model)
    t_end = time.perf_counter()
    steps = len(inputs.decode_masks)
    base = results[0]
    base_ttft = min(base.prefill_s)  # speed-ups from the minimum over rounds (spread reported)
    base_dec = min(base.decode_s)
    rows = []
    for r in results:
        v = r.variant
        ttft = min(r.prefill_s)
        dec = min(r.decode_s)
        rows.append({
            "name": v.name,
            "method": v.method,
            "budget": v.budget,
            "patch_kwargs": jsonable(v.kwargs),
            "calibration": v.calibration,
            "ttft": _ms(r.prefill_s),
            "decode_per_token": _ms(r.decode_s, per=steps),
            "ttft_speedup": base_ttft / ttft,
            "decode_speedup": base_dec / dec,
            **r.profile,
        })
    graph = next((row for row in rows if row["method"] == "graph-only"), None)
    overhead = None
    if graph is not None:
        g_med = graph["ttft"]["ms_median"]
        b_med = rows[0]["ttft"]["ms_median"]
        overhead = {
            "selection_ms": graph["selection_ms"],
            "selection_fraction_of_ttft": graph["selection_ms"] / b_med,
            "selection_fraction_of_lm_prefill": graph["selection_ms"] / rows[0]["lm_prefill_ms"],
            "graph_only_ttft_ms_median": g_med,
            "unpruned_ttft_ms_median": b_med,
            "ttft_difference_ms": g_med - b_med,
            "ttft_ratio": g_med / b_med,
            "note": ("selection_ms: time (the run's clock) of SAINT's selection (keys, RoPE, similarity graph, ranking) summed "
                     "over the pruning layers of one prefill with every image token present (profile pass, one "
                     "run); the TTFT columns compare medians of the timed rounds"),
        }
    return {
        "variants": rows,
        "graph_overhead": overhead,
        "seconds": {"calibration": round(t_cal - t_start, 1), "timing": round(t_time - t_cal, 1),
                    "profile": round(t_end - t_time, 1)},
    }


def add_analytic(body: dict[str, Any], geometry: Geometry, text_tokens: int) -> dict[str, Any]:
    """Per variant: analytic prefill GFLOPs of its measured token schedule at this
    geometry and at its reference (the 7B it is scaled from), and the speed-up there;
    returns the report's ``analytic`` section (the reference and both tower:LLM FLOPs
    ratios). ``text_tokens``: the prompt's tokens that are not image tokens."""
    target = geometry.reference or geometry
    base_ref = None
    for row in body["variants"]:
        sched = measured_schedule(geometry, row["visual_tokens"], text_tokens)
        row["analytic_gflops"] = prefill_flops(geometry, **sched)["total"] / 1e9
        ref = prefill_flops(target, **stretched_schedule(sched, target))["total"] / 1e9
        base_ref = ref if base_ref is None else base_ref
        row["analytic_ref_gflops"] = ref
        row["analytic_ref_speedup"] = base_ref / ref
    full = prefill_flops(target, **unpruned_schedule(target, text_tokens))
    return {
        "reference": target.name,
        "reference_model": target.description,
        "reference_unpruned_gflops": full["total"] / 1e9,
        "tower_llm_flops_ratio": {"reference": tower_llm_ratio(target, text_tokens),
                                  "measured": tower_llm_ratio(geometry, text_tokens)},
        "note": ("analytic FLOPs: matmul/attention FLOPs counted per module on meta tensors (torch.utils."
                 "flop_counter) for the token counts each variant had per layer in this run; at the reference "
                 "the decoder's per-layer counts are stretched over its depth and the tower's drop sits at its "
                 "vit_layer; SAINT's graph step is not included (its cost is the graph-only row)"),
    }


# ---------------------------------------------------------------------------- full run
def vlm_report(geometry: Geometry, *, device: torch.device | str, dtype: torch.dtype, batch_size: int = 1,
               prompt_len: int = 64, new_tokens: int = 16, budgets: Sequence[int] | None = None,
               methods: Sequence[str] | None = None, warmup: int = 1, repeats: int = 5, memory: bool = True,
               flops: bool = True, graph_only: bool = True, tau_iters: int = 12, seed: int = 0,
               llm_layers: tuple[int, int] | None = None, vit_layer: int | None = None,
               fastv_layer: int | None = None, hybrid_vit_keep: int | None = None,
               argv: Sequence[str] | None = None, clock: Callable[[], float] = time.perf_counter,
               progress: Callable[[str, int], Callable[[int], None] | None] | None = None) -> dict[str, Any]:
    """Build the model and inputs, run :func:`run_vlm_bench`, and return the whole report
    (environment, geometry, settings, variants, graph overhead). ``methods`` None: all of
    them, pooling only where it keeps a budget exactly (the others are listed as skipped).
    ``clock``: wall time, or ``time.process_time`` for this process's CPU time."""
    import transformers

    start = time.perf_counter()
    budgets = list(geometry.default_budgets() if budgets is None else budgets)
    variants = budget_variants(geometry, budgets, methods, llm_layers=llm_layers, vit_layer=vit_layer,
                               fastv_layer=fastv_layer, hybrid_vit_keep=hybrid_vit_keep, graph_only=graph_only)
    skipped = [] if methods is not None else unreachable(geometry, budgets, METHODS)
    inputs = make_inputs(geometry, batch_size, prompt_len, new_tokens, device, dtype, seed)
    model = geometry.build(device, dtype, seed)
    built = time.perf_counter()
    body = run_vlm_bench(model, inputs, variants, device=device, warmup=warmup, repeats=repeats, memory=memory,
                         flops=flops, tau_iters=tau_iters, clock=clock, progress=progress)
    analytic = add_analytic(body, geometry, inputs.text_tokens)
    env = environment(device, argv)
    env["versions"]["transformers"] = transformers.__version__
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    settings = {
        "device": str(device),
        "dtype": dt,
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "text_tokens": inputs.text_tokens,
        "image_tokens": inputs.image_tokens,
        "prompt_tokens": inputs.length,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "clock": "process CPU time" if clock is time.process_time else "wall time",
        "seed": seed,
        "budgets": sorted(budgets, reverse=True),
        "methods": list(METHODS if methods is None else methods),
        "skipped": skipped,
        "llm_layers": list(llm_layers or geometry.llm_layers),
        "vit_layer": geometry.vit_layer if vit_layer is None else vit_layer,
        "fastv_layer": geometry.fastv_layer if fastv_layer is None else fastv_layer,
        "hybrid_vit_keep": geometry.hybrid_vit_keep if hybrid_vit_keep is None else hybrid_vit_keep,
        "llm_k": LLM_K,
        "llm_gamma": LLM_GAMMA,
        "tau_iters": tau_iters,
        "memory_method": peak_memory_method(device) if memory else None,
    }
    body["seconds"]["build"] = round(built - start, 1)
    return {
        "environment": env,
        "geometry": geometry.as_dict(),
        "model": geometry.description,
        "settings": settings,
        **body,
        "analytic": analytic,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }

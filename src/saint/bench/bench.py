"""Side-by-side throughput of the unpruned model and pruning variants, with FLOPs,
FLOPs-ideal speedup, efficiency, tokens per block and peak memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..measure.harness import Harness, Measurement
from ..measure.memory import peak_memory_method
from ..measure.op_time import CATEGORIES, OpTimes
from ..measure.report import fmt, fmt_gflops, text_table
from ..measure.timing import paired_speedup
from ..spec import Variant, with_baseline


def rows_from_measurements(measurements: Sequence[Measurement]) -> list[dict[str, Any]]:
    """One JSON-ready dict per variant; ratios are relative to the first (unpruned) one."""
    base = measurements[0]
    if not base.variant.is_baseline:
        raise ValueError("the first measurement must be the unpruned model")
    rows = []
    for m in measurements:
        row: dict[str, Any] = m.variant.as_dict()
        row["gflops_per_image"] = m.flops_per_image / 1e9
        row["ideal_speedup"] = base.flops_per_image / m.flops_per_image if m.flops_per_image else None
        row["tokens_per_block"] = m.tokens
        row["mean_tokens"] = sum(m.tokens) / len(m.tokens) if m.tokens else None
        row["peak_memory_mb"] = m.peak_memory_mb
        row["layout"] = m.layout
        if m.op_time is not None:
            row["op_time"] = op_time_row(m.op_time)
        if m.timing is not None and base.timing is not None:
            row.update(m.timing.as_dict())
            if m.baseline_timing is not None:  # paired: against the baseline's own rounds beside it
                row["speedup"] = paired_speedup(m.baseline_timing.times, m.timing.times)
                row["speedup_best"] = m.baseline_timing.min / m.timing.min
            else:
                row["speedup"] = base.timing.median / m.timing.median
                row["speedup_best"] = base.timing.min / m.timing.min
            ideal = row["ideal_speedup"]
            row["efficiency"] = row["speedup"] / ideal if ideal else None
        rows.append(row)
    return rows


def op_time_row(t: OpTimes) -> dict[str, dict[str, float]]:
    """One forward's op time by category, JSON-ready: ms, share of the op time, ops, GFLOP."""
    total = t.total_seconds or 1.0
    return {c: {"ms": 1e3 * t.seconds[c], "share": t.seconds[c] / total, "ops": t.calls[c],
                "gflops": t.flops[c] / 1e9} for c in CATEGORIES}


def run_bench(
    harness: Harness,
    variants: Sequence[Variant],
    x: torch.Tensor,
    *,
    warmup: int = 2,
    repeats: int = 10,
    memory: bool = True,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] | None = None,
    pairing: str = "round_robin",
    by_op: bool = False,
) -> dict[str, Any]:
    """Measure the unpruned model and ``variants`` on batch ``x``; returns
    ``{"settings": ..., "results": [row, ...]}`` (rows as :func:`rows_from_measurements`;
    ``by_op``: with one forward's op time by category, on a CPU)."""
    variants = with_baseline(variants)
    timer = {} if clock is None else {"clock": clock}
    ms = harness.measure(variants, x, warmup=warmup, repeats=repeats, memory=memory, progress=progress,
                         pairing=pairing, by_op=by_op, **timer)
    return {
        "settings": {
            "batch_size": int(x.shape[0]),
            "input_shape": list(x.shape[1:]),
            "dtype": str(harness.dtype).replace("torch.", ""),
            "device": str(harness.device),
            "warmup": warmup,
            "repeats": repeats,
            "pairing": pairing,
            "timing": ("each variant in a round robin of its own with the unpruned model, device-synchronised, "
                       "model call only; speedup the median of the per-round ratios, images/s from the median, "
                       "*_best from the minima" if pairing == "paired" else
                       "round-robin across variants, device-synchronised, model call only; "
                       "images/s and speedup from the median, *_best from the minimum"),
            "flops": "torch.utils.flop_counter (FLOPs = 2 x multiply-adds: matmul, conv, attention)",
            "peak_memory": peak_memory_method(harness.device) if memory else None,
            "op_time": ("one forward per variant after its FLOPs and memory passes, every op timed by the wall "
                        "clock and put in a category by the code that called it (saint.measure.op_time)"
                        if by_op else None),
        },
        "results": rows_from_measurements(ms),
    }


def tokens_summary(tokens: Sequence[float], limit: int = 14) -> str:
    """Tokens per block, compressed: ``257 129x2 65x9`` (value x run length)."""
    runs: list[tuple[int, int]] = []
    for t in tokens:
        v = round(t)
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    parts = [f"{v}" if n == 1 else f"{v}x{n}" for v, n in runs]
    return " ".join(parts) if len(parts) <= limit else " ".join(parts[:limit]) + " ..."


def format_bench(report: dict[str, Any]) -> str:
    """The bench table as aligned text."""
    headers = ["variant", "layout", "img/s", "speedup", "GFLOPs/img", "ideal", "effic.", "mean tok", "peak MiB",
               "tokens per block"]
    rows = []
    for r in report["results"]:
        rows.append([
            r["label"],
            r.get("layout") or "-",
            fmt(r.get("images_per_s"), 1),
            fmt(r.get("speedup"), 2) + ("x" if r.get("speedup") is not None else ""),
            fmt_gflops(r["gflops_per_image"]),
            fmt(r["ideal_speedup"], 2) + "x",
            fmt(r.get("efficiency"), 2),
            fmt(r["mean_tokens"], 1),
            fmt(r["peak_memory_mb"], 0),
            tokens_summary(r["tokens_per_block"]),
        ])
    s = report["settings"]
    head = (f"batch {s['batch_size']} x {'x'.join(map(str, s['input_shape']))}, {s['dtype']} on {s['device']}, "
            f"{s['warmup']} warm-up + {s['repeats']} timed rounds "
            f"({'paired with the unpruned model' if s.get('pairing') == 'paired' else 'round-robin'})")
    text = head + "\n" + text_table(headers, rows)
    if any("op_time" in r for r in report["results"]):
        text += "\n\nop time of one forward by category, ms (share):\n" + text_table(
            ["variant", *CATEGORIES],
            [[r["label"], *(f"{r['op_time'][c]['ms']:.1f} ({100 * r['op_time'][c]['share']:.0f}%)" for c in CATEGORIES)]
             for r in report["results"] if "op_time" in r])
    return text

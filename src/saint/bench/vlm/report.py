"""``vlm-bench`` results as terminal text, markdown and files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...measure.report import fmt, markdown_table, text_table, write_outputs

HEADERS = ["variant", "budget", "vis->LLM", "vis after", "vis/layer", "tau", "TTFT ms min", "TTFT spread",
           "TTFT x", "FLOPs x 7B", "decode ms/tok min", "decode spread", "decode x", "KV MB", "peak MB", "GFLOPs"]


def _taus(r: dict[str, Any]) -> str:
    """The llm/hybrid taus: one value, or the range over the pruning layers."""
    if r["method"] not in ("llm", "hybrid"):
        return "-"
    tau = r["patch_kwargs"]["llm_tau"]
    values = sorted(tau.values()) if isinstance(tau, dict) else [tau]
    return fmt(values[0], 2) if values[0] == values[-1] else f"{values[0]:.2f}..{values[-1]:.2f}"


def _rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in report["variants"]:
        t = r["visual_tokens"]
        cal = r.get("calibration") or {}
        after = fmt(t["after"], 1) + ("" if cal.get("reachable", True) else " (floor)")
        rows.append([
            r["name"],
            fmt(r["budget"]) if r["budget"] is not None else "-",
            fmt(t["to_llm"], 1),
            after,
            fmt(t["layer_mean"], 1),
            _taus(r),
            fmt(r["ttft"]["ms_min"], 1),
            fmt(r["ttft"]["ms_spread"], 1),
            fmt(r["ttft_speedup"], 2),
            fmt(r.get("analytic_ref_speedup"), 2),
            fmt(r["decode_per_token"]["ms_min"], 2),
            fmt(r["decode_per_token"]["ms_spread"], 2),
            fmt(r["decode_speedup"], 2),
            fmt(r["kv_cache_mb"], 1),
            fmt(r["peak_memory_mb"], 0),
            fmt(r["prefill_gflops_per_prompt"], 1),
        ])
    return rows


def _overhead_lines(report: dict[str, Any]) -> list[str]:
    o = report.get("graph_overhead")
    if not o:
        return []
    return [
        f"SAINT graph step (LLM, layers {report['settings']['llm_layers']}, nothing dropped): selection "
        f"{o['selection_ms']:.2f} ms per prefill = {100 * o['selection_fraction_of_ttft']:.2f}% of the unpruned "
        f"TTFT ({100 * o['selection_fraction_of_lm_prefill']:.2f}% of its language-model prefill); graph-only TTFT "
        f"median {o['graph_only_ttft_ms_median']:.1f} ms vs unpruned {o['unpruned_ttft_ms_median']:.1f} ms "
        f"({o['ttft_difference_ms']:+.1f} ms, x{o['ttft_ratio']:.3f})",
    ]


def _notes(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    mem = s["memory_method"] or "not measured"
    markers = s["text_tokens"] - s["prompt_len"]
    return [
        f"prompt: {s['prompt_len']} text + {s['image_tokens']} image tokens per row"
        f"{f' (+ {markers} image start/end markers)' if markers else ''}, batch {s['batch_size']}, "
        f"{s['dtype']} on {s['device']}; decode: {s['new_tokens']} greedy single-token steps on the prefill's cache",
        f"timing ({s['clock']}): {s['warmup']} warm-up + {s['repeats']} timed interleaved round-robin rounds"
        f"{'' if s['repeats'] >= 5 else ' (fewer than 5: indicative only)'}; minimum over rounds, spread = "
        "max - min; speed-ups from the minima; TTFT = one prefill "
        "forward (vision tower + projector + pruning + LLM + LM head on the last position)",
        "vis->LLM / vis after / vis/layer: mean visual tokens per image handed to the LLM, after its last layer, "
        "and averaged over its layers; budgets: vit/random/pool keep = budget, fastv ratio = (n - budget)/n at "
        f"layer {s['fastv_layer']}, llm/hybrid: per-layer taus from saint.calibrate on this prompt, keep target = "
        "the mean kept fraction of the schedule that removes the same share in each pruning layer and ends at the "
        f"budget (hybrid keeps {s['hybrid_vit_keep']} in the tower first; tau column: range over the pruning "
        "layers); '(floor)': budget below what SAINT's layers can reach",
        *([f"not run: {'; '.join(s['skipped'])}"] if s.get("skipped") else []),
        f"KV MB: exact cache size after prefill; peak MB: {mem}; GFLOPs: prefill per prompt (matmul/attention)",
        *_analytic_notes(report),
        "random weights: costs are those of the geometry, not of a trained model's outputs",
    ]


def _analytic_notes(report: dict[str, Any]) -> list[str]:
    a = report.get("analytic")
    if not a:
        return []
    r = a["tower_llm_flops_ratio"]
    return [f"FLOPs x 7B: analytic prefill-FLOPs speed-up at the reference geometry ({a['reference']}: "
            f"{a['reference_unpruned_gflops']:.0f} GFLOPs unpruned) for this run's per-layer token counts; "
            f"tower:LLM prefill FLOPs {r['measured']:.3f} here vs {r['reference']:.3f} there. {a['note']}"]


def format_vlm_bench(report: dict[str, Any]) -> str:
    """The report as plain text for the terminal."""
    env = report["environment"]
    lines = [f"model: {report['model']}", f"device: {env['device']}", "",
             text_table(HEADERS, _rows(report)), ""]
    lines += _overhead_lines(report)
    lines += ["", *[f"- {n}" for n in _notes(report)]]
    return "\n".join(lines)


def markdown_vlm_bench(report: dict[str, Any], title: str = "VLM latency at equal visual-token budgets") -> str:
    """The report as a markdown page: environment, table, graph overhead, notes."""
    env = report["environment"]
    v = env["versions"]
    lines = [
        f"# {title}", "",
        f"- date: {env['date']}",
        f"- device: {env['device']}",
        f"- cpu: {env['cpu']}; torch threads: {env['torch_threads']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- platform: {env['platform']}",
        f"- command: `{env['command']}`",
        f"- model: {report['model']}",
        f"- wall time: {report['wall_seconds']} s", "",
        markdown_table(HEADERS, _rows(report)), "",
    ]
    lines += _overhead_lines(report)
    lines += ["", *[f"- {n}" for n in _notes(report)], ""]
    return "\n".join(lines)


def write_vlm_report(report: dict[str, Any], prefix: str | Path, formats: Sequence[str] = ("json", "md"),
                     title: str = "VLM latency at equal visual-token budgets") -> list[Path]:
    """Write ``prefix.json`` / ``prefix.md``; returns the paths written."""
    return write_outputs(report, prefix, formats,
                         {"md": lambda path: path.write_text(markdown_vlm_bench(report, title))})

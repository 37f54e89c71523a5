"""Speed/fidelity sweeps: SAINT over a ``tau`` grid, ToMe over an ``r`` grid, and random /
class-attention drop at SAINT's token counts (per-layer ``r`` derived from SAINT's mean
statistics at each ``tau``). Each point gets a measured throughput ratio (round-robin
timing, as ``saint bench``), a FLOPs ratio and fidelity to the unpruned model; the
Pareto-optimal points are marked and the results written as JSON, CSV, markdown and PNG."""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..eval.evaluate import score_outputs
from ..measure.harness import Harness
from ..measure.images import ImageSet
from ..measure.report import csv_text, fmt, fmt_gflops, markdown_table, text_table, write_outputs
from ..measure.timing import timed_rounds
from ..methods import ToMeConfig
from ..spec import BASELINE, Variant, format_value, variant_label
from .bench import rows_from_measurements, tokens_summary

MATCHED_METHODS = ("random", "attn")
DEFAULT_TOME_KEEP_FRACTIONS = (0.9, 0.75, 0.6, 0.45, 0.3)


def matched_drop_schedule(mean_tokens: Sequence[float], layers: Sequence[int]) -> list[int]:
    """Per-layer drop counts (aligned with ``layers``) that reproduce, after rounding,
    the tokens entering every block: ``r_i = round(t_i) - round(t_{i+1})``.

    ``mean_tokens[i]`` is the mean number of tokens entering block ``i``. Rounding the
    counts (not the differences) keeps the cumulative total exact. A pruning layer in the
    last block has no observable output count and gets ``r = 0``.
    """
    rounded = [round(t) for t in mean_tokens]
    out = []
    for i in layers:
        if not 0 <= i < len(rounded):
            raise ValueError(f"layer {i} is outside the {len(rounded)} blocks of the statistics")
        r = rounded[i] - rounded[i + 1] if i + 1 < len(rounded) else 0
        out.append(max(r, 0))
    return out


def default_tome_rs(num_patches: int, depth: int, keep_fractions: Sequence[float] = DEFAULT_TOME_KEEP_FRACTIONS
                    ) -> list[int]:
    """ToMe ``r`` values (merged per block, every block) that leave about each fraction of
    the patch tokens entering the last block: ``r = round((1 - f) * N / (depth - 1))``,
    kept within ToMe's per-block limit (half the tokens present)."""
    rs = []
    for f in keep_fractions:
        r = max(1, round((1 - f) * num_patches / max(depth - 1, 1)))
        while r > 1 and not _tome_feasible(num_patches, depth, r):
            r -= 1
        if r not in rs:
            rs.append(r)
    return rs


def check_grids(speedups: Sequence[float], calibrated: Sequence[Variant] = (),
                tome_inflections: Sequence[float] = ()) -> None:
    """Refuse a calibration speed-up target that cannot be one (<= 1, not finite), a
    calibrated variant without a target of its own (``at=``) when there is no grid, and
    ToMe's inflection 0 (its constant schedule, run for every r anyway)."""
    if 0.0 in tome_inflections:
        raise ValueError("ToMe inflection 0 is its constant schedule, which the sweep runs for every r already")
    bad = [s for s in speedups if not (math.isfinite(s) and s > 1.0)]
    if bad:
        raise ValueError(f"speed-up targets must be > 1 (1 prunes nothing), got {bad}")
    if not speedups and any("at" not in cv.kwargs for cv in calibrated):
        raise ValueError("calibrated variants without at=... need a speed-up grid")


def max_tome_r_everywhere(num_patches: int, depth: int) -> int:
    """The largest constant r ToMe can merge in every block."""
    r = 0
    while _tome_feasible(num_patches, depth, r + 1):
        r += 1
    return r


def _tome_feasible(num_patches: int, depth: int, r: int, inflection: float = 0.0) -> bool:
    """Whether ToMe can merge ``r`` per block (shaped by ToMe's ``inflection`` schedule)
    in every one of ``depth`` blocks of ``num_patches`` patches."""
    n = num_patches
    for s in ToMeConfig(r=r, inflection=inflection).resolve(depth).values():
        if s["r"] > n // 2:
            return False
        n -= s["r"]
    return True


def pareto_mask(xs: Sequence[float], ys: Sequence[float]) -> list[bool]:
    """True for points not dominated (another point at least as good in both x and y,
    and better in one). Higher is better for both."""
    out = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y)
            for j, (x2, y2) in enumerate(zip(xs, ys, strict=True)) if j != i
        )
        out.append(not dominated)
    return out


def _pruning_layers(harness: Harness, variant: Variant) -> list[int]:
    """The blocks ``variant`` prunes at (resolved against the model's depth)."""
    from ..methods import make_config, method_settings

    _, cfg = make_config(variant.method, **method_settings(variant.kwargs))
    return sorted(cfg.resolve(len(harness.adapter.sites(harness.model))))


def _calibrate_variants(
    harness: Harness, calibrated: Sequence[Variant], speedups: Sequence[float], calib_x: torch.Tensor | None,
    timing_batch: int, clock: Callable[[], float] = time.perf_counter,
) -> list[tuple[Variant, float, dict[str, Any], float, str]]:
    """Calibrate each variant to each speed-up on ``calib_x`` (model left unpatched): the
    real-token FLOPs speed-up, or with ``target=measured`` the speed-up measured on a
    ``timing_batch`` batch of the calibration photos."""
    from ..calibration import calibrate

    if not calibrated:
        return []
    if calib_x is None:
        raise ValueError("calibrated variants need calibration images")
    check_grids(speedups, calibrated)
    out = []
    model = harness.release()
    x = calib_x.to(harness.device, harness.dtype)
    for cv in calibrated:
        kwargs = dict(cv.kwargs)
        target = kwargs.pop("target", "flops")
        at = kwargs.pop("at", None)
        for sp in speedups if at is None else [at]:
            if target == "measured":
                cal = calibrate(model, x, measured_speedup=sp, batch_size=timing_batch, method=cv.method,
                                apply=False, clock=clock, **kwargs)
            else:
                cal = calibrate(model, x, flops_speedup=sp, method=cv.method, apply=False, **kwargs)
            out.append((cv, sp, cal.patch_kwargs(), cal.achieved, target))
    return out


def run_sweep(
    harness: Harness,
    image_set: ImageSet,
    transform: Callable[[Any], torch.Tensor],
    timing_x: torch.Tensor,
    *,
    taus: Sequence[float],
    saint_args: dict[str, Any] | None = None,
    tome_rs: Sequence[int] = (),
    tome_inflections: Sequence[float] = (),
    tome_select_at: Sequence[str] = ("mlp",),
    tome_args: Sequence[dict[str, Any]] = ({},),
    matched: Sequence[str] = MATCHED_METHODS,
    batch_size: int = 16,
    warmup: int = 1,
    repeats: int = 5,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    calibrated: Sequence[Variant] = (),
    speedups: Sequence[float] = (),
    calib_x: torch.Tensor | None = None,
    clock: Callable[[], float] = time.perf_counter,
    pairing: str = "round_robin",
) -> dict[str, Any]:
    """Run the sweep. ``progress(description, total)`` may return an ``update(n)`` callback
    (e.g. a tqdm bar's ``update``) for each phase.

    ``calibrated`` variants (SAINT-family methods without tau) are calibrated with
    :func:`saint.calibrate` on ``calib_x`` to each FLOPs-ideal speed-up in ``speedups``;
    their rows record the target and the calibration's own estimate. ``tome_inflections``
    adds ToMe's ``(r, inflection)`` schedules (e.g. -0.5: decreasing) for every feasible r;
    ``tome_select_at`` runs each ToMe setting at every listed placement of the merge
    (``"mlp"``, ``"attention"``: see :class:`saint.methods.MethodConfig`), and with each of
    ``tome_args``' extra settings (e.g. ``{}`` and ``{"keep_norm": True}``).
    ``clock`` times the round-robin (wall time by default; ``time.process_time`` counts
    this process's CPU time, robust to other load on the machine)."""
    saint_args = dict(saint_args or {})
    if "tau" in saint_args:
        raise ValueError("give tau through the grid (taus), not in saint_args")
    bad = sorted(set(matched) - set(MATCHED_METHODS))
    if bad:
        raise ValueError(f"matched methods must be among {MATCHED_METHODS}, got {bad}")
    if not taus and not tome_rs:
        raise ValueError("nothing to sweep: give a tau grid and/or a ToMe r grid")
    n_patches = harness.adapter.grid(harness.model).num_patches
    depth = len(harness.adapter.sites(harness.model))
    bad_r = [r for r in tome_rs if not _tome_feasible(n_patches, depth, r)]
    if bad_r:
        raise ValueError(f"ToMe r={bad_r} cannot merge that many in every one of the {depth} blocks "
                         f"({n_patches} patches); the feasible grid is at most r={max_tome_r_everywhere(n_patches, depth)}")
    check_grids(speedups, calibrated, tome_inflections)
    # a decreasing schedule can ask more of the first blocks than they hold: such a point is left out, said
    skipped = [{"r": r, "inflection": infl} for r in tome_rs for infl in tome_inflections
               if not _tome_feasible(n_patches, depth, r, infl)]
    if skipped:
        warnings.warn(f"ToMe schedules left out (they cannot merge that many in every one of the {depth} blocks of "
                      f"{n_patches} patches): {', '.join(variant_label('tome', s) for s in skipped)}", stacklevel=2)

    def bar(desc: str, total: int) -> Callable[[int], None] | None:
        return progress(desc, total) if progress is not None else None

    saint_vs = [Variant(variant_label("saint", {"tau": t, **saint_args}), "saint", {"tau": t, **saint_args})
                for t in taus]
    n = len(image_set)
    first, labels = harness.collect([BASELINE, *saint_vs], image_set.records, transform, batch_size,
                                    bar("baseline + SAINT over images", n))
    points: list[tuple[str, dict[str, Any], Variant]] = [("unpruned", {}, BASELINE)]
    points += [("saint", {"tau": t}, v) for t, v in zip(taus, saint_vs, strict=True)]
    outputs = dict(zip([v.label for v in [BASELINE, *saint_vs]], first, strict=True))

    second: list[Variant] = []
    for cv, sp, cal_kwargs, achieved, target in _calibrate_variants(
        harness, calibrated, speedups, calib_x, int(timing_x.shape[0]), clock
    ):
        v = Variant(f"{cv.label}@{format_value(sp)}x", cv.method, cal_kwargs)
        second.append(v)
        points.append((cv.label, {"target_speedup": sp, "calibrated_speedup": achieved, "target": target}, v))
    for r in tome_rs:
        schedules = [{"r": r}] + [{"r": r, "inflection": infl} for infl in tome_inflections
                                  if {"r": r, "inflection": infl} not in skipped]
        for schedule in schedules:
            for at, extra in itertools.product(tome_select_at, tome_args):
                setting = {**schedule, **({"select_at": at} if at != "mlp" else {}), **extra}
                v = Variant(variant_label("tome", setting), "tome", setting)
                second.append(v)
                points.append(("tome", setting, v))
    for t, sv in zip(taus, saint_vs, strict=True):
        layers = _pruning_layers(harness, sv)
        sched = matched_drop_schedule(outputs[sv.label].mean_tokens(), layers)
        for name in matched:
            kw = {"r": sched, "layers": layers}
            v = Variant(f"{name}@saint:tau={format_value(t)}", name, kw)
            second.append(v)
            points.append((name, {"matched_tau": t, "r": sched}, v))
    if second:
        rest, _ = harness.collect(second, image_set.records, transform, batch_size,
                                  bar("ToMe + matched baselines over images", n))
        outputs.update(zip([v.label for v in second], rest, strict=True))

    variants = [p[2] for p in points]
    rounds = timed_rounds(pairing, len(variants), warmup, repeats)
    ms = harness.measure(variants, timing_x, warmup=warmup, repeats=repeats, memory=False, clock=clock,
                         pairing=pairing, progress=bar(f"timing ({pairing})", rounds) if repeats > 0 else None)
    cost_rows = rows_from_measurements(ms)
    ref = outputs[BASELINE.label]
    rows = []
    for (method, setting, v), cost in zip(points, cost_rows, strict=True):
        row: dict[str, Any] = {"method": method, "setting": setting, "label": v.label, "settings": dict(v.kwargs)}
        scores = score_outputs(outputs[v.label], ref, labels, image_set.label_space, False)  # unpruned too: computed
        row.update({k: scores[k] for k in scores if k not in ("tokens_per_block", "mean_tokens")})
        row["tokens_per_block"] = scores["tokens_per_block"]  # over the image set
        row["mean_tokens"] = scores["mean_tokens"]
        fl = outputs[v.label].flops_per_image
        row["gflops_per_image"] = fl / 1e9  # over the image set, at the fidelity batch size
        row["flops_ratio"] = ref.flops_per_image / fl
        row["timing_gflops_per_image"] = cost["gflops_per_image"]  # on the timing batch
        row["timing_flops_ratio"] = cost["ideal_speedup"]
        for k in ("speedup", "speedup_best", "efficiency", "images_per_s", "ms_median", "ms_min", "layout"):
            row[k] = cost.get(k)
        rows.append(row)
    x_key = "speedup" if repeats > 0 else "flops_ratio"
    mask = pareto_mask([r[x_key] for r in rows], [r["centered_cosine"] for r in rows])
    for r, p in zip(rows, mask, strict=True):
        r["pareto"] = p
    return {
        "settings": {
            "images": image_set.description,
            "num_images": n,
            "taus": list(taus),
            "saint_args": saint_args,
            "tome_rs": list(tome_rs),
            "calibrated": [cv.as_dict() for cv in calibrated],
            "speedups": list(speedups),
            "calibration_images": 0 if calib_x is None else int(calib_x.shape[0]),
            "matched": list(matched),
            "batch_size": batch_size,
            "timing_batch_size": int(timing_x.shape[0]),
            "warmup": warmup,
            "repeats": repeats,
            "clock": "process CPU time" if clock is time.process_time else "wall time",
            "pairing": pairing,
            "tome_inflections": list(tome_inflections),
            "tome_schedules_left_out": skipped,
            "dtype": str(harness.dtype).replace("torch.", ""),
            "device": str(harness.device),
            "pareto": f"not dominated in ({x_key}, centered_cosine) over all points",
            "x_axis": x_key,
        },
        "results": rows,
    }


def _setting_text(row: dict[str, Any]) -> str:
    s = row["setting"]
    if row["method"] == "unpruned":
        return "-"
    if "matched_tau" in s:
        return f"= saint tau {format_value(s['matched_tau'])}"
    if "target_speedup" in s:
        kind = "measured" if s.get("target") == "measured" else "est."
        return f"calibrated to {format_value(s['target_speedup'])}x ({kind} {s['calibrated_speedup']:.2f}x)"
    return ", ".join(f"{k}={format_value(v)}" for k, v in s.items())


def _table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = report["results"]
    has_top1 = any(r.get("top1") is not None for r in rows)
    has_agree = any("top1_agreement" in r for r in rows)
    headers = ["method", "setting", "mean tok", "GFLOPs/img", "FLOPs ratio", "speed ratio", "centered cos",
               "retrieval@1"]
    headers += ["top-1 agree"] if has_agree else []
    headers += ["top-1"] if has_top1 else []
    headers += ["Pareto", "tokens per block"]
    out = []
    for r in rows:
        line = [r["method"], _setting_text(r), fmt(r["mean_tokens"], 1), fmt_gflops(r["gflops_per_image"]),
                fmt(r["flops_ratio"], 2), fmt(r.get("speedup"), 2), fmt(r["centered_cosine"], 4),
                fmt(r["retrieval_at_1"])]
        line += [fmt(r.get("top1_agreement"))] if has_agree else []
        line += [fmt(r.get("top1"))] if has_top1 else []
        line += ["*" if r["pareto"] else "", tokens_summary(r["tokens_per_block"])]
        out.append(line)
    return headers, out


def format_sweep(report: dict[str, Any]) -> str:
    """The sweep table as aligned text."""
    h, rows = _table(report)
    return text_table(h, rows)


def _layouts(rows: list[dict[str, Any]]) -> str:
    """``"packed: saint_plus, tome; rectangular: ..."``: which layout each method's timed
    calls ran in (rows without a layout, e.g. the unpruned one or older results, left out)."""
    by_layout: dict[str, list[str]] = {}
    for r in rows:
        if r.get("layout") and r["method"] not in by_layout.setdefault(r["layout"], []):
            by_layout[r["layout"]].append(r["method"])
    return "; ".join(f"{k} ({', '.join(v)})" for k, v in by_layout.items() if v)


def sweep_markdown(report: dict[str, Any], title: str = "saint sweep") -> str:
    """A self-describing markdown page: environment, settings, table, definitions."""
    s = report["settings"]
    env = report.get("environment", {})
    lines = [f"# {title}", ""]
    if env:
        vers = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
        lines += [
            f"- date: {env.get('date')}",
            f"- device: {env.get('device')}",
            f"- versions: {vers}",
            f"- command: `{env.get('command')}`",
        ]
    if report.get("model"):
        lines.append(f"- model: {report['model']}")
    lines += [
        f"- images: {s['images']}",
        f"- dtype {s['dtype']}, device {s['device']}; fidelity batch {s['batch_size']}, "
        f"timing batch {s['timing_batch_size']}, {s['warmup']} warm-up + {s['repeats']} timed round-robin rounds"
        + (" per variant, each variant paired with the unpruned model" if s.get("pairing") == "paired" else ""),
        "",
    ]
    layouts = _layouts(report["results"])
    if layouts:
        lines[-1:-1] = [f"- how the timing batch ran: {layouts}"]
    h, rows = _table(report)
    lines += [markdown_table(h, rows), ""]
    lines += [
        "- *GFLOPs/img*, *FLOPs ratio*: counted over the whole image set (fidelity batches; padded per-sample "
        "sequences count as computed) with torch.utils.flop_counter (FLOPs = 2 x multiply-adds, attention "
        "included); the ratio is unpruned / variant, the ideal speedup. The JSON also has the timing batch's "
        "own FLOPs and the efficiency (speed ratio / its FLOPs ratio).",
        ("- *speed ratio*: median over rounds of unpruned time / variant time per batch, each variant timed in "
         "a round robin of its own with the unpruned model (as a measured-speed calibration times it)"
         if s.get("pairing") == "paired" else
         "- *speed ratio*: unpruned median time / variant median time per batch, variants interleaved round-robin")
        + f" (the first photos of the set as timing batch), model call only, device-synchronised; "
        f"times are {s.get('clock', 'wall time')}.",
        "- *centered cos*: mean cosine between the variant's and the unpruned model's pooled embedding of "
        "the same image, after subtracting the unpruned set's mean embedding from both.",
        "- *retrieval@1*: fraction of images whose nearest unpruned embedding (centered cosine, whole set) "
        "is their own.",
        "- *random / attn at `= saint tau t`*: the same blocks and per-block drop counts as SAINT's mean "
        "token counts at that tau (random drop; EViT-style class-attention drop).",
        f"- *Pareto*: {s['pareto']}.",
        "",
    ]
    return "\n".join(lines)


def sweep_csv(report: dict[str, Any]) -> str:
    """Machine-readable CSV (one row per point, raw numbers)."""
    keys = ["method", "label", "mean_tokens", "gflops_per_image", "flops_ratio", "speedup", "speedup_best",
            "timing_flops_ratio", "efficiency", "images_per_s", "centered_cosine", "centered_cosine_min", "cosine", "retrieval_at_1",
            "top1_agreement", "top1", "top5", "pareto"]
    rows = [[r.get(k) for k in keys] for r in report["results"]]
    return csv_text(keys, rows)


def plot_sweep(report: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Speed ratio vs fidelity (centered cosine; retrieval@1), one curve per method."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x_key = report["settings"]["x_axis"]
    xlabel = "measured speed ratio (x unpruned)" if x_key == "speedup" else "FLOPs ratio (x unpruned)"
    rows = report["results"]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "unpruned"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"saint": "o", "tome": "s", "random": "^", "attn": "v"}
    for ax, y_key, ylabel in zip(axes, ("centered_cosine", "retrieval_at_1"),
                                 ("centered cosine to unpruned", "retrieval@1"), strict=True):
        for m in methods:
            pts = sorted((r[x_key], r[y_key]) for r in rows if r["method"] == m and r.get(x_key) is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=markers.get(m, "o"), label=m)
        ax.plot([1.0], [1.0], marker="*", color="k", markersize=12, linestyle="", label="unpruned")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep(report: dict[str, Any], prefix: str | Path, title: str = "saint sweep",
                formats: Sequence[str] = ("json", "csv", "md", "png")) -> list[Path]:
    """Write ``prefix.{json,csv,md,png}``; returns the paths written."""
    return write_outputs(report, prefix, formats, {
        "csv": lambda path: path.write_text(sweep_csv(report)),
        "md": lambda path: path.write_text(sweep_markdown(report, title)),
        "png": lambda path: plot_sweep(report, path, title),
    })

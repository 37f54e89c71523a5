"""The selection overhead timed by the wall clock: an unpatched model against patched copies
that prune nothing, on the offline DINOv2 ViT-S/14 (real weights), with a second unpatched
copy as the control that shows what "no difference" reads as.

Each patched copy runs its selection in full and merges nothing: ``saint:k=1000`` builds
SAINT's graph in blocks 0-5 and votes, but no token can have 1000 links;
``saint_match`` with ``fraction=0`` finds every candidate's best match, counts, orders (with
``guard``, from the class token's attention) and plans in all 12 blocks, and merges none of
them. The script checks that every block keeps every token (else it stops) and records the
largest difference of the output from the unpatched one.

The copies are timed paired, as a measured-speed calibration times a step: each copy in a
rotation of its own with the unpatched model, ``--repeats`` rounds after ``--warmup``. The
overhead is the median over rounds of ``patched / unpatched`` minus 1, with a seeded
percentile-bootstrap 95% interval of that median. On a shared CPU, glibc's mmap makes rounds
spread by several percent (docs/results.md, timing noise); run it with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184`` (the output records the allocator
settings it ran with). :mod:`selection_overhead_profile` counts the same work op by op.
``--model`` times another timm model instead (random weights: speed only), e.g.
``vit_small_patch16_dinov3`` (an ``Eva``).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/selection_overhead_wall.py --threads 2
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/selection_overhead_wall.py --threads 2 --size 518 --repeats 12

Writes ``benchmarks/results/selection_overhead_wall_cpu_<size>_b<batch>[_<model>][_<tag>].{json,md}``
with the date, device, versions, allocator settings, git commit and this exact command.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import saint
from saint import assets
from saint.adapters import handle_of
from saint.commands.options import output_tag
from saint.measure.harness import timing_batch
from saint.measure.report import (
    environment,
    markdown_table,
    provenance_lines,
    write_json_and_markdown,
)
from saint.spec import parse_method_spec
from saint.timing import median_interval, time_paired

CONTROL = "none"
DEFAULT_METHODS = (
    CONTROL,
    "saint:k=1000",
    "saint_match:tau=0.5,fraction=0",
    "saint_match:tau=0.5,fraction=0,guard=0.1",
    "saint_match:tau=0.5,fraction=0,guard=0.1,select_at=attention",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="input resolution, a multiple of 14 (default 224)")
    p.add_argument("--batch-size", type=int, default=32, help="timing batch (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds per pair (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per pair (default 2)")
    p.add_argument("--method", action="append", default=None,
                   help=f"a variant that prunes nothing (repeatable; '{CONTROL}': a second unpatched copy; "
                        f"default: {', '.join(DEFAULT_METHODS)})")
    p.add_argument("--model", default=None,
                   help="a timm model name (random weights, seed 0; default: the offline DINOv2 ViT-S/14)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default="", type=output_tag, help="suffix of the output names")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be >= 3 (an interval of the median needs rounds)")
    return args


def prunes_nothing(want: torch.Tensor, patched: torch.nn.Module, x: torch.Tensor) -> float:
    """Check that ``patched`` keeps every token in every block on ``x``; return the largest
    difference of its output from ``want``, the unpatched model's output on ``x`` (0 where
    the selection leaves the math as is)."""
    with torch.inference_mode():
        got = patched(x)
    if saint.is_patched(patched):
        sites = handle_of(patched).site_tokens()
        full = int(sites[0].max())  # nothing before the first site prunes
        for i, tokens in enumerate(sites):
            if int(tokens.min()) != full:
                raise RuntimeError(f"block {i} of the patched copy pruned tokens; this benchmark times a "
                                   "selection that prunes nothing")
    return float((want - got).abs().max())


def copy_of(model: torch.nn.Module, spec: str) -> torch.nn.Module:
    """A copy of ``model``, patched with ``spec`` unless it is the control."""
    twin = copy.deepcopy(model)
    if spec != CONTROL:
        variant = parse_method_spec(spec)
        saint.patch(twin, variant.method, **variant.kwargs)
    return twin


def caller(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Callable[[], None]]:
    """A timing setup for :func:`saint.timing.time_paired`: the inference call of ``model`` on ``x``."""
    def setup() -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                model(x)
        return call
    return setup


def summary(spec: str, base: list[float], times: list[float], max_diff: float) -> dict[str, Any]:
    """One variant's row: the median of its per-round ``times / base`` less 1, with the
    bootstrap 95% interval of that median, the median times and the raw rounds."""
    ratios = [t / b for b, t in zip(base, times, strict=True)]
    low, high = median_interval(ratios)
    return {"variant": spec, "overhead": statistics.median(ratios) - 1.0, "interval": [low - 1.0, high - 1.0],
            "unpatched_ms_median": 1e3 * statistics.median(base), "patched_ms_median": 1e3 * statistics.median(times),
            "ratio_spread": max(ratios) - min(ratios), "max_abs_output_difference": max_diff,
            "unpatched_times": base, "patched_times": times}


def markdown(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    rows = [[f"`{r['variant']}`" if r["variant"] != CONTROL else "control: a second unpatched copy",
             f"{100 * r['overhead']:+.2f}%", f"{100 * r['interval'][0]:+.2f}% .. {100 * r['interval'][1]:+.2f}%",
             f"{r['unpatched_ms_median']:.0f}", f"{r['patched_ms_median']:.0f}", f"{100 * r['ratio_spread']:.1f}%",
             f"{r['max_abs_output_difference']:.1e}"] for r in report["variants"]]
    return "\n".join([
        f"# Selection overhead by the wall clock: {report['model']}, batch {s['batch_size']}", "",
        *provenance_lines(env),
        f"- each variant timed paired with the unpatched model: {s['warmup']} untimed + {s['repeats']} timed "
        f"rounds; overhead = median over rounds of patched / unpatched - 1, with a bootstrap 95% interval "
        f"of that median; {report['wall_seconds']} s in all", "",
        markdown_table(["variant (prunes nothing)", "overhead", "95% interval", "unpatched ms", "patched ms",
                        "spread of the round ratios", "max output difference"], rows),
        "",
    ])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment("cpu", ["python", f"benchmarks/{Path(__file__).name}", *argv])
    start = time.perf_counter()
    methods = args.method or list(DEFAULT_METHODS)
    model, described = assets.benchmark_model(args.model, args.size)
    x = timing_batch(assets.offline_images(skimage=False, shared=False), assets.eval_transform(model), args.batch_size)
    copies = [copy_of(model, spec) for spec in methods]
    with torch.inference_mode():
        want = model(x)  # the reference, once for every copy
    diffs = [prunes_nothing(want, twin, x) for twin in copies]
    timings, bases = time_paired([caller(model, x)] + [caller(twin, x) for twin in copies], batch_size=args.batch_size,
                                 device="cpu", warmup=args.warmup, repeats=args.repeats)
    variants = [summary(spec, base.times, t.times, diff)
                for spec, base, t, diff in zip(methods, bases[1:], timings[1:], diffs, strict=True)]
    report = {"environment": env, "model": described,
              "settings": {"size": args.size, "batch_size": args.batch_size, "repeats": args.repeats,
                           "warmup": args.warmup, "methods": methods},
              "wall_seconds": round(time.perf_counter() - start, 1), "variants": variants}
    text = markdown(report)
    print(text)
    tag = f"_{args.tag}" if args.tag else ""
    if args.model is not None:
        tag = f"_{args.model}{tag}"
    prefix = args.out_dir / f"selection_overhead_wall_cpu_{args.size}_b{args.batch_size}{tag}"
    for path in write_json_and_markdown(report, prefix, text):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

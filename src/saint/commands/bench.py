"""``saint bench``: throughput of the unpruned model and each ``--method`` side by side."""

from __future__ import annotations

import argparse

from ..spec import __doc__ as SPEC_DOC

METHOD_HELP = (
    "method spec NAME[:key=value,...], repeatable, e.g. saint:tau=0.9,k=5  tome:r=8  random:r=16  "
    "attn:r=16,layers=0/1/2. Lists use '/' (tau=0.95/0.9/0.9 per pruning layer), {block: value} "
    "dicts use 'block#value' (tau=0#0.95/3#0.9); @PATH is the variant a saint calibrate --json PATH file describes."
)


def register(sub: argparse._SubParsersAction) -> None:
    from .options import (
        add_image_options,
        add_model_options,
        add_runtime_options,
        add_timing_options,
        user_errors,
    )

    p = sub.add_parser(
        "bench",
        help="throughput, FLOPs, tokens and memory of pruning methods vs the unpruned model",
        description=(__doc__ + "\n\n" + (SPEC_DOC or "")).replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", action="append", default=[], metavar="SPEC", help=METHOD_HELP)
    add_model_options(p)
    add_runtime_options(p, batch_size=8)
    add_timing_options(p, warmup=2, repeats=10)
    add_image_options(p, what="photos for the timing batch (the first --batch-size, cycled)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--by-op", action="store_true",
                   help="also time one forward of each variant op by op (CPU only): the model's products, the "
                        "attention, the selection, the packing and merging, and the model's other ops")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=user_errors("bench", run))


def run(args: argparse.Namespace) -> int:
    from .. import assets
    from ..bench.bench import format_bench, run_bench
    from ..measure.harness import timing_batch
    from ..measure.report import environment, write_json
    from ..measure.timing import timed_rounds
    from ..spec import parse_method_spec
    from .options import (
        check_output_file,
        clock_of,
        load_for_measurement,
        progress_factory,
    )

    if not args.method:
        raise SystemExit("saint bench: give at least one --method, e.g. --method saint:tau=0.97 --method tome:r=8")
    variants = [parse_method_spec(s) for s in args.method]
    check_output_file(args.json, "--json")
    device, model, desc, images, harness = load_for_measurement(args)
    env = environment(device)  # the commit and date the run starts from
    x = timing_batch(images.records, assets.eval_transform(model), args.batch_size)
    print(f"model: {desc}")
    print(f"timing batch: {images.description}")
    bar = progress_factory(not args.no_progress and args.repeats > 0)(f"timing ({args.pairing})",
                                                                       timed_rounds(args.pairing, len(variants) + 1,
                                                                                    args.warmup, args.repeats))
    report = run_bench(harness, variants, x, warmup=args.warmup, repeats=args.repeats,
                       memory=not args.no_memory, progress=bar, clock=clock_of(args), pairing=args.pairing,
                       by_op=args.by_op)
    report = {"environment": env, "model": desc, "images": images.description, **report}
    print(format_bench(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0

"""``saint eval``: accuracy (classifiers with labelled images) and fidelity to the unpruned
model (centered cosine of pooled embeddings, retrieval@1, top-1 agreement) of each
``--method`` over an image set, with the model's own timm preprocessing."""

from __future__ import annotations

import argparse

from .bench import METHOD_HELP


def register(sub: argparse._SubParsersAction) -> None:
    from .options import (
        add_image_options,
        add_model_options,
        add_runtime_options,
        user_errors,
    )

    p = sub.add_parser(
        "eval",
        help="top-1/top-5 and fidelity to the unpruned model over an image set",
        description=__doc__.replace("``", ""),
    )
    p.add_argument("--method", action="append", default=[], metavar="SPEC", help=METHOD_HELP)
    add_image_options(p)
    add_model_options(p)
    add_runtime_options(p, batch_size=16)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=user_errors("eval", run))


def run(args: argparse.Namespace) -> int:
    from .. import assets
    from ..eval.evaluate import evaluate, format_eval
    from ..measure.report import environment, write_json
    from ..spec import parse_method_spec
    from .options import check_output_file, load_for_measurement, progress_factory

    variants = [parse_method_spec(s) for s in args.method]
    check_output_file(args.json, "--json")
    device, model, desc, images, harness = load_for_measurement(args)
    print(f"model: {desc}")
    bar = progress_factory(not args.no_progress)(f"{1 + len(variants)} variants over images", len(images))
    report = evaluate(harness, variants, images, assets.eval_transform(model), args.batch_size, bar)
    report = {"environment": environment(device), "model": desc, **report}
    print(format_eval(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0

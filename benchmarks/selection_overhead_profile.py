"""The selection overhead counted op by op instead of timed: what SAINT's graph step adds
to a forward pass that prunes nothing, on the offline DINOv2 ViT-S/14 (real weights), or
with ``--model`` another timm model (random weights, e.g. ``vit_small_patch16_dinov3``).

Timing an overhead of a few percent needs a quiet machine; on a shared one the rounds of
the same work spread by +-20%. This script instead runs the unpatched model and
``saint:k=1000`` (SAINT's graph in blocks 0-5, no candidate can have 1000 links, so nothing
is dropped) once each under torch.profiler, and compares the two op lists by (op, input
shapes): the ops and calls only the patched model runs are the selection's own work
(head-averaged keys, the similarity graph, degrees, scores, ranking). Their CPU time over
the unpatched model's total op time is the overhead. Python-side hook time is not in it
(a few hooks per block: microseconds against a batch's seconds). Where a patched block
runs other ops than the unpatched one (timm ``Eva``'s pruning blocks call saint's own
attention, so some ops differ in shape), the added ops overstate the overhead; the net
figure subtracts the calls only the unpatched pass makes (each side timed in its own pass).

One pass's op total moves with the machine's load as much as the overhead it divides (on a
shared 2-core VM an unpatched 518px pass read 19.7 s of op time and the next one 14.4 s), so
``--rounds R`` profiles the two models alternately ``R`` times and reports medians: of the
unpatched total, of the added (and net) milliseconds, and the op table of the median round.

Writes ``benchmarks/results/selection_overhead_profile_cpu[_<size>]_b<batch>.{json,md}``
(the size only when it is not 224; ``--tag`` adds a suffix) with the date, device, versions, git commit and this
exact command.

    python benchmarks/selection_overhead_profile.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import saint
from saint import assets
from saint.adapters import handle_of
from saint.commands.options import output_tag
from saint.measure.harness import timing_batch
from saint.measure.report import environment, markdown_table, write_json_and_markdown
from saint.spec import parse_method_spec

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="input resolution, a multiple of 14 (default 224)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--method", default="saint:k=1000", help="the patched variant (default saint:k=1000)")
    p.add_argument("--model", default=None,
                   help="a timm model name (random weights, seed 0; default: the offline DINOv2 ViT-S/14)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate unpatched and patched profiles this many times and report medians (default 1)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--tag", default="", type=output_tag, help="suffix of the output names, for another --method beside the default")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def op_times(model: torch.nn.Module, x: torch.Tensor) -> dict[tuple[str, str], tuple[int, float]]:
    """``(op, input shapes) -> (calls, self CPU ms)`` of one forward pass (after a warm-up)."""
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(x)
    return {(e.key, str(e.input_shapes)): (e.count, e.self_cpu_time_total / 1e3)
            for e in prof.key_averages(group_by_input_shape=True)}


def added_work(base: dict[tuple[str, str], tuple[int, float]], patched: dict[tuple[str, str], tuple[int, float]]
               ) -> list[dict[str, Any]]:
    """The calls the patched pass makes beyond the unpatched one, per (op, shapes), with
    the patched pass's time per call for the extra calls."""
    out = []
    for key, (calls, ms) in patched.items():
        extra = calls - base.get(key, (0, 0.0))[0]
        if extra > 0:
            out.append({"op": key[0], "shapes": key[1], "extra_calls": extra, "ms": ms * extra / calls})
    return sorted(out, key=lambda r: -r["ms"])


def profile_round(model: torch.nn.Module, patched: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """One unpatched and one patched profile: both op totals, the calls only the patched
    pass makes (added) and those only the unpatched one makes (removed)."""
    base_ops, patched_ops = op_times(model, x), op_times(patched, x)
    added, removed = added_work(base_ops, patched_ops), added_work(patched_ops, base_ops)
    return {"unpatched_op_ms": sum(ms for _, ms in base_ops.values()),
            "patched_op_ms": sum(ms for _, ms in patched_ops.values()),
            "added_op_ms": sum(r["ms"] for r in added), "added_ops": added,
            "removed_op_ms": sum(r["ms"] for r in removed), "removed_ops": removed}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, described = assets.benchmark_model(args.model, args.size)
    x = timing_batch(assets.offline_images(skimage=False, shared=False), assets.eval_transform(model), args.batch_size)
    patched = copy.deepcopy(model)
    variant = parse_method_spec(args.method)
    saint.patch(patched, variant.method, **variant.kwargs)
    rounds = [profile_round(model, patched, x) for _ in range(args.rounds)]
    median = sorted(rounds, key=lambda r: r["added_op_ms"])[(len(rounds) - 1) // 2]
    total = statistics.median(r["unpatched_op_ms"] for r in rounds)
    extra_ms = statistics.median(r["added_op_ms"] for r in rounds)
    removed_ms = statistics.median(r["removed_op_ms"] for r in rounds)
    net_ms = statistics.median(r["added_op_ms"] - r["removed_op_ms"] for r in rounds)
    extra = median["added_ops"]
    kept = [round(float(c.float().mean()), 1) for c in handle_of(patched).site_tokens()]
    report = {
        "environment": environment("cpu", ["python", f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]),
        "model": described,
        "batch_size": args.batch_size, "method": args.method, "tokens_per_block": kept, "rounds": args.rounds,
        "unpatched_op_ms": total, "patched_op_ms": statistics.median(r["patched_op_ms"] for r in rounds),
        "added_op_ms": extra_ms, "overhead": extra_ms / total, "added_ops": extra,
        "removed_op_ms": removed_ms, "net_overhead": net_ms / total, "removed_ops": median["removed_ops"],
        "per_round": [{k: r[k] for k in ("unpatched_op_ms", "patched_op_ms", "added_op_ms", "removed_op_ms")}
                      for r in rounds],
    }
    size = "" if args.size == 224 else f"_{args.size}"  # the 224px file keeps its name
    tag = f"_{args.tag}" if args.tag else ""
    if args.model is not None:
        tag = f"_{args.model}{tag}"
    stem = Path(args.out_dir) / f"selection_overhead_profile_cpu{size}_b{args.batch_size}{tag}"
    rows = [[r["op"], r["shapes"][:70], str(r["extra_calls"]), f"{r['ms']:.2f}"] for r in extra[:15]]
    env = report["environment"]
    md = [
        f"# Selection overhead by profile: {report['model']}, batch {args.batch_size}, {args.method}",
        "",
        f"- date: {env['date']}; device: {env['device']}; versions: {env['versions']}",
        f"- git: {env['git']}",
        f"- command: `{env['command']}`",
        "",
        (f"Median of {args.rounds} rounds (unpatched and patched profiled alternately). " if args.rounds > 1 else "")
        + f"Unpatched forward: {total:.0f} ms of op CPU time; the ops only the patched model runs: "
        f"{extra_ms:.1f} ms = **{100 * report['overhead']:.2f}%** (the patched pass's own total, "
        f"{report['patched_op_ms']:.0f} ms, moves with the machine's load and is not the measure). "
        f"Calls only the unpatched pass makes: {report['removed_op_ms']:.1f} ms; net of them "
        f"**{100 * report['net_overhead']:+.2f}%**."
        + ("" if args.rounds == 1 else " Per round (unpatched / patched op ms, added, removed): " + "; ".join(
            f"{r['unpatched_op_ms']:.0f} / {r['patched_op_ms']:.0f}, {r['added_op_ms']:.0f}, {r['removed_op_ms']:.0f}"
            for r in rounds) + ". The table is the round with the median added time."),
        "",
        markdown_table(["op", "input shapes", "extra calls", "ms"], rows),
        "",
    ]
    write_json_and_markdown(report, stem, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LLaVA latency at equal visual-token budgets on the CPU: the unpruned model, SAINT's
vit / llm / hybrid modes, FastV, random and pooling at 576 -> 192, 128, 64 visual tokens.

Random weights with LLaVA-1.5's real vision side (CLIP ViT-L/14-336, 576 patches) and a
Llama scaled for a CPU (hidden 1024, 8 layers); see ``saint.bench.vlm`` for exactly what
is measured. Writes ``benchmarks/results/vlm_cpu.{md,json}`` (other geometries, devices
or dtypes: ``vlm_<geometry>_<device>_<dtype>``), each recording the date, device (CPU
model), thread count, versions and this exact command. Takes every ``saint vlm-bench``
option; the defaults below differ from the command's (CPU, 3 timed rounds).

    python benchmarks/run_vlm_cpu.py                         # the committed CPU results
    python benchmarks/run_vlm_cpu.py --geometry scaled --threads 2 --budgets 288,144 \
        --new-tokens 8 --no-progress     # tower and LLM scaled alike, 50% / 25% (vlm_scaled_cpu_fp32)
    python benchmarks/run_vlm_cpu.py --threads 2 --methods vit,llm --budgets 128 --repeats 1 \\
        --warmup 0 --new-tokens 4 --no-flops --out-dir /tmp/vlm   # a quick look (~3 min)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from saint.bench.vlm import format_vlm_bench, write_vlm_report
from saint.commands.vlm_bench import add_arguments, build_report

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, device="cpu")
    p.set_defaults(repeats=5)  # >= 5 rounds: the minimum is reported with the spread
    p.add_argument("--out-dir", default=str(RESULTS), help=f"where results go (default {RESULTS})")
    return p.parse_args(argv)


def output_prefix(args: argparse.Namespace, report: dict) -> Path:
    s = report["settings"]
    geometry = report["geometry"]["name"]
    device = s["device"].split(":")[0]
    if (geometry, device, s["dtype"]) == ("cpu", "cpu", "fp32"):
        name = "vlm_cpu"
    else:
        name = f"vlm_{geometry}_{device}_{s['dtype']}"
    return Path(args.out_dir) / name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json:
        raise SystemExit("--json: this script writes <out-dir>/vlm_cpu.{md,json} itself; use --out-dir")
    argv_used = ["python", f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]
    try:
        report = build_report(args, argv_used)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"run_vlm_cpu.py: error: {e}") from None
    print(format_vlm_bench(report))
    title = f"LLaVA latency at equal visual-token budgets ({report['settings']['dtype']}, {report['settings']['device']})"
    for path in write_vlm_report(report, output_prefix(args, report), title=title):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

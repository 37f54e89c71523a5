"""VLM latency at equal visual-token budgets on the CPU: the unpruned model, SAINT's
vit / llm / hybrid modes, FastV, random and pooling at 50% and 25% of the visual tokens.

Random weights with LLaVA-1.5-7B's, Qwen2.5-VL-7B's or Qwen3-VL-8B's shapes, vision tower
and LLM scaled by the same factor so their FLOPs ratio is the 7B's / 8B's (``--geometry
scaled`` / ``qwen_scaled`` / ``qwen3_scaled``), and the analytic prefill-FLOPs speed-up at
the real shapes beside the measured one; see ``saint.bench.vlm`` for exactly what is measured. Writes
``benchmarks/results/vlm_<geometry>_<device>_<dtype>.{md,json}``, each recording the
date, device (CPU model), thread count, versions, git commit and this exact command.
Takes every ``saint vlm-bench`` option (defaults: CPU, 5 timed rounds).

    python benchmarks/run_vlm_cpu.py --geometry scaled --threads 1 --clock process \\
        --new-tokens 8 --no-progress    # LLaVA-1.5-7B scaled alike (vlm_scaled_cpu_fp32, ~9 min)
    python benchmarks/run_vlm_cpu.py --geometry qwen_scaled --threads 1 --clock process \\
        --new-tokens 8 --no-progress    # Qwen2.5-VL-7B scaled alike (vlm_qwen_scaled_cpu_fp32, ~10 min)
    python benchmarks/run_vlm_cpu.py --geometry qwen3_scaled --threads 1 --clock process \\
        --new-tokens 8 --no-progress    # Qwen3-VL-8B scaled alike (vlm_qwen3_scaled_cpu_fp32, ~7 min)
    python benchmarks/run_vlm_cpu.py --threads 2 --methods vit,llm --budgets 144 --repeats 1 \\
        --warmup 0 --new-tokens 4 --no-flops --out-dir /tmp/vlm   # a quick look

The committed runs time CPU time on one thread (``--clock process``): on the shared
2-core machine, 2-thread wall time had spreads larger than the minima.
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
    device = s["device"].split(":")[0]
    return Path(args.out_dir) / f"vlm_{report['geometry']['name']}_{device}_{s['dtype']}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json:
        raise SystemExit("--json: this script writes <out-dir>/vlm_<geometry>_<device>_<dtype>.{md,json} itself; "
                         "use --out-dir")
    argv_used = ["python", f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]
    try:
        report = build_report(args, argv_used)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"run_vlm_cpu.py: error: {e}") from None
    print(format_vlm_bench(report))
    s = report["settings"]
    title = f"{report['geometry']['label']} latency at equal visual-token budgets ({s['dtype']}, {s['device']})"
    for path in write_vlm_report(report, output_prefix(args, report), title=title):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``saint vlm-bench``: VLM time to first token, decode ms/token, KV cache and peak
memory of the unpruned model, SAINT's vit / llm / hybrid modes and the FastV, random
and pooling baselines at equal visual-token budgets (random weights; LLaVA-1.5-7B or
Qwen2.5-VL-7B with tower and LLM scaled alike, the analytic prefill-FLOPs speed-up at
the real 7B shapes beside the measured one; see saint.bench.vlm for exactly what is
measured)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def _int_list(text: str, what: str) -> list[int]:
    from .options import comma_list

    try:
        out = comma_list(int, "integers")(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{what}: {e}") from None
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def add_arguments(p: argparse.ArgumentParser, device: str = "auto") -> None:
    """Every option of ``saint vlm-bench`` (shared with ``benchmarks/run_vlm_cpu.py``)."""
    from ..bench.vlm import GEOMETRIES, METHODS
    from .options import add_clock_option

    g = p.add_argument_group("model")
    g.add_argument("--geometry", default=None, choices=sorted(GEOMETRIES),
                   help="scaled (default): LLaVA-1.5-7B with tower and LLM scaled alike (width 1/4, LLM depth 1/4, "
                        "tower depth 4 to keep the tower:LLM FLOPs ratio); qwen_scaled: the same for Qwen2.5-VL-7B "
                        "(one 448x448 image = 256 visual tokens; tower depth 7); qwen3_scaled: Qwen3-VL-8B (one 512x512 "
                        "image = 256 visual tokens; tower 6 of 27 blocks, LLM 13 of 36 layers); full / qwen_full / "
                        "qwen3_full: the 7B/8B shapes (use a GPU); cpu: CLIP ViT-L/14-336 + Llama 1024 hidden x 8 "
                        "layers; tiny / qwen_tiny / qwen3_tiny: "
                        "test-sized models. All random weights")
    g.add_argument("--full", action="store_true", help="same as --geometry full (use a GPU, bf16/fp16)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=device, help=f"cpu, cuda, cuda:1, ... (default {device}" + (": cuda if available)" if device == "auto" else ")"))
    r.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weights and activations (default: fp32 on CPU, bf16 on GPU)")
    r.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    r.add_argument("--batch-size", type=int, default=1, help="prompts per forward, one image each (default 1)")
    r.add_argument("--prompt-len", type=int, default=64,
                   help="text tokens per prompt, half before the image, half after (default 64)")
    r.add_argument("--new-tokens", type=int, default=16, help="decode steps timed after the prefill (default 16)")
    r.add_argument("--seed", type=int, default=0, help="weights, prompts and images (default 0)")
    t = p.add_argument_group("timing")
    t.add_argument("--warmup", type=int, default=1, help="untimed round-robin rounds (default 1)")
    t.add_argument("--repeats", type=int, default=5, help="timed round-robin rounds (default 5)")
    add_clock_option(t)
    t.add_argument("--no-memory", action="store_true", help="skip peak memory")
    t.add_argument("--no-flops", action="store_true", help="skip the FLOPs count (one extra prefill per variant)")
    v = p.add_argument_group("variants")
    v.add_argument("--budgets", default=None,
                   help="visual tokens per image to keep, comma-separated (default: 50%% and 25%% of the visual "
                        "tokens for scaled / qwen_*, 192,128,64 of 576 scaled to the geometry otherwise)")
    v.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)} (default all, pool only at the budgets its "
                        "grid keeps exactly); the unpruned model always runs")
    v.add_argument("--no-graph-only", action="store_true",
                   help="skip the graph-only variant (SAINT's LLM selection run without dropping, for its overhead)")
    v.add_argument("--llm-layers", default=None, metavar="S,E",
                   help="SAINT's LLM pruning layers, inclusive (default: full / qwen_full 7,16 as the reference, "
                        "the same relative depth when scaled; cpu 2,5)")
    v.add_argument("--vit-layer", type=int, default=None,
                   help="tower layer of vit/hybrid pruning (default: LLaVA 19 of 24, Qwen2.5-VL 16 of 32, Qwen3-VL 13 of "
                        "27, the same relative depth when scaled)")
    v.add_argument("--fastv-layer", type=int, default=None, help="FastV's K (default 2, scaled alike)")
    v.add_argument("--hybrid-vit-keep", type=int, default=None,
                   help="visual tokens hybrid keeps in the tower before the LLM step (default 375 of 576, scaled "
                        "to the geometry's visual tokens)")
    v.add_argument("--tau-iters", type=int, default=12,
                   help="saint.calibrate steps per llm/hybrid budget (default 12)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    from .options import user_errors

    p = sub.add_parser(
        "vlm-bench",
        help="VLM TTFT, decode ms/token and memory: SAINT vit/llm/hybrid vs FastV/random/pool at equal budgets",
        description=__doc__.replace("``", ""),
    )
    add_arguments(p)
    p.set_defaults(func=user_errors("vlm-bench", run))


def build_report(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Validate the options, run the benchmark, return the report."""

    from ..bench.vlm import GEOMETRIES, vlm_report
    from ..measure.harness import resolve_device, resolve_dtype
    from .options import apply_threads, clock_of, progress_factory

    if args.full and args.geometry not in (None, "full"):
        raise ValueError(f"--full contradicts --geometry {args.geometry}")
    geometry = GEOMETRIES["full" if args.full else args.geometry or "scaled"]
    apply_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("fp32" if device.type == "cpu" else "bf16"))
    for name in ("batch_size", "prompt_len", "new_tokens", "repeats", "tau_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    budgets = None if args.budgets is None else _int_list(args.budgets, "--budgets")
    layers = None
    if args.llm_layers is not None:
        vals = _int_list(args.llm_layers, "--llm-layers")
        if len(vals) != 2:
            raise ValueError(f"--llm-layers takes START,END (inclusive), got {args.llm_layers!r}")
        layers = (vals[0], vals[1])
    return vlm_report(
        geometry, device=device, dtype=dtype, batch_size=args.batch_size, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, budgets=budgets, methods=methods, warmup=args.warmup, repeats=args.repeats,
        memory=not args.no_memory, flops=not args.no_flops, graph_only=not args.no_graph_only,
        tau_iters=args.tau_iters, seed=args.seed, llm_layers=layers, vit_layer=args.vit_layer,
        fastv_layer=args.fastv_layer, hybrid_vit_keep=args.hybrid_vit_keep, argv=argv,
        clock=clock_of(args),
        progress=progress_factory(not args.no_progress),
    )


def run(args: argparse.Namespace) -> int:
    from ..bench.vlm import format_vlm_bench
    from ..measure.report import write_json
    from .options import check_output_file

    check_output_file(args.json, "--json")
    report = build_report(args)
    print(format_vlm_bench(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0

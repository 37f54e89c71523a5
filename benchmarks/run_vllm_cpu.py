"""Throughput and time to first token of Qwen2.5-VL served by vLLM's offline ``LLM`` API with
the saint plugin, at 100 % (plugin off), and SAINT keeping 100 / 50 / 25 % of each image's
visual tokens. Random weights (a geometry scaled for a CPU; ``--geometry 7b`` for
Qwen2.5-VL-7B's on a GPU): speed only, no accuracy.

Run in the plugin's venv (``make test-vllm`` builds ``.venv-vllm``):

    .venv-vllm/bin/python benchmarks/run_vllm_cpu.py

- requests/s: ``--requests`` prompts, each with its own random 448 x 448 image (256 visual
  tokens unpruned), submitted together; ``--max-tokens`` greedy tokens each (EOS ignored).
- TTFT: median wall time of ``generate`` with one new token for one request at a time
  (``--ttft-runs`` fresh images), i.e. processor + vision tower + prefill + first token.
Each setting runs in its own process and engine (prefix caching off, eager mode); the
settings are run ``--rounds`` times in turn and the table gives each one's median (the
machine is shared: the 1-minute load average before each run is recorded).
Writes ``benchmarks/results/vllm_qwen2_5_vl_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The LLM dominates the prefill, as in Qwen2.5-VL-7B (7B LM, 0.7B tower): ~0.1B LM, small tower.
CPU_GEOMETRY = dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4, vision_depth=4, vision_hidden_size=256, vision_heads=4,
    vision_intermediate_size=640, fullatt_block_indexes=[1, 3], vocab_size=512,
)
SIDE = 448
PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the picture."
    "<|im_end|>\n<|im_start|>assistant\n"
)
RESULTS = Path(__file__).resolve().parent / "results"


def overrides(setting: str) -> dict:
    """``--settings`` entry -> the engine's ``hf_overrides``: ``off`` (the plugin off) or a
    keep ratio in (0, 1]."""
    if setting == "off":
        return {}
    try:
        ratio = float(setting)
    except ValueError:
        ratio = float("nan")
    if not 0.0 < ratio <= 1.0:
        raise argparse.ArgumentTypeError(f"--settings entries are 'off' or a keep ratio in (0, 1], got {setting!r}")
    return {"saint_keep_ratio": ratio}


def settings_list(text: str) -> list[str]:
    """``--settings``: comma-separated, ``off`` among them (the speed-ups' baseline)."""
    settings = [t.strip() for t in text.split(",") if t.strip()]
    for setting in settings:
        overrides(setting)
    if "off" not in settings:
        raise argparse.ArgumentTypeError("--settings needs 'off' (the plugin off, the baseline of the speed-ups)")
    return settings


def images(n: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(n)]


def worker(model: str, setting: str, args: argparse.Namespace) -> dict:
    """One engine, one setting: throughput of a batch, then single-request TTFTs."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=model, hf_overrides=overrides(setting), max_model_len=2048, max_num_seqs=args.requests,
        enforce_eager=True, enable_prefix_caching=False, kv_cache_memory_bytes=1 << 29, seed=0,
        limit_mm_per_prompt={"image": 1, "video": 0},
    )
    start_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images(2, 99)], params)
    batch = [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images(args.requests, 1)]
    t0 = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    batch_s = time.perf_counter() - t0
    ttft = []
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for im in images(args.ttft_runs, 2):
        t0 = time.perf_counter()
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": im}}, one, use_tqdm=False)
        ttft.append(time.perf_counter() - t0)
    image_token = json.loads((Path(model) / "config.json").read_text())["image_token_id"]
    return {
        "setting": setting,
        "keep_ratio": overrides(setting).get("saint_keep_ratio"),
        "visual_tokens": outs[0].prompt_token_ids.count(image_token),
        "prompt_tokens": len(outs[0].prompt_token_ids),
        "engine_start_s": start_s,
        "requests": args.requests,
        "batch_s": batch_s,
        "requests_per_s": args.requests / batch_s,
        "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / batch_s,
        "ttft_s_median": statistics.median(ttft),
        "ttft_s": ttft,
    }


def median_run(runs: list[dict]) -> dict:
    """One setting's runs folded into medians (the runs themselves stay in the report)."""
    out = dict(runs[0])
    for key in ("requests_per_s", "output_tokens_per_s", "ttft_s_median", "batch_s", "engine_start_s"):
        out[key] = statistics.median(r[key] for r in runs)
    out["requests_per_s_runs"] = [r["requests_per_s"] for r in runs]
    out["ttft_s_median_runs"] = [r["ttft_s_median"] for r in runs]
    for key in ("ttft_s", "load_avg_1min_before"):
        out.pop(key, None)
    return out


def markdown(report: dict) -> str:
    from saint.measure.report import markdown_table, short_commit

    base = next(r for r in report["results"] if r["setting"] == "off")
    rows = [[
        "plugin off" if r["setting"] == "off" else f"SAINT keep {r['keep_ratio']:g}",
        str(r["visual_tokens"]), f"{r['requests_per_s']:.2f}",
        f"{r['requests_per_s'] / base['requests_per_s']:.2f}x",
        f"{1000 * r['ttft_s_median']:.0f}", f"{base['ttft_s_median'] / r['ttft_s_median']:.2f}x",
    ] for r in report["results"]]
    env = report["environment"]
    head = [
        f"# Qwen2.5-VL in vLLM ({env['device_type']}) with the saint plugin: throughput and TTFT", "",
        f"- date {env['date']}, commit {short_commit(env['git'], 7)}"
        f"{' (dirty)' if env['git']['dirty'] else ''}, {env['device']}",
        f"- vLLM {report['vllm']}, torch {env['versions']['torch']}, "
        f"transformers {report['transformers']}",
        f"- command: `{env['command']}`",
        f"- model: {report['model']}",
        f"- {report['requests']} requests of one {SIDE}x{SIDE} image each, "
        f"{report['max_tokens']} new tokens; TTFT = median of {report['ttft_runs']} single requests;"
        f" each setting run {report['rounds']} times in turn, medians shown (runs in the JSON)",
        "- 1-minute load average before the runs: "
        + ", ".join(f"{r['load_avg_1min_before']:.1f}" for r in report["runs"]),
        "",
    ]
    table = markdown_table(
        ["setting", "visual tokens", "requests/s", "vs off", "TTFT ms", "TTFT vs off"], rows
    )
    return "\n".join(head) + table + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ttft-runs", type=int, default=5)
    p.add_argument("--settings", type=settings_list, default=settings_list("off,0.25,0.5,1.0"),
                   help="'off' and keep ratios in (0, 1], comma-separated (default off,0.25,0.5,1.0)")
    p.add_argument("--geometry", choices=["cpu", "7b"], default="cpu")
    p.add_argument("--out", default=str(RESULTS / "vllm_qwen2_5_vl_cpu"),
                   help="output path without extension (default benchmarks/results/vllm_qwen2_5_vl_cpu)")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args)), flush=True)
        return

    import torch
    import transformers
    import vllm

    from saint.integrations.vllm.tiny import QWEN2_5_VL_7B, write_checkpoint
    from saint.measure.report import environment, write_json_and_markdown

    geometry = CPU_GEOMETRY if args.geometry == "cpu" else QWEN2_5_VL_7B
    tag = hashlib.sha1(json.dumps(geometry, sort_keys=True).encode()).hexdigest()[:8]
    model = Path.home() / ".cache" / "saint" / f"vllm-bench-qwen2_5_vl-{args.geometry}-{tag}"
    if not (model / "config.json").exists():
        dtype = "float32" if args.geometry == "cpu" else "bfloat16"
        write_checkpoint(model, geometry, max_pixels=SIDE * SIDE, dtype=dtype)
    runs = []
    for _ in range(args.rounds):
        for setting in args.settings:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", str(model), setting]
            load = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                sys.exit(f"setting {setting} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
            runs.append({**json.loads(line[0][len("RESULT "):]), "load_avg_1min_before": load})
            print(setting, {k: runs[-1][k] for k in ("requests_per_s", "ttft_s_median")}, flush=True)
    results = [median_run([r for r in runs if r["setting"] == s]) for s in args.settings]
    report = {
        "environment": environment("cpu" if args.geometry == "cpu" else "cuda",
                                   [".venv-vllm/bin/python", f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
        "vllm": vllm.__version__, "transformers": transformers.__version__,
        "model": f"Qwen2.5-VL, random weights, geometry {args.geometry}: {geometry}",
        "requests": args.requests, "max_tokens": args.max_tokens, "ttft_runs": args.ttft_runs,
        "rounds": args.rounds, "torch_threads_engine": torch.get_num_threads(),
        "results": results, "runs": runs,
    }
    write_json_and_markdown(report, args.out, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

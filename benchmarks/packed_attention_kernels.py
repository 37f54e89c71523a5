"""Per-image attention over a packed stream: the candidate kernels on this device, on
DINOv2-S/14 geometry (6 heads x 64) and ragged per-image lengths.

Kernels: ``loop`` (saint's CPU default: one SDPA call per image on views of the
stream), per-image contiguous copies, ``flex`` (flex_attention with a document mask;
compiled on CUDA, eager elsewhere), padded + key mask (what ``layout="padded"`` pays),
and one SDPA call on equally long images with the same total tokens (the FLOPs floor);
on CUDA in fp16/bf16 also ``varlen`` (torch >= 2.10) and the flash-attn package's
varlen kernel when it is installed. Interleaved rounds, minimum reported. Writes
``benchmarks/results/packed_attention_kernels_<device>.{json,md}``.

    python benchmarks/packed_attention_kernels.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from saint.commands.options import output_tag
from saint.core.packing import (
    flash_attn_available,
    lengths_to_valid,
    packed_attention,
    varlen_available,
)
from saint.measure.report import environment, markdown_table, write_json_and_markdown

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, DIM = 6, 64


def kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], device: torch.device
            ) -> dict[str, Any]:
    """name -> zero-argument callable computing per-image attention of the stream."""
    b, t = len(lengths), q.shape[0]
    valid = lengths_to_valid(torch.tensor(lengths, device=device))
    mask = torch.zeros(valid.shape, device=device).masked_fill(~valid, float("-inf"))[:, None, None, :]
    n_eq = t // b

    def contiguous() -> torch.Tensor:
        out, s = [], 0
        for n in lengths:
            qi, ki, vi = (x[s : s + n].transpose(0, 1).contiguous() for x in (q, k, v))
            out.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
            s += n
        return torch.cat(out)

    def padded() -> torch.Tensor:
        qp, kp, vp = (x.new_zeros(b, valid.shape[1], HEADS, DIM).index_put_((valid,), x) for x in (q, k, v))
        o = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (qp, kp, vp)), attn_mask=mask)
        return o.transpose(1, 2)[valid]

    eq = q[: b * n_eq].reshape(b, n_eq, HEADS, DIM).transpose(1, 2)
    out = {
        "loop (per-image SDPA on views)": lambda: packed_attention(q, k, v, lengths, kernel="loop"),
        "per-image contiguous copies": contiguous,
        "padded + key mask": padded,
        "equal lengths, one call (floor)": lambda: F.scaled_dot_product_attention(eq, eq, eq),
    }
    if device.type == "cuda" or t <= 4096:  # eager flex on CPU materialises T x T scores
        out["flex (document mask)"] = lambda: packed_attention(q, k, v, lengths, kernel="flex")
    if device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        if varlen_available():
            out["varlen (flash)"] = lambda: packed_attention(q, k, v, lengths, kernel="varlen")
        if flash_attn_available():
            out["flash-attn varlen"] = lambda: packed_attention(q, k, v, lengths, kernel="flash_attn")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lengths", default="20-60,60-250,300-1370", help="ranges of per-image lengths, one case each")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--tag", default="", type=output_tag, help="suffix of the output name (e.g. 2threads), beside the main run")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    argv_used = ["python", f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]
    report: dict[str, Any] = {"environment": environment(device, argv_used), "heads": HEADS, "head_dim": DIM,
                              "batch": args.batch, "dtype": args.dtype, "rounds": args.rounds, "cases": []}
    g = torch.Generator().manual_seed(0)
    for case in args.lengths.split(","):
        lo, hi = (int(x) for x in case.split("-"))
        lengths = torch.randint(lo, hi + 1, (args.batch,), generator=g).tolist()
        t = sum(lengths)
        q, k, v = (torch.randn(t, HEADS, DIM, generator=g).to(device, dtype) for _ in range(3))
        fns = kernels(q, k, v, lengths, device)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
        # the floor's images are equally long, so it does less score work than the ragged ones
        ragged_work = sum(n * n for n in lengths) / (args.batch * (t // args.batch) ** 2)
        report["cases"].append({"lengths": case, "tokens": t, "ragged_over_equal_work": ragged_work,
                                "ms_min": {n: 1e3 * min(v) for n, v in times.items()}})
    lines = [f"# Per-image attention kernels ({args.dtype}, {report['environment']['device']})", "",
             f"- date: {report['environment']['date']}; git: {report['environment']['git']}",
             f"- versions: {report['environment']['versions']}",
             f"- command: `{report['environment']['command']}`",
             f"- {args.batch} images, {HEADS} heads x {DIM}, per-image lengths uniform in the range (seed 0); "
             f"minimum of {args.rounds} interleaved rounds, ms per call", ""]
    for c in report["cases"]:
        lines += [f"## lengths {c['lengths']} ({c['tokens']} tokens)", "",
                  f"Score work (sum of squared lengths) of the ragged images: {c['ragged_over_equal_work']:.2f}x "
                  "the equal-length floor's.", "",
                  markdown_table(["kernel", "ms (min)"], [[n, f"{ms:.1f}"] for n, ms in c["ms_min"].items()]), ""]
    usual = "bf16" if device.type == "cuda" else "fp32"  # the dtype the committed files of this device ran in
    name = (f"packed_attention_kernels_{device.type}" + ("" if args.dtype == usual else f"_{args.dtype}")
            + (f"_{args.tag}" if args.tag else ""))
    write_json_and_markdown(report, Path(args.out_dir) / name, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

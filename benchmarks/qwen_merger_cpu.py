"""Qwen2.5-VL: prune whole 2x2 merge groups before the merger (inside the vision tower)
or after it? The same visual tokens reach the language model either way, so the
language model's prefill is identical; what differs is the tower. This measures the
tower with Qwen2.5-VL-7B's vision geometry (random weights: 32 blocks, 14 px patches,
windows of 112 px, full attention in blocks 7/15/23/31) on one 448x448 image (1024
patches, 256 merged tokens), its width divided by ``--width-div`` (default 4: 320
wide, 4 heads of 80, MLP 855) so that a shared 2-core CPU runs it in seconds (the
7B tower's 1.3 TFLOPs per image would take minutes a round here):

- ``none``: the unpruned tower (= the tower cost of pruning *after* the merger, whose
  selection runs on the 256 merged tokens and costs no matmul);
- ``before``: saint's ``vit`` mode, ``vit_ratio`` of the merge groups kept after block
  ``vit_layer`` (blocks after it, and the merger, run on the kept groups).

FLOPs come from ``torch.utils.flop_counter`` (saint.measure.flops) on the real forward;
the language-model prefill FLOPs at Qwen2.5-VL-7B's LLM shapes (28 layers, width 3584,
GQA 28/4 heads, MLP 18944) come from the adapter's ``block_flops`` for a prompt of
``--text`` text tokens plus the kept visual tokens. Times: ``--repeats`` rounds after
one warm-up, minimum and spread. Writes ``benchmarks/results/qwen_merger_cpu.{md,json}``.

    python benchmarks/qwen_merger_cpu.py                       # the committed results (~3 min, 2 threads)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from saint.adapters import qwen_vl
from saint.measure.report import environment, write_json_and_markdown
from saint.measure.tower import tower_cells, tower_markdown, tower_row

RESULTS = Path(__file__).resolve().parent / "results"
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                 spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                 out_hidden_size=3584, in_channels=3)
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=int, default=448, help="square image side in pixels (default 448)")
    p.add_argument("--vit-layer", type=int, default=16)
    p.add_argument("--ratios", default="0.5,0.25", help="kept fractions of the merge groups (default 0.5,0.25)")
    p.add_argument("--text", type=int, default=64, help="text tokens of the prompt (default 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width-div", type=int, default=4, help="divide the tower's width, heads and MLP by this")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.image < 28 or args.image % 28:
        p.error(f"--image {args.image}: give a multiple of 28 (Qwen2.5-VL's 14px patches merged 2x2)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    cfg = Qwen2_5_VLConfig(vision_config=VISION_7B, text_config=TEXT_7B, attn_implementation="sdpa")
    d = args.width_div
    vision = dict(VISION_7B, hidden_size=1280 // d, intermediate_size=3420 // d, num_heads=16 // d)
    small = Qwen2_5_VLConfig(vision_config=vision, text_config=TEXT_7B, attn_implementation="sdpa")
    torch.manual_seed(0)
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(small.vision_config).eval()
    with torch.device("meta"):
        full = Qwen2_5_VLForConditionalGeneration(cfg)  # shapes only, for the LLM's FLOPs
    side = args.image // 14
    grid = torch.tensor([[1, side, side]])
    pixels = torch.randn(side * side, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    merged = side * side // 4

    def llm_prefill(visual: int) -> float:
        n = args.text + visual
        return sum(qwen_vl.ADAPTER.block_flops(full, n, n) for _ in range(TEXT_7B["num_hidden_layers"]))

    def run_tower() -> torch.Tensor:
        with torch.no_grad():
            return tower(pixels, grid_thw=grid).pooler_output

    rows = []
    for name, ratio in [("none", 1.0), *[("before", float(r)) for r in args.ratios.split(",")]]:
        pruner = None
        if name == "before":
            pruner = qwen_vl.TowerPruner(tower, args.vit_layer, ratio, 16)
            pruner.install()
        try:
            measured = tower_row(run_tower, args.repeats)
            kept = merged if pruner is None else int(pruner.keep_raster.sum())
        finally:
            if pruner is not None:
                pruner.remove()
        rows.append(dict(variant=name, ratio=ratio, visual_tokens=kept, llm_prefill_gflops=llm_prefill(kept) / 1e9,
                         **measured))
        print(rows[-1])
    base = rows[0]
    import transformers

    report = dict(environment("cpu", ["python", f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]), settings=vars(args), vision=vision, text=TEXT_7B, rows=rows)
    report["versions"]["transformers"] = transformers.__version__
    prefix = Path(args.out_dir) / "qwen_merger_cpu"
    table = []
    for r in rows:
        after = r["variant"] == "none"
        table.append([
            "none / after the merger" if after else f"before the merger (block {args.vit_layer}, keep {r['ratio']:g})",
            str(r["visual_tokens"]), *tower_cells(r, base), f"{r['llm_prefill_gflops']:.0f}",
        ])
    md = tower_markdown(
        "Qwen2.5-VL: pruning before vs after the 2x2 merger (vision tower cost)", report,
        f"Qwen2.5-VL-7B vision geometry at 1/{d} width (random weights), one {args.image}x{args.image} image "
        f"({side * side} patches, {merged} merged tokens). Pruning after the merger costs the unpruned tower "
        "and sends the language model the same number of tokens as pruning before it at the same ratio; "
        f"LLM prefill: Qwen2.5-VL-7B shapes, {args.text} text tokens + the visual tokens (analytic, per prompt). "
        f"Time: min over {args.repeats} rounds (+ spread).", table)
    write_json_and_markdown(report, prefix, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""InternVL: what SAINT's ``vit`` mode saves in the vision tower. The tower is
InternViT-300M's geometry (InternVL3-1B/2B/8B: 24 layers, 14 px patches, 448 px tiles of
1024 patches + a class token; random weights), its width divided by ``--width-div``
(default 4: 256 wide, 4 heads, MLP 1024) so that a shared 2-core CPU runs it in seconds;
``--tiles`` tiles per call (default 7: a 2x3 crop grid and its thumbnail, one image).

- ``none``: the unpruned tower (every tile hands the language model 256 tokens);
- ``vit``: saint's ``vit`` mode (:class:`saint.adapters.internvl_tower.TilePruner`), each
  tile keeping ``ratio`` of its 2x2 patch groups after layer ``--vit-layer`` (the later
  layers run on the kept patches; each tile hands the language model ``ratio x 256``).

FLOPs come from ``torch.utils.flop_counter`` (saint.measure.flops) on the real forward;
the language model's prefill FLOPs at InternVL3-8B's shapes (Qwen2.5-7B: 28 layers, width
3584, GQA 28/4 heads, MLP 18944) come from the adapter's ``block_flops`` for ``--text``
text tokens plus the visual tokens. Times: ``--repeats`` rounds after one warm-up,
minimum and spread. Writes ``benchmarks/results/internvl_tower_cpu.{md,json}``.

    python benchmarks/internvl_tower_cpu.py                     # the committed results (~2 min, 2 threads)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from saint.adapters import internvl
from saint.measure.report import environment, markdown_table, write_json
from saint.measure.tower import tower_cells, tower_row

RESULTS = Path(__file__).resolve().parent / "results"
VISION_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=[448, 448], patch_size=[14, 14], layer_scale_init_value=0.1, norm_type="layer_norm",
                   use_mean_pooling=False)
TEXT_8B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=151674)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", type=int, default=7, help="448 px tiles per call (default 7)")
    p.add_argument("--vit-layer", type=int, default=12)
    p.add_argument("--ratios", default="0.5,0.25", help="kept fractions of each tile's 2x2 groups (default 0.5,0.25)")
    p.add_argument("--text", type=int, default=64, help="text tokens of the prompt (default 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width-div", type=int, default=4, help="divide the tower's width, heads and MLP by this")
    p.add_argument("--out-dir", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    d = args.width_div
    vision = dict(VISION_300M, hidden_size=1024 // d, intermediate_size=4096 // d, num_attention_heads=16 // d)
    cfg = transformers.InternVLConfig(vision_config=VISION_300M, text_config=transformers.Qwen2Config(**TEXT_8B))
    with torch.device("meta"):
        full = transformers.InternVLForConditionalGeneration(cfg)  # shapes only, for the LLM's FLOPs
    torch.manual_seed(0)
    tower = transformers.InternVLVisionModel(transformers.InternVLVisionConfig(**vision, attn_implementation="sdpa"))
    tower = tower.eval()
    pixels = torch.randn(args.tiles, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    per_tile = internvl.tile_tokens(full.model)

    def llm_prefill(visual: int) -> float:
        n = args.text + visual
        return sum(internvl.ADAPTER.block_flops(full, n, n) for _ in range(TEXT_8B["num_hidden_layers"]))

    def run_tower() -> torch.Tensor:
        with torch.no_grad():
            return tower(pixel_values=pixels).last_hidden_state

    rows = []
    for name, ratio in [("none", 1.0), *[("vit", float(r)) for r in args.ratios.split(",")]]:
        pruner = None
        if name == "vit":
            pruner = internvl.TilePruner(tower, args.vit_layer, ratio, 16)
            pruner.install()
        try:
            measured = tower_row(run_tower, args.repeats)
            kept = per_tile * args.tiles if pruner is None else int(pruner.keep.sum())
        finally:
            if pruner is not None:
                pruner.remove()
        rows.append(dict(variant=name, ratio=ratio, visual_tokens=kept, llm_prefill_gflops=llm_prefill(kept) / 1e9,
                         **measured))
        print(rows[-1])
    base = rows[0]
    report = dict(environment("cpu"), settings=vars(args), vision=vision, text=TEXT_8B, rows=rows)
    report["versions"]["transformers"] = transformers.__version__
    prefix = Path(args.out_dir) / "internvl_tower_cpu"
    write_json(report, prefix.with_suffix(".json"))
    table = [[
        "unpruned" if r["variant"] == "none" else f"vit (layer {args.vit_layer}, keep {r['ratio']:g})",
        str(r["visual_tokens"]), *tower_cells(r, base), f"{r['llm_prefill_gflops']:.0f}",
    ] for r in rows]
    md = [
        "# InternVL: what SAINT's vit mode saves in the vision tower",
        "",
        f"{report['date']}, {report['cpu']}, {report['torch_threads']} threads, torch {report['versions'].get('torch')}, "
        f"transformers {report['versions'].get('transformers')}, git {report['git'].get('commit', '')[:10]}",
        f"Command: `{report['command']}`",
        "",
        f"InternViT-300M geometry at 1/{d} width (random weights), {args.tiles} tiles of 448x448 "
        f"(1024 patches + class token each, {per_tile} tokens per tile after the pixel shuffle). "
        f"LLM prefill: InternVL3-8B's language model shapes, {args.text} text tokens + the visual tokens "
        f"(analytic, per prompt). Time: min over {args.repeats} rounds (+ spread).",
        "",
        markdown_table(["tower", "visual tokens", "tower GFLOPs", "tower FLOPs saved", "tower ms", "tower speed-up",
                        "LLM prefill GFLOPs"], table),
        "",
    ]
    prefix.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

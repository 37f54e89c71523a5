"""InternVL, Gemma 3, Aya Vision and LFM2-VL: what SAINT's ``vit`` mode saves in the vision tower (random
weights, the real geometry with its width divided by ``--width-div``, default 4, so that
a shared 2-core CPU runs it in a minute or two).

- ``--family internvl``: InternViT-300M (InternVL3-1B/2B/8B: 24 layers, 14 px patches,
  448 px tiles of 1024 patches + a class token), ``--units`` tiles per call (default 7:
  a 2x3 crop grid and its thumbnail, one image); the pixel shuffle folds 2x2 groups, 256
  tokens per tile. Language model: InternVL3-8B's (Qwen2.5-7B: 28 layers, width 3584,
  GQA 28/4 heads, MLP 18944).
- ``--family gemma3``: Gemma 3's SigLIP-So400m (27 layers, 14 px patches, 896 px images
  of 4096 patches), ``--units`` images (default 1); the projector average-pools 4x4
  groups, 256 tokens per image. Language model: Gemma 3 4B's (34 layers, width 2560,
  8/4 heads of 256, MLP 10240).
- ``--family aya_vision``: Aya Vision 8B's SigLIP-So400m (27 layers, 14 px patches, 364 px
  tiles of 676 patches), ``--units`` tiles (default 7: six tiles and the thumbnail); the pixel
  shuffle folds 2x2 groups, 169 tokens per tile. Language model: Aya Vision 8B's (Command R7B,
  Cohere 2: 32 layers, width 4096, GQA 32/8 heads, MLP 14336).

- ``--family lfm2_vl``: LFM2-VL's NaFlex SigLIP 2 So400m (27 layers, 16 px patches, tiles
  at their own sizes up to 512 px, 1024 patches), ``--units`` tiles (default 5: four 512 px
  tiles and a 384x512 thumbnail, one large image); the pixel unshuffle folds 2x2 groups, 256
  tokens per full tile. Language model: LFM2-1.2B's (LFM2-VL-1.6B; 16 layers, 10 of them
  short convolutions, whose FLOPs the analytic count does not model: the LLM column is
  left out).

Variants: ``none``, the unpruned tower; ``vit``, saint's ``vit`` mode
(:class:`saint.adapters.group_tower.GroupPruner`), each unit keeping ``ratio`` of its
groups after layer ``--vit-layer`` (the later layers run on the kept patches; each unit
hands the language model ``ratio x 256`` tokens).

FLOPs come from ``torch.utils.flop_counter`` (saint.measure.flops) on the real forward;
the language model's prefill FLOPs come from the adapter's ``block_flops`` for ``--text``
text tokens plus the visual tokens. Times: ``--repeats`` rounds after one warm-up,
minimum and spread. Writes ``benchmarks/results/<family>_tower_cpu.{md,json}``.

    python benchmarks/pooled_tower_cpu.py --family internvl      # the committed results (~2 min, 2 threads)
    python benchmarks/pooled_tower_cpu.py --family gemma3        # (~2 min)
    python benchmarks/pooled_tower_cpu.py --family aya_vision    # (~2 min)
    python benchmarks/pooled_tower_cpu.py --family lfm2_vl       # (~2 min)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from saint.adapters import pooled_vlm
from saint.adapters.group_tower import GroupPruner, NaflexGroupPruner
from saint.measure.report import environment, write_json_and_markdown
from saint.measure.tower import tower_cells, tower_markdown, tower_row

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = {
    "internvl": dict(
        title="InternVL", tower="InternViT-300M", units="tiles", size=448, vit_layer=12, default_units=7,
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=[448, 448], patch_size=[14, 14], layer_scale_init_value=0.1, norm_type="layer_norm",
                    use_mean_pooling=False),
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=151674),
        text_model="InternVL3-8B", shape="1024 patches + class token each, 2x2 groups"),
    "gemma3": dict(
        title="Gemma 3", tower="SigLIP-So400m (Gemma 3's)", units="images", size=896, vit_layer=13, default_units=1,
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14, vision_use_head=False),
        text=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, vocab_size=262208, query_pre_attn_scalar=256,
                  sliding_window=1024),
        text_model="Gemma 3 4B", shape="4096 patches each, 4x4 groups"),
    "aya_vision": dict(
        title="Aya Vision", tower="SigLIP-So400m (Aya Vision 8B's)", units="tiles", size=364, vit_layer=13,
        default_units=7,
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=364, patch_size=14, vision_use_head=False),
        text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=256000, sliding_window=4096),
        text_model="Aya Vision 8B", shape="676 patches each, 2x2 groups"),
    "lfm2_vl": dict(
        title="LFM2-VL", tower="NaFlex SigLIP 2 So400m (LFM2-VL-1.6B's)", units="tiles", size=512, vit_layer=13,
        default_units=5,
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    patch_size=16, num_patches=1024, vision_use_head=False),
        text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=65536),
        text_model="LFM2-1.2B", shape="up to 1024 patches each (the last tile 24x32), 2x2 groups"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="internvl")
    p.add_argument("--units", type=int, default=None,
                   help="tiles (InternVL, Aya Vision: default 7; LFM2-VL: 5) or images (Gemma 3, default 1)")
    p.add_argument("--vit-layer", type=int, default=None,
                   help="default: 12 (InternVL), 13 (Gemma 3, Aya Vision, LFM2-VL)")
    p.add_argument("--ratios", default="0.5,0.25", help="kept fractions of each unit's groups (default 0.5,0.25)")
    p.add_argument("--text", type=int, default=64, help="text tokens of the prompt (default 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width-div", type=int, default=4, help="divide the tower's width, heads and MLP by this")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    spec = FAMILIES[args.family]
    args.units = spec["default_units"] if args.units is None else args.units
    args.vit_layer = spec["vit_layer"] if args.vit_layer is None else args.vit_layer
    return args


def build(family: str, width_div: int) -> tuple[torch.nn.Module, torch.nn.Module, dict, pooled_vlm.Family]:
    """The full model on the meta device (shapes, for the language model's FLOPs), the
    narrowed tower with random weights, its settings and the adapter family."""
    import transformers

    spec = FAMILIES[family]
    full_vision, d = spec["vision"], width_div
    vision = dict(full_vision, hidden_size=full_vision["hidden_size"] // d,
                  intermediate_size=full_vision["intermediate_size"] // d,
                  num_attention_heads=full_vision["num_attention_heads"] // d)
    if family == "internvl":
        cfg = transformers.InternVLConfig(vision_config=full_vision, text_config=transformers.Qwen2Config(**spec["text"]))
        with torch.device("meta"):
            full = transformers.InternVLForConditionalGeneration(cfg)
        torch.manual_seed(0)
        tower = transformers.InternVLVisionModel(transformers.InternVLVisionConfig(**vision, attn_implementation="sdpa"))
        return full, tower.eval(), vision, pooled_vlm.INTERNVL
    if family == "lfm2_vl":
        cfg = transformers.Lfm2VlConfig(vision_config=transformers.Siglip2VisionConfig(**full_vision),
                                        text_config=transformers.Lfm2Config(**spec["text"]), downsample_factor=2)
        with torch.device("meta"):
            full = transformers.Lfm2VlForConditionalGeneration(cfg)
        torch.manual_seed(0)
        tower = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**vision, attn_implementation="sdpa"))
        return full, tower.eval(), vision, pooled_vlm.LFM2_VL
    if family == "gemma3":
        cfg = transformers.Gemma3Config(vision_config=full_vision,
                                        text_config=transformers.Gemma3TextConfig(**spec["text"]), mm_tokens_per_image=256)
        with torch.device("meta"):
            full = transformers.Gemma3ForConditionalGeneration(cfg)
        adapter_family = pooled_vlm.GEMMA3
    else:
        cfg = transformers.AyaVisionConfig(vision_config=transformers.SiglipVisionConfig(**full_vision),
                                           text_config=transformers.Cohere2Config(**spec["text"]), downsample_factor=2)
        with torch.device("meta"):
            full = transformers.AyaVisionForConditionalGeneration(cfg)
        adapter_family = pooled_vlm.AYA_VISION
    torch.manual_seed(0)
    tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision, attn_implementation="sdpa"))
    return full, tower.eval(), vision, adapter_family


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    spec = FAMILIES[args.family]
    full, tower, vision, family = build(args.family, args.width_div)
    adapter = pooled_vlm.PooledVlm(family)
    layout = family.layout
    size = spec["size"]
    group = family.unit(full.model)[1]
    if family.naflex:  # NaFlex tiles: patches in raster order, padded to the tower's count, each with its grid
        side, patch = size // vision["patch_size"], vision["patch_size"]
        grids = [[side, side]] * (args.units - 1) + [[side * 3 // 4, side]]
        inputs = dict(pixel_values=torch.zeros(args.units, side * side, 3 * patch * patch),
                      pixel_attention_mask=torch.zeros(args.units, side * side, dtype=torch.long),
                      spatial_shapes=torch.tensor(grids))
        for i, (h, w) in enumerate(grids):
            gen = torch.Generator().manual_seed(i)
            inputs["pixel_values"][i, : h * w] = torch.randn(h * w, 3 * patch * patch, generator=gen)
            inputs["pixel_attention_mask"][i, : h * w] = 1
        unpruned = sum(h // group * (w // group) for h, w in grids)
    else:
        inputs = dict(pixel_values=torch.randn(args.units, 3, size, size, generator=torch.Generator().manual_seed(0)))
        unpruned = family.unit_tokens(full.model) * args.units
    per_unit = unpruned // args.units

    def llm_prefill(visual: int) -> float | None:
        if family.naflex:  # LFM2's short-convolution layers: not what block_flops counts
            return None
        n = args.text + visual
        return sum(adapter.block_flops(full, n, n) for _ in range(spec["text"]["num_hidden_layers"]))

    def run_tower() -> torch.Tensor:
        with torch.no_grad():
            return tower(**inputs).last_hidden_state

    rows = []
    for name, ratio in [("none", 1.0), *[("vit", float(r)) for r in args.ratios.split(",")]]:
        pruner = None
        if name == "vit":
            pruner = (NaflexGroupPruner if family.naflex else GroupPruner)(tower, layout, group, args.vit_layer, ratio, 16)
            pruner.install()
        try:
            measured = tower_row(run_tower, args.repeats)
            kept = unpruned if pruner is None else int(sum(k.sum() for k in pruner.keep))
        finally:
            if pruner is not None:
                pruner.remove()
        prefill = llm_prefill(kept)
        rows.append(dict(variant=name, ratio=ratio, visual_tokens=kept,
                         llm_prefill_gflops=None if prefill is None else prefill / 1e9, **measured))
        print(rows[-1])
    base = rows[0]
    report = dict(environment("cpu", ["python", f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]), settings=vars(args), vision=vision, text=spec["text"], rows=rows)
    report["versions"]["transformers"] = transformers.__version__
    prefix = Path(args.out_dir) / f"{args.family}_tower_cpu"
    table = [[
        "unpruned" if r["variant"] == "none" else f"vit (layer {args.vit_layer}, keep {r['ratio']:g})",
        str(r["visual_tokens"]), *tower_cells(r, base),
        "n/a" if r["llm_prefill_gflops"] is None else f"{r['llm_prefill_gflops']:.0f}",
    ] for r in rows]
    md = tower_markdown(
        f"{spec['title']}: what SAINT's vit mode saves in the vision tower", report,
        f"{spec['tower']} geometry at 1/{args.width_div} width (random weights), {args.units} {spec['units']} of "
        f"{size}x{size} ({spec['shape']}, {per_unit} tokens per unit after the projector's {group}x{group} fold"
        f"{' on average' if family.naflex else ''}). "
        + (f"LLM prefill: not counted ({spec['text_model']}'s short-convolution layers). " if family.naflex else
           f"LLM prefill: {spec['text_model']}'s language model shapes, {args.text} text tokens + the visual tokens "
           "(analytic, per prompt). ")
        + f"Time: min over {args.repeats} rounds (+ spread).", table)
    write_json_and_markdown(report, prefix, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

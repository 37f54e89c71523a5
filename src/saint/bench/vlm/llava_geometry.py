"""LLaVA-1.5 geometries: CLIP ViT-L/14-336 (576 patches, features from layer -2 without
the class token, 2-layer MLP projector) and a Llama language model, at LLaVA-1.5-7B's
shapes (``full``), scaled alike (``scaled``), with a CPU-sized Llama (``cpu``) or tiny."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from ...measure.flops import count_flops
from .geometry import HALF_QUARTER, Geometry, scale_geometry

_META = torch.device("meta")

# CLIP ViT-L/14-336 as in LLaVA-1.5 (openai/clip-vit-large-patch14-336).
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)


def pool_grid(budget: int, grid: int) -> tuple[int, int]:
    """The most square ``(rows, cols)``, ``rows >= cols``, with ``rows * cols == budget``
    inside a ``grid x grid`` patch grid."""
    best = None
    for cols in range(1, math.isqrt(budget) + 1):
        if budget % cols == 0 and budget // cols <= grid:
            best = (budget // cols, cols)
    if best is None:
        raise ValueError(f"pool cannot keep exactly {budget} tokens of a {grid}x{grid} grid "
                         f"(no rows x cols = {budget} with both <= {grid}); choose another budget or drop pool")
    return best


def _frozen(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(d.items()))


@dataclass(frozen=True)
class LlavaGeometry(Geometry):
    """A ``LlavaForConditionalGeneration``: CLIP vision config keywords in ``vision``,
    Llama config keywords in ``text``."""

    family = "llava"
    label = "LLaVA-1.5"
    heads_key = "num_attention_heads"
    depth_key = "num_hidden_layers"

    @property
    def grid(self) -> int:
        return self.vision["image_size"] // self.vision["patch_size"]

    @property
    def image_tokens(self) -> int:
        """Image tokens per image the processor emits (``default`` strategy: no class token)."""
        return self.grid**2

    @property
    def tower_tokens(self) -> int:
        return self.grid**2 + 1  # the class token

    def shapes(self) -> str:
        v, t = self.vision, self.text
        return (f"CLIP {v['hidden_size']} x {v['num_hidden_layers']} layers (MLP {v['intermediate_size']}), "
                f"{self.image_tokens} patches; Llama {t['hidden_size']} x {t['num_hidden_layers']} layers "
                f"(MLP {t['intermediate_size']}, {t['num_attention_heads']} heads)")

    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              seed: int = 0) -> torch.nn.Module:
        import transformers

        vision = transformers.CLIPVisionConfig(**self.vision)
        text = transformers.LlamaConfig(**self.text, pad_token_id=0)
        cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=self.image_token_id,
                                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                                       attn_implementation="sdpa")
        torch.manual_seed(seed)
        with torch.device(device):
            model = transformers.LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
        return model.eval()

    def image_run(self) -> list[int]:
        return [self.image_token_id] * self.image_tokens

    @property
    def text_id_limit(self) -> int:
        return self.image_token_id

    @property
    def suppressed_ids(self) -> list[int]:
        return [self.image_token_id]

    def media(self, input_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        size = self.vision["image_size"]
        return {"pixel_values": torch.randn(input_ids.shape[0], 3, size, size, generator=generator)}

    def decode_positions(self, length: int, step: int, batch: int) -> torch.Tensor:
        return torch.full((batch, 1), length + step, dtype=torch.long)

    def tower_keep(self, keep: int, vit_layer: int) -> dict[str, Any]:
        return dict(vit_keep=keep, vit_layer=vit_layer)

    def random_keep(self, budget: int) -> dict[str, Any]:
        return dict(method="random", visual_keep=budget, seed=0)

    def pool_keep(self, budget: int) -> dict[str, Any]:
        return dict(method="pool", visual_keep=pool_grid(budget, self.grid))

    def projected(self, tower_last: float) -> float:
        return tower_last - 1  # the class token is not projected ("default" strategy)

    def part_flops(self, part: str, n: int, layer: int = 0) -> int:
        return _part_flops(_frozen(self.vision), _frozen(self.text), part, n)

    def scaled_parts(self, vision: dict[str, Any], text: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        width = vision["hidden_size"] / self.vision["hidden_size"]
        return dict(vision, projection_dim=max(1, round(self.vision["projection_dim"] * width))), text


@cache
def _modules(vision: tuple[tuple[str, Any], ...], text: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """One tower layer, the patch embedding, the projector, one decoder layer, its rotary
    embedding and the LM head of the geometry, on the meta device."""
    import transformers
    from transformers.models.clip import modeling_clip
    from transformers.models.llama import modeling_llama
    from transformers.models.llava import modeling_llava

    vcfg = transformers.CLIPVisionConfig(**dict(vision))
    tcfg = transformers.LlamaConfig(**dict(text))
    for c in (vcfg, tcfg):
        c._attn_implementation = "sdpa"
    cfg = transformers.LlavaConfig(vision_config=vcfg, text_config=tcfg)
    with _META:
        return {
            "embed": modeling_clip.CLIPVisionEmbeddings(vcfg),
            "tower_layer": modeling_clip.CLIPEncoderLayer(vcfg),
            "projector": modeling_llava.LlavaMultiModalProjector(cfg),
            "decoder_layer": modeling_llama.LlamaDecoderLayer(tcfg, 0),
            "rotary": modeling_llama.LlamaRotaryEmbedding(tcfg),
            "head": torch.nn.Linear(tcfg.hidden_size, tcfg.vocab_size, bias=False),
        }


@cache
def _part_flops(vision: tuple[tuple[str, Any], ...], text: tuple[tuple[str, Any], ...], part: str, n: int) -> int:
    m = _modules(vision, text)
    v, t = dict(vision), dict(text)
    if part == "embed":
        x = torch.empty(1, 3, v["image_size"], v["image_size"], device=_META)
        return count_flops(lambda: m["embed"](x))[0]
    if part == "tower_layer":
        x = torch.empty(1, n, v["hidden_size"], device=_META)
        return count_flops(lambda: m["tower_layer"](x, None))[0]
    if part == "projector":
        x = torch.empty(1, n, v["hidden_size"], device=_META)
        return count_flops(lambda: m["projector"](x))[0]
    if part == "decoder_layer":
        x = torch.empty(1, n, t["hidden_size"], device=_META)
        pos = torch.arange(n, device=_META)[None]
        pe = m["rotary"](x, pos)
        return count_flops(lambda: m["decoder_layer"](x, attention_mask=None, position_embeddings=pe,
                                                      position_ids=pos))[0]
    if part == "head":
        return count_flops(lambda: m["head"](torch.empty(1, n, t["hidden_size"], device=_META)))[0]
    raise ValueError(f"unknown part {part!r}")


LLAVA_FULL = LlavaGeometry(
    "full",
    "LLaVA-1.5-7B geometry (CLIP ViT-L/14-336 + Vicuna-7B: hidden 4096, 32 layers, 32 heads, MLP 11008, "
    "vocab 32064); random weights",
    CLIP_L_336,
    dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096),
    image_token_id=32000,
    llm_layers=(7, 16),  # the reference LLaVA-1.5-7B setting
    vit_layer=19,
    fastv_layer=2,
)

GEOMETRIES: dict[str, Geometry] = {
    "cpu": LlavaGeometry(
        "cpu",
        "LLaVA-1.5 vision side (CLIP ViT-L/14-336, 576 patches, 2-layer MLP projector, feature layer -2) + "
        "Llama scaled for a CPU: hidden 1024, 8 layers, 16 heads, MLP 2816, vocab 32064; random weights",
        CLIP_L_336,
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096),
        image_token_id=32000,
        # the reference prunes after layers 7..16 of 32; here from ~1/4 of the depth, over 4
        # layers so 576 -> 64 is reachable (each step removes at most half: 576 / 2**3 > 64)
        llm_layers=(2, 5),
        vit_layer=19,
        fastv_layer=2,
        reference=LLAVA_FULL,
    ),
    "full": LLAVA_FULL,
    # LLaVA-1.5-7B at a quarter of its width and depth; 4 tower layers instead of 6 keep the
    # tower:LLM prefill FLOPs ratio within 3% of the 7B's (6 layers would be 34% above it:
    # the projector has no depth and attention scores shrink only linearly with width).
    "scaled": scale_geometry(LLAVA_FULL, "scaled", width=0.25, depth=0.25, tower_layers=4,
                             budget_fractions=HALF_QUARTER),
    "tiny": LlavaGeometry(
        "tiny",
        "tiny test LLaVA (CLIP 4 layers, 48 px / patch 4 = 144 patches; Llama hidden 64, 6 layers); random weights",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=48,
             patch_size=4, projection_dim=32),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=256, max_position_embeddings=1024),
        image_token_id=255,
        llm_layers=(1, 4),
        vit_layer=1,
        fastv_layer=2,
    ),
}

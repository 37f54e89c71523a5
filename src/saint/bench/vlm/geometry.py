"""LLaVA-1.5's vision side with a Llama scaled by :data:`GEOMETRIES`: the model ``saint vlm-bench`` measures."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

METHODS = ("vit", "llm", "hybrid", "fastv", "random", "pool")
REFERENCE_PATCHES = 576  # LLaVA-1.5: CLIP ViT-L/14 at 336 px
REFERENCE_HYBRID_VIT_KEEP = 375  # the reference hybrid setting (576 -> 375 in the tower)
REFERENCE_BUDGETS = (192, 128, 64)
LLM_K, LLM_GAMMA, REFERENCE_TAU = 5, 10.0, 0.83

# CLIP ViT-L/14-336 as in LLaVA-1.5 (openai/clip-vit-large-patch14-336).
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)


@dataclass(frozen=True)
class Geometry:
    """Shapes of a random-weight LLaVA and the layer choices that go with them."""

    name: str
    description: str
    vision: dict[str, int]
    text: dict[str, int]
    image_token_id: int
    llm_layers: tuple[int, int]  # SAINT's LLM pruning layers (inclusive)
    vit_layer: int  # tower layer of the fixed-budget drop (vit / hybrid)
    fastv_layer: int  # FastV's K
    reference: str | None = None  # the geometry this one is scaled from (analytic speed-ups are given at it)

    @property
    def grid(self) -> int:
        return self.vision["image_size"] // self.vision["patch_size"]

    @property
    def n_patches(self) -> int:
        """Image tokens per image that the processor emits (``default`` strategy: no CLS)."""
        return self.grid**2

    @property
    def hybrid_vit_keep(self) -> int:
        """The reference's 375 of 576 patches, scaled to this tower."""
        return round(REFERENCE_HYBRID_VIT_KEEP * self.n_patches / REFERENCE_PATCHES)

    def default_budgets(self) -> list[int]:
        """192, 128, 64 of 576, scaled to this tower."""
        return [round(b * self.n_patches / REFERENCE_PATCHES) for b in REFERENCE_BUDGETS]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_patches"] = self.n_patches
        return d


GEOMETRIES: dict[str, Geometry] = {
    "cpu": Geometry(
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
        reference="full",
    ),
    "full": Geometry(
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
    ),
    "tiny": Geometry(
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


def _scaled_layer(index: int, depth: int, ref_depth: int) -> int:
    return round(index * depth / ref_depth)


def scale_geometry(base: Geometry, name: str, *, width: float, depth: float,
                   tower_layers: int | None = None) -> Geometry:
    """``base`` with the tower and the language model scaled by the same factors: hidden
    and MLP sizes by ``width`` (head size kept, so heads scale too), layers by ``depth``.
    Both parts change alike, so their FLOPs ratio stays close to ``base``'s (only the
    attention-score term, quadratic in tokens and linear in width, and the projector,
    which has no depth, move it; ``tower_layers`` overrides the tower's depth to bring the
    ratio back, see :func:`saint.bench.vlm.analytic.tower_llm_ratio`). Patches, vocabulary and the
    prompt layout are kept; layer choices map to the same relative depth."""
    if not (0 < width <= 1 and 0 < depth <= 1):
        raise ValueError(f"width {width} and depth {depth} must be in (0, 1]; they shrink {base.name}")

    def part(cfg: dict[str, int], heads_key: str, extra: tuple[str, ...]) -> dict[str, int]:
        head_dim = cfg["hidden_size"] // cfg[heads_key]
        heads = max(1, round(cfg[heads_key] * width))
        out = dict(cfg, hidden_size=heads * head_dim, num_attention_heads=heads,
                   intermediate_size=max(1, round(cfg["intermediate_size"] * width)),
                   num_hidden_layers=max(2, round(cfg["num_hidden_layers"] * depth)))
        for k in extra:
            out[k] = max(1, round(cfg[k] * width))
        return out

    vision = part(base.vision, "num_attention_heads", ("projection_dim",))
    if tower_layers is not None:
        vision["num_hidden_layers"] = tower_layers
    text = part(base.text, "num_attention_heads", ("num_key_value_heads",))
    tl, vl = text["num_hidden_layers"], vision["num_hidden_layers"]
    bl, bv = base.text["num_hidden_layers"], base.vision["num_hidden_layers"]
    s, e = base.llm_layers
    llm_layers = (_scaled_layer(s, tl, bl), min(tl - 1, _scaled_layer(e, tl, bl)))
    desc = (f"{base.name} scaled by {width:g} in width and {depth:g} in depth, tower and LLM alike: "
            f"CLIP {vision['hidden_size']} x {vl} layers (MLP {vision['intermediate_size']}), "
            f"{base.n_patches} patches; Llama {text['hidden_size']} x {tl} layers (MLP {text['intermediate_size']}, "
            f"{text['num_attention_heads']} heads); random weights")
    return Geometry(name, desc, vision, text, base.image_token_id, llm_layers=llm_layers,
                    # the tower's last layer feeds nothing (features from layer -2): stay before it
                    vit_layer=min(vl - 2, _scaled_layer(base.vit_layer, vl, bv)),
                    fastv_layer=max(1, _scaled_layer(base.fastv_layer, tl, bl)), reference=base.name)


# LLaVA-1.5-7B at a quarter of its width and depth; 4 tower layers instead of 6 keep the
# tower:LLM prefill FLOPs ratio within 3% of the 7B's (6 layers would be 34% above it:
# the projector has no depth and attention scores shrink only linearly with width).
GEOMETRIES["scaled"] = scale_geometry(GEOMETRIES["full"], "scaled", width=0.25, depth=0.25, tower_layers=4)


def build_llava(geometry: Geometry, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> torch.nn.Module:
    """A random-weight ``LlavaForConditionalGeneration`` of ``geometry`` (sdpa attention),
    created directly on ``device`` in ``dtype`` (no fp32 copy of a 7B model on the host)."""
    import transformers

    vision = transformers.CLIPVisionConfig(**geometry.vision)
    text = transformers.LlamaConfig(**geometry.text, pad_token_id=0)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=geometry.image_token_id,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default",
                                   attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model.eval()

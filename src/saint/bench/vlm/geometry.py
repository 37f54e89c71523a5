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

"""Qwen3-VL geometries: the full-attention vision tower with a learned position grid,
deepstack mergers after three of its blocks and the 2x2 patch merger into the language
model's width, and a Qwen3 language model with interleaved M-RoPE, at Qwen3-VL-8B's
shapes (``qwen3_full``), scaled alike (``qwen3_scaled``) or tiny (``qwen3_tiny``).

Qwen3-VL-8B's shapes are those of the released checkpoint (``Qwen/Qwen3-VL-8B-Instruct``,
its ``config.json``; the same numbers appear in the GGUF metadata of Ollama's
``qwen3-vl:8b-instruct`` and in transformers' ``Qwen3VLVisionConfig`` defaults for the
tower): tower 27 blocks of width 1152 (16 heads of 72, GELU MLP 4304), full attention
per image in every block, 16 px patches, 2304 learned position embeddings, deepstack
features after blocks 8, 16 and 24, 2x2 merge into 4096; language model 36 layers of
width 4096 (32 heads of 128, 8 key/value heads), MLP 12288, vocabulary 151936, M-RoPE
sections [24, 20, 20] interleaved, rope theta 5e6, untied LM head. transformers'
``Qwen3VLTextConfig()`` defaults are not the 8B's (MLP 22016, 32 layers, 32 key/value
heads), so every shape is given here explicitly.

Image: one 512 x 512 image per prompt, 32 x 32 = 1024 patches, 16 x 16 = 256 visual
tokens after the merger: the same token counts as the Qwen2.5-VL geometries (448 px at
14 px patches), so the two families compare at equal budgets.

The deepstack mergers run on the output of their block, so a tower drop after a
deepstack block would give that merger the kept tokens; the analytic count assumes the
drop sits elsewhere (checked when the geometry is made)."""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from ...measure.flops import count_flops
from .geometry import HALF_QUARTER, Geometry, scale_geometry, scaled_layer
from .qwen_geometry import QwenGeometry, _part_flops

_META = torch.device("meta")


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's temporal / height / width split of the rotary frequencies (``[24, 20,
    20]`` for head size 128: height and width 5/16 of the half each), for any head size."""
    half = head_dim // 2
    hw = half * 5 // 16
    return [half - 2 * hw, hw, hw]


class Qwen3VLGeometry(QwenGeometry):
    """A ``Qwen3VLForConditionalGeneration``: vision config keywords in ``vision``
    (``deepstack_visual_indexes`` a tuple), text config keywords in ``text`` (with
    ``head_dim``), one square ``image_size`` image per prompt and the special token ids."""

    family = "qwen3_vl"
    label = "Qwen3-VL"
    config_class = "Qwen3VLConfig"
    model_class = "Qwen3VLForConditionalGeneration"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vit_layer in self.vision["deepstack_visual_indexes"]:
            raise ValueError(f"vit_layer {self.vit_layer} is a deepstack block "
                             f"{list(self.vision['deepstack_visual_indexes'])}: pick another block")

    def shapes(self) -> str:
        v, t = self.vision, self.text
        return (f"vision {v['hidden_size']} x {v['depth']} blocks (MLP {v['intermediate_size']}, {v['num_heads']} "
                f"heads, deepstack after {list(v['deepstack_visual_indexes'])}), {self.tower_tokens} patches -> "
                f"{self.image_tokens} tokens; Qwen3 {t['hidden_size']} x {t['num_hidden_layers']} layers "
                f"(MLP {t['intermediate_size']}, {t['num_attention_heads']} heads, {t['num_key_value_heads']} "
                f"key/value heads)")

    # ------------------------------------------------------------ model
    def configs(self) -> tuple[Any, Any]:
        """The transformers vision and text configs (sdpa attention)."""
        import transformers

        vision = transformers.Qwen3VLVisionConfig(**dict(
            self.vision, deepstack_visual_indexes=list(self.vision["deepstack_visual_indexes"]),
            out_hidden_size=self.text["hidden_size"]))
        text = transformers.Qwen3VLTextConfig(**self.text, pad_token_id=0, rope_parameters=dict(
            rope_type="default", rope_theta=5e6, mrope_section=interleaved_mrope_section(self.text["head_dim"]),
            mrope_interleaved=True))
        for c in (vision, text):
            c._attn_implementation = "sdpa"
        return vision, text

    # ------------------------------------------------------------ FLOPs
    def part_flops(self, part: str, n: int, layer: int = 0) -> int:
        """As :meth:`Geometry.part_flops`; a ``tower_layer`` that is a deepstack block
        includes its deepstack merger on the block's ``n`` tokens."""
        deepstack = part == "tower_layer" and layer in self.vision["deepstack_visual_indexes"]
        return _part_flops(self, part, n, deepstack)

    def meta_modules(self) -> dict[str, Any]:
        return _modules(self)

    def tower_layer_flops(self, m: dict[str, Any], x: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor],
                          deepstack: bool) -> int:
        """One tower block (attention over the whole image), plus its deepstack merger."""
        cu = torch.tensor([0, x.shape[0]], dtype=torch.int32)
        block = count_flops(lambda: m["tower_layer"](x, cu_seqlens=cu, position_embeddings=pe))[0]
        return block + (count_flops(lambda: m["deepstack"](x))[0] if deepstack else 0)

    def windows(self, n: int) -> list[int]:
        """Every block attends over the whole image: one window of ``n`` tokens."""
        return [n]

    def scaled_parts(self, vision: dict[str, Any], text: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The deepstack blocks move to the same relative depth (8, 16, 24 of 27; at 7
        blocks: 2, 4, 6); all three stay, as each feeds its own decoder layer."""
        depth, ref = vision["depth"], self.vision["depth"]
        deep = tuple(min(depth - 1, scaled_layer(i, depth, ref)) for i in self.vision["deepstack_visual_indexes"])
        return dict(vision, deepstack_visual_indexes=deep), text


@cache
def _modules(geometry: Qwen3VLGeometry) -> dict[str, Any]:
    """The patch embedding, one tower block, the merger and a deepstack merger, one
    decoder layer, its rotary embedding and the LM head, on the meta device."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl as q

    vcfg, tcfg = geometry.configs()
    with _META:
        return {
            "embed": q.Qwen3VLVisionPatchEmbed(vcfg),
            "tower_layer": q.Qwen3VLVisionBlock(vcfg),
            "projector": q.Qwen3VLVisionPatchMerger(vcfg, use_postshuffle_norm=False),
            "deepstack": q.Qwen3VLVisionPatchMerger(vcfg, use_postshuffle_norm=True),
            "decoder_layer": q.Qwen3VLTextDecoderLayer(tcfg, 0),
            "rotary": q.Qwen3VLTextRotaryEmbedding(tcfg),
            "head": torch.nn.Linear(tcfg.hidden_size, tcfg.vocab_size, bias=False),
        }


QWEN3_FULL = Qwen3VLGeometry(
    "qwen3_full",
    "Qwen3-VL-8B geometry (vision 1152 x 27 blocks, full attention, deepstack after blocks 8/16/24, 2x2 merger; "
    "Qwen3 4096 x 36 layers, 32 heads, 8 key/value heads, MLP 12288, vocab 151936), one 512x512 image = 1024 "
    "patches = 256 visual tokens; random weights",
    dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
         temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24), in_channels=3),
    dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
         num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144),
    image_token_id=151655,
    llm_layers=(7, 16),  # the reference LLaVA-1.5-7B setting, as saint's Qwen-VL examples use it
    vit_layer=13,  # the middle of the tower (block 16, the adapter's default, is a deepstack block here)
    fastv_layer=2,
    budget_fractions=HALF_QUARTER,
    image_size=512,
)

GEOMETRIES: dict[str, Geometry] = {
    "qwen3_full": QWEN3_FULL,
    # Qwen3-VL-8B at a quarter of its width; 6 of 27 tower blocks and 13 of 36 LLM layers keep
    # the tower:LLM prefill FLOPs ratio within 1% of the 8B's. A quarter of both depths (7 and
    # 9) would put it 64% above: every tower block attends over all 1024 patches, a term that
    # shrinks only linearly with width, and the merger and the three deepstack mergers have
    # no depth. The LLM is deepened rather than the tower cut further, so the tower keeps
    # room for a drop before its last deepstack blocks.
    "qwen3_scaled": scale_geometry(QWEN3_FULL, "qwen3_scaled", width=0.25, depth=0.25, tower_layers=6,
                                   text_layers=13),
    "qwen3_tiny": Qwen3VLGeometry(
        "qwen3_tiny",
        "tiny test Qwen3-VL (vision 32 x 4 blocks, deepstack after blocks 0/2; 48 px / patch 4 = 144 patches = "
        "36 tokens; Qwen3 64 x 6 layers, 2 key/value heads); random weights",
        dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
             temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=(0, 2), in_channels=3),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=1024, bos_token_id=1,
             eos_token_id=None),
        image_token_id=120,
        llm_layers=(1, 4),
        vit_layer=1,
        fastv_layer=2,
        budget_fractions=HALF_QUARTER,
        image_size=48,
        video_token_id=121,
        vision_start_token_id=122,
        vision_end_token_id=123,
    ),
}

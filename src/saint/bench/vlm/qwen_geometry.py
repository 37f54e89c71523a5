"""Qwen2.5-VL geometries: the window-attention vision tower (2x2 patch merger into the
language model's width) and a Qwen2 language model with M-RoPE, at Qwen2.5-VL-7B's
shapes (``qwen_full``), scaled alike (``qwen_scaled``) or tiny (``qwen_tiny``).

Qwen2.5-VL-7B's shapes are those of the released checkpoint (``Qwen/Qwen2.5-VL-7B-Instruct``):
tower 32 blocks of width 1280 (16 heads of 80, SwiGLU MLP 3420), windows of 112 px with
full attention in blocks 7, 15, 23, 31, 14 px patches, 2x2 merge into 3584; language
model 28 layers of width 3584 (28 heads of 128, 4 key/value heads), MLP 18944, vocabulary
152064, untied LM head. ``Qwen2_5_VLConfig()``'s defaults in transformers are not these
(its vision width defaults to 3584 and its text config to the 72B's 80 x 8192), so
every shape is given here explicitly.

Image: one 448 x 448 image per prompt, 32 x 32 = 1024 patches, 16 x 16 = 256 visual
tokens after the merger. That is the lower end of the range the Qwen2.5-VL model card
suggests for deployments (``min_pixels = 256 * 28 * 28``, ``max_pixels = 1280 * 28 * 28``:
256 to 1280 visual tokens per image), the resolution saint's merger benchmark uses, and it
keeps a 5-round CPU run within minutes; larger images raise the tower's share (its full-
attention blocks grow with the square of the patches)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from ...measure.flops import count_flops
from .geometry import HALF_QUARTER, Geometry, scale_geometry, scaled_layer

_META = torch.device("meta")


def pool_side(budget: int, grid: int) -> int | None:
    """The window side ``p`` whose pooled grid (``ceil(grid / p)`` per side) has exactly
    ``budget`` tokens, or None."""
    for p in range(1, grid + 1):
        if math.ceil(grid / p) ** 2 == budget:
            return p
    return None


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's temporal / height / width split of the rotary frequencies
    (``[16, 24, 24]`` for head size 128), for any head size."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def _frozen(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(d.items()))


@dataclass(frozen=True)
class QwenGeometry(Geometry):
    """A ``Qwen2_5_VLForConditionalGeneration``: vision config keywords in ``vision``
    (``fullatt_block_indexes`` a tuple), text config keywords in ``text``, one square
    ``image_size`` image per prompt and the special token ids."""

    image_size: int = 448
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    family = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    config_class = "Qwen2_5_VLConfig"  # transformers names: build() makes the model from them
    model_class = "Qwen2_5_VLForConditionalGeneration"
    heads_key = "num_heads"
    depth_key = "depth"

    def __post_init__(self) -> None:
        unit = self.vision["patch_size"] * self.vision["spatial_merge_size"]
        if self.image_size % unit:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch x merge = {unit}")

    @property
    def patch_side(self) -> int:
        return self.image_size // self.vision["patch_size"]

    @property
    def grid(self) -> int:
        return self.patch_side // self.vision["spatial_merge_size"]

    @property
    def image_tokens(self) -> int:
        return self.grid**2

    @property
    def tower_tokens(self) -> int:
        return self.patch_side**2

    def shapes(self) -> str:
        v, t = self.vision, self.text
        return (f"vision {v['hidden_size']} x {v['depth']} blocks (MLP {v['intermediate_size']}, {v['num_heads']} "
                f"heads, full attention in {list(v['fullatt_block_indexes'])}), {self.tower_tokens} patches -> "
                f"{self.image_tokens} tokens; Qwen2 {t['hidden_size']} x {t['num_hidden_layers']} layers "
                f"(MLP {t['intermediate_size']}, {t['num_attention_heads']} heads, {t['num_key_value_heads']} "
                f"key/value heads)")

    # ------------------------------------------------------------ model and prompt
    def configs(self) -> tuple[Any, Any]:
        """The transformers vision and text configs (sdpa attention)."""
        import transformers

        head_dim = self.text["hidden_size"] // self.text["num_attention_heads"]
        vision = transformers.Qwen2_5_VLVisionConfig(**dict(
            self.vision, fullatt_block_indexes=list(self.vision["fullatt_block_indexes"]),
            out_hidden_size=self.text["hidden_size"]))
        text = transformers.Qwen2_5_VLTextConfig(**self.text, pad_token_id=0, rope_parameters=dict(
            rope_type="default", rope_theta=1e6, mrope_section=mrope_section(head_dim)))
        for c in (vision, text):
            c._attn_implementation = "sdpa"
        return vision, text

    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              seed: int = 0) -> torch.nn.Module:
        import transformers

        vision, text = self.configs()
        cfg = getattr(transformers, self.config_class)(
            vision_config=vision, text_config=text, image_token_id=self.image_token_id,
            video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id, tie_word_embeddings=False, attn_implementation="sdpa")
        torch.manual_seed(seed)
        with torch.device(device):
            model = getattr(transformers, self.model_class)._from_config(cfg, dtype=dtype)
        return model.eval()

    def image_run(self) -> list[int]:
        return [self.vision_start_token_id, *[self.image_token_id] * self.image_tokens, self.vision_end_token_id]

    @property
    def text_id_limit(self) -> int:
        return min(self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id)

    @property
    def suppressed_ids(self) -> list[int]:
        return [self.image_token_id, self.video_token_id]

    def media(self, input_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        v, b, side = self.vision, input_ids.shape[0], self.patch_side
        flat = v.get("in_channels", 3) * v["temporal_patch_size"] * v["patch_size"] ** 2
        return {
            "pixel_values": torch.randn(b * side * side, flat, generator=generator),
            "image_grid_thw": torch.tensor([[1, side, side]] * b),
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
        }

    def decode_positions(self, length: int, step: int, batch: int) -> torch.Tensor:
        """M-RoPE: an image's tokens span ``grid`` positions, so text after it (and every
        new token) sits ``image_tokens - grid`` below its index in the sequence."""
        return torch.full((3, batch, 1), length + step + self.grid - self.image_tokens, dtype=torch.long)

    # ------------------------------------------------------------ budgets -> adapter settings
    def _ratio(self, keep: int) -> float:
        ratio = keep / self.image_tokens
        if max(1, round(ratio * self.image_tokens)) != keep:  # pragma: no cover - floating point safety net
            raise RuntimeError(f"ratio {ratio!r} does not keep {keep} of {self.image_tokens}")
        return ratio

    def tower_keep(self, keep: int, vit_layer: int) -> dict[str, Any]:
        return dict(vit_ratio=self._ratio(keep), vit_layer=vit_layer)

    def random_keep(self, budget: int) -> dict[str, Any]:
        return dict(method="random", keep_ratio=self._ratio(budget), seed=0)

    def pool_keep(self, budget: int) -> dict[str, Any]:
        p = pool_side(budget, self.grid)
        if p is None:
            sizes = sorted({math.ceil(self.grid / q) ** 2 for q in range(2, self.grid + 1)}, reverse=True)
            raise ValueError(f"pool cannot keep exactly {budget} of {self.image_tokens} tokens: Qwen-VL's pool averages "
                             f"p x p windows of the {self.grid}x{self.grid} grid, which keeps {sizes[:6]} ...")
        return dict(method="pool", pool_size=p)

    # ------------------------------------------------------------ FLOPs
    def projected(self, tower_last: float) -> float:
        return tower_last / self.vision["spatial_merge_size"] ** 2

    def part_flops(self, part: str, n: int, layer: int = 0) -> int:
        full = layer in self.vision["fullatt_block_indexes"]
        return _part_flops(self, part, n, full and part == "tower_layer")

    def meta_modules(self) -> dict[str, Any]:
        """The modules whose FLOPs are counted (see :func:`_modules`)."""
        return _modules(self)

    def tower_layer_flops(self, m: dict[str, Any], x: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor],
                          full: bool) -> int:
        """One tower block on the tokens ``x``: attention within the windows, or over the
        whole image in a full-attention block."""
        n = x.shape[0]
        sizes = [n] if full else self.windows(n)
        cu = torch.tensor([0, *sizes]).cumsum(0).int()
        return count_flops(lambda: m["tower_layer"](x, cu_seqlens=cu, position_embeddings=pe))[0]

    def windows(self, n: int) -> list[int]:
        """Token counts of the tower's attention windows when ``n`` patches of the image
        remain: the model's own windows for the whole image; after a drop, ``n`` spread
        evenly over the same number of windows (the dropped groups' real spread differs;
        windowed attention is < 1% of the tower's FLOPs at 7B)."""
        from transformers.vision_utils import get_vision_window_index

        v = self.vision
        _, cu = get_vision_window_index(torch.tensor([[1, self.patch_side, self.patch_side]]),
                                        v["spatial_merge_size"], v["window_size"], v["patch_size"])
        sizes = (cu[1:] - cu[:-1]).tolist()
        if n == self.tower_tokens:
            return sizes
        w = min(len(sizes), n)
        return [n // w + (1 if i < n % w else 0) for i in range(w)]

    def scaled_parts(self, vision: dict[str, Any], text: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The full-attention blocks keep their share of the depth, each the last block of
        an equal group as in the 7B (7, 15, 23, 31 of 32; at 8 blocks: 7)."""
        depth, ref = vision["depth"], self.vision["depth"]
        count = max(1, scaled_layer(len(self.vision["fullatt_block_indexes"]), depth, ref))
        full = tuple((j + 1) * depth // count - 1 for j in range(count))
        return dict(vision, fullatt_block_indexes=full), text

    def __hash__(self) -> int:  # cache key of the FLOPs counts (the config dicts are not hashable)
        return hash((self.name, _frozen(self.vision), _frozen(self.text), self.image_size))


@cache
def _modules(geometry: QwenGeometry) -> dict[str, Any]:
    """The patch embedding, one tower block, the merger, one decoder layer, its rotary
    embedding and the LM head, on the meta device."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q

    vcfg, tcfg = geometry.configs()
    with _META:
        return {
            "embed": q.Qwen2_5_VisionPatchEmbed(vcfg.patch_size, vcfg.temporal_patch_size, vcfg.in_channels,
                                                vcfg.hidden_size),
            "tower_layer": q.Qwen2_5_VLVisionBlock(vcfg),
            "projector": q.Qwen2_5_VLPatchMerger(tcfg.hidden_size, vcfg.hidden_size, vcfg.spatial_merge_size),
            "decoder_layer": q.Qwen2_5_VLDecoderLayer(tcfg, 0),
            "rotary": q.Qwen2_5_VLRotaryEmbedding(tcfg),
            "head": torch.nn.Linear(tcfg.hidden_size, tcfg.vocab_size, bias=False),
        }


@cache
def _part_flops(g: QwenGeometry, part: str, n: int, flag: bool) -> int:
    """FLOPs of one part on ``n`` tokens, from the geometry's own modules on the meta
    device; ``flag`` is the geometry's per-block variant of a tower block
    (:meth:`QwenGeometry.tower_layer_flops`)."""
    m = g.meta_modules()
    v, t = g.vision, g.text
    if part == "embed":
        flat = v.get("in_channels", 3) * v["temporal_patch_size"] * v["patch_size"] ** 2
        x = torch.empty(g.tower_tokens, flat, device=_META)
        return count_flops(lambda: m["embed"](x))[0]
    if part == "tower_layer":
        x = torch.empty(n, v["hidden_size"], device=_META)
        head_dim = v["hidden_size"] // v["num_heads"]
        pe = (torch.empty(n, head_dim, device=_META), torch.empty(n, head_dim, device=_META))
        return g.tower_layer_flops(m, x, pe, flag)
    if part == "projector":
        x = torch.empty(n * v["spatial_merge_size"] ** 2, v["hidden_size"], device=_META)
        return count_flops(lambda: m["projector"](x))[0]
    if part == "decoder_layer":
        x = torch.empty(1, n, t["hidden_size"], device=_META)
        pos = torch.arange(n, device=_META).expand(3, 1, n)
        pe = m["rotary"](x, pos)
        return count_flops(lambda: m["decoder_layer"](x, attention_mask=None, position_embeddings=pe))[0]
    if part == "head":
        return count_flops(lambda: m["head"](torch.empty(1, n, t["hidden_size"], device=_META)))[0]
    raise ValueError(f"unknown part {part!r}")


QWEN_FULL = QwenGeometry(
    "qwen_full",
    "Qwen2.5-VL-7B geometry (vision 1280 x 32 blocks, window attention, full attention in blocks 7/15/23/31, "
    "2x2 merger; Qwen2 3584 x 28 layers, 28 heads, 4 key/value heads, MLP 18944, vocab 152064), one 448x448 "
    "image = 1024 patches = 256 visual tokens; random weights",
    dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
         temporal_patch_size=2, window_size=112, fullatt_block_indexes=(7, 15, 23, 31), in_channels=3),
    dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000),
    image_token_id=151655,
    llm_layers=(7, 16),  # the reference LLaVA-1.5-7B setting, as saint's Qwen-VL examples use it
    vit_layer=16,  # the adapter's default: the middle of the tower
    fastv_layer=2,
    budget_fractions=HALF_QUARTER,
)

GEOMETRIES: dict[str, Geometry] = {
    "qwen_full": QWEN_FULL,
    # Qwen2.5-VL-7B at a quarter of its width and depth; 7 tower blocks (the last with full
    # attention) instead of 8 keep the tower:LLM prefill FLOPs ratio within 1% of the 7B's (8
    # would be 12% above it: the full-attention block on 1024 patches shrinks only linearly
    # with width, and the merger has no depth).
    "qwen_scaled": scale_geometry(QWEN_FULL, "qwen_scaled", width=0.25, depth=0.25, tower_layers=7),
    "qwen_tiny": QwenGeometry(
        "qwen_tiny",
        "tiny test Qwen2.5-VL (vision 32 x 4 blocks, 16 px windows, full attention in blocks 1/3; 48 px / patch 4 = "
        "144 patches = 36 tokens; Qwen2 64 x 6 layers, 2 key/value heads); random weights",
        dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
             temporal_patch_size=2, window_size=16, fullatt_block_indexes=(1, 3), in_channels=3),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024, bos_token_id=1, eos_token_id=None),
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

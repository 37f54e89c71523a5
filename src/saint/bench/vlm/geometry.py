"""The model ``saint vlm-bench`` measures: a :class:`Geometry` holds the shapes of a
random-weight VLM and the layer choices that go with them. Each family is a subclass
(LLaVA-1.5 in :mod:`.llava_geometry`, Qwen2.5-VL in :mod:`.qwen_geometry`) that knows
how to build its model, lay out one image in the prompt, turn a visual-token budget into
its adapter's settings and count its modules' FLOPs, so the harness has no per-family
branch. :func:`scale_geometry` shrinks a 7B geometry's tower and LLM alike."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

METHODS = ("vit", "llm", "hybrid", "fastv", "random", "pool")
REFERENCE_PATCHES = 576  # LLaVA-1.5: CLIP ViT-L/14 at 336 px
REFERENCE_HYBRID_VIT_KEEP = 375  # the reference hybrid setting (576 -> 375 in the tower)
REFERENCE_BUDGETS = (192, 128, 64)
LITERATURE_FRACTIONS = tuple(b / REFERENCE_PATCHES for b in REFERENCE_BUDGETS)  # 192, 128, 64 of 576
HALF_QUARTER = (0.5, 0.25)  # the scaled geometries' budgets: 50% and 25% of the visual tokens
LLM_K, LLM_GAMMA, REFERENCE_TAU = 5, 10.0, 0.83


@dataclass(frozen=True)
class Geometry(abc.ABC):
    """Shapes of a random-weight VLM and the layer choices that go with them.
    ``vision`` / ``text`` are the family's tower and language-model config keywords;
    ``reference`` is the geometry this one is scaled from (analytic speed-ups are given
    at it; None: itself); ``budget_fractions`` give the default budgets."""

    name: str
    description: str
    vision: dict[str, Any]
    text: dict[str, Any]
    image_token_id: int
    llm_layers: tuple[int, int]  # SAINT's LLM pruning layers (inclusive)
    vit_layer: int  # tower layer of the fixed-budget drop (vit / hybrid)
    fastv_layer: int  # FastV's K
    reference: Geometry | None = None
    budget_fractions: tuple[float, ...] = LITERATURE_FRACTIONS

    family = ""  # the family's name and its label in titles (class attributes of each subclass)
    label = ""
    heads_key = ""  # the tower config's keys for heads and depth
    depth_key = ""

    # ------------------------------------------------------------ shapes
    @property
    @abc.abstractmethod
    def image_tokens(self) -> int:
        """Visual tokens per image in the prompt, as the processor emits them."""

    @property
    @abc.abstractmethod
    def grid(self) -> int:
        """Side of the (square) grid of visual tokens."""

    @property
    @abc.abstractmethod
    def tower_tokens(self) -> int:
        """Tokens entering every tower layer of the unpruned model, per image."""

    @property
    def tower_depth(self) -> int:
        return int(self.vision[self.depth_key])

    @property
    def text_depth(self) -> int:
        return int(self.text["num_hidden_layers"])

    @property
    def hybrid_vit_keep(self) -> int:
        """The reference's 375 of 576 patches, scaled to this geometry's visual tokens."""
        return round(REFERENCE_HYBRID_VIT_KEEP * self.image_tokens / REFERENCE_PATCHES)

    def default_budgets(self) -> list[int]:
        """``budget_fractions`` of the visual tokens."""
        return [round(f * self.image_tokens) for f in self.budget_fractions]

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["reference"] = None if self.reference is None else self.reference.name
        return dict(d, family=self.family, label=self.label, image_tokens=self.image_tokens,
                    tower_tokens=self.tower_tokens)

    # ------------------------------------------------------------ model and prompt
    @abc.abstractmethod
    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              seed: int = 0) -> torch.nn.Module:
        """A random-weight model of this geometry (sdpa attention), created directly on
        ``device`` in ``dtype`` (no fp32 copy of a 7B model on the host)."""

    @abc.abstractmethod
    def image_run(self) -> list[int]:
        """Token ids of one image's span in the prompt (image tokens and any markers)."""

    @property
    @abc.abstractmethod
    def text_id_limit(self) -> int:
        """Random text tokens are drawn below this id (the special tokens are above)."""

    @property
    @abc.abstractmethod
    def suppressed_ids(self) -> list[int]:
        """Tokens greedy decoding must not pick (image/video tokens)."""

    @abc.abstractmethod
    def media(self, input_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random pixels (one image per row) and whatever else the model's forward takes
        with them, for the prompts ``input_ids``."""

    @abc.abstractmethod
    def decode_positions(self, length: int, step: int, batch: int) -> torch.Tensor:
        """Position ids of decoding step ``step`` after a prompt of ``length`` tokens, as
        ``generate`` passes them."""

    # ------------------------------------------------------------ budgets -> adapter settings
    @abc.abstractmethod
    def tower_keep(self, keep: int, vit_layer: int) -> dict[str, Any]:
        """Settings of the fixed-budget tower drop keeping ``keep`` visual tokens per image."""

    @abc.abstractmethod
    def random_keep(self, budget: int) -> dict[str, Any]:
        """The random baseline keeping ``budget`` visual tokens per image."""

    @abc.abstractmethod
    def pool_keep(self, budget: int) -> dict[str, Any]:
        """The pooling baseline keeping exactly ``budget`` tokens; ValueError if it cannot."""

    # ------------------------------------------------------------ FLOPs (see analytic.py)
    @abc.abstractmethod
    def part_flops(self, part: str, n: int, layer: int = 0) -> int:
        """FLOPs of one part of the prefill at ``n`` tokens: ``embed`` (n ignored),
        ``tower_layer`` (tower layer ``layer``), ``projector`` (``n`` visual tokens out),
        ``decoder_layer``, ``head`` (``n`` positions)."""

    @abc.abstractmethod
    def projected(self, tower_last: float) -> float:
        """Visual tokens the projector emits when ``tower_last`` tokens leave the tower."""

    # ------------------------------------------------------------ scaling
    @abc.abstractmethod
    def shapes(self) -> str:
        """The tower's and the language model's sizes in a few words."""

    @abc.abstractmethod
    def scaled_parts(self, vision: dict[str, Any], text: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Family-specific keys of a scaled copy (``vision``/``text`` already have the
        common ones scaled): e.g. the layers with full attention, the tower's output width."""


def scaled_layer(index: int, depth: int, ref_depth: int) -> int:
    """Layer ``index`` of ``ref_depth`` at the same relative depth of ``depth`` layers."""
    return round(index * depth / ref_depth)


def _scale_part(cfg: dict[str, Any], width: float, depth: float, heads_key: str, depth_key: str,
                extra: Sequence[str], layers: int | None) -> dict[str, Any]:
    head_dim = cfg["hidden_size"] // cfg[heads_key]
    heads = max(1, round(cfg[heads_key] * width))
    out = dict(cfg, hidden_size=heads * head_dim, intermediate_size=max(1, round(cfg["intermediate_size"] * width)))
    out[heads_key] = heads
    out[depth_key] = max(2, round(cfg[depth_key] * depth)) if layers is None else layers
    for k in extra:
        out[k] = max(1, round(cfg[k] * width))
    return out


def scale_geometry(base: Geometry, name: str, *, width: float, depth: float, tower_layers: int | None = None,
                   text_layers: int | None = None, budget_fractions: tuple[float, ...] = HALF_QUARTER) -> Geometry:
    """``base`` with the tower and the language model scaled by the same factors: hidden
    and MLP sizes by ``width`` (head size kept, so heads scale too; key/value heads too),
    layers by ``depth``. Both parts change alike, so their FLOPs ratio stays close to
    ``base``'s (only the attention-score term, quadratic in tokens and linear in width,
    and the projector, which has no depth, move it; ``tower_layers`` / ``text_layers``
    override a depth to bring the ratio back, see
    :func:`saint.bench.vlm.analytic.tower_llm_ratio`). Image size, vocabulary and the
    prompt layout are kept; layer choices map to the same relative depth."""
    if not (0 < width <= 1 and 0 < depth <= 1):
        raise ValueError(f"width {width} and depth {depth} must be in (0, 1]; they shrink {base.name}")
    vision = _scale_part(base.vision, width, depth, base.heads_key, base.depth_key, (), tower_layers)
    text = _scale_part(base.text, width, depth, "num_attention_heads", "num_hidden_layers",
                       ("num_key_value_heads",), text_layers)
    vision, text = base.scaled_parts(vision, text)
    tl, vl = text["num_hidden_layers"], vision[base.depth_key]
    bl, bv = base.text_depth, base.tower_depth
    s, e = base.llm_layers
    out = dataclasses.replace(
        base, name=name, vision=vision, text=text, reference=base, budget_fractions=budget_fractions,
        llm_layers=(scaled_layer(s, tl, bl), min(tl - 1, scaled_layer(e, tl, bl))),
        # pruning after the tower's last layer saves nothing (LLaVA reads layer -2): stay before it
        vit_layer=min(vl - 2, scaled_layer(base.vit_layer, vl, bv)),
        fastv_layer=max(1, scaled_layer(base.fastv_layer, tl, bl)))
    return dataclasses.replace(out, description=f"{base.name} scaled by {width:g} in width and {depth:g} in depth, "
                                                f"tower and LLM alike: {out.shapes()}; random weights")


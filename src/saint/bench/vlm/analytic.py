"""Prefill FLOPs of a VLM geometry for a given token schedule, counted per module with
:func:`saint.measure.flops.count_flops` on meta tensors (no weights, no compute), so the
real 7B shapes cost nothing to evaluate. The modules are the family's own
(:meth:`saint.bench.vlm.geometry.Geometry.part_flops`): CLIP + projector + Llama for
LLaVA; the windowed vision blocks, the 2x2 merger and Qwen2 layers for Qwen2.5-VL; the
full-attention blocks (each deepstack merger counted with its block, so in the tower's
sum), the merger and Qwen3 layers for Qwen3-VL.

A schedule is the number of tokens entering each vision-tower layer (LLaVA: patches +
class token; Qwen2.5-VL: patches) and each decoder layer (text + visual), and the visual
tokens the projector emits. The analytic speed-up of a variant at another geometry (the
7B it is scaled from) stretches its per-layer schedule over that geometry's depth:
target layer ``j`` of ``L`` takes the tokens of measured layer ``j * l // L``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .geometry import Geometry


def prefill_flops(geometry: Geometry, tower_tokens: Sequence[float], llm_tokens: Sequence[float],
                  projected: float) -> dict[str, float]:
    """FLOPs of one prompt's prefill (one image): patch embedding, each tower layer at
    ``tower_tokens[i]`` tokens, the projector emitting ``projected`` visual tokens, each
    decoder layer at ``llm_tokens[i]`` tokens and the LM head on the last position.
    Fractional (mean) counts are interpolated between the neighbouring integers."""
    if len(tower_tokens) != geometry.tower_depth:
        raise ValueError(f"tower_tokens has {len(tower_tokens)} entries; the tower has {geometry.tower_depth} layers")
    if len(llm_tokens) != geometry.text_depth:
        raise ValueError(f"llm_tokens has {len(llm_tokens)} entries; the language model has "
                         f"{geometry.text_depth} layers")

    def part(name: str, n: float, layer: int = 0) -> float:
        lo = int(n)
        f = geometry.part_flops(name, lo, layer)
        return f if n == lo else f + (n - lo) * (geometry.part_flops(name, lo + 1, layer) - f)

    tower = part("embed", 0) + sum(part("tower_layer", n, i) for i, n in enumerate(tower_tokens))
    llm = sum(part("decoder_layer", n) for n in llm_tokens)
    out = {"tower": tower, "projector": part("projector", projected), "llm": llm, "head": part("head", 1)}
    out["total"] = sum(out.values())
    return out


def unpruned_schedule(geometry: Geometry, text_tokens: int) -> dict[str, Any]:
    """Every patch through the tower, every image token through the LLM."""
    n = geometry.image_tokens
    return {"tower_tokens": [geometry.tower_tokens] * geometry.tower_depth,
            "llm_tokens": [text_tokens + n] * geometry.text_depth, "projected": n}


def measured_schedule(geometry: Geometry, visual_tokens: dict[str, Any], text_tokens: int) -> dict[str, Any]:
    """The schedule of one measured prefill, from :func:`saint.bench.vlm.visual_tokens`."""
    tower = visual_tokens.get("vision_tower_per_layer")
    if tower is None:
        tower = [geometry.tower_tokens] * geometry.tower_depth
    return {"tower_tokens": list(tower), "llm_tokens": [text_tokens + n for n in visual_tokens["per_layer"]],
            "projected": geometry.projected(tower[-1])}


def stretch(values: Sequence[float], depth: int) -> list[float]:
    """``values`` (one per layer) over ``depth`` layers: layer ``j`` takes ``values[j * len // depth]``."""
    return [values[j * len(values) // depth] for j in range(depth)]


def stretched_schedule(schedule: dict[str, Any], target: Geometry) -> dict[str, Any]:
    """A measured schedule on ``target``'s depths (both have the same patches). The
    tower's one fixed-budget drop moves to ``target.vit_layer`` (all tokens through it,
    the kept ones after); the decoder's per-layer counts are stretched."""
    tower, depth = schedule["tower_tokens"], target.tower_depth
    before = min(target.vit_layer + 1, depth)
    return {"tower_tokens": [tower[0]] * before + [tower[-1]] * (depth - before),
            "llm_tokens": stretch(schedule["llm_tokens"], target.text_depth),
            "projected": schedule["projected"]}


def tower_llm_ratio(geometry: Geometry, text_tokens: int) -> float:
    """Unpruned prefill FLOPs of the tower (with the projector) over the language model's."""
    f = prefill_flops(geometry, **unpruned_schedule(geometry, text_tokens))
    return (f["tower"] + f["projector"]) / f["llm"]

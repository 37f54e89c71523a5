"""Prefill FLOPs of a LLaVA geometry for a given token schedule, counted per module with
:func:`saint.measure.flops.count_flops` on meta tensors (no weights, no compute), so the
real 7B shapes cost nothing to evaluate.

A schedule is the number of tokens entering each vision-tower layer (class token
included) and each decoder layer (text + visual). The analytic speed-up of a variant at
another geometry (LLaVA-1.5-7B) stretches its per-layer schedule over that geometry's
depth: target layer ``j`` of ``L`` takes the tokens of measured layer ``j * l // L``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

from ...measure.flops import count_flops
from .geometry import Geometry

_META = torch.device("meta")


def _frozen(d: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(d.items()))


@cache
def _modules(vision: tuple[tuple[str, int], ...], text: tuple[tuple[str, int], ...]) -> dict[str, Any]:
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
def _part_flops(vision: tuple[tuple[str, int], ...], text: tuple[tuple[str, int], ...], part: str, n: int) -> int:
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


def prefill_flops(geometry: Geometry, tower_tokens: Sequence[float], llm_tokens: Sequence[float],
                  projected: float) -> dict[str, float]:
    """FLOPs of one prompt's prefill (one image): patch embedding, each tower layer at
    ``tower_tokens[i]`` tokens, the projector on ``projected`` tokens, each decoder
    layer at ``llm_tokens[i]`` tokens and the LM head on the last position. Fractional
    (mean) counts are interpolated between the neighbouring integers."""
    v, t = _frozen(geometry.vision), _frozen(geometry.text)
    if len(tower_tokens) != geometry.vision["num_hidden_layers"]:
        raise ValueError(f"tower_tokens has {len(tower_tokens)} entries; the tower has "
                         f"{geometry.vision['num_hidden_layers']} layers")
    if len(llm_tokens) != geometry.text["num_hidden_layers"]:
        raise ValueError(f"llm_tokens has {len(llm_tokens)} entries; the language model has "
                         f"{geometry.text['num_hidden_layers']} layers")

    def part(name: str, n: float) -> float:
        lo = int(n)
        f = _part_flops(v, t, name, lo)
        return f if n == lo else f + (n - lo) * (_part_flops(v, t, name, lo + 1) - f)

    tower = part("embed", 0) + sum(part("tower_layer", n) for n in tower_tokens)
    llm = sum(part("decoder_layer", n) for n in llm_tokens)
    out = {"tower": tower, "projector": part("projector", projected), "llm": llm, "head": part("head", 1)}
    out["total"] = sum(out.values())
    return out


def unpruned_schedule(geometry: Geometry, text_tokens: int) -> dict[str, Any]:
    """Every patch (+ class token) through the tower, every image token through the LLM."""
    n = geometry.n_patches
    return {"tower_tokens": [n + 1] * geometry.vision["num_hidden_layers"],
            "llm_tokens": [text_tokens + n] * geometry.text["num_hidden_layers"], "projected": n}


def measured_schedule(geometry: Geometry, visual_tokens: dict[str, Any], text_tokens: int) -> dict[str, Any]:
    """The schedule of one measured prefill, from :func:`saint.bench.vlm.visual_tokens`."""
    tower = visual_tokens.get("vision_tower_per_layer")
    if tower is None:
        tower = [geometry.n_patches + 1] * geometry.vision["num_hidden_layers"]
    return {"tower_tokens": list(tower), "llm_tokens": [text_tokens + n for n in visual_tokens["per_layer"]],
            "projected": tower[-1] - 1}  # the class token is not projected ("default" strategy)


def stretch(values: Sequence[float], depth: int) -> list[float]:
    """``values`` (one per layer) over ``depth`` layers: layer ``j`` takes ``values[j * len // depth]``."""
    return [values[j * len(values) // depth] for j in range(depth)]


def stretched_schedule(schedule: dict[str, Any], target: Geometry) -> dict[str, Any]:
    """A measured schedule on ``target``'s depths (both have the same patches). The
    tower's one fixed-budget drop moves to ``target.vit_layer`` (all tokens through it,
    the kept ones after); the decoder's per-layer counts are stretched."""
    tower, depth = schedule["tower_tokens"], target.vision["num_hidden_layers"]
    before = min(target.vit_layer + 1, depth)
    return {"tower_tokens": [tower[0]] * before + [tower[-1]] * (depth - before),
            "llm_tokens": stretch(schedule["llm_tokens"], target.text["num_hidden_layers"]),
            "projected": schedule["projected"]}


def tower_llm_ratio(geometry: Geometry, text_tokens: int) -> float:
    """Unpruned prefill FLOPs of the tower (with the projector) over the language model's."""
    f = prefill_flops(geometry, **unpruned_schedule(geometry, text_tokens))
    return (f["tower"] + f["projector"]) / f["llm"]

"""``saint vlm-bench``: budgets reached exactly by the fixed-budget methods, the llm/hybrid
taus from ``saint.calibrate`` reproduced by the timed run, the decode loop equal to
``generate``, exact KV-cache sizes, the geometries (LLaVA-1.5, Qwen2.5-VL and Qwen3-VL,
7B/8B and scaled) and their analytic FLOPs, the CLI / JSON and the benchmark script (tiny
random LLaVA, Qwen2.5-VL and Qwen3-VL, no timing assertions)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.bench import vlm  # noqa: E402
from saint.cli import main  # noqa: E402

TINY = vlm.GEOMETRIES["tiny"]
N = TINY.image_tokens  # 144
QTINY = vlm.GEOMETRIES["qwen_tiny"]
QN = QTINY.image_tokens  # 36 visual tokens (144 patches)
Q3TINY = vlm.GEOMETRIES["qwen3_tiny"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return TINY.build()


@pytest.fixture(scope="module")
def qwen():
    return QTINY.build()


@pytest.fixture(scope="module")
def qwen3():
    return Q3TINY.build()


def inputs(batch: int = 2, prompt_len: int = 10, new: int = 3, geometry: vlm.Geometry = TINY) -> vlm.VlmInputs:
    return vlm.make_inputs(geometry, batch, prompt_len, new, seed=3)


# ---------------------------------------------------------------------------- geometry
def test_geometries_are_llava_15():
    """cpu and full share LLaVA-1.5's vision side; full is the 7B language model."""
    for name in ("cpu", "full"):
        g = vlm.GEOMETRIES[name]
        assert g.image_tokens == 576 and g.default_budgets() == [192, 128, 64] and g.hybrid_vit_keep == 375
        assert g.vision == dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    full = vlm.GEOMETRIES["full"].build(device="meta", dtype=torch.bfloat16)
    assert full.config.vision_feature_layer == -2 and full.config.vision_feature_select_strategy == "default"
    lm = full.model.language_model
    assert len(lm.layers) == 32 and lm.config.hidden_size == 4096 and lm.config.intermediate_size == 11008
    assert round(sum(p.numel() for p in full.parameters()) / 1e9, 2) == 7.06
    assert vlm.GEOMETRIES["full"].llm_layers == (7, 16)
    # 576 -> 64 must be reachable by SAINT's LLM step: each layer removes at most half
    start, end = vlm.GEOMETRIES["cpu"].llm_layers
    assert 576 / 2 ** (end - start + 1) <= 64


def test_scaled_geometry_keeps_the_tower_llm_flops_ratio():
    """``scaled`` is LLaVA-1.5-7B at 1/4 width and depth, tower and LLM alike (head size
    kept); its tower:LLM prefill FLOPs ratio is within 3% of the 7B's, which the
    uniformly scaled 6-layer tower would miss by a third."""
    full, scaled = vlm.GEOMETRIES["full"], vlm.GEOMETRIES["scaled"]
    assert scaled.reference is full and scaled.image_tokens == 576 and scaled.default_budgets() == [288, 144]
    assert (scaled.vision["hidden_size"], scaled.vision["intermediate_size"], scaled.vision["num_hidden_layers"],
            scaled.vision["num_attention_heads"]) == (256, 1024, 4, 4)
    assert (scaled.text["hidden_size"], scaled.text["intermediate_size"], scaled.text["num_hidden_layers"],
            scaled.text["num_attention_heads"]) == (1024, 2752, 8, 8)
    assert scaled.llm_layers == (2, 4) and scaled.vit_layer == 2 and scaled.fastv_layer == 1
    ref = vlm.tower_llm_ratio(full, 64)
    assert abs(vlm.tower_llm_ratio(scaled, 64) / ref - 1) < 0.03
    uniform = vlm.scale_geometry(full, "u", width=0.25, depth=0.25)
    assert uniform.vision["num_hidden_layers"] == 6 and vlm.tower_llm_ratio(uniform, 64) / ref > 1.3
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        vlm.scale_geometry(full, "x", width=2, depth=0.5)


def test_analytic_flops_by_hand():
    """Each part of the analytic prefill equals its textbook count (FLOPs = 2 x MACs;
    SDPA 4 n^2 d), and halving the visual tokens in every decoder layer gives the
    speed-up computed from those formulas."""
    v, t = TINY.vision, TINY.text
    dv, iv, dt, it, vocab = v["hidden_size"], v["intermediate_size"], t["hidden_size"], t["intermediate_size"], 256
    text = 10

    def tower_layer(n):
        return 8 * n * dv**2 + 4 * n * dv * iv + 4 * n * n * dv

    def decoder_layer(n):
        return 8 * n * dt**2 + 6 * n * dt * it + 4 * n * n * dt

    def total(vis):
        return (2 * N * 3 * v["patch_size"] ** 2 * dv + 4 * tower_layer(N + 1) + 2 * vis * (dv * dt + dt * dt)
                + 6 * decoder_layer(text + vis) + 2 * dt * vocab)

    f = vlm.prefill_flops(TINY, **vlm.unpruned_schedule(TINY, text))
    assert f["llm"] == 6 * decoder_layer(text + N) and f["tower"] == 2 * N * 3 * 16 * dv + 4 * tower_layer(N + 1)
    assert f["head"] == 2 * dt * vocab and f["total"] == total(N)
    half = vlm.prefill_flops(TINY, [N + 1] * 4, [text + N // 2] * 6, N // 2)
    assert half["total"] == total(N // 2)
    assert 1.3 < f["total"] / half["total"] < 2  # a hand-checkable ratio, not 1 and not 2
    mid = vlm.prefill_flops(TINY, [N + 1] * 4, [text + N / 2 + 0.5] * 6, N // 2)  # fractional means interpolate
    assert half["llm"] < mid["llm"] < vlm.prefill_flops(TINY, [N + 1] * 4, [text + N // 2 + 1] * 6, N // 2)["llm"]
    with pytest.raises(ValueError, match="tower has 4 layers"):
        vlm.prefill_flops(TINY, [N + 1] * 3, [text + N] * 6, N)


def test_analytic_flops_equal_the_counted_prefill(model):
    """The per-module analytic count reproduces ``count_flops`` of the real prefill of the
    unpruned model and of a random-drop variant (no selection matmuls)."""
    from saint.measure.flops import count_flops

    x = inputs(batch=1)
    for kw in (None, dict(method="random", visual_keep=40, seed=0)):
        if kw:
            saint.patch(model, **kw)
        with torch.inference_mode():
            counted = count_flops(lambda: vlm.prefill(model, x))[0]
        sched = vlm.measured_schedule(TINY, vlm.visual_tokens(model, x), x.text_tokens)
        if kw:
            saint.unpatch(model)
            assert sched["llm_tokens"] == [x.text_tokens + 40] * 6 and sched["projected"] == N  # drops after it
        assert vlm.prefill_flops(TINY, **sched)["total"] == counted


def test_qwen_geometry_is_qwen2_5_vl_7b():
    """qwen_full has the released Qwen2.5-VL-7B's shapes (8.29B parameters, 0.68B in the
    tower, untied LM head; transformers' config defaults are other models'), one 448x448
    image = 1024 patches = 256 visual tokens, budgets 50% / 25%."""
    g = vlm.GEOMETRIES["qwen_full"]
    assert (g.tower_tokens, g.image_tokens, g.grid, g.default_budgets(), g.hybrid_vit_keep) == (1024, 256, 16,
                                                                                              [128, 64], 167)
    m = g.build(device="meta", dtype=torch.bfloat16)
    assert round(sum(p.numel() for p in m.parameters()) / 1e9, 2) == 8.29
    assert round(sum(p.numel() for p in m.model.visual.parameters()) / 1e9, 2) == 0.68
    vis, lm = m.model.visual, m.model.language_model
    assert len(vis.blocks) == 32 and vis.fullatt_block_indexes == [7, 15, 23, 31] and vis.window_size == 112
    assert vis.blocks[0].attn.num_heads == 16 and vis.blocks[0].mlp.gate_proj.out_features == 3420
    assert vis.merger.mlp[0].in_features == 4 * 1280 and vis.merger.mlp[2].out_features == 3584
    c = lm.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert c.rope_parameters["mrope_section"] == [16, 24, 24] and not m.config.tie_word_embeddings
    assert vlm.mrope_section(16) == [2, 3, 3]


def test_qwen_scaled_geometry_keeps_the_tower_llm_flops_ratio():
    """qwen_scaled is Qwen2.5-VL-7B at 1/4 width, LLM depth 1/4 (7 of 28 layers), the tower
    at 7 of 32 blocks with its one full-attention block last; its tower:LLM prefill FLOPs
    ratio is within 1% of the 7B's (the uniformly scaled 8-block tower would be >10% above)."""
    full, scaled = vlm.GEOMETRIES["qwen_full"], vlm.GEOMETRIES["qwen_scaled"]
    assert scaled.reference is full and scaled.image_tokens == 256 and scaled.default_budgets() == [128, 64]
    v, t = scaled.vision, scaled.text
    assert (v["hidden_size"], v["intermediate_size"], v["depth"], v["num_heads"], v["fullatt_block_indexes"]) == (
        320, 855, 7, 4, (6,))
    assert (t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["num_attention_heads"],
            t["num_key_value_heads"]) == (896, 4736, 7, 7, 1)
    assert scaled.llm_layers == (2, 4) and scaled.vit_layer == 4 and scaled.fastv_layer == 1
    ref = vlm.tower_llm_ratio(full, 66)
    assert 0.3 < ref < 0.35  # at 7B the tower is a third of the LLM's prefill (LLaVA-1.5-7B: 5%)
    assert abs(vlm.tower_llm_ratio(scaled, 66) / ref - 1) < 0.01
    uniform = vlm.scale_geometry(full, "u", width=0.25, depth=0.25)
    assert uniform.vision["fullatt_block_indexes"] == (7,) and vlm.tower_llm_ratio(uniform, 66) / ref > 1.1


def test_qwen_analytic_flops_by_hand():
    """The Qwen2.5-VL parts equal their textbook counts: patch embedding (a matmul over
    the flattened patch), windowed and full-attention blocks (qkv + proj + SwiGLU MLP,
    SDPA 4 s^2 d per window s), the 2x2 merger on the merged tokens, GQA decoder layers."""
    v, t = QTINY.vision, QTINY.text
    dv, iv, dt, it = v["hidden_size"], v["intermediate_size"], t["hidden_size"], t["intermediate_size"]
    kv = t["num_key_value_heads"] * dt // t["num_attention_heads"]
    p, text = 144, 12  # 12 x 12 patches; 10 text tokens + vision start/end

    def block(n, windows):
        return 8 * n * dv**2 + 6 * n * dv * iv + sum(4 * s * s * dv for s in windows)

    def decoder(n):
        return 4 * n * dt**2 + 4 * n * dt * kv + 6 * n * dt * it + 4 * n * n * dt

    assert QTINY.windows(p) == [16] * 9  # 16 px windows: 3 x 3 windows of 2 x 2 merge groups
    f = vlm.prefill_flops(QTINY, **vlm.unpruned_schedule(QTINY, text))
    assert f["tower"] == 2 * p * 96 * dv + 2 * block(p, [p]) + 2 * block(p, [16] * 9)
    assert f["projector"] == 2 * QN * (4 * dv * 4 * dv + 4 * dv * dt)
    assert f["llm"] == 6 * decoder(text + QN) and f["head"] == 2 * dt * t["vocab_size"]
    # after a drop to 72 patches the windowed blocks (0, 2) see 8 per window, spread evenly
    assert QTINY.windows(72) == [8] * 9
    cut = vlm.prefill_flops(QTINY, [p, p, 72, 72], [text + QN] * 6, QN // 2)
    assert cut["tower"] == 2 * p * 96 * dv + block(p, [16] * 9) + block(p, [p]) + block(72, [8] * 9) + block(72, [72])


def test_qwen_analytic_flops_equal_the_counted_prefill(qwen):
    """The analytic count reproduces ``count_flops`` of the real Qwen2.5-VL prefill when
    the tower is untouched (unpruned, random after the merger), and within 1% after a
    tower drop (windowed attention assumes the kept groups spread evenly)."""
    from saint.measure.flops import count_flops

    x = inputs(batch=1, geometry=QTINY)
    for kw, exact in ((None, True), (dict(method="random", keep_ratio=0.5, seed=0), True),
                      (dict(mode="vit", vit_ratio=0.25, vit_layer=1), False)):
        if kw:
            saint.patch(qwen, **kw)
        with torch.inference_mode():
            counted = count_flops(lambda: vlm.prefill(qwen, x))[0]
        sched = vlm.measured_schedule(QTINY, vlm.visual_tokens(qwen, x), x.text_tokens)
        if kw:
            saint.unpatch(qwen)
        analytic = vlm.prefill_flops(QTINY, **sched)["total"]
        assert analytic == counted if exact else abs(analytic / counted - 1) < 0.01
    assert sched["tower_tokens"] == [144, 144, 36, 36] and sched["projected"] == 9


def test_qwen3_geometry_is_qwen3_vl_8b():
    """qwen3_full has the released Qwen3-VL-8B's shapes (8.77B parameters, 0.58B in the
    tower with its three deepstack mergers, untied LM head, interleaved M-RoPE [24, 20,
    20]), one 512x512 image = 1024 patches of 16 px = 256 visual tokens, budgets 50% / 25%."""
    g = vlm.GEOMETRIES["qwen3_full"]
    assert (g.tower_tokens, g.image_tokens, g.grid, g.default_budgets(), g.hybrid_vit_keep) == (1024, 256, 16,
                                                                                              [128, 64], 167)
    m = g.build(device="meta", dtype=torch.bfloat16)
    assert type(m).__name__ == "Qwen3VLForConditionalGeneration"
    assert round(sum(p.numel() for p in m.parameters()) / 1e9, 2) == 8.77
    assert round(sum(p.numel() for p in m.model.visual.parameters()) / 1e9, 2) == 0.58
    vis, lm = m.model.visual, m.model.language_model
    assert len(vis.blocks) == 27 and vis.deepstack_visual_indexes == [8, 16, 24] and len(vis.deepstack_merger_list) == 3
    assert vis.blocks[0].attn.num_heads == 16 and vis.blocks[0].mlp.linear_fc1.out_features == 4304
    assert vis.patch_size == 16 and vis.pos_embed.num_embeddings == 2304
    assert vis.merger.linear_fc1.in_features == 4 * 1152 and vis.merger.linear_fc2.out_features == 4096
    c = lm.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (4096, 36, 32, 8, 128, 12288, 151936)
    assert c.rope_parameters["mrope_section"] == [24, 20, 20] and c.rope_parameters["mrope_interleaved"]
    assert not m.config.tie_word_embeddings and g.vit_layer not in g.vision["deepstack_visual_indexes"]
    with pytest.raises(ValueError, match="vit_layer 16 is a deepstack block"):
        dataclasses.replace(g, vit_layer=16)


def test_qwen3_scaled_geometry_keeps_the_tower_llm_flops_ratio():
    """qwen3_scaled is Qwen3-VL-8B at 1/4 width, the tower at 6 of 27 blocks (deepstack
    blocks at the same relative depth) and the LLM at 13 of 36 layers; its tower:LLM
    prefill FLOPs ratio is within 1% of the 8B's (a quarter of both depths: > 50% above)."""
    full, scaled = vlm.GEOMETRIES["qwen3_full"], vlm.GEOMETRIES["qwen3_scaled"]
    assert scaled.reference is full and scaled.image_tokens == 256 and scaled.default_budgets() == [128, 64]
    v, t = scaled.vision, scaled.text
    assert (v["hidden_size"], v["intermediate_size"], v["depth"], v["num_heads"], v["deepstack_visual_indexes"]) == (
        288, 1076, 6, 4, (2, 4, 5))
    assert (t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["num_attention_heads"],
            t["num_key_value_heads"], t["head_dim"]) == (1024, 3072, 13, 8, 2, 128)
    assert scaled.llm_layers == (3, 6) and scaled.vit_layer == 3 and scaled.fastv_layer == 1
    ref = vlm.tower_llm_ratio(full, 66)
    assert 0.2 < ref < 0.25  # at 8B the tower (with its mergers) is under a quarter of the LLM's prefill
    assert abs(vlm.tower_llm_ratio(scaled, 66) / ref - 1) < 0.01
    uniform = vlm.scale_geometry(full, "u", width=0.25, depth=0.25)
    assert (uniform.vision["depth"], uniform.text["num_hidden_layers"]) == (7, 9)
    assert vlm.tower_llm_ratio(uniform, 66) / ref > 1.5
    assert vlm.interleaved_mrope_section(16) == [4, 2, 2]


def test_qwen3_analytic_flops_by_hand():
    """The Qwen3-VL parts equal their textbook counts: patch embedding (a matmul over the
    flattened patch), full-attention blocks (qkv + proj + 2-matmul MLP, SDPA 4 s^2 d),
    each deepstack merger after its block and the 2x2 merger on the merged tokens, GQA
    decoder layers (head size given explicitly)."""
    v, t = Q3TINY.vision, Q3TINY.text
    dv, iv, dt, it = v["hidden_size"], v["intermediate_size"], t["hidden_size"], t["intermediate_size"]
    kv = t["num_key_value_heads"] * t["head_dim"]
    p, text = 144, 12

    def block(n):
        return 8 * n * dv**2 + 4 * n * dv * iv + 4 * n * n * dv

    def merger(n):  # n merged tokens
        return 2 * n * (4 * dv * 4 * dv + 4 * dv * dt)

    def decoder(n):
        return 4 * n * dt**2 + 4 * n * dt * kv + 6 * n * dt * it + 4 * n * n * dt

    f = vlm.prefill_flops(Q3TINY, **vlm.unpruned_schedule(Q3TINY, text))
    assert f["tower"] == 2 * p * 96 * dv + 4 * block(p) + 2 * merger(p // 4)  # deepstack after blocks 0 and 2
    assert f["projector"] == merger(p // 4) and f["head"] == 2 * dt * t["vocab_size"]
    assert f["llm"] == 6 * decoder(text + 36)
    cut = vlm.prefill_flops(Q3TINY, [p, p, 72, 72], [text + 36] * 6, 18)
    assert cut["tower"] == 2 * p * 96 * dv + 2 * block(p) + 2 * block(72) + merger(p // 4) + merger(18)


def test_qwen3_analytic_flops_equal_the_counted_prefill(qwen3):
    """The analytic count reproduces ``count_flops`` of the real Qwen3-VL prefill when the
    tower is untouched; after a tower drop it differs only by SAINT's group-similarity
    matmul (36 x 36 groups of head size 16), which the analytic count leaves out."""
    from saint.measure.flops import count_flops

    x = inputs(batch=1, geometry=Q3TINY)
    for kw, extra in ((None, 0), (dict(method="random", keep_ratio=0.5, seed=0), 0),
                      (dict(mode="vit", vit_ratio=0.25, vit_layer=1), 2 * 36 * 36 * 16)):
        if kw:
            saint.patch(qwen3, **kw)
        with torch.inference_mode():
            counted = count_flops(lambda: vlm.prefill(qwen3, x))[0]
        sched = vlm.measured_schedule(Q3TINY, vlm.visual_tokens(qwen3, x), x.text_tokens)
        if kw:
            saint.unpatch(qwen3)
        assert vlm.prefill_flops(Q3TINY, **sched)["total"] + extra == counted, kw
    assert sched["tower_tokens"] == [144, 144, 36, 36] and sched["projected"] == 9


def test_qwen_fixed_budget_methods_reach_the_budget_exactly(qwen):
    """vit (inside the tower), fastv, random and pool keep exactly the budget; pool only
    keeps what its p x p windows give, so by default it runs at 25% (9 of 36) only."""
    x = inputs(geometry=QTINY)
    variants = vlm.budget_variants(QTINY, [18, 9], graph_only=False)[1:]
    assert [v.name for v in variants if v.method == "pool"] == ["pool@9"]
    assert vlm.unreachable(QTINY, [18, 9], vlm.METHODS) == [
        "pool@18: pool cannot keep exactly 18 of 36 tokens: Qwen-VL's pool averages p x p windows of the 6x6 grid, "
        "which keeps [9, 4, 1] ..."]
    with pytest.raises(ValueError, match="pool cannot keep exactly 18"):
        vlm.budget_variants(QTINY, [18], ["pool"])
    for v in variants:
        if v.needs_tau:
            continue
        saint.patch(qwen, **v.kwargs)
        with torch.inference_mode():
            vlm.prefill(qwen, x)
        t = vlm.visual_tokens(qwen, x)
        assert t["after_per_sample"] == [v.budget] * 2, v.name
        if v.method == "vit":  # 4 patches per merged token after block vit_layer
            k = QTINY.vit_layer + 1
            assert t["vision_tower_per_layer"] == [144.0] * k + [4.0 * v.budget] * (4 - k)
        else:
            assert t["vision_tower_per_layer"] is None
    saint.unpatch(qwen)


def test_stretched_schedule_moves_the_tower_drop_to_the_reference_layer():
    assert vlm.stretch([1, 2], 4) == [1, 1, 2, 2] and vlm.stretch([5, 6, 7, 8], 2) == [5, 7]
    full = vlm.GEOMETRIES["full"]
    sched = {"tower_tokens": [577, 577, 577, 129], "llm_tokens": [700] * 4 + [200] * 4, "projected": 128}
    out = vlm.stretched_schedule(sched, full)
    assert out["tower_tokens"] == [577] * 20 + [129] * 4  # drop after layer 19 of 24
    assert out["llm_tokens"] == [700] * 16 + [200] * 16 and out["projected"] == 128


def test_inputs_layout():
    x = inputs(batch=2, prompt_len=9, new=3)
    assert x.input_ids.shape == (2, 9 + N)
    img = x.input_ids == TINY.image_token_id
    assert img.sum(1).tolist() == [N, N]
    assert img[:, 4:4 + N].all()  # 9 // 2 = 4 text tokens before the image
    assert [m.shape[1] for m in x.decode_masks] == [9 + N + 1, 9 + N + 2, 9 + N + 3]
    assert [int(p[0, 0]) for p in x.decode_positions] == [9 + N, 9 + N + 1, 9 + N + 2]
    with pytest.raises(ValueError, match="exceeds the language model's 1024 positions"):
        vlm.make_inputs(TINY, 1, 900, 10)


# ---------------------------------------------------------------------------- budgets
def test_pool_grid_and_fastv_ratio():
    assert [vlm.pool_grid(b, 24) for b in (192, 128, 64)] == [(16, 12), (16, 8), (8, 8)]
    with pytest.raises(ValueError, match="pool cannot keep exactly 37"):
        vlm.pool_grid(37, 24)
    for n in (144, 576):
        for b in range(1, n + 1):
            r = vlm.fastv_ratio(n, b)
            assert math.floor(n * (1.0 - r) + 1e-9) == b


def test_fixed_budget_methods_reach_the_budget_exactly(model):
    x = inputs()
    for b in (48, 16):
        for v in vlm.budget_variants(TINY, [b], ["vit", "fastv", "random", "pool"], graph_only=False)[1:]:
            saint.patch(model, **v.kwargs)
            with torch.inference_mode():
                vlm.prefill(model, x)
            t = vlm.visual_tokens(model, x)
            assert t["after_per_sample"] == [b, b], v.name
            if v.method == "fastv":  # all n tokens up to layer K, then exactly b
                k = TINY.fastv_layer
                assert t["per_layer"] == [float(N)] * k + [float(b)] * (6 - k)
            else:
                assert t["to_llm"] == b and t["per_layer"] == [float(b)] * 6, v.name
    saint.unpatch(model)


def test_keep_target_and_floor_by_hand():
    """Halving 8 visual tokens after layers 1 and 2 of 4: 8, 8, 4, 2 enter the layers;
    with 8 text tokens 16, 16, 12, 10 of 16."""
    assert vlm.keep_target(8, 2, 4, (1, 2), text=0) == pytest.approx((8 + 8 + 4 + 2) / 32)
    assert vlm.keep_target(8, 2, 4, (1, 2), text=8) == pytest.approx((16 + 16 + 12 + 10) / 64)
    assert vlm.keep_target(8, 8, 4, (1, 2), text=3) == 1.0
    assert vlm.floor_count(576, 3) == 72 and vlm.floor_count(375, 3) == 46


def test_calibrated_taus_are_reproduced_by_the_real_prefill(model):
    """saint.calibrate picks one tau per pruning layer for the keep target of the budget;
    the prefill with those taus has exactly the calibrated token counts and ends near the
    budget (the same share removed in every layer); a budget below what the layers can
    reach is flagged."""
    x = inputs()
    for v in vlm.budget_variants(TINY, [32, 16], ["llm", "hybrid"], graph_only=False)[1:]:
        cal = vlm.calibrate_variant(model, x, v)
        assert cal["reachable"] and sorted(v.kwargs["llm_tau"]) == [1, 2, 3, 4]
        assert {str(k): t for k, t in v.kwargs["llm_tau"].items()} == cal["llm_tau"]
        saint.patch(model, **v.kwargs)
        with torch.inference_mode():
            vlm.prefill(model, x)
        t = vlm.visual_tokens(model, x)
        saint.unpatch(model)
        kept = (x.text_tokens + t["layer_mean"]) / (x.text_tokens + t["to_llm"])
        assert kept == pytest.approx(cal["keep_achieved"]) and abs(cal["keep_achieved"] / cal["keep_target"] - 1) < 0.01
        assert abs(t["after"] - v.budget) <= 0.15 * v.budget, v.name
    unreachable = vlm.budget_variants(TINY, [4], ["llm"], graph_only=False)[1]
    cal = vlm.calibrate_variant(model, x, unreachable)
    assert not cal["reachable"] and cal["floor"] == 9 and not cal["reached"]


# ---------------------------------------------------------------------------- decode & cache
@pytest.mark.parametrize("family, kw", [
    ("llava", None), ("llava", dict(mode="hybrid", vit_keep=90, vit_layer=1, llm_layers=(1, 3), llm_tau=0.5)),
    ("llava", dict(method="fastv", fastv_layer=2, fastv_ratio=0.75)),
    ("qwen", None), ("qwen", dict(mode="hybrid", vit_ratio=0.5, vit_layer=1, llm_layers=(1, 3), llm_tau=0.5)),
    ("qwen", dict(method="fastv", fastv_layer=2, fastv_ratio=0.75)),
    ("qwen3", None), ("qwen3", dict(mode="hybrid", vit_ratio=0.5, vit_layer=1, llm_layers=(1, 3), llm_tau=0.5)),
])
def test_decode_loop_equals_greedy_generate(model, qwen, qwen3, family, kw):
    """The prepared decode positions (Qwen-VL: M-RoPE's, below the sequence index) are
    those ``generate`` computes: the same greedy tokens, pruned or not."""
    m, g = {"llava": (model, TINY), "qwen": (qwen, QTINY), "qwen3": (qwen3, Q3TINY)}[family]
    x = inputs(new=4, geometry=g)
    if kw is not None:
        saint.patch(m, **kw)
    with torch.inference_mode():
        fed = vlm.decode(m, x, vlm.prefill(m, x))
        ref = m.generate(**x.batch, max_new_tokens=4, do_sample=False, suppress_tokens=g.suppressed_ids,
                         pad_token_id=0)[:, x.length:]
    if kw is not None:
        saint.unpatch(m)
    assert torch.equal(fed, ref)


def test_kv_cache_bytes_follow_the_kept_tokens(model):
    x = inputs(batch=2)
    heads, dim, depth = 4, 16, 6
    b, k = 16, TINY.fastv_layer
    saint.patch(model, method="fastv", fastv_layer=k, fastv_ratio=vlm.fastv_ratio(N, b))
    with torch.inference_mode():
        out = vlm.prefill(model, x)
    saint.unpatch(model)
    per_token = 2 * heads * dim * 4 * 2  # keys + values, fp32, batch 2
    expect = per_token * (k * x.length + (depth - k) * (x.length - N + b))
    assert vlm.kv_cache_bytes(out.cache) == expect


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args, match", [
    (dict(budgets=[144]), "budget 144 must be an integer in 1..143"),
    (dict(budgets=[0]), "budget 0"),
    (dict(budgets=[16], methods=["tome"]), "unknown method"),
    (dict(budgets=[100], methods=["hybrid"]), "hybrid keeps 94 of 144 visual tokens"),
    (dict(budgets=[37], methods=["pool"]), "pool cannot keep exactly 37"),
])
def test_bad_variants_raise(args, match):
    with pytest.raises(ValueError, match=match):
        vlm.budget_variants(TINY, **args)


def test_cli_reports_bad_input(capsys):
    assert main(["vlm-bench", "--geometry", "tiny", "--device", "cpu", "--budgets", "200"]) == 2
    assert "budget 200" in capsys.readouterr().err
    assert main(["vlm-bench", "--geometry", "tiny", "--device", "cpu", "--llm-layers", "1"]) == 2
    assert "START,END" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end
def test_cli_tiny_run_writes_json(tmp_path, capsys):
    path = tmp_path / "vlm.json"
    rc = main(["vlm-bench", "--geometry", "tiny", "--device", "cpu", "--threads", "1", "--batch-size", "2",
               "--prompt-len", "8", "--new-tokens", "2", "--warmup", "0", "--repeats", "2", "--budgets", "48,16",
               "--json", str(path), "--no-progress", "--clock", "process"])
    assert rc == 0
    shown = capsys.readouterr().out
    assert "FLOPs x 7B" in shown
    assert "TTFT ms min" in shown and "TTFT spread" in shown and "SAINT graph step" in shown and "saint-hybrid@16" in shown
    report = json.loads(path.read_text())
    assert set(report) >= {"environment", "geometry", "model", "settings", "variants", "graph_overhead",
                           "seconds", "wall_seconds"}
    assert set(report["environment"]) >= {"date", "device", "cpu", "torch_threads", "versions", "command"}
    assert "transformers" in report["environment"]["versions"]
    s = report["settings"]
    assert (s["batch_size"], s["text_tokens"], s["image_tokens"], s["new_tokens"], s["repeats"]) == (2, 8, N, 2, 2)
    assert s["budgets"] == [48, 16] and s["dtype"] == "fp32" and s["clock"] == "process CPU time"
    names = [r["name"] for r in report["variants"]]
    assert names[:2] == ["unpruned", "graph-only (SAINT llm step, drops nothing)"]
    assert len(names) == 2 + 2 * 6
    for r in report["variants"]:
        assert set(r) >= {"ttft", "decode_per_token", "ttft_speedup", "decode_speedup", "visual_tokens",
                          "kv_cache_mb", "peak_memory_mb", "lm_prefill_ms", "selection_ms",
                          "prefill_gflops_per_prompt", "patch_kwargs", "calibration"}
        assert len(r["ttft"]["times_ms"]) == 2 and len(r["decode_per_token"]["times_ms"]) == 2
        times = r["ttft"]["times_ms"]
        assert r["ttft"]["ms_min"] == min(times) and r["ttft"]["ms_spread"] == max(times) - min(times)
        t = r["visual_tokens"]
        if r["method"] in ("vit", "random", "pool", "fastv"):
            assert t["after_per_sample"] == [r["budget"]] * 2, r["name"]
        elif r["method"] in ("llm", "hybrid"):
            text = s["text_tokens"]
            kept = (text + t["layer_mean"]) / (text + t["to_llm"])
            assert kept == pytest.approx(r["calibration"]["keep_achieved"])
            assert r["patch_kwargs"]["llm_tau"] == r["calibration"]["llm_tau"]
        else:
            assert t["per_layer"] == [float(N)] * 6
    a = report["analytic"]
    assert a["reference"] == "tiny" and a["tower_llm_flops_ratio"]["measured"] == a["tower_llm_flops_ratio"]["reference"]
    for r in report["variants"]:
        assert r["analytic_ref_gflops"] == pytest.approx(r["analytic_gflops"])  # tiny is its own reference
        if r["method"] in ("unpruned", "graph-only"):
            assert r["analytic_ref_speedup"] == 1.0
        elif r["method"] in ("vit", "random", "pool"):
            assert r["analytic_ref_speedup"] > 1.0
    base, graph = report["variants"][:2]
    assert base["selection_ms"] is None and graph["selection_ms"] > 0
    assert graph["kv_cache_mb"] == base["kv_cache_mb"]
    assert graph["prefill_gflops_per_prompt"] > base["prefill_gflops_per_prompt"] * 0.99
    o = report["graph_overhead"]
    assert o["selection_ms"] == graph["selection_ms"]
    fastv = next(r for r in report["variants"] if r["name"] == "fastv@16")
    assert fastv["prefill_gflops_per_prompt"] < base["prefill_gflops_per_prompt"]
    assert fastv["kv_cache_mb"] < base["kv_cache_mb"]


def run_vlm_cpu():
    spec = importlib.util.spec_from_file_location("run_vlm_cpu", ROOT / "benchmarks" / "run_vlm_cpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_benchmark_script_writes_md_and_json(tmp_path, capsys):
    script = run_vlm_cpu()
    argv = ["--geometry", "tiny", "--threads", "1", "--methods", "vit,pool", "--budgets", "16", "--warmup", "0",
            "--repeats", "1", "--new-tokens", "1", "--no-flops", "--no-graph-only", "--no-progress",
            "--out-dir", str(tmp_path)]
    assert script.main(argv) == 0
    md = (tmp_path / "vlm_tiny_cpu_fp32.md").read_text()
    report = json.loads((tmp_path / "vlm_tiny_cpu_fp32.json").read_text())
    assert report["environment"]["command"].startswith("python benchmarks/run_vlm_cpu.py --geometry tiny")
    assert report["settings"]["device"] == "cpu" and report["graph_overhead"] is None
    assert report["settings"]["clock"] == "wall time" and "timing (wall time)" in md
    assert [r["name"] for r in report["variants"]] == ["unpruned", "saint-vit@16", "pool@16"]
    for key in ("- date:", "- device:", "torch threads: 1", "- versions:", "transformers", "- command: `python"):
        assert key in md, key
    assert "| saint-vit@16 | 16 |" in md
    assert md.startswith("# LLaVA-1.5 latency at equal visual-token budgets (fp32, cpu)")


@pytest.mark.parametrize("geometry,title,family", [("qwen_tiny", "Qwen2.5-VL", "qwen2_5_vl"),
                                                    ("qwen3_tiny", "Qwen3-VL", "qwen3_vl")])
def test_benchmark_script_runs_qwen(geometry, title, family, tmp_path, capsys):
    """The same script on Qwen2.5-VL and Qwen3-VL: its own output name, title, markers in
    the prompt note, the tower drop at the budget, the analytic reference column at the
    tiny geometry itself, and (Qwen3-VL) the tower's deepstack blocks in the record."""
    script = run_vlm_cpu()
    argv = ["--geometry", geometry, "--threads", "1", "--methods", "vit,pool", "--budgets", "9", "--warmup", "0",
            "--repeats", "1", "--new-tokens", "1", "--no-flops", "--no-graph-only", "--no-progress",
            "--out-dir", str(tmp_path)]
    assert script.main(argv) == 0
    md = (tmp_path / f"vlm_{geometry}_cpu_fp32.md").read_text()
    report = json.loads((tmp_path / f"vlm_{geometry}_cpu_fp32.json").read_text())
    assert md.startswith(f"# {title} latency at equal visual-token budgets (fp32, cpu)")
    assert "(+ 2 image start/end markers)" in md and "| saint-vit@9 | 9 |" in md and "| pool@9 | 9 |" in md
    g = report["geometry"]
    assert (g["family"], g["image_tokens"], g["tower_tokens"], g["reference"]) == (family, 36, 144, None)
    if family == "qwen2_5_vl":
        s = report["settings"]
        assert (s["prompt_len"], s["text_tokens"], s["image_tokens"], s["skipped"]) == (64, 66, 36, [])
    else:
        assert g["vision"]["deepstack_visual_indexes"] == [0, 2]
    vit = report["variants"][1]
    assert vit["visual_tokens"]["vision_tower_per_layer"] == [144.0, 144.0, 36.0, 36.0]
    assert vit["analytic_ref_speedup"] > 1.0

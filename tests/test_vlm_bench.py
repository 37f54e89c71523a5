"""``saint vlm-bench``: budgets reached exactly by the fixed-budget methods, tau
calibration reproduced by the timed run, the decode loop equal to ``generate``, exact
KV-cache sizes, the geometries, the CLI / JSON and the benchmark script (tiny random
LLaVA, no timing assertions)."""

from __future__ import annotations

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
N = TINY.n_patches  # 144
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return vlm.build_llava(TINY)


def inputs(batch: int = 2, prompt_len: int = 10, new: int = 3) -> vlm.VlmInputs:
    return vlm.make_inputs(TINY, batch, prompt_len, new, seed=3)


# ---------------------------------------------------------------------------- geometry
def test_geometries_are_llava_15():
    """cpu and full share LLaVA-1.5's vision side; full is the 7B language model."""
    for name in ("cpu", "full"):
        g = vlm.GEOMETRIES[name]
        assert g.n_patches == 576 and g.default_budgets() == [192, 128, 64] and g.hybrid_vit_keep == 375
        assert g.vision == dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    full = vlm.build_llava(vlm.GEOMETRIES["full"], device="meta", dtype=torch.bfloat16)
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
    assert scaled.reference == "full" and scaled.n_patches == 576
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


def test_tau_calibration_is_reproduced_by_the_real_prefill(model):
    """The calibration runs the LLM on precomputed image features; the prefill with
    pixels gives exactly the calibrated count, and llm_tau is stored on the variant."""
    x = inputs()
    history: list[tuple[float, float]] = []
    for v in vlm.budget_variants(TINY, [32, 16], ["llm"], graph_only=False)[1:]:
        cal = vlm.calibrate_tau(model, x, v, history=history)
        assert cal["reachable"] and abs(cal["achieved"] - v.budget) <= 1.5
        assert v.kwargs["llm_tau"] == cal["llm_tau"]
        saint.patch(model, **v.kwargs)
        with torch.inference_mode():
            vlm.prefill(model, x)
        assert vlm.visual_tokens(model, x)["after"] == cal["achieved"]
    assert sum(t == -1.0 for t, _ in history) == 1  # the second budget reused the first's evaluations
    unreachable = vlm.budget_variants(TINY, [2], ["llm"], graph_only=False)[1]
    cal = vlm.calibrate_tau(model, x, unreachable)
    assert not cal["reachable"] and cal["achieved"] == cal["floor"] > 2
    saint.unpatch(model)


# ---------------------------------------------------------------------------- decode & cache
@pytest.mark.parametrize("kw", [None, dict(mode="hybrid", vit_keep=90, vit_layer=1, llm_layers=(1, 3), llm_tau=0.5),
                                dict(method="fastv", fastv_layer=2, fastv_ratio=0.75)])
def test_decode_loop_equals_greedy_generate(model, kw):
    x = inputs(new=4)
    if kw is not None:
        saint.patch(model, **kw)
    with torch.inference_mode():
        fed = vlm.decode(model, x, vlm.prefill(model, x))
        ref = model.generate(input_ids=x.input_ids, attention_mask=x.attention_mask, pixel_values=x.pixel_values,
                             max_new_tokens=4, do_sample=False, suppress_tokens=[TINY.image_token_id],
                             pad_token_id=0)[:, x.length:]
    if kw is not None:
        saint.unpatch(model)
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
    (dict(budgets=[100], methods=["hybrid"]), "hybrid keeps 94 patches"),
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
               "--json", str(path), "--no-progress"])
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
    assert s["budgets"] == [48, 16] and s["dtype"] == "fp32"
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
            assert r["calibration"]["achieved"] == t["after"]
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


def test_benchmark_script_writes_md_and_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("run_vlm_cpu", ROOT / "benchmarks" / "run_vlm_cpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--geometry", "tiny", "--threads", "1", "--methods", "vit,pool", "--budgets", "16", "--warmup", "0",
            "--repeats", "1", "--new-tokens", "1", "--no-flops", "--no-graph-only", "--no-progress",
            "--out-dir", str(tmp_path)]
    assert script.main(argv) == 0
    md = (tmp_path / "vlm_tiny_cpu_fp32.md").read_text()
    report = json.loads((tmp_path / "vlm_tiny_cpu_fp32.json").read_text())
    assert report["environment"]["command"].startswith("python benchmarks/run_vlm_cpu.py --geometry tiny")
    assert report["settings"]["device"] == "cpu" and report["graph_overhead"] is None
    assert [r["name"] for r in report["variants"]] == ["unpruned", "saint-vit@16", "pool@16"]
    for key in ("- date:", "- device:", "torch threads: 1", "- versions:", "transformers", "- command: `python"):
        assert key in md, key
    assert "| saint-vit@16 | 16 |" in md

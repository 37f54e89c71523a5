"""Measurement layer: spec parsing, exact FLOP counts (hand-computed), round-robin timing
structure, the harness's switching between variants, matched schedules and Pareto
marking, and a tiny end-to-end bench / sweep (no timing assertions)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import timm
import torch

import saint
from saint.assets import ImageRecord
from saint.bench.bench import run_bench
from saint.bench.sweep import (
    default_tome_rs,
    matched_drop_schedule,
    pareto_mask,
    run_sweep,
    write_sweep,
)
from saint.measure import flops as flops_mod
from saint.measure.harness import Harness
from saint.measure.images import ImageSet
from saint.measure.timing import paired_speedup, time_paired, time_round_robin, timed_rounds
from saint.spec import (
    BASELINE,
    Variant,
    parse_kwargs,
    parse_method_spec,
    parse_value,
    variant_label,
    with_baseline,
)

D, HIDDEN, DEPTH, CLASSES, PATCH, IMG = 32, 128, 4, 10, 8, 32
N_PATCHES = (IMG // PATCH) ** 2


def tiny_vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=IMG, patch_size=PATCH, depth=DEPTH, embed_dim=D, num_heads=2, num_classes=CLASSES)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def vit_flops(tokens_in: list[int], tokens_out: list[int], batch: int = 1) -> int:
    """Hand count for the tiny ViT: patch conv, per block qkv + attention (QK^T and AV) +
    proj on the tokens entering, MLP on the tokens left after pruning, then the head."""
    total = 2 * N_PATCHES * (3 * PATCH * PATCH) * D + 2 * D * CLASSES
    for n, m in zip(tokens_in, tokens_out, strict=True):
        total += 2 * n * D * 3 * D + 2 * (2 * n * n * D) + 2 * n * D * D + 2 * m * D * HIDDEN * 2
    return batch * total


# ----------------------------------------------------------------------------- spec parsing


def test_parse_values_lists_and_dicts() -> None:
    assert parse_value("8") == 8 and parse_value("0.9") == 0.9 and parse_value("batch") == "batch"
    assert parse_value("true") is True and parse_value("none") is None
    assert parse_value("0.9/0.8/0.8") == [0.9, 0.8, 0.8]
    assert parse_value("0#0.9/3#0.8") == {0: 0.9, 3: 0.8}
    assert parse_kwargs("tau=0.9,k=5,layers=0/1") == {"tau": 0.9, "k": 5, "layers": [0, 1]}
    assert parse_kwargs("") == {}
    for bad in ("tau", "tau=", "tau=0.9,tau=0.8", "1x=2", "tau=0.9//0.8", "tau=0#0.9/0.8"):
        with pytest.raises(ValueError):
            parse_kwargs(bad)


def test_parse_method_spec_and_round_trip() -> None:
    v = parse_method_spec("saint:tau=0.95/0.9/0.9,k=4,rate=batch")
    assert (v.method, v.kwargs) == ("saint", {"tau": [0.95, 0.9, 0.9], "k": 4, "rate": "batch"})
    assert parse_method_spec(variant_label(v.method, v.kwargs)).kwargs == v.kwargs
    assert parse_method_spec("none") is BASELINE and parse_method_spec("tome:r=8").kwargs == {"r": 8}
    assert parse_method_spec("tome:r=8,order=reference").kwargs == {"r": 8, "order": "reference"}
    with pytest.raises(ValueError, match="unknown method"):
        parse_method_spec("nosuch:r=1")
    with pytest.raises(TypeError, match="does not take"):
        parse_method_spec("tome:tau=0.9")
    with pytest.raises(ValueError, match="takes no settings"):
        parse_method_spec("none:r=1")
    with pytest.raises(ValueError, match="more than once"):
        with_baseline([parse_method_spec("tome:r=2"), parse_method_spec("tome:r=2")])
    # one block is written layers=3 (a list 0/1/2)
    assert parse_method_spec("saint_plus:tau=0.9,layers=3").kwargs == {"tau": 0.9, "layers": [3]}


@pytest.mark.parametrize("spec, err, match", [
    ("tome:r=abc", TypeError, "r must be a number, got str"),
    ("saint:tau=nan", ValueError, "tau=nan must be a finite number"),
    ("saint:tau=0.9/0.8,layers=0/1/2", ValueError, "tau has 2 values but there are 3 layers"),
    ("saint:tau=2#0.9/7#0.8,layers=2/5", ValueError, r"tau is given for blocks \[2, 7\] but layers are \[2, 5\]"),
    ("tome:r=8,layers=-1/2", ValueError, "are negative"),
    ("budget:keep=10", ValueError, "needs explicit layers"),
])
def test_a_spec_s_values_are_checked_before_a_model_loads(spec: str, err: type, match: str) -> None:
    """Values are checked when the spec is parsed (on a model deep enough for the blocks it
    names), not after the command has loaded a model and started timing."""
    with pytest.raises(err, match=match):
        parse_method_spec(spec)
    assert parse_method_spec(spec, validate=False).method == spec.partition(":")[0]


# ----------------------------------------------------------------------------- FLOPs


def test_linear_flops_exact() -> None:
    lin = torch.nn.Linear(5, 7)
    assert flops_mod.model_flops(lin, torch.randn(3, 5)) == 2 * 3 * 5 * 7


@pytest.mark.parametrize("fused", [True, False])
def test_tiny_vit_flops_match_hand_count(fused: bool) -> None:
    """Fused SDPA (incl. the CPU flash kernel torch does not register) and eager attention
    count the same, and both equal the hand computation."""
    model = tiny_vit()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    n = N_PATCHES + 1
    expected = vit_flops([n] * DEPTH, [n] * DEPTH, batch=2)
    assert flops_mod.model_flops(model, torch.randn(2, 3, IMG, IMG)) == expected


@pytest.mark.parametrize("cross", [False, True])
def test_multihead_attention_fast_path_counts_as_its_slow_path(cross: bool) -> None:
    """``nn.MultiheadAttention`` in inference runs one fused op torch's counter has no formula
    for; saint's counts it as the products its slow path runs (the counter sees those):
    the same total, and the hand count, for self- and cross-attention."""
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    q = torch.randn(2, 5, 16)
    kv = torch.randn(2, 7, 16) if cross else q
    fast, per_op = flops_mod.count_flops(lambda: mha(q, kv, kv, need_weights=False), mha)
    assert any("_native_multi_head_attention" in op for op in per_op) or cross
    slow, slow_ops = flops_mod.count_flops(lambda: mha(q, kv, kv, need_weights=False, attn_mask=torch.zeros(5, kv.shape[1])), mha)
    assert not any("_native_multi_head_attention" in op for op in slow_ops)
    s = kv.shape[1]
    assert fast == slow == 2 * 2 * 16 * 16 * (2 * 5 + 2 * s) + 4 * 2 * 5 * s * 16


def test_pruned_flops_match_hand_count_from_stats() -> None:
    model = tiny_vit()
    saint.patch(model, "random", r=3)  # blocks 0, 1 drop 3 each; no extra matmuls
    x = torch.randn(1, 3, IMG, IMG)
    counted = flops_mod.model_flops(model, x)
    tokens = [t[0] for t in saint.stats(model).tokens]
    assert tokens == [17, 14, 11, 11]
    assert counted == vit_flops(tokens, [14, 11, 11, 11])
    saint.unpatch(model)
    assert counted < flops_mod.model_flops(model, x)


# ----------------------------------------------------------------------------- timing


def test_round_robin_order_warmup_and_counts() -> None:
    calls: list[str] = []

    def setup(name: str):
        def prepare():
            calls.append("setup-" + name)
            return lambda: calls.append(name)

        return prepare

    timings = time_round_robin([setup("a"), setup("b"), setup("c")], batch_size=4, device="cpu",
                               warmup=1, repeats=2)
    runs = [c for c in calls if not c.startswith("setup")]
    assert runs == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # start rotates each round
    assert all(c == "setup-" + r for c, r in zip(calls[::2], runs, strict=True))  # set up right before
    assert [len(t.times) for t in timings] == [2, 2, 2]  # warm-up not kept
    assert timings[0].images_per_s == 4 / timings[0].median
    with pytest.raises(ValueError, match="repeats"):
        time_round_robin([setup("a")], batch_size=1, device="cpu", repeats=0)


def test_paired_timing_times_each_variant_beside_the_baseline() -> None:
    calls: list[str] = []
    now = [0.0]
    cost = {"base": 6.0, "a": 2.0, "b": 3.0}

    def setup(name: str):
        def prepare():
            return lambda: (calls.append(name), now.__setitem__(0, now[0] + cost[name]))

        return prepare

    timings, baselines = time_paired([setup("base"), setup("a"), setup("b")], batch_size=2, device="cpu",
                                     warmup=1, repeats=2, clock=lambda: now[0])
    # one rotation per variant with the baseline, warm-up round included, none with both variants
    assert calls == ["base", "a", "a", "base", "base", "a", "base", "b", "b", "base", "base", "b"]
    assert [t.times for t in timings] == [[6.0] * 4, [2.0, 2.0], [3.0, 3.0]]  # the baseline pools its pairs
    assert [b.times for b in baselines[1:]] == [[6.0, 6.0], [6.0, 6.0]]
    assert baselines[0] is timings[0]
    assert len(calls) == 2 * timed_rounds("paired", 3, warmup=1, repeats=2) == 12  # two calls a round
    assert timed_rounds("round_robin", 3, warmup=1, repeats=2) == 3
    with pytest.raises(ValueError, match="at least one variant"):
        time_paired([setup("base")], batch_size=1, device="cpu")


def test_paired_bench_rows_take_the_ratio_of_each_pair() -> None:
    from saint.bench.bench import rows_from_measurements
    from saint.measure.harness import Measurement
    from saint.measure.timing import Timing

    base, fast = BASELINE, Variant("tome:r=2", "tome", {"r": 2})
    pooled = Timing([4.0, 8.0, 100.0, 100.0], 1)  # a slow spell during the second pair
    rows = rows_from_measurements([
        Measurement(base, pooled, 10.0, [17.0], None, baseline_timing=pooled),
        Measurement(fast, Timing([2.0, 4.0], 1), 5.0, [9.0], None, baseline_timing=Timing([4.0, 8.0], 1)),
        Measurement(fast, Timing([25.0, 50.0], 1), 5.0, [9.0], None, baseline_timing=Timing([100.0, 100.0], 1)),
    ])
    assert rows[0]["speedup"] == 1.0
    assert rows[1]["speedup"] == 2.0 and rows[1]["speedup_best"] == 2.0 and rows[1]["efficiency"] == 1.0
    assert rows[2]["speedup"] == 3.0  # ratios 4 and 2 in its own rounds, not the pooled median's
    with pytest.raises(ValueError, match="pairing"):
        Harness(tiny_vit()).measure([base], torch.randn(1, 3, IMG, IMG), pairing="pairs")


def test_paired_speedup_is_the_median_of_per_round_ratios() -> None:
    # per-round ratios 2, 4, 2: the disturbed round (base 8 s) does not move the median
    # (their mean would read 2.67, the ratio of the sums 16 / 6 = 2.67)
    assert paired_speedup([2.0, 8.0, 6.0], [1.0, 2.0, 3.0]) == 2.0
    assert paired_speedup([3.0, 5.0], [1.0, 1.0]) == 4.0  # even count: mean of the middle two
    with pytest.raises(ValueError, match="same number"):
        paired_speedup([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="same number"):
        paired_speedup([], [])
    with pytest.raises(ValueError, match="positive"):
        paired_speedup([1.0], [0.0])


def test_median_interval_brackets_the_median_and_narrows_with_agreeing_rounds() -> None:
    from saint.timing import median_interval

    assert median_interval([1.02] * 7) == (1.02, 1.02)  # every resample's median is the value
    values = [0.99, 1.00, 1.01, 1.02, 1.03, 1.04, 1.05, 1.20, 0.90]
    low, high = median_interval(values)
    assert min(values) <= low <= statistics.median(values) <= high <= max(values)
    assert median_interval(values) == (low, high)  # seeded
    narrow = median_interval([1.02 + 0.001 * (i % 3) for i in range(30)])
    assert narrow[1] - narrow[0] <= 0.002 < high - low
    assert median_interval(values, level=0.5)[1] - median_interval(values, level=0.5)[0] <= high - low
    with pytest.raises(ValueError, match="at least one"):
        median_interval([])
    with pytest.raises(ValueError, match="level"):
        median_interval([1.0], level=1.0)
    with pytest.raises(ValueError, match="draws"):
        median_interval([1.0], draws=0)


# ----------------------------------------------------------------------------- harness


def test_harness_switches_variants_exactly() -> None:
    model = tiny_vit()
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        expected_logits = model(x)
    h = Harness(model)
    tome = Variant("tome:r=2", "tome", {"r": 2})
    emb0, logits0, tok0, _ = h.embed(x)
    h.activate(tome)
    emb1, _, tok1, _ = h.embed(x)
    assert saint.is_patched(model) and tok1 == [[17] * 3, [15] * 3, [13] * 3, [11] * 3]
    h.activate(BASELINE)
    emb2, logits2, tok2, flops2 = h.embed(x, count=True)
    assert not saint.is_patched(model)
    assert torch.equal(logits0, expected_logits) and torch.equal(logits2, expected_logits)
    assert torch.equal(emb0, emb2) and not torch.equal(emb0, emb1)
    assert tok0 == tok2 == [[17] * 3] * DEPTH
    assert flops2 == vit_flops([17] * DEPTH, [17] * DEPTH, batch=3)
    with pytest.raises(ValueError, match="unpatched"):
        Harness(saint.patch(tiny_vit(), "tome", r=1))


def test_bench_report_keys_and_ratios() -> None:
    h = Harness(tiny_vit())
    variants = [parse_method_spec("tome:r=2"), parse_method_spec("random:r=3")]
    report = run_bench(h, variants, torch.randn(2, 3, IMG, IMG), warmup=0, repeats=2)
    json.dumps(report)  # JSON-ready
    rows = report["results"]
    assert [r["label"] for r in rows] == ["unpruned", "tome:r=2", "random:r=3"]
    for r in rows:
        for key in ("gflops_per_image", "ideal_speedup", "tokens_per_block", "mean_tokens", "peak_memory_mb",
                    "images_per_s", "ms_min", "ms_median", "speedup", "efficiency", "times_ms"):
            assert key in r, key
        assert len(r["times_ms"]) == 2
    assert rows[0]["speedup"] == 1.0 and rows[0]["ideal_speedup"] == 1.0
    assert rows[0]["gflops_per_image"] * 1e9 == pytest.approx(vit_flops([17] * 4, [17] * 4), rel=1e-12)
    assert rows[2]["tokens_per_block"] == [17, 14, 11, 11]
    assert rows[2]["gflops_per_image"] * 1e9 == pytest.approx(vit_flops([17, 14, 11, 11], [14, 11, 11, 11]), rel=1e-12)
    assert all(r["ideal_speedup"] > 1 for r in rows[1:])



def test_one_image_at_a_time_costs_what_each_image_costs_in_a_packed_batch() -> None:
    """Per-image pruning gives every image the tokens it has alone, so its single-image
    calls keep the packed batch's tokens and count its FLOPs (but for the selection's
    similarities, which the batch works out on its padded view), and return its rows."""
    x = torch.randn(3, 3, IMG, IMG)
    variants = [parse_method_spec("saint:tau=0.2,k=1"), parse_method_spec("tome:r=2")]
    together = run_bench(Harness(tiny_vit()), variants, x, warmup=0, repeats=0)["results"]
    alone = Harness(tiny_vit(), one_at_a_time=True)
    apart = run_bench(alone, variants, x, warmup=0, repeats=0)["results"]
    assert together[1]["layout"] == "packed"  # ragged: the images keep different counts
    for a, b in zip(together, apart, strict=True):
        assert a["label"] == b["label"] and a["tokens_per_block"] == b["tokens_per_block"]
        assert b["gflops_per_image"] <= a["gflops_per_image"]
        assert b["gflops_per_image"] == pytest.approx(a["gflops_per_image"], rel=1e-3)
    assert together[0]["gflops_per_image"] == apart[0]["gflops_per_image"]
    alone.activate(variants[0])
    with torch.no_grad():
        rows = alone.forward(x)
        assert [r.shape[0] for r in rows] == [1, 1, 1]
        torch.testing.assert_close(torch.cat(rows), alone.model(x), rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="tensor batch"):
        alone.forward([x])

# ----------------------------------------------------------------------------- sweep


def test_matched_schedule_reproduces_rounded_counts() -> None:
    assert matched_drop_schedule([17, 14.4, 11.6, 11.6], [0, 1]) == [3, 2]
    assert matched_drop_schedule([17, 14.4, 11.6, 11.6], [0, 1, 3]) == [3, 2, 0]  # last block unobservable
    with pytest.raises(ValueError, match="outside"):
        matched_drop_schedule([17, 14], [2])


def test_pareto_and_default_tome_grid() -> None:
    assert pareto_mask([1.0, 2.0, 1.5, 2.0], [1.0, 0.5, 0.4, 0.6]) == [True, False, False, True]
    rs = default_tome_rs(256, 12)
    assert rs == sorted(rs) and len(rs) == len(set(rs))
    for r in rs:  # every r fits ToMe's per-block limit at every block
        n = 256
        for _ in range(12):
            assert r <= n // 2
            n -= r


def test_tiny_sweep_end_to_end(tmp_path) -> None:
    from PIL import Image

    records = []
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray((torch.rand(36, 40, 3, generator=g) * 255).byte().numpy()).save(p)
        records.append(ImageRecord(p, i % 3, "test"))
    model = tiny_vit()
    from saint import assets

    transform = assets.eval_transform(model)
    h = Harness(model)
    x = assets.load_images(records[:2], transform)[0]
    report = run_sweep(h, ImageSet(records, "folder", "6 test images"), transform, x, taus=[-1.0],
                       saint_args={"k": 1}, tome_rs=[1], batch_size=4, warmup=0, repeats=1, pairing="paired")
    rows = report["results"]
    assert report["settings"]["pairing"] == "paired"
    assert rows[0]["speedup"] == 1.0 and all(r["speedup"] > 0 for r in rows[1:])
    assert [r["method"] for r in rows] == ["unpruned", "saint", "tome", "random", "attn"]
    saint_row = rows[1]
    # tau=-1, k=1: every candidate is linked, so SAINT halves the prunable tokens in blocks 0, 1
    assert saint_row["tokens_per_block"] == [17, 9, 5, 5]
    assert rows[3]["settings"] == {"r": [8, 4], "layers": [0, 1]}
    # every image of the timing batch keeps the same count: no ragged batch to pack
    assert rows[0]["layout"] is None and {r["layout"] for r in rows[1:]} == {"rectangular"}
    assert rows[3]["tokens_per_block"] == rows[4]["tokens_per_block"] == [17, 9, 5, 5]
    # the unpruned row's fidelity is computed (against itself), and no pruned row beats it
    assert rows[0]["pareto"] and rows[0]["centered_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["retrieval_at_1"] == 1.0 and rows[0]["top1_agreement"] == 1.0
    assert all(r["centered_cosine"] < rows[0]["centered_cosine"] for r in rows[1:])
    # FLOPs over the set: random drops the same count in every image, so no padding
    assert rows[3]["gflops_per_image"] * 1e9 == pytest.approx(vit_flops([17, 9, 5, 5], [9, 5, 5, 5]), rel=1e-12)
    assert rows[0]["gflops_per_image"] * 1e9 == pytest.approx(vit_flops([17] * 4, [17] * 4), rel=1e-12)
    for r in rows:
        assert {"flops_ratio", "speedup", "centered_cosine", "retrieval_at_1", "top1_agreement"} <= set(r)
    paths = write_sweep(report, tmp_path / "out" / "s", "tiny")
    assert [p.suffix for p in paths] == [".json", ".csv", ".md", ".png"]
    assert (tmp_path / "out" / "s.csv").read_text().count("\n") == 1 + len(rows)
    assert "| saint | tau=-1 |" in (tmp_path / "out" / "s.md").read_text()
    md = (tmp_path / "out" / "s.md").read_text()
    assert "- how the timing batch ran: rectangular (saint, tome, random, attn)\n" in md
    assert "each variant paired with the unpruned model" in md and "in a round robin of its own" in md


def test_peak_memory_sees_a_large_allocation() -> None:
    from saint.measure.memory import peak_memory_method

    if peak_memory_method("cpu") is None:
        pytest.skip("no /proc peak-RSS reset on this platform")
    # 64 MiB, touched, freed again before the call returns. Run in a fresh process: in a
    # long-lived one the allocator may serve it from memory that is already resident,
    # which RSS cannot see (the figure is documented as approximate for that reason).
    code = ("import torch; from saint.measure.memory import peak_memory_mb; "
            "print(peak_memory_mb(lambda: float(torch.ones(16 * 2**20).sum()), 'cpu'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out.strip().splitlines()[-1]) >= 60


def test_max_tome_r_everywhere_known_answer() -> None:
    from saint.bench.sweep import max_tome_r_everywhere

    # 256 patches, 12 blocks: r=19 leaves 47 tokens at block 11 (23 may merge); r=20 leaves 36 (18)
    assert max_tome_r_everywhere(256, 12) == 19
    assert max_tome_r_everywhere(16, 4) == 3


def test_tome_feasibility_follows_the_inflection_schedule() -> None:
    from saint.bench.sweep import _tome_feasible

    # r=19 fits 256 patches x 12 blocks constant; a decreasing ramp merges more early
    assert _tome_feasible(256, 12, 19) and _tome_feasible(256, 12, 19, -0.5)
    assert not _tome_feasible(256, 12, 20) and not _tome_feasible(20, 3, 8, -1.0)  # 16 > 20 // 2


def test_command_line_records_the_allocator_settings_it_ran_with() -> None:
    from saint.measure.report import command_line
    from saint.timing import allocator_settings

    env = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184", "HOME": "/root", "LD_PRELOAD": ""}
    assert allocator_settings(env) == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
    assert (command_line(["python", "b.py", "--tag", "a b"], env)
            == "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 python b.py --tag 'a b'")
    assert command_line(["python", "b.py"], {}) == "python b.py"
    assert allocator_settings({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}


def test_output_tag_accepts_names_and_refuses_paths() -> None:
    import argparse

    from saint.commands.options import output_tag

    assert output_tag("") == "" and output_tag("2threads") == "2threads" and output_tag("no-mmap_2") == "no-mmap_2"
    for bad in ("../x", "a b", "a/b", "."):
        with pytest.raises(argparse.ArgumentTypeError, match="letters, digits"):
            output_tag(bad)


def test_holdout_every_accepts_two_or_more_and_the_scripts_use_it() -> None:
    """``--calib-every`` is checked where it is parsed: 1, 0 and non-integers are refused
    with a message, in each benchmark script that holds photos out."""
    import argparse

    from saint.commands.options import holdout_every

    from .conftest import benchmark_script

    assert holdout_every("2") == 2 and holdout_every("16") == 16
    for bad, msg in (("1", ">= 2"), ("0", ">= 2"), ("x", "not an integer")):
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            holdout_every(bad)
    for name in ("run_dinov2_cpu", "packed_speed", "resize_baseline"):
        script = benchmark_script(name)
        assert script.parse_args(["--calib-every", "16"]).calib_every == 16
        with pytest.raises(SystemExit):
            script.parse_args(["--calib-every", "1"])


def test_write_json_and_markdown_writes_both_beside_each_other(tmp_path) -> None:
    import json

    from saint.measure.report import write_json_and_markdown

    paths = write_json_and_markdown({"rows": [1, 2]}, tmp_path / "sub" / "run_b32_518", "# title\n")
    assert paths == [tmp_path / "sub" / "run_b32_518.json", tmp_path / "sub" / "run_b32_518.md"]
    assert json.loads(paths[0].read_text())["rows"] == [1, 2]
    assert paths[1].read_text() == "# title\n"


def test_calibrated_variants_with_their_own_target_need_no_speedup_grid() -> None:
    from saint.bench.sweep import _calibrate_variants

    h = Harness(tiny_vit())
    calib_x = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    own = Variant("saint_match", "saint_match", {"at": 1.2})
    out = _calibrate_variants(h, [own], [], calib_x, timing_batch=4)
    assert [(row[0], row[1], row[4]) for row in out] == [(own, 1.2, "flops")]
    with pytest.raises(ValueError, match="need a speed-up grid"):
        _calibrate_variants(h, [own, Variant("saint_match", "saint_match", {})], [], calib_x, timing_batch=4)
    with pytest.raises(ValueError, match="need calibration images"):
        _calibrate_variants(h, [own], [1.5], None, timing_batch=4)


def test_timed_calls_times_each_call_after_the_warmup():
    from saint.timing import timed_calls

    ticks = iter(range(100))
    calls = []
    times = timed_calls(lambda: calls.append(next(ticks)), repeats=3, warmup=2, clock=lambda: next(ticks) * 0.5)
    assert len(calls) == 5  # two untimed, three timed
    assert times == [1.0, 1.0, 1.0]  # each timed call sits between two clock reads (one tick apart, 0.5 s each)


def test_tower_row_counts_one_call_and_times_the_repeats():
    from saint.measure.tower import tower_cells, tower_row

    a = torch.ones(4, 8)
    row = tower_row(lambda: a @ a.T, repeats=3)
    assert row["tower_gflops"] == 2 * 4 * 8 * 4 / 1e9  # one [4, 8] x [8, 4] matmul
    assert len(row["times_ms"]) == 3 and row["tower_ms_min"] == min(row["times_ms"])
    assert row["tower_ms_spread"] == max(row["times_ms"]) - min(row["times_ms"])
    base = dict(tower_gflops=300.0, tower_ms_min=2000.0)
    half = dict(tower_gflops=200.0, tower_ms_min=1600.0, tower_ms_spread=25.0)
    assert tower_cells(half, base) == ["200", "1.50x", "1600 (+25)", "1.25x"]


def test_tower_markdown_lays_out_the_run_the_setup_and_the_table():
    from saint.measure.tower import TOWER_HEADER, tower_markdown

    report = dict(date="2026-12-05", cpu="AMD EPYC", torch_threads=2, versions={"torch": "2.14", "transformers": "5.24"},
                  git={"commit": "0123456789abcdef"}, command="benchmarks/x.py --family gemma3")
    lines = tower_markdown("Title", report, "What ran.", [["unpruned", "256", "1", "1.00x", "2 (+0)", "1.00x", "3"]])
    lines = lines.split("\n")
    assert lines[:7] == ["# Title", "", "2026-12-05, AMD EPYC, 2 threads, torch 2.14, transformers 5.24, git 0123456789",
                         "Command: `benchmarks/x.py --family gemma3`", "", "What ran.", ""]
    assert lines[7] == "| " + " | ".join(TOWER_HEADER) + " |"
    assert lines[-2] == "| unpruned | 256 | 1 | 1.00x | 2 (+0) | 1.00x | 3 |" and lines[-1] == ""


def test_flops_of_a_model_handing_a_parameter_to_a_submodule() -> None:
    """A model that passes its own parameter into a submodule (Idefics2's resampler latents):
    torch's counter fails on it in inference mode (the harness's) unless the parameters stop
    requiring gradients, which ``count_flops(fn, model)`` does while counting, and undoes."""
    from saint.measure.flops import count_flops

    class Latents(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.latents = torch.nn.Parameter(torch.randn(4, 8))
            self.proj = torch.nn.Linear(8, 8)

        def forward(self) -> torch.Tensor:
            return self.proj(self.latents)

    model = Latents()
    with torch.inference_mode():
        with pytest.raises(AttributeError):
            count_flops(model)
        flops, _ = count_flops(model, model)
    assert flops == 2 * 4 * 8 * 8
    assert all(p.requires_grad for p in model.parameters())

"""Tests for saint.analysis: statistics on hand-built inputs with known answers, the
stage rule on synthetic curves, collection against independent computations on a
tiny random timm ViT (and HF CLIP/SigLIP towers), and the analyze/viz commands end
to end."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import saint
from saint import cli
from saint.analysis import (
    STATS,
    attention_entropy,
    cls_attention_entropy,
    compare_methods,
    effective_rank,
    find_stages,
    matched_drops,
    mean_pairwise_cosine,
    read_csv_curves,
    redundant_fraction,
    token_evolution,
    trace_kept,
)
from saint.analysis.stages import candidate_boundaries, hinge_design
from saint.analysis.viz import KeptMap, render_cell, tome_drops
from saint.core import redundant_counts, saint_graph


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
        embed_dim=32, num_heads=2, num_classes=0,
    )  # fmt: skip
    return model.eval()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- statistics


def test_cosine_of_identical_tokens_is_one() -> None:
    x = torch.randn(2, 1, 5, dtype=torch.float64).expand(2, 7, 5)
    torch.testing.assert_close(mean_pairwise_cosine(x), torch.ones(2, dtype=torch.float64))


def test_cosine_of_orthogonal_and_opposite_tokens() -> None:
    assert mean_pairwise_cosine(torch.eye(4)[None]).tolist() == [0.0]
    v = torch.tensor([[1.0, 2.0, -3.0]])
    assert mean_pairwise_cosine(torch.stack([v, -v], dim=1).reshape(1, 2, 3)).tolist() == [-1.0]


def test_cosine_ignores_invalid_tokens() -> None:
    x = torch.eye(3)[None].clone()
    x[0, 2] = x[0, 0]  # an invalid duplicate would raise the mean if counted
    valid = torch.tensor([[True, True, False]])
    assert mean_pairwise_cosine(x, valid).tolist() == [0.0]
    assert math.isnan(mean_pairwise_cosine(x, torch.tensor([[True, False, False]])).item())
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        mean_pairwise_cosine(torch.zeros(3, 4))


def test_entropy_of_uniform_attention_is_log_n() -> None:
    n = 9
    torch.testing.assert_close(attention_entropy(torch.full((2, 3, n), 1.0 / n)),
                               torch.full((2, 3), math.log(n), dtype=torch.float64))  # fmt: skip
    assert attention_entropy(torch.eye(4)).tolist() == [0.0] * 4


def test_cls_entropy_uniform_when_keys_identical() -> None:
    b, n, h, d = 2, 6, 3, 4
    keys = torch.randn(b, 1, h, d).expand(b, n, h, d)
    out = cls_attention_entropy(torch.randn(b, h, d), keys, scale=0.5)
    torch.testing.assert_close(out, torch.full((b,), math.log(n), dtype=torch.float64))
    valid = torch.tensor([[True] * 4 + [False] * 2] * b)
    out = cls_attention_entropy(torch.randn(b, h, d), keys, scale=0.5, valid=valid)
    torch.testing.assert_close(out, torch.full((b,), math.log(4), dtype=torch.float64))


def test_effective_rank_known_answers() -> None:
    torch.testing.assert_close(effective_rank(torch.eye(6)[None]), torch.tensor([6.0], dtype=torch.float64))
    rank1 = torch.randn(2, 7, 1) @ torch.randn(2, 1, 9)
    assert effective_rank(rank1).tolist() == [1.0, 1.0]
    # singular values (3, 1): p = (3/4, 1/4)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    m = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    torch.testing.assert_close(effective_rank(m), torch.tensor([expected], dtype=torch.float64))
    torch.testing.assert_close(effective_rank(m.transpose(1, 2)), effective_rank(m))
    torch.testing.assert_close(effective_rank(5.0 * m), effective_rank(m))


def test_effective_rank_matches_numpy_svd() -> None:
    x = torch.randn(3, 12, 20, dtype=torch.float64)
    s = np.linalg.svd(x.numpy(), compute_uv=False)
    p = s / s.sum(-1, keepdims=True)
    ref = np.exp(-(p * np.log(p)).sum(-1))
    np.testing.assert_allclose(effective_rank(x).numpy(), ref, rtol=1e-9)


def test_redundant_fraction_is_saint_rule() -> None:
    keys = torch.randn(3, 20, 8)
    graph = saint_graph(keys, 0.2, gamma=0.0)
    expected = redundant_counts(graph, 2).double() / 20
    assert torch.equal(redundant_fraction(keys, 0.2, 2), expected)
    same = torch.randn(1, 1, 8).expand(2, 20, 8)  # every candidate linked to all 10 anchors
    assert redundant_fraction(same, 0.75, 10).tolist() == [0.5, 0.5]
    assert redundant_fraction(same, 0.75, 11).tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------- stage rule


def hinge(num_blocks: int, boundaries: tuple[int, int], coef: list[float]) -> np.ndarray:
    return hinge_design(num_blocks, boundaries) @ np.asarray(coef)


def test_stage_rule_recovers_synthetic_boundaries() -> None:
    curves = {
        "key_cosine": hinge(12, (4, 8), [0.9, -0.1, 0.15, 0.1]),
        "effective_rank": hinge(12, (4, 8), [10.0, 5.0, -8.0, -4.0]),
    }
    fit = find_stages(curves)
    assert fit.boundaries == (4, 8)
    assert fit.stages == {"aligner": (0, 3), "explorer": (4, 7), "aggregator": (8, 11)}
    assert fit.used == ["key_cosine", "effective_rank"]
    assert fit.r2[2] == pytest.approx(1.0, abs=1e-12)
    assert fit.r2[0] < fit.r2[1] < fit.r2[2]
    assert [fit.stage_of(i) for i in (0, 3, 4, 7, 8, 11)] == [
        "aligner", "aligner", "explorer", "explorer", "aggregator", "aggregator"
    ]  # fmt: skip
    # z-scoring: affine changes of a curve (including a sign flip) change nothing
    flipped = {k: -3.0 * np.asarray(v) + 7.0 for k, v in curves.items()}
    assert find_stages(flipped).boundaries == (4, 8)


def test_stage_rule_skips_flat_and_nan_curves() -> None:
    curves = {
        "key_cosine": hinge(10, (3, 7), [0.0, 1.0, -2.0, 2.0]),
        "hidden_cosine": [0.5] * 10,
        "cls_entropy": [float("nan")] * 10,
        "redundant_fraction": list(range(10)),  # not a stage statistic: ignored
    }
    fit = find_stages(curves)
    assert fit.used == ["key_cosine"] and fit.boundaries == (3, 7)
    with pytest.raises(ValueError, match="no usable curve"):
        find_stages({"hidden_cosine": [1.0] * 8})
    with pytest.raises(ValueError, match="three stages"):
        find_stages({"key_cosine": [0.0, 1.0, 3.0, 2.0, 1.0]})
    with pytest.raises(ValueError, match="has 5 blocks"):
        find_stages({"key_cosine": list(range(6)), "effective_rank": list(range(5))})


def test_candidate_boundaries_respect_min_blocks() -> None:
    assert candidate_boundaries(6, 2, 2) == [(2, 4)]
    assert candidate_boundaries(4, 2, 1) == [(1, 2), (1, 3), (2, 3)]
    assert all(b - a >= 3 for a, b in candidate_boundaries(12, 2, 3))


# ----------------------------------------------------------------------------- collection


def _block0_reference(model: torch.nn.Module, x: torch.Tensor):
    """Keys, class-token attention probabilities and output of block 0, computed by
    running the block by hand with timm's eager attention."""
    blk = model.blocks[0]
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    qkv = blk.attn.qkv(blk.norm1(h))
    b, n, _ = qkv.shape
    keys = qkv.reshape(b, n, 3, blk.attn.num_heads, -1)[:, :, 1].mean(dim=2)
    captured = {}
    blk.attn.fused_attn = False
    handle = blk.attn.attn_drop.register_forward_hook(lambda m, a, o: captured.setdefault("p", a[0]))
    try:
        out = blk(h)
    finally:
        handle.remove()
        blk.attn.fused_attn = True
    return keys, captured["p"][:, :, 0], out


def test_collection_matches_hand_computation() -> None:
    model, x = tiny_vit(), images(3)
    evo = token_evolution(model, x, tau=0.1, k=2, batch_size=2)
    assert evo.blocks == [f"blocks.{i}" for i in range(4)]
    assert evo.num_images == 3 and evo.num_tokens == 17 and evo.num_prefix == 1
    for s in STATS:
        assert evo.values[s].shape == (3, 4) and torch.isfinite(evo.values[s]).all()
    with torch.no_grad():
        keys, cls_probs, out = _block0_reference(model, x)
    v = {s: evo.values[s][:, 0] for s in STATS}
    torch.testing.assert_close(v["key_cosine"], mean_pairwise_cosine(keys[:, 1:]))
    torch.testing.assert_close(v["redundant_fraction"], redundant_fraction(keys[:, 1:], 0.1, 2))
    torch.testing.assert_close(v["hidden_cosine"], mean_pairwise_cosine(out[:, 1:]))
    torch.testing.assert_close(v["effective_rank"], effective_rank(out[:, 1:]))
    torch.testing.assert_close(v["cls_entropy"], attention_entropy(cls_probs).mean(dim=1), rtol=1e-5, atol=1e-6)


def test_collection_is_per_image_and_leaves_model_untouched() -> None:
    model, x = tiny_vit(), images(4)
    with torch.no_grad():
        before = model(x)
    one = token_evolution(model, x, batch_size=1)
    four = token_evolution(model, [x[:3], x[3:]])
    for s in STATS:
        torch.testing.assert_close(one.values[s], four.values[s], rtol=1e-5, atol=1e-6)
    assert all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    torch.testing.assert_close(one.subset([1, 2]).mean("key_cosine"), one.values["key_cosine"][1:3].mean(0))


def test_collection_rejects_bad_input() -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match="tau"):
        token_evolution(model, images(1), tau=1.5)
    with pytest.raises(ValueError, match="no images"):
        token_evolution(model, [])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        token_evolution(model, torch.zeros(3, 32, 32))
    with pytest.raises(TypeError, match="token analysis cannot read"):
        token_evolution(torch.nn.Linear(3, 3), images(1))
    saint.patch(model, "saint")
    with pytest.raises(ValueError, match="patched"):
        token_evolution(model, images(1))


def test_collection_hf_towers() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              image_size=32, patch_size=8)  # fmt: skip
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw)).eval()
    x = images(2)
    evo = token_evolution(clip, x)
    assert evo.blocks == [f"encoder.layers.{i}" for i in range(3)] and evo.num_prefix == 1
    with torch.no_grad():
        hidden = clip(pixel_values=x, output_hidden_states=True).hidden_states
    for i in range(3):
        torch.testing.assert_close(evo.values["hidden_cosine"][:, i], mean_pairwise_cosine(hidden[i + 1][:, 1:]))
    assert torch.isfinite(evo.values["cls_entropy"]).all()
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kw)).eval()
    evo = token_evolution(siglip, x)
    assert evo.num_prefix == 0 and evo.num_tokens == 16
    assert torch.isnan(evo.values["cls_entropy"]).all()
    assert torch.isfinite(evo.values["key_cosine"]).all()


# ----------------------------------------------------------------------------- viz


def test_trace_kept_known_saint_answer() -> None:
    model, x = tiny_vit(), images(1)
    # tau=-1: every candidate links every anchor, so all candidates (even patches) go
    m = trace_kept(model, x, "saint", tau=-1.0, k=1, layers=[0])
    g = m.groups[0].reshape(-1)
    assert (g[0::2] == -1).all()
    assert g[1::2].tolist() == list(range(1, 9))  # kept patches follow the class token, in order
    assert m.kept == [8] and m.layers == [0]
    assert not saint.is_patched(model)


def test_compare_methods_match_saint_counts() -> None:
    model, x = tiny_vit(), images(1)
    maps = compare_methods(model, x, saint_settings={"tau": -1.0, "k": 1, "layers": [0, 1]})
    assert [m.method for m in maps] == ["saint", "random", "attn", "tome"]
    for m in maps:
        assert m.layers == [0, 1] and m.kept == [8, 4]
    tome = maps[-1]
    assert all((g >= 0).all() for g in tome.groups)  # merging drops nothing
    for m in maps[:-1]:
        assert [(g >= 0).sum() for g in m.groups] == [8, 4]
    assert matched_drops([8, 4, 4], 16) == [8, 4, 0]
    # SAINT can drop all ceil(n/2) candidates of an odd count, ToMe only floor(n/2)
    assert tome_drops([8, 3, 2], 16) == [8, 4, 2]
    assert tome_drops([158, 78, 78], 256) == [98, 79, 1]
    with pytest.raises(ValueError, match="must not grow"):
        matched_drops([8, 9], 16)
    with pytest.raises(ValueError, match="viz compares"):
        compare_methods(model, x, ["fastv"])


def test_render_cell_dims_drops_and_paints_groups() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((4, 6, 3))
    groups = np.array([[-1, 1, 2], [3, 3, 4]])  # 2x3 grid of 2x2 patches; 3 is a merged pair
    out = render_cell(image, groups, (2, 2), dim=0.5)
    np.testing.assert_array_equal(out[0:2, 0:2], 0.5 * image[0:2, 0:2])
    np.testing.assert_array_equal(out[0:2, 4:6], image[0:2, 4:6])  # single kept patch untouched
    group = out[2:4, 0:4].reshape(-1, 3)
    mean = image[2:4, 0:4].reshape(-1, 3).mean(axis=0)
    interior = [r * 4 + c for r in (1,) for c in (1, 2)]  # away from the group's outline
    np.testing.assert_allclose(group[interior], np.tile(mean, (2, 1)))
    assert KeptMap("tome", [0], [groups], 1).kept == [4]
    with pytest.raises(ValueError, match="grid"):
        render_cell(image, groups, (3, 3))


# ----------------------------------------------------------------------------- commands


def _write_images(folder, n: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_analyze_command_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    model = tiny_vit()
    monkeypatch.setattr("saint.commands.analyze.load_model", lambda args: (model, "tiny"))
    _write_images(tmp_path / "imgs", 4)
    out = tmp_path / "out"
    rc = cli.main(["analyze", str(tmp_path / "imgs"), "--out-dir", str(out), "--name", "t",
                   "--min-blocks", "1", "--splits", "2", "--batch-size", "3"])  # fmt: skip
    assert rc == 0
    assert (out / "t.png").stat().st_size > 0
    md = (out / "t.md").read_text()
    assert "| aligner |" in md and "saint analyze" in md
    assert "--min-blocks 1 --splits 2 --batch-size 3" in md  # the command as typed (options were left out)
    with open(out / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["block"]) for r in rows] == [0, 1, 2, 3]
    assert {r["stage"] for r in rows} <= {"aligner", "explorer", "aggregator"}
    assert all(r["num_images"] == "4" for r in rows)
    curves = read_csv_curves(out / "t.csv")
    assert set(curves) == set(STATS) and all(len(v) == 4 for v in curves.values())
    assert "aligner: blocks" in capsys.readouterr().out


def test_viz_command_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    model = tiny_vit()
    monkeypatch.setattr("saint.commands.viz.load_model", lambda args: (model, "tiny"))
    _write_images(tmp_path / "imgs", 1)
    out = tmp_path / "grid.png"
    rc = cli.main(["viz", str(tmp_path / "imgs" / "img0.png"), "--out", str(out), "--tau", "-1",
                   "--k", "1", "--layers", "0,1"])  # fmt: skip
    assert rc == 0 and out.stat().st_size > 0
    text = capsys.readouterr().out
    for method in ("saint", "random", "attn", "tome"):
        assert f"{method}: b0=8, b1=4" in text
    assert cli.main(["viz", str(tmp_path / "missing.png")]) == 2
    assert "image not found" in capsys.readouterr().err


def test_llava_language_model_statistics_over_image_tokens():
    """The LLM part of a tiny random LLaVA: one value per decoder layer, computed on the
    image tokens only (equal to the same statistics on those tokens taken by hand)."""
    transformers = pytest.importorskip("transformers")
    from saint.analysis import stats as S
    from saint.analysis.collect import token_evolution

    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=4)
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=63)).eval()
    ids = torch.cat([torch.randint(1, 60, (2, 3)), torch.full((2, 16), 63), torch.randint(1, 60, (2, 4))], dim=1)
    batch = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16)}
    evo = token_evolution(model, [batch], tau=0.5, k=2)
    assert evo.blocks == ["language_model.layers.0", "language_model.layers.1", "language_model.layers.2"]
    assert evo.values["key_cosine"].shape == (2, 3)
    assert torch.isnan(evo.values["cls_entropy"]).all()
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    by_hand = S.mean_pairwise_cosine(hidden[2][:, 3:19])  # output of layer 1, image tokens
    torch.testing.assert_close(evo.values["hidden_cosine"][:, 1], by_hand.cpu().double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="processor outputs"):
        token_evolution(model, torch.randn(2, 3, 16, 16))

"""saint_match: SAINT's graph sets each image's merge count, ToMe's matching picks the
pairs. Known answers on hand-built keys, invariants, and calibration on a tiny ViT."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import saint
from saint.calibration import merge_ramp
from saint.core import match_counts, match_plan, tome_plan
from saint.core.match import attention_excess, best_matches
from saint.spec import parse_calibrated_spec

from .conftest import make_tiny


def _unit(*angles: float) -> torch.Tensor:
    """2-D unit vectors at the given angles (degrees): cosines are known exactly."""
    a = torch.tensor(angles, dtype=torch.float64) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=-1)


def test_known_answer_two_images():
    # positions: cand 0, anchor 1, cand 2, anchor 3, cand 4, anchor 5 (no protected prefix)
    # image 0: candidates at 0, 10, 80 deg; anchors at 2, 12, 45 deg
    #   best matches: c0->a0 cos 2deg, c1->a1 cos 2deg, c2->a2 cos 35deg
    # image 1: candidates 0, 60, 120; anchors 30, 90, 150: every best match is 30 deg
    keys = torch.stack([_unit(0, 2, 10, 12, 80, 45), _unit(0, 30, 60, 90, 120, 150)])
    tau = float(torch.cos(torch.tensor(5.0 * torch.pi / 180, dtype=torch.float64)))
    best, idx, valid = best_matches(keys)
    assert idx[0].tolist() == [0, 1, 2] and bool(valid.all())
    counts = match_counts(best, valid, tau, 1.0)
    assert counts.tolist() == [2, 0]  # image 0 has two candidates above tau, image 1 none
    assert match_counts(best, valid, tau, 0.5).tolist() == [1, 0]  # round(0.5 * 2) = 1
    assert match_counts(best, valid, tau, 0.25).tolist() == [1, 0]  # 0.5 rounds half up
    assert match_counts(best, valid, -1.0, 2.0).tolist() == [3, 3]  # capped at the candidates
    plan = match_plan(keys, tau, 1.0)
    assert plan.keep.tolist() == [[False, True, False, True, True, True], [True] * 6]
    merged = plan.src[plan.active].tolist(), plan.dst[plan.active].tolist()
    assert sorted(zip(*merged, strict=True)) == [(0, 1), (2, 3)]


def test_protected_prefix_and_padding_are_never_merged():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 9, 4, generator=g)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    plan = match_plan(keys, -1.0, 2.0, num_protected=1, valid=valid)
    assert bool(plan.keep[:, 0].all())  # the class token
    assert not bool(plan.keep[1, 6:].any())  # padding stays out
    assert bool(plan.keep[:, 2::2].eq(valid[:, 2::2]).all())  # valid anchors survive
    assert plan.keep.sum(1).tolist() == [5, 3]  # every valid candidate merged


def test_one_count_for_every_image_is_tomes_choice():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 17, 8, generator=g)
    # tau -1 flags every candidate; fraction 3/8 of 8 candidates -> r = 3 each, like ToMe r=3
    plan, ref = match_plan(keys, -1.0, 3 / 8, num_protected=1), tome_plan(keys, 3, num_protected=1)
    assert torch.equal(plan.keep, ref.keep)


def test_attention_excess_known_answers():
    # class token + 4 prunable tokens; image 1 has one padding position
    attn = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2], [0.1, 0.6, 0.15, 0.15, 0.0]])
    valid = torch.tensor([[True] * 5, [True, True, True, True, False]])
    ex = attention_excess(attn, valid, num_protected=1)
    # image 0: 4 * 0.2 = 0.8 < 1 -> 0 everywhere; image 1: 3 * 0.6 = 1.8 -> log 1.8, 0.45 -> 0, pad -> 0
    torch.testing.assert_close(ex, torch.tensor([[0.0, 0.0, 0.0, 0.0], [float(torch.log(torch.tensor(1.8))), 0, 0, 0]]))


def test_guard_spares_the_token_the_class_token_reads():
    # class token, then cand 10deg / anchor 12deg / cand 50deg / anchor 53deg: both pairs are
    # redundant at tau cos(5deg); fraction 0.5 merges one, the more similar (2deg) without a guard
    keys = torch.cat([_unit(90), _unit(10, 12, 50, 53)])[None]
    tau = float(torch.cos(torch.tensor(5.0 * torch.pi / 180, dtype=torch.float64)))
    plain = match_plan(keys, tau, 0.5, num_protected=1)
    assert plain.keep[0].tolist() == [True, False, True, True, True]
    attn = torch.tensor([[0.2, 0.5, 0.1, 0.1, 0.1]])  # the class token reads token 1 most
    guarded = match_plan(keys, tau, 0.5, 1, cls_attention=attn, guard=0.1)
    assert guarded.keep[0].tolist() == [True, True, True, False, True]  # same count, the other pair
    tiny = match_plan(keys, tau, 0.5, 1, cls_attention=attn, guard=1e-4)  # too weak to beat 1 degree
    assert torch.equal(tiny.keep, plain.keep)
    assert torch.equal(match_plan(keys, tau, 0.5, 1, cls_attention=attn, guard=0.0).keep, plain.keep)
    with pytest.raises(ValueError, match="pass cls_attention"):
        match_plan(keys, tau, 0.5, 1, guard=0.1)
    with pytest.raises(ValueError, match=r"must be \[B, N\]"):
        match_plan(keys, tau, 0.5, 1, cls_attention=attn[:, :3], guard=0.1)



def test_the_guard_reads_the_class_attention_only_where_something_merges():
    """Given as a function, the class token's attention is computed for a step that merges
    something (the same plan as given as a tensor) and, on a CPU, not for one that merges
    nothing; an accelerator, which would have to wait to know, always computes it."""
    from saint.core.paths import accelerator_paths_everywhere

    keys = torch.cat([_unit(90), _unit(10, 12, 50, 53)])[None]
    tau = float(torch.cos(torch.tensor(5.0 * torch.pi / 180, dtype=torch.float64)))
    attn = torch.tensor([[0.2, 0.5, 0.1, 0.1, 0.1]])
    calls = []

    def read() -> torch.Tensor:
        calls.append(1)
        return attn

    lazy = match_plan(keys, tau, 0.5, 1, cls_attention=read, guard=0.1)
    assert len(calls) == 1 and torch.equal(lazy.keep, match_plan(keys, tau, 0.5, 1, cls_attention=attn, guard=0.1).keep)
    nothing = match_plan(keys, 1.5, 0.5, 1, cls_attention=read, guard=0.1)  # no cosine reaches 1.5
    assert len(calls) == 1 and not bool(nothing.active.any())
    with accelerator_paths_everywhere():
        match_plan(keys, 1.5, 0.5, 1, cls_attention=read, guard=0.1)
    assert len(calls) == 2

@settings(max_examples=30, deadline=None)
@given(st.floats(-1, 1), st.floats(0, 1), st.floats(0, 5), st.integers(0, 2**16))
def test_guard_changes_which_tokens_merge_never_how_many(tau, fraction, guard, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(3, 13, 5, generator=g)
    attn = torch.rand(3, 13, generator=g).softmax(dim=-1)
    valid = torch.ones(3, 13, dtype=torch.bool)
    valid[2, 9:] = False
    plain = match_plan(keys, tau, fraction, 1, valid)
    guarded = match_plan(keys, tau, fraction, 1, valid, cls_attention=attn, guard=guard)
    assert torch.equal(plain.keep.sum(1), guarded.keep.sum(1))
    assert bool(guarded.keep[:, 0].all()) and not bool(guarded.keep[2, 9:].any())


def test_guard_on_a_model_keeps_the_first_counts_and_changes_the_merges(images):
    """Block 0 merges as many tokens either way; later counts follow the merged states."""
    model = make_tiny("vit")
    outs, tokens = [], []
    for guard in (0.0, 0.5):
        saint.patch(model, "saint_match", tau=0.3, fraction=0.7, guard=guard)
        with torch.no_grad():
            outs.append(model(images))
        tokens.append(saint.stats(model).tokens)
    assert tokens[0][:2] == tokens[1][:2] and len(set(tokens[1][1])) > 1  # ragged after block 0
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize(("method", "kw"), [
    ("saint_match", dict(tau=0.3, fraction=0.7)),
    ("saint_plus", dict(tau=0.3)),
    ("tome", dict(r=3)),
    ("tome", dict(r=3, order="reference")),
])
def test_keep_norm_changes_the_merged_tokens_norms_only(images, method, kw):
    """The first merge picks the same pairs either way (same first counts); the merged
    tokens of block 0 then have their parts' mean norm, never less than the plain
    average's, so the outputs differ; each image still equals the image alone."""
    model = make_tiny("vit")
    outs, tokens, after = [], [], []
    # the tokens right after block 0's merge (the MLP's norm reads them)
    hook = model.blocks[0].norm2.register_forward_pre_hook(lambda m, args: after.append(args[0]))
    for keep_norm in (False, True):
        saint.patch(model, method, keep_norm=keep_norm, layout="padded", **kw)
        with torch.no_grad():
            outs.append(model(images))
            alone = torch.cat([model(images[i : i + 1]) for i in range(len(images))])
        torch.testing.assert_close(outs[-1], alone, rtol=0, atol=1e-5)
        tokens.append(saint.stats(model).tokens)
        saint.unpatch(model)
    hook.remove()
    assert tokens[0][:2] == tokens[1][:2]
    assert not torch.allclose(outs[0], outs[1])
    plain, kept = after[0], after[1 + len(images)]  # block 0 of the two batch calls
    valid = ~plain.isnan().any(-1)
    plain, kept = plain[valid], kept[valid]
    changed = (kept - plain).abs().amax(-1) > 1e-6  # the tokens that received a merge
    assert bool(changed.any()) and not bool(changed.all())
    assert torch.equal(kept[~changed], plain[~changed])
    assert bool((kept[changed].norm(dim=-1) >= plain[changed].norm(dim=-1) - 1e-5).all())
    direction = torch.nn.functional.cosine_similarity(kept[changed], plain[changed], dim=-1)
    torch.testing.assert_close(direction, torch.ones_like(direction))


def test_keep_norm_is_a_flag_of_the_merging_methods():
    model = make_tiny("vit")
    with pytest.raises(TypeError, match="keep_norm must be True or False"):
        saint.patch(model, "tome", r=2, keep_norm="yes")
    with pytest.raises((TypeError, ValueError), match="keep_norm"):
        saint.patch(model, "saint", tau=0.5, keep_norm=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 4), st.floats(-1, 1), st.floats(0, 1), st.integers(0, 2**16))
def test_each_image_merges_the_same_alone_or_in_a_batch(extra_pad, tau, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(3, 12, 5, generator=g)
    valid = torch.ones(3, 12 + extra_pad, dtype=torch.bool)
    valid[:, 12:] = False
    padded = torch.cat([keys, torch.randn(3, extra_pad, 5, generator=g)], dim=1)
    plan = match_plan(padded, tau, fraction, 1, valid)
    for b in range(3):
        alone = match_plan(keys[b : b + 1], tau, fraction, 1)
        assert torch.equal(plan.keep[b, :12], alone.keep[0])
        counts = plan.active[b].sum()
        assert counts == alone.active[0].sum() <= 6
        assert int((~plan.keep[b, :12]).sum()) == int(counts)


def test_fraction_zero_is_the_unpatched_model():
    model = make_tiny("vit")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        saint.patch(model, "saint_match", tau=0.0, fraction=0.0)
        out = model(x)
    assert torch.equal(out, ref)


def test_missing_settings_point_to_calibration():
    with pytest.raises(ValueError, match="calibrate it"):
        saint.patch(make_tiny("vit"), "saint_match", fraction=0.5)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"fraction={bad} must be in \\[0, 1\\]"):
            saint.patch(make_tiny("vit"), "saint_match", tau=0.5, fraction=bad)


@pytest.mark.parametrize("guard", [0.0, 0.5])
def test_calibration_hits_flops_target_with_median_taus(guard):
    model = make_tiny("vit")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cal = saint.calibrate(model, x, method="saint_match", flops_speedup=1.3, tol=0.02, guard=guard)
    assert cal.reached and abs(cal.achieved - 1.3) <= 0.02 * 1.3
    assert cal.settings == {"guard": guard}
    assert sorted(cal.per_layer) == ["fraction"] and sorted(cal.per_layer["fraction"]) == sorted(cal.tau)
    kwargs = cal.patch_kwargs()
    assert set(kwargs) >= {"tau", "fraction"}
    # the calibrated model is the same as one patched by hand with the result
    with torch.no_grad():
        out = model(x)
        saint.unpatch(model)
        saint.patch(model, "saint_match", **kwargs)
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    saint.unpatch(model)
    with pytest.raises(ValueError, match="per_layer"):
        saint.calibrate(model, x, method="saint_match", flops_speedup=1.3, mode="global")


def test_calibrated_fractions_never_exceed_the_flagged_candidates():
    """A high target caps late layers at fraction 1 (merge every flagged candidate,
    never an unflagged one) instead of merging every candidate."""
    model = make_tiny("vit")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cal = saint.calibrate(model, x, method="saint_match", flops_speedup=1.6, tol=0.05)
    fractions = list(cal.per_layer["fraction"].values())
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert max(fractions) == 1.0
    saint.unpatch(model)


def test_merge_ramp_is_tomes_linear_schedule_with_mean_one():
    ramp = merge_ramp([3, 1, 2, 0, 4], -0.5)
    assert ramp == {0: 1.5, 1: 1.25, 2: 1.0, 3: 0.75, 4: 0.5}
    assert merge_ramp([7], -0.5) == {7: 1.0}
    assert merge_ramp([0, 1], 0.0) == {0: 1.0, 1: 1.0}
    for bad in (-1.5, 2, True, "x"):
        with pytest.raises(ValueError, match="inflection"):
            merge_ramp([0, 1], bad)


def test_decreasing_calibration_front_loads_the_merges():
    """inflection=-0.5 asks early layers for more merges than late ones at the same
    FLOPs target; inflection=0 is the constant schedule (the default, bit for bit)."""
    model = make_tiny("vit")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    removed, fitted = {}, {}
    for inflection in (0.0, -0.5):
        cal = saint.calibrate(model, x, method="saint_match", flops_speedup=1.3, tol=0.02, inflection=inflection)
        assert cal.reached and cal.inflection == inflection
        fitted[inflection] = cal.per_layer
        with torch.no_grad():
            model(x)
        mean = saint.stats(model).mean()
        removed[inflection] = [a - b for a, b in zip(mean, mean[1:], strict=False)]
        saint.unpatch(model)
    default = saint.calibrate(model, x, method="saint_match", flops_speedup=1.3, tol=0.02)
    saint.unpatch(model)
    assert default.per_layer == fitted[0.0] and default.inflection == 0.0
    assert removed[-0.5][0] > removed[0.0][0]
    assert removed[-0.5][-1] < removed[0.0][-1]


def test_inflection_is_refused_outside_saint_match():
    model = make_tiny("vit")
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(ValueError, match="inflection shapes saint_match"):
        saint.calibrate(model, x, method="saint_plus", flops_speedup=1.3, inflection=-0.5)
    assert not saint.is_patched(model)
    assert parse_calibrated_spec("saint_match:inflection=-0.5,at=2").kwargs["inflection"] == -0.5
    with pytest.raises(ValueError, match="inflection shapes saint_match"):
        parse_calibrated_spec("saint_plus:inflection=-0.5")
    with pytest.raises(ValueError, match="inflection"):
        parse_calibrated_spec("saint_match:inflection=3")

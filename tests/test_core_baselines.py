"""Known answers for ToMe merging and the random / class-attention baselines."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saint.core import attention_keep_mask, merge_weighted, random_keep_mask, tome_plan


def test_tome_plan_known_answer():
    # prefix, then a0 b0 a1 b1 a2 b2; a1 ~ b0 exactly, a0 ~ b1 closely, a2 unlike all
    metric = torch.tensor(
        [[[0.0, 0.0, 1.0], [1.0, 0.1, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
          [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]]
    )
    plan = tome_plan(metric, r=2, num_protected=1)
    assert plan.src.tolist() == [[3, 1]]  # a1 (sim 1.0) before a0 (sim 0.995)
    assert plan.dst.tolist() == [[2, 2]]  # both into b0
    assert plan.keep.tolist() == [[True, False, True, False, True, True, True]]


def test_merge_weighted_is_size_weighted_average():
    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    sizes = torch.tensor([[[1.0], [3.0], [1.0], [2.0]]])
    from saint.core import MergePlan

    plan = MergePlan(src=torch.tensor([[0, 2]]), dst=torch.tensor([[1, 1]]),
                     keep=torch.tensor([[False, True, False, True]]))
    out, new_sizes = merge_weighted(x, sizes, plan)
    assert new_sizes[0, 1, 0].item() == 5.0
    assert out[0, 1, 0].item() == pytest.approx((1 * 1 + 2 * 3 + 4 * 1) / 5)
    assert out[0, 3, 0].item() == 8.0


def test_merge_keeping_norms_known_answer():
    # a [2, 0] of size 3 and b [0, 1] of size 1 merge into a: direction of the weighted
    # mean (6, 1) / 4, norm the weighted mean of norms (3 * 2 + 1 * 1) / 4; c receives
    # nothing (its pair is inactive) and stays as it was
    from saint.core import MergePlan

    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [0.3, -0.7], [5.0, 5.0]]])
    sizes = torch.tensor([[[3.0], [1.0], [1.0], [2.0]]])
    plan = MergePlan(src=torch.tensor([[1, 3]]), dst=torch.tensor([[0, 2]]),
                     keep=torch.tensor([[True, False, True, True]]), active=torch.tensor([[True, False]]))
    out, new_sizes = merge_weighted(x, sizes, plan, keep_norm=True)
    direction = torch.tensor([6.0, 1.0]) / torch.tensor([6.0, 1.0]).norm()
    torch.testing.assert_close(out[0, 0], direction * 1.75)
    assert torch.equal(out[0, 2:], x[0, 2:])
    assert new_sizes[0, :, 0].tolist() == [4.0, 1.0, 1.0, 2.0]
    plain, plain_sizes = merge_weighted(x, sizes, plan)
    torch.testing.assert_close(plain[0, 0], torch.tensor([6.0, 1.0]) / 4)
    assert torch.equal(plain_sizes, new_sizes)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 10), st.integers(1, 5), st.integers(0, 2**16))
def test_merge_keeping_norms_is_a_size_weighted_mean_of_norms(n, c, seed):
    # the merged direction is the plain merge's; its norm lies between the parts' norms
    # (their weighted mean), so it is never shorter than the plain average
    from saint.core import MergePlan

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, c, generator=g)
    sizes = torch.randint(1, 5, (1, n, 1), generator=g).float()
    plan = MergePlan(src=torch.tensor([[0]]), dst=torch.tensor([[n - 1]]),
                     keep=torch.tensor([[False] + [True] * (n - 1)]))
    plain, _ = merge_weighted(x, sizes, plan)
    kept, _ = merge_weighted(x, sizes, plan, keep_norm=True)
    s0, s1 = sizes[0, 0, 0], sizes[0, -1, 0]
    want = (s0 * x[0, 0].norm() + s1 * x[0, -1].norm()) / (s0 + s1)
    torch.testing.assert_close(kept[0, -1].norm(), want, rtol=1e-5, atol=1e-6)
    assert kept[0, -1].norm() >= plain[0, -1].norm() - 1e-6
    torch.testing.assert_close(kept[0, -1] / kept[0, -1].norm(), plain[0, -1] / plain[0, -1].norm(),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(kept[0, 1:-1], plain[0, 1:-1])  # rows that receive nothing: as the plain merge


def test_tome_r_is_at_most_half_the_prunable_tokens_as_in_the_reference():
    """``min(r, (t - protected) // 2)``: 8 prunable tokens merge at most 4, and a larger r
    gives the same plan; a negative r is refused."""
    metric = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(0))
    most = tome_plan(metric, r=4, num_protected=1)
    for r in (5, 100):
        plan = tome_plan(metric, r=r, num_protected=1)
        assert torch.equal(plan.keep, most.keep) and torch.equal(plan.src, most.src) and plan.active is None
    assert most.keep.sum(dim=1).tolist() == [5, 5]
    with pytest.raises(ValueError, match="r=-1 must be >= 0"):
        tome_plan(metric, r=-1)


def test_tome_r_is_clamped_image_by_image_on_a_ragged_batch():
    """With padding, each image merges ``min(r, its own half)``: what it merges alone."""
    g = torch.Generator().manual_seed(1)
    metric = torch.randn(2, 11, 4, generator=g)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 6:] = False  # image 1: 5 prunable tokens (class token first), at most 2 merge
    plan = tome_plan(metric, r=4, num_protected=1, valid=valid)
    assert plan.keep.sum(dim=1).tolist() == [11 - 4, 6 - 2]
    assert plan.active is not None and plan.active.sum(dim=1).tolist() == [4, 2]
    for b, n in ((0, 11), (1, 6)):
        alone = tome_plan(metric[b:b + 1, :n], r=4, num_protected=1)
        assert torch.equal(plan.keep[b, :n], alone.keep[0]) and not plan.keep[b, n:].any()
        active = plan.active[b]
        assert torch.equal(plan.src[b, active], alone.src[0]) and torch.equal(plan.dst[b, active], alone.dst[0])


def test_attention_drop_known_answer():
    attn = torch.tensor([[0.5, 0.1, 0.05, 0.2, 0.01, 0.14]])
    keep = attention_keep_mask(attn, r=2, num_protected=1)
    assert keep.tolist() == [[True, True, False, True, False, True]]


def test_random_drop_is_seeded_and_exact_count():
    a = random_keep_mask(2, 10, 4, num_protected=1, seed=3, layer=1)
    b = random_keep_mask(2, 10, 4, num_protected=1, seed=3, layer=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, random_keep_mask(2, 10, 4, num_protected=1, seed=4, layer=1))
    assert a.sum(1).tolist() == [6, 6]
    assert a[:, 0].all()
    with pytest.raises(ValueError, match="must survive"):
        random_keep_mask(1, 5, 4, num_protected=1)


def test_saint_fold_plan_folds_dropped_into_nearest_anchor():
    from saint.core import saint_fold_plan, saint_select

    # prefix, a0 b0 a1 b1: a0 ~ b1, a1 ~ b0; tau 0.9 k 1 drops both candidates
    metric = torch.tensor([[[0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [0.05, 1.0], [1.0, 0.05]]])
    keep, graph = saint_select(metric, 0.9, 1, 10.0, num_protected=1)
    assert keep.tolist() == [[True, False, True, False, True]]
    plan = saint_fold_plan(graph, keep, num_protected=1)
    assert plan.src.tolist() == [[1, 3]]
    assert plan.dst.tolist() == [[4, 2]]
    assert plan.active.tolist() == [[True, True]]
    x = torch.tensor([[[0.0], [2.0], [4.0], [6.0], [8.0]]])
    out, sizes = merge_weighted(x, torch.ones(1, 5, 1), plan)
    assert out[0, :, 0].tolist() == [0.0, 2.0, 5.0, 6.0, 5.0]
    assert sizes[0, :, 0].tolist() == [1.0, 1.0, 2.0, 1.0, 2.0]


def test_random_drop_of_a_sample_is_independent_of_its_batch():
    """A sample's draw depends on its own token count, not on its row or batch size."""
    valid = torch.tensor([[True] * 10, [True] * 7 + [False] * 3, [True] * 10])
    batch = random_keep_mask(3, 10, 3, num_protected=1, valid=valid, seed=5, layer=2)
    for i in range(3):
        alone = random_keep_mask(1, 10, 3, num_protected=1, valid=valid[i : i + 1], seed=5, layer=2)
        assert torch.equal(batch[i], alone[0])
    assert not (batch[:, 7:] & ~valid[:, 7:]).any()


def test_tome_inflection_is_a_linear_ramp_around_r():
    from saint.methods import ToMeConfig

    flat = ToMeConfig(r=8).resolve(12)
    assert [s["r"] for s in flat.values()] == [8] * 12
    down = ToMeConfig(r=8, inflection=-0.5).resolve(12)  # decreasing: 12 first, 4 last
    rs = [s["r"] for s in down.values()]
    assert rs[0] == 12 and rs[-1] == 4 and rs == sorted(rs, reverse=True) and abs(sum(rs) / 12 - 8) < 0.5
    up = ToMeConfig(r=8, inflection=0.5, layers=[0, 1, 2]).resolve(12)
    assert {i: s["r"] for i, s in up.items()} == {0: 4, 1: 8, 2: 12}
    with pytest.raises(ValueError, match="scalar r"):
        ToMeConfig(r=[1, 2], inflection=0.5).resolve(12)
    with pytest.raises(ValueError, match="inflection=2"):
        ToMeConfig(r=8, inflection=2.0).resolve(12)

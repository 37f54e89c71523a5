"""Known answers and invariants of the SAINT selection on hand-built key matrices."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saint.core import (
    drop_counts,
    drop_top_ranked,
    fixed_budget_keep_mask,
    keep_mask_to_indices,
    redundant_counts,
    saint_fold_plan,
    saint_graph,
    saint_keep_mask,
)

# candidates a0,a1,a2 at prunable positions 0,2,4; anchors b0,b1,b2 at 1,3,5
A = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
B = [[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]


def hand_metric(protected: int = 0) -> torch.Tensor:
    toks = [A[0], B[0], A[1], B[1], A[2], B[2]]
    prefix = [[0.3, -0.7]] * protected
    return torch.tensor([prefix + toks])


def test_graph_degrees_and_scores_known_answer():
    g = saint_graph(hand_metric(), tau=0.9, gamma=10.0)
    assert g.degree.tolist() == [[2, 1, 0]]
    s01 = 1 / math.sqrt(1.01)
    expected0 = 2 * math.exp(10 * ((1 + s01) / 2 - 0.9))
    expected1 = math.exp(10 * (1 - 0.9))
    expected2 = (1 / math.sqrt(2) + 1.1 / (math.sqrt(2) * math.sqrt(1.01)) + 1 / math.sqrt(2)) / 3
    torch.testing.assert_close(g.score[0], torch.tensor([expected0, expected1, expected2]), rtol=1e-5, atol=1e-6)
    # any linked candidate outranks every unlinked one, and the key is monotone in the score
    assert g.rank_key[0].argsort(descending=True).tolist() == [0, 1, 2]


def test_vote_counts_per_k():
    g = saint_graph(hand_metric(), tau=0.9, gamma=10.0)
    assert redundant_counts(g, 1).tolist() == [2]
    assert redundant_counts(g, 2).tolist() == [1]
    assert redundant_counts(g, 3).tolist() == [0]


def test_keep_mask_drops_highest_scorers_with_protected_prefix():
    keep = saint_keep_mask(hand_metric(protected=1), tau=0.9, k=1, gamma=10.0, num_protected=1)
    # prefix kept; a0 (pos 1) and a1 (pos 3) dropped; a2 and anchors kept
    assert keep.tolist() == [[True, False, True, False, True, True, True]]
    keep = saint_keep_mask(hand_metric(protected=1), tau=0.9, k=2, gamma=10.0, num_protected=1)
    assert keep.tolist() == [[True, False, True, True, True, True, True]]


def test_batch_vote_vs_per_sample():
    m = torch.cat([hand_metric(), hand_metric()])
    m[1] = torch.tensor([[1.0, 0.0]] * 6)  # every candidate linked to every anchor
    g = saint_graph(m, tau=0.9, gamma=10.0)
    n = redundant_counts(g, 1)
    assert n.tolist() == [2, 3]
    assert drop_counts(n, "sample").tolist() == [2, 3]
    assert drop_counts(n, "batch").tolist() == [2, 2]  # floor(mean(2, 3))
    keep_s = saint_keep_mask(m, 0.9, 1, 10.0, rate="sample")
    keep_b = saint_keep_mask(m, 0.9, 1, 10.0, rate="batch")
    assert keep_s.sum(1).tolist() == [4, 3]
    assert keep_b.sum(1).tolist() == [4, 4]


def test_padding_is_ignored_and_never_kept():
    m = hand_metric()
    padded = torch.cat([m, torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])], dim=1)
    valid = torch.tensor([[True] * 6 + [False, False]])
    keep = saint_keep_mask(padded, 0.9, 1, 10.0, valid=valid)
    assert keep[:, :6].tolist() == saint_keep_mask(m, 0.9, 1, 10.0).tolist()
    assert not keep[:, 6:].any()


def test_zero_norm_keys_are_safe():
    m = torch.zeros(2, 9, 4)
    keep = saint_keep_mask(m, 0.5, 1, 10.0, num_protected=1)
    assert torch.isfinite(saint_graph(m[:, 1:], 0.5, 10.0).score).all()
    assert keep[:, 0].all()


def test_keep_mask_to_indices_pads_at_end_in_order():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    idx, valid = keep_mask_to_indices(keep)
    assert idx.tolist() == [[0, 2, 3], [1, 0, 2]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_fixed_budget_known_answer_and_exact_count():
    # three near-duplicates and two distinct tokens: duplicates go first
    m = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [1.0, -0.01], [0.0, 1.0], [0.0, -1.0]]])
    keep = fixed_budget_keep_mask(m, keep=3, step_div=16)
    assert keep.sum().item() == 3
    assert keep[0, 3] and keep[0, 4]
    assert keep[0, :3].sum() == 1


def test_fixed_budget_last_two_tokens_tie_exactly_and_the_later_one_stays():
    """Two tokens left for one place score the same (each its similarity to the other): the
    tie drops the lower index, so the later one stays, in a batch as alone (with each token's similarity to itself in the scores,
    rounding picked the survivor, differently in a batch). Tokens of unequal norms, so their
    self-similarities round apart."""
    torch.manual_seed(0)
    m = torch.randn(8, 2, 24) * torch.tensor([1.0, 3.7])[None, :, None]
    batch = fixed_budget_keep_mask(m, keep=1)
    assert batch.tolist() == [[False, True]] * 8
    many = torch.randn(8, 12, 24) * torch.rand(8, 12, 1) * 5
    together = fixed_budget_keep_mask(many, keep=1, step_div=4)
    alone = torch.cat([fixed_budget_keep_mask(many[i : i + 1], keep=1, step_div=4) for i in range(8)])
    assert torch.equal(together, alone)


def test_fixed_budget_ignores_what_padding_holds():
    """An image's padding rows (``valid`` False) may hold anything, NaN included (a padded
    view's): its real tokens keep what they keep alone (NaN times a zero weight had made
    every score NaN)."""
    torch.manual_seed(0)
    real = torch.randn(1, 6, 4)
    valid = torch.tensor([[True] * 6 + [False] * 3])
    alone = fixed_budget_keep_mask(real, keep=2)
    for fill in (float("nan"), float("inf"), 0.0):
        padded = fixed_budget_keep_mask(torch.cat([real, torch.full((1, 3, 4), fill)], 1), keep=2, valid=valid)
        assert torch.equal(padded[:, :6], alone) and not padded[:, 6:].any()


def test_drop_top_ranked_known_answer():
    """Each row drops its ``counts[b]`` highest eligible keys (ties to the lower index); a
    count above a row's eligible entries drops them all, ``-inf`` keys included; ineligible
    entries never go."""
    key = torch.tensor([[0.5, 0.9, 0.1, 0.9], [float("-inf"), 2.0, 3.0, float("-inf")]])
    eligible = torch.tensor([[True, True, True, False], [True, False, True, True]])
    got = drop_top_ranked(key, eligible, torch.tensor([2, 5]))
    assert got.tolist() == [[True, True, False, False], [True, False, True, True]]
    assert drop_top_ranked(key, eligible, torch.tensor([0, 1])).tolist() == [[False] * 4, [False, False, True, False]]


def test_fixed_budget_uses_step_div():
    torch.manual_seed(0)
    m = torch.randn(2, 65, 8)
    for keep in (1, 7, 40, 64):
        mask = fixed_budget_keep_mask(m, keep=keep, step_div=4, num_protected=1)
        assert mask.sum(1).tolist() == [keep + 1] * 2
        assert mask[:, 0].all()


metric_strategy = st.tuples(
    st.integers(1, 3), st.integers(2, 20), st.integers(0, 2), st.integers(0, 10_000)
)


@settings(max_examples=60, deadline=None)
@given(metric_strategy, st.floats(-1, 1), st.integers(1, 6), st.sampled_from(["batch", "sample"]))
def test_invariants(shape, tau, k, rate):
    b, p, prot, seed = shape
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(b, prot + p, 3, generator=g)
    keep = saint_keep_mask(m, tau, k, 10.0, rate=rate, num_protected=prot)
    assert keep[:, :prot].all(), "protected tokens survive"
    assert keep[:, prot + 1 :: 2].all(), "anchors survive"
    n_cand = (p + 1) // 2
    assert ((~keep).sum(1) <= n_cand).all(), "at most half go"
    idx, valid = keep_mask_to_indices(keep)
    for row, v in zip(idx, valid, strict=True):
        kept = row[v]
        assert torch.all(kept[1:] > kept[:-1]), "order preserved"
    higher = saint_keep_mask(m, min(1.0, tau + 0.1), k, 10.0, rate=rate, num_protected=prot)
    assert ((~higher).sum(1) <= (~keep).sum(1)).all(), "a higher tau drops no more"


@settings(max_examples=60, deadline=None)
@given(metric_strategy, st.floats(-1, 1), st.integers(1, 6), st.floats(0, 20), st.booleans())
def test_per_sample_steps_need_no_scores(shape, tau, k, gamma, padded):
    """Per sample with k >= 1 a step drops at most an image's linked candidates, so the
    graph without scores (fewer ops) drops exactly the same ones as with them; its keys
    agree on every linked candidate and rank every unlinked one below them."""
    b, p, _, seed = shape
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(b, p, 3, generator=g)
    valid = torch.arange(p)[None, :] < torch.randint(1, p + 1, (b, 1), generator=g) if padded else None
    full, lean = saint_graph(m, tau, gamma, valid), saint_graph(m, tau, gamma, valid, scores=False)
    assert lean.score is None and torch.equal(lean.degree, full.degree)
    linked = full.degree > 0
    assert torch.equal(lean.rank_key[linked], full.rank_key[linked])
    counts = redundant_counts(full, k)
    assert torch.equal(drop_top_ranked(lean.rank_key, lean.candidate_valid, counts),
                       drop_top_ranked(full.rank_key, full.candidate_valid, counts))


def test_fold_plan_needs_the_nearest_anchors():
    g = saint_graph(hand_metric(), tau=0.9, gamma=10.0)
    keep = saint_keep_mask(hand_metric(), 0.9, 1, 10.0)
    with pytest.raises(ValueError, match="nearest=True"):
        saint_fold_plan(g, keep)
    # a0 -> b0 (cos 1), a1 -> b2 (cos 1), a2 -> b1 (cos 1.1 / sqrt(2.02) beats b0's 1 / sqrt(2))
    g = saint_graph(hand_metric(), tau=0.9, gamma=10.0, nearest=True)
    assert saint_fold_plan(g, keep).dst.tolist() == [[1, 5, 3]]

"""The shared candidate/anchor similarity passes: exact agreement with the plain
formulas, ties at tau included, and padded anchors masked."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saint.core import (
    anchor_similarity,
    best_anchors,
    bipartite,
    count_at_least,
    match_anchors,
    match_plan,
    nearest_anchor,
    reduce_similarity,
    saint_graph,
    split_candidates,
    sum_at_least_,
    tome_plan,
)


def test_split_alternates_candidates_and_anchors():
    metric = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    valid = torch.tensor([[True, True, False]])
    a, anc, va, vb = split_candidates(metric, valid)
    torch.testing.assert_close(a[0], torch.tensor([[1.0, 0.0], [2**-0.5, 2**-0.5]]))
    torch.testing.assert_close(anc[0], torch.tensor([[0.0, 1.0]]))
    assert va.tolist() == [[True, False]] and vb.tolist() == [[True]]


def test_padded_anchor_columns_are_minus_inf_and_the_rest_untouched():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    anc = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]])
    sim = anchor_similarity(a, anc, torch.tensor([[True, False, True]]))
    assert sim.tolist() == [[[1.0, float("-inf"), 0.0], [0.0, float("-inf"), 1.0]]]
    assert torch.equal(anchor_similarity(a, anc, None), a @ anc.transpose(1, 2))


def test_ties_at_tau_count_and_sum():
    # exact float32 values, three of them equal to tau
    sim = torch.tensor([[[0.5, 0.25, 0.5, -1.0, float("-inf")], [0.5, 0.75, 1.0, 0.0, 0.5]]])
    assert count_at_least(sim, 0.5).tolist() == [[2, 4]]
    assert sum_at_least_(sim.clone(), 0.5).tolist() == [[1.0, 2.75]]
    assert count_at_least(sim, -1.0).tolist() == [[4, 5]]
    assert sum_at_least_(sim.clone(), -1.0).tolist() == [[0.25, 2.75]]


def test_sum_at_least_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float32"):
        sum_at_least_(torch.zeros(1, 1, 1, dtype=torch.float64), 0.5)


def test_nearest_anchor_skips_padded_anchors_and_handles_none():
    sim = anchor_similarity(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 0.0], [0.6, 0.8]]]),
                            torch.tensor([[False, True]]))
    assert nearest_anchor(sim).tolist() == [[1]]
    assert nearest_anchor(torch.zeros(2, 3, 0)).tolist() == [[0, 0, 0], [0, 0, 0]]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([-1.0, -0.3, 0.0, 0.1, 0.5, 0.9, 1.0]),
    st.integers(1, 9),
)
def test_count_and_sum_equal_the_plain_formulas(seed, tau, n):
    g = torch.Generator().manual_seed(seed)
    # quantised values so that many entries tie with tau exactly
    sim = (torch.randint(-8, 9, (2, 3, n), generator=g) / 8).float()
    sim[0, 0, 0] = float("-inf")
    edges = sim >= tau
    assert torch.equal(count_at_least(sim, tau), edges.sum(-1))
    assert torch.equal(sum_at_least_(sim.clone(), tau), torch.where(edges, sim, 0.0).sum(-1))


def test_best_anchors_mask_invalid_candidates_and_missing_anchors():
    sim = torch.tensor([[[0.2, 0.9], [0.7, 0.1], [0.5, 0.5]]])
    best, idx = best_anchors(sim, torch.tensor([[True, True, False]]))
    assert best.tolist() == [[0.8999999761581421, 0.699999988079071, float("-inf")]]
    assert idx.tolist() == [[1, 0, 0]]
    best, idx = best_anchors(torch.zeros(1, 2, 0), torch.tensor([[True, True]]))
    assert best.tolist() == [[float("-inf"), float("-inf")]] and idx.tolist() == [[0, 0]]


def test_reduce_similarity_chunks_on_cpu_and_calls_reduce_per_chunk(monkeypatch):
    a, anc = torch.randn(5, 4, 3), torch.randn(5, 6, 3)
    seen = []

    def rows(sim):
        seen.append(sim.shape[0])
        return sim.sum(-1), sim.argmax(-1)

    whole = rows(anchor_similarity(a, anc, None))
    seen.clear()
    monkeypatch.setattr(bipartite, "CPU_CHUNK_BYTES", 2 * 4 * 6 * 4)  # two images' [4, 6] float32
    total, idx = reduce_similarity(a, anc, None, rows)
    assert seen == [2, 2, 1]
    assert torch.equal(total, whole[0]) and torch.equal(idx, whole[1])
    assert reduce_similarity(a[:0], anc[:0], None, rows)[0].shape == (0, 4)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(2, 11), st.integers(1, 3))
def test_chunked_selection_equals_the_whole_matrix(seed, b, n, chunk_images):
    """SAINT's graph, saint_match's and ToMe's matches, made one chunk of images at a
    time, are exactly those of the whole batch (padding included)."""
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(b, n, 4, generator=g)
    valid = torch.rand(b, n, generator=g) > 0.2
    valid[:, :2] = True

    def everything():
        graph = saint_graph(metric, 0.1, 1.0, valid, nearest=True)
        a, anc, va, vb = split_candidates(metric, valid)
        plan = match_plan(metric, 0.1, 0.5, 0, valid)
        tome = tome_plan(metric, 1, 0, valid)
        return (graph.degree, graph.score, graph.best_anchor, *match_anchors(a, anc, vb, va),
                plan.src, plan.dst, plan.keep, plan.active, tome.src, tome.dst)

    whole = everything()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bipartite, "CPU_CHUNK_BYTES", chunk_images * (n // 2 + n % 2) * (n // 2) * 4)
        chunked = everything()
    for x, y in zip(whole, chunked, strict=True):
        assert torch.equal(x, y)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.floats(-1.0, 1.0), st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, float("inf")])))
def test_float32_below_is_torch_nextafter_on_the_host(x):
    from saint.core.bipartite import float32_below

    expected = torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(float("-inf"))).item()
    assert float32_below(x) == expected

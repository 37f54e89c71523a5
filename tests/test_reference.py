"""Baselines pinned to their references, with answers worked out by hand from the
reference algorithms (facebookresearch/ToMe ``bipartite_soft_matching``; SAINT's
``iterative_drop_full_graph``) on small inputs. Keys are 2-D unit vectors at the given
angles, so every similarity is a cosine of an angle difference."""

from __future__ import annotations

import math

import torch

from saint.core import fixed_budget_keep_mask, merge_weighted, tome_plan


def unit(*degrees: float) -> torch.Tensor:
    """``[1, N, 2]`` keys at ``degrees``."""
    rad = [math.radians(d) for d in degrees]
    return torch.tensor([[[math.cos(a), math.sin(a)] for a in rad]])


def test_tome_matches_the_reference_merges_without_a_class_token():
    # reference: set A = even positions (p0, p2, p4), set B = odd (p1, p3, p5)
    #   p0 (0 deg):   best B = p1 (cos 5 = .996)
    #   p2 (50 deg):  best B = p1 (cos 45 = .707)
    #   p4 (200 deg): best B = p5 (cos 15 = .966)
    # r = 2 merges the two best edges: p0 -> p1 and p4 -> p5; p2 stays
    keys = unit(0, 5, 50, 120, 200, 185)
    plan = tome_plan(keys, r=2)
    assert plan.src.tolist() == [[0, 4]] and plan.dst.tolist() == [[1, 5]]
    assert plan.keep.tolist() == [[False, True, True, True, False, True]]
    x = torch.arange(6.0).reshape(1, 6, 1)
    merged, sizes = merge_weighted(x, torch.ones(1, 6, 1), plan)
    kept = merged[plan.keep]
    # size-weighted means as the reference's merge_wavg: (0 + 1) / 2 and (4 + 5) / 2
    assert kept.flatten().tolist() == [0.5, 2.0, 3.0, 4.5]
    assert sizes[plan.keep].flatten().tolist() == [2.0, 1.0, 1.0, 2.0]
    # ordering (named difference): the reference returns [unmerged A by score, then B] =
    # [p2, p1+p0, p3, p5+p4]; saint's "tome" keeps the original order [p1+p0, p2, p3, p5+p4]


def test_tome_with_a_class_token_alternates_over_the_patches_only():
    # reference with class_token: the class token is A's first element (its scores -inf),
    # so A = (cls, p1, p3, p5), B = (p0, p2, p4): p1 -> p0 (cos 5) and p5 -> p4 (cos 15).
    # saint alternates over the prunable tokens only: A = (p0, p2, p4), B = (p1, p3, p5):
    # p0 -> p1 and p4 -> p5. Same merged groups here, source and destination swapped.
    keys = torch.cat([unit(90), unit(0, 5, 50, 120, 200, 185)], dim=1)
    plan = tome_plan(keys, r=2, num_protected=1)
    assert plan.src.tolist() == [[1, 5]] and plan.dst.tolist() == [[2, 6]]
    assert bool(plan.keep[0, 0])


def test_budget_equals_iterative_drop_full_graph_by_hand():
    # reference: drop the highest summed similarity among the remaining candidates,
    # min(N - (keep_num - 1), N // r) per round, until keep_num - 1 patches remain
    # (keep_num counts the class token; saint's keep counts patches: keep = keep_num - 1).
    # angles 60, 90, 160, 190, 340; keep = 2, step_div = r = 2
    # round 1, N = 5, step min(3, 2) = 2: sums 1.223, 1.692, 1.034, 0.184, -1.034 -> drop p1, p0
    # round 2, N = 3, step min(1, 1) = 1: sums over {p2, p3, p4}:
    #   p2 = 1 + cos 30 + cos 180 = 0.866, p3 = cos 30 + 1 + cos 150 = 1.0,
    #   p4 = cos 180 + cos 150 + 1 = -0.866 -> drop p3; keep p2, p4
    # (a single ranking by the first sums would have kept p3 and p4 instead)
    keys = torch.cat([unit(0), unit(60, 90, 160, 190, 340)], dim=1)
    keep = fixed_budget_keep_mask(keys, keep=2, step_div=2, num_protected=1)
    assert keep.tolist() == [[True, False, False, True, False, True]]


def test_budget_takes_one_step_where_the_reference_would_stall():
    # the reference's N // r is 0 once fewer than r candidates remain (its loop would
    # not end); saint drops at least one per round
    keys = torch.cat([unit(0), unit(0, 10, 100)], dim=1)
    keep = fixed_budget_keep_mask(keys, keep=1, step_div=16, num_protected=1)
    assert int(keep[0, 1:].sum()) == 1

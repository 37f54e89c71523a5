"""Baselines pinned to their references, with answers worked out by hand from the
reference algorithms (facebookresearch/ToMe ``bipartite_soft_matching``; SAINT's
``iterative_drop_full_graph``) on small inputs. Keys are 2-D unit vectors at the given
angles, so every similarity is a cosine of an angle difference."""

from __future__ import annotations

import math

import pytest
import torch

from saint.core import (
    fixed_budget_keep_mask,
    gather_tokens,
    keep_mask_to_indices,
    merge_weighted,
    tome_plan,
)


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


# ----------------------------------------------------------------- ToMe, order="reference"
def reference_steps(keys_per_step, rs, protected=0):
    """Run saint's ToMe steps with ``order="reference"`` on one image whose tokens start
    as the one-hot rows of the identity: each output row then shows which original
    tokens it averages, and with what weights. ``keys_per_step[i]`` are the keys of the
    layout entering step ``i`` (given by hand, in that layout)."""
    n = keys_per_step[0].shape[1]
    x, sizes = torch.eye(n)[None], torch.ones(1, n, 1)
    for keys, r in zip(keys_per_step, rs, strict=True):
        plan = tome_plan(keys, r, num_protected=protected, order="reference")
        x, sizes = merge_weighted(x, sizes, plan)
        idx, _ = keep_mask_to_indices(plan.keep, order=plan.order)
        x, sizes = gather_tokens(x, idx), gather_tokens(sizes, idx)
    return x[0], sizes[0, :, 0]


def members(rows: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(torch.nonzero(row > 0).flatten().tolist()) for row in rows]


def test_tome_reference_order_without_a_class_token_two_steps():
    # step 1 as above: A = (p0, p2, p4), B = (p1, p3, p5); edges by score p0 (.996),
    # p4 (.966), p2 (.707); r = 1 merges p0 -> p1. The reference returns
    # cat([unmerged A best edge first, B]) = [p4, p2, p1+p0, p3, p5].
    step1 = unit(0, 5, 50, 120, 200, 185)
    plan = tome_plan(step1, r=1, order="reference")
    assert plan.src.tolist() == [[0]] and plan.dst.tolist() == [[1]]
    assert keep_mask_to_indices(plan.keep, order=plan.order)[0].tolist() == [[4, 2, 1, 3, 5]]
    # step 2 over that layout, keys at 0 (p4), 20 (p2), 100 (p01), 90 (p3), 88 (p5) degrees:
    # A = (p4, p01, p5), B = (p2, p3): p5 -> p3 (cos 2 = .999), p01 best p3 (cos 10 = .985),
    # p4 best p2 (cos 20 = .940); r = 1 merges p5 into p3, unmerged A by edge: [p01, p4]
    # -> [p01, p4, p2, p3+p5]
    x, sizes = reference_steps([step1, unit(0, 20, 100, 90, 88)], [1, 1])
    assert members(x) == [(0, 1), (4,), (2,), (3, 5)]
    assert sizes.tolist() == [2.0, 1.0, 1.0, 2.0]
    torch.testing.assert_close(x[0], torch.tensor([1, 1, 0, 0, 0, 0]) / 2.0)
    # saint's default layout [p01, p2, p3, p4, p5] with the same per-token keys pairs
    # differently: A = (p01, p3, p5), B = (p2, p4): p5 -> p2 (cos 68 = .375) is the best edge
    keep_plan = tome_plan(unit(100, 20, 90, 0, 88), r=1)
    assert keep_plan.src.tolist() == [[4]] and keep_plan.dst.tolist() == [[1]] and keep_plan.order is None


def test_tome_reference_order_with_a_class_token_two_steps():
    # t0 = cls (90), t1..t6 at 0, 5, 50, 120, 200, 185 degrees. The split runs over every
    # token: A = (t0, t2, t4, t6) with the class token's scores -inf, B = (t1, t3, t5):
    # t2 -> t1 (cos 5 = .996), t6 -> t5 (cos 15 = .966), t4 best t3 (cos 70 = .342)
    # r = 2; unmerged A sorted by position: [t0, t4], then B: [t0, t4, t1+t2, t3, t5+t6]
    step1 = torch.cat([unit(90), unit(0, 5, 50, 120, 200, 185)], dim=1)
    plan = tome_plan(step1, r=2, num_protected=1, order="reference")
    assert plan.src.tolist() == [[2, 6]] and plan.dst.tolist() == [[1, 5]]
    assert keep_mask_to_indices(plan.keep, order=plan.order)[0].tolist() == [[0, 4, 1, 3, 5]]
    # step 2 over [t0, t4, t12, t3, t56], keys at 90, 0, 30, 100, 95 degrees:
    # A = (t0, t12, t56), B = (t4, t3): t12 best t4 (cos 30 = .866), t56 best t3 (cos 5 = .996)
    # r = 1 merges t56 into t3: [t0, t12, t4, t3+t56]
    x, sizes = reference_steps([step1, unit(90, 0, 30, 100, 95)], [2, 1], protected=1)
    assert members(x) == [(0,), (1, 2), (4,), (3, 5, 6)]
    assert sizes.tolist() == [1.0, 2.0, 1.0, 3.0]
    torch.testing.assert_close(x[3], torch.tensor([0, 0, 0, 1, 0, 1, 1]) / 3.0)


def test_tome_reference_order_with_a_distillation_token():
    # t0 = cls (A, never merged), t1 = distillation token (B, never a destination; at
    # 1 degree it would be t2's best match), t2..t5 at 0, 10, 100, 60 degrees.
    # A = (t0, t2, t4), B = (t1, t3, t5): t2 -> t3 (cos 10), t4 best t5 (cos 40); r = 1.
    # The reference returns [unm[0], dst[0], unm[1:], dst[1:]] = [t0, t1, t4, t3+t2, t5]
    keys = unit(90, 1, 0, 10, 100, 60)
    plan = tome_plan(keys, r=1, num_protected=2, order="reference")
    assert plan.src.tolist() == [[2]] and plan.dst.tolist() == [[3]]
    assert keep_mask_to_indices(plan.keep, order=plan.order)[0].tolist() == [[0, 1, 4, 3, 5]]


def test_tome_merges_nothing_at_r_zero_in_either_order():
    # the reference returns its input untouched when r = 0: no reordering either
    plan = tome_plan(unit(0, 5, 50), r=0, order="reference")
    assert plan.src.numel() == 0 and plan.order is None and bool(plan.keep.all())
    with pytest.raises(ValueError, match="order must be one of"):
        tome_plan(unit(0, 5), r=1, order="sorted")


def reference_merge(x, size, metric, r, protected):
    """One ToMe step as the paper and facebookresearch/ToMe describe it, image by image:
    tokens alternate into A (even positions) and B (odd); the protected prefix (class
    token in A, distillation token in B) neither merges nor receives; each A token's
    edge goes to its most similar B token; the ``r`` best edges merge (size-weighted
    sums); out come the unmerged A tokens (by position when a prefix is protected, else
    best edge first) and then all of B, the distillation token moved to second place."""
    out_x, out_s = [], []
    r = min(r, (x.shape[1] - protected) // 2)  # the reference's clamp: at most half the tokens
    for xi, si, mi in zip(x, size, metric, strict=True):
        mi = mi / mi.norm(dim=-1, keepdim=True)
        ia, ib = list(range(0, len(xi), 2)), list(range(1, len(xi), 2))
        score = mi[ia] @ mi[ib].T
        score[[j for j, pos in enumerate(ia) if pos < protected]] = -math.inf
        score[:, [j for j, pos in enumerate(ib) if pos < protected]] = -math.inf
        best, match = score.max(dim=1)
        ranked = sorted(range(len(ia)), key=lambda j: -best[j].item())
        merged, rest = ranked[:r], ranked[r:]
        if protected:
            rest = sorted(rest)
        wx, ws = (xi * si)[ib].clone(), si[ib].clone()
        for j in merged:
            wx[match[j]] += (xi * si)[ia[j]]
            ws[match[j]] += si[ia[j]]
        rows_x = [(xi * si)[ia[j]] for j in rest] + list(wx)
        rows_s = [si[ia[j]] for j in rest] + list(ws)
        if protected == 2:  # [cls, distillation token, other unmerged A, other B]
            move = [0, len(rest), *range(1, len(rest)), *range(len(rest) + 1, len(rows_x))]
            rows_x, rows_s = [rows_x[k] for k in move], [rows_s[k] for k in move]
        sx, ss = torch.stack(rows_x), torch.stack(rows_s)
        out_x.append(sx / ss)
        out_s.append(ss)
    return torch.stack(out_x), torch.stack(out_s)


def reference_tome_features(model, images, rs):
    """A timm ViT's forward_features with ToMe as the reference applies it: proportional
    attention (``+ log(size)`` on the keys), the merge between the attention residual
    and the MLP, the head-averaged keys as the metric."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    protected, size = model.num_prefix_tokens, torch.ones(x.shape[0], x.shape[1], 1)
    for blk, r in zip(model.blocks, rs, strict=True):
        attn = blk.attn
        b, n, c = x.shape
        q, k, v = attn.qkv(blk.norm1(x)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * attn.scale + size[:, None, None, :, 0].log()
        y = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + blk.ls1(attn.proj(y))
        x, size = reference_merge(x, size, k.mean(dim=1), r, protected)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.norm(x)


@pytest.mark.parametrize(
    "arch,overrides", [("vit", {}), ("vit", dict(class_token=False, global_pool="avg")), ("deit_distilled", {})],
    ids=["class_token", "no_class_token", "distilled"],
)
def test_tome_reference_order_equals_the_reference_forward_on_a_tiny_vit(arch, overrides):
    import saint

    from .conftest import make_tiny

    rs = [3, 2, 2, 1]
    model = make_tiny(arch, **overrides)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference_tome_features(model, images, rs)
        saint.patch(model, "tome", r=rs, order="reference", trace=True)
        got = model.forward_features(images)
    assert got.shape == (2, 16 + model.num_prefix_tokens - sum(rs), 32)
    with torch.no_grad():  # r above half the tokens merges half, as the reference's clamp does
        saint.patch(model, "tome", r=[8, 8, 8, 8], order="reference")
        big = model.forward_features(images)
        torch.testing.assert_close(big, reference_tome_features(model, images, [8] * 4), rtol=0, atol=1e-5)
        assert big.shape[1] == model.num_prefix_tokens + 1  # 16 -> 8 -> 4 -> 2 -> 1 patches
        saint.patch(model, "tome", r=rs, order="reference", trace=True)
        got = model.forward_features(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # traced origins follow the tokens: each final token stands for as many originals as its size
    state = saint.adapters.handle_of(model).state
    per_slot = torch.stack([torch.bincount(o, minlength=got.shape[1]) for o in state.origin])
    assert torch.equal(per_slot.float(), state.sizes[..., 0])
    with torch.no_grad():  # the default layout holds the same kind of tokens in another order
        saint.unpatch(model)
        saint.patch(model, "tome", r=rs)
        assert not torch.allclose(model.forward_features(images), expected, rtol=0, atol=1e-3)

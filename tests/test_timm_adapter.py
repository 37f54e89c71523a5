"""The timm adapter on every supported ViT flavour x every method."""

from __future__ import annotations

import pytest
import timm
import torch

import saint
from saint.adapters import find_adapter
from saint.adapters.common import get_handle

from .conftest import make_tiny, refuses_class_attention

METHOD_KW = {
    "saint": dict(tau=0.0, k=1),
    "saint_fold": dict(tau=0.0, k=1),
    "tome": dict(r=2),
    "random": dict(r=3),
    "attn": dict(r=3),
    "budget": dict(layers=[1], keep=5),
}


@torch.no_grad()
def test_unpatch_restores_bit_identical(arch, images):
    model = make_tiny(arch)
    ref = model(images)
    saint.patch(model, "saint", tau=0.0, k=1)
    assert not torch.equal(model(images), ref)
    saint.unpatch(model)
    assert torch.equal(model(images), ref)
    assert not saint.is_patched(model)
    assert all("forward" not in blk.__dict__ for blk in model.blocks)


@torch.no_grad()
def test_prune_nothing_is_bit_identical(arch, images):
    model = make_tiny(arch)
    ref = model(images)
    saint.patch(model, "saint", k=1000)  # no candidate can have 1000 links
    assert torch.equal(model(images), ref)
    saint.patch(model, "tome", r=0)
    assert torch.equal(model(images), ref)


@pytest.mark.parametrize("method", sorted(METHOD_KW))
@torch.no_grad()
def test_every_method_runs_and_stats_match_lengths(arch, method, images):
    model = make_tiny(arch)
    if refuses_class_attention(model, method, METHOD_KW[method]):
        return
    saint.patch(model, method, **METHOD_KW[method])
    lengths = []
    handles = [blk.register_forward_pre_hook(
        lambda m, a, lst=lengths: lst.append(get_handle(model).state.valid)) for blk in model.blocks]
    seq = []
    handles += [blk.register_forward_pre_hook(lambda m, a, lst=seq: lst.append(a[0].shape[1])) for blk in model.blocks]
    out = model(images)
    for h in handles:
        h.remove()
    assert torch.isfinite(out).all()
    st = saint.stats(model)
    assert len(st.tokens) == len(model.blocks)
    for counts, n, valid in zip(st.tokens, seq, lengths, strict=True):
        real = [n] * len(counts) if valid is None else valid.sum(1).tolist()
        assert counts == real
    n0 = model.patch_embed.num_patches + find_adapter(model).protected(model)  # CaiT: no class token yet
    assert st.tokens[0] == [n0] * images.shape[0]
    assert min(st.tokens[-1]) < n0


@pytest.mark.parametrize("variant", [{}, {"method": "saint_fold"}, {"metric": "hidden"}])
@torch.no_grad()
def test_sample_rate_is_batch_invariant(arch, images, variant):
    model = make_tiny(arch)
    kwargs = {"method": "saint", "tau": 0.2, "k": 1, "rate": "sample", **variant}
    saint.patch(model, **kwargs)
    batched = model(images)
    counts = saint.stats(model).tokens
    assert any(len(set(c)) > 1 for c in counts), "test needs ragged per-sample counts"
    for i in range(images.shape[0]):
        alone = model(images[i : i + 1])
        torch.testing.assert_close(alone[0], batched[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["saint", "tome", "budget", "attn"])
@torch.no_grad()
def test_sdpa_equals_eager(arch, method, images):
    model = make_tiny(arch)
    if refuses_class_attention(model, method, METHOD_KW[method]):
        return
    saint.patch(model, method, **METHOD_KW[method])
    fused = model(images)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    torch.testing.assert_close(model(images), fused, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_budget_leaves_exact_count():
    model = make_tiny("dinov2_reg")
    saint.patch(model, "budget", layers=[0, 2], keep=[10, 4])
    model(torch.randn(2, 3, 32, 32))
    st = saint.stats(model).tokens
    p = model.num_prefix_tokens
    assert st[1] == [10 + p] * 2 and st[3] == [4 + p] * 2


@torch.no_grad()
def test_protected_prefix_tokens_survive():
    model = make_tiny("dinov2_reg")
    saint.patch(model, "saint", tau=-1.0, k=1, trace=True)
    model(torch.randn(2, 3, 32, 32))
    origins = get_handle(model).state.origins
    assert len(origins) == 2  # blocks 0 and 1 prune
    p = model.num_prefix_tokens
    for o in origins:
        assert o[:, :p].tolist() == [list(range(p))] * 2


@torch.no_grad()
def test_per_layer_schedules():
    model = make_tiny("vit")
    saint.patch(model, "saint", tau=[0.9, -1.0], k=1)
    model(torch.randn(2, 3, 32, 32))
    st = saint.stats(model).mean()
    assert st[0] == 17 and st[2] < st[1]  # blocks 0 and 1 prune; block 1 with tau -1 drops half
    saint.patch(model, "saint", tau={2: -1.0}, k=1)
    model(torch.randn(2, 3, 32, 32))
    st = saint.stats(model).mean()
    assert st[:3] == [17, 17, 17] and st[3] == 9
    saint.patch(model, "tome", r={0: 4, 1: 2})
    model(torch.randn(2, 3, 32, 32))
    assert saint.stats(model).mean() == [17, 13, 11, 11]


@torch.no_grad()
def test_repatch_replaces_config_cleanly(images):
    model = make_tiny("vit")
    ref = model(images)
    saint.patch(model, "tome", r=2)
    saint.patch(model, "random", r=1, layers=[3])
    model(images)
    assert saint.stats(model).mean() == [17, 17, 17, 17]
    saint.unpatch(model)
    assert torch.equal(model(images), ref)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(method="saint", tau=1.5), ValueError, "outside"),
        (dict(method="saint", tau=-1.01), ValueError, "outside"),
        (dict(method="saint", k=0), ValueError, "k=0"),
        (dict(method="saint", gamma=-1), ValueError, "gamma"),
        (dict(method="saint", layers=[4]), ValueError, "out of range"),
        (dict(method="saint", layers=[]), ValueError, "empty"),
        (dict(method="saint", rate="vote"), ValueError, "rate"),
        (dict(method="saint", tau=[0.5, 0.6], layers=[0, 1, 2]), ValueError, "2 values"),
        (dict(method="saint", r=3), TypeError, "does not take"),
        (dict(method="tome"), ValueError, "needs r"),
        (dict(method="random", r=16), ValueError, "more than random"),
        (dict(method="budget", keep=3), ValueError, "explicit layers"),
        (dict(method="budget", layers=[1], keep=0), ValueError, "keep=0"),
        (dict(method="budget", layers=[1], keep=17), ValueError, "exceeds"),
        (dict(method="nope"), ValueError, "unknown method"),
    ],
)
def test_bad_input_errors(kwargs, err, match):
    model = make_tiny("vit")
    with pytest.raises(err, match=match):
        saint.patch(model, **kwargs)
    assert not saint.is_patched(model)


def test_unsupported_models_are_rejected():
    with pytest.raises(TypeError, match="supported"):
        saint.patch(torch.nn.Linear(3, 3))
    resnet = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(TypeError, match="supported"):
        saint.patch(resnet)
    with pytest.raises(ValueError, match="not patched"):
        saint.unpatch(make_tiny("vit"))


def test_attn_needs_class_token():
    model = make_tiny("vit", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        saint.patch(model, "attn", r=2)


@pytest.mark.parametrize("arch", ["mae_avgpool", "vit", "eva02"])
@pytest.mark.parametrize("method,kw", [("saint_plus", dict(tau=0.1)), ("tome", dict(r=2)),
                                       ("saint_match", dict(tau=0.1, fraction=0.6))])
def test_forward_head_pools_features_with_their_own_call(arch, method, kw, images):
    """forward_features' tokens (and forward_intermediates' final ones) remember their
    call: pooling them after other calls uses their own padding and merged sizes (it used
    the last call's: NaN or a silently wrong average). Tokens changed since (a copy, or
    detached from autograd's 0-padded output) must be a copy of the last call's output,
    else are refused (a copy from before another call pooled with that call's sizes)."""
    model = saint.patch(make_tiny(arch), method, **kw)
    other = images.flip(0) * 0.5
    with torch.no_grad():
        want = model(images)
        feats = model.forward_features(images)
        model.forward_features(other)
        model(other[:2])
        torch.testing.assert_close(model.forward_head(feats), want, rtol=0, atol=1e-6)
        final, _ = model.forward_intermediates(images, output_fmt="NLC")  # its final tokens too
        model(other[:2])
        torch.testing.assert_close(model.forward_head(final), want, rtol=0, atol=1e-6)
        fresh = model.forward_features(other).clone()  # untagged, but the last call's tokens
        torch.testing.assert_close(model.forward_head(fresh), model(other), rtol=0, atol=1e-6)
        model(other[:2])  # a copy of tokens from before another call: refused, whatever the call left
        for copy in (feats.clone(), feats.detach(), feats * 1.0):  # (it pooled with that call's sizes or NaN)
            with pytest.raises(ValueError, match="not the patched model's last output"):
                model.forward_head(copy)
    detached = model.forward_features(images).detach()  # recorded by autograd: 0 at padding, untagged
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(detached), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,kw", [("tome", dict(r=2)), ("saint_plus", dict(tau=0.1))])
def test_forward_head_refuses_tokens_the_patched_model_did_not_make(method, kw, images):
    """Tokens from before the patch (untagged, every token) pooled by the patched model after
    a merging call: a clear error (with ToMe it was a raw size mismatch in the weighted mean)."""
    model = make_tiny("mae_avgpool")
    with torch.no_grad():
        unpatched = model.forward_features(images)
        saint.patch(model, method, **kw)
        model(images)
        with pytest.raises(ValueError, match="not the patched model's last output"):
            model.forward_head(unpatched)


def test_merging_rejects_pooling_that_cannot_weigh_sizes():
    model = make_tiny("vit", global_pool="max", class_token=False)
    with pytest.raises(ValueError, match="global_pool"):
        saint.patch(model, "tome", r=2)
    saint.patch(model, "saint", rate="sample")  # dropping: max pooling runs per image


@pytest.mark.parametrize("overrides", [dict(global_pool="map"), dict(global_pool="map", class_token=False)],
                         ids=["class_token", "no_class_token"])
def test_attention_pooling_weighs_merged_tokens_as_their_parts(overrides):
    """timm's attention pooling (SigLIP's ``map``) with ``log(size)`` on merged keys equals
    the model's own pooling over each merged token repeated ``size`` times (proportional
    attention's identity), image by image; without proportional attention, over the
    merged tokens once each."""
    model = make_tiny("vit", **overrides)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prefix = model.num_prefix_tokens
    for prop_attn in (True, False):
        saint.patch(model, "tome", r=3, prop_attn=prop_attn)
        with torch.no_grad():
            feats = model.forward_features(images)
            pooled = model.forward_head(feats, pre_logits=True)
            sizes = saint.adapters.handle_of(model).state.sizes[:, prefix:, 0]
            assert sizes.sum(dim=1).tolist() == [16.0] * 3 and sizes.max() > 1  # merged, every patch counted
            for i in range(3):
                tokens = feats[i, prefix:]
                if prop_attn:
                    tokens = tokens.repeat_interleave(sizes[i].long(), dim=0)
                want = model.fc_norm(model.attn_pool(tokens[None]))[0]
                torch.testing.assert_close(pooled[i], want, rtol=1e-5, atol=1e-6)
        saint.unpatch(model)


@pytest.mark.parametrize(("arch", "extra", "size", "grid"), [
    ("vit", dict(dynamic_img_size=True), (32, 48), (4, 6)),
    ("vit", dict(dynamic_img_size=True, dynamic_img_pad=True), (34, 50), (5, 7)),
    ("dinov3", {}, (32, 48), (4, 6)),  # timm's DINOv3 takes any size
    ("vit", {}, (32, 32), (4, 4)),
])
def test_grid_follows_an_image_of_another_size(arch, extra, size, grid):
    """Models that take any image size report that image's patch grid (padded to whole
    patches with ``dynamic_img_pad``), and a kept-patch trace fills it."""
    from saint.analysis.viz import trace_kept

    model = make_tiny(arch, **extra)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    g = find_adapter(model).grid(model, x)
    assert (g.rows, g.cols) == grid
    kept = trace_kept(model, x, "saint", tau=0.0, k=1, layers=[0])
    assert kept.groups[0].shape == grid

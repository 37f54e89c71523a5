"""``select_at="attention"``: the selection acts before a block's attention, on the block's
own keys, and the chosen tokens' q/k/v rows go with them. Known answers on the block
itself; packed = padded = alone is in test_packed.py."""

from __future__ import annotations

import pytest
import torch

import saint
from saint.adapters.base import vit_block_flops
from saint.calibration import flops_fraction

from .conftest import make_tiny

TOL = dict(rtol=0, atol=1e-5)


def _block_io(model, index):
    """Record block ``index``'s input and output in the next forward."""
    seen = {}
    blk = model.blocks[index]
    hooks = [blk.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
             blk.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out))]
    return seen, hooks


@torch.no_grad()
@pytest.mark.parametrize("arch", ["vit", "dinov2_reg"])
def test_dropping_before_attention_equals_the_block_on_the_survivors(arch, images):
    """A drop at block 1 before its attention: the block's output is exactly the unpatched
    block run on the tokens that survive (qkv is per token, so selecting qkv rows equals
    projecting the survivors)."""
    model = make_tiny(arch)
    saint.patch(model, "random", r=3, layers=[1], select_at="attention", trace=True)
    seen, hooks = _block_io(model, 1)
    model(images)
    for h in hooks:
        h.remove()
    origin = saint.api.get_handle(model).state.origins[0]  # each original token's new position, or -1
    x, y = seen["x"], seen["y"]
    assert y.shape[1] == x.shape[1] - 3
    blk = model.blocks[1]
    for b in range(len(images)):
        kept = (origin[b] >= 0).nonzero().squeeze(1)
        kept = kept[origin[b][kept].argsort()]  # in their new order
        expected = type(blk).forward(blk, x[b : b + 1, kept])
        torch.testing.assert_close(y[b : b + 1], expected, **TOL)


@torch.no_grad()
@pytest.mark.parametrize("select_at", ["mlp", "attention"])
def test_nothing_to_merge_gives_the_unpatched_answer_at_either_placement(select_at, images):
    model = make_tiny("dinov2_reg")
    ref = model(images)
    saint.patch(model, "saint_match", tau=1.0, fraction=1.0, select_at=select_at)
    assert torch.equal(model(images), ref)


@torch.no_grad()
def test_placements_merge_the_same_counts_with_different_results(images):
    model = make_tiny("vit")
    outs, tokens = {}, {}
    for select_at in ("mlp", "attention"):
        saint.patch(model, "tome", r=3, select_at=select_at)
        outs[select_at] = model(images)
        tokens[select_at] = saint.stats(model).tokens
    assert tokens["mlp"] == tokens["attention"]
    assert not torch.allclose(outs["mlp"], outs["attention"], atol=1e-4)


def test_flops_model_counts_keys_on_the_input_and_the_rest_on_the_survivors():
    keys_in, keys_out = 2 * 17 * 32 * 32, 2 * 9 * 32 * 32
    after = vit_block_flops(17, 9, 32, 128, "attention")
    assert after == vit_block_flops(9, 9, 32, 128) + keys_in - keys_out
    full_qkv = vit_block_flops(17, 9, 32, 128, "attention", keys_first=False)
    assert full_qkv == after + 2 * (keys_in - keys_out)  # queries and values on every token too
    assert after < full_qkv < vit_block_flops(17, 9, 32, 128, "mlp")
    for keys_first in (True, False):
        assert vit_block_flops(17, 17, 32, 128, "attention", keys_first) == vit_block_flops(17, 17, 32, 128)


@torch.no_grad()
@pytest.mark.parametrize("hooked", [False, True])
def test_timm_flops_model_matches_what_runs_before_attention(hooked, images):
    """torch's FLOP counter on a model that drops before block 1's attention equals the
    adapter's count: the key rows of qkv on every token and the query/value rows on the
    survivors; with a user's hook on that qkv, the whole projection on every token (and
    the hook sees it)."""
    from saint.adapters import find_adapter
    from saint.measure.flops import count_flops

    model = make_tiny("vit")
    adapter = find_adapter(model)
    n = model.num_prefix_tokens + model.patch_embed.num_patches
    seen = []
    if hooked:
        model.blocks[1].attn.qkv.register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    b = len(images)
    unpruned, _ = count_flops(lambda: model.forward_features(images))
    rest = unpruned / b - len(model.blocks) * adapter.block_flops(model, n, n)
    saint.patch(model, "random", r=5, layers=[1], select_at="attention")
    total, _ = count_flops(lambda: model.forward_features(images))
    after = n - 5
    counted = adapter.block_flops(model, n, after)
    if hooked:
        assert seen[-1] == n  # the projection the hook is on ran on every token
        blk = model.blocks[1]
        dim = blk.norm1.normalized_shape[0]
        counted = vit_block_flops(n, after, dim, blk.mlp.fc1.out_features, "attention", keys_first=False)
    expected = adapter.block_flops(model, n, n) + counted + (len(model.blocks) - 2) * adapter.block_flops(
        model, after, after)
    assert total / b - rest == pytest.approx(expected, rel=1e-9)


def test_flops_fraction_follows_the_patched_setting(images):
    model = make_tiny("vit")
    tokens = [17, 13, 9, 9]
    mlp = flops_fraction(model, tokens)
    assert flops_fraction(model, tokens, "attention") < mlp
    saint.patch(model, "tome", r=1, select_at="attention")
    assert flops_fraction(model, tokens) == flops_fraction(model, tokens, "attention")
    assert flops_fraction(model, tokens, "mlp") == mlp


def test_calibration_keeps_select_at_and_counts_its_flops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=g) * 0.2 + torch.linspace(-1, 1, 32)
    model = make_tiny("vit", depth=6)
    cal = saint.calibrate(model, x, flops_speedup=1.3, method="saint_match", select_at="attention", tol=0.02)
    assert cal.patch_kwargs()["select_at"] == "attention"
    assert saint.api.get_handle(model).config.select_at == "attention"
    with torch.no_grad():
        model(x)
    reached = 1 / flops_fraction(model, saint.stats(model).mean())
    assert cal.achieved == pytest.approx(1.3, rel=0.08)
    assert reached == pytest.approx(cal.achieved, rel=0.08)


def test_bad_select_at_is_refused(images):
    model = make_tiny("vit")
    with pytest.raises(ValueError, match="select_at='before' is not one of"):
        saint.patch(model, "tome", r=2, select_at="before")
    assert not saint.is_patched(model)


class _OwnLinear(torch.nn.Linear):
    """A qkv projection that is not a plain ``nn.Linear`` (as a quantised or adapted one)."""


@torch.no_grad()
def test_keys_first_equals_the_whole_projection_and_hooks_see_it_whole(images):
    """A plain qkv runs its key rows on every token and q/v on the survivors; a user's hook
    on it, or a qkv of another class, makes the block project every token whole (the hook
    sees that, never overwritten; without a hook the rows are compacted in place). Both
    give the same answer."""
    model = make_tiny("vit")
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7, select_at="attention")
    keys_first = model(images)
    seen = []
    hooks = [model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:2])),
             model.blocks[1].attn.qkv.register_forward_hook(lambda m, a, out: seen.append((out, out.clone())))]
    torch.testing.assert_close(model(images), keys_first, **TOL)
    for h in hooks:
        h.remove()
    entering, (out, copy) = seen
    assert out.shape[:2] == entering and torch.equal(out, copy)
    saint.unpatch(model)
    for blk in model.blocks:
        own = _OwnLinear(blk.attn.qkv.in_features, blk.attn.qkv.out_features)
        own.load_state_dict(blk.attn.qkv.state_dict())
        blk.attn.qkv = own
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7, select_at="attention")
    torch.testing.assert_close(model(images), keys_first, **TOL)


def test_keep_rows_in_place_equals_gather():
    from saint.core.packing import keep_rows

    g = torch.Generator().manual_seed(0)
    for t in (1, 7, 10000):
        x = torch.randn(1, t, 3, generator=g)
        keep = torch.rand(t, generator=g) > 0.4
        expected = x[:, keep].clone()
        got = keep_rows(x, keep, in_place=True)
        assert torch.equal(got, expected) and got.data_ptr() == x.data_ptr()


def test_gradients_flow_through_the_merged_projections(images):
    """With gradients on nothing is compacted in place (autograd keeps each block's rows),
    and the packed output is the padded one, gradients included."""
    grads = {}
    for layout in ("packed", "padded"):
        model = make_tiny("vit")
        saint.patch(model, "saint_match", tau=0.3, fraction=0.7, select_at="attention", layout=layout)
        model(images).square().sum().backward()
        grads[layout] = model.blocks[0].attn.qkv.weight.grad
    torch.testing.assert_close(grads["packed"], grads["padded"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_attention_weights_are_refused_where_saint_runs_a_layer_s_attention(kind, images):
    """``select_at="attention"`` runs each pruning layer's attention in saint, which makes no
    weights: ``output_attentions`` came back with those layers missing (and the rest misnamed
    by their index), even on a rectangular batch. Refused; between attention and MLP every
    layer's weights come back."""
    pytest.importorskip("transformers")
    from .test_hf_vision import make

    model = make(kind, impl="eager")
    saint.patch(model, "random", r=3, layers=[1], select_at="attention")
    with torch.no_grad(), pytest.raises(ValueError, match="select_at='attention' .* no attention weights"):
        model(pixel_values=images, output_attentions=True)
    saint.patch(model, "random", r=3, layers=[1], layout="padded")
    with torch.no_grad():
        attentions = model(pixel_values=images, output_attentions=True).attentions
    assert len(attentions) == model.config.num_hidden_layers
    n = attentions[0].shape[-1]  # 16 patches (and CLIP's class token)
    assert [a.shape[-1] for a in attentions[:3]] == [n, n, n - 3]  # 3 dropped after layer 1

"""timm ``Cait`` (CaiT): what the shared timm tests cannot see. Kept tokens run as timm's own
blocks run them; the talking-heads attention counts a merged key as its copies and padding
as nothing (known answers against timm's own module); the class attention and the average
head read each image's real patches, a merged one as its parts; the kernels; the FLOPs
model; the adapter. (Packed == padded == alone, exact unpatch, every method and both
placements run for ``cait`` and ``cait_avg`` of ``conftest.ARCHS`` in the shared timm tests.)"""

from __future__ import annotations

import pytest
import torch

import saint
from saint.adapters import find_adapter, handle_of
from saint.adapters.timm_cait import talking_heads
from saint.measure.flops import count_flops

from .conftest import assert_adapter_probe_reads_keys, make_tiny

TOL = dict(atol=1e-5, rtol=1e-5)


@torch.no_grad()
def reference_after_drop(model: torch.nn.Module, x: torch.Tensor, block: int, kept: torch.Tensor,
                         select_at: str) -> torch.Tensor:
    """timm's own forward of one image whose patches ``kept [N']`` alone go on from ``block``
    (before its attention, or between its attention and its MLP): every module as timm runs it."""
    x = model.pos_drop(model.patch_embed(x) + model.pos_embed)
    for i, blk in enumerate(model.blocks):
        if i != block:
            x = blk(x)
        elif select_at == "attention":
            x = blk(x[:, kept])
        else:
            x = x + blk.gamma_1 * blk.attn(blk.norm1(x))
            x = x[:, kept]
            x = x + blk.gamma_2 * blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(model.forward_cls(x)))


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("arch", ["cait", "cait_avg"])
def test_kept_tokens_run_as_timms_own_blocks(arch, select_at, layout, images):
    """Dropping patches in block 1 (a ragged batch): each image's logits equal timm's own
    forward of the image with the dropped patches removed there (known answer), the class
    attention and the head reading only the kept ones."""
    model = make_tiny(arch)
    saint.patch(model, "saint", tau=0.2, k=1, layers=[1], select_at=select_at, layout=layout, trace=True)
    with torch.no_grad():
        out = model(images)
    assert saint.stats(model).layout == layout and saint.stats(model).per_sample_differs()
    origin = handle_of(model).origins()[0]  # [B, N0]: position after the step, -1 = dropped
    saint.unpatch(model)
    for i in range(len(images)):
        kept = torch.nonzero(origin[i] >= 0).flatten()
        assert len(kept) < origin.shape[1]
        torch.testing.assert_close(out[i : i + 1], reference_after_drop(model, images[i : i + 1], 1, kept, select_at),
                                   **TOL)


def test_a_key_of_weight_s_acts_as_s_copies_and_weight_0_as_none():
    """Known answer on timm's own ``TalkingHeadAttn``: keys weighted ``[1, 3, 1, 2, 0]`` give
    each query what the module gives it over the tokens repeated 1, 3, 1, 2 and 0 times:
    ``log(s)`` after the logits' head mixing and ``s`` times the probabilities' mixing bias
    (drawn nonzero here: with ``log(s)`` alone the answer is another)."""
    model = make_tiny("cait")
    attn = model.blocks[0].attn
    assert attn.proj_w.bias.abs().min() > 0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 5, 32, generator=g)
    weights = torch.tensor([[1.0, 3.0, 1.0, 2.0, 0.0]])
    repeated = x[0].repeat_interleave(torch.tensor([1, 3, 1, 2, 0]), dim=0)[None]
    first_copy = torch.tensor([0, 1, 4, 5])  # each kept token's first row among the repeated ones
    with torch.no_grad():
        got = attn.proj(talking_heads(attn, attn.qkv(x), weights))
        want = attn(repeated)
        torch.testing.assert_close(got[:, :4], want[:, first_copy], **TOL)
        once = attn.proj(talking_heads(attn, attn.qkv(x), None))  # every key counted once: another answer
        assert not torch.allclose(once[:, :4], want[:, first_copy], **TOL)


@pytest.mark.parametrize("arch", ["cait", "cait_avg"])
def test_merged_patches_read_as_their_parts(arch, images):
    """After ToMe merges patches in every block, the class attention and the head read each
    image's last patch tokens as timm's own ``forward_cls``, norm and head read them repeated
    ``size`` times (a merged key biased by ``log(size)``, the average size-weighted)."""
    model = make_tiny(arch)
    seen = {}
    saint.patch(model, "tome", r=3)
    hook = model.blocks[-1].register_forward_hook(lambda m, a, out: seen.setdefault("patches", out))
    with torch.no_grad():
        got = model(images)
    hook.remove()
    sizes = saint.token_sizes(model).long()
    assert int(sizes.max()) > 1
    saint.unpatch(model)
    with torch.no_grad():
        for i in range(len(images)):
            repeated = seen["patches"][i].repeat_interleave(sizes[i], dim=0)[None]
            want = model.forward_head(model.norm(model.forward_cls(repeated)))
            torch.testing.assert_close(got[i : i + 1], want, **TOL)


def test_features_split_per_image_after_the_class_token(images):
    """``forward_features`` returns the class token, then the last block's patch tokens (NaN
    at padding): ``saint.token_mask`` describes the patches, and splitting the whole output
    by it is refused with the split that works."""
    model = make_tiny("cait")
    saint.patch(model, "saint", tau=0.2, k=1)
    with torch.no_grad():
        features = model.forward_features(images)
    mask = saint.token_mask(model)
    assert mask.shape == (len(images), features.shape[1] - 1) and not bool(mask.all())
    for i, tokens in enumerate(saint.per_image(features[:, 1:], mask)):
        assert tokens.shape[0] == int(mask[i].sum()) and bool(torch.isfinite(tokens).all())
    with pytest.raises(ValueError, match=r"split features\[:, 1:\]"):
        saint.per_image(features, mask)


def test_the_average_head_reads_what_every_patch_became(images):
    """The average head after merging is the mean, over every original patch, of the token it
    became (per image); the adapter's embedding is that average."""
    model = make_tiny("cait_avg")
    saint.patch(model, "saint_match", tau=0.2, fraction=0.7, trace=True)
    with torch.no_grad():
        tokens = model.forward_features(images)
        pooled = model.forward_head(tokens, pre_logits=True)
        logits = model(images)
    assert saint.stats(model).layout == "packed"
    origin = handle_of(model).origins()[-1]
    want = torch.stack([tokens[i, 1 + origin[i]].mean(dim=0) for i in range(len(images))])
    torch.testing.assert_close(pooled, want, **TOL)
    torch.testing.assert_close(logits, model.head(pooled), **TOL)
    emb, got_logits = find_adapter(model).embed(model, images)
    torch.testing.assert_close(emb, pooled, **TOL)
    torch.testing.assert_close(got_logits, logits, **TOL)


def test_kernels_agree_and_fused_ones_are_refused(images):
    """A packed stream's talking-heads attention runs per image (``loop``, the CPU's ``auto``)
    or on the padded view (``padded``, an accelerator's ``auto``): the same answer. A fused
    kernel cannot mix heads around the softmax: refused when patching, naming the ones that work."""
    model = make_tiny("cait")
    outs = {}
    for kernel in ("auto", "loop", "padded"):
        saint.patch(model, "saint_match", tau=0.2, fraction=0.7, kernel=kernel)
        with torch.no_grad():
            outs[kernel] = model(images)
        assert saint.stats(model).layout == "packed"
    torch.testing.assert_close(outs["loop"], outs["auto"], rtol=0, atol=0)
    torch.testing.assert_close(outs["padded"], outs["loop"], **TOL)
    saint.unpatch(model)
    for kernel in ("flex", "varlen", "flash_attn"):
        with pytest.raises(ValueError, match="talking-heads attention mixes its heads"):
            saint.patch(model, "saint_match", tau=0.2, fraction=0.7, kernel=kernel)
        assert not saint.is_patched(model)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
def test_block_flops_match_the_flop_counter(select_at):
    """The FLOPs model calibration reads equals torch's counter on one block (its talking heads'
    mixings included) and on a model that drops before (or after) block 1's attention (the
    class-attention blocks, not in the model, counted apart)."""
    model = make_tiny("cait")
    blk, n = model.blocks[0], model.patch_embed.num_patches
    adapter = find_adapter(model)
    x = torch.randn(2, n, blk.norm1.normalized_shape[0])
    total, _ = count_flops(lambda: blk(x), model)
    assert adapter.block_flops(model, n, n, select_at) == total / 2
    images = torch.randn(2, 3, 32, 32)
    unpruned, _ = count_flops(lambda: model.forward_features(images), model)
    after = n - 4
    # the class attention reads every patch left: its FLOPs follow the last block's count
    cls_saved = (count_flops(lambda: model.forward_cls(torch.randn(2, n, x.shape[-1])), model)[0]
                 - count_flops(lambda: model.forward_cls(torch.randn(2, after, x.shape[-1])), model)[0])
    assert cls_saved > 0
    rest = (unpruned - cls_saved) / 2 - len(model.blocks) * adapter.block_flops(model, n, n)
    saint.patch(model, "random", r=4, layers=[1], select_at=select_at)
    total, _ = count_flops(lambda: model.forward_features(images), model)
    expected = (adapter.block_flops(model, n, n) + adapter.block_flops(model, n, after)
                + (len(model.blocks) - 2) * adapter.block_flops(model, after, after))
    assert total / 2 - rest == pytest.approx(expected, rel=1e-9)


def test_adapter_probe_calibration_and_refusals(images):
    """The CaiT adapter is found and protects nothing (the class token joins after the
    pruning blocks), its probe reads the keys the selection reads, calibration reaches a
    FLOPs target; methods that rank by the class token's attention are refused, as are
    blocks saint does not know."""
    model = make_tiny("cait")
    assert_adapter_probe_reads_keys(model, images, "timm_cait", 0, 16)
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_match")
    assert cal.reached and abs(cal.achieved / 1.4 - 1) < 0.1
    saint.unpatch(model)
    for method, kw in (("attn", dict(r=2)), ("saint_match", dict(tau=0.2, fraction=0.7, guard=0.3))):
        with pytest.raises(ValueError, match="needs a class token"):
            saint.patch(model, method, **kw)
    model.blocks[2] = torch.nn.Identity()
    with pytest.raises(TypeError, match="LayerScaleBlock with TalkingHeadAttn"):
        saint.patch(model, "tome", r=2)
    assert not saint.is_patched(model)


def test_gradient_checkpointing_and_threads(images):
    """timm's checkpointed blocks recompute the same selection during backward (outputs and
    input gradients equal the plain run's exactly); one instance called from two threads
    gives every call (ragged batches of other sizes) its own answer."""
    from .conftest import assert_checkpointing_and_threads_agree

    assert_checkpointing_and_threads_agree(lambda: make_tiny("cait_avg"), images, "saint_match",
                                           make_threaded=lambda: make_tiny("cait"), tau=0.2, fraction=0.7)

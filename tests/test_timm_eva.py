"""timm ``Eva`` (EVA-02, DINOv3, Perception Encoder, RoPE ViTs): what the shared timm
tests cannot see. Each token's rotary rows against timm's own path for dropped
tokens (its patch dropout's ``apply_keep_indices_nlc``), the per-head table of mixed
RoPE, the FLOPs model against the counter, the refusals. (Packed == padded == alone,
exact unpatch, every method and both placements run for the Eva archs of
``conftest.ARCHS`` in the shared timm tests.)"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import saint
from saint.adapters import find_adapter, handle_of
from saint.measure.flops import count_flops

from .conftest import TINY, assert_adapter_probe_reads_keys, make_tiny

TOL = dict(atol=1e-5, rtol=1e-5)


def images(n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, 32, 32, generator=g)
    x[: n // 2] = x[: n // 2] * 0.1 + torch.linspace(-1, 1, 32)  # smooth images: more redundant tokens
    return x


def reference_after_drop(model: torch.nn.Module, x: torch.Tensor, block: int, kept: torch.Tensor) -> torch.Tensor:
    """timm's own forward of one image with the patch tokens ``kept [N']`` (indices into
    the grid) removed before ``block``: the tokens and the rows of timm's rotary table
    (``[N, D]``, or ``[depth, H, N, D]`` for mixed RoPE) taken at those indices, every
    block unpatched."""
    x, rope = model._pos_embed(model.patch_embed(x))
    x = model.norm_pre(x)
    mixed = getattr(model, "rope_mixed", False)
    for i, blk in enumerate(model.blocks):
        if i == block:
            npt = model.num_prefix_tokens
            x = torch.cat([x[:, :npt], x[:, npt:][:, kept]], dim=1)
            if rope is not None:
                rope = rope[..., kept, :]
        x = blk(x, rope=rope[i] if mixed and rope is not None else rope)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("arch", ["eva02", "dinov3", "rope_gqa", "rope_mixed"])
def test_rotary_rows_follow_each_kept_token(arch):
    """Dropping before block 1's attention (``select_at="attention"``, drop methods) is
    dropping the tokens before the block: each image, packed in a ragged batch, equals
    timm's own forward with its kept patches removed there (known answer)."""
    model = (make_tiny(arch) if arch != "rope_mixed"
             else timm.create_model("vit_small_patch16_rope_mixed_224", pretrained=False, **TINY).eval())
    twin = copy.deepcopy(model)
    x = images()
    saint.patch(model, "saint", tau=0.2, k=2, layers=[1], select_at="attention", trace=True)
    with torch.no_grad():
        out = model(x)
    stats = saint.stats(model)
    assert stats.layout == "packed" and stats.per_sample_differs()
    npt = handle_of(model).num_protected
    origin = handle_of(model).origins()[0]  # [B, N0]: position after the step, -1 = dropped
    for i in range(x.shape[0]):
        assert bool((origin[i, :npt] == torch.arange(npt)).all()), "prefix tokens stay, in front"
        kept = torch.nonzero(origin[i, npt:] >= 0).flatten()
        with torch.no_grad():
            ref = reference_after_drop(twin, x[i : i + 1], 1, kept)
        torch.testing.assert_close(out[i : i + 1], ref, **TOL)


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_mixed_224", "vit_small_patch16_dinov3"])
def test_merging_packed_equals_padded_equals_alone(name):
    """RoPE-Mixed hands each block its own per-head table ``[H, N, D]``; timm's DINOv3
    pools by the size-weighted average of its patch tokens (its default ``avg``): packed,
    padded and each image alone agree for a merging method at both placements."""
    model = timm.create_model(name, pretrained=False, **TINY).eval()
    assert name != "vit_small_patch16_dinov3" or model.global_pool == "avg"
    x = images()
    for select_at in ("mlp", "attention"):
        outs = {}
        for layout in ("packed", "padded"):
            saint.patch(model, "saint_match", tau=0.2, fraction=0.8, layers=[0, 1, 2], select_at=select_at,
                        layout=layout)
            with torch.no_grad():
                outs[layout] = model(x)
                assert saint.stats(model).layout == layout
                alone = torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])
            torch.testing.assert_close(outs[layout], alone, **TOL)
        torch.testing.assert_close(outs["packed"], outs["padded"], **TOL)
    saint.unpatch(model)


# a q norm (no projecting queries of merged inputs) and a gate (projected like the values)
FLAVOURS = {"rope_qk_norm": ("rope_gqa", {"qk_norm": True}), "eva02_gated": ("eva02", {})}


def flavour(arch: str) -> torch.nn.Module:
    name, extra = FLAVOURS.get(arch, (arch, {}))
    model = make_tiny(name, **extra)
    if arch.endswith("_gated"):  # EvaAttention(gated=True): timm's Eva builds no such model by name
        for blk in model.blocks:
            blk.attn.gate = torch.nn.Linear(blk.norm1.normalized_shape[0], blk.attn.num_heads * blk.attn.head_dim)
    return model


@pytest.mark.parametrize("arch", ["eva02", "dinov3", "rope_gqa", *FLAVOURS])
@pytest.mark.parametrize("select_at", ["mlp", "attention"])
def test_block_flops_match_the_flop_counter(arch, select_at):
    """The FLOPs model calibration reads equals torch's counter on one block: unpruned,
    and with the selection before attention (keys on every token, queries, values, gate
    and the rest on the survivors; with a q norm, all of q/k/v on every token), for EVA's
    q/v bias + SwiGLU, DINOv3, grouped key/value heads, a q norm and a gate."""
    model = flavour(arch)
    blk, n = model.blocks[0], model.num_prefix_tokens + model.patch_embed.num_patches
    rope = model._pos_embed(model.patch_embed(torch.randn(1, 3, 32, 32)))[1]
    adapter = find_adapter(model)
    x = torch.randn(2, n, blk.norm1.normalized_shape[0])
    total, _ = count_flops(lambda: blk(x, rope=rope))
    assert adapter.block_flops(model, n, n, select_at) == total / 2
    saint.patch(model, "random", r=4, layers=[0], select_at=select_at)
    total, _ = count_flops(lambda: model.forward_features(torch.randn(2, 3, 32, 32)))
    after = saint.stats(model).tokens[1][0]
    expected = adapter.block_flops(model, n, after) + (len(model.blocks) - 1) * adapter.block_flops(model, after, after)
    # besides its blocks the model computes its patch embedding and final norm: subtract
    # them as an unpruned run counts them
    saint.unpatch(model)
    unpruned, _ = count_flops(lambda: model.forward_features(torch.randn(2, 3, 32, 32)))
    rest = unpruned / 2 - len(model.blocks) * adapter.block_flops(model, n, n)
    assert total / 2 - rest == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("arch", ["eva02", "dinov3", "rope_gqa", "eva02_gated"])
def test_keys_first_equals_every_tokens_projections_merged(arch, monkeypatch):
    """Before attention, projecting queries, values and gate logits from the survivors'
    merged inputs equals merging every token's projections (a merge is a mean, the
    projections affine); a user's hook on a fused qkv sees the whole projection (every
    entering token), and the answer is the same."""
    from saint.adapters import timm_eva

    model = flavour(arch)
    x = images()
    saint.patch(model, "saint_match", tau=0.2, fraction=0.8, layers=[0, 1, 2], select_at="attention")
    with torch.no_grad():
        keys_first = model(x)
    assert saint.stats(model).tokens[1][0] < saint.stats(model).tokens[0][0]
    with monkeypatch.context() as m:
        m.setattr(timm_eva, "_keys_first", lambda attn: False)
        with torch.no_grad():
            torch.testing.assert_close(model(x), keys_first, **TOL)
    attn = model.blocks[1].attn
    if attn.qkv is None or attn.q_bias is not None:  # EVA's q/v bias: timm itself runs F.linear on qkv's weight
        return
    seen = []
    hooks = [model.blocks[1].register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[:2])),
             attn.qkv.register_forward_hook(lambda mod, a, out: seen.append(out.shape[:2]))]
    with torch.no_grad():
        torch.testing.assert_close(model(x), keys_first, **TOL)
    for h in hooks:
        h.remove()
    assert seen[0] == seen[1]


def test_adapter_and_protocol_reads():
    """The Eva adapter is found, protects class and register tokens, and its probe reads
    the keys the selection reads (after the k norm, before the rotation)."""
    assert_adapter_probe_reads_keys(make_tiny("dinov3"), images(2), "timm_eva", 5, 5 + 16)


def test_refusals():
    post_norm = timm.create_model("vit_small_patch16_rope_224", pretrained=False, use_post_norm=True, **TINY)
    with pytest.raises(TypeError, match="not post-norm blocks"):
        saint.patch(post_norm, "tome", r=2)
    pe = timm.create_model("vit_pe_core_small_patch16_384", pretrained=False, ref_feat_shape=(4, 4), **TINY).eval()
    for method, kw in (("saint", dict(tau=0.2, k=2)), ("tome", dict(r=2))):  # attention pooling weighs merges
        saint.patch(pe, method, **kw)
        with torch.no_grad():
            x = images()
            out = pe(x)
            alone = torch.cat([pe(x[i : i + 1]) for i in range(len(x))])
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, alone, rtol=0, atol=1e-5)
    dropping = timm.create_model("vit_small_patch16_dinov3", pretrained=False, patch_drop_rate=0.5, **TINY).train()
    saint.patch(dropping, "saint", tau=0.2, k=2, layers=[1], layout="padded")
    with pytest.raises(ValueError, match="patch_drop_rate=0 or call model.eval"):
        dropping(images())

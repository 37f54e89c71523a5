"""Packed execution of ragged batches: the per-image attention kernels, and every
vision adapter x method giving each image the same answer packed, padded and alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import saint
from saint.core.packing import (
    auto_kernel,
    lengths_to_valid,
    pack,
    packed_attention,
    padded_index,
    split,
    stream_slots,
    unpack,
)

from .conftest import ARCHS, make_tiny, patch_tokens, refuses_class_attention

TOL = dict(rtol=0, atol=1e-5)
# per-image methods whose counts differ between images (ragged), incl. merging ones
RAGGED = {
    "saint": ("saint", dict(tau=0.3, k=1)),
    "saint_fold": ("saint_fold", dict(tau=0.3, k=1)),
    "saint_plus": ("saint_plus", dict(tau=0.3)),
    "saint_match": ("saint_match", dict(tau=0.3, fraction=0.7)),
    # the guard ranks by class-token attention, read from the packed stream
    "saint_match+guard": ("saint_match", dict(tau=0.3, fraction=0.7, guard=0.5)),
    # merged tokens keep their parts' mean norm (the residual stream only)
    "saint_match+keep_norm": ("saint_match", dict(tau=0.3, fraction=0.7, keep_norm=True)),
    "saint_plus+keep_norm": ("saint_plus", dict(tau=0.3, keep_norm=True)),
}
NEEDS_CLASS_TOKEN = {"saint_match+guard"}
RECTANGULAR = {"tome": dict(r=2), "random": dict(r=3), "attn": dict(r=3), "budget": dict(layers=[1], keep=5)}


def _reference_attention(q, k, v, lengths, bias):
    out, s = [], 0
    for n in lengths:
        mask = None if bias is None else bias[s : s + n][None, None, None, :]
        qi, ki, vi = (t[s : s + n].transpose(0, 1)[None] for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)[0].transpose(0, 1))
        s += n
    return torch.cat(out)


@pytest.mark.parametrize("kernel", ["loop", "padded", "flex"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_attention_equals_each_image_alone(kernel, with_bias):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 0, 5, 1, 12]  # an empty image too: its padded queries see no key
    t = sum(lengths)
    q, k, v = (torch.randn(t, 2, 8, generator=g) for _ in range(3))
    bias = torch.rand(t, generator=g).add(1).log() if with_bias else None
    out = packed_attention(q, k, v, lengths, bias, kernel=kernel)
    torch.testing.assert_close(out, _reference_attention(q, k, v, lengths, bias), **TOL)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=5))
def test_pack_unpack_round_trip(lengths):
    counts = torch.tensor(lengths)
    valid = lengths_to_valid(counts)
    x = torch.randn(len(lengths), valid.shape[1], 3)
    stream = pack(x, valid)
    assert stream.shape == (1, sum(lengths), 3)
    padded = unpack(stream, valid)
    assert torch.equal(padded[valid], x[valid]) and bool(padded[~valid].isnan().all())
    assert torch.equal(stream[0][padded_index(valid)][valid], x[valid])
    assert [p.shape[0] for p in split(stream, lengths)] == lengths
    # through the stream's slots (what an accelerator does: no boolean mask), the same
    slots = stream_slots(valid, sum(lengths))
    assert torch.equal(pack(x, valid, slots), stream)
    assert torch.equal(unpack(stream, valid, 0.5, slots), unpack(stream, valid, 0.5))


def test_kernel_errors_name_the_fix():
    q = torch.randn(4, 1, 2)
    with pytest.raises(ValueError, match="kernel='varlen' needs CUDA"):
        packed_attention(q, q, q, [4], kernel="varlen")
    with pytest.raises(ValueError, match="not one of"):
        packed_attention(q, q, q, [4], kernel="nested")
    with pytest.raises(ValueError, match="sum to 3"):
        packed_attention(q, q, q, [1, 2], kernel="loop")
    with pytest.raises(ValueError, match="no attention dropout"):
        packed_attention(q, q, q, [4], dropout_p=0.1, kernel="flex")


def test_auto_kernel_rule(monkeypatch):
    from saint.core import packing

    monkeypatch.setattr(packing, "varlen_available", lambda: True)
    assert auto_kernel("cpu", True, False, False, False) == "loop"
    assert auto_kernel("cuda", True, False, False, False) == "varlen"
    assert auto_kernel("cuda", True, True, False, False) == "padded"  # varlen cannot add the size bias
    assert auto_kernel("cuda", False, False, False, False) == "padded"  # varlen is fp16/bf16 only
    assert auto_kernel("cuda", True, False, True, False) == "loop"  # dropout: training
    assert auto_kernel("cuda", True, False, False, True) == "loop"  # FLOP counting sees per-image SDPA
    monkeypatch.setattr(packing, "varlen_available", lambda: False)
    assert auto_kernel("cuda", True, False, False, False) == "padded"


def test_flop_counting_sees_the_loop_kernel():
    from torch.utils.flop_counter import FlopCounterMode

    from saint.core.packing import _under_dispatch_mode

    assert not _under_dispatch_mode()
    with FlopCounterMode(display=False):
        assert _under_dispatch_mode()


def test_varlen_needs_a_torch_whose_kernel_takes_scale(monkeypatch):
    from saint.core import packing

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert packing.varlen_available() == ((major, minor) >= (2, 10))
    monkeypatch.setattr(packing, "varlen_available", lambda: False)
    q = torch.randn(4, 1, 2)
    with pytest.raises(ValueError, match="needs torch >= 2.10"):
        packed_attention(q, q, q, [4], kernel="varlen")


@pytest.fixture
def flash_attn_module(monkeypatch):
    """Installs a module as ``flash_attn`` (None: not installed) for one test, with the
    cached look-up cleared before and after."""
    import sys

    from saint.core import packing

    def install(module: object) -> None:
        monkeypatch.setitem(sys.modules, "flash_attn", module)
        packing.flash_attn_available.cache_clear()

    yield install
    packing.flash_attn_available.cache_clear()


def _fake_flash_attn(calls: list) -> object:
    """A stand-in for the flash-attn package with its documented varlen signature, in
    plain torch: every sequence ``cu[i]:cu[i + 1]`` attends to itself only."""
    import importlib.machinery
    import types

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):
        calls.append(dict(cu=cu_seqlens_q.tolist(), cu_dtype=cu_seqlens_q.dtype, same_cu=cu_seqlens_k is cu_seqlens_q,
                          max=(max_seqlen_q, max_seqlen_k), dropout_p=dropout_p, scale=softmax_scale, causal=causal))
        out = torch.empty_like(v)
        bounds = cu_seqlens_q.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            qi, ki, vi = (t[a:b].transpose(0, 1) for t in (q, k, v))
            out[a:b] = F.scaled_dot_product_attention(qi, ki, vi, scale=softmax_scale).transpose(0, 1)
        return out

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def test_flash_attn_kernel_passes_the_stream_as_flash_attn_reads_it(flash_attn_module):
    from saint.core import packing

    calls: list = []
    flash_attn_module(_fake_flash_attn(calls))
    assert packing.flash_attn_available()
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    got = packing._flash_attn_attention(q, k, v, lengths, 0.3, 0.0)
    want = packed_attention(q, k, v, lengths, scale=0.3, kernel="loop")
    torch.testing.assert_close(got, want, **TOL)
    assert calls == [dict(cu=[0, 5, 6, 15, 18], cu_dtype=torch.int32, same_cu=True, max=(9, 9), dropout_p=0.0,
                          scale=0.3, causal=False)]


def test_flash_attn_kernel_errors_and_auto_rule(monkeypatch, flash_attn_module):
    from saint.core import packing

    flash_attn_module(None)  # not installed
    assert not packing.flash_attn_available()
    q = torch.randn(4, 1, 2)
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        packed_attention(q, q, q, [4], kernel="flash_attn")
    flash_attn_module(_fake_flash_attn([]))
    with pytest.raises(ValueError, match="kernel='flash_attn' needs CUDA"):
        packed_attention(q, q, q, [4], kernel="flash_attn")
    with pytest.raises(ValueError, match="not one of"):
        saint.patch(make_tiny("vit"), "saint", tau=0.3, kernel="flash-attn")
    # auto: torch's own varlen first, flash-attn's on a torch without it, never with a bias or in fp32
    monkeypatch.setattr(packing, "varlen_available", lambda: False)
    assert auto_kernel("cuda", True, False, False, False) == "flash_attn"
    assert auto_kernel("cuda", True, True, False, False) == "padded"
    assert auto_kernel("cuda", False, False, False, False) == "padded"
    assert auto_kernel("cpu", True, False, False, False) == "loop"
    monkeypatch.setattr(packing, "varlen_available", lambda: True)
    assert auto_kernel("cuda", True, False, False, False) == "varlen"


def _run(model, x, method, kw, layout, select_at="mlp", **options):
    saint.patch(model, method, layout=layout, select_at=select_at, **kw, **options)
    with torch.no_grad():
        out = model(x)
        feats = patch_tokens(model, model.forward_features(x))
    return out, feats, saint.token_mask(model), saint.stats(model)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("label", sorted(RAGGED))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_timm_packed_equals_padded_equals_alone(arch, label, select_at, images):
    model = make_tiny(arch)
    method, kw = RAGGED[label]
    if refuses_class_attention(model, method, kw):
        return
    out, feats, mask, stats = _run(model, images, method, kw, "packed", select_at)
    assert stats.layout == "packed" and stats.per_sample_differs()
    p_out, p_feats, p_mask, p_stats = _run(model, images, method, kw, "padded", select_at)
    assert p_stats.layout == "padded" and p_stats.tokens == stats.tokens
    torch.testing.assert_close(out, p_out, **TOL)
    assert torch.equal(mask, p_mask)
    for f in (feats, p_feats):  # padding is NaN in both layouts (padded: not what its masked rows computed)
        assert bool(f[~mask].isnan().all()) and not bool(f[mask].isnan().any())
    for i, tokens in enumerate(saint.per_image(feats, mask)):
        torch.testing.assert_close(tokens, p_feats[i][p_mask[i]], **TOL)
        with torch.no_grad():
            alone = patch_tokens(model, model.forward_features(images[i : i + 1]))[0]
            torch.testing.assert_close(model(images[i : i + 1])[0], out[i], **TOL)
        torch.testing.assert_close(tokens, alone, **TOL)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("label", sorted(RAGGED))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_one_read_back_path_gives_the_cpu_paths_answer(arch, label, select_at, images):
    """What a GPU runs (``accelerator_path``: the per-image counts are the only read-back per
    pruning block; the padded attention kernel sharing the state's slots), taken on the
    CPU, against the CPU's own packed path."""
    from saint.core.paths import accelerator_paths_everywhere
    from saint.measure.census import op_census

    model = make_tiny(arch)
    method, kw = RAGGED[label]
    if refuses_class_attention(model, method, kw):
        return
    out, feats, mask, stats = _run(model, images, method, kw, "packed", select_at)
    with accelerator_paths_everywhere():
        f_out, f_feats, f_mask, f_stats = _run(model, images, method, kw, "packed", select_at, kernel="padded")
        census = op_census(lambda: model(images))
    assert f_stats.tokens == stats.tokens and torch.equal(f_mask, mask)
    torch.testing.assert_close(f_out, out, **TOL)
    torch.testing.assert_close(f_feats[mask], feats[mask], **TOL)
    # nothing read back but the counts, once per pruning block
    assert set(census.syncs) <= {"tolist"} and census.syncs["tolist"] <= len(model.blocks), census.syncs


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("label", sorted(RAGGED))
@pytest.mark.parametrize("arch", ["vit", "dinov2_reg", "eva02"])
def test_the_padded_layout_reads_back_once_per_block_on_the_gpu_paths(arch, label, select_at, images):
    """``layout="padded"`` on the accelerators' forms: the CPU path's answer, reading back
    only the counts, once per pruning block."""
    from saint.core.paths import accelerator_paths_everywhere
    from saint.measure.census import op_census

    model = make_tiny(arch)
    method, kw = RAGGED[label]
    out, feats, mask, stats = _run(model, images, method, kw, "padded", select_at)
    with accelerator_paths_everywhere():
        f_out, f_feats, f_mask, f_stats = _run(model, images, method, kw, "padded", select_at)
        census = op_census(lambda: model(images))
    assert f_stats.layout == stats.layout == "padded" and f_stats.tokens == stats.tokens
    assert torch.equal(f_mask, mask)
    torch.testing.assert_close(f_out, out, **TOL)
    torch.testing.assert_close(f_feats[mask], feats[mask], **TOL)
    assert set(census.syncs) <= {"tolist"} and census.syncs["tolist"] <= len(model.blocks), census.syncs


@pytest.mark.parametrize("method, kw", [RAGGED["saint_plus"], RAGGED["saint_match+keep_norm"]])
def test_training_on_the_gpu_paths_gets_the_cpu_paths_gradients(method, kw, images):
    """The one-read-back merge is for inference; with autograd recording, the GPU takes the
    general path, so gradients stay right."""
    import contextlib

    from saint.core.paths import accelerator_paths_everywhere

    model = make_tiny("vit")
    saint.patch(model, method, **kw)
    grads = []
    for paths in (contextlib.nullcontext(), accelerator_paths_everywhere()):
        model.zero_grad()
        with paths:
            model(images).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for cpu, gpu in zip(*grads, strict=True):
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-6)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("method", sorted(RECTANGULAR))
def test_rectangular_methods_never_pack(method, select_at, images):
    model = make_tiny("deit_distilled")
    out, _, mask, stats = _run(model, images, method, RECTANGULAR[method], "packed", select_at)
    assert stats.layout == "rectangular" and mask is None
    torch.testing.assert_close(out, _run(model, images, method, RECTANGULAR[method], "padded", select_at)[0], **TOL)
    for i in range(len(images)):
        with torch.no_grad():
            torch.testing.assert_close(model(images[i : i + 1])[0], out[i], **TOL)


@pytest.mark.parametrize("pool", ["max", "avgmax", "map"])
def test_every_pooling_is_per_image(pool, images):
    model = make_tiny("vit", global_pool=pool, class_token=False)
    saint.patch(model, "saint", tau=0.3, k=1)
    with torch.no_grad():
        out = model(images)
        assert saint.stats(model).layout == "packed"
        alone = torch.cat([model(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(out, alone, **TOL)


def test_padded_and_flex_kernels_match_loop(images):
    model = make_tiny("dinov2_reg")
    outs = []
    for kernel in ("loop", "padded", "flex"):
        saint.patch(model, "saint_plus", tau=0.3, kernel=kernel)
        with torch.no_grad():
            outs.append(model(images))
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    torch.testing.assert_close(outs[0], outs[2], **TOL)


@torch.no_grad()
def test_cheapest_path_gives_unpatched_answer(images):
    model = make_tiny("dinov2_reg")
    ref = model(images)
    saint.patch(model, "saint_plus", tau=1.0)  # nothing is ever similar enough
    assert torch.equal(model(images), ref) and saint.stats(model).layout == "rectangular"
    saint.patch(model, "saint_plus", tau=0.3)
    assert torch.equal(model(images[:1]), model.__class__.forward(model, images[:1]))
    assert saint.stats(model).layout == "rectangular"
    empty = model(images[:0])
    assert empty.shape == (0,) + ref.shape[1:]


@torch.no_grad()
def test_trace_is_the_same_in_both_layouts(images):
    model = make_tiny("vit")
    origins = []
    for layout in ("packed", "padded"):
        saint.patch(model, "saint_fold", tau=0.3, k=1, layout=layout, trace=True)
        model(images)
        origins.append(saint.api.get_handle(model).state.origins)
    assert all(torch.equal(a, b) for a, b in zip(*origins, strict=True))


@torch.no_grad()
@pytest.mark.parametrize("arch", ["dinov2_reg", "dinov3"])
def test_intermediates_are_unpadded_per_block(arch, images):
    model = make_tiny(arch)
    saint.patch(model, "saint", tau=0.3, k=1)
    inter = model.forward_intermediates(images, indices=[1, 3], output_fmt="NLC", intermediates_only=True)
    masks = [saint.token_mask(model, i) for i in (1, 3)]
    alone = [model.forward_intermediates(images[i : i + 1], indices=[1, 3], output_fmt="NLC", intermediates_only=True)
             for i in range(len(images))]
    p = model.num_prefix_tokens
    for j, (tokens, mask) in enumerate(zip(inter, masks, strict=True)):
        assert mask is not None and tokens.shape[1] + p == mask.shape[1]
        for i, real in enumerate(saint.per_image(tokens, mask[:, p:])):
            torch.testing.assert_close(real, alone[i][j][0], **TOL)
    with pytest.raises(ValueError, match="output_fmt='NLC'"):  # SAINT drops tokens
        model.forward_intermediates(images)
    if hasattr(model, "get_intermediate_layers"):  # timm's ViT has it, Eva does not
        with pytest.raises(ValueError, match="reshape=False"):
            model.get_intermediate_layers(images, n=2, reshape=True)


@torch.no_grad()
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("arch", ["vit", "dinov2_reg", "dinov3"])
def test_spatial_intermediates_of_a_merging_method_hold_the_token_every_patch_became(arch, layout, images):
    """NCHW intermediates after merging: each patch's row is the token it became (read from
    the same call's unpadded NLC intermediates through the traced origins), and each image's
    maps are the image's alone; the final tokens pool as they are."""
    model = make_tiny(arch)
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7, layers=[0, 2], layout=layout, trace=True)
    p, blocks = model.num_prefix_tokens, [1, 2, 3]
    nlc = model.forward_intermediates(images, indices=blocks, output_fmt="NLC", intermediates_only=True)
    origins = saint.api.get_handle(model).origins()
    assert saint.stats(model).layout == layout
    final, maps = model.forward_intermediates(images, indices=blocks, output_fmt="NCHW")
    for block, tokens, grid in zip(blocks, nlc, maps, strict=True):
        origin = origins[0 if block < 2 else 1][:, p:] - p  # steps in blocks 0 and 2
        want = tokens.gather(1, origin[..., None].expand(-1, -1, tokens.shape[-1]))
        assert not bool(want.isnan().any())
        torch.testing.assert_close(grid.flatten(2).transpose(1, 2), want, **TOL)
    for i in range(len(images)):
        _, alone = model.forward_intermediates(images[i : i + 1], indices=blocks, output_fmt="NCHW")
        for grid, one in zip(maps, alone, strict=True):
            torch.testing.assert_close(grid[i], one[0], **TOL)
    torch.testing.assert_close(model.forward_head(final), model(images), **TOL)
    saint.patch(model, "saint", tau=0.3, k=1, layers=[0, 2], layout=layout)
    with pytest.raises(ValueError, match="drops tokens before block 3 returns; use a merging method"):
        model.forward_intermediates(images, indices=blocks, output_fmt="NCHW")


def test_bad_layout_options_raise():
    model = make_tiny("vit")
    with pytest.raises(ValueError, match="layout='ragged' is not one of"):
        saint.patch(model, "saint", layout="ragged")
    with pytest.raises(ValueError, match="does nothing with layout='padded'"):
        saint.patch(model, "saint", layout="padded", kernel="flex")
    with pytest.raises(ValueError, match="kernel='nested' is not one of"):
        saint.patch(model, "saint", kernel="nested")


def _drop_path_model(kind: str) -> torch.nn.Module:
    if kind == "hf_dinov2":
        from .test_hf_vit import make

        return make("dinov2", drop_path_rate=0.5)
    return make_tiny(kind, drop_path_rate=0.5)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("kind", ["vit", "eva02", "cait", "hf_dinov2"])
def test_drop_path_in_training_decides_per_image_as_padded(kind, select_at, images):
    """Training with drop path on a ragged batch: packed, each image's tokens take the
    decision the block's drop path draws for that image, the same draws as on the padded
    batch, so with the same seed both layouts give the same per-image outputs (and the
    draws matter: another seed gives others)."""
    model = _drop_path_model(kind).train()
    outs = {}
    for layout, seed in [("packed", 0), ("padded", 0), ("packed", 1)]:
        saint.patch(model, "saint_match", tau=0.3, fraction=0.7, layout=layout, select_at=select_at)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model(pixel_values=images) if kind == "hf_dinov2" else model(images)
        assert saint.stats(model).layout == layout
        outs[layout, seed] = out.pooler_output if kind == "hf_dinov2" else out
        saint.unpatch(model)
    torch.testing.assert_close(outs["packed", 0], outs["padded", 0], rtol=0, atol=1e-5)
    assert not torch.allclose(outs["packed", 0], outs["packed", 1], atol=1e-3)


HF_KINDS = ("clip", "siglip", "metaclip_2", "chinese_clip", "altclip", "clip_classifier", "siglip_classifier", "vit",
            "vit_classifier", "vit_msn", "vit_msn_classifier", "deit", "deit_teacher", "dinov2", "dinov2_classifier",
            "dinov2_reg", "dinov2_reg_classifier", "dinov3", "ijepa", "ijepa_classifier", "videomae",
            "videomae_classifier", "vivit", "vivit_classifier")
NO_CLASS_TOKEN = ("siglip", "siglip_classifier", "ijepa", "ijepa_classifier", "videomae", "videomae_classifier")
VIDEO_KINDS = ("videomae", "videomae_classifier", "vivit", "vivit_classifier")
# where tau=0.3 merges every clip alike (VideoMAE's random keys are close), a tau that leaves them ragged
HF_TAU = {"videomae": 0.7, "videomae_classifier": 0.7}
# attention that saint runs itself (VideoMAE's layers take no mask): no weights to read in any layout
OWN_ATTENTION = ("videomae", "videomae_classifier")


def _hf_model(kind: str) -> torch.nn.Module:
    """A tiny random HF vision model of ``kind`` (CLIP/SigLIP towers and classifiers, ViT/DeiT/DINOv2/I-JEPA
    encoders and classifiers)."""
    if kind in VIDEO_KINDS:
        from .test_hf_video import make_video as make
    elif kind in ("clip_classifier", "siglip_classifier"):
        from .test_hf_vision import make_classifier as make
    elif kind in ("clip", "siglip", "metaclip_2", "chinese_clip", "altclip"):
        from .test_hf_vision import make
    else:
        from .test_hf_vit import make
    return make(kind)


def _hf_inputs(kind: str, images: torch.Tensor) -> torch.Tensor:
    """The images, or for a video model clips of four frames made of them (two tubelet frames)."""
    if kind not in VIDEO_KINDS:
        return images
    return torch.stack([images, images.flip(-1), images.flip(-2), images.roll(8, -1)], dim=1)


def _hf_features(out) -> torch.Tensor:
    """What a caller reads per image: a classifier's logits, else the pooled output, else
    (ViT-MSN has no pooler) the class token."""
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    pooled = getattr(out, "pooler_output", None)
    return out.last_hidden_state[:, 0] if pooled is None else pooled


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize(("kind", "label"), [
    (kind, label) for kind in HF_KINDS for label in sorted(RAGGED)
    if kind not in NO_CLASS_TOKEN or label not in NEEDS_CLASS_TOKEN
])
def test_hf_packed_equals_padded_equals_alone(kind, label, select_at, images):
    model = _hf_model(kind)
    images = _hf_inputs(kind, images)
    method, kw = RAGGED[label]
    kw = {**kw, "tau": HF_TAU.get(kind, kw["tau"])}
    outs, masks = {}, {}
    for layout in ("padded", "packed"):
        saint.patch(model, method, layout=layout, select_at=select_at, **kw)
        with torch.no_grad():
            outs[layout] = model(pixel_values=images, output_hidden_states=True)
        assert saint.stats(model).layout == layout
        handle = saint.api.get_handle(model)
        masks[layout] = [handle.hidden_state_valid(i) for i in range(len(outs[layout].hidden_states))]
    a, b = outs["packed"], outs["padded"]
    torch.testing.assert_close(_hf_features(a), _hf_features(b), **TOL)
    assert all(x is None and y is None or torch.equal(x, y) for x, y in zip(masks["packed"], masks["padded"], strict=True))
    for out in (a, b):  # padding is NaN in both layouts, at every hidden state
        for h, mask in zip(out.hidden_states, masks["packed"], strict=True):
            if mask is not None:
                assert bool(h[~mask].isnan().all()) and not bool(h[mask].isnan().any())
    for i in range(len(images)):
        with torch.no_grad():
            alone = model(pixel_values=images[i : i + 1], output_hidden_states=True)
        torch.testing.assert_close(_hf_features(a)[i], _hf_features(alone)[0], **TOL)
        for h, h_alone, mask in zip(a.hidden_states, alone.hidden_states, masks["packed"], strict=True):
            real = h[i] if mask is None else h[i][mask[i]]
            assert not bool(real.isnan().any())
            torch.testing.assert_close(real, h_alone[0], **TOL)
        last = getattr(a, "last_hidden_state", None)
        if masks["packed"][-1] is not None and last is not None:  # padding is NaN, never a token
            assert bool(last[i][~masks["packed"][-1][i]].isnan().all())
    with pytest.raises(ValueError, match="makes no attention weights" if kind in OWN_ATTENTION else "layout='padded'"):
        model(pixel_values=images, output_attentions=True)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(0, 5), st.integers(0, 2**16), st.booleans())
def test_merge_and_keep_equals_merge_then_gather(t, r, seed, keep_norm):
    from saint.core import merge_weighted
    from saint.core.packing import merge_and_keep
    from saint.core.tome import MergePlan

    g = torch.Generator().manual_seed(seed)
    r = min(r, t // 2)
    perm = torch.randperm(t, generator=g)
    src = perm[:r]
    dst = perm[r:][torch.randint(0, t - r, (r,), generator=g)]  # destinations may repeat
    keep = torch.ones(t, dtype=torch.bool)
    keep[src] = False
    x = torch.randn(1, t, 3, generator=g)
    sizes = torch.randint(1, 4, (1, t, 1), generator=g).float()
    ref_x, ref_s = merge_weighted(x, sizes, MergePlan(src[None], dst[None], keep[None]), keep_norm)
    got_x, got_s = merge_and_keep(x, sizes, src, dst, keep, keep_norm)
    torch.testing.assert_close(got_x, ref_x[:, keep], rtol=0, atol=1e-6)
    assert torch.equal(got_s, ref_s[:, keep])


@pytest.mark.parametrize("protected", [0, 1])
def test_tome_reference_order_packed_padded_and_alone_agree(protected):
    # a ragged batch (7 and 5 tokens) through one ToMe step in the reference layout:
    # the packed stream, the padded view and each image alone hold the same tokens in
    # the same order, with the same sizes and traced origins
    from saint.adapters.common import TokenState
    from saint.core import gather_tokens, keep_mask_to_indices, merge_weighted, tome_plan
    from saint.methods import Selection

    g = torch.Generator().manual_seed(4)
    x, keys = torch.randn(2, 7, 3, generator=g), torch.randn(2, 7, 4, generator=g)
    valid = lengths_to_valid(torch.tensor([7, 5]))
    plan = tome_plan(keys, 2, protected, valid, order="reference")
    sel = Selection(plan.keep, plan, plan.order)
    outs = {}
    for layout in ("packed", "padded"):
        state = TokenState(layout=layout)
        state.reset(x, trace=True, valid=valid)
        out = state.leave(state.apply(state.enter(x), sel))
        outs[layout] = (out, state.valid, state.sizes, state.origin)
    (xp, vp, sp, op), (xd, vd, sd, od) = outs["packed"], outs["padded"]
    assert torch.equal(vp, vd) and torch.equal(op, od) and vp.sum(1).tolist() == [5, 3]
    torch.testing.assert_close(xp[vp], xd[vd], **TOL)
    torch.testing.assert_close(sp[vp], sd[vd], **TOL)
    for i, n in enumerate((7, 5)):
        alone = tome_plan(keys[i : i + 1, :n], 2, protected, order="reference")
        merged, _ = merge_weighted(x[i : i + 1, :n], torch.ones(1, n, 1), alone)
        idx, _ = keep_mask_to_indices(alone.keep, order=alone.order)
        torch.testing.assert_close(xd[i][vd[i]], gather_tokens(merged, idx)[0], **TOL)
    reordered, _ = keep_mask_to_indices(plan.keep, order=plan.order)
    assert not torch.equal(reordered, keep_mask_to_indices(plan.keep)[0])  # the layout did change


@torch.no_grad()
def test_token_sizes_weigh_the_output_as_the_models_own_average_pooling(images):
    """``saint.token_sizes``: how many original tokens each output position stands for. After
    a ragged merging run every image's weights add up to its original tokens, padding weighs 0,
    and the weighted mean of ``forward_features`` is the model's own (size-aware) average
    pooling; dropping without merging weighs the real tokens 1; None when every position is
    one real token; refused on an unpatched model."""
    model = make_tiny("mae_avgpool")
    n, p = model.patch_embed.num_patches + model.num_prefix_tokens, model.num_prefix_tokens
    with pytest.raises(ValueError, match="not patched"):
        saint.token_sizes(model)
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    feats = model.forward_features(images)
    weights, mask = saint.token_sizes(model), saint.token_mask(model)
    assert saint.stats(model).layout == "packed" and weights.shape == mask.shape
    assert weights.sum(dim=1).tolist() == [float(n)] * len(images)
    assert bool((weights[~mask] == 0).all()) and bool((weights[mask] >= 1).all()) and bool((weights > 1).any())
    w = weights[:, p:, None]
    mean = (feats[:, p:].nan_to_num() * w).sum(dim=1) / w.sum(dim=1)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), model.fc_norm(mean), **TOL)
    saint.patch(model, "saint", tau=0.3, k=1)
    model(images)
    assert torch.equal(saint.token_sizes(model), saint.token_mask(model).float())
    saint.patch(model, "saint", k=1000)  # nothing to drop: one real token per position
    model(images)
    assert saint.token_sizes(model) is None


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("keep_norm", [False, True])
def test_a_batch_of_one_steps_as_its_row_in_a_batch_bit_for_bit(merge, keep_norm):
    """A rectangular batch is its own stream (a token's position there is its row's offset
    plus its index), so a batch of one merges and keeps its rows without a padded index or
    a boolean mask. Its tokens, their projections (compacted in place), sizes and positions
    equal that image's rows in a batch of two bit for bit."""
    from saint.adapters.common import TokenState
    from saint.core import MergePlan, match_plan, saint_keep_mask
    from saint.methods import Selection

    g = torch.Generator().manual_seed(7)
    keys = torch.randn(2, 15, 4, generator=g)
    keys[1] = keys[0]  # the batch's second image is the first: both keep as many tokens
    plan = match_plan(keys, 0.2, 0.8, num_protected=1) if merge else None
    keep = plan.keep if merge else saint_keep_mask(keys, 0.2, 1, 10.0, "sample", 1)
    x, proj = torch.randn(2, 15, 6, generator=g), torch.randn(2, 15, 9, generator=g)
    x[1], proj[1] = x[0], proj[0]
    results = []
    for b in (1, 2):
        sub = None if plan is None else MergePlan(plan.src[:b], plan.dst[:b], plan.keep[:b], plan.active[:b])
        state = TokenState(track_positions=True)
        state.reset(x[:b], trace=False)
        out = state.apply_many([state.enter(x[:b]), proj[:b].clone()], Selection(keep[:b], sub, keep_norm=keep_norm),
                               in_place=[False, True])
        results.append((out, state.sizes, state.positions, state.lengths, state.packed))
    (out1, s1, p1, n1, packed1), (out2, s2, p2, n2, packed2) = results
    assert n1 == n2[:1] and 1 < n1[0] < 15 and not packed1 and not packed2
    for a, b in zip(out1, out2, strict=True):
        assert a.shape[0] == 1 and torch.equal(a[0], b[0])
    assert (s1 is None) == (not merge) and (s1 is None or torch.equal(s1[0], s2[0]))
    assert torch.equal(p1[0], p2[0])


@torch.no_grad()
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize(("method", "kw"), [("tome", dict(r=3)), ("saint_match", dict(tau=0.3, fraction=0.7)),
                                            ("saint_plus", dict(tau=0.3))])
def test_a_float64_model_merges_in_float64(method, kw, layout, images):
    # the merges summed in float32 (meant for half precision): a float64 model's merged rows,
    # and in the padded layout every row, came out as float32 values
    model = make_tiny("vit").double()
    seen = []
    hook = model.blocks[0].norm2.register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # right after the merge
    saint.patch(model, method, layout=layout, **kw)
    model(images.double())
    hook.remove()
    x = seen[0].flatten(0, 1)
    rows = x[torch.isfinite(x).all(-1)]
    assert len(rows) and not bool((rows == rows.float().double()).all(-1).any())

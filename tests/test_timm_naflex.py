"""timm NaFlexVit: a NaFlex batch (images patchified at their own sizes, padded) starts
from its real patches; each image's result equals the image run alone, in the packed and
the padded layout, for every method and placement; image batches run as on a ViT."""

from __future__ import annotations

import pytest
import torch

import saint
from saint.adapters import find_adapter

from .conftest import full_layer_scale

timm = pytest.importorskip("timm")
naflexvit = pytest.importorskip("timm.models.naflexvit")

P = 8
SHAPES = [(4, 4), (3, 5), (2, 3)]  # each image's patch grid; padded to 16 patches
METHODS = {
    "saint": dict(tau=0.3, k=1, layers=[0, 1]),
    "saint_fold": dict(tau=0.3, k=1, layers=[0, 1]),
    "saint_plus": dict(tau=0.3),
    "saint_match": dict(tau=0.2, fraction=0.5),
    "tome": dict(r=1),
    "random": dict(r=1),
    "budget": dict(keep=4, layers=[1]),
    "attn": dict(r=1, layers=[1, 2]),
}
MODELS = {  # pooling -> model settings (4 register tokens, or a class token)
    "avg": dict(),
    "token": dict(class_token=True, global_pool="token", reg_tokens=0),
    "map": dict(global_pool="map"),
}


def make(pool: str = "avg", **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return full_layer_scale(timm.create_model("naflexvit_base_patch16_gap", pretrained=False, embed_dim=32, depth=4,
                                              num_heads=2, patch_size=P, img_size=32, **{**MODELS[pool], **extra}).eval())


def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = [torch.randn(1, 3, P * h, P * w, generator=g) for h, w in SHAPES]
    out[0] = out[0] * 0.1 + 0.3  # a redundant image
    return out


def single(img: torch.Tensor) -> dict[str, torch.Tensor]:
    """One image as a NaFlex batch of one, unpadded (timm's own patchify)."""
    patches, (nh, nw) = naflexvit.batch_patchify(img, (P, P))
    coord = torch.stack([torch.arange(nh).repeat_interleave(nw), torch.arange(nw).repeat(nh)], dim=-1)
    return {"patches": patches, "patch_coord": coord[None], "patch_valid": torch.ones(1, nh * nw, dtype=torch.bool)}


def naflex(imgs: list[torch.Tensor], n: int = 16) -> dict[str, torch.Tensor]:
    """The images padded to ``n`` patches, as timm's NaFlex collator lays them out."""
    parts = [single(img) for img in imgs]
    out = {"patches": torch.zeros(len(imgs), n, P * P * 3), "patch_coord": torch.zeros(len(imgs), n, 2, dtype=torch.long),
           "patch_valid": torch.zeros(len(imgs), n, dtype=torch.bool)}
    for i, d in enumerate(parts):
        k = d["patches"].shape[1]
        for key in out:
            out[key][i, :k] = d[key][0]
    return out


def cases():
    for pool in MODELS:
        for method in sorted(METHODS):
            if method == "attn" and pool != "token":
                continue  # refused: attn reads a class token
            yield pool, method


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("pool,method", list(cases()))
def test_padded_batch_packed_equals_padded_equals_alone(pool, method, select_at):
    model = make(pool)
    imgs = images()
    prefix = model.num_prefix_tokens
    outs = {}
    for layout in ("packed", "padded"):
        saint.patch(model, method, layout=layout, select_at=select_at, **METHODS[method])
        with torch.no_grad():
            out = model(naflex(imgs, n=20))  # padded wider than the longest image (16 patches)
            stats = saint.stats(model)
            solo = torch.cat([model(single(img)) for img in imgs])
        assert stats.layout == layout
        assert stats.tokens[0] == [prefix + h * w for h, w in SHAPES], "the first block sees the real patches"
        assert stats.tokens[-1] != stats.tokens[0], "the settings prune"
        torch.testing.assert_close(out, solo, rtol=0, atol=1e-5)
        outs[layout] = out
        saint.unpatch(model)
    torch.testing.assert_close(outs["packed"], outs["padded"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_tome_r_above_an_image_s_half_merges_what_the_image_merges_alone(layout, select_at):
    """ToMe's r is at most half of each image's tokens (the reference's clamp, image by
    image): the 6-patch image merges 3, 1 and 1 where the 16-patch one merges 4 each time."""
    model = make("avg")
    imgs = images()
    saint.patch(model, "tome", r=4, layout=layout, select_at=select_at)
    with torch.no_grad():
        out = model(naflex(imgs, n=20))
        stats = saint.stats(model)
        solo = torch.cat([model(single(img)) for img in imgs])
    prefix = model.num_prefix_tokens
    assert stats.tokens == [[prefix + n - m for n, m in zip((16, 15, 6), merged, strict=True)]
                            for merged in ([0, 0, 0], [4, 4, 3], [8, 8, 4], [12, 11, 5])]
    torch.testing.assert_close(out, solo, rtol=0, atol=1e-5)


@pytest.mark.parametrize("accelerator", [False, True])
@pytest.mark.parametrize("pool, method, kwargs", [
    ("avg", "saint_plus", METHODS["saint_plus"]),
    ("token", "saint_match", dict(METHODS["saint_match"], guard=0.5)),  # the class token's attention too
])
def test_padded_kernel_on_a_batch_padded_wider_than_its_longest_image(pool, method, kwargs, accelerator):
    """A GPU's ``padded`` attention kernel on a NaFlex batch padded to 20 patches whose
    longest image has 16: the kernel's own slots (not the wider padded view's) place
    the tokens, on the CPU's paths and the accelerators'; each image as if alone."""
    import contextlib

    from saint.core.paths import accelerator_paths_everywhere

    model = saint.patch(make(pool), method, kernel="padded", **kwargs)
    imgs = images()
    with torch.no_grad(), (accelerator_paths_everywhere() if accelerator else contextlib.nullcontext()):
        out = model(naflex(imgs, n=20))
        assert saint.stats(model).layout == "packed"
        solo = torch.cat([model(single(img)) for img in imgs])
    torch.testing.assert_close(out, solo, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pool", sorted(MODELS))
def test_nothing_to_prune_equals_the_model(pool):
    """A padded batch with nothing to prune computes only the real patches and equals the
    unpatched model, image by image; image batches are the unpatched answer bit for bit."""
    model = make(pool)
    imgs = images()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, ref_images = model(naflex(imgs)), model(x)
        ref_alone = torch.cat([model(single(img)) for img in imgs])
    saint.patch(model, "saint", k=100)  # no candidate can have 100 links
    with torch.no_grad():
        out, out_images = model(naflex(imgs)), model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, ref_alone, rtol=0, atol=1e-5)
    assert torch.equal(out_images, ref_images)
    saint.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(naflex(imgs)), ref)


@pytest.mark.parametrize("pool,method", [("avg", "saint"), ("avg", "tome"), ("avg", "saint_plus"), ("token", "saint")])
def test_an_image_without_patches_pools_as_the_model_pools_it(pool, method):
    """An image whose every patch is padding: the model's average of no patch is 0; saint
    gave NaN (a mean over none), pruning or not. (timm's attention pooling of such an image
    reads its padding tokens, whose values saint never computes: not compared.)"""
    model = make(pool)
    inp = naflex(images())
    inp["patch_valid"][2] = False
    with torch.no_grad():
        ref = model(inp)
    saint.patch(model, method, **{**METHODS[method], **(dict(r=0) if method == "tome" else {})})
    with torch.no_grad():
        out = model(inp)
    assert bool(torch.isfinite(ref).all())
    torch.testing.assert_close(out[2], ref[2], rtol=0, atol=1e-5)


def test_forward_features_reports_the_real_tokens():
    model = saint.patch(make(), "saint_match", tau=0.2, fraction=0.5)
    with torch.no_grad():
        feats = model.forward_features(**naflex(images()))
        mask = saint.token_mask(model)
        pooled = model.forward_head(**feats, pre_logits=True)
        whole = model.forward_head(**feats)
    prefix = model.num_prefix_tokens
    assert torch.equal(feats["patch_valid"], mask[:, prefix:])
    assert bool(feats["patches"][~mask].isnan().all()) and bool(torch.isfinite(feats["patches"][mask]).all())
    assert bool(torch.isfinite(pooled).all())
    with torch.no_grad():
        torch.testing.assert_close(model(naflex(images())), whole, rtol=0, atol=0)


def test_forward_head_pools_features_with_their_own_call():
    """A NaFlex forward_features output pooled after another call uses its own call's
    real tokens and sizes."""
    model = saint.patch(make(), "saint_match", tau=0.2, fraction=0.5)
    batch, other = naflex(images()), naflex(images()[::-1])
    with torch.no_grad():
        want = model(batch)
        feats = model.forward_features(**batch)
        model(other)
        torch.testing.assert_close(model.forward_head(**feats), want, rtol=0, atol=1e-6)


def test_gradient_checkpointing_recomputes_from_the_padding():
    """timm checkpoints each block with the model's padding mask; the recomputation selects
    the same tokens, so outputs and gradients equal the run without checkpointing."""
    inputs = naflex(images())

    def run(checkpointing: bool):
        model = make().train()
        model.set_grad_checkpointing(checkpointing)
        saint.patch(model, "saint", tau=0.3, k=1, layers=[0, 1])
        x = inputs["patches"].clone().requires_grad_(True)
        out = model({**inputs, "patches": x})
        out.square().sum().backward()
        return out.detach(), x.grad, saint.stats(model).tokens

    ref, ckpt = run(False), run(True)
    torch.testing.assert_close(ckpt[0], ref[0], rtol=0, atol=0)
    assert torch.equal(ckpt[1], ref[1]) and ckpt[2] == ref[2]
    assert bool((ref[1][~inputs["patch_valid"]] == 0).all()), "padding patches get no gradient"


def test_refusals():
    with pytest.raises(TypeError, match="rotary NaFlexVit"):
        saint.patch(make(rope_type="axial"), "tome", r=1)
    with pytest.raises(ValueError, match="class token"):
        saint.patch(make(), "attn", r=1)
    model = saint.patch(make(), "saint", tau=0.3, k=1)
    inputs = naflex(images())
    with pytest.raises(ValueError, match="without attn_mask"):
        model({**inputs, "attn_mask": torch.zeros(3, 1, 20, 20, dtype=torch.bool)})
    with pytest.raises(ValueError, match="forward_intermediates of a NaFlex batch"):
        model.forward_intermediates(inputs)
    holed = inputs["patch_valid"].clone()
    holed[1, 2] = False
    with pytest.raises(ValueError, match="real patches first"):
        model({**inputs, "patch_valid": holed})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # image batches serve forward_intermediates, unpadded per block
        _, inter = model.forward_intermediates(x, output_fmt="NLC")
    assert len(inter) == len(model.blocks)


def test_protocol_runs_on_image_batches():
    model = make()
    adapter = find_adapter(model)
    assert adapter.name == "timm_naflex"
    grid = adapter.grid(model)  # the size timm's data config asks for
    size = timm.data.resolve_data_config({}, model=model)["input_size"]
    assert (grid.rows, grid.cols) == (size[1] // P, size[2] // P)
    assert (adapter.grid(model, torch.randn(1, 3, 24, 40)).cols) == 5
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    x[:2] = x[:2] * 0.1
    cal = saint.calibrate(model, x, flops_speedup=1.3, method="saint_match")
    assert cal.achieved == pytest.approx(1.3, rel=0.05)
    with torch.no_grad():
        emb, _ = adapter.embed(model, x)
        solo = torch.cat([adapter.embed(model, x[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(emb, solo, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(tau=1.0, k=5, layers=[0]), dict(tau=0.3, k=1, layers=[0])])
def test_traced_origins_never_name_the_input_s_padding(kw):
    """With ``trace=True`` the input's padding is no token: a step that removed nothing
    recorded the padded slots as live tokens at their own positions."""
    from saint.adapters import handle_of

    model, inp = make("avg"), naflex(images())
    saint.patch(model, "saint", trace=True, **kw)
    with torch.no_grad():
        model(inp)
    origins = handle_of(model).origins()[0]
    live = (origins >= 0).sum(dim=1).tolist()
    assert live == saint.stats(model).tokens[1]
    real = model.num_prefix_tokens + inp["patch_valid"].sum(dim=1)
    assert all(bool((origins[i, n:] == -1).all()) for i, n in enumerate(real.tolist()))

"""timm's ViTs with a relative position bias per pair of tokens, ``Beit`` (BEiT, BEiT v2) and
``VisionTransformerRelPos``: what the shared timm tests cannot see. Each kept token reads its
rows and columns of the full grid's bias (a table or an MLP's, per block or shared) against
timm's own modules run on the kept tokens; the class token's attention the guard ranks by is
the model's own (eager, with its weights); the average head reads what every patch became;
the pair-biased attention's kernels; the FLOPs model. (Packed == padded == alone, exact
unpatch, every method and both placements run for these archs of ``conftest.ARCHS`` in the
shared timm tests.)"""

from __future__ import annotations

import pytest
import timm
import torch

import saint
from saint.adapters import find_adapter, handle_of
from saint.measure.flops import count_flops

from .conftest import TINY, assert_adapter_probe_reads_keys, make_tiny

TOL = dict(atol=1e-5, rtol=1e-5)
ARCHS = ["beit", "beit_shared", "relpos_cls", "srelpos"]
WITH_CLS = ["beit", "beit_shared", "relpos_cls"]


def _bias_at(full: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return full[..., idx, :][..., idx]


def _is_beit(model: torch.nn.Module) -> bool:
    return type(model).__name__ == "Beit"


@torch.no_grad()
def reference_after_drop(model: torch.nn.Module, x: torch.Tensor, block: int, kept: torch.Tensor) -> torch.Tensor:
    """timm's own forward of one image with its tokens ``kept [N']`` (original indices, a class
    token's 0 included) removed before ``block``: every block's own modules, its own bias (a
    table's or an MLP's) and the model's shared one taken at those indices."""
    x = model.patch_embed(x)
    if model.cls_token is not None:
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if getattr(model, "pos_embed", None) is not None:
        x = x + model.pos_embed
    if _is_beit(model):
        shared, keyword = (model.rel_pos_bias() if model.rel_pos_bias is not None else None), "shared_rel_pos_bias"
    else:
        shared, keyword = (model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None), "shared_rel_pos"
    for i, blk in enumerate(model.blocks):
        if i == block:
            x = x[:, kept]
        if i < block:
            x = blk(x, **{keyword: shared})
            continue
        # the module's own bias, read at the kept tokens
        owner, name = (blk.attn, "_get_rel_pos_bias") if _is_beit(model) else (blk.attn.rel_pos, "get_bias")
        if owner is not None and (not _is_beit(model) or blk.attn.relative_position_bias_table is not None):
            own = getattr(owner, name)()
            setattr(owner, name, lambda own=own: _bias_at(own, kept))
        try:
            x = blk(x, **{keyword: None if shared is None else _bias_at(shared, kept)})
        finally:
            if owner is not None:
                owner.__dict__.pop(name, None)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_tokens_read_their_pairs_of_the_full_grids_bias(arch, images):
    """Dropping before block 1's attention (ragged, packed): each image equals timm's own
    forward with its kept tokens removed there, every block reading its bias (and the shared
    one) at the kept tokens' original indices (known answer)."""
    model = make_tiny(arch)
    saint.patch(model, "saint", tau=0.2, k=1, layers=[1], select_at="attention", trace=True)
    with torch.no_grad():
        out = model(images)
    assert saint.stats(model).layout == "packed" and saint.stats(model).per_sample_differs()
    origin = handle_of(model).origins()[0]  # [B, N0]: position after the step, -1 = dropped
    saint.unpatch(model)
    for i in range(len(images)):
        kept = torch.nonzero(origin[i] >= 0).flatten()
        assert model.cls_token is None or kept[0] == 0, "the class token stays, in front"
        torch.testing.assert_close(out[i : i + 1], reference_after_drop(model, images[i : i + 1], 1, kept), **TOL)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("arch", WITH_CLS)
def test_the_guard_reads_the_models_own_class_attention(arch, select_at, images):
    """What the merge guard ranks by in the first pruning block (nothing removed yet) is the
    class token's row of the block's own attention weights (timm's eager path, with its
    bias), averaged over heads, at both placements."""
    model = make_tiny(arch)
    blk = model.blocks[1]
    seen = {}
    blk.attn.fused_attn = False
    hook = blk.attn.attn_drop.register_forward_hook(lambda m, a, out: seen.setdefault("weights", a[0]))
    with torch.no_grad():
        model(images)
    hook.remove()
    saint.patch(model, "saint_match", tau=0.2, fraction=0.7, guard=0.3, layers=[1], select_at=select_at)
    handle = handle_of(model)
    spec = handle.spec
    read = {}

    class Spy:
        def __getattr__(self, name):
            return getattr(spec, name)

        def select(self, ctx, settings, config):
            read["cls"] = ctx.cls_attention()
            return spec.select(ctx, settings, config)

    handle.spec = Spy()
    with torch.no_grad():
        model(images)
    torch.testing.assert_close(read["cls"], seen["weights"][:, :, 0].mean(dim=1), **TOL)


@pytest.mark.parametrize("method,kw", [("tome", dict(r=3)), ("saint_match", dict(tau=0.2, fraction=0.7))])
@pytest.mark.parametrize("arch", ["beit", "srelpos"])
def test_the_average_head_reads_what_every_patch_became(arch, method, kw, images):
    """The head averages the patch tokens: after merging, the pooled features are the mean
    over every original patch of the token it became (its fc_norm applied), per image."""
    model = make_tiny(arch)
    npt = model.num_prefix_tokens
    assert model.global_pool == "avg"
    saint.patch(model, method, trace=True, **kw)
    with torch.no_grad():
        tokens = model.forward_features(images)
        pooled = model.forward_head(tokens, pre_logits=True)
        logits = model(images)
    origin = handle_of(model).origins()[-1]
    want = torch.stack([tokens[i, origin[i, npt:]].mean(dim=0) for i in range(len(images))])
    torch.testing.assert_close(pooled, model.fc_norm(want), **TOL)
    torch.testing.assert_close(logits, model.head(pooled), **TOL)
    emb, got_logits = find_adapter(model).embed(model, images)
    torch.testing.assert_close(emb, pooled, **TOL)
    torch.testing.assert_close(got_logits, logits, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_pair_bias_kernels_agree_and_the_others_are_refused(arch, images):
    """A packed stream's pair-biased attention runs per image (``loop``, the CPU's ``auto``)
    or on the images padded to the longest (``padded``, an accelerator's ``auto``): the same
    answer; a kernel that cannot add a bias per pair is a clear error when patching."""
    model = make_tiny(arch)
    guard = dict(guard=0.3) if model.cls_token is not None else {}
    outs = {}
    for kernel in ("auto", "loop", "padded"):
        saint.patch(model, "saint_match", tau=0.2, fraction=0.7, kernel=kernel, **guard)
        with torch.no_grad():
            outs[kernel] = model(images)
        assert saint.stats(model).layout == "packed"
    torch.testing.assert_close(outs["loop"], outs["auto"], rtol=0, atol=0)
    torch.testing.assert_close(outs["padded"], outs["loop"], **TOL)
    saint.unpatch(model)
    for kernel in ("flex", "varlen", "flash_attn"):  # refused when patching, the model left as it was
        with pytest.raises(ValueError, match="relative position bias per pair"):
            saint.patch(model, "saint_match", tau=0.2, fraction=0.7, kernel=kernel)
        assert not saint.is_patched(model)


def relpos_table(**extra) -> torch.nn.Module:
    """A ``VisionTransformerRelPos`` with a bias table per block (no MLP, whose per-call cost
    the FLOPs model leaves out), a class token, a q norm where asked."""
    torch.manual_seed(0)
    return timm.create_model("vit_relpos_medium_patch16_cls_224", pretrained=False, rel_pos_type="bias",
                             **TINY, **extra).eval()


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("arch", ["beit", "relpos_table", "relpos_qk_norm"])
def test_block_flops_match_the_flop_counter(arch, select_at):
    """The FLOPs model calibration reads equals torch's counter on one block and on a model
    that drops before (or after) block 1's attention: the fused qkv (BEiT's with its q/v bias)
    split into key rows on every token and query/value rows on the survivors, or run whole on
    every token under a q norm."""
    model = (make_tiny(arch) if arch == "beit"
             else relpos_table(**({"qk_norm": True} if arch == "relpos_qk_norm" else {})))
    blk, n = model.blocks[0], model.num_prefix_tokens + model.patch_embed.num_patches
    adapter = find_adapter(model)
    x = torch.randn(2, n, blk.norm1.normalized_shape[0])
    total, _ = count_flops(lambda: blk(x))
    assert adapter.block_flops(model, n, n, select_at) == total / 2
    images = torch.randn(2, 3, 32, 32)
    unpruned, _ = count_flops(lambda: model.forward_features(images))
    rest = unpruned / 2 - len(model.blocks) * adapter.block_flops(model, n, n)
    saint.patch(model, "random", r=4, layers=[1], select_at=select_at)
    total, _ = count_flops(lambda: model.forward_features(images))
    after = n - 4
    expected = (adapter.block_flops(model, n, n) + adapter.block_flops(model, n, after)
                + (len(model.blocks) - 2) * adapter.block_flops(model, after, after))
    assert total / 2 - rest == pytest.approx(expected, rel=1e-9)


def test_adapter_probe_and_calibration(images):
    """The Beit adapter is found, protects the class token, its probe reads the keys the
    selection reads, and calibration reaches a FLOPs target."""
    model = make_tiny("beit")
    assert_adapter_probe_reads_keys(model, images, "timm_relpos", 1, 17)
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_match")
    assert cal.reached and abs(cal.achieved / 1.4 - 1) < 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_a_batch_gathers_its_pair_masks_in_groups_of_images(arch, images, monkeypatch):
    """A rectangular or padded batch gathers its pair masks a few images at a time (to stay in
    the CPU's cache): one image per call gives the whole batch's answer, merged or dropped."""
    from saint.adapters import pair_bias

    model = make_tiny(arch)
    for method, kw in (("tome", dict(r=3)), ("saint", dict(tau=0.2, k=1))):
        saint.patch(model, method, layout="padded", **kw)
        with torch.no_grad():
            whole = model(images)
            with monkeypatch.context() as m:
                m.setattr(pair_bias, "PAIR_MASK_BYTES", 1)
                torch.testing.assert_close(model(images), whole, **TOL)
        assert saint.stats(model).layout == ("rectangular" if method == "tome" else "padded")


def test_gather_pairs_reads_each_images_rows_and_columns():
    """Known answer: ``gather_pairs`` is ``full[b, :, rows[b]][:, :, cols[b]]`` for one table
    for every image (``[1, H, N0, N0]`` or timm's shared ``[H, N0, N0]``) and for one per image."""
    from saint.adapters.pair_bias import gather_pairs

    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([[0, 3, 5], [0, 1, 2]])
    cols = torch.tensor([[0, 5, 4, 1], [2, 2, 0, 6]])
    for full in (torch.randn(1, 2, 7, 7, generator=g), torch.randn(2, 7, 7, generator=g),
                 torch.randn(2, 2, 7, 7, generator=g)):
        table = full if full.dim() == 4 else full[None]
        want = torch.stack([table[b if table.shape[0] > 1 else 0][:, rows[b]][:, :, cols[b]] for b in range(2)])
        assert torch.equal(gather_pairs(full, rows, cols), want)


@pytest.mark.parametrize("arch", ["beit", "relpos_cls"])
def test_keys_first_equals_every_tokens_projections_merged(arch, images, monkeypatch):
    """Before attention, projecting queries and values from the survivors' merged inputs
    equals merging every token's projections (a merge is a mean, the projections affine)."""
    from saint.adapters import timm_relpos

    model = make_tiny(arch)
    saint.patch(model, "saint_match", tau=0.2, fraction=0.8, layers=[0, 1, 2], select_at="attention")
    with torch.no_grad():
        keys_first = model(images)
    assert max(saint.stats(model).tokens[1]) < saint.stats(model).tokens[0][0]
    monkeypatch.setattr(timm_relpos, "_keys_first", lambda attn: False)
    with torch.no_grad():
        torch.testing.assert_close(model(images), keys_first, **TOL)


def test_post_norm_blocks_are_refused():
    """The ``*_rpn`` models' post-norm ``ResPostRelPosBlock`` is refused, naming what is supported."""
    model = timm.create_model("vit_relpos_small_patch16_rpn_224", pretrained=False, **TINY).eval()
    with pytest.raises(TypeError, match="not the post-norm ResPostRelPosBlock"):
        saint.patch(model, "tome", r=2)
    assert not saint.is_patched(model)


def test_copies_and_threads_pool_their_own_calls(images):
    """A deep copy is an independent patched model; one instance called from two threads
    gives every call (ragged batches of other sizes) its own answer, pooled with its own sizes."""
    import copy

    from .conftest import assert_two_threads_agree

    model = make_tiny("beit")
    saint.patch(model, "saint_match", tau=0.2, fraction=0.7, guard=0.3)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        want = model(images)
        saint.patch(clone, "tome", r=2)
        assert not torch.equal(clone(images), want)  # its own method
        torch.testing.assert_close(model(images), want, rtol=0, atol=0)

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    assert_two_threads_agree(call, [(images[: 1 + i % 4] * (1 + i / 10),) for i in range(8)])

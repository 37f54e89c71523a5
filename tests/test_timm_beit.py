"""timm ``Beit`` (BEiT, BEiT v2): what the shared timm tests cannot see. Each kept token reads
its rows and columns of the full grid's relative position bias (per block or shared) against
timm's own modules run on the kept tokens; the class token's attention the guard ranks by is
the model's own (eager, with its weights); the average head reads what every patch became;
the pair-biased attention's kernels; the FLOPs model. (Packed == padded == alone, exact
unpatch, every method and both placements run for the ``beit`` archs of ``conftest.ARCHS``
in the shared timm tests.)"""

from __future__ import annotations

import pytest
import torch

import saint
from saint.adapters import find_adapter, handle_of
from saint.measure.flops import count_flops

from .conftest import make_tiny

TOL = dict(atol=1e-5, rtol=1e-5)
BEITS = ["beit", "beit_shared"]


def _bias_at(full: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return full[..., idx, :][..., idx]


@torch.no_grad()
def reference_after_drop(model: torch.nn.Module, x: torch.Tensor, block: int, kept: torch.Tensor) -> torch.Tensor:
    """timm's own forward of one image with its tokens ``kept [N']`` (original indices, the
    class token's 0 included) removed before ``block``: every block's own modules, its own
    bias table and the model's shared one taken at those indices."""
    x = model.patch_embed(x)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    for i, blk in enumerate(model.blocks):
        if i == block:
            x = x[:, kept]
        if i < block:
            x = blk(x, shared_rel_pos_bias=shared)
            continue
        own = blk.attn._get_rel_pos_bias() if blk.attn.relative_position_bias_table is not None else None
        if own is not None:  # the module's own table, read at the kept tokens
            blk.attn._get_rel_pos_bias = lambda own=own: _bias_at(own, kept)
        try:
            x = blk(x, shared_rel_pos_bias=None if shared is None else _bias_at(shared, kept))
        finally:
            blk.attn.__dict__.pop("_get_rel_pos_bias", None)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("arch", BEITS)
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
        assert kept[0] == 0, "the class token stays, in front"
        torch.testing.assert_close(out[i : i + 1], reference_after_drop(model, images[i : i + 1], 1, kept), **TOL)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("arch", BEITS)
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
def test_the_average_head_reads_what_every_patch_became(method, kw, images):
    """BEiT's head averages its patch tokens: after merging, the pooled features are the mean
    over every original patch of the token it became (its fc_norm applied), per image."""
    model = make_tiny("beit")
    assert model.global_pool == "avg"
    saint.patch(model, method, trace=True, **kw)
    with torch.no_grad():
        tokens = model.forward_features(images)
        pooled = model.forward_head(tokens, pre_logits=True)
        logits = model(images)
    origin = handle_of(model).origins()[-1]
    want = torch.stack([tokens[i, origin[i, 1:]].mean(dim=0) for i in range(len(images))])
    torch.testing.assert_close(pooled, model.fc_norm(want), **TOL)
    torch.testing.assert_close(logits, model.head(pooled), **TOL)
    emb, got_logits = find_adapter(model).embed(model, images)
    torch.testing.assert_close(emb, pooled, **TOL)
    torch.testing.assert_close(got_logits, logits, **TOL)


@pytest.mark.parametrize("arch", BEITS)
def test_pair_bias_kernels_agree_and_the_others_are_refused(arch, images):
    """A packed stream's pair-biased attention runs per image (``loop``, the CPU's ``auto``)
    or on the images padded to the longest (``padded``, an accelerator's ``auto``): the same
    answer; a kernel that cannot add a bias per pair is a clear error."""
    model = make_tiny(arch)
    outs = {}
    for kernel in ("auto", "loop", "padded"):
        saint.patch(model, "saint_match", tau=0.2, fraction=0.7, guard=0.3, kernel=kernel)
        with torch.no_grad():
            outs[kernel] = model(images)
        assert saint.stats(model).layout == "packed"
    torch.testing.assert_close(outs["loop"], outs["auto"], rtol=0, atol=0)
    torch.testing.assert_close(outs["padded"], outs["loop"], **TOL)
    saint.patch(model, "saint_match", tau=0.2, fraction=0.7, kernel="flex")
    with pytest.raises(ValueError, match="relative position bias per pair"), torch.no_grad():
        model(images)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
def test_block_flops_match_the_flop_counter(select_at):
    """The FLOPs model calibration reads equals torch's counter on one block and on a model
    that drops before (or after) block 1's attention: BEiT's fused qkv with its q/v bias
    split into key rows on every token and query/value rows on the survivors."""
    model = make_tiny("beit")
    blk, n = model.blocks[0], 1 + model.patch_embed.num_patches
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
    adapter = find_adapter(model)
    assert adapter.name == "timm_beit" and adapter.protected(model) == 1
    probe = adapter.probe(model)
    store: dict[str, torch.Tensor] = {}
    hooks = probe.hooks(0, store)
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    q, k = probe.qk(0, store)
    assert q.shape == k.shape == (len(images), 17, 2, 16)
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_match")
    assert cal.reached and abs(cal.achieved / 1.4 - 1) < 0.1


@pytest.mark.parametrize("arch", BEITS)
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

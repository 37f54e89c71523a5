"""LLaVA-NeXT and LLaVA-OneVision (anyres images) on tiny random models: SAINT's llm, vit
(per-crop budgets) and hybrid modes and FastV; the newline tokens between rows of the
crop grid are never dropped; OneVision's interpolated grids and videos."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters import handle_of  # noqa: E402
from saint.adapters.llava_anyres import NEWLINE_ATTR  # noqa: E402

from .anyres_tiny import DEPTH, FAMILIES, IMG, SIDE, VID, features, gen, inputs, logits, make  # noqa: E402
from .conftest import forcing, left_pad  # noqa: E402

# three prompts: a 30x60 image (2 crops + base); a 64x64 and a 32x32 image (OneVision: no
# crops with several images per prompt); a 12x60 image (2 crops + base, the unpadding cuts
# the crop grid's first and last patch rows)
ROWS = [[(3, 4), (30, 60)], [(2, 3), (64, 64), (32, 32)], [(1, 5), (12, 60)]]
LLM = dict(mode="llm", llm_layers=(1, 3), llm_tau=0.3, llm_k=2)
FASTV = dict(method="fastv", fastv_layer=2, fastv_ratio=0.5)
VIT = dict(mode="vit", vit_keep=7, vit_layer=0)
HYBRID = dict(mode="hybrid", vit_keep=9, vit_layer=1, llm_layers=(1, 3), llm_tau=0.3, llm_k=2)
NOTHING = {
    "llm": dict(mode="llm", llm_layers=(0, DEPTH - 2), llm_tau=0.3, llm_k=1000),
    "fastv": dict(method="fastv", fastv_layer=1, fastv_ratio=0.0),
    "vit": dict(mode="vit", vit_keep=SIDE * SIDE, vit_layer=0),
    "hybrid": dict(mode="hybrid", vit_keep=SIDE * SIDE, vit_layer=1, llm_layers=(0, 2), llm_k=1000),
}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def kept_patches(model) -> torch.Tensor:
    """``[crops, patches]``: which patches of every crop the patched tower kept in its last call."""
    origin = handle_of(model).vision.origins()[-1]
    return origin[:, origin.shape[1] - SIDE * SIDE:] >= 0


def newline_marks_per_image(model, x) -> list[torch.Tensor]:
    """Per image of ``x``, which rows of its (unpatched) features are the newline vector."""
    return [(f == model.model.image_newline).all(-1) for f in features(model, x)]


def newline_marks(model, x) -> torch.Tensor:
    """``[B, L]``: the image tokens of ``x`` whose unpatched features are the newline vector."""
    marks = torch.cat(newline_marks_per_image(model, x))
    image = x["input_ids"] == IMG
    out = torch.zeros_like(image)
    out[image] = marks
    return out


def test_pruning_nothing_and_unpatch_are_identical_to_unpatched(family):
    model = make(family)
    x = inputs(model, ROWS)
    ref, ref_ids = logits(model, x), gen(model, x)
    for cfg in NOTHING.values():
        saint.patch(model, **cfg)
        assert torch.equal(logits(model, x), ref), cfg
        assert torch.equal(gen(model, x), ref_ids), cfg
        saint.unpatch(model)
    saint.patch(model, **HYBRID)
    assert bool(logits(model, x).isnan().any())
    saint.unpatch(model)
    assert not {"pack_image_features", "get_video_features"} & set(model.model.__dict__)
    assert "forward" not in model.model.vision_tower.__dict__
    assert torch.equal(logits(model, x), ref)
    assert torch.equal(gen(model, x), ref_ids)


@pytest.mark.parametrize("cfg", [LLM, FASTV, VIT, HYBRID], ids=["llm", "fastv", "vit", "hybrid"])
def test_batch_equals_alone_and_cached_equals_uncached(family, cfg):
    check_batch_equals_alone_and_cached_equals_uncached(make(family), cfg)


def test_llava_next_with_a_mistral_decoder():
    """LLaVA-NeXT-Mistral (llava-v1.6-mistral-7b: no sliding window), both sides pruning."""
    model = make("llava_next", mistral=True)  # sliding_window=None
    assert type(model.model.language_model).__name__ == "MistralModel"
    check_batch_equals_alone_and_cached_equals_uncached(model, HYBRID)


@pytest.mark.parametrize("cfg", [LLM, FASTV], ids=["llm", "fastv"])
def test_granite_vision_layout(cfg):
    """Granite Vision 3.x: LLaVA-NeXT with a Granite decoder (attention, embeddings and residuals
    scaled by its multipliers) reading two tower layers; pruned inside the language model."""
    model = make("llava_next", granite=True)
    assert type(model.model.language_model).__name__ == "GraniteModel"
    check_batch_equals_alone_and_cached_equals_uncached(model, cfg)


def check_batch_equals_alone_and_cached_equals_uncached(model: torch.nn.Module, cfg: dict) -> None:
    x = inputs(model, ROWS)  # the processor's prompts: built before patching
    alone = [inputs(model, [row], seeds=[b]) for b, row in enumerate(ROWS)]
    saint.patch(model, **cfg)
    ids, stats, last = gen(model, x), saint.stats(model), logits(model, x)[:, -1]
    for b, xi in enumerate(alone):
        assert torch.equal(gen(model, xi), ids[b:b + 1])
        assert [t[b] for t in stats.tokens] == [t[0] for t in saint.stats(model).tokens]
        torch.testing.assert_close(logits(model, xi)[:, -1], last[b:b + 1], rtol=1e-4, atol=1e-5)
    if cfg is not FASTV:  # FastV's ranking query changes every uncached step
        assert torch.equal(ids, gen(model, x, use_cache=False))
        torch.manual_seed(3)
        sampled = gen(model, x, do_sample=True, top_k=0, temperature=2.0)
        torch.manual_seed(3)
        assert torch.equal(sampled, gen(model, x, do_sample=True, top_k=0, temperature=2.0, use_cache=False))
        assert torch.equal(gen(model, x, num_beams=3), gen(model, x, num_beams=3, use_cache=False))


def test_decoded_placeholder_ids_are_text(family):
    """Decoding steps that emit the image and video token ids (no pixels: the model
    embeds them as text) run as unpatched: pruning nothing gives the unpatched ids,
    pruning gives each prompt what it gets alone (they were refused as new media)."""
    model = make(family)
    x = inputs(model, ROWS)
    alone = [inputs(model, [row], seeds=[b]) for b, row in enumerate(ROWS)]
    ref = gen(model, x, **forcing([IMG, VID]))
    assert ((ref == IMG) | (ref == VID)).sum(dim=1).tolist() == [2, 2, 2]
    saint.patch(model, **NOTHING["hybrid"])
    assert torch.equal(gen(model, x, **forcing([IMG, VID])), ref)
    saint.unpatch(model)
    saint.patch(model, **HYBRID)
    out = gen(model, x, **forcing([IMG, VID]))
    assert torch.equal(out, torch.cat([gen(model, xi, **forcing([IMG, VID])) for xi in alone]))


@pytest.mark.parametrize("cfg", [dict(mode="llm", llm_layers=(1, 2), llm_tau=0.0, llm_k=1),
                                 dict(mode="vit", vit_keep=1, vit_layer=0),
                                 dict(mode="hybrid", vit_keep=3, vit_layer=0, llm_layers=(0, 2), llm_tau=0.0, llm_k=1)],
                         ids=["llm", "vit", "hybrid"])
def test_newline_tokens_are_protected(family, cfg):
    """Pruning as hard as each mode allows; the newline tokens (one per row of every
    image's crop grid, one after an image without crops) all reach the language model
    and survive it."""
    model = make(family)
    x = inputs(model, ROWS)
    marks = newline_marks(model, x)
    rows_30x60, rows_12x60 = 4, 2  # the 12x60 image's grid loses 2 of its 4 rows to unpadding
    second = 2 if family == "llava_onevision" else 8 + 4  # 64x64 + 32x32: one newline each, or 8 + 4 rows
    assert marks.sum(dim=1).tolist() == [rows_30x60, second, rows_12x60]
    per_image = [int(m.sum()) for m in newline_marks_per_image(model, x)]
    saint.patch(model, **cfg)
    logits(model, x)
    stats = saint.stats(model)
    image = x["input_ids"] == IMG
    if cfg["mode"] == "llm":
        assert bool(handle_of(model).kept_input[marks].all())
        assert stats.tokens[0] == (image & ~marks).sum(dim=1).tolist()  # newlines are never counted as prunable
    else:  # the language model gets every newline, marked as such, among the kept tokens
        feats = features(model, x)
        marked = [getattr(f, NEWLINE_ATTR) for f in feats]
        assert all(torch.equal(m, (f == model.model.image_newline).all(-1)) for f, m in zip(feats, marked, strict=True))
        assert [int(m.sum()) for m in marked] == per_image
        lm_image = [len(feats[0]), len(feats[1]) + len(feats[2]), len(feats[3])]
        assert stats.tokens[0] == [n - m for n, m in zip(lm_image, marks.sum(dim=1).tolist(), strict=True)]
        assert all(a < b for a, b in zip(stats.tokens[0], (image & ~marks).sum(dim=1).tolist(), strict=True))
    if cfg["mode"] != "vit":
        assert all(a < b for a, b in zip(stats.tokens[-1], stats.tokens[0], strict=True))


def test_vit_keeps_the_budget_of_every_crop_and_the_lm_sees_the_kept_tokens(family):
    """Each crop and the base image keep vit_keep patches; the language model gets, per
    image, the kept patches the unpadding leaves plus every newline token."""
    model = make(family)
    keep = 5
    x = inputs(model, [ROWS[2]])  # 12x60: base + 2 crops side by side; unpadding keeps grid rows 1..2
    assert int(x["input_ids"].eq(IMG).sum()) == 16 + 2 * 8 + 2
    saint.patch(model, mode="vit", vit_keep=keep, vit_layer=0)
    out = logits(model, x)
    vision = handle_of(model).vision_stats()
    assert vision.tokens[-1] == [keep + (1 if family.startswith("llava_next") else 0)] * 3  # CLIP keeps its class token too
    kept = kept_patches(model).reshape(3, SIDE, SIDE)
    assert kept.sum(dim=(1, 2)).tolist() == [keep] * 3
    expected = keep + int(kept[1:, 1:3].sum())  # base + crops' kept patches in the rows left by unpadding
    assert saint.stats(model).tokens[0] == [expected]
    assert int(handle_of(model).kept_input.sum()) == x["input_ids"].shape[1] - (16 + 16 - expected)
    assert bool(out[handle_of(model).kept_input].isfinite().all())


def test_vit_features_are_the_towers_kept_outputs_at_their_grid_positions(family):
    """With the drop in the tower's last layer, the kept patches' outputs are the
    unpruned ones: the language model's image features are the unpatched packed
    features at the kept positions and every newline, in order."""
    model = make(family)
    x = inputs(model, [[(1, 1), (64, 64)]])  # base + 2x2 crops: an 8x8 grid, 8 newlines, no unpadding
    ref = features(model, x)[0]
    saint.patch(model, mode="vit", vit_keep=6, vit_layer=1)
    got = features(model, x)[0]
    kept = kept_patches(model)
    index = [p for p in range(16) if kept[0, p]]
    for r in range(8):
        for c in range(8):
            crop, patch = 1 + (r // SIDE) * 2 + c // SIDE, (r % SIDE) * SIDE + c % SIDE
            if kept[crop, patch]:
                index.append(16 + r * 9 + c)
        index.append(16 + r * 9 + 8)
    assert len(index) == 6 * 5 + 8
    torch.testing.assert_close(got, ref[index], rtol=1e-5, atol=1e-6)


def test_onevision_interpolated_grid_keeps_positions_with_half_their_weight():
    """anyres_max_1 shrinks the 8x8 crop grid to 4x4 by bilinear interpolation (each
    position the mean of a 2x2 block): a position stays when at least 2 of its 4 patches
    were kept, with the mean of the kept ones as its feature."""
    model = make("llava_onevision", aspect="anyres_max_1")
    x = inputs(model, [[(1, 1), (64, 64)]])
    assert x["input_ids"].eq(IMG).sum() == 16 + 4 * 5
    ref = logits(model, x)
    saint.patch(model, **NOTHING["vit"])
    assert torch.equal(logits(model, x), ref)
    saint.unpatch(model)

    projected = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.append(out))
    features(model, x)
    hook.remove()
    saint.patch(model, mode="vit", vit_keep=9, vit_layer=1)  # last layer: kept outputs are the unpruned ones
    got = features(model, x)[0]
    kept = kept_patches(model)
    expected = [projected[0][0, p] for p in range(16) if kept[0, p]]
    for br in range(4):
        for bc in range(4):
            block = [(2 * br + i, 2 * bc + j) for i in (0, 1) for j in (0, 1)]
            where = [(1 + (r // SIDE) * 2 + c // SIDE, (r % SIDE) * SIDE + c % SIDE) for r, c in block]
            rows = [projected[0][crop, patch] for crop, patch in where if kept[crop, patch]]
            if len(rows) >= 2:
                expected.append(torch.stack(rows).mean(dim=0))
        expected.append(model.model.image_newline.detach())
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)
    logits(model, x)
    assert saint.stats(model).tokens[0] == [len(expected) - 4]


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_video_frames_keep_every_patch(family):
    """In vit/hybrid the tower's drop pauses for video frames; video tokens are never
    dropped, and a prompt with an image and a video runs in every mode."""
    model = make(family)
    g = torch.Generator().manual_seed(5)
    video = torch.randn(1, 2, 3, 32, 32, generator=g)
    x = inputs(model, [[(2, 0), (30, 60)]])
    with torch.no_grad():
        ref_video = model.model.get_video_features(video).pooler_output
    n_video = ref_video.shape[1]  # 2 frames x 2x2 pooled patches (OneVision: + one newline)
    tail = torch.randint(1, 100, (3,), generator=g)
    ids, mask = left_pad([torch.cat([x["input_ids"][0], torch.full((n_video,), VID), tail])])
    xv = dict(x, input_ids=ids, attention_mask=mask, pixel_values_videos=video)
    ref, ref_ids = logits(model, xv), gen(model, xv)
    for cfg in (NOTHING["llm"], NOTHING["vit"]):
        saint.patch(model, **cfg)
        assert torch.equal(logits(model, xv), ref)
        assert torch.equal(gen(model, xv), ref_ids)
        saint.unpatch(model)
    saint.patch(model, **HYBRID)
    with torch.no_grad():
        assert torch.equal(model.model.get_video_features(video).pooler_output, ref_video)
    out = logits(model, xv)
    kept = handle_of(model).kept_input
    assert bool(kept[ids == VID].all())
    assert int((kept & (ids == IMG)).sum()) < int((ids == IMG).sum())
    assert bool(out[kept].isfinite().all())
    assert torch.equal(gen(model, xv), gen(model, xv, use_cache=False))


@pytest.mark.parametrize("kw, match", [
    (dict(method="random", visual_keep=4), "supports method='saint' \\(mode='llm', 'vit' or 'hybrid'\\)"),
    (dict(method="pool", visual_keep=4), "random/pool baselines take one square grid"),
    (dict(mode="vit", vit_keep=17, vit_layer=0), "exceeds the 16 patches"),
    (dict(mode="vit", vit_keep=4, vit_layer=2), "out of range"),
    (dict(mode="hybrid", vit_keep=4, vit_layer=0, llm_layers=(0, DEPTH - 1)), "end must be <="),
])
def test_bad_settings_are_refused(family, kw, match):
    model = make(family)
    with pytest.raises(ValueError, match=match):
        saint.patch(model, **kw)
    assert not saint.is_patched(model)
    assert not {"pack_image_features", "get_video_features"} & set(model.model.__dict__)
    assert "forward" not in model.model.vision_tower.__dict__


def test_feature_layer_before_the_drop_is_refused():
    model = make("llava_next")
    model.config.vision_feature_layer = model.model.config.vision_feature_layer = -2
    with pytest.raises(ValueError, match="vision_feature_layer=-2"):
        saint.patch(model, mode="vit", vit_keep=4, vit_layer=1)
    assert not saint.is_patched(model)
    # the same layer passed at call time: all the unpruned patches reached the LM, the drop ignored
    model.config.vision_feature_layer = model.model.config.vision_feature_layer = -1
    saint.patch(model.eval(), mode="vit", vit_keep=4, vit_layer=1)
    x = inputs(model, ROWS[:1])
    with torch.no_grad(), pytest.raises(ValueError, match="vision_feature_layer=-2 .* taken before vit_layer=1"):
        model(**x, vision_feature_layer=-2)


def test_a_prompt_with_the_wrong_image_token_count_is_refused(family):
    model = make(family)
    x = inputs(model, [ROWS[0]])
    ids = x["input_ids"]
    x = dict(x, input_ids=ids[:, 1:], attention_mask=x["attention_mask"][:, 1:])
    x["input_ids"][0, ids.eq(IMG)[0].nonzero()[0, 0]] = 5  # one image token fewer
    for cfg in (LLM, VIT):
        saint.patch(model, **cfg)
        with pytest.raises(ValueError, match="build the prompt with the processor"):
            logits(model, x)
        saint.unpatch(model)


def test_adapter_protocol(family):
    model = make(family)
    adapter = saint.adapters.find_adapter(model)
    assert adapter.name == family
    assert len(adapter.sites(model)) == DEPTH
    assert adapter.block_flops(model, 10, 10) > 0
    grid = adapter.grid(model)
    assert (grid.rows, grid.cols) == (SIDE, SIDE)
    saint.patch(model, **VIT)
    assert handle_of(model).config.key == "saint/vit" and handle_of(model).vision is not None

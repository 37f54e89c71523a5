"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 (the vision-side methods) and GLM-4.1V / 4.5V /
4.6V: SAINT's vit / llm / hybrid modes and the FastV, random and pool baselines on tiny
random models, images of different sizes, several images per prompt and video (see
tests/qwen_tiny.py)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .conftest import forcing  # noqa: E402
from .qwen_tiny import DEPTH, IMG, VDEPTH, VID, inputs, make, rope_index, tokens  # noqa: E402

NEW = 4
GREEDY = dict(max_new_tokens=NEW, do_sample=False, suppress_tokens=[IMG, VID])
# GLM-4.1V's video frames hold image tokens, so its forward takes images or videos, not both:
# "glm4v" runs the image prompts, "glm4v/video" (the same model) the video prompts.
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe",
            "glm46v", "glm_ocr", "glm4v/video", "qwen2_5_omni", "qwen3_omni_moe"]
# Qwen3.5's language model interleaves linear-attention layers (a recurrent state, no cache of
# tokens): the vision-side methods only
VISION_ONLY = ("qwen3_5", "qwen3_5_moe")
LLM_SIDE = ("llm", "hybrid", "fastv")
# three prompts: one image; two images of different sizes; a two-frame video
ROWS = [[3, ("image", (1, 8, 8)), 4], [2, ("image", (1, 8, 12)), 3, ("image", (1, 4, 8)), 2],
        [1, ("video", (2, 8, 8)), 5]]
VIDEO_ROWS = [[1, ("video", (2, 8, 8)), 5], [2, ("video", (2, 4, 8)), 3], [3, ("video", (1, 8, 12)), 1]]
CONFIGS = {
    "llm": dict(mode="llm", llm_layers=(1, 3), llm_tau=0.3, llm_k=2),
    "vit": dict(mode="vit", vit_layer=1, vit_ratio=0.5),
    "hybrid": dict(mode="hybrid", vit_layer=1, vit_ratio=0.5, llm_layers=(0, 3), llm_tau=0.3, llm_k=2),
    "fastv": dict(method="fastv", fastv_layer=2, fastv_ratio=0.5),
    "random": dict(method="random", keep_ratio=0.4),
    "pool": dict(method="pool", pool_size=2),
}
NOTHING = {
    "llm": dict(mode="llm", llm_layers=(0, DEPTH - 2), llm_tau=0.3, llm_k=1000),
    "vit": dict(mode="vit", vit_layer=1, vit_ratio=1.0),
    "fastv": dict(method="fastv", fastv_layer=1, fastv_ratio=0.0),
    "random": dict(method="random", keep_ratio=1.0),
    "pool": dict(method="pool", pool_size=1),
}


def rows_of(family: str) -> list:
    """The test prompts of ``family`` (see :data:`FAMILIES`)."""
    if family.endswith("/video"):
        return VIDEO_ROWS
    return ROWS[:2] if family.startswith("glm") else ROWS


def cases(names) -> list[tuple[str, str]]:
    """``(family, method name)`` for every family and every name it takes."""
    return [(f, n) for f in FAMILIES for n in names if not (f in VISION_ONLY and n in LLM_SIDE)]


def batch(family: str, rows: list | None = None) -> dict[str, torch.Tensor]:
    return inputs(rows or rows_of(family), family=family)


def alone(family: str) -> list[dict[str, torch.Tensor]]:
    return [inputs([r], seeds=[i], family=family) for i, r in enumerate(rows_of(family))]


def gen(model, x, **kw):
    with torch.no_grad():
        return model.generate(**x, **{**GREEDY, **kw})[:, -kw.get("max_new_tokens", NEW):]


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


# ---------------------------------------------------------------------------- identity
@pytest.mark.parametrize("family, name", cases(sorted(NOTHING)))
def test_pruning_nothing_is_identical_to_unpatched(family, name):
    model = make(family)
    x = batch(family)
    ref, ref_ids = logits(model, x), gen(model, x)
    saint.patch(model, **NOTHING[name])
    assert torch.equal(logits(model, x), ref)
    assert torch.equal(gen(model, x), ref_ids)
    tokens_ = saint.stats(model).tokens
    assert all(t == tokens_[0] for t in tokens_)


@pytest.mark.parametrize("family, name", cases(["hybrid", "fastv", "random"]))
def test_unpatch_restores_identical_outputs(family, name):
    model = make(family)
    x = batch(family)
    ref, ref_ids = logits(model, x), gen(model, x)
    saint.patch(model, **CONFIGS[name])
    gen(model, x)
    pruned = logits(model, x)
    assert bool(pruned.isnan().any())  # the patch dropped something
    saint.unpatch(model)
    assert not saint.is_patched(model)
    assert not model.model.__dict__.keys() & {"get_image_features", "get_video_features"}
    assert torch.equal(logits(model, x), ref)
    assert torch.equal(gen(model, x), ref_ids)


# ---------------------------------------------------------------------------- consistency
@pytest.mark.parametrize("family, name", cases(sorted(CONFIGS)))
def test_batch_equals_alone_and_cached_equals_uncached(family, name):
    """Left-padded prompts with images of different sizes, two images in one prompt
    and a video: each row equals the prompt alone (generated ids, last logits, per-row
    and per-image counts), and cached greedy decoding equals the uncached loop (not
    for FastV, whose ranking query is the newest token of every uncached step)."""
    model = make(family)
    saint.patch(model, **CONFIGS[name])
    x = batch(family)
    ids = gen(model, x)
    stats, images = saint.stats(model), get_handle(model).image_stats()
    last = logits(model, x)[:, -1]
    solo_ids, solo_last, solo_stats, solo_images = [], [], [], []
    for xi in alone(family):
        solo_ids.append(gen(model, xi))
        solo_last.append(logits(model, xi)[:, -1])
        solo_stats.append(saint.stats(model))
        solo_images.append(get_handle(model).image_stats())
    assert torch.equal(ids, torch.cat(solo_ids))
    torch.testing.assert_close(last, torch.cat(solo_last), rtol=1e-4, atol=1e-5)
    for b, s in enumerate(solo_stats):
        assert [t[b] for t in stats.tokens] == [t[0] for t in s.tokens]
    assert [sum((t.tokens[i] for t in solo_images), []) for i in range(3)] == images.tokens
    if name != "fastv":
        assert torch.equal(ids, gen(model, x, use_cache=False))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["vit", "random", "pool"])
def test_no_mask_and_no_cache_is_not_read_as_packed_sequences(family, name):
    """Without an attention mask or a cache, transformers reads gaps in the text
    positions as packed sequences and masks across them; the kept visual tokens keep
    their full-grid positions (gaps), so the shortened prompt must carry its own mask:
    the forward equals the cached one, and an unpadded batch's uncached greedy decoding
    (generate drops an all-ones mask) equals the cached one."""
    model = make(family)
    saint.patch(model, **CONFIGS[name])
    first = rows_of(family)[0]
    x = inputs([first, first], seeds=[0, 5], family=family)
    bare = {k: v for k, v in x.items() if k != "attention_mask"}
    with torch.no_grad():
        cached = model(**bare, use_cache=True).logits[:, -1]
        uncached = model(**bare, use_cache=False).logits[:, -1]
    torch.testing.assert_close(uncached, cached, rtol=1e-5, atol=1e-6)
    assert torch.equal(gen(model, x, use_cache=False), gen(model, x))


@pytest.mark.parametrize("family, name", cases(["hybrid", "random"]))
def test_sampling_and_beams_cached_equals_uncached(family, name):
    """Seeded sampling and beam search (the cache reorder carries the per-row maps;
    generate pre-encodes the pixels through the wrapped feature functions)."""
    model = make(family)
    saint.patch(model, **CONFIGS[name])
    x = batch(family, rows_of(family)[:2])
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outs.append(gen(model, x, do_sample=True, top_k=0, temperature=2.0, use_cache=use_cache))
    assert torch.equal(*outs)
    if family.startswith("glm"):
        # transformers' GLM-4.1V repeats a prompt's images for its beams as [A, A, B, B] (its
        # generic code: [A, B, A, B]) and finds no video tokens (its frames hold image tokens), so
        # unpatched beams get other prompts' images, or fail on videos: one image per prompt
        if family.endswith("/video"):
            return
        x = batch(family, [[3, ("image", (1, 8, 8)), 4], [2, ("image", (1, 8, 12)), 3]])
    assert torch.equal(gen(model, x, num_beams=3), gen(model, x, num_beams=3, use_cache=False))


# ---------------------------------------------------------------------------- positions & caches
def _positions(model, x, **kw):
    """3-D position ids the language model receives in each call of a generate."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"].clone()), with_kwargs=True)
    gen(model, x, **kw)
    hook.remove()
    return [p[-3:] for p in seen]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["vit", "random", "pool"])
def test_kept_tokens_keep_their_full_grid_positions(family, name):
    """After a vision-side reduction the prompt holds the kept tokens at exactly the
    M-RoPE positions get_rope_index gives them on the full grid, and every decoding
    step gets the unpruned model's position."""
    model = make(family)
    x = batch(family)
    full, deltas = rope_index(model, x)
    ref = _positions(model, x)
    saint.patch(model, **CONFIGS[name])
    got = _positions(model, x)
    kept = get_handle(model).kept_input
    for b in range(len(rows_of(family))):
        real = x["attention_mask"][b].bool()
        expect = full[:, b, kept[b] & real]
        pos = got[0][:, b]
        assert torch.equal(pos[:, -expect.shape[1]:], expect)
        # by hand: the last prompt token sits at max position, decoding continues after it
        assert int(expect[:, -1].max()) == int(full[:, b, real].max())
        assert int(expect[:, -1].max()) + 1 == int(deltas[b]) + int(real.sum())
    assert len(got) == len(ref) == NEW
    for step in range(1, NEW):
        assert torch.equal(got[step], ref[step])
    dropped = ~kept & x["attention_mask"].bool()
    assert bool(dropped.any()) and bool(torch.isin(x["input_ids"][dropped], torch.tensor([IMG, VID])).all())


def test_llm_positions_and_cache_lengths():
    """LLM-side drop: kept tokens keep their original 3-D positions (what layer 0 saw)
    and each layer's cache holds exactly the tokens that entered it."""
    model = make()
    saint.patch(model, **CONFIGS["llm"])
    x = batch("qwen2_5_vl", ROWS[1:2])
    seen = []
    hook = model.model.language_model.layers[4].register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_embeddings"][0].clone()), with_kwargs=True)
    layer0 = []
    hook0 = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: layer0.append(k["position_embeddings"][0].clone()), with_kwargs=True)
    with torch.no_grad():
        out = model.generate(**x, **GREEDY, return_dict_in_generate=True)
    hook.remove()
    hook0.remove()
    kept = get_handle(model).kept_input[0]
    assert torch.equal(seen[0][0], layer0[0][0][kept])
    for step in range(1, NEW):
        assert torch.equal(seen[step], layer0[step])
    stats = saint.stats(model)
    n_text = int((~torch.isin(x["input_ids"], torch.tensor([IMG, VID]))).sum())
    for i, layer in enumerate(out.cache.layers):
        assert layer.keys.shape[2] == n_text + stats.tokens[1 + i][0] + NEW - 1, f"layer {i}"
    assert stats.tokens[4][0] < stats.tokens[1][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_vit_budget_per_image_and_video_frame(family):
    """vit mode keeps round(vit_ratio * groups) merge groups of every image and of
    every video frame group; nothing else changes the counts."""
    model = make(family)
    saint.patch(model, mode="vit", vit_layer=2, vit_ratio=0.3)
    with torch.no_grad():
        model(**batch(family))
    st = get_handle(model).image_stats()
    parts = [p for row in rows_of(family) for p in row if not isinstance(p, int)]
    images = [g for kind, g in parts if kind == "image"]
    frames = [(1, h, w) for kind, (t, h, w) in parts if kind == "video" for _ in range(t)]
    expect_in, expect_kept = [], []  # per run of placeholders, in prompt order
    for kind, (t, h, w) in parts:
        if kind == "image" or family.startswith(("qwen3_vl", "qwen3_5", "glm")):  # these wrap every frame
            expect_in += [tokens((1, h, w))] * t
            expect_kept += [round(0.3 * tokens((1, h, w)))] * t
        else:  # the video is one run of its frame groups
            expect_in.append(t * tokens((1, h, w)))
            expect_kept.append(t * round(0.3 * tokens((1, h, w))))
    assert st.tokens[0] == expect_in
    assert st.tokens[1] == st.tokens[2] == expect_kept
    # the tower: every patch of each sample (image, video frame group) up to block 2, the kept groups' after
    samples = images + frames
    vs = get_handle(model).vision_stats()
    assert len(vs.blocks) == VDEPTH
    assert vs.tokens[:3] == [[g[1] * g[2] for g in samples]] * 3
    assert vs.tokens[3:] == [[4 * round(0.3 * tokens(g)) for g in samples]] * (VDEPTH - 3)


def test_vit_selection_is_the_budget_drop_on_group_keys():
    """The kept groups are exactly what fixed_budget_keep_mask picks on the mean key
    of each merge group at vit_layer (window order), read from the unpatched tower."""
    from saint.core import fixed_budget_keep_mask

    model = make()
    x = inputs([[2, ("image", (1, 8, 12)), 2]])
    tower = model.model.visual
    grab = {}
    h = tower.blocks[1].attn.qkv.register_forward_hook(lambda m, a, o: grab.update(qkv=o))
    with torch.no_grad():
        model(**x)
    h.remove()
    n = grab["qkv"].shape[0]
    keys = grab["qkv"].view(n, 3, 2, -1)[:, 1].float().mean(dim=1).view(n // 4, 4, -1).mean(dim=1)
    expect_win = fixed_budget_keep_mask(keys[None], round(0.5 * (n // 4)), 16)[0]
    from transformers.vision_utils import get_vision_window_index

    order, _ = get_vision_window_index(x["image_grid_thw"], 2, tower.window_size, tower.patch_size)
    expect = torch.empty_like(expect_win)
    expect[order] = expect_win
    saint.patch(model, mode="vit", vit_layer=1, vit_ratio=0.5)
    with torch.no_grad():
        model(**x)
    kept = get_handle(model).kept_input[0][x["input_ids"][0] == IMG]
    assert torch.equal(kept, expect)


def test_glm_ocr_selection_reads_the_towers_normed_keys():
    """GLM-OCR's tower normalizes its keys per head (``k_norm``) before attention: the kept
    groups are the budget drop on the mean of those normed keys, which picks other groups
    than the raw projection would on this image (a k_norm that rescales channels)."""
    from saint.core import fixed_budget_keep_mask

    model = make("glm_ocr")
    x = inputs([[2, ("image", (1, 8, 12)), 2]], family="glm_ocr")
    attn = model.model.visual.blocks[1].attn
    with torch.no_grad():  # a per-channel scale: normed keys rank the groups otherwise than raw ones
        attn.k_norm.weight.copy_(torch.linspace(-3.0, 3.0, attn.k_norm.weight.numel()) ** 3)
    grab = {}
    h = attn.qkv.register_forward_hook(lambda m, a, o: grab.update(qkv=o))
    with torch.no_grad():
        model(**x)
    h.remove()
    n = grab["qkv"].shape[0]
    raw = grab["qkv"].view(n, 3, 2, -1)[:, 1]
    budget = round(0.5 * (n // 4))

    def drop(keys):
        return fixed_budget_keep_mask(keys.float().mean(dim=1).view(n // 4, 4, -1).mean(dim=1)[None], budget, 16)[0]

    with torch.no_grad():
        expect = drop(attn.k_norm(raw))
    assert not torch.equal(expect, drop(raw))  # the test can tell the two apart
    saint.patch(model, mode="vit", vit_layer=1, vit_ratio=0.5)
    with torch.no_grad():
        model(**x)
    kept = get_handle(model).kept_input[0][x["input_ids"][0] == IMG]
    assert torch.equal(kept, expect)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(mode="vit", vit_layer=3), ValueError, "vit_layer must be <= 2"),
        (dict(mode="vit", vit_layer=1, vit_ratio=0.0), ValueError, "vit_ratio=0.0 must be a fraction"),
        (dict(mode="vit", vit_layer=1, vit_ratio=1.5), ValueError, "vit_ratio=1.5"),
        (dict(mode="llm", llm_layers=(3, 2)), ValueError, "empty or reversed"),
        (dict(mode="llm", llm_layers=(1, DEPTH - 1)), ValueError, "end must be <= 4"),
        (dict(mode="llm", llm_layers=(1, 2), llm_tau=1.5), ValueError, "tau=1.5 is outside"),
        (dict(mode="llm", llm_layers=(1, 2), vit_ratio=0.5), TypeError, "does not use"),
        (dict(mode="warp"), ValueError, "mode must be one of"),
        (dict(method="fastv", fastv_layer=DEPTH), ValueError, "fastv_layer=6"),
        (dict(method="fastv", fastv_ratio=1.0), ValueError, "fastv_ratio"),
        (dict(method="random"), ValueError, "needs keep_ratio"),
        (dict(method="random", keep_ratio=0.5, mode="llm"), TypeError, "mode= is for"),
        (dict(method="tome", r=4), ValueError, "unknown Qwen-VL method"),
        (dict(method="pool"), ValueError, "needs pool_size"),
        (dict(method="pool", pool_size=0), ValueError, "pool_size=0 must be >= 1"),
        (dict(mode="llm", llm_layers=(1, 2), tua=0.5), TypeError, "does not take"),
    ],
)
def test_bad_settings_raise_clear_errors(kw, err, match):
    model = make()
    with pytest.raises(err, match=match):
        saint.patch(model, **kw)
    assert not saint.is_patched(model)


@pytest.mark.parametrize("family, name", cases(["hybrid", "random"]))
def test_decoded_placeholder_ids_are_text(family, name):
    """Decoding steps that emit the image and video token ids (no pixels: the model
    embeds them as text) run as unpatched: pruning nothing gives the unpatched ids,
    pruning gives each prompt what it gets alone (they were refused as new media)."""
    model = make(family)
    x = batch(family)
    ref = gen(model, x, **forcing([IMG, VID]))
    assert ((ref == IMG) | (ref == VID)).sum(dim=1).tolist() == [2] * len(rows_of(family))
    saint.patch(model, **NOTHING["vit"])
    assert torch.equal(gen(model, x, **forcing([IMG, VID])), ref)
    saint.unpatch(model)
    saint.patch(model, **CONFIGS[name])
    out = gen(model, x, **forcing([IMG, VID]))
    assert torch.equal(out, torch.cat([gen(model, xi, **forcing([IMG, VID])) for xi in alone(family)]))


def test_bad_calls_raise_clear_errors():
    model = make("qwen2_5_vl")
    saint.patch(model, **CONFIGS["vit"])
    x = inputs([ROWS[0]])
    bad = dict(x, input_ids=x["input_ids"][:, 1:], attention_mask=None, mm_token_type_ids=x["mm_token_type_ids"][:, 1:])
    bad["input_ids"] = bad["input_ids"].clone()
    bad["input_ids"][0, 5] = 7  # one image token too few
    with pytest.raises(ValueError, match="15 image tokens"):
        model(**bad)
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(**x, output_hidden_states=True)
    with torch.no_grad():
        out = model(**x, use_cache=True)
        with pytest.raises(ValueError, match="non-empty cache"):
            model(**x, cache=out.cache)
    with pytest.raises(ValueError, match="static cache"):
        model.generate(**x, cache_implementation="static", **GREEDY)
    flash = make("qwen2_5_vl")
    flash.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'"):
        saint.patch(flash, **CONFIGS["llm"])
    tower = make("qwen2_5_vl")
    tower.model.visual.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="vision attn_implementation='flash_attention_2'"):
        saint.patch(tower, **CONFIGS["vit"])
    saint.patch(tower, **CONFIGS["llm"])  # the tower is untouched in llm mode


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_splits_a_batch_into_its_prompts_with_their_images(family):
    """The protocol's split hands every prompt its own patches and grids (images of
    different sizes, two images in one prompt, a video)."""
    adapter = saint.adapters.find_adapter(make(family))
    assert adapter.name == "qwen_vl"
    x = batch(family)
    if "mm_token_type_ids" not in x:  # Qwen2.5-Omni's processor returns none; the error says what to add
        with pytest.raises(ValueError, match=r"needs mm_token_type_ids.*\(ids == image_token_id\)"):
            list(adapter.split(x, 1))
        assert len(list(adapter.split(x, 3))) == 1  # the whole batch needs no types
        x["mm_token_type_ids"] = (x["input_ids"] == IMG).int() + 2 * (x["input_ids"] == VID).int()
    parts = list(adapter.split(x, 1))
    for part, solo in zip(parts, alone(family), strict=True):
        n = int(part["attention_mask"].sum())
        assert torch.equal(part["input_ids"][:, -n:], solo["input_ids"])
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                    "video_second_per_grid"):
            assert (key in solo) == (part.get(key) is not None and len(part[key]) > 0), key
            if key in solo:
                assert torch.equal(part[key], solo[key]), key
    if not family.endswith("/video"):
        grid = adapter.grid(make(family), parts[1])
        assert (grid.rows, grid.cols, grid.patch) == (4, 6, (8, 8))


@pytest.mark.parametrize("family", FAMILIES)
def test_pool_averages_windows_at_their_top_left_token(family):
    """pool_size=3 on an 8x12 patch grid (4x6 merged tokens): 2x2 windows of up to 3x3
    tokens (ragged at the bottom), each one the mean of its window's merged features."""
    model = make(family)
    x = inputs([[2, ("image", (1, 8, 12)), 2]], family=family)
    with torch.no_grad():
        feats = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output[0]
    saint.patch(model, method="pool", pool_size=3)
    with torch.no_grad():
        pooled = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output[0]
        model(**x)
    grid = feats.view(4, 6, -1)
    keep = pooled._saint_keep
    assert keep.nonzero().squeeze(1).tolist() == [0, 3, 18, 21]
    expect = torch.stack([grid[:3, :3].mean((0, 1)), grid[:3, 3:].mean((0, 1)), grid[3:, :3].mean((0, 1)),
                          grid[3:, 3:].mean((0, 1))])
    torch.testing.assert_close(pooled[keep], expect)
    assert get_handle(model).image_stats().tokens[1] == [4]


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_loss_counts_only_targets_with_a_prediction(family):
    """A plain forward with labels prunes as generate does: logits keep the input's
    length (NaN where a token was dropped, on either side) and the loss is the model's
    own loss over the targets whose predicting position survived."""
    model = make(family)
    x = batch(family)
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    saint.patch(model, **CONFIGS["vit" if family in VISION_ONLY else "hybrid"])
    with torch.no_grad():
        out = model(**x, labels=labels)
    assert out.logits.shape[:2] == x["input_ids"].shape
    dropped = out.logits.isnan().any(-1)
    assert bool(dropped.any()) and not bool(dropped[:, -1].any())
    assert bool(torch.isin(x["input_ids"][dropped], torch.tensor([IMG, VID])).all())
    target = labels[:, 1:].masked_fill(dropped[:, :-1], -100)
    pred = out.logits[:, :-1].nan_to_num()
    expect = torch.nn.functional.cross_entropy(pred.reshape(-1, 128), target.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expect)
    assert torch.equal(labels, x["input_ids"].masked_fill(x["attention_mask"] == 0, -100))
    torch.testing.assert_close(out.logits[:, -1], logits(model, x)[:, -1])


@pytest.mark.parametrize("family", VISION_ONLY)
@pytest.mark.parametrize("name", LLM_SIDE)
def test_qwen3_5_language_model_pruning_is_refused(family, name):
    """Qwen3.5's linear-attention layers carry a recurrent state, not a cache of tokens, so
    no token can leave between them: SAINT's llm/hybrid modes and FastV are refused with the
    methods that work, and the model is left unpatched."""
    model = make(family)
    with pytest.raises(TypeError, match=r"linear-attention layers keep a recurrent state.*mode='vit'"):
        saint.patch(model, **CONFIGS[name])
    assert not saint.is_patched(model)


# ---------------------------------------------------------------------------- threads, copies
def test_calls_from_two_threads_wait_for_each_other():
    """One patched Qwen2.5-VL shared by two threads: every call gets its own answer."""
    from .conftest import assert_two_threads_agree

    model = saint.patch(make("qwen2_5_vl"), "saint", **CONFIGS["hybrid"])
    prompts = alone("qwen2_5_vl")
    calls = [(prompts[i % 3],) for i in range(6)]
    assert_two_threads_agree(lambda x: logits(model, x)[:, -1], calls)


def test_copying_or_pickling_a_patched_qwen_vl_says_unpatch_first():
    import copy
    import io

    model = saint.patch(make("qwen2_5_vl"), "saint", **CONFIGS["hybrid"])
    with pytest.raises(TypeError, match="unpatch first"):
        copy.deepcopy(model)
    with pytest.raises(TypeError, match="unpatch first"):
        torch.save(model, io.BytesIO())
    saint.unpatch(model)
    assert not saint.is_patched(copy.deepcopy(model))


def test_qwen2_vl_tower_equals_its_later_blocks_run_on_the_kept_groups():
    """A reference built from the unpatched tower's own modules: its hidden states after
    block vit_layer, cut to the kept groups (with their rotary rows), through the later
    blocks with each image's kept span as its attention segment, then the merger. The
    patched tower's merged tokens equal it at the kept groups and are NaN at the others
    (Qwen2-VL has no window order, so the segments are whole images)."""
    model = make("qwen2_vl")
    tower = model.model.visual
    x = inputs([[2, ("image", (1, 8, 12)), 2, ("image", (1, 4, 8)), 1]], family="qwen2_vl")
    px, grid = x["pixel_values"], x["image_grid_thw"]
    grab = {}
    hooks = [tower.blocks[1].register_forward_hook(lambda m, a, o: grab.update(hidden=o)),
             tower.blocks[0].register_forward_pre_hook(lambda m, a, kw: grab.update(pos=kw["position_embeddings"]),
                                                       with_kwargs=True)]
    with torch.no_grad():
        tower(px, grid_thw=grid)
    for h in hooks:
        h.remove()
    saint.patch(model, mode="vit", vit_layer=1, vit_ratio=0.4)
    with torch.no_grad():
        got = torch.cat(model.model.get_image_features(px, image_grid_thw=grid).pooler_output)
    keep = get_handle(model).tower.keep_raster
    assert 0 < int(keep.sum()) < len(keep)
    keep_tok = keep.repeat_interleave(4)
    per_image = [int(keep[a:b].sum()) * 4 for a, b in zip([0, 24], [24, 32], strict=True)]
    cu = torch.tensor([0, per_image[0], sum(per_image)], dtype=torch.int32)
    h = grab["hidden"][keep_tok]
    pos = tuple(p[keep_tok] for p in grab["pos"])
    saint.unpatch(model)
    with torch.no_grad():
        for blk in tower.blocks[2:]:
            h = blk(h, cu_seqlens=cu, max_seqlen=max(per_image), position_embeddings=pos)
        want = tower.merger(h)
    torch.testing.assert_close(got[keep], want, rtol=0, atol=1e-5)
    assert bool(got[~keep].isnan().all())


def test_split_gives_each_prompt_its_videos_seconds_per_grid():
    """Qwen2.5-VL's second_per_grid_ts has one entry per video: a split prompt takes its own
    videos' entries (it took the whole batch's, so a later prompt's video read the first's)."""
    adapter = saint.adapters.find_adapter(make("qwen2_5_vl"))
    rows = [[1, ("video", (2, 8, 8)), 2], [2, ("image", (1, 8, 8)), 1], [1, ("video", (1, 4, 8)), 3]]
    x = dict(inputs(rows), second_per_grid_ts=torch.tensor([0.5, 2.0]))
    parts = list(adapter.split(x, 1))
    assert [p["second_per_grid_ts"].tolist() for p in parts] == [[0.5], [], [2.0]]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_image_features_called_directly_show_dropped_groups_as_nan(family):
    """``get_image_features`` of a ``vit``-patched model, called directly: one row per
    merge group, NaN at the groups the tower dropped (they were exact zeros, which read as
    features), 0 while autograd records; the kept rows are the ones the prompt gets."""
    from saint.adapters.qwen_vl import KEEP_ATTR

    x = inputs([[3, ("image", (1, 8, 8)), 4]], family=family)
    model = make(family)
    saint.patch(model, mode="vit", vit_layer=1, vit_ratio=0.5)
    call = dict(pixel_values=x["pixel_values"], image_grid_thw=x["image_grid_thw"])
    with torch.no_grad():
        (feats,) = model.get_image_features(**call).pooler_output
    keep = getattr(feats, KEEP_ATTR)
    assert 0 < int(keep.sum()) < len(keep)
    assert bool(feats[~keep].isnan().all()) and bool(torch.isfinite(feats[keep]).all())
    (graded,) = model.get_image_features(**call).pooler_output
    assert bool((graded[~keep] == 0).all()) and torch.allclose(graded[keep], feats[keep])

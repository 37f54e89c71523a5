"""InternVL (SAINT's llm, vit and hybrid modes, FastV), Mistral 3 and Gemma 3 (inside
their language model only: llm mode, FastV): exactness on tiny random models
(tests/llm_side_tiny.py), batches of prompts with several images of different sizes, and
the refusals."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .llm_side_tiny import (  # noqa: E402
    BREAK,
    DEPTH,
    END,
    IMG,
    START,
    VDEPTH,
    VID,
    WINDOW,
    inputs,
    make,
    perception_inputs,
)

FAMILIES = ["internvl", "mistral3", "gemma3", "idefics3", "smolvlm", "paligemma", "paligemma2", "fast_vlm",
            "perception_lm", "aya_vision", "cohere2_vision", "ovis2", "lighton_ocr", "deepseek_vl", "deepseek_vl_hybrid",
            "janus", "gemma4", "paddleocr_vl", "ministral3", "idefics2", "vipllava", "video_llava"]
ROWS = {  # three prompts: one image; two images (Mistral 3: of other sizes); text first
    "internvl": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "mistral3": [[3, (64, 64), 4], [2, (32, 64), 3, (64, 32), 2], [5, (64, 64), 1]],
    "gemma3": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "idefics3": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "smolvlm": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "paligemma": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "paligemma2": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "fast_vlm": [[3, (128, 128), 4], [2, (128, 128), 3, (128, 128), 2], [5, (128, 128), 1]],
    "perception_lm": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "aya_vision": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "cohere2_vision": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "ovis2": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "lighton_ocr": [[3, (64, 64), 4], [2, (32, 64), 3, (64, 32), 2], [5, (64, 64), 1]],
    "deepseek_vl": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "deepseek_vl_hybrid": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "janus": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "gemma4": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "paddleocr_vl": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "ministral3": [[3, (64, 64), 4], [2, (32, 64), 3, (64, 32), 2], [5, (64, 64), 1]],
    "idefics2": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "vipllava": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "video_llava": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
}
CONFIGS = {
    "llm": dict(mode="llm", llm_layers=(0, 3), llm_tau=0.3, llm_k=1),
    "fastv": dict(method="fastv", fastv_layer=2, fastv_ratio=0.5),
    "vit": dict(mode="vit", vit_layer=1, vit_ratio=0.4),  # InternVL and Gemma 3
    "hybrid": dict(mode="hybrid", vit_layer=1, vit_ratio=0.5, llm_layers=(0, 3), llm_tau=0.3, llm_k=1),
    "random": dict(method="random", keep_ratio=0.25),  # InternVL and Gemma 3
}
NOTHING = {
    "llm": dict(mode="llm", llm_layers=(0, DEPTH - 2), llm_tau=0.3, llm_k=1000),
    "fastv": dict(method="fastv", fastv_layer=1, fastv_ratio=0.0),
    "vit": dict(mode="vit", vit_layer=1, vit_ratio=1.0),
    "random": dict(method="random", keep_ratio=1.0),
}
VISION_SIDE = {"vit", "hybrid", "random"}
POOLED = ("internvl", "gemma3", "idefics3", "smolvlm", "paligemma", "paligemma2", "aya_vision",
          "cohere2_vision", "ovis2", "deepseek_vl", "janus")  # with vision-side modes
ONE_PATCH = ("paligemma", "paligemma2", "deepseek_vl", "janus")  # every patch one token: groups of one patch
SOFTCAPPED = ("paligemma2",)  # attention logits capped: FastV refused


def _runs(family: str, name: str) -> bool:
    return (family in POOLED or name not in VISION_SIDE) and not (family in SOFTCAPPED and name == "fastv")


CASES = [(f, n) for f in FAMILIES for n in sorted(CONFIGS) if _runs(f, n)]
NOTHING_CASES = [(f, n) for f in FAMILIES for n in sorted(NOTHING) if _runs(f, n)]
GREEDY = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMG])  # a generated image token is text


def gen(model, x, **kw):
    with torch.no_grad():
        return model.generate(**x, **{**GREEDY, **kw})[:, -GREEDY["max_new_tokens"]:]


def alone(family: str) -> list[dict[str, torch.Tensor]]:
    return [inputs(family, [r], [i]) for i, r in enumerate(ROWS[family])]


@pytest.mark.parametrize("family, name", NOTHING_CASES)
def test_pruning_nothing_is_identical_to_unpatched(family, name):
    model = make(family)
    x = inputs(family, ROWS[family])
    with torch.no_grad():
        want = model(**x).logits
    want_ids = gen(model, x)
    saint.patch(model, **NOTHING[name])
    with torch.no_grad():
        assert torch.equal(model(**x).logits, want)
    assert torch.equal(gen(model, x), want_ids)
    saint.unpatch(model)


@pytest.mark.parametrize("family, name", CASES)
def test_batch_equals_alone_and_only_image_tokens_are_dropped(family, name):
    """Left-padded prompts with one or two images: each row's generation and last logits
    equal the prompt alone; cached equals uncached (SAINT; FastV's ranking query changes
    with every uncached step); dropped positions are image tokens only (never InternVL's
    <img>/</img>, Pixtral's row breaks or image end, or text); unpatch restores the model."""
    model = make(family)
    x = inputs(family, ROWS[family])
    with torch.no_grad():
        want = model(**x).logits
    saint.patch(model, **CONFIGS[name])
    with torch.no_grad():
        logits = model(**x).logits
    dropped = logits.isnan().any(-1)
    assert dropped.any() and bool((x["input_ids"][dropped] == IMG).all())
    if name in VISION_SIDE:  # vit_ratio (random: keep_ratio) of each tile's 16 tokens reach the language model
        tiles = (x["input_ids"] == IMG).sum(dim=1) // 16
        ratio = CONFIGS[name].get("vit_ratio", CONFIGS[name].get("keep_ratio"))
        assert saint.stats(model).tokens[0] == (tiles * round(16 * ratio)).tolist()
    assert not dropped[torch.isin(x["input_ids"], torch.tensor([START, END, BREAK]))].any()
    batch_ids = gen(model, x)
    solo = alone(family)
    assert torch.equal(batch_ids, torch.cat([gen(model, s) for s in solo]))
    with torch.no_grad():
        solo_last = torch.cat([model(**s).logits[:, -1] for s in solo])
    torch.testing.assert_close(logits[:, -1], solo_last, rtol=1e-4, atol=1e-5)
    if name != "fastv":
        assert torch.equal(gen(model, x, use_cache=False), batch_ids)
        assert torch.equal(gen(model, x, num_beams=2), torch.cat([gen(model, s, num_beams=2) for s in solo]))
    saint.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, want)


@pytest.mark.parametrize("family", ["perception_lm", "video_llava"])
def test_a_videos_frame_tokens_are_pruned_as_an_images(family):
    """PerceptionLM's and Video-LLaVA's video tokens are visual tokens: pruning nothing equals
    the unpatched model; SAINT drops image and video tokens only, counts both, and a batch of
    video, image-and-video and image prompts generates as each prompt alone."""
    rows = [[3, ("video", 2), 4], [2, (64, 64), 3, ("video", 2), 2], [5, (64, 64), 1]]
    model = make(family)
    x = perception_inputs(rows, family=family)
    visual = torch.isin(x["input_ids"], torch.tensor([IMG, VID]))
    with torch.no_grad():
        want = model(**x).logits
    want_ids = gen(model, x)
    saint.patch(model, **NOTHING["llm"])
    with torch.no_grad():
        assert torch.equal(model(**x).logits, want)
    assert torch.equal(gen(model, x), want_ids)
    saint.patch(model, **CONFIGS["llm"])
    with torch.no_grad():
        dropped = model(**x).logits.isnan().any(-1)
    assert dropped[x["input_ids"] == VID].any() and bool(visual[dropped].all())
    assert saint.stats(model).tokens[0] == visual.sum(dim=1).tolist()
    solo = [perception_inputs([r], [i], family=family) for i, r in enumerate(rows)]
    assert torch.equal(gen(model, x), torch.cat([gen(model, s) for s in solo]))
    saint.unpatch(model)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in SOFTCAPPED])
def test_fastv_drops_the_least_attended_image_tokens(family):
    """FastV's ranking equals the last token's attention read from an eager run."""
    model = make(family, impl="eager")
    x = inputs(family, ROWS[family][:1])
    with torch.no_grad():
        att = model(**x, output_attentions=True).attentions[1]
    scores = att[0, :, -1].mean(dim=0)
    span = (x["input_ids"][0] == IMG).nonzero().squeeze(1)
    order = span[torch.argsort(scores[span], stable=True)]
    dropped = order[: len(span) - len(span) // 2]
    saint.patch(model, method="fastv", fastv_layer=2, fastv_ratio=0.5)
    with torch.no_grad():
        logits = model(**x).logits
    gone = logits[0].isnan().any(-1).nonzero().squeeze(1)
    assert torch.equal(gone, dropped.sort().values)


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_count_each_prompts_image_tokens(family):
    model = saint.patch(make(family), **CONFIGS["llm"])
    x = inputs(family, ROWS[family])
    with torch.no_grad():
        model(**x)
    tokens = saint.stats(model).tokens
    assert tokens[0] == (x["input_ids"] == IMG).sum(dim=1).tolist()
    assert all(a >= b for a, b in zip(tokens[0], tokens[4], strict=True)) and tokens[4] != tokens[0]
    assert get_handle(model).kept_input.shape == x["input_ids"].shape


@pytest.mark.parametrize("family", FAMILIES)
def test_assisted_generation_equals_greedy(family):
    model = make(family)
    x = inputs(family, ROWS[family][:1])
    ids = x["input_ids"]
    x["input_ids"] = torch.cat([ids, ids[:, -4:], ids[:, -4:]], dim=1)  # text the lookup finds again
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    for key in ("token_type_ids", "mm_token_type_ids"):  # Gemma 3, PaliGemma; Gemma 4, PaddleOCR-VL: one per token
        if key in x:
            x[key] = torch.cat([x[key], x[key][:, -4:], x[key][:, -4:]], dim=1)
    saint.patch(model, **CONFIGS["llm"])
    assert torch.equal(gen(model, x, prompt_lookup_num_tokens=3), gen(model, x))
    if family in SOFTCAPPED:  # no FastV here (its refusal: the last test)
        return
    saint.patch(model, **CONFIGS["fastv"])
    with torch.no_grad(), pytest.raises(ValueError, match="FastV ranks the image tokens"):
        model.generate(**x, prompt_lookup_num_tokens=3, **GREEDY)


@pytest.mark.parametrize("family, kw, err, match", [
    ("mistral3", dict(mode="vit"), ValueError, "inside the language model only"),
    ("mistral3", dict(mode="hybrid"), ValueError, "inside the language model only"),
    ("mistral3", dict(method="random", keep_ratio=0.5), ValueError, "unknown Mistral 3 method 'random'"),
    ("lighton_ocr", dict(mode="vit"), ValueError, "LightOnOCR inside the language model only"),
    ("deepseek_vl_hybrid", dict(mode="vit"), ValueError, "DeepSeek-VL-Hybrid inside the language model only"),
    ("deepseek_vl_hybrid", dict(mode="hybrid"), ValueError, "SAM tower"),
    ("deepseek_vl", dict(method="pool", pool_size=2), ValueError, "unknown DeepSeek-VL method 'pool'"),
    ("janus", dict(mode="vit", vit_layer=VDEPTH - 1), ValueError, "vit_layer must be <= 2"),
    ("gemma4", dict(mode="hybrid"), ValueError, "Gemma 4 inside the language model only"),
    ("paddleocr_vl", dict(mode="vit"), ValueError, "PaddleOCR-VL inside the language model only"),
    ("idefics2", dict(mode="hybrid"), ValueError, "Idefics2 inside the language model only"),
    ("vipllava", dict(mode="vit"), ValueError, "VipLLaVA inside the language model only"),
    ("video_llava", dict(mode="hybrid"), ValueError, "Video-LLaVA inside the language model only"),
    ("gemma3", dict(mode="vit", vit_layer=VDEPTH - 1), ValueError, "vit_layer must be <= 2"),
    ("gemma3", dict(method="fastv", vit_ratio=0.5), TypeError, "does not use"),
    ("gemma3", dict(method="random", keep_ratio=1.5), ValueError, "keep_ratio"),
    ("gemma3", dict(method="pool", pool_size=2), ValueError, "unknown Gemma 3 method 'pool'"),
    ("internvl", dict(method="pool", pool_size=2), ValueError, "unknown InternVL method 'pool'"),
    ("internvl", dict(mode="llm", llm_layers=(0, DEPTH - 1)), ValueError, "end must be <= 4"),
    ("internvl", dict(mode="llm", vit_keep=4), TypeError, "does not take"),
    ("internvl", dict(mode="vit", vit_layer=VDEPTH - 1), ValueError, "vit_layer must be <= 2"),
    ("internvl", dict(mode="vit", vit_ratio=0.0), ValueError, "vit_ratio=0.0 must be a fraction"),
    ("internvl", dict(mode="llm", vit_ratio=0.5), TypeError, "does not use"),
    ("internvl", dict(method="random"), ValueError, "needs keep_ratio"),
    ("internvl", dict(method="random", keep_ratio=0.5, vit_ratio=0.5), TypeError, "does not use"),
])
def test_bad_settings_raise_clear_errors(family, kw, err, match):
    model = make(family)
    with pytest.raises(err, match=match):
        saint.patch(model, **kw)
    assert not saint.is_patched(model)


def test_mistral3_has_no_one_patch_grid_and_the_others_a_4x4_one():
    from saint.adapters import find_adapter

    for family in ("mistral3", "lighton_ocr", "gemma4", "paddleocr_vl", "idefics2", "video_llava"):
        model = make(family)
        with pytest.raises(ValueError, match="no one patch grid"):
            find_adapter(model).grid(model)
    for family in ("internvl", "gemma3", "paligemma", "deepseek_vl", "deepseek_vl_hybrid", "janus",
                   "vipllava"):  # 4x4 over 64 px
        other = make(family)
        grid = find_adapter(other).grid(other)
        assert (grid.rows, grid.cols, grid.patch) == (4, 4, (16, 16))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_conversation_continues_on_its_cache_and_chunked_prefill_runs_whole(family):
    """SAINT keeps layer 0 whole, so a conversation continued on the returned cache equals
    it run from scratch; a prompt that fits one prefill chunk runs as one prefill, a longer
    one is refused (saint prunes image tokens within one forward)."""
    model = saint.patch(make(family), **CONFIGS["llm"])
    x = inputs(family, ROWS[family][:1])
    follow = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(5))
    media = {k: v for k, v in x.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = model.generate(**x, **GREEDY, return_dict_in_generate=True)
        conversation = torch.cat([out.sequences, follow], dim=1)
        cached = model.generate(input_ids=conversation, past_key_values=out.past_key_values, **GREEDY)
        if "mm_token_type_ids" in media:  # PaddleOCR-VL: one per token of the whole conversation (0: text)
            types = media["mm_token_type_ids"]
            media["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, conversation.shape[1] - types.shape[1])],
                                                   dim=1)
        scratch = model.generate(input_ids=conversation, **media, **GREEDY)
        assert torch.equal(cached, scratch)
        length = x["input_ids"].shape[1]
        assert torch.equal(model.generate(**x, **GREEDY, prefill_chunk_size=length), out.sequences)
        with pytest.raises(ValueError, match=f"prefill_chunk_size={length - 1} splits this {length}-token prompt"):
            model.generate(**x, **GREEDY, prefill_chunk_size=length - 1)


def tower_parts(family: str, tower) -> tuple:
    """The tower's encoder layers, its final norm, its prefix tokens and the attention
    attribute of a layer."""
    if family == "internvl":
        return tower.encoder.layer, tower.layernorm, 1, "attention"
    if family == "aya_vision":  # reads the last layer's output (hidden_states[-1]), not the final norm's
        return tower.encoder.layers, torch.nn.Identity(), 0, "self_attn"
    if family == "ovis2":
        return tower.transformer.encoder.layers, tower.transformer.rms_norm, 0, "attention"
    return tower.encoder.layers, tower.post_layernorm, 0, "self_attn"


def tower_of(family: str, mm):
    return mm.vision_model if family in ("idefics3", "smolvlm", "deepseek_vl", "janus") else mm.vision_tower


def unit_pixels(x: dict) -> torch.Tensor:
    """Every unit's pixels ``[units, 3, h, w]`` (Idefics3 / SmolVLM: the rows' images without
    the all-zero padding images)."""
    px = x["pixel_values"]
    if px.dim() == 4:
        return px
    px = px.flatten(0, 1)
    return px[px.flatten(1).any(dim=1)]


def units(feats, per: int = 0) -> torch.Tensor:
    """Image features as ``[units, tokens, C]`` (Idefics3 / SmolVLM return each prompt's
    flattened: ``per`` tokens per unit)."""
    return torch.cat(list(feats)).unflatten(0, (-1, per)) if isinstance(feats, (list, tuple)) else feats


def ovis2_project(mm, full: torch.Tensor) -> torch.Tensor:
    """Ovis2's visual tokenizer on a tower output ``[units, 64, C]`` (8x8 patches): each 2x2 group's
    patches side by side, its head and softmax over the visual vocabulary, embedded by its table
    (the indicator columns zero)."""
    v = mm.vision_tower
    n, _, c = full.shape
    groups = full.view(n, 4, 2, 4, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, 16, 4 * c)
    prob = torch.softmax(v.head_norm(v.head_linear(groups)), dim=-1)
    prob = torch.cat([prob, prob.new_zeros(n, 16, v.num_visual_indicator_tokens)], dim=-1)
    return mm.visual_embeddings_table(prob)


@pytest.mark.parametrize("family", POOLED)
def test_vit_features_are_the_later_layers_run_on_the_kept_groups(family):
    """A reference from the unpatched model's own modules: the tower's hidden states after
    vit_layer cut to the prefix (InternVL's class token) and each unit's kept 2x2 groups
    (raster order; PaliGemma's groups are single patches), the later layers and the final
    norm (Aya Vision: none), scattered back to the grid (zeros elsewhere), then the model's
    pixel shuffle (InternVL) and projector (Gemma 3's pools, Aya Vision's shuffles);
    the patched features are its kept groups' tokens."""
    model = make(family)
    mm = model.model
    tower = tower_of(family, mm)
    layers, norm, prefix, _ = tower_parts(family, tower)
    x = inputs(family, ROWS[family][1:2])
    grab = {}
    hook = layers[1].register_forward_hook(lambda m, a, o: grab.update(hidden=o))
    with torch.no_grad():
        tower(pixel_values=unit_pixels(x))
    hook.remove()
    saint.patch(model, **CONFIGS["vit"])
    with torch.no_grad():
        got = units(mm.get_image_features(pixel_values=x["pixel_values"], return_dict=True).pooler_output,
                    round(0.4 * 16))
    keep = get_handle(model).tower.keep  # [units, 16 groups of the patch grid (8x8; PaliGemma: 4x4, one each)]
    saint.unpatch(model)
    n_units, groups = keep.shape
    assert got.shape[:2] == (n_units, round(0.4 * groups)) and not keep.all()
    g = 1 if family in ONE_PATCH else 2  # a group's side in patches
    patches = groups * g * g
    patch_keep = keep.view(n_units, 4, 1, 4, 1).expand(n_units, 4, g, 4, g).reshape(n_units, patches)
    with torch.no_grad():
        h = grab["hidden"]
        h = torch.stack([torch.cat([h[t, :prefix], h[t, prefix:][patch_keep[t]]]) for t in range(n_units)])
        for layer in layers[2:]:
            h = layer(h) if family == "internvl" else layer(h, attention_mask=None)
        h = norm(h)
        full = torch.zeros(n_units, patches, h.shape[-1])
        full[patch_keep] = h[:, prefix:].reshape(-1, h.shape[-1])
        if family == "internvl":
            full = mm.pixel_shuffle(full.view(n_units, 8, 8, -1), scale_factor=0.5).reshape(n_units, groups, -1)
        if family == "ovis2":
            project = lambda f: ovis2_project(mm, f)  # noqa: E731
        elif family in ("deepseek_vl", "janus"):
            project = mm.aligner
        else:
            project = mm.connector if family in ("idefics3", "smolvlm") else mm.multi_modal_projector
        want = project(full).reshape(n_units, groups, -1)[keep].view(n_units, -1, got.shape[-1])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", POOLED)
def test_vit_mode_equals_a_prompt_built_for_the_kept_count(family):
    """Shrinking each unit's run of tokens gives exactly what the unpatched model
    computes for a prompt with the kept count per unit and the pruned tower's features
    (Gemma 3: with the shrunk prompt's image flags, so kept image tokens see each other)."""
    from .conftest import left_pad

    model = make(family)
    x = inputs(family, ROWS[family])
    saint.patch(model, **CONFIGS["vit"])
    with torch.no_grad():
        out = model(**x).logits
        encoded = model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True)
    saint.unpatch(model)
    feats = encoded.pooler_output
    kept = units(feats, round(0.4 * 16)).shape[1]
    rows = []
    for ids, m in zip(x["input_ids"], x["attention_mask"], strict=True):
        ids = ids[m.bool()]
        img = (ids == IMG).nonzero().squeeze(1)
        drop = torch.zeros_like(ids, dtype=torch.bool)
        drop[img.view(-1, 16)[:, kept:].reshape(-1)] = True  # every tile's run shrinks to its kept count
        rows.append(ids[~drop])
    short, mask = left_pad(rows)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    types = {"gemma3": {"token_type_ids": (short == IMG).long()},
             "paligemma": {"token_type_ids": torch.zeros_like(short)},
             "paligemma2": {"token_type_ids": torch.zeros_like(short)}}.get(family, {})
    pos = pos + family.startswith("paligemma")  # PaliGemma numbers a prompt from 1
    with torch.no_grad():
        ref = model(input_ids=short, attention_mask=mask, position_ids=pos, **types,
                    mm_encoder_outputs={"image": encoded}).logits  # Ovis2: its indicator features too
    for b in range(len(rows)):
        real = ~out[b].isnan().any(-1) & x["attention_mask"][b].bool()
        torch.testing.assert_close(out[b][real], ref[b][mask[b].bool()], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", POOLED)
def test_vit_selection_is_the_budget_drop_on_group_keys(family):
    """The kept groups are exactly what fixed_budget_keep_mask picks on each 2x2 group's
    mean key (heads averaged; InternVL's after its k-norm) at vit_layer, read from the
    unpatched tower."""
    from saint.core import fixed_budget_keep_mask

    model = make(family)
    tower = tower_of(family, model.model)
    layers, _, prefix, attn_name = tower_parts(family, tower)
    x = inputs(family, ROWS[family][1:2])
    grab = {}
    attn = getattr(layers[1], attn_name)
    hook = attn.k_proj.register_forward_hook(lambda m, a, o: grab.update(k=o))
    with torch.no_grad():
        tower(pixel_values=unit_pixels(x))
    hook.remove()
    units = grab["k"].shape[0]
    k = attn.k_norm(grab["k"]) if family == "internvl" else grab["k"]
    g = 1 if family in ONE_PATCH else 2  # a group's side in patches (PaliGemma: single patches)
    keys = k[:, prefix:].view(units, 16 * g * g, attn.num_heads, -1).mean(dim=2)  # [units, patches, D]
    groups = keys.view(units, 4, g, 4, g, -1).mean(dim=(2, 4)).reshape(units, 16, -1)
    expect = fixed_budget_keep_mask(groups, round(0.4 * 16), 16)
    saint.patch(model, **CONFIGS["vit"])
    with torch.no_grad():
        model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True)
    assert torch.equal(get_handle(model).tower.keep, expect)


@pytest.mark.parametrize("family", POOLED)
def test_random_keeps_the_same_seeded_positions_of_every_unit(family):
    """``random`` takes the unpatched projector's tokens at one seeded subset of positions,
    the same in every tile or image (so an image's result never depends on its batch)."""
    model = make(family)
    x = inputs(family, ROWS[family][1:2], [1])  # no flat half: every token differs
    with torch.no_grad():
        full = units(model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True).pooler_output, 16)
    saint.patch(model, method="random", keep_ratio=0.25, seed=3)
    with torch.no_grad():
        got = units(model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True).pooler_output, 4)
    tiles, n, c = full.shape
    assert got.shape == (tiles, 4, c)
    picked = [[int((full[t] == row).all(-1).nonzero()) for row in got[t]] for t in range(tiles)]
    assert all(p == picked[0] for p in picked) and picked[0] == sorted(picked[0])
    saint.patch(model, method="random", keep_ratio=0.25, seed=4)
    with torch.no_grad():
        other = units(model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True).pooler_output, 4)
    assert not torch.equal(other, got)


def test_gemma3_kept_tokens_see_each_other_as_unpruned_and_the_window_spans_positions():
    """Gemma 3 after pruning: in the prefill, each kept token sees exactly the kept tokens
    it saw unpruned (its image's tokens both ways, a sliding window of WINDOW positions in
    the local layers); in every decoding step past the window, the local layers see the
    kept keys within WINDOW positions and the global layer sees all of them."""
    model = make("gemma3")
    x = inputs("gemma3", ROWS["gemma3"][1:2])
    layers = model.model.language_model.layers
    masks: dict[int, list[torch.Tensor]] = {4: [], 5: []}  # a local and the global layer after the last pruning

    def record(i):
        return layers[i].self_attn.register_forward_pre_hook(
            lambda m, a, kw: masks[i].append(kw["attention_mask"]), with_kwargs=True)  # None: sees every key

    hooks = [record(i) for i in masks]
    with torch.no_grad():
        model(**x)
    unpruned = {i: m.pop()[0, 0] for i, m in masks.items()}
    saint.patch(model, mode="llm", llm_layers=(0, 1), llm_tau=0.3, llm_k=1)  # 8 of 32 image tokens stay
    with torch.no_grad():
        model.generate(**x, max_new_tokens=WINDOW + 2, do_sample=False)
    for h in hooks:
        h.remove()
    length = x["input_ids"].shape[1]
    pos = get_handle(model).kept_input[0].nonzero().squeeze(1)
    assert len(pos) < length
    for i, seen in masks.items():
        prefill = seen[0][0, 0]
        assert torch.equal(prefill, unpruned[i][pos][:, pos]), f"layer {i}"
        ahead = prefill & (pos[None, :] > pos[:, None])
        assert ahead.any()  # image tokens see later tokens of their image
        for step, mask in enumerate(seen[1:], start=1):
            q = length + step - 1
            k = torch.cat([pos, torch.arange(length, length + step)])
            want = (k <= q) & ((q - k < WINDOW) if i == 4 else True)
            got = torch.ones_like(want) if mask is None else mask[0, 0, 0]
            assert torch.equal(got, want), f"layer {i}, step {step}"
    assert not masks[4][-1][0, 0, 0, : len(pos)].any()  # the window has left the prompt behind


def test_aya_vision_vit_mode_needs_the_last_tower_layer():
    """Aya Vision's vit mode scatters the tower's last layer back to the grid: a checkpoint
    reading an earlier layer is refused there and runs in llm mode."""
    model = make("aya_vision")
    model.config.vision_feature_layer = model.model.config.vision_feature_layer = -2
    with pytest.raises(ValueError, match=r"vision_feature_layer=-2: saint's vit mode reads the tower's last layer"):
        saint.patch(model, **CONFIGS["vit"])
    assert not saint.is_patched(model)
    saint.patch(model, **CONFIGS["llm"])
    with torch.no_grad():
        assert model(**inputs("aya_vision", ROWS["aya_vision"])).logits.isnan().any()  # image tokens dropped


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_padded_tiles_are_refused_by_the_vision_side_and_run_in_llm_mode(family):
    """A tile with masked (padded) patches: the tower would hand its later layers a mask
    over every patch, so the vit mode refuses it with what to do; llm mode runs it."""
    model = make(family)
    x = inputs(family, ROWS[family][:1])
    mask = torch.ones(*x["pixel_values"].shape[:2], 64, 64, dtype=torch.bool)
    mask[0, 0, :, 40:] = False  # the right part of the image is padding
    x["pixel_attention_mask"] = mask
    saint.patch(model, **CONFIGS["vit"])
    with torch.no_grad(), pytest.raises(ValueError, match="masks patches inside the vision tower"):
        model(**x)
    saint.patch(model, **CONFIGS["llm"])
    with torch.no_grad():
        assert model(**x).logits.isnan().any()


def test_fastv_is_refused_on_a_decoder_that_caps_its_attention_logits():
    """FastV ranks by the last query's attention, which saint computes without a softcap:
    a decoder with ``attn_logit_softcapping`` is refused for FastV (SAINT reads keys only)."""
    for model in (make("paligemma2"), make("gemma3")):
        model.model.language_model.config.attn_logit_softcapping = 50.0  # PaliGemma 2's own: 50
        with pytest.raises(ValueError, match="caps its attention logits"):
            saint.patch(model, **CONFIGS["fastv"])
        assert not saint.is_patched(model)
        saint.patch(model, **CONFIGS["llm"])
        assert saint.is_patched(model)


def test_gemma4_kv_shared_layers_see_the_tokens_they_reuse():
    """Gemma 4 E2B / E4B's last layers reuse the keys and values layers 2 and 3 store (here:
    layers 4 and 5 of 6). Dropping tokens after a storing layer is refused; before them: the
    batch equals each prompt alone, cached equals uncached, and in generate's prefill, where
    the shared layers run on the last token only, its logits equal the full forward's."""
    model = make("gemma4_shared")
    with pytest.raises(ValueError, match=r"after decoder layer 2, but layers 4..5 reuse the keys and values of "
                                         r"layers \[2, 3\].*llm_layers=\(start, 1\)"):
        saint.patch(model, mode="llm", llm_layers=(0, 3), llm_tau=0.3, llm_k=1)
    with pytest.raises(ValueError, match="after decoder layer 2"):
        saint.patch(model, method="fastv", fastv_layer=3, fastv_ratio=0.5)
    assert not saint.is_patched(model)
    x = inputs("gemma4_shared", ROWS["gemma4"])
    with torch.no_grad():
        want = model(**x).logits
    saint.patch(model, mode="llm", llm_layers=(0, 1), llm_tau=0.3, llm_k=1000)  # keeps every token
    with torch.no_grad():
        assert torch.equal(model(**x).logits, want)
    for settings in (dict(mode="llm", llm_layers=(0, 1), llm_tau=0.3, llm_k=1),
                     dict(method="fastv", fastv_layer=1, fastv_ratio=0.5)):
        saint.patch(model, **settings)
        with torch.no_grad():
            full = model(**x).logits[:, -1]
            out = model.generate(**x, **GREEDY, output_logits=True, return_dict_in_generate=True)
            uncached = gen(model, x, use_cache=False)
        tokens = saint.stats(model).tokens  # the tower, layers 0..5, the norm: no drop after layer 1
        assert tokens[3] == tokens[6] == tokens[7] != tokens[1]
        torch.testing.assert_close(out.logits[0], full, rtol=1e-4, atol=1e-5)
        new = out.sequences[:, -GREEDY["max_new_tokens"]:]
        assert torch.equal(new, uncached)
        for i, row in enumerate(ROWS["gemma4"]):
            assert torch.equal(gen(model, inputs("gemma4_shared", [row], [i]))[0], new[i])


def test_gemma4_image_tokens_attending_both_ways_are_pruned_as_any():
    """Gemma 4's image tokens attend to each other both ways with ``use_bidirectional_attention=
    "vision"`` (``mm_token_type_ids`` marks them): the masks it builds are gathered for the
    kept tokens like any. Nothing pruned equals the
    unpatched model, which differs from a causal run (so the test sees the two-way masks);
    pruned, the batch equals each prompt alone and cached equals uncached."""
    model = make("gemma4_bidi")
    x = inputs("gemma4_bidi", ROWS["gemma4"])
    causal = {k: v for k, v in x.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        want = model(**x).logits
        assert not torch.allclose(want, model(**causal).logits)
    saint.patch(model, **NOTHING["llm"])
    with torch.no_grad():
        assert torch.equal(model(**x).logits, want)
    saint.patch(model, **CONFIGS["llm"])
    new = gen(model, x)
    assert torch.equal(new, gen(model, x, use_cache=False))
    for i, row in enumerate(ROWS["gemma4"]):
        assert torch.equal(gen(model, inputs("gemma4_bidi", [row], [i]))[0], new[i])
    assert saint.stats(model).tokens[-1] != saint.stats(model).tokens[1]


def test_gemma4_prunes_a_videos_frame_tokens_as_an_images():
    """Gemma 4's video frames go through its tower as images (``pixel_values_videos``), each a run
    of video tokens: nothing pruned equals the unpatched model; pruned, only video tokens go."""
    model = make("gemma4")
    frames = inputs("gemma4", [[1, (64, 64), 1, (64, 64), 1]], [5])
    ids = torch.tensor([[7, 8, START, *[VID] * 16, END, 9, START, *[VID] * 16, END, 10, 11]])
    x = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=frames["pixel_values"],
             video_position_ids=frames["image_position_ids"], num_frames_per_video=torch.tensor([2]),
             mm_token_type_ids=(ids == VID).long() * 2)
    with torch.no_grad():
        want = model(**x).logits
    saint.patch(model, **NOTHING["llm"])
    with torch.no_grad():
        assert torch.equal(model(**x).logits, want)
    saint.patch(model, **CONFIGS["llm"])
    with torch.no_grad():
        gone = model(**x).logits[0].isnan().any(-1)
    assert gone.any() and bool((ids[0][gone] == VID).all())
    assert saint.stats(model).tokens[1] == [32]


def test_fastv_scales_ministral3s_last_query_by_its_position():
    """Ministral 3 multiplies each query by a factor of its absolute position (Llama 4's
    attention scale): FastV's ranking of the last query's attention applies it. With a scale
    large enough to reorder the tiny model's flat attention (34 at the prompt's last position:
    beta 10, from position 1 on) the ranking equals the eager attention's, which differs from
    the unscaled one's."""
    model = make("ministral3", impl="eager")
    x = inputs("ministral3", ROWS["ministral3"][:1])
    span = (x["input_ids"][0] == IMG).nonzero().squeeze(1)

    def dropped_by_eager_attention():
        with torch.no_grad():
            att = model(**x, output_attentions=True).attentions[1]
        scores = att[0, :, -1].mean(dim=0)
        order = span[torch.argsort(scores[span], stable=True)]
        return order[: len(span) - len(span) // 2].sort().values

    unscaled = dropped_by_eager_attention()
    model.config.text_config.rope_parameters.update(llama_4_scaling_beta=10.0, original_max_position_embeddings=1)
    want = dropped_by_eager_attention()
    assert not torch.equal(want, unscaled)  # the scale changes the ranking: the test sees it
    saint.patch(model, method="fastv", fastv_layer=2, fastv_ratio=0.5)
    with torch.no_grad():
        gone = model(**x).logits[0].isnan().any(-1).nonzero().squeeze(1)
    assert torch.equal(gone, want)

"""LFM2-VL (``Lfm2VlForConditionalGeneration``): SAINT's vit mode and the random baseline
inside its NaFlex SigLIP 2 tower, whose tiles each have their own patch grid, padded to the
longest and masked. Every tile keeps its own share of its 2x2 groups (the pixel unshuffle's
tokens) and its run of image tokens shrinks to them; the later tower layers run on the kept
patches with the tower's own mask for their padding. LFM2's short-convolution layers keep a
state, so nothing is dropped inside the language model (refused with the reason). Tiny random
models, exact references from the unpatched model's own modules."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402
from saint.core import fixed_budget_keep_mask  # noqa: E402

from .conftest import left_pad  # noqa: E402

IMG, START, END = 120, 121, 122
PATCH, MAX_PATCHES = 8, 64  # 8 px patches; a tile has at most 8x8 of them
VIT = dict(mode="vit", vit_layer=1, vit_ratio=0.5)
GREEDY = dict(max_new_tokens=4, do_sample=False)
ROWS = [[3, (4, 6), 4], [2, (8, 8), 3, (6, 4), 2], [5, (2, 8), 1]]  # text lengths and tiles' (rows, cols) of patches


def make(seed: int = 0, vocab_size: int = 128, image_token_id: int = IMG) -> torch.nn.Module:
    """A tiny random LFM2-VL: a 4-layer SigLIP 2 NaFlex tower, a 2x2 pixel unshuffle and a
    4-layer LFM2 with short-convolution layers 0 and 2 (``vocab_size`` and ``image_token_id``
    to match a tokenizer)."""
    torch.manual_seed(seed)
    vision = transformers.Siglip2VisionConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                              intermediate_size=64, patch_size=PATCH, num_patches=MAX_PATCHES,
                                              vision_use_head=False)
    text = transformers.Lfm2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                   max_position_embeddings=256,
                                   layer_types=["conv", "full_attention", "conv", "full_attention"])
    cfg = transformers.Lfm2VlConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                                    downsample_factor=2,
                                    projector_hidden_size=48)
    model = transformers.Lfm2VlForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def inputs(rows: list[list], seeds: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A left-padded batch as LFM2-VL's processor lays it out: each tile's patches in
    raster order, padded to ``MAX_PATCHES`` and masked, its grid in ``spatial_shapes`` and
    its run of ``rows/2 x cols/2`` image tokens between start and end tokens (even seeds: a
    redundant, half-flat tile)."""
    seeds = seeds or list(range(len(rows)))
    ids, pixels, masks, shapes = [], [], [], []
    for r, s in zip(rows, seeds, strict=True):
        g = torch.Generator().manual_seed(s)
        out: list[int] = []
        for j, p in enumerate(r):
            if isinstance(p, int):
                out += torch.randint(3, 100, (p,), generator=g).tolist()
                continue
            h, w = p
            tile = torch.zeros(MAX_PATCHES, 3 * PATCH * PATCH)
            tile[: h * w] = torch.randn(h * w, 3 * PATCH * PATCH, generator=torch.Generator().manual_seed(100 + 10 * s + j))
            if s % 2 == 0:
                tile[: h * w // 2] = 0.5
            mask = torch.zeros(MAX_PATCHES, dtype=torch.long)
            mask[: h * w] = 1
            pixels.append(tile)
            masks.append(mask)
            shapes.append([h, w])
            out += [START, *[IMG] * (h // 2 * (w // 2)), END]
        ids.append(torch.tensor(out))
    input_ids, attention_mask = left_pad(ids)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.stack(pixels),
                pixel_attention_mask=torch.stack(masks), spatial_shapes=torch.tensor(shapes))


def tiles(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: x[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}


def features(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.model.get_image_features(**tiles(x), return_dict=True).pooler_output)


def gen(model: torch.nn.Module, x: dict[str, torch.Tensor], **options) -> torch.Tensor:
    """Greedy new tokens (never the image token, which would be read as an image's)."""
    with torch.no_grad():
        out = model.generate(**x, **{**GREEDY, "suppress_tokens": [model.config.image_token_id], **options})
    return out[:, -GREEDY["max_new_tokens"]:]


def test_nothing_dropped_is_the_unpatched_model_bit_for_bit_and_unpatch_restores_it():
    model = make()
    x = inputs(ROWS)
    with torch.no_grad():
        want = model(**x).logits
    want_gen = gen(model, x)
    for settings in (dict(mode="vit", vit_layer=1, vit_ratio=1.0), dict(method="random", keep_ratio=1.0)):
        saint.patch(model, **settings)
        with torch.no_grad():
            assert torch.equal(model(**x).logits, want)
        assert torch.equal(gen(model, x), want_gen)
    saint.patch(model, **VIT)
    with torch.no_grad():
        assert not torch.equal(model(**x).logits.nan_to_num(), want)
    saint.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, want)


def test_selection_is_the_budget_drop_on_each_tiles_group_keys():
    """Each tile keeps round(0.5 x its groups) of its 2x2 groups: fixed_budget_keep_mask on
    the groups' mean keys (heads averaged) at vit_layer, read from the unpatched tower over
    that tile's real patches only."""
    model = make()
    x = inputs(ROWS)
    tower = model.model.vision_tower
    attn = tower.encoder.layers[1].self_attn
    grab = {}
    hook = attn.k_proj.register_forward_hook(lambda m, a, o: grab.update(k=o))
    with torch.no_grad():
        tower(**tiles(x))
    hook.remove()
    saint.patch(model, **VIT)
    features(model, x)
    keep = get_handle(model).tower.keep
    shapes = x["spatial_shapes"].tolist()
    assert len(keep) == len(shapes) == 4
    for i, (h, w) in enumerate(shapes):
        keys = grab["k"][i, : h * w].view(h * w, attn.num_heads, -1).mean(dim=1)
        groups = keys.view(h // 2, 2, w // 2, 2, -1).mean(dim=(1, 3)).reshape(1, h * w // 4, -1)
        budget = max(1, round(0.5 * h * w // 4))
        assert torch.equal(keep[i], fixed_budget_keep_mask(groups, budget, 16)[0])
        assert int(keep[i].sum()) == budget
    stats = get_handle(model).vision_stats()
    assert stats.tokens[0] == [h * w for h, w in shapes]
    assert stats.tokens[2] == [4 * max(1, round(0.5 * h * w // 4)) for h, w in shapes]


def test_vit_features_are_the_later_layers_run_on_each_tiles_kept_groups():
    """A reference from the unpatched model's own modules, tile by tile with no padding:
    the tower's hidden states after vit_layer cut to the tile's kept 2x2 groups (raster
    order), the later layers and the final norm, scattered back to the tile's grid; the
    model's own unshuffle and projector then give the tokens, of which the patched
    features are the kept groups'."""
    model = make()
    x = inputs(ROWS)
    tower = model.model.vision_tower
    grab = {}
    hook = tower.encoder.layers[1].register_forward_hook(lambda m, a, o: grab.update(hidden=o))
    with torch.no_grad():
        tower(**tiles(x))
    hook.remove()
    saint.patch(model, **VIT)
    got = features(model, x)
    keep = get_handle(model).tower.keep
    saint.unpatch(model)
    full = torch.zeros(len(keep), MAX_PATCHES, 32)
    with torch.no_grad():
        for i, (h, w) in enumerate(x["spatial_shapes"].tolist()):
            patches = keep[i].view(h // 2, 1, w // 2, 1).expand(h // 2, 2, w // 2, 2).reshape(h * w)
            hidden = grab["hidden"][i : i + 1, : h * w][:, patches]
            for layer in tower.encoder.layers[2:]:
                hidden = layer(hidden, None)
            full[i, : h * w][patches] = tower.post_layernorm(hidden)[0]
        hook = tower.register_forward_hook(lambda m, a, o: o.__setitem__("last_hidden_state", full))
        want = features(model, x)
        hook.remove()
    assert [g.shape[0] for g in got] == [int(k.sum()) for k in keep]
    for g, w, k in zip(got, want, keep, strict=True):
        torch.testing.assert_close(g, w[k], rtol=0, atol=1e-5)


def test_vit_mode_equals_a_prompt_built_for_the_kept_counts():
    """Each tile's run of image tokens shrinks to its kept count: the patched logits are the
    unpatched model's on a prompt built with those counts and the pruned tower's features."""
    model = make()
    x = inputs(ROWS)
    saint.patch(model, **VIT)
    with torch.no_grad():
        out = model(**x).logits
        encoded = model.model.get_image_features(**tiles(x), return_dict=True)
    saint.unpatch(model)
    kept = iter([int(f.shape[0]) for f in encoded.pooler_output])
    rows = []
    for ids, m in zip(x["input_ids"], x["attention_mask"], strict=True):
        ids = ids[m.bool()].tolist()
        short, i = [], 0
        while i < len(ids):
            if ids[i] != IMG:
                short.append(ids[i])
                i += 1
                continue
            run = next((j for j in range(i, len(ids)) if ids[j] != IMG), len(ids)) - i
            short += [IMG] * next(kept)
            i += run
        rows.append(torch.tensor(short))
    short, mask = left_pad(rows)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=short, attention_mask=mask, position_ids=pos, mm_encoder_outputs={"image": encoded}).logits
    for b in range(len(rows)):
        real = ~out[b].isnan().any(-1) & x["attention_mask"][b].bool()
        assert int(real.sum()) == len(rows[b]) < int(x["attention_mask"][b].sum())
        torch.testing.assert_close(out[b][real], ref[b][mask[b].bool()], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("settings", [VIT, dict(method="random", keep_ratio=0.25, seed=3)])
def test_each_prompt_generates_in_a_batch_what_it_generates_alone(settings):
    """A tile's kept groups and its features never depend on the other tiles of the batch
    (padded to the longest, masked as the tower masks padding)."""
    model = make()
    saint.patch(model, **settings)
    batched = gen(model, inputs(ROWS))
    for i, row in enumerate(ROWS):
        assert torch.equal(gen(model, inputs([row], [i]))[0], batched[i])


@pytest.mark.parametrize("settings", [VIT, dict(method="random", keep_ratio=0.25, seed=3)])
def test_beams_and_returned_sequences_repeat_each_prompts_tiles(settings):
    """generate repeats a prompt's features per beam (and per returned sequence) after they
    were made; each repeated tile shrinks from its own run of tokens (the planned counts were
    the unrepeated tiles': a ValueError). In a batch as alone."""
    model = make()
    saint.patch(model, **settings)
    for options in (dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)):
        batched = gen(model, inputs(ROWS), **options)
        per = batched.shape[0] // len(ROWS)
        for i, row in enumerate(ROWS):
            assert torch.equal(gen(model, inputs([row], [i]), **options), batched[i * per : (i + 1) * per])


def test_random_keeps_a_seeded_share_of_each_tiles_own_tokens():
    model = make()
    x = inputs(ROWS[1:2], [1])
    full = features(model, x)
    saint.patch(model, method="random", keep_ratio=0.25, seed=3)
    got = features(model, x)
    assert [g.shape[0] for g in got] == [max(1, round(0.25 * f.shape[0])) for f in full] == [4, 2]
    for g, f in zip(got, full, strict=True):
        picked = [int((f == row).all(-1).nonzero()) for row in g]
        assert picked == sorted(picked)


def test_language_model_pruning_and_no_grid_are_refused_with_the_reason():
    model = make()
    for mode in ("llm", "hybrid"):
        with pytest.raises(ValueError, match=f"mode='{mode}': .* vision side only .*short-convolution"):
            saint.patch(model, mode=mode, llm_layers=(0, 2))
    with pytest.raises(ValueError, match="unknown LFM2-VL method 'fastv'"):
        saint.patch(model, method="fastv", fastv_layer=1, fastv_ratio=0.5)
    from saint.adapters.hf_llm import check_decoder  # and the language model itself, whatever asks

    with pytest.raises(TypeError, match="short-convolution layers keep a recurrent state.*mode='vit' or method='random'"):
        check_decoder(model.model.language_model)
    saint.patch(model, vit_layer=1)  # SAINT's vit mode by default here
    assert get_handle(model).config.mode == "vit" and get_handle(model).tower is not None
    with pytest.raises(ValueError, match="own size: there is no one patch grid"):
        _grid(model)
    saint.patch(model, **VIT)
    x = inputs(ROWS[:1])
    x["spatial_shapes"] = torch.tensor([[3, 8]])  # 24 patches, but not whole 2x2 groups
    with pytest.raises(ValueError, match="not made of whole 2x2 groups"), torch.no_grad():
        model(**x)


def _grid(model: torch.nn.Module):
    from saint.adapters import find_adapter

    return find_adapter(model).grid(model)


def test_the_processors_tiles_and_thumbnail_shrink_image_by_image():
    """LFM2-VL's own processor (a tokenizer trained here, 64 px tiles of 8 px patches): a large
    image becomes tiles and a thumbnail, each a run of tokens between its row/column or
    thumbnail token, a small one a single tile at its own size. Each tile keeps half its
    groups, every prompt of a left-padded batch generates what it generates alone, and the
    tokens the language model receives are the kept ones."""
    import numpy as np
    from PIL import Image

    from .lmms_helpers import train_tokenizer

    cells = [f"<|img_row_{r}_col_{c}|>" for r in range(1, 5) for c in range(1, 5)]
    special = ["<pad>", "<|startoftext|>", "<|im_end|>", "<image>", "<|image_start|>", "<|image_end|>",
               "<|img_thumbnail|>", *cells]
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(special, ["user assistant"]), pad_token="<pad>", bos_token="<|startoftext|>",
        eos_token="<|im_end|>", extra_special_tokens={"image_token": "<image>"}, padding_side="left")
    images = transformers.Lfm2VlImageProcessor(tile_size=64, encoder_patch_size=PATCH, max_num_patches=MAX_PATCHES,
                                               min_image_tokens=4, max_image_tokens=16, min_tiles=2, max_tiles=4,
                                               use_thumbnail=True, size={"height": 64, "width": 64})
    processor = transformers.Lfm2VlProcessor(image_processor=images, tokenizer=tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    model = make(vocab_size=len(tokenizer), image_token_id=image_id)
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 56), (150, 100), (64, 64)]]
    texts, per_prompt = ["<image>what is this", "compare <image> and <image> please"], [[pics[0]], pics[1:]]
    x = processor(text=texts, images=per_prompt, return_tensors="pt", padding=True)
    shapes = x["spatial_shapes"].tolist()
    assert len(shapes) == 5 and len({tuple(s) for s in shapes}) > 1  # tiles and a thumbnail of their own sizes
    saint.patch(model, **VIT)
    batched = gen(model, dict(x))
    stats = get_handle(model).vision_stats()
    assert stats.tokens[-1] == [4 * max(1, round(0.5 * h * w // 4)) for h, w in shapes]
    kept = [max(1, round(0.5 * h * w // 4)) for h, w in shapes]  # each tile's groups, one token each
    assert saint.stats(model).tokens[0] == [kept[0], sum(kept[1:])]  # the image tokens each prompt hands the LM
    assert (x["input_ids"] == image_id).sum(dim=1).tolist() == [shapes[0][0] * shapes[0][1] // 4,
                                                                 sum(h * w // 4 for h, w in shapes[1:])]
    for i, (text, pic) in enumerate(zip(texts, per_prompt, strict=True)):
        alone = processor(text=[text], images=[pic], return_tensors="pt")
        assert torch.equal(gen(model, dict(alone))[0], batched[i])

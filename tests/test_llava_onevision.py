"""LLaVA-OneVision (anyres images): SAINT's llm mode and FastV inside the language model
on a tiny random model (SigLIP tower, Qwen2 decoder); the newline tokens between rows
of the crop grid are never dropped."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .conftest import left_pad  # noqa: E402

IMG = 120
DEPTH = 6
NEW = 4
GREEDY = dict(max_new_tokens=NEW, do_sample=False, suppress_tokens=[IMG])
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
# three prompts: a 30x60 image (2 crops + base); a 64x64 and a 32x32 image (several images
# per prompt: no anyres crops); a 64x64 image (4 crops + base)
ROWS = [[(3, 4), (30, 60)], [(2, 3), (64, 64), (32, 32)], [(1, 5), (64, 64)]]
LLM = dict(mode="llm", llm_layers=(1, 3), llm_tau=0.3, llm_k=2)
FASTV = dict(method="fastv", fastv_layer=2, fastv_ratio=0.5)


def make(seed: int = 0) -> torch.nn.Module:
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    text = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=DEPTH,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                    max_position_embeddings=1024)
    cfg = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=IMG,
                                            video_token_id=121, image_grid_pinpoints=PINPOINTS,
                                            vision_feature_select_strategy="full", vision_feature_layer=-1,
                                            attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def inputs(model, rows: list, seeds: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompts whose image-token runs match what the model packs per image."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        image_size_to_num_patches,
    )

    seeds = seeds or list(range(len(rows)))
    sizes = torch.tensor([s for r in rows for s in r[1:]])
    per_prompt = torch.tensor([len(r) - 1 for r in rows])
    crops = [image_size_to_num_patches(s, PINPOINTS, 32) for s in sizes]
    px = torch.zeros(len(sizes), max(crops), 3, 32, 32)
    k = 0
    for r, s in zip(rows, seeds, strict=True):
        for j in range(len(r) - 1):
            g = torch.Generator().manual_seed(10 * s + j)
            px[k, : crops[k]] = torch.randn(crops[k], 3, 32, 32, generator=g)
            k += 1
    with torch.no_grad():
        feats = model.model.get_image_features(px, sizes, batch_num_images=per_prompt).pooler_output
    ids, k = [], 0
    for r, s in zip(rows, seeds, strict=True):
        g = torch.Generator().manual_seed(s)
        pre, post = r[0]
        parts = []
        for _ in r[1:]:
            parts += [torch.randint(1, 100, (pre,), generator=g), torch.full((len(feats[k]),), IMG)]
            k += 1
        ids.append(torch.cat([*parts, torch.randint(1, 100, (post,), generator=g)]))
    input_ids, mask = left_pad(ids)
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=px, image_sizes=sizes,
                batch_num_images=per_prompt)


def gen(model, x, **kw):
    with torch.no_grad():
        return model.generate(**x, **{**GREEDY, **kw})[:, -NEW:]


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def test_pruning_nothing_and_unpatch_are_identical_to_unpatched():
    model = make()
    x = inputs(model, ROWS)
    ref, ref_ids = logits(model, x), gen(model, x)
    for cfg in (dict(mode="llm", llm_layers=(0, DEPTH - 2), llm_tau=0.3, llm_k=1000),
                dict(method="fastv", fastv_layer=1, fastv_ratio=0.0)):
        saint.patch(model, **cfg)
        assert torch.equal(logits(model, x), ref)
        assert torch.equal(gen(model, x), ref_ids)
    saint.patch(model, **LLM)
    assert bool(logits(model, x).isnan().any())
    saint.unpatch(model)
    assert "get_image_features" not in model.model.__dict__
    assert torch.equal(logits(model, x), ref)
    assert torch.equal(gen(model, x), ref_ids)


@pytest.mark.parametrize("cfg", [LLM, FASTV], ids=["llm", "fastv"])
def test_batch_equals_alone_and_cached_equals_uncached(cfg):
    model = make()
    saint.patch(model, **cfg)
    x = inputs(model, ROWS)
    ids, stats, last = gen(model, x), saint.stats(model), logits(model, x)[:, -1]
    for b, row in enumerate(ROWS):
        xi = inputs(model, [row], seeds=[b])
        assert torch.equal(gen(model, xi), ids[b:b + 1])
        assert [t[b] for t in stats.tokens] == [t[0] for t in saint.stats(model).tokens]
        torch.testing.assert_close(logits(model, xi)[:, -1], last[b:b + 1], rtol=1e-4, atol=1e-5)
    if cfg is LLM:
        assert torch.equal(ids, gen(model, x, use_cache=False))
        torch.manual_seed(3)
        sampled = gen(model, x, do_sample=True, top_k=0, temperature=2.0)
        torch.manual_seed(3)
        assert torch.equal(sampled, gen(model, x, do_sample=True, top_k=0, temperature=2.0, use_cache=False))
        assert torch.equal(gen(model, x, num_beams=3), gen(model, x, num_beams=3, use_cache=False))


def test_newline_tokens_are_protected():
    """With tau=0 every prunable image token is a candidate; the newline tokens (one per
    row of every image's crop grid, and one after a single-crop image) all survive."""
    model = make()
    x = inputs(model, ROWS)
    with torch.no_grad():
        feats = model.model.get_image_features(x["pixel_values"], x["image_sizes"],
                                               batch_num_images=x["batch_num_images"]).pooler_output
    newline = torch.cat([(f == model.model.image_newline).all(-1) for f in feats])
    assert int(newline.sum()) == 4 + 1 + 1 + 8  # 30x60: 4 rows; 64x64 and 32x32 alone: 1 each; 64x64: 8 rows
    saint.patch(model, mode="llm", llm_layers=(1, 2), llm_tau=0.0, llm_k=1)
    logits(model, x)
    kept = get_handle(model).kept_input
    image = x["input_ids"] == IMG
    marks = torch.zeros_like(image)
    marks[image] = newline
    assert bool(kept[marks].all())
    assert int((image & ~kept).sum()) > 0
    stats = saint.stats(model)
    assert stats.tokens[0] == (image & ~marks).sum(dim=1).tolist()  # only non-newline image tokens are counted


@pytest.mark.parametrize("kw", [dict(mode="vit", vit_keep=10, vit_layer=0), dict(mode="hybrid"),
                                dict(method="random", visual_keep=4), dict(method="pool", visual_keep=4)])
def test_vision_side_methods_are_refused(kw):
    model = make()
    with pytest.raises(ValueError, match="LLaVA-OneVision supports method='saint' with mode='llm'"):
        saint.patch(model, **kw)
    assert not saint.is_patched(model) and "get_image_features" not in model.model.__dict__


def test_adapter_protocol():
    model = make()
    adapter = saint.adapters.find_adapter(model)
    assert adapter.name == "llava_onevision"
    assert len(adapter.sites(model)) == DEPTH
    assert adapter.block_flops(model, 10, 10) > 0
    grid = adapter.grid(model)
    assert (grid.rows, grid.cols) == (4, 4)

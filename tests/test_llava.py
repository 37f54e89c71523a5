"""LLaVA: SAINT's vit / llm / hybrid modes and the FastV, random and pooling
baselines on tiny random LLaVA models (CLIP tower + Llama, Qwen2, Qwen3, Mistral, Gemma, Phi-3 or
Granite decoder)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters import hf_vision  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402
from saint.core import saint_keep_mask  # noqa: E402

from .conftest import assert_two_threads_agree, forcing, left_pad  # noqa: E402

IMG = 127  # image_token_id
GRID = 8  # 32 px images, 4 px patches: 64 patches = 64 image tokens per image
N_TOK = GRID * GRID
DEPTH = 6  # decoder layers
NEW = 5  # generated tokens
WINDOW = 12  # a Mistral sliding window far shorter than the prompts
GREEDY = dict(max_new_tokens=NEW, do_sample=False, suppress_tokens=[IMG])

HYBRID = dict(mode="hybrid", vit_keep=30, vit_layer=1, llm_layers=(0, 3), llm_tau=0.3, llm_k=2)
CONFIGS = {
    "llm": dict(mode="llm", llm_layers=(1, 3), llm_tau=0.25, llm_k=3),
    "vit": dict(mode="vit", vit_keep=20, vit_layer=1),
    "hybrid": HYBRID,
    "fastv": dict(method="fastv", fastv_layer=2, fastv_ratio=0.5),
    "random": dict(method="random", visual_keep=10),
    "pool": dict(method="pool", visual_keep=16),
}
NOTHING = {
    "llm": dict(mode="llm", llm_layers=(0, 4), llm_tau=0.3, llm_k=1000),
    "vit": dict(mode="vit", vit_keep=N_TOK, vit_layer=1),
    "fastv": dict(method="fastv", fastv_layer=1, fastv_ratio=0.0),
    "random": dict(method="random", visual_keep=N_TOK),
    "pool": dict(method="pool", visual_keep=N_TOK),
}


def make(text: str = "llama", impl: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=4
    )
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=DEPTH, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, max_position_embeddings=256)
    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": lambda **k: transformers.MistralConfig(sliding_window=None, **k),
               "mistral_window": lambda **k: transformers.MistralConfig(sliding_window=WINDOW, **k),
               "qwen3": lambda **k: transformers.Qwen3Config(head_dim=16, **k),
               "gemma": lambda **k: transformers.GemmaConfig(head_dim=16, **k),
               "phi3": lambda **k: transformers.Phi3Config(**k, rope_parameters=dict(  # fused qkv_proj, half rotary
                   rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),
               # Granite Vision's language model: its attention scales by attention_multiplier, not 1/sqrt(d)
               "granite": lambda **k: transformers.GraniteConfig(**k, attention_multiplier=0.3, embedding_multiplier=4.0,
                                                                 residual_multiplier=0.5, logits_scaling=2.0)}
    text_cfg = configs[text](**kw)
    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_id=IMG,
                                   vision_feature_layer=-2, attn_implementation=impl)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def prompt(pre: int, post: int, n_images: int = 1, seed: int = 0, n_tok: int = N_TOK) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(n_images):
        parts += [torch.randint(1, 100, (pre,), generator=g), torch.full((n_tok,), IMG)]
    return torch.cat([*parts, torch.randint(1, 100, (post,), generator=g)])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    x[0] = x[0].mean(dim=(1, 2), keepdim=True)  # flat image: very redundant
    x[1, :, :16] = 0.5  # half flat
    return x


# three prompts of different lengths, the second with two images
ROWS = [prompt(3, 4, seed=0), prompt(5, 2, n_images=2, seed=1), prompt(1, 6, seed=2)]
N_IMAGES = [1, 2, 1]


def alone(model, images, fn):
    """``fn(input_ids, pixel_values)`` for every prompt on its own."""
    out, k = [], 0
    for row, n in zip(ROWS, N_IMAGES, strict=True):
        out.append(fn(row[None], images[k:k + n]))
        k += n
    return out


def gen(model, ids, px, mask=None, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **{**GREEDY, **kw})[:, -NEW:]


def logits(model, ids, px, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=px).logits


def last_logits(model, ids, px, mask=None):
    return logits(model, ids, px, mask)[:, -1]


# ---------------------------------------------------------------------------- identity
@pytest.mark.parametrize("name", sorted(NOTHING))
def test_pruning_nothing_is_identical_to_unpatched(name, images):
    model = make()
    ids, mask = left_pad(ROWS)
    ref = logits(model, ids, images, mask)
    ref_ids = gen(model, ids, images, mask)
    saint.patch(model, **NOTHING[name])
    out = logits(model, ids, images, mask)
    assert torch.equal(out, ref)
    assert torch.equal(gen(model, ids, images, mask), ref_ids)
    tokens = saint.stats(model).tokens
    assert all(t == tokens[0] for t in tokens)  # nothing left any layer


@pytest.mark.parametrize("name", ["hybrid", "fastv", "pool"])
def test_unpatch_restores_identical_outputs(name, images):
    model = make()
    ids, mask = left_pad(ROWS)
    ref = logits(model, ids, images, mask)
    ref_ids = gen(model, ids, images, mask)
    saint.patch(model, **CONFIGS[name])
    pruned_ids = gen(model, ids, images, mask)
    pruned = logits(model, ids, images, mask)
    assert not torch.allclose(pruned[:, -1], ref[:, -1])  # the patch did change something
    saint.unpatch(model)
    assert not saint.is_patched(model) and not saint.is_patched(model.model.vision_tower)
    again = logits(model, ids, images, mask)
    assert torch.equal(again, ref)
    assert torch.equal(gen(model, ids, images, mask), ref_ids)
    assert pruned_ids.shape == ref_ids.shape


# ---------------------------------------------------------------------------- consistency
@pytest.mark.parametrize("name, text", [(n, "llama") for n in sorted(CONFIGS)] + [
    ("hybrid", "qwen2"), ("hybrid", "mistral"), ("hybrid", "qwen3"), ("fastv", "qwen3"), ("hybrid", "gemma"),
    ("hybrid", "phi3"), ("fastv", "phi3"), ("llm", "mistral_window"), ("hybrid", "mistral_window"),
    ("fastv", "mistral_window")])
def test_batch_equals_alone_and_cached_equals_uncached(name, text, images):
    """Left-padded prompts of different lengths, images and image counts: each row
    of the batch matches the prompt alone (tokens, last logits, per-sample counts),
    and cached greedy decoding equals the uncached loop over the pruned prompt (FastV
    excepted: its ranking query changes with every uncached step)."""
    model = make(text)
    saint.patch(model, **CONFIGS[name])
    ids, mask = left_pad(ROWS)
    batch_ids = gen(model, ids, images, mask)
    batch_stats = saint.stats(model)
    batch_logits = last_logits(model, ids, images, mask)
    solo_ids = alone(model, images, lambda i, x: gen(model, i, x))
    solo_logits, solo_stats = [], []
    for out in alone(model, images, lambda i, x: (last_logits(model, i, x), saint.stats(model))):
        solo_logits.append(out[0])
        solo_stats.append(out[1])
    assert torch.equal(batch_ids, torch.cat(solo_ids))
    torch.testing.assert_close(batch_logits, torch.cat(solo_logits), rtol=1e-4, atol=1e-5)
    for b, s in enumerate(solo_stats):
        assert [t[b] for t in batch_stats.tokens] == [t[0] for t in s.tokens]
    if name == "fastv":
        # FastV ranks the image tokens by the last query's attention: without a cache every
        # step re-runs the prompt with a new last token, so it may keep other tokens; equal
        # ids there would be chance, not a property (docs/qwen-vl.md, FastV)
        return
    uncached = gen(model, ids, images, mask, use_cache=False)
    assert torch.equal(batch_ids, uncached)


def test_per_sample_budgets_differ_within_a_batch(images):
    """SAINT's dynamic rate gives every sample its own count (rate='sample')."""
    model = make()
    saint.patch(model, **HYBRID)
    ids, mask = left_pad(ROWS)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=images)
    final = saint.stats(model).as_dict()["language_model.norm"]
    assert len(set(final)) == 3, final


@pytest.mark.parametrize("text", ["llama", "qwen2", "granite"])
def test_eager_static_cache_sampling_and_beams(text, images):
    """Eager (Llama) and sdpa (Qwen2): cached == uncached under greedy, sampling (same seed),
    beam search (the cache reorder carries the per-row maps) and a static cache."""
    model = make(text, impl="eager" if text == "llama" else "sdpa")
    saint.patch(model, **HYBRID)
    ids, mask = left_pad(ROWS[:2])
    px = images[:3]
    assert torch.equal(gen(model, ids, px, mask), gen(model, ids, px, mask, use_cache=False))
    sample = dict(do_sample=True, top_k=0, temperature=2.0)
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=NEW,
                                       suppress_tokens=[IMG], use_cache=use_cache, **sample)[:, -NEW:])
    assert torch.equal(*outs)
    beams = [gen(model, ids, px, mask, num_beams=3, use_cache=c) for c in (True, False)]
    assert torch.equal(*beams)
    saint.patch(model, **CONFIGS["llm"])
    dyn = gen(model, ids, px, mask)
    assert torch.equal(gen(model, ids, px, mask, cache_implementation="static"), dyn)
    assert torch.equal(gen(model, ids, px, mask, use_cache=False), dyn)


# ---------------------------------------------------------------------------- positions & caches
def test_positions_cache_lengths_and_decode_position(images):
    """Kept tokens keep their original position ids; each layer's cache holds exactly
    the tokens that entered it; decoding continues at the original prompt length."""
    model = make()
    saint.patch(model, mode="llm", llm_layers=(1, 2), llm_tau=0.25, llm_k=3)
    row = ROWS[1]
    seen: list[torch.Tensor] = []
    hook = model.model.language_model.layers[4].register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    with torch.no_grad():
        out = model.generate(input_ids=row[None], pixel_values=images[1:3], max_new_tokens=3, do_sample=False,
                             suppress_tokens=[IMG], return_dict_in_generate=True)
    hook.remove()
    prefill_pos, decode_pos = seen[0][0], [p.item() for p in seen[1:]]
    kept = get_handle(model).kept_input[0]
    assert torch.equal(prefill_pos, kept.nonzero().squeeze(1))
    text = (row != IMG).nonzero().squeeze(1)
    assert bool(kept[text].all())  # text is never dropped
    assert decode_pos == [len(row), len(row) + 1]
    stats = saint.stats(model)
    n_text = int((row != IMG).sum())
    for i, layer in enumerate(out.cache.layers):
        entered = n_text + stats.tokens[1 + i][0]
        assert layer.keys.shape[2] == entered + 2, f"layer {i}"
    assert stats.tokens[4][0] < stats.tokens[3][0] < stats.tokens[2][0]  # pruned after layers 1 and 2


def test_a_sliding_window_spans_positions_in_pruned_layers(images):
    """Mistral's sliding window in a layer after pruning: every query sees exactly the
    kept keys within WINDOW positions of it (not WINDOW cache slots), in the prefill and
    in every decoding step beyond the window; the sliding cache layers keep every slot."""
    model = make("mistral_window")
    saint.patch(model, mode="llm", llm_layers=(1, 2), llm_tau=0.25, llm_k=3)
    row = ROWS[1]
    masks: list[torch.Tensor] = []
    hook = model.model.language_model.layers[4].self_attn.register_forward_pre_hook(
        lambda m, a, kw: masks.append(kw["attention_mask"].clone()), with_kwargs=True)
    with torch.no_grad():
        out = model.generate(input_ids=row[None], pixel_values=images[1:3], max_new_tokens=3, do_sample=False,
                             suppress_tokens=[IMG], return_dict_in_generate=True)
    hook.remove()
    kept = get_handle(model).kept_input[0]
    pos = kept.nonzero().squeeze(1)  # original positions of the prompt slots layer 4 holds
    assert len(pos) < len(row) - WINDOW
    for step, mask in enumerate(masks):
        q = pos if step == 0 else torch.tensor([len(row) + step - 1])
        k = torch.cat([pos, torch.arange(len(row), len(row) + step)])
        want = (k[None, :] <= q[:, None]) & (q[:, None] - k[None, :] < WINDOW)
        assert mask.dtype == torch.bool and torch.equal(mask[0, 0], want), f"step {step}"
    assert [layer.keys.shape[2] for layer in out.cache.layers][-1] == len(pos) + 2  # every slot kept


def test_sliding_window_cache_pruning_nothing_decodes_as_unpatched(images):
    """Keeping every slot of the sliding layers changes nothing: pruning nothing, the
    greedy tokens and their scores past the window equal the unpatched model's (which
    keeps WINDOW - 1 slots); a static cache's sliding layers are refused."""
    model = make("mistral_window")
    ids, mask = left_pad(ROWS)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=WINDOW + 2, do_sample=False,
              suppress_tokens=[IMG], return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        want = model.generate(**kw)
        saint.patch(model, **NOTHING["llm"])
        out = model.generate(**kw)
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(want.scores), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), pytest.raises(ValueError, match="StaticSlidingWindowLayer: saint keeps every slot"):
        model.generate(**{**kw, "cache_implementation": "static"})


def test_stats_counts_follow_the_config(images):
    ids, mask = left_pad(ROWS)
    expect_tower = {"vit": 20, "random": 10, "pool": 16, "llm": N_TOK, "fastv": N_TOK}
    for name, per_image in expect_tower.items():
        model = make()
        saint.patch(model, **CONFIGS[name])
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=images)
        st = saint.stats(model)
        assert st.blocks[0] == "vision_tower" and len(st.blocks) == DEPTH + 2
        tower = [per_image * n for n in N_IMAGES]
        assert st.tokens[0] == tower, name
        changed = [i for i in range(DEPTH) if st.tokens[i + 2] != st.tokens[i + 1]]
        if name == "llm":
            assert set(changed) <= {1, 2, 3} and changed
        elif name == "fastv":  # ranks with layer 1, dropped from layer 2 on: floor(n * 0.5) kept
            assert changed == [1]
            assert st.tokens[3] == [n // 2 for n in tower]
        else:
            assert not changed
    model = make()
    saint.patch(model, **CONFIGS["vit"])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=images)
    vs = get_handle(model).vision_stats()
    assert vs.tokens[1] == [1 + N_TOK] * 4 and vs.tokens[2] == [1 + 20] * 4


# ---------------------------------------------------------------------------- semantics
def test_vit_mode_equals_a_prompt_built_for_the_kept_count(images):
    """Shrinking each image's run of tokens gives exactly what the unpatched LLaVA
    computes for a prompt that the processor built with vit_keep tokens per image."""
    keep = 20
    model = make()
    ids, mask = left_pad(ROWS)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    saint.patch(model, mode="vit", vit_keep=keep, vit_layer=1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=images).logits
    saint.unpatch(model)
    short = [prompt(3, 4, seed=0, n_tok=keep), prompt(5, 2, n_images=2, seed=1, n_tok=keep),
             prompt(1, 6, seed=2, n_tok=keep)]
    sids, smask = left_pad(short)
    spos = (smask.cumsum(1) - 1).clamp(min=0)
    hf_vision.patch_tower(model.model.vision_tower, "budget", layers=[1], keep=keep)
    with torch.no_grad():
        ref = model(input_ids=sids, attention_mask=smask, position_ids=spos, pixel_values=images).logits
    for b in range(len(ROWS)):
        real = ~out[b].isnan().any(-1) & mask[b].bool()
        torch.testing.assert_close(out[b][real], ref[b][smask[b].bool()], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vit", "hybrid", "random", "pool"])
def test_a_prompt_that_ends_with_its_image_keeps_its_last_token(images, name):
    """A bare "<image>" captioning prompt ends with the image's run: the run shrinks at its
    front, so the last position (whose logits generation reads) stays a real token, and
    with SAINT's vit mode the logits equal the unpatched model's on a prompt built for the
    kept count."""
    row = prompt(3, 0)[None]
    model = make()
    saint.patch(model, **CONFIGS[name])
    with torch.no_grad():
        out = model(input_ids=row, pixel_values=images[:1]).logits
    assert bool(out[0, -1].isfinite().all()) and bool(out[0, :3].isfinite().all())
    assert bool(out.isnan().any())  # image tokens were dropped
    if name != "vit":
        return
    saint.unpatch(model)
    hf_vision.patch_tower(model.model.vision_tower, "budget", layers=[1], keep=20)
    with torch.no_grad():
        ref = model(input_ids=prompt(3, 0, n_tok=20)[None], pixel_values=images[:1]).logits
    torch.testing.assert_close(out[0, -1], ref[0, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llm", "fastv", "hybrid"])
def test_a_right_padded_batch_gives_each_row_what_it_gives_alone(images, name):
    """Right padding (a scoring or training batch): the language-model pruners rank by and
    protect each row's last real token, not the batch's last column (padding for the shorter
    rows: FastV ranked the image tokens by a padding query's attention)."""
    rows = [prompt(3, 4, seed=0), prompt(1, 12, seed=2)]
    n = max(len(r) for r in rows)
    ids, mask = torch.zeros(2, n, dtype=torch.long), torch.zeros(2, n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    model = make()
    saint.patch(model, **CONFIGS[name])
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=images[:2]).logits
        for i, r in enumerate(rows):
            alone = model(input_ids=r[None], pixel_values=images[i : i + 1]).logits[0]
            real = ~alone.isnan().any(-1)
            torch.testing.assert_close(batch[i, : len(r)][real], alone[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["random", "pool"])
def test_grid_baselines_refuse_a_tower_whose_first_patch_the_strategy_drops(method):
    """A SigLIP tower (no class token) under the ``default`` strategy hands LLaVA 63 of its 64
    patches: not a grid. Refused when patching (every forward failed on the feature count);
    with the ``full`` strategy the baselines run."""
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=4)
    text = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    for strategy in ("default", "full"):
        torch.manual_seed(0)
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=IMG, vision_feature_layer=-1,
            vision_feature_select_strategy=strategy)).eval()
        if strategy == "default":
            with pytest.raises(ValueError, match="drops the first patch"):
                saint.patch(model, **CONFIGS[method])
            assert not saint.is_patched(model)
            continue
        saint.patch(model, **CONFIGS[method])
        with torch.no_grad():
            out = model(input_ids=prompt(3, 4)[None], pixel_values=torch.randn(1, 3, 32, 32)).logits
        assert bool(out[0, -1].isfinite().all())


def layer_keys(model, layer: int, row: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The keys ``[1, KV heads, L, D]`` decoder layer ``layer`` of the unpatched model
    computes for prompt ``row`` (before RoPE; after Qwen3's key norm; Phi-3: the key
    columns of its fused projection), and that layer's rotary ``(cos, sin)``."""
    lm = model.model.language_model
    grab = {}
    attn = lm.layers[layer].self_attn
    if hasattr(attn, "qkv_proj"):
        q, kv = attn.config.num_attention_heads * attn.head_dim, attn.num_key_value_heads * attn.head_dim
        h1 = attn.qkv_proj.register_forward_hook(lambda m, a, o: grab.update(k=o[..., q:q + kv]))
    else:
        where = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj
        h1 = where.register_forward_hook(lambda m, a, o: grab.update(k=o))
    h2 = lm.layers[layer].register_forward_pre_hook(
        lambda m, a, kw: grab.update(pe=kw["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=row[None], pixel_values=images[:1])
    h1.remove()
    h2.remove()
    return grab["k"].view(1, len(row), -1, lm.layers[layer].self_attn.head_dim).transpose(1, 2), grab["pe"]


@pytest.mark.parametrize("text", ["llama", "qwen3", "phi3", "granite"])
def test_llm_metric_is_post_rope_keys_averaged_over_kv_heads(text, images):
    """The first SAINT step drops exactly what saint_keep_mask picks on the unpatched
    layer's post-RoPE keys of the image span (averaged over KV heads; Qwen3: normed keys;
    Phi-3: half the dimensions rotated, by its modeling module's own RoPE)."""
    import sys

    layer, k = 2, 3
    model = make(text)
    row, image = ROWS[0], images[2:3]  # random: another tensor (values, or keys before RoPE) drops others
    key, pe = layer_keys(model, layer, row, image)
    attn = model.model.language_model.layers[layer].self_attn
    apply_rotary_pos_emb = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    key = apply_rotary_pos_emb(key, key, *pe)[1].mean(dim=1)
    span = (row == IMG).nonzero().squeeze(1)
    span = span[span != len(row) - 1]
    for tau in torch.arange(0.9, -0.5, -0.05).tolist():  # the first that drops a quarter to half the span
        expect = saint_keep_mask(key[:, span], tau, k, 10.0)
        if len(span) // 4 <= int((~expect).sum()) <= len(span) // 2:
            break
    saint.patch(model, mode="llm", llm_layers=(layer, layer), llm_tau=tau, llm_k=k)
    with torch.no_grad():
        model(input_ids=row[None], pixel_values=image)
    kept = get_handle(model).kept_input[0]
    assert 0 < int((~expect).sum()) < len(span)
    assert torch.equal(kept[span], expect[0])


@pytest.mark.parametrize("text", ["llama", "qwen3", "phi3", "granite"])
def test_fastv_drops_the_least_attended_image_tokens(text, images):
    """FastV's ranking equals the last token's attention read from an eager run (Qwen3:
    with its query and key norms; Phi-3: from its fused projection; Granite: scaled by its
    attention multiplier)."""
    model = make(text, impl="eager")
    row = ROWS[2]
    with torch.no_grad():
        att = model(input_ids=row[None], pixel_values=images[:1], output_attentions=True).attentions[1]
    scores = att[0, :, -1].mean(dim=0)
    span = (row == IMG).nonzero().squeeze(1)
    order = span[torch.argsort(scores[span], stable=True)]
    dropped = order[: len(span) - len(span) // 2]
    saint.patch(model, method="fastv", fastv_layer=2, fastv_ratio=0.5)
    with torch.no_grad():
        logits = model(input_ids=row[None], pixel_values=images[:1]).logits
    gone = logits[0].isnan().any(-1).nonzero().squeeze(1)
    assert torch.equal(gone, dropped.sort().values)


def test_labels_loss_counts_only_targets_with_a_prediction(images):
    """Plain forward with labels prunes as generate does; logits keep the input's
    length (NaN where a token was dropped) and the loss is the model's own loss over
    the targets that still have a predicting position."""
    model = make()
    ids, mask = left_pad(ROWS)
    labels = ids.masked_fill(mask == 0, -100)
    saint.patch(model, **HYBRID)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=images, labels=labels)
    assert out.logits.shape[:2] == ids.shape
    dropped = out.logits.isnan().any(-1)
    assert bool(dropped.any()) and not bool(dropped[:, -1].any())
    assert bool((ids[dropped] == IMG).all())
    target = labels[:, 1:].masked_fill(dropped[:, :-1], -100)
    pred = out.logits[:, :-1].nan_to_num()
    expect = torch.nn.functional.cross_entropy(pred.reshape(-1, 128), target.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expect)
    assert torch.equal(labels, ids.masked_fill(mask == 0, -100))  # the caller's labels are untouched
    # the last position's logits are what generate starts from
    torch.testing.assert_close(out.logits[:, -1], last_logits(model, ids, images, mask))


def test_llm_pre_rope_metric_option_is_used(images):
    """``llm_rope_keys=False`` selects on the keys before RoPE: the first step drops what
    saint_keep_mask picks on them, which differs from the post-RoPE choice here (so an
    ignored option would fail); cached and uncached generation still agree."""
    layer, tau, k = 1, 0.7, 2
    model = make()
    row = ROWS[0]
    key, pe = layer_keys(model, layer, row, images)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    span = (row == IMG).nonzero().squeeze(1)
    span = span[span != len(row) - 1]
    pre = saint_keep_mask(key.mean(dim=1)[:, span], tau, k, 10.0)
    post = saint_keep_mask(apply_rotary_pos_emb(key, key, *pe)[1].mean(dim=1)[:, span], tau, k, 10.0)
    assert not torch.equal(pre, post), "the test needs a case where the two metrics disagree"
    saint.patch(model, mode="llm", llm_layers=(layer, layer), llm_tau=tau, llm_k=k, llm_rope_keys=False)
    with torch.no_grad():
        model(input_ids=row[None], pixel_values=images[:1])
    assert torch.equal(get_handle(model).kept_input[0][span], pre[0])
    saint.patch(model, mode="llm", llm_layers=(1, 2), llm_tau=0.25, llm_k=3, llm_rope_keys=False)
    ids, mask = left_pad(ROWS)
    assert torch.equal(gen(model, ids, images, mask), gen(model, ids, images, mask, use_cache=False))


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(mode="vit", vit_keep=65, vit_layer=1), ValueError, "exceeds the 64 patches"),
        (dict(mode="vit", vit_keep=0, vit_layer=1), ValueError, "vit_keep=0 must be >= 1"),
        (dict(mode="vit", vit_keep=10, vit_layer=3), ValueError, "vision_feature_layer=-2"),
        (dict(mode="vit", vit_keep=10, vit_layer=9), ValueError, "out of range"),
        (dict(mode="llm", llm_layers=(3, 2)), ValueError, "empty or reversed"),
        (dict(mode="llm", llm_layers=(1, DEPTH - 1)), ValueError, "end must be <= 4"),
        (dict(mode="llm", llm_layers=(1, 2), llm_tau=1.5), ValueError, "tau=1.5 is outside"),
        (dict(mode="llm", llm_layers=(1, 2), llm_tau=[0.5]), ValueError, "1 values but there are 2 layers"),
        (dict(mode="llm", llm_layers=(1, 2), llm_k=0), ValueError, "k=0 must be >= 1"),
        (dict(mode="llm", llm_layers=(1, 2), llm_rate="vote"), ValueError, "llm_rate"),
        (dict(mode="llm", llm_layers=(1, 2), vit_keep=3), TypeError, "does not use"),
        (dict(mode="warp"), ValueError, "mode must be one of"),
        (dict(method="fastv", fastv_layer=DEPTH), ValueError, "fastv_layer=6"),
        (dict(method="fastv", fastv_ratio=1.0), ValueError, "fastv_ratio"),
        (dict(method="pool", visual_keep=10), ValueError, "square"),
        (dict(method="random"), ValueError, "needs visual_keep"),
        (dict(method="random", visual_keep=65), ValueError, "exceeds the 64 patches"),
        (dict(method="random", visual_keep=5, mode="llm"), TypeError, "mode= is for"),
        (dict(method="tome", r=2), ValueError, "unknown LLaVA method"),
        (dict(mode="llm", llm_layers=(1, 2), tua=0.5), TypeError, "does not take"),
    ],
)
def test_bad_settings_raise_clear_errors(kw, err, match):
    model = make()
    with pytest.raises(err, match=match):
        saint.patch(model, **kw)
    assert not saint.is_patched(model) and not saint.is_patched(model.model.vision_tower)


def test_a_call_s_feature_layer_before_the_drop_is_refused(images):
    """``vision_feature_layer`` given to the call rather than the config: one taken before
    the vit step handed every unpruned patch to the LM (the drop ignored, unlike the
    config's, refused at patch time)."""
    model = make()
    saint.patch(model, mode="vit", vit_keep=10, vit_layer=1)
    with torch.no_grad():
        with pytest.raises(ValueError, match="vision_feature_layer=-4 .* taken before vit_layer=1"):
            model(input_ids=prompt(3, 2)[None], pixel_values=images[:1], vision_feature_layer=-4)
        model(input_ids=prompt(3, 2)[None], pixel_values=images[:1], vision_feature_layer=-1)
    assert saint.stats(model).tokens[0] == [10]


@pytest.mark.parametrize("text, err, match", [
    ("OlmoConfig", TypeError, "cannot prune inside a OlmoModel"),
    ("Qwen2Config", ValueError, r"layer types \['chunked_attention'\] are not supported"),
])
def test_unsupported_language_model_is_refused(text, err, match):
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    text = getattr(transformers, text)(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, vocab_size=128,
                                       pad_token_id=0, layer_types=["full_attention", "chunked_attention"])
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMG)).eval()
    with pytest.raises(err, match=match):
        saint.patch(model, mode="llm", llm_layers=(0, 0))
    assert not saint.is_patched(model)


@pytest.mark.parametrize("name", ["hybrid", "fastv", "pool"])
def test_decoded_image_token_ids_are_text(name, images):
    """A decoding step that emits the image token id (no pixels: the model embeds it as
    text) runs as unpatched: pruning nothing gives the unpatched ids, pruning gives
    each prompt what it gets alone (it was refused as a new image on a cache)."""
    ids, mask = left_pad(ROWS)
    model = make()
    forced = forcing([IMG])
    ref = gen(model, ids, images, mask, **forced)
    assert (ref == IMG).sum(dim=1).tolist() == [2, 2, 2]
    saint.patch(model, **NOTHING["vit"])
    assert torch.equal(gen(model, ids, images, mask, **forcing([IMG])), ref)
    saint.unpatch(model)
    saint.patch(model, **CONFIGS[name])
    out = gen(model, ids, images, mask, **forcing([IMG]))
    solo = alone(model, images, lambda r, px: gen(model, r, px, **forcing([IMG])))
    assert torch.equal(out, torch.cat(solo))


def test_prompt_lookup_decoding_equals_greedy(images, monkeypatch):
    """Assisted (prompt-lookup) decoding through a cache whose layers hold pruned prompts of
    different lengths: rejected candidates are cropped from the end of every layer, so the
    output equals plain greedy decoding."""
    crops = []
    crop = transformers.DynamicCache.crop
    monkeypatch.setattr(transformers.DynamicCache, "crop", lambda self, n: (crops.append(n), crop(self, n))[1])
    model = saint.patch(make(), **HYBRID)
    ids = ROWS[0][None]
    kw = dict(max_new_tokens=20, do_sample=False, suppress_tokens=[IMG])
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, pixel_values=images[:1], **kw)
        assert not crops
        lookup = model.generate(input_ids=ids, pixel_values=images[:1], prompt_lookup_num_tokens=3, **kw)
    assert any(n < 0 for n in crops)  # candidates were rejected and cropped
    assert torch.equal(lookup, greedy)


def test_bad_calls_raise_clear_errors(images):
    model = make()
    saint.patch(model, **CONFIGS["vit"])
    row = ROWS[0]
    bad = torch.cat([row[:3], row[4:]])[None]  # 63 image tokens for one 64-patch image
    with pytest.raises(ValueError, match="63 image tokens"):
        model(input_ids=bad, pixel_values=images[:1])
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(input_ids=row[None], pixel_values=images[:1], output_hidden_states=True)
    embeds = model.get_input_embeddings()(row[None])
    with pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=embeds, pixel_values=images[:1])
    with torch.no_grad():
        out = model(input_ids=row[None], pixel_values=images[:1], use_cache=True)
        with pytest.raises(ValueError, match="non-empty cache"):
            model(input_ids=row[None], pixel_values=images[:1], cache=out.cache)
    with pytest.raises(ValueError, match="static cache"):
        model.generate(input_ids=row[None], pixel_values=images[:1], cache_implementation="static", **GREEDY)


# ---------------------------------------------------------------------------- threads, copies
def test_calls_from_two_threads_wait_for_each_other(images):
    """One patched LLaVA shared by two threads: every call gets its own answer."""
    model = saint.patch(make(), "saint", **HYBRID)
    pixels = [images[0:1], images[1:3], images[3:4]]  # the second prompt holds two images
    calls = [(ROWS[i % 3][None], pixels[i % 3]) for i in range(8)]
    assert_two_threads_agree(lambda ids, px: last_logits(model, ids, px), calls)


def test_copying_or_pickling_a_patched_llava_says_unpatch_first():
    import copy
    import io

    model = saint.patch(make(), "saint", **HYBRID)
    with pytest.raises(TypeError, match="unpatch first"):
        copy.deepcopy(model)
    with pytest.raises(TypeError, match="unpatch first"):
        torch.save(model, io.BytesIO())
    saint.unpatch(model)
    clone = copy.deepcopy(model)
    assert not saint.is_patched(clone)

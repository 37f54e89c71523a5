"""InternVL and Mistral 3, pruned inside their language model only (SAINT's llm mode,
FastV): exactness on tiny random models (tests/llm_side_tiny.py), batches of prompts
with several images of different sizes, and the refusals."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .llm_side_tiny import BREAK, DEPTH, END, IMG, START, inputs, make  # noqa: E402

FAMILIES = ["internvl", "mistral3"]
ROWS = {  # three prompts: one image; two images (Mistral 3: of other sizes); text first
    "internvl": [[3, (64, 64), 4], [2, (64, 64), 3, (64, 64), 2], [5, (64, 64), 1]],
    "mistral3": [[3, (64, 64), 4], [2, (32, 64), 3, (64, 32), 2], [5, (64, 64), 1]],
}
CONFIGS = {
    "llm": dict(mode="llm", llm_layers=(0, 3), llm_tau=0.3, llm_k=1),
    "fastv": dict(method="fastv", fastv_layer=2, fastv_ratio=0.5),
}
NOTHING = {
    "llm": dict(mode="llm", llm_layers=(0, DEPTH - 2), llm_tau=0.3, llm_k=1000),
    "fastv": dict(method="fastv", fastv_layer=1, fastv_ratio=0.0),
}
GREEDY = dict(max_new_tokens=4, do_sample=False)


def gen(model, x, **kw):
    with torch.no_grad():
        return model.generate(**x, **{**GREEDY, **kw})[:, -GREEDY["max_new_tokens"]:]


def alone(family: str) -> list[dict[str, torch.Tensor]]:
    return [inputs(family, [r], [i]) for i, r in enumerate(ROWS[family])]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(NOTHING))
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


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
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
    assert not dropped[torch.isin(x["input_ids"], torch.tensor([START, END, BREAK]))].any()
    batch_ids = gen(model, x)
    solo = alone(family)
    assert torch.equal(batch_ids, torch.cat([gen(model, s) for s in solo]))
    with torch.no_grad():
        solo_last = torch.cat([model(**s).logits[:, -1] for s in solo])
    torch.testing.assert_close(logits[:, -1], solo_last, rtol=1e-4, atol=1e-5)
    if name == "llm":
        assert torch.equal(gen(model, x, use_cache=False), batch_ids)
    saint.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, want)


@pytest.mark.parametrize("family", FAMILIES)
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
    saint.patch(model, **CONFIGS["llm"])
    assert torch.equal(gen(model, x, prompt_lookup_num_tokens=3), gen(model, x))
    saint.patch(model, **CONFIGS["fastv"])
    with torch.no_grad(), pytest.raises(ValueError, match="FastV ranks the image tokens"):
        model.generate(**x, prompt_lookup_num_tokens=3, **GREEDY)


@pytest.mark.parametrize("kw, err, match", [
    (dict(mode="vit"), ValueError, "inside the language model only"),
    (dict(mode="hybrid"), ValueError, "inside the language model only"),
    (dict(method="random", keep_ratio=0.5), ValueError, "unknown InternVL / Mistral 3 method 'random'"),
    (dict(mode="llm", llm_layers=(0, DEPTH - 1)), ValueError, "end must be <= 4"),
    (dict(mode="llm", vit_keep=4), TypeError, "does not take"),
])
def test_bad_settings_raise_clear_errors(kw, err, match):
    model = make("internvl")
    with pytest.raises(err, match=match):
        saint.patch(model, **kw)
    assert not saint.is_patched(model)


def test_mistral3_has_no_one_patch_grid():
    from saint.adapters import find_adapter

    model = make("mistral3")
    with pytest.raises(ValueError, match="no one patch grid"):
        find_adapter(model).grid(model)
    internvl = make("internvl")
    grid = find_adapter(internvl).grid(internvl)
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
        scratch = model.generate(input_ids=conversation, **media, **GREEDY)
        assert torch.equal(cached, scratch)
        length = x["input_ids"].shape[1]
        assert torch.equal(model.generate(**x, **GREEDY, prefill_chunk_size=length), out.sequences)
        with pytest.raises(ValueError, match=f"prefill_chunk_size={length - 1} splits this {length}-token prompt"):
            model.generate(**x, **GREEDY, prefill_chunk_size=length - 1)

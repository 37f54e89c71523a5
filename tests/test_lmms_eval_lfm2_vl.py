"""lmms-eval's ``saint_lfm2_vl`` on a tiny random LFM2-VL checkpoint saved to disk with its own
processor (a BPE tokenizer trained here, LFM2-VL's image processor: 64 px tiles of 8 px
patches, a thumbnail, every image at its own size): nothing pruned equals the unpatched
model, the vit mode and ``random`` shrink every tile's tokens per prompt and each request
alone gets what it got in its batch, a score is the patched model's loss, and the
language-model methods and other checkpoints are refused before any weights load."""

from __future__ import annotations

from pathlib import Path

import pytest

from .lmms_helpers import (
    assert_alone_equals_batched,
    assert_same_results,
    build_llava,
    continuation_loss,
    direct_generation,
    family_fixtures,
    gen_requests,
    ll_requests,
    make_lm,
    need,
    sized_image,
    train_tokenizer,
)

SIZES = [(64, 64), (150, 100), (48, 40), (100, 150), (100, 60)]  # PIL (width, height): one tile, tiles + thumbnail
VIT_ARGS = "mode=vit,vit_layer=1,vit_ratio=0.5"
RANDOM_ARGS = "method=random,keep_ratio=0.25"
NOTHING_ARGS = ("mode=vit,vit_layer=1,vit_ratio=1.0", "method=random,keep_ratio=1.0")


def _build(path: Path, family: str) -> None:
    """A tiny random LFM2-VL checkpoint (:func:`tests.test_lfm2_vl.make`) and its processor."""
    transformers = pytest.importorskip("transformers")
    cells = [f"<|img_row_{r}_col_{c}|>" for r in range(1, 5) for c in range(1, 5)]
    special = ["<pad>", "<|startoftext|>", "<|im_end|>", "<image>", "<|image_start|>", "<|image_end|>",
               "<|img_thumbnail|>", "<|im_start|>", *cells]
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(special, ["user assistant"]), pad_token="<pad>", bos_token="<|startoftext|>",
        eos_token="<|im_end|>", extra_special_tokens={"image_token": "<image>"})
    images = transformers.Lfm2VlImageProcessor(tile_size=64, encoder_patch_size=8, max_num_patches=64,
                                               min_image_tokens=4, max_image_tokens=16, min_tiles=2, max_tiles=4,
                                               use_thumbnail=True, size={"height": 64, "width": 64})
    transformers.Lfm2VlProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    from .test_lfm2_vl import make

    make(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>")).save_pretrained(path)


checkpoint, family, docs = family_fixtures(_build, ["lfm2_vl"], SIZES)  # module-scoped fixtures


def visuals(doc: dict) -> list:
    return [sized_image(doc)]


def gen_reqs(docs: list[dict]) -> list:
    return gen_requests(docs, {"max_new_tokens": 4, "temperature": 0}, visuals)


def test_entry_point_resolves():
    need("lmms_eval")
    import lmms_eval.models

    from saint.integrations.lmms_llm_side import SaintLfm2Vl

    assert lmms_eval.models.get_model("saint_lfm2_vl") is SaintLfm2Vl


def test_nothing_pruned_equals_the_unpatched_model(checkpoint, family, docs):
    """``method=none`` generates what the unpatched model generates from the processor's
    prompt; settings that prune nothing give the same texts and scores."""
    base = make_lm("SaintLfm2Vl", checkpoint(family), "method=none", docs)
    gen, ll = gen_reqs(docs), ll_requests(docs, visuals)
    texts, scores = base.generate_until(gen), base.loglikelihood(ll)
    assert texts[0] == direct_generation(base, docs[0]["question"], visuals(docs[0]))
    assert_same_results({args: make_lm("SaintLfm2Vl", checkpoint(family), args, docs) for args in NOTHING_ARGS},
                        gen, ll, texts, scores)


@pytest.mark.parametrize("args", [VIT_ARGS, RANDOM_ARGS])
def test_batches_are_pruned_and_equal_single_requests(checkpoint, family, docs, args):
    """Images of different sizes (one tile, or tiles and a thumbnail) in one batch: every
    prompt hands the language model fewer image tokens than its processor made, each
    request alone gets the same text and score, and a score is the patched model's loss."""
    lm = make_lm("SaintLfm2Vl", checkpoint(family), args, docs)
    gen, ll = gen_reqs(docs), ll_requests(docs, visuals)
    batched = (lm.generate_until(gen), lm.loglikelihood(ll))
    assert {e["request"] for e in lm.pruning_log} == {"generate_until", "loglikelihood"}
    assert len({n for e in lm.pruning_log for n in e["image_tokens"]}) > 1  # images of different token counts
    for e in lm.pruning_log:
        assert e["llm_input"] == e["llm_output"]  # nothing dropped inside the language model
        assert all(0 < k < n for k, n in zip(e["llm_input"], e["image_tokens"], strict=True))
    assert_alone_equals_batched(lm, gen, ll, batched)
    rows = [(req, lm._loglikelihood_row(req)) for req in ll]
    tiled = [(req, row) for req, row in rows if len(row[2]["spatial_shapes"]) > 1]  # tiles and a thumbnail
    assert tiled and len(tiled) < len(rows)
    for req, (ids, n, media) in (tiled[0], next(r for r in rows if len(r[1][2]["spatial_shapes"]) == 1)):
        (result,) = lm.loglikelihood([req])
        assert result[0] == pytest.approx(continuation_loss(lm, ids, n, media), abs=1e-5)


def test_language_model_methods_and_other_checkpoints_refused(checkpoint, tmp_path):
    need("lmms_eval")
    from saint.integrations.lmms_llm_side import SaintLfm2Vl

    missing = str(tmp_path / "no-such-checkpoint")
    for mode in ("llm", "hybrid"):
        with pytest.raises(ValueError, match="LFM2-VL on the vision side only"):
            SaintLfm2Vl(pretrained=missing, mode=mode)
    with pytest.raises(ValueError, match="unknown LFM2-VL method 'fastv'"):
        SaintLfm2Vl(pretrained=missing, method="fastv")
    build_llava(tmp_path)
    with pytest.raises(ValueError, match="LFM2-VL checkpoints"):
        SaintLfm2Vl(pretrained=str(tmp_path))

"""Qwen3.5, dense and MoE (tiny, random; a Gated DeltaNet layer then a full-attention one),
served in bfloat16 (vLLM's CPU kernel for those layers takes nothing else): pruning off
decodes as transformers does; SAINT keeping a quarter of the image's 35 tokens feeds 9 to
the LLM, the same 9 transformers' fixed-budget drop picks, and decodes as transformers does
with them at their full-grid positions (within bfloat16's rounding); a long prompt resumes
from the prefix cache past its pruned image; pruning with videos allowed is refused."""

from __future__ import annotations

import json

import pytest
from conftest import BF16_LOGPROB_TOL, EngineFailed, assert_same_greedy_decoding
from reference import transformers_scores

NUM_IMAGE_TOKENS = 35  # the portrait, as for Qwen3-VL (the same tower geometry)
ENGINE = {"dtype": "bfloat16"}


@pytest.mark.parametrize("model, ratio, kept", [
    ("qwen3_5_dir", None, NUM_IMAGE_TOKENS), ("qwen3_5_dir", 0.25, 9), ("qwen3_5_moe_dir", 0.25, 9),
])
def test_qwen3_5_image_tokens_and_outputs(request, run_engine, image_path, model, ratio, kept):
    model_dir = request.getfixturevalue(model)
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(model_dir, image_path, overrides, engine=ENGINE)
    image_token = json.loads((model_dir / "config.json").read_text())["image_token_id"]
    assert got["prompt_token_ids"].count(image_token) == kept
    ref = transformers_scores(model_dir, image_path, got["prompt_token_ids"], got["token_ids"], ratio or 1.0)
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"], tol=BF16_LOGPROB_TOL)


def test_qwen3_5_pruning_with_videos_allowed_is_refused(run_engine, qwen3_5_dir, image_path):
    with pytest.raises(EngineFailed) as err:
        run_engine(qwen3_5_dir, image_path, {"saint_keep_ratio": 0.25},
                   engine={**ENGINE, "limit_mm_per_prompt": {"image": 1}})  # videos: vLLM's default limit
    assert "SAINT pruning of Qwen3.5 serves images only" in err.value.output


def test_qwen3_5_prefix_cache_resumes_after_the_pruned_image(run_engine, qwen3_5_dir, image_path):
    """A prompt longer than a cache block (vLLM sizes a hybrid model's blocks to its recurrent
    state: 640 tokens here), its pruned image in the first block: run again, it resumes from
    the cached block (attention cache and recurrent state) and decodes as transformers does."""
    engine = {**ENGINE, "enable_prefix_caching": True, "max_model_len": 2048, "filler_words": 700}
    got = run_engine(qwen3_5_dir, [[image_path], [image_path]], {"saint_keep_ratio": 0.25}, engine=engine)
    first = got["batched"][0]
    image_token = json.loads((qwen3_5_dir / "config.json").read_text())["image_token_id"]
    ids = first["prompt_token_ids"]
    assert ids.count(image_token) == 9 and len(ids) > 640
    last_image = max(i for i, t in enumerate(ids) if t == image_token)
    ref = transformers_scores(qwen3_5_dir, image_path, ids, first["token_ids"], 0.25)
    for out in [*got["batched"], *got["again"]]:
        assert out["prompt_token_ids"] == ids and out["token_ids"] == first["token_ids"]
        assert_same_greedy_decoding(out, ref["logprobs"], tol=BF16_LOGPROB_TOL)
    assert all(out["num_cached_tokens"] > last_image for out in got["again"])  # the image's block came from the cache

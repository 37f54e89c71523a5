"""Qwen3.5, dense and MoE (tiny, random; a Gated DeltaNet layer then a full-attention one),
served in bfloat16 (vLLM's CPU kernel for those layers takes nothing else): pruning off
decodes as transformers does; SAINT keeping a quarter of the image's 35 tokens feeds 9 to
the LLM, the same 9 transformers' fixed-budget drop picks, and decodes as transformers does
with them at their full-grid positions (within bfloat16's rounding); pruning with videos
allowed is refused."""

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

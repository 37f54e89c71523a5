"""Qwen3-VL, dense and MoE (tiny, random, two deepstack levels): pruning off equals
transformers; SAINT keeping a quarter of the image's 35 tokens feeds 9 to the LLM, chosen
and decoded as transformers does with the same kept set (main features and deepstack
features alike); pruning with videos allowed is refused at start."""

from __future__ import annotations

import json

import pytest
from conftest import EngineFailed, assert_same_greedy_decoding
from reference import transformers_scores

# The 224 x 168 portrait, resized by the processor to 224 x 160: 14 x 10 patches of 16
# pixels, merged 2 x 2 into 7 x 5 tokens.
NUM_IMAGE_TOKENS = 35


@pytest.mark.parametrize("model", ["qwen3_dir", "qwen3_moe_dir"])
@pytest.mark.parametrize("ratio, kept", [(None, NUM_IMAGE_TOKENS), (0.25, 9)])
def test_qwen3_vl_image_tokens_and_outputs(request, run_engine, image_path, model, ratio, kept):
    qwen3_dir = request.getfixturevalue(model)
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(qwen3_dir, image_path, overrides)
    image_token = json.loads((qwen3_dir / "config.json").read_text())["image_token_id"]
    assert got["prompt_token_ids"].count(image_token) == kept
    ref = transformers_scores(
        qwen3_dir, image_path, got["prompt_token_ids"], got["token_ids"], ratio or 1.0
    )
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])


def test_pruning_with_videos_allowed_fails_at_engine_start(run_engine, qwen3_dir, image_path):
    with pytest.raises(EngineFailed) as err:
        run_engine(
            qwen3_dir, image_path, {"saint_keep_ratio": 0.25},
            engine={"limit_mm_per_prompt": {"image": 1}},  # videos: vLLM's default limit
            processes=True,
        )
    assert "SAINT pruning of Qwen3-VL serves images only" in err.value.output
    assert "EngineCore" not in err.value.output  # raised before the engine core started

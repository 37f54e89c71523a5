"""PaliGemma and PaliGemma 2 (tiny, random): pruning off equals transformers; SAINT keeping
a quarter of the image's 64 tokens feeds 16 to the LLM (still in front of ``<bos>`` and the
prompt), chosen and decoded as transformers does on the same kept set. As for Gemma 3,
vLLM's bidirectional image attention has no CPU kernel: the engines run with
``is_mm_prefix_lm`` off against a causal reference."""

from __future__ import annotations

import json

import pytest
from conftest import assert_same_greedy_decoding
from reference import transformers_unit_scores

CAUSAL = {"is_mm_prefix_lm": False}


@pytest.mark.parametrize("ratio, kept", [(None, 64), (0.25, 16)])
@pytest.mark.parametrize("checkpoint", ["paligemma_dir", "paligemma2_dir"])
def test_paligemma_image_tokens_and_outputs(run_engine, request, image_path, checkpoint, ratio, kept):
    model_dir = request.getfixturevalue(checkpoint)
    got = run_engine(model_dir, image_path, CAUSAL if ratio is None else {**CAUSAL, "saint_keep_ratio": ratio})
    config = json.loads((model_dir / "config.json").read_text())
    prompt = got["prompt_token_ids"]
    assert prompt[:kept] == [config["image_token_index"]] * kept
    assert prompt[kept] == config["text_config"]["bos_token_id"] and prompt.count(config["image_token_index"]) == kept
    ref = transformers_unit_scores(model_dir, image_path, prompt, got["token_ids"], ratio or 1.0)
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])

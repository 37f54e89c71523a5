"""Gemma 4 (tiny, random: 16 px patches pooled 3 x 3, at most 70 soft tokens, per-layer input
embeddings; the portrait image gives 63 soft tokens): pruning off equals transformers'
Gemma 4; SAINT keeping a quarter feeds 16 of them to the LLM between the image's start and
end tokens, chosen and decoded as transformers does on the same kept set; encoder CUDA graphs
are refused while pruning."""

from __future__ import annotations

import json

import pytest
from conftest import EngineFailed, assert_same_greedy_decoding
from reference import transformers_gemma4_scores

NUM_IMAGE_TOKENS = 63


@pytest.mark.parametrize("ratio, kept", [(None, NUM_IMAGE_TOKENS), (0.25, 16)])
def test_gemma4_image_tokens_and_outputs(run_engine, gemma4_dir, image_path, ratio, kept):
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(gemma4_dir, image_path, overrides)
    config = json.loads((gemma4_dir / "config.json").read_text())
    ids = got["prompt_token_ids"]
    first = ids.index(config["image_token_id"])
    assert ids.count(config["image_token_id"]) == kept
    assert ids[first - 1] == config["boi_token_id"] and ids[first + kept] == config["eoi_token_id"]
    ref = transformers_gemma4_scores(gemma4_dir, image_path, ids, got["token_ids"], ratio or 1.0)
    assert ref["tokens"] == [NUM_IMAGE_TOKENS]
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])


def test_encoder_cuda_graphs_with_pruning_fail_at_engine_start(run_engine, gemma4_dir, image_path):
    with pytest.raises(EngineFailed) as err:
        run_engine(gemma4_dir, image_path, {"saint_keep_ratio": 0.25},
                   engine={"compilation_config": {"cudagraph_mm_encoder": True}})
    assert "encoder CUDA graphs (cudagraph_mm_encoder)" in err.value.output

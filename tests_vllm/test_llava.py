"""LLaVA-1.5 (tiny, random, CLIP tower): pruning off equals transformers; SAINT keeping a
quarter of the 64 image tokens feeds 16 to the LLM, chosen and decoded as transformers does
on the same kept set."""

from __future__ import annotations

import json

import pytest
from conftest import EngineFailed, assert_same_greedy_decoding
from reference import transformers_llava_scores


@pytest.mark.parametrize("ratio, kept", [(None, 64), (0.25, 16)])
def test_llava_image_tokens_and_outputs(run_engine, llava_dir, image_path, ratio, kept):
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(llava_dir, image_path, overrides)
    image_token = json.loads((llava_dir / "config.json").read_text())["image_token_index"]
    assert got["prompt_token_ids"].count(image_token) == kept
    ref = transformers_llava_scores(
        llava_dir, image_path, got["prompt_token_ids"], got["token_ids"], ratio or 1.0
    )
    if ratio is not None:
        assert got["kept"] == ref["kept"]
    assert_same_greedy_decoding(got, ref["logprobs"])


def test_precomputed_embeddings_are_refused_at_start(run_engine, llava_dir, image_path):
    """With pruning on, ``enable_mm_embeds`` stops the engine at start with the reason: a
    request carrying image embeddings was refused in the worker, which stopped the whole
    engine (every later request failed, or hung in one process)."""
    with pytest.raises(EngineFailed) as err:
        run_engine(llava_dir, image_path, {"saint_keep_ratio": 0.25}, engine={"enable_mm_embeds": True})
    assert "saint_keep_ratio with enable_mm_embeds: precomputed image embeddings cannot be pruned" in err.value.output

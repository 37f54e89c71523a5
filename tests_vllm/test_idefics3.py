"""Idefics3 (tiny, random; the same override serves SmolVLM): pruning off equals
transformers; SAINT keeping a quarter of every tile's 16 image tokens feeds 4 per tile to
the LLM, chosen and decoded as transformers does on the same kept set."""

from __future__ import annotations

import json

import pytest
from conftest import assert_same_greedy_decoding
from reference import transformers_idefics3_scores


@pytest.mark.parametrize("ratio, per_tile", [(None, 16), (0.25, 4)])
def test_idefics3_image_tokens_and_outputs(run_engine, idefics3_dir, image_path, ratio, per_tile):
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(idefics3_dir, image_path, overrides)
    image_token = json.loads((idefics3_dir / "config.json").read_text())["image_token_id"]
    ref = transformers_idefics3_scores(idefics3_dir, image_path, got["prompt_token_ids"], got["token_ids"], ratio or 1.0)
    assert ref["tiles"] > 1  # the portrait image is split: every tile keeps its own share
    assert got["prompt_token_ids"].count(image_token) == per_tile * ref["tiles"]
    if ratio is not None:
        assert got["kept"] == ref["kept"]
    assert_same_greedy_decoding(got, ref["logprobs"])

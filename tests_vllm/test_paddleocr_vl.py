"""PaddleOCR-VL (tiny, random, saved under the hub's weight names): vLLM's own PaddleOCR-VL never
prunes, so the override adds the pruning path. Pruning off equals transformers; SAINT keeping
a quarter of the image's 48 tokens feeds 12 placeholders to the LLM, chosen and decoded as
transformers does with the same kept set at their full-grid M-RoPE positions (the text after
the image at its unpruned positions)."""

from __future__ import annotations

import json

import pytest
from conftest import assert_same_greedy_decoding
from reference import transformers_scores

# The 224 x 168 portrait: 16 x 12 patches of 14 pixels, merged 2 x 2 into 8 x 6 tokens.
NUM_IMAGE_TOKENS = 48


@pytest.mark.parametrize("ratio, kept", [(None, NUM_IMAGE_TOKENS), (0.25, 12)])
def test_paddleocr_vl_image_tokens_and_outputs(run_engine, paddleocr_vl_dir, image_path, ratio, kept):
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(paddleocr_vl_dir, image_path, overrides)
    image_token = json.loads((paddleocr_vl_dir / "config.json").read_text())["image_token_id"]
    assert got["prompt_token_ids"].count(image_token) == kept
    ref = transformers_scores(paddleocr_vl_dir, image_path, got["prompt_token_ids"], got["token_ids"], ratio or 1.0)
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])

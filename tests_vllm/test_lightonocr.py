"""LightOnOCR (tiny, random, saved as the hub's LightOnOCR-1B is: Mistral 3's model type, a
Pixtral tower with 16 px patches merged 2 x 2, a Qwen3 LM; the portrait image gives 4 rows of
3 tokens in one run, no row breaks): pruning off equals transformers' LightOnOCR; SAINT
keeping half feeds 6 of the image's 12 tokens to the LLM, chosen over the whole image and
decoded as transformers does on the same kept set."""

from __future__ import annotations

import json

import pytest
from conftest import assert_same_greedy_decoding
from reference import transformers_lighton_ocr_scores

NUM_IMAGE_TOKENS = 12


@pytest.mark.parametrize("ratio, kept", [(None, NUM_IMAGE_TOKENS), (0.5, 6)])
def test_lighton_ocr_image_tokens_and_outputs(run_engine, lighton_ocr_dir, image_path, ratio, kept):
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(lighton_ocr_dir, image_path, overrides)
    image_token = json.loads((lighton_ocr_dir / "config.json").read_text())["image_token_id"]
    ids = got["prompt_token_ids"]
    first = ids.index(image_token)
    assert ids.count(image_token) == kept and ids[first : first + kept] == [image_token] * kept  # one run
    ref = transformers_lighton_ocr_scores(lighton_ocr_dir, image_path, ids, got["token_ids"], ratio or 1.0)
    assert ref["tokens"] == [NUM_IMAGE_TOKENS]
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])

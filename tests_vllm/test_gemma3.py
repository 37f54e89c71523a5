"""Gemma 3 (tiny, random): pruning off equals transformers; SAINT keeping a quarter of each
image's 16 tokens feeds 4 to the LLM, chosen and decoded as transformers does on the same
kept set; with pan-and-scan every crop keeps its own quarter. vLLM's bidirectional
attention over image tokens (the "mm prefix") has no CPU kernel, so these engines run with
``is_mm_prefix_lm`` off and the reference is causal too: what is tested is the pruning
(counts, prompt, kept set, decoding), not that attention."""

from __future__ import annotations

import json

import pytest
from conftest import assert_same_greedy_decoding
from reference import transformers_unit_scores

CAUSAL = {"is_mm_prefix_lm": False}  # vLLM's CPU attention cannot run Gemma 3's image attention
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32, "pan_and_scan_max_num_crops": 2,
                "pan_and_scan_min_ratio_to_activate": 1.2}


@pytest.mark.parametrize("ratio, per_unit, image_kwargs", [
    (None, 16, {}), (0.25, 4, {}), (0.25, 4, PAN_AND_SCAN),
])
def test_gemma3_image_tokens_and_outputs(run_engine, gemma3_dir, image_path, ratio, per_unit, image_kwargs):
    overrides = CAUSAL if ratio is None else {**CAUSAL, "saint_keep_ratio": ratio}
    engine = {"mm_processor_kwargs": image_kwargs} if image_kwargs else None
    got = run_engine(gemma3_dir, image_path, overrides, engine=engine)
    image_token = json.loads((gemma3_dir / "config.json").read_text())["image_token_index"]
    ref = transformers_unit_scores(gemma3_dir, image_path, got["prompt_token_ids"], got["token_ids"],
                                     ratio or 1.0, **image_kwargs)
    (units,) = ref["tiles"]
    assert units == (3 if image_kwargs else 1)  # pan-and-scan: the image and two crops, each its own share
    assert got["prompt_token_ids"].count(image_token) == per_unit * units
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])

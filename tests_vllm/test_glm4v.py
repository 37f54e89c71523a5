"""GLM-4.1V, GLM-4.5V, GLM-OCR and PaddleOCR-VL (tiny, random; the MoE, GLM-OCR and PaddleOCR-VL,
saved under the hub's weight names, for the first test): vLLM's own GLM-4.1V and PaddleOCR-VL
never prune, so their overrides add the pruning path. Pruning off equals transformers; SAINT keeping a quarter of the image's 48
tokens feeds 12 ``<|image|>`` placeholders to the LLM, chosen and decoded as transformers
does with the same kept set at their full-grid M-RoPE positions (the text after the image at
its unpruned positions); pruning with videos allowed, and vLLM's video pruning on this
class, are refused at start."""

from __future__ import annotations

import json

import pytest
from conftest import EngineFailed, assert_same_greedy_decoding
from reference import transformers_scores

# The 224 x 168 portrait: 16 x 12 patches of 14 pixels, merged 2 x 2 into 8 x 6 tokens.
NUM_IMAGE_TOKENS = 48


@pytest.mark.parametrize("ratio, kept", [(None, NUM_IMAGE_TOKENS), (0.25, 12)])
@pytest.mark.parametrize("checkpoint", ["glm4v_dir", "glm4v_moe_dir", "glm_ocr_dir", "paddleocr_vl_dir"])
def test_glm4v_image_tokens_and_outputs(run_engine, request, image_path, checkpoint, ratio, kept):
    glm4v_dir = request.getfixturevalue(checkpoint)
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(glm4v_dir, image_path, overrides)
    image_token = json.loads((glm4v_dir / "config.json").read_text())["image_token_id"]
    assert got["prompt_token_ids"].count(image_token) == kept
    ref = transformers_scores(glm4v_dir, image_path, got["prompt_token_ids"], got["token_ids"], ratio or 1.0)
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])


@pytest.mark.parametrize("checkpoint, overrides, engine, message", [
    ("glm4v_dir", {"saint_keep_ratio": 0.25}, {"limit_mm_per_prompt": {"image": 1}},
     "SAINT pruning of GLM-4.1V serves images only"),
    ("glm4v_dir", {}, {"video_pruning_rate": 0.5}, "vLLM's GLM-4.1V has no video pruning"),
    ("glm_ocr_dir", {"saint_keep_ratio": 0.25}, {"limit_mm_per_prompt": {"image": 1}},
     "SAINT pruning of GLM-OCR serves images only"),
])
def test_videos_with_pruning_fail_at_engine_start(run_engine, request, image_path, checkpoint, overrides, engine,
                                                  message):
    with pytest.raises(EngineFailed) as err:
        run_engine(request.getfixturevalue(checkpoint), image_path, overrides, engine=engine)
    assert message in err.value.output

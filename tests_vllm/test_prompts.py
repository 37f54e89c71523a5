"""Several images per prompt, batched requests and the prefix cache, with SAINT pruning on
(``saint_keep_ratio=0.25``), on Qwen2.5-VL, Qwen2.5-Omni, Qwen3-Omni, Qwen3-VL, Qwen3.5, GLM-4.1V, LLaVA-1.5, LLaVA-NeXT and InternVL
(both formats; the chat format's reference is transformers on the same weights): one
engine per model,
block size 32 with prefix caching. The requests run together, then each again on its own,
which finds its images in the prefix cache; both times every request decodes as
transformers does with the same kept tokens (Qwen-VL, GLM: at their full-grid positions).

Qwen3.5 runs in bfloat16 (vLLM's CPU Gated DeltaNet kernel) and is compared within
bfloat16's rounding. Its prefix cache is not reached here: vLLM sizes a hybrid model's
attention blocks to its recurrent state's page, 544 tokens for the tiny model, longer
than these prompts, so its second run only repeats the first (``test_qwen3_5.py`` runs a
prompt long enough)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import BF16_LOGPROB_TOL, LOGPROB_TOL, assert_same_greedy_decoding
from PIL import Image
from reference import (
    transformers_anyres_scores,
    transformers_internvl_scores,
    transformers_llava_scores,
    transformers_omni_scores,
    transformers_scores,
)

from saint.integrations.vllm.settings import SaintVllmSettings

RATIO = 0.25
ENGINE = {"block_size": 32, "enable_prefix_caching": True, "max_num_seqs": 3,
          "limit_mm_per_prompt": {"image": 2, "video": 0}}


@pytest.fixture(scope="module")
def landscape_path(tmp_path_factory) -> Path:
    """A landscape image (112 x 196), so a prompt's two images have different grids."""
    pixels = np.random.default_rng(1).integers(0, 256, (112, 196, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "landscape.png"
    Image.fromarray(pixels).save(path)
    return path


FAMILIES = {  # checkpoint fixture, reference, its checkpoint fixture, that config's image token key (dotted: nested)
    "qwen2_5_vl": ("model_dir", transformers_scores, "model_dir", "image_token_id"),
    "qwen3_vl": ("qwen3_dir", transformers_scores, "qwen3_dir", "image_token_id"),
    "qwen3_5": ("qwen3_5_dir", transformers_scores, "qwen3_5_dir", "image_token_id"),
    "qwen2_5_omni": ("omni_dir", transformers_omni_scores, "omni_dir", "thinker_config.image_token_index"),
    "qwen3_omni_moe": ("omni3_dir", transformers_omni_scores, "omni3_dir", "thinker_config.image_token_id"),
    "glm4v": ("glm4v_dir", transformers_scores, "glm4v_dir", "image_token_id"),
    "paddleocr_vl": ("paddleocr_vl_dir", transformers_scores, "paddleocr_vl_dir", "image_token_id"),
    "llava": ("llava_dir", transformers_llava_scores, "llava_dir", "image_token_index"),
    "llava_next": ("llava_next_dir", transformers_anyres_scores, "llava_next_dir", "image_token_index"),
    "internvl": ("internvl_dir", transformers_internvl_scores, "internvl_dir", "image_token_id"),
    "internvl_chat": ("internvl_chat_dir", transformers_internvl_scores, "internvl_dir", "image_token_id"),
}
BF16 = {"qwen3_5"}  # families vLLM serves on CPU in bfloat16 only, and with no prefix cache at this size


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_images_batches_and_prefix_cache_decode_as_transformers(
    family, request, run_engine, image_path, landscape_path
):
    fixture, reference, reference_fixture, token_key = FAMILIES[family]
    model_dir = request.getfixturevalue(reference_fixture)
    prompts = [[image_path, landscape_path], [landscape_path], [image_path]]
    bf16 = family in BF16
    engine = {**ENGINE, "dtype": "bfloat16"} if bf16 else ENGINE
    tol = BF16_LOGPROB_TOL if bf16 else LOGPROB_TOL
    got = run_engine(request.getfixturevalue(fixture), prompts, {"saint_keep_ratio": RATIO}, engine=engine)
    image_token = json.loads((model_dir / "config.json").read_text())
    for key in token_key.split("."):
        image_token = image_token[key]
    settings = SaintVllmSettings(RATIO)
    cached_images = 0
    for paths, batched, again in zip(prompts, got["batched"], got["again"], strict=True):
        ref = reference(model_dir, paths, batched["prompt_token_ids"], batched["token_ids"], RATIO)
        assert len(ref["kept"]) == len(paths)
        if "tokens" in ref:  # one budget per image (tiled models: per tile or part, in their own tests)
            assert [len(k) for k in ref["kept"]] == [
                settings.kept_tokens(n) for n in ref["tokens"]], "each image's run is its budget"
        assert_same_greedy_decoding(batched, ref["logprobs"], tol)
        assert again["prompt_token_ids"] == batched["prompt_token_ids"]
        assert_same_greedy_decoding(again, ref["logprobs"], tol)
        last_image_token = max(i for i, t in enumerate(batched["prompt_token_ids"]) if t == image_token)
        cached_images += again["num_cached_tokens"] > last_image_token
    if not bf16:
        assert cached_images >= 2  # the single-image prompts found their image in the prefix cache

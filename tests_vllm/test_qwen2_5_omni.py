"""Qwen2.5-Omni (tiny, random; the whole-model checkpoint whose thinker vLLM serves): vLLM's
thinker never prunes, so the override adds the pruning path. Pruning off equals plain vLLM and
transformers; SAINT keeping a quarter of the image's 48 tokens feeds 12 to the LLM, chosen
and decoded as transformers' thinker does with the same kept set, alone and after an audio
clip (whose tokens pass unpruned at their own positions, the text after both at its unpruned
positions); videos with pruning, and vLLM's video pruning, are refused at start."""

from __future__ import annotations

import json

import pytest
from conftest import EngineFailed, assert_same_greedy_decoding
from reference import transformers_omni_scores
from run_engine import audio_clip

NUM_IMAGE_TOKENS = 48  # the 224 x 168 portrait: 16 x 12 patches of 14 pixels, merged 2 x 2
AUDIO_TOKENS = 25  # one second of audio
WITH_AUDIO = {"audio_seconds": 1, "limit_mm_per_prompt": {"image": 1, "video": 0, "audio": 1}}


def _thinker_ids(omni_dir) -> dict:
    return json.loads((omni_dir / "config.json").read_text())["thinker_config"]


def test_pruning_off_equals_plain_vllm(run_engine, omni_dir, image_path):
    plain = run_engine(omni_dir, image_path, {}, plugins="saint_compat", engine=WITH_AUDIO)
    off = run_engine(omni_dir, image_path, {}, engine=WITH_AUDIO)
    assert off["kept"] == [] and off["prompt_token_ids"] == plain["prompt_token_ids"]
    assert off["token_ids"] == plain["token_ids"]
    assert off["logprobs"] == pytest.approx(plain["logprobs"], abs=1e-5)


@pytest.mark.parametrize("audio", [False, True], ids=["image", "audio-and-image"])
@pytest.mark.parametrize("ratio, kept", [(None, NUM_IMAGE_TOKENS), (0.25, 12)])
def test_image_tokens_and_outputs(run_engine, omni_dir, image_path, ratio, kept, audio):
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(omni_dir, image_path, overrides, engine=WITH_AUDIO if audio else None)
    ids = _thinker_ids(omni_dir)
    assert got["prompt_token_ids"].count(ids["image_token_index"]) == kept
    assert got["prompt_token_ids"].count(ids["audio_token_index"]) == (AUDIO_TOKENS if audio else 0)
    ref = transformers_omni_scores(omni_dir, image_path, got["prompt_token_ids"], got["token_ids"], ratio or 1.0,
                                   audio=audio_clip(1) if audio else None)
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])


@pytest.mark.parametrize("overrides, engine, message", [
    ({"saint_keep_ratio": 0.25}, {"limit_mm_per_prompt": {"image": 1}},
     "SAINT pruning of Qwen2.5-Omni serves images only"),
    ({}, {"video_pruning_rate": 0.5}, "vLLM's Qwen2.5-Omni has no video pruning"),
])
def test_videos_with_pruning_fail_at_engine_start(run_engine, omni_dir, image_path, overrides, engine, message):
    with pytest.raises(EngineFailed) as err:
        run_engine(omni_dir, image_path, overrides, engine=engine)
    assert message in err.value.output

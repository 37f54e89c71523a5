"""Qwen2.5-Omni and Qwen3-Omni (tiny, random; whole-model checkpoints whose thinker vLLM
serves): vLLM's thinkers never prune, so the overrides add the pruning path. Pruning off
equals plain vLLM and transformers; SAINT keeping a quarter of the image's tokens feeds that
many to the LLM, chosen and decoded as transformers' thinker does with the same kept set
(Qwen3-Omni: with their deepstack features), alone and after an audio clip (whose tokens pass
unpruned at their own positions, the text after both at its unpruned positions); videos with
pruning, vLLM's video pruning, and settings given inside the thinker's config (where they would
go unread) are refused at start."""

from __future__ import annotations

import json

import pytest
from conftest import EngineFailed, assert_same_greedy_decoding
from reference import transformers_omni_scores
from run_engine import audio_clip

FAMILIES = {  # checkpoint fixture: name in the refusals, the thinker config's image and audio token keys,
    # the portrait's image tokens (48: patch 14; 35: patch 16) and kept at 0.25, audio tokens in one second
    "omni_dir": ("Qwen2.5-Omni", "image_token_index", "audio_token_index", 48, 12, 25),
    "omni3_dir": ("Qwen3-Omni", "image_token_id", "audio_token_id", 35, 9, 13),
}
WITH_AUDIO = {"audio_seconds": 1, "limit_mm_per_prompt": {"image": 1, "video": 0, "audio": 1}}


@pytest.fixture(params=sorted(FAMILIES))
def omni(request):
    """``(checkpoint folder, its FAMILIES row)``."""
    return request.getfixturevalue(request.param), FAMILIES[request.param]


def test_pruning_off_equals_plain_vllm(run_engine, omni, image_path):
    model_dir, _ = omni
    plain = run_engine(model_dir, image_path, {}, plugins="saint_compat", engine=WITH_AUDIO)
    off = run_engine(model_dir, image_path, {}, engine=WITH_AUDIO)
    assert off["kept"] == [] and off["prompt_token_ids"] == plain["prompt_token_ids"]
    assert off["token_ids"] == plain["token_ids"]
    assert off["logprobs"] == pytest.approx(plain["logprobs"], abs=1e-5)


@pytest.mark.parametrize("audio", [False, True], ids=["image", "audio-and-image"])
@pytest.mark.parametrize("ratio", [None, 0.25])
def test_image_tokens_and_outputs(run_engine, omni, image_path, ratio, audio):
    model_dir, (_, image_key, audio_key, tokens, kept, audio_tokens) = omni
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(model_dir, image_path, overrides, engine=WITH_AUDIO if audio else None)
    ids = json.loads((model_dir / "config.json").read_text())["thinker_config"]
    assert got["prompt_token_ids"].count(ids[image_key]) == (tokens if ratio is None else kept)
    assert got["prompt_token_ids"].count(ids[audio_key]) == (audio_tokens if audio else 0)
    ref = transformers_omni_scores(model_dir, image_path, got["prompt_token_ids"], got["token_ids"], ratio or 1.0,
                                   audio=audio_clip(1) if audio else None)
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])


@pytest.mark.parametrize("overrides, engine, message", [
    ({"saint_keep_ratio": 0.25}, {"limit_mm_per_prompt": {"image": 1}}, "SAINT pruning of {} serves images only"),
    ({}, {"video_pruning_rate": 0.5}, "vLLM's {} has no video pruning"),
    ({"thinker_config": {"saint_keep_ratio": 0.25}}, {}, "['thinker_config.saint_keep_ratio'] set inside a sub-config"),
])
def test_videos_with_pruning_and_nested_settings_fail_at_engine_start(run_engine, omni, image_path, overrides, engine, message):
    model_dir, (family, *_) = omni
    with pytest.raises(EngineFailed) as err:
        run_engine(model_dir, image_path, overrides, engine=engine)
    assert message.format(family) in err.value.output

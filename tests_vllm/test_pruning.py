"""SAINT pruning on (``saint_keep_ratio=0.25``): one engine for the module, its engine core in
its own process as ``vllm serve`` runs it (the plugin loaded there from its entry point)."""

from __future__ import annotations

import json

import pytest
from conftest import EngineFailed, assert_same_greedy_decoding
from reference import transformers_scores

from saint.integrations.vllm.settings import SaintVllmSettings

RATIO = 0.25
NUM_IMAGE_TOKENS = 48  # the portrait image: 16 x 12 patches, merged 2 x 2


@pytest.fixture(scope="module")
def pruned(run_engine, model_dir, image_path) -> dict:
    return run_engine(model_dir, image_path, {"saint_keep_ratio": RATIO}, processes=True)  # as vllm serve runs


def test_image_tokens_entering_the_llm_equal_the_budget(pruned, model_dir):
    image_token = json.loads((model_dir / "config.json").read_text())["image_token_id"]
    budget = SaintVllmSettings(RATIO).kept_tokens(NUM_IMAGE_TOKENS)
    assert budget == 12
    assert pruned["prompt_token_ids"].count(image_token) == budget  # placeholders fed to the LLM
    (kept,) = pruned["kept"]  # embeddings the model produced for them
    assert len(kept) == budget
    assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < NUM_IMAGE_TOKENS


def test_outputs_equal_transformers_on_the_same_kept_set(pruned, model_dir, image_path):
    ref = transformers_scores(
        model_dir, image_path, pruned["prompt_token_ids"], pruned["token_ids"], RATIO
    )
    assert pruned["kept"] == ref["kept"]
    assert_same_greedy_decoding(pruned, ref["logprobs"])


def test_evs_video_pruning_with_saint_fails_at_engine_start(run_engine, model_dir, image_path):
    """Qwen2.5-VL with ``--video-pruning-rate`` and SAINT: an EVS video's shortened run
    crashed the prompt's positions in the runner on every video request (ratio 1.0 too);
    the pair is refused at start, with the reason."""
    with pytest.raises(EngineFailed) as err:
        run_engine(model_dir, image_path, {"saint_keep_ratio": 0.25}, engine={"video_pruning_rate": 0.5})
    assert "--video-pruning-rate (EVS) together with saint_keep_ratio is not supported on Qwen2.5-VL" in err.value.output

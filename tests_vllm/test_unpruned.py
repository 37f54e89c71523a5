"""Plugin installed, pruning off: identical to plain vLLM (``VLLM_PLUGINS=saint_compat``,
the torchvision shim alone), and both equal transformers."""

from __future__ import annotations

from conftest import LOGPROB_TOL, assert_same_greedy_decoding
from reference import transformers_scores


def test_pruning_off_equals_plain_vllm_and_transformers(run_engine, model_dir, image_path):
    plain = run_engine(model_dir, image_path, {}, plugins="saint_compat")
    off = run_engine(model_dir, image_path, {})
    assert plain["kept"] == [] and off["kept"] == []  # nothing was pruned
    assert off["prompt_token_ids"] == plain["prompt_token_ids"]
    assert off["token_ids"] == plain["token_ids"]
    for a, b in zip(off["logprobs"], plain["logprobs"], strict=True):
        assert abs(a - b) <= LOGPROB_TOL
    ref = transformers_scores(
        model_dir, image_path, plain["prompt_token_ids"], plain["token_ids"], 1.0
    )
    assert_same_greedy_decoding(plain, ref["logprobs"])

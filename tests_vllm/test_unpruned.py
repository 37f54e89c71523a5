"""Plugin installed, pruning off: identical to plain vLLM (``VLLM_PLUGINS=saint_compat``,
the torchvision shim alone), and both equal transformers."""

from __future__ import annotations

from conftest import run_engine
from reference import transformers_greedy
from run_engine import MAX_TOKENS


def test_pruning_off_equals_plain_vllm_and_transformers(model_dir, image_path):
    plain = run_engine(model_dir, image_path, {}, plugins="saint_compat")
    off = run_engine(model_dir, image_path, {})
    assert plain["kept"] == [] and off["kept"] == []  # nothing was pruned
    assert off["prompt_token_ids"] == plain["prompt_token_ids"]
    assert off["token_ids"] == plain["token_ids"]
    ref = transformers_greedy(model_dir, image_path, plain["prompt_token_ids"], 1.0, MAX_TOKENS)
    assert plain["token_ids"] == ref["token_ids"]

"""benchmarks/resize_baseline.py: the lower-resolution baseline's sizes and measurements."""

from __future__ import annotations

import argparse

import pytest
import torch

from .conftest import benchmark_script, offline_photos_and_model


def test_lower_sizes_are_patch_multiples_below_the_full_size() -> None:
    rb = benchmark_script("resize_baseline")
    assert rb.lower_sizes(518) == [490, 448, 406, 350, 308, 252]  # 37 patches a side x sqrt(fraction), rounded
    assert rb.lower_sizes(224) == [210, 196, 168, 154, 126, 112]
    assert rb.lower_sizes(28) == [14]  # repeats dropped: 2 patches a side round to 2 or 1
    with pytest.raises(SystemExit, match="multiple of 14"):
        rb.check_sizes(224, [200])
    with pytest.raises(SystemExit, match="below --size"):
        rb.check_sizes(224, [224])


def test_measure_scores_each_size_against_the_full_one() -> None:
    """Real weights and photos: the full size scores itself perfectly, a lower size
    computes fewer tokens and FLOPs and is timed in the same round robin."""
    rb = benchmark_script("resize_baseline")
    photos, _ = offline_photos_and_model(4, 56)
    args = argparse.Namespace(batch_size=3, eval_batch=2, warmup=0, repeats=1)
    torch.manual_seed(0)
    full, low = rb.measure(56, [28], photos, args)
    assert (full["size"], full["tokens"], low["size"], low["tokens"]) == (56, 17, 28, 5)
    assert full["flops_ratio"] == 1.0 and full["speedup"] == 1.0 and full["retrieval_at_1"] == 1.0
    assert full["centered_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert low["flops_ratio"] > 3.0 and low["centered_cosine"] < full["centered_cosine"]
    assert low["ms_min"] > 0 and low["speedup_best"] > 0

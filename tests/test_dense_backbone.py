"""benchmarks/dense_backbone_cpu.py: the merged backbone's feature maps against the unpruned ones."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from .conftest import benchmark_script, offline_photos_and_model


def test_patch_cosine_known_answers() -> None:
    db = benchmark_script("dense_backbone_cpu")
    ref = [torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))]
    assert torch.allclose(db.patch_cosine(ref, ref, centered=True)[0], torch.ones(3))
    assert torch.allclose(db.patch_cosine([-ref[0]], ref, centered=False)[0], -torch.ones(3))
    shifted = [ref[0] + ref[0].mean(dim=(0, 2, 3), keepdim=True)]  # the same maps plus their mean patch
    assert not torch.allclose(db.patch_cosine(shifted, ref, centered=True)[0], torch.ones(3))


def test_measure_compares_every_variant_with_the_unpruned_maps() -> None:
    """Real weights and photos: the unpruned backbone matches itself at every feature layer;
    ToMe and a calibrated saint_match compute fewer FLOPs, keep maps close but not equal,
    and are timed in the same round robin."""
    pytest.importorskip("transformers")
    db = benchmark_script("dense_backbone_cpu")
    photos, _ = offline_photos_and_model(7, 56)
    args = argparse.Namespace(size=56, tome_r="1", targets="1.3", batch_size=2, eval_batch=2, warmup=0, repeats=1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a target out of reach on 3 photos of 16 patches only warns
        unpruned, tome, match = db.measure(photos[:4], photos[4:], args)
    assert unpruned["variant"] == "unpruned" and unpruned["flops_ratio"] == 1.0 and unpruned["speedup"] == 1.0
    assert unpruned["patch_cosine"] == pytest.approx([1.0] * 4, abs=1e-5)
    for row in (tome, match):
        assert row["flops_ratio"] > 1.0 and row["ms_median"] > 0
        assert all(0.0 < c < 1.0 for c in row["patch_cosine"]) and len(row["worst_photo"]) == 4
    assert tome["variant"] == "tome r=1, keep_norm" and match["variant"].startswith("saint_match 1.3x")

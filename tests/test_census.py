"""The op census counts what a GPU's launch overhead scales with, and ToMe on a
rectangular batch reads nothing back from the device."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import saint
from saint.core import keep_mask_to_indices
from saint.core.paths import accelerator_paths_everywhere
from saint.measure.census import op_census

from .conftest import make_tiny


def test_census_known_answers():
    x = torch.arange(6.0).reshape(2, 3)
    c = op_census(lambda: x.view(3, 2).t() + 1)
    assert dict(c.ops) == {"view": 1, "t": 1, "add": 1} and c.kernels == 1 and c.host_syncs == 0
    assert dict(op_census(lambda: x[x > 2]).syncs) == {"index (boolean mask)": 1}
    assert dict(op_census(lambda: x.sum().item()).syncs) == {"_local_scalar_dense": 1}
    assert dict(op_census(lambda: bool(x.all())).syncs) == {"_local_scalar_dense": 1}
    assert dict(op_census(lambda: x.tolist()).syncs) == {"tolist": 1}
    counts = torch.tensor([1, 2])
    assert op_census(lambda: torch.repeat_interleave(counts)).host_syncs == 1
    assert op_census(lambda: torch.repeat_interleave(counts, output_size=3)).host_syncs == 0
    assert op_census(lambda: torch.tensor([1.0, 2.0])).host_tensors == 1
    assert torch.Tensor.tolist(counts) == [1, 2]  # the counting wrapper is gone again


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.data())
def test_a_host_known_count_gives_the_same_indices(b, n, data):
    count = data.draw(st.integers(0, n))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    keep = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        keep[row, torch.randperm(n, generator=g)[:count]] = True
    order = torch.randint(0, 5, (b, n), generator=g) if data.draw(st.booleans()) else None
    for align in ("left", "right"):
        idx, valid = keep_mask_to_indices(keep, align, order)
        known, known_valid = keep_mask_to_indices(keep, align, order, count=count)
        assert bool(valid.all()) and torch.equal(known, idx) and torch.equal(known_valid, valid)
        assert op_census(lambda align=align: keep_mask_to_indices(keep, align, order, count=count)).host_syncs == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.data())
def test_a_host_known_width_gives_the_same_indices(b, n, data):
    """Ragged rows: with the largest kept count known on the host, the same indices and
    validity, and nothing read back."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    keep = torch.rand(b, n, generator=g) < data.draw(st.floats(0.0, 1.0))
    order = torch.randint(0, 5, (b, n), generator=g) if data.draw(st.booleans()) else None
    width = int(keep.sum(dim=1).max())
    for align in ("left", "right"):
        idx, valid = keep_mask_to_indices(keep, align, order)
        known, known_valid = keep_mask_to_indices(keep, align, order, width=width)
        assert torch.equal(known, idx) and torch.equal(known_valid, valid)
        assert op_census(lambda align=align: keep_mask_to_indices(keep, align, order, width=width)).host_syncs == 0


def test_tome_on_a_rectangular_batch_reads_nothing_back():
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for arch, kwargs in [("vit", {"order": "reference"}), ("dinov2_reg", {"keep_norm": True}), ("deit3", {})]:
        model = make_tiny(arch)
        saint.patch(model, "tome", r=2, **kwargs)
        with accelerator_paths_everywhere():  # the path a GPU takes
            census = op_census(lambda model=model: model(x))
        assert census.host_syncs == 0, (arch, dict(census.syncs))
        assert saint.stats(model).layout == "rectangular"
        assert op_census(lambda model=model: model(x)).host_syncs > 0  # a CPU keeps its stream merge


def test_the_read_back_free_path_gives_the_cpu_path_answer():
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for arch in ("vit", "dinov2_reg"):
        model = make_tiny(arch)
        for kwargs in ({}, {"order": "reference"}, {"keep_norm": True, "layout": "padded"},
                       {"prop_attn": False, "select_at": "attention"}):
            saint.patch(model, "tome", r=3, **kwargs)
            with torch.no_grad():
                ref = model(x)
                with accelerator_paths_everywhere():
                    out = model(x)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
            saint.unpatch(model)


@pytest.mark.parametrize("method, kwargs", [
    ("tome", dict(r=2)), ("saint_plus", dict(tau=0.3)), ("saint_match", dict(tau=0.3, fraction=0.7, guard=0.5)),
    ("saint_match", dict(tau=0.3, fraction=0.7, keep_norm=True, select_at="attention")),
])
def test_the_accelerator_paths_dispatch_as_many_ops_whatever_the_batch(method, kwargs):
    """On a GPU every op is a launch: the accelerators' forms, with a GPU's packed attention
    kernel (one call per block), run a fixed number of ops per block (no per-image loop),
    so 3 images and 6 (the same 3 twice: the same counts, the same branches) dispatch
    exactly as many; a CPU's per-image attention loop dispatches more."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = make_tiny("vit")
    saint.patch(model, method, **kwargs, **({} if method == "tome" else {"kernel": "padded"}))

    def ops(batch: torch.Tensor) -> int:
        return op_census(lambda: model(batch)).total

    with accelerator_paths_everywhere():
        small, large = ops(x), ops(torch.cat([x, x]))
    assert small == large
    assert saint.stats(model).layout == ("rectangular" if method == "tome" else "packed")
    if method != "tome":
        saint.patch(saint.unpatch(model), method, **kwargs)
        assert ops(torch.cat([x, x])) > ops(x)  # the CPU's per-image attention loop

"""benchmarks/selection_overhead_wall.py: the copies it times prune nothing, and the
overhead is the median of the paired round ratios."""

from __future__ import annotations

import pytest
import torch

from .conftest import benchmark_script, make_tiny


@pytest.mark.parametrize("spec", ["none", "saint:k=1000", "saint_match:tau=0.5,fraction=0,guard=0.1",
                                  "saint_match:tau=0.5,fraction=0,select_at=attention"])
def test_the_default_kinds_of_copy_prune_nothing_and_leave_the_output_as_is(spec: str) -> None:
    ow = benchmark_script("selection_overhead_wall")
    model = make_tiny("vit").eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ow.prunes_nothing(model(x), ow.copy_of(model, spec), x) == 0.0


def test_a_copy_that_prunes_is_refused() -> None:
    ow = benchmark_script("selection_overhead_wall")
    model = make_tiny("vit").eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="pruned tokens"):
        ow.prunes_nothing(model(x), ow.copy_of(model, "tome:r=2"), x)


def test_summary_is_the_median_of_the_paired_ratios() -> None:
    ow = benchmark_script("selection_overhead_wall")
    # per-round ratios 1.02, 1.10 (a disturbed round), 1.01, 1.03, 1.02: median 1.02
    base = [1.0, 2.0, 1.0, 1.0, 2.0]
    row = ow.summary("saint:k=1000", base, [1.02, 2.2, 1.01, 1.03, 2.04], 0.0)
    assert row["overhead"] == pytest.approx(0.02)
    assert row["interval"][0] <= row["overhead"] <= row["interval"][1]
    assert row["ratio_spread"] == pytest.approx(0.09)
    assert "+2.00%" in ow.markdown({"environment": {"date": "d", "device": "cpu", "allocator": "default",
                                                    "versions": {"torch": "x"}, "git": {}, "command": "c"},
                                    "settings": {"batch_size": 5, "warmup": 0, "repeats": 5}, "wall_seconds": 1,
                                    "model": "m", "variants": [row]})

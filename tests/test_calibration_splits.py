"""benchmarks/calibration_splits.py: the per-fold summary and its table."""

from __future__ import annotations

import pytest

from .conftest import benchmark_script


def _rows() -> list[dict]:
    errors = {("a", 2.0): [0.02, -0.04, 0.08], ("b", 1.5): [0.0, 0.01, -0.12]}
    return [
        {"fold": fold, "variant": v, "target": t, "calibrated": t, "evaluated": t * (1 + e), "error": e,
         "centered_cosine": 0.9 + fold / 100, "retrieval_at_1": 1.0}
        for (v, t), errs in errors.items() for fold, e in enumerate(errs)
    ]


def test_summary_is_per_variant_and_target_over_the_folds() -> None:
    cs = benchmark_script("calibration_splits")
    a, b = cs.summary(_rows(), folds=3)
    assert (a["variant"], a["target"], b["variant"], b["target"]) == ("a", 2.0, "b", 1.5)
    assert a["mean_error"] == pytest.approx(0.02)
    assert a["sd_error"] == pytest.approx(0.06)  # sample sd of 0.02, -0.04, 0.08
    assert (a["min_error"], a["max_error"], a["last_fold_error"]) == (-0.04, 0.08, 0.08)
    assert (a["within_5"], a["within_10"], a["folds"]) == (2, 3, 3)
    assert (b["within_5"], b["within_10"], b["last_fold_error"]) == (2, 2, -0.12)
    assert b["centered_cosine"] == pytest.approx([0.9, 0.91, 0.92])


def test_markdown_lists_the_summary_and_every_fold() -> None:
    cs = benchmark_script("calibration_splits")
    rows = _rows()
    report = {"environment": {"date": "d", "device": "cpu", "git": {"commit": "0123456789abc", "dirty": True},
                              "versions": {"torch": "x"}, "command": "python benchmarks/calibration_splits.py"},
              "model": "m", "wall_seconds": 1.0,
              "settings": {"photos": 24, "folds": 3, "speedups": [2.0, 1.5]},
              "summary": cs.summary(rows, 3), "rows": rows}
    text = cs.markdown(report)
    assert "0123456789 (with uncommitted changes)" in text
    assert "| a | 2x | +2.0% | 6.0% | -4.0% .. +8.0% | 2 of 3 | 3 of 3 | +8.0% | 0.9000 / 0.9100 / 0.9200 |" in text
    assert sum(line.startswith(("| 0 |", "| 1 |", "| 2 |")) for line in text.splitlines()) == len(rows)
    assert "each fold calibrates on its 8 photos" in text

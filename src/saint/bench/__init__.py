"""Benchmarks built on :mod:`saint.measure`: side-by-side throughput (``saint bench``),
speed/fidelity sweeps (``saint sweep``) and VLM latency (``saint vlm-bench``)."""

from .bench import format_bench, run_bench
from .sweep import run_sweep

__all__ = ["format_bench", "run_bench", "run_sweep"]

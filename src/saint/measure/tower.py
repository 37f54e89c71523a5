"""A callable (a vision tower, pruned or not) counted and timed into one result row, and
that row's table cells against a baseline row: what the tower benchmarks share
(``benchmarks/qwen_merger_cpu.py``, ``benchmarks/pooled_tower_cpu.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..timing import timed_calls
from .flops import count_flops
from .report import markdown_table, short_commit

TOWER_HEADER = ["tower", "visual tokens", "tower GFLOPs", "tower FLOPs saved", "tower ms", "tower speed-up",
                "LLM prefill GFLOPs"]


def tower_row(run: Callable[[], object], repeats: int) -> dict[str, Any]:
    """FLOPs of one call of ``run`` and ``repeats`` timed calls after one warm-up:
    ``tower_gflops``, ``tower_ms_min``, ``tower_ms_spread`` and every ``times_ms``."""
    flops, _ = count_flops(run)
    times = [1e3 * t for t in timed_calls(run, repeats)]
    return dict(tower_gflops=flops / 1e9, tower_ms_min=min(times), tower_ms_spread=max(times) - min(times),
                times_ms=times)


def tower_cells(row: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """GFLOPs, FLOPs saved, ms (+ spread) and speed-up of ``row`` against ``base``."""
    return [f"{row['tower_gflops']:.0f}", f"{base['tower_gflops'] / row['tower_gflops']:.2f}x",
            f"{row['tower_ms_min']:.0f} (+{row['tower_ms_spread']:.0f})",
            f"{base['tower_ms_min'] / row['tower_ms_min']:.2f}x"]


def tower_markdown(title: str, report: dict[str, Any], setup: str, table: list[list[str]]) -> str:
    """A tower benchmark's markdown: the title, the run (date, CPU, threads, versions,
    commit, command), what was measured (``setup``) and the table under :data:`TOWER_HEADER`."""
    versions = report["versions"]
    return "\n".join([
        f"# {title}",
        "",
        f"{report['date']}, {report['cpu']}, {report['torch_threads']} threads, torch {versions.get('torch')}, "
        f"transformers {versions.get('transformers')}, git {short_commit(report['git'])}",
        f"Command: `{report['command']}`",
        "",
        setup,
        "",
        markdown_table(TOWER_HEADER, table),
        "",
    ])

"""Token-evolution analysis (per-block statistics, stage rule, figures) and
kept-token visualisation. See ``docs/analysis.md``."""

from .collect import LABELS, STATS, TokenEvolution, block_statistics, token_evolution
from .report import plot_curves, read_csv_curves, stage_stability, summary_markdown, write_csv
from .stages import STAGE_NAMES, STAGE_STATS, StageFit, find_stages
from .stats import (
    attention_entropy,
    cls_attention_entropy,
    effective_rank,
    mean_pairwise_cosine,
    redundant_fraction,
)
from .viz import KeptMap, compare_methods, matched_drops, render_grid, trace_kept

__all__ = [
    "LABELS",
    "STAGE_NAMES",
    "STAGE_STATS",
    "STATS",
    "KeptMap",
    "StageFit",
    "TokenEvolution",
    "attention_entropy",
    "block_statistics",
    "cls_attention_entropy",
    "compare_methods",
    "effective_rank",
    "find_stages",
    "matched_drops",
    "mean_pairwise_cosine",
    "plot_curves",
    "read_csv_curves",
    "redundant_fraction",
    "render_grid",
    "stage_stability",
    "summary_markdown",
    "token_evolution",
    "trace_kept",
    "write_csv",
]

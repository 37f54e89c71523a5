"""Pure tensor functions: which tokens survive. No model imports here."""

from .attention import head_mean, packed_query_attention, query_attention
from .baselines import attention_keep_mask, random_keep_mask
from .bipartite import (
    anchor_similarity,
    best_anchors,
    count_at_least,
    match_anchors,
    nearest_anchor,
    reduce_similarity,
    split_candidates,
    sum_at_least_,
)
from .budget import fixed_budget_keep_mask
from .gather import (
    additive_key_mask,
    drop_top_ranked,
    gather_tokens,
    keep_mask_to_indices,
    prunable_valid,
)
from .match import attention_excess, best_matches, match_counts, match_plan
from .saint_drop import (
    SaintGraph,
    drop_counts,
    redundant_counts,
    saint_fold_plan,
    saint_graph,
    saint_keep_mask,
    saint_select,
)
from .tome import MergePlan, max_tome_r, merge_weighted, tome_plan
from .vlm_baselines import fastv_keep_counts, fastv_keep_mask, grid_subset, pool_grid

__all__ = [
    "MergePlan",
    "SaintGraph",
    "additive_key_mask",
    "anchor_similarity",
    "attention_excess",
    "attention_keep_mask",
    "drop_counts",
    "drop_top_ranked",
    "fastv_keep_counts",
    "fastv_keep_mask",
    "fixed_budget_keep_mask",
    "gather_tokens",
    "grid_subset",
    "head_mean",
    "keep_mask_to_indices",
    "match_anchors",
    "match_counts",
    "match_plan",
    "best_anchors",
    "best_matches",
    "count_at_least",
    "max_tome_r",
    "merge_weighted",
    "nearest_anchor",
    "packed_query_attention",
    "pool_grid",
    "prunable_valid",
    "query_attention",
    "random_keep_mask",
    "reduce_similarity",
    "redundant_counts",
    "saint_fold_plan",
    "saint_graph",
    "saint_keep_mask",
    "saint_select",
    "split_candidates",
    "sum_at_least_",
    "tome_plan",
]

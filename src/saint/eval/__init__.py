"""Evaluation: top-1/top-5 on labelled image sets and fidelity of a pruned model to the
unpruned one (centered cosine, retrieval@1, top-1 agreement)."""

from .fidelity import (
    centered_cosine,
    cosine,
    fidelity_summary,
    retrieval_at_1,
    retrieval_ranks,
    top1_agreement,
    topk_accuracy,
)

__all__ = [
    "centered_cosine",
    "cosine",
    "fidelity_summary",
    "retrieval_at_1",
    "retrieval_ranks",
    "top1_agreement",
    "topk_accuracy",
]

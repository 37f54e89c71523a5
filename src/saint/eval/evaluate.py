"""Accuracy and fidelity of pruning variants on an image set (``saint eval``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..measure.harness import Harness, Outputs
from ..measure.images import ImageSet
from ..measure.report import fmt, text_table
from ..spec import BASELINE, Variant, with_baseline
from .fidelity import fidelity_summary, topk_accuracy


def score_outputs(
    outputs: Outputs, reference: Outputs, labels: torch.Tensor, label_space: str | None, is_reference: bool
) -> dict[str, Any]:
    """Accuracy (classifier + labels) and fidelity to ``reference`` of one variant."""
    row: dict[str, Any] = {
        "tokens_per_block": outputs.mean_tokens(),
    }
    toks = row["tokens_per_block"]
    row["mean_tokens"] = sum(toks) / len(toks) if toks else None
    if outputs.logits is not None and label_space is not None and bool((labels >= 0).any()):
        row["top1"] = topk_accuracy(outputs.logits, labels, 1)
        row["top5"] = topk_accuracy(outputs.logits, labels, 5)
        row["labelled_images"] = int((labels >= 0).sum())
    if not is_reference:
        row.update(fidelity_summary(outputs.embeddings, reference.embeddings, outputs.logits, reference.logits))
    return row


def evaluate(
    harness: Harness,
    variants: Sequence[Variant],
    image_set: ImageSet,
    transform: Callable[[Any], torch.Tensor],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the unpruned model and ``variants`` over ``image_set``; one row per variant."""

    variants = with_baseline(variants)
    if len(image_set) < 2:
        raise ValueError("fidelity needs at least 2 images (centering and retrieval are over the set)")
    outs, labels = harness.collect(variants, image_set.records, transform, batch_size, progress)
    rows = []
    for v, o in zip(variants, outs, strict=True):
        row = v.as_dict()
        row.update(score_outputs(o, outs[0], labels, image_set.label_space, v is BASELINE))
        rows.append(row)
    return {
        "settings": {
            "images": image_set.description,
            "num_images": len(image_set),
            "label_space": image_set.label_space,
            "batch_size": batch_size,
            "dtype": str(harness.dtype).replace("torch.", ""),
            "device": str(harness.device),
            "fidelity": "embeddings = pooled pre-logits features; centered = minus the unpruned set's mean; "
                        "retrieval@1 = own unpruned image is the nearest (centered cosine) in the set",
        },
        "results": rows,
    }


def format_eval(report: dict[str, Any]) -> str:
    """The eval table as aligned text."""
    results = report["results"]
    has_acc = any("top1" in r for r in results)
    has_agree = any("top1_agreement" in r for r in results)
    headers = ["variant", "mean tok"]
    if has_acc:
        headers += ["top-1", "top-5"]
    headers += ["centered cos", "min", "retrieval@1"]
    if has_agree:
        headers += ["top-1 agree"]
    rows = []
    for r in results:
        row = [r["label"], fmt(r["mean_tokens"], 1)]
        if has_acc:
            row += [fmt(r.get("top1")), fmt(r.get("top5"))]
        ref = r["method"] is None
        row += ["(reference)" if ref else fmt(r.get("centered_cosine"), 4),
                "" if ref else fmt(r.get("centered_cosine_min"), 3),
                "" if ref else fmt(r.get("retrieval_at_1"))]
        if has_agree:
            row += ["" if ref else fmt(r.get("top1_agreement"))]
        rows.append(row)
    s = report["settings"]
    head = f"{s['images']}; {s['dtype']} on {s['device']}"
    if s.get("label_space") == "folder" and has_acc:
        head += "\n(labels are sorted sub-folder indices: top-1 means something only if they follow the model's class order)"
    if s.get("label_space") is None or not has_acc:
        head += "\n(no top-1/top-5: the model has no classifier head or the images have no labels)"
    return head + "\n" + text_table(headers, rows)

"""Fidelity of a pruned model to the unpruned one, as pure functions of their outputs.

Embeddings are the pooled features (``[N, D]``, one row per image) of the same image set
through both models. Raw cosine between a pruned and an unpruned embedding is inflated by
the component every image shares, so the main numbers are computed after centering: the
unpruned set's mean embedding is subtracted from both sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def _check_pair(pruned: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    if pruned.dim() != 2 or pruned.shape != reference.shape:
        raise ValueError(
            f"{what}: expected two [N, D] tensors of the same shape, got "
            f"{tuple(pruned.shape)} and {tuple(reference.shape)}"
        )
    if pruned.shape[0] == 0:
        raise ValueError(f"{what}: no rows (empty image set)")
    for name, t in (("pruned", pruned), ("reference", reference)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: the {name} outputs hold NaN or inf (a NaN would rank or compare as a hit); "
                             "padding read as a token, or an overflow in a low precision?")


def center(pruned: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract the reference set's mean row from both sets (float64)."""
    _check_pair(pruned, reference, "center")
    ref = reference.double()
    mean = ref.mean(dim=0, keepdim=True)
    return pruned.double() - mean, ref - mean


def cosine(pruned: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity ``[N]`` (no centering)."""
    _check_pair(pruned, reference, "cosine")
    return F.cosine_similarity(pruned.double(), reference.double(), dim=1, eps=EPS)


def centered_cosine(pruned: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-row cosine ``[N]`` after subtracting the reference set's mean from both."""
    p, r = center(pruned, reference)
    return F.cosine_similarity(p, r, dim=1, eps=EPS)


def retrieval_ranks(pruned: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For each pruned embedding, the 0-based rank of its own reference among all
    references by centered cosine (0 = its own image is the nearest). Ties count against
    it (a tie with another image is not a hit)."""
    p, r = center(pruned, reference)  # (checks both are finite)
    sim = F.normalize(p, dim=1, eps=EPS) @ F.normalize(r, dim=1, eps=EPS).T
    own = sim.diagonal()
    others = sim.clone()
    others.fill_diagonal_(float("-inf"))
    return (others >= own[:, None]).sum(dim=1)


def retrieval_at_1(pruned: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of images whose nearest reference embedding (centered cosine, over the
    whole set) is the unpruned embedding of the same image."""
    return float((retrieval_ranks(pruned, reference) == 0).double().mean())


def top1_agreement(pruned_logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Fraction of images whose top-1 class is the unpruned model's top-1 class."""
    _check_pair(pruned_logits, reference_logits, "top1_agreement")
    return float((pruned_logits.argmax(1) == reference_logits.argmax(1)).double().mean())


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float | None:
    """Top-``k`` accuracy over the labelled rows (``labels >= 0``); None when none is
    labelled. Raises if a label is outside the model's classes."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    mask = labels >= 0
    if not bool(mask.any()):
        return None
    num_classes = logits.shape[1]
    if int(labels.max()) >= num_classes:
        raise ValueError(
            f"label {int(labels.max())} is outside the model's {num_classes} classes; "
            "are the labels in the model's class order?"
        )
    k = min(k, num_classes)
    top = logits[mask].topk(k, dim=1).indices
    return float((top == labels[mask, None]).any(dim=1).double().mean())


def fidelity_summary(
    pruned: torch.Tensor,
    reference: torch.Tensor,
    pruned_logits: torch.Tensor | None = None,
    reference_logits: torch.Tensor | None = None,
) -> dict[str, float]:
    """All fidelity numbers at once: centered cosine (mean, min), raw cosine,
    retrieval@1 and, for classifiers, top-1 agreement."""
    cc = centered_cosine(pruned, reference)
    out = {
        "centered_cosine": float(cc.mean()),
        "centered_cosine_min": float(cc.min()),
        "cosine": float(cosine(pruned, reference).mean()),
        "retrieval_at_1": retrieval_at_1(pruned, reference),
    }
    if pruned_logits is not None and reference_logits is not None:
        out["top1_agreement"] = top1_agreement(pruned_logits, reference_logits)
    return out

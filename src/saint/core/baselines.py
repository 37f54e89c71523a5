"""Baseline selections at a given drop count: random drop and class-attention drop
(EViT-style: keep the tokens the class token attends to most)."""

from __future__ import annotations

import torch

from .gather import drop_top_ranked, prunable_valid


def _check_r(r: int, valid: torch.Tensor, num_protected: int, what: str) -> None:
    if valid.shape[0] == 0:  # empty batch: nothing to drop, any r is fine
        return
    available = int(valid[:, num_protected:].sum(dim=1).min())
    if r < 0 or r > available - 1:
        raise ValueError(
            f"{what} r={r} must be in [0, {max(available - 1, 0)}] at this layer "
            f"(at least one of the {available} prunable tokens must survive)"
        )


def random_keep_mask(
    batch: int,
    n: int,
    r: int,
    num_protected: int = 0,
    valid: torch.Tensor | None = None,
    seed: int = 0,
    layer: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Drop ``r`` prunable tokens per sample uniformly at random.

    A sample's draw depends only on ``seed``, ``layer`` and its own count of real
    prunable tokens, never on the batch or on earlier calls: a sample gets the same
    tokens alone or in any batch, and a recomputed block (gradient checkpointing)
    draws the same tokens again. Samples with equal counts drop the same positions.
    """
    valid = prunable_valid(valid, batch, n, torch.device(device))
    _check_r(r, valid, num_protected, "random")
    real = valid[:, num_protected:]
    key = torch.empty(batch, n - num_protected)
    per_sample = real.sum(dim=1).tolist()
    for count in set(per_sample):
        g = torch.Generator().manual_seed(_mix(seed, layer, count))
        rows = torch.tensor([c == count for c in per_sample])
        key[rows] = torch.rand(n - num_protected, generator=g)
    key = key.to(valid.device)
    counts = torch.full((batch,), r, device=valid.device, dtype=torch.long)
    dropped = drop_top_ranked(key, valid[:, num_protected:], counts)
    keep = valid.clone()
    keep[:, num_protected:] &= ~dropped
    return keep


def _mix(*parts: int) -> int:
    """One 63-bit seed from several integers (a fixed polynomial hash)."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B9) % (1 << 63)
    return h


def attention_keep_mask(
    cls_attention: torch.Tensor,
    r: int,
    num_protected: int = 0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Drop the ``r`` prunable tokens receiving the least class-token attention.

    ``cls_attention [B, N]``: the class token's attention over all tokens, averaged
    over heads.
    """
    b, n = cls_attention.shape
    valid = prunable_valid(valid, b, n, cls_attention.device)
    _check_r(r, valid, num_protected, "attn")
    counts = torch.full((b,), r, device=valid.device, dtype=torch.long)
    dropped = drop_top_ranked(-cls_attention[:, num_protected:].float(), valid[:, num_protected:], counts)
    keep = valid.clone()
    keep[:, num_protected:] &= ~dropped
    return keep

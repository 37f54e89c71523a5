"""Baseline selections at a given drop count: random drop and class-attention drop
(EViT-style: keep the tokens the class token attends to most)."""

from __future__ import annotations

import torch

from .gather import drop_top_ranked, prunable_valid


def _check_r(r: int, valid: torch.Tensor, num_protected: int, what: str) -> None:
    available = int(valid[:, num_protected:].sum(dim=1).min()) if valid.shape[0] else 0
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
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Drop ``r`` prunable tokens per sample uniformly at random."""
    valid = prunable_valid(valid, batch, n, torch.device(device))
    _check_r(r, valid, num_protected, "random")
    key = torch.rand(batch, n - num_protected, generator=generator, device=valid.device)
    counts = torch.full((batch,), r, device=valid.device, dtype=torch.long)
    dropped = drop_top_ranked(key, valid[:, num_protected:], counts)
    keep = valid.clone()
    keep[:, num_protected:] &= ~dropped
    return keep


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

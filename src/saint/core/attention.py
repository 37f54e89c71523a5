"""One query's attention over a sequence of keys: the class token's (EViT-style
``attn`` drop, token statistics) or a prompt's last token (FastV). Computed here
once, for the few queries that need it; the model's own attention kernel never
materialises its probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .gather import without_autocast
from .packing import host_ints, padded_slots
from .paths import accelerator_path


def query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    mean_heads: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Softmax attention of one query per sample over ``N`` keys.

    ``q [B, H, D]``, ``k [B, N, H, D]`` (heads already matched: repeat grouped KV heads
    first), ``mask [B, N]`` either bool (False = masked) or additive; computed in
    ``dtype``. Returns ``[B, N]`` averaged over heads, or ``[B, H, N]``.
    """
    b, n, h, d = k.shape
    # one bmm of a block-diagonal query [B, H, H*D] (row h holds q_h in head h's columns)
    # against the keys as they lie, [B, N, H*D] read transposed: an einsum would first copy
    # the keys head-major, and keys @ query (N rows, H columns) is a skinny product that ran
    # 0.73 s against this one's 0.18 s (518px, batch 32, 12 blocks, CPU: the guard profiles)
    with without_autocast(q.device):
        logits = torch.bmm(_query_rows(q, dtype), k.to(dtype).reshape(b, n, h * d).transpose(1, 2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        else:
            logits = logits + mask[:, None, :].to(dtype)
    probs = logits.softmax(dim=-1)
    return probs.mean(dim=1) if mean_heads else probs


def packed_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    lengths: Sequence[int],
    scale: float,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`query_attention` of one query per image over a packed key stream, without
    padding the keys: ``q [B, H, D]``, ``k [T, H, D]`` (image ``i``'s keys are the next
    ``lengths[i]`` rows), ``bias [T]`` an additive bias per key (ToMe's ``log(size)``),
    ``slots [T]`` the keys' :func:`~saint.core.packing.padded_slots` when the caller has
    them (the accelerators' form reuses them).
    Returns the padded view ``[B, max(lengths)]`` averaged over heads, 0 at padding."""
    b, h, d = q.shape
    if len(lengths) != b or sum(lengths) != k.shape[0]:
        raise ValueError(f"{b} queries and lengths {list(lengths)} do not describe {k.shape[0]} keys")
    m = max(lengths, default=0)
    if accelerator_path(q.device):
        return _batched_query_attention(q, k, lengths, m, scale, bias, dtype, slots)
    rows = _query_rows(q, dtype)
    logits = torch.full((b, h, m), float("-inf"), dtype=dtype, device=q.device)
    flat = k.reshape(k.shape[0], h * d)
    with without_autocast(q.device):
        s = 0
        for i, n in enumerate(lengths):
            if n:
                seg = (rows[i] @ flat[s : s + n].to(dtype).t()) * scale
                logits[i, :, :n] = seg if bias is None else seg + bias[s : s + n].to(dtype)
            s += n
    return logits.softmax(dim=-1).mean(dim=1)


def _batched_query_attention(q, k, lengths, m, scale, bias, dtype, slots=None) -> torch.Tensor:
    """:func:`packed_query_attention` in a fixed number of ops, whatever the batch (the
    accelerators' form; a CPU loops over images, see :mod:`saint.core.paths`): each key
    meets its image's query, and the logits go to their padded slots for the softmax."""
    b, h, _ = q.shape
    t = k.shape[0]
    if slots is None:
        slots = padded_slots(host_ints(lengths, q.device), m, t)
    with without_autocast(q.device):
        logits_t = (q.to(dtype).index_select(0, torch.div(slots, max(m, 1), rounding_mode="floor")) * k.to(dtype)).sum(-1)
    logits_t = logits_t * scale if bias is None else logits_t * scale + bias.to(dtype)[:, None]
    logits = torch.full((b * m, h), float("-inf"), dtype=dtype, device=q.device).index_copy_(0, slots, logits_t)
    return logits.view(b, m, h).softmax(dim=1).mean(dim=2)


def _query_rows(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The block-diagonal query ``[B, H, H*D]`` of ``q [B, H, D]``: row ``h`` holds
    ``q_h`` in head ``h``'s columns, so one product with keys ``[.., H*D]`` as they lie
    gives every head's logits."""
    b, h, d = q.shape
    rows = torch.zeros(b, h, h, d, dtype=dtype, device=q.device)
    rows.diagonal(dim1=1, dim2=2).copy_(q.to(dtype).transpose(1, 2))
    return rows.reshape(b, h, h * d)


def head_mean(k: torch.Tensor) -> torch.Tensor:
    """Keys averaged over heads: ``[..., H, D]`` -> ``[..., D]`` (the metric every
    selection reads). Accumulated head by head into one output: on a CPU that is 2.4x
    faster than ``k.mean(dim=-2)`` on the strided key slice of a fused qkv (224px, batch
    32), whose reduction kernel does not vectorise a 6-long middle axis; an accelerator
    takes the one-op ``mean``."""
    if accelerator_path(k.device):
        return k.mean(dim=-2)
    h = k.shape[-2]
    out = k[..., 0, :].clone() if h == 1 else k[..., 0, :] + k[..., 1, :]
    for i in range(2, h):
        out.add_(k[..., i, :])
    return out.div_(h)

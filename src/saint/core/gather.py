"""Index helpers shared by every method: turn a keep mask into padded indices and
apply them to tokens, validity masks and attention biases."""

from __future__ import annotations

import contextlib

import torch

from .paths import accelerator_path

EPS = 1e-6  # keeps cosine normalisation finite for zero-norm keys


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A block whose products keep their inputs' dtype under autocast: the selections'
    similarities are float32 by design, and autocast would make them bf16/fp16 (a
    count of ``>= tau`` entries then changes with the rounding); a no-op on a device
    without autocast (``meta``)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def keep_mask_to_indices(
    keep: torch.Tensor, align: str = "left", order: torch.Tensor | None = None, count: int | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the kept positions of each row, in their original order (or by increasing
    sort key ``order [B, N]``, e.g. ToMe's reference layout): first (``align="left"``,
    ViT blocks) or last (``"right"``, decoder prompts that are left-padded).

    Returns ``(idx [B, M], valid [B, M])`` with ``M`` the largest kept count in the
    batch; rows that keep fewer tokens are padded with their dropped positions and
    ``valid`` marks the real ones. A rectangular keep mask gives ``valid`` all True.
    ``count``: the caller knows every row keeps exactly this many (``M``), so nothing is
    read back from the device; ``width``: the caller knows the largest kept count (``M``),
    so the counts are not read back to find it.
    """
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor [B, N], got {keep.dtype} {tuple(keep.shape)}")
    if align not in ("left", "right"):
        raise ValueError(f"align must be 'left' or 'right', got {align!r}")
    if order is not None:  # lay the row out by the key, then pack as usual
        perm = torch.argsort(order, dim=1, stable=True)
        idx, valid = keep_mask_to_indices(torch.gather(keep, 1, perm), align, count=count, width=width)
        return torch.gather(perm, 1, idx), valid
    n = keep.shape[1]
    counts = None if count is not None else keep.sum(dim=1)  # a known count: every slot is real
    m = count if count is not None else width if width is not None else int(counts.max()) if keep.numel() else 0
    order = torch.argsort((~keep if align == "left" else keep).to(torch.int8), dim=1, stable=True)
    order = order[:, :m] if align == "left" else order[:, n - m :]
    if counts is None:
        return order, torch.ones_like(order, dtype=torch.bool)
    slots = torch.arange(m, device=keep.device)[None, :]
    return order, (slots < counts[:, None]) if align == "left" else (slots >= (m - counts)[:, None])


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather ``x [B, N, ...]`` along dim 1 at ``idx [B, M]``."""
    shape = idx.shape + x.shape[2:]
    index = idx.reshape(idx.shape + (1,) * (x.dim() - 2)).expand(shape)
    return torch.gather(x, 1, index)


def additive_key_mask(
    valid: torch.Tensor | None, sizes: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive attention bias ``[B, 1, 1, N]`` over keys, or None when not needed.

    Padded keys get ``-inf``; with ToMe sizes each key gets ``log(size)``
    (proportional attention). Returns None when every key is valid and unmerged so
    the model's fused attention runs exactly as unpatched (an accelerator checks only that
    ``valid`` is None: seeing that a mask is all True would read it back).
    """
    if valid is None and sizes is None:
        return None
    bias = None
    if sizes is not None:
        bias = sizes.squeeze(-1).to(dtype).log()
    # the all-valid check reads back from the device: an accelerator adds a zero mask instead
    if valid is not None and (accelerator_path(valid.device) or not bool(valid.all())):
        pad = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
        pad = pad.masked_fill(~valid, float("-inf"))
        bias = pad if bias is None else bias + pad
    if bias is None:
        return None
    return bias[:, None, None, :]


def prunable_valid(valid: torch.Tensor | None, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """Validity mask ``[B, N]``, all True when ``valid`` is None."""
    if valid is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    return valid


def drop_top_ranked(key: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row, mark the ``counts[b]`` eligible entries with the highest ``key`` as dropped.

    Ties go to the lower index (stable sort), so the answer is deterministic.
    Returns a bool mask of dropped entries with the shape of ``key``.
    """
    key = key.masked_fill(~eligible, float("-inf"))
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order).contiguous())
    return (ranks < counts[:, None]) & eligible  # a count above a row's eligible entries drops them all

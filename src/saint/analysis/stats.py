"""Per-image token statistics, as pure tensor functions (no model imports).

Each function takes a batch of token matrices and returns one float64 value per
image, so callers can average over any set of images and check the math on
hand-built inputs (identity -> effective rank N, uniform attention -> entropy log N,
identical tokens -> cosine 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import query_attention, redundant_counts, saint_graph

EPS = 1e-12


def _check_tokens(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, N, D], got shape {tuple(x.shape)}")


def mean_pairwise_cosine(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine similarity over all ordered pairs ``i != j`` of tokens, per image.

    ``x [B, N, D]``; ``valid [B, N]`` bool restricts the pairs to real tokens.
    Returns ``[B]`` float64; NaN for an image with fewer than two valid tokens.
    """
    _check_tokens(x, "x")
    b, n, _ = x.shape
    xn = F.normalize(x.double(), dim=-1, eps=EPS)
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
    v = valid.to(torch.float64)
    gram = xn @ xn.transpose(1, 2)
    pair = v[:, :, None] * v[:, None, :]
    off = pair * (1.0 - torch.eye(n, dtype=torch.float64, device=x.device))
    count = off.sum(dim=(1, 2))
    total = (gram * off).sum(dim=(1, 2))
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of attention distributions over the last dimension.

    ``probs [..., N]`` rows summing to one; returns ``[...]`` float64. A uniform row
    over ``N`` keys gives ``log N``; a one-hot row gives 0.
    """
    p = probs.double()
    return -torch.special.xlogy(p, p).sum(dim=-1)


def cls_attention_entropy(
    q_cls: torch.Tensor, keys: torch.Tensor, scale: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropy of the class token's attention over all keys, averaged over heads.

    ``q_cls [B, H, D]`` the class token's (normed) query per head, ``keys [B, N, H, D]``
    the keys per head, ``scale`` the model's softmax scale. Returns ``[B]`` float64 nats.
    """
    if q_cls.dim() != 3 or keys.dim() != 4:
        raise ValueError(
            f"q_cls must be [B, H, D] and keys [B, N, H, D], got {tuple(q_cls.shape)} and {tuple(keys.shape)}"
        )
    probs = query_attention(q_cls, keys, scale, valid, mean_heads=False, dtype=torch.float64)
    return attention_entropy(probs).mean(dim=1)


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, 2007) of each token matrix ``x [B, N, D]``.

    ``exp(H(p))`` with ``p = s / sum(s)`` the normalised singular values (the matrix is
    not centred). Identity ``N x N`` gives ``N``, a rank-1 matrix 1. Singular values come
    from the eigenvalues of the smaller Gram matrix in float64 (far faster on CPU than a
    float64 SVD); those below ``sqrt(max(N, D) * eps) * s_max`` are rounding noise and
    count as zero. Returns ``[B]`` float64; NaN for an all-zero matrix.
    """
    _check_tokens(x, "x")
    xd = x.double()
    gram = xd @ xd.transpose(1, 2) if x.shape[1] <= x.shape[2] else xd.transpose(1, 2) @ xd
    ev = torch.linalg.eigvalsh(gram)
    floor = ev.amax(dim=-1, keepdim=True) * max(x.shape[1], x.shape[2]) * torch.finfo(torch.float64).eps
    s = torch.where(ev > floor, ev, torch.zeros_like(ev)).sqrt()
    p = s / s.sum(dim=-1, keepdim=True)
    return torch.exp(-torch.special.xlogy(p, p).sum(dim=-1))


def redundant_fraction(keys: torch.Tensor, tau: float, k: int) -> torch.Tensor:
    """Fraction of the tokens SAINT's rule would call redundant, per image.

    ``keys [B, P, D]`` are the prunable tokens' head-averaged keys. Candidates are the
    even positions, anchors the odd ones; a candidate is redundant when at least ``k``
    anchors have cosine >= ``tau`` (:func:`saint.core.saint_graph`). Returns
    ``n_b / P`` (at most ``ceil(P/2) / P``: anchors never count) as ``[B]`` float64.
    """
    _check_tokens(keys, "keys")
    if keys.shape[1] == 0:
        raise ValueError("keys has no tokens")
    graph = saint_graph(keys, tau, gamma=0.0)
    return redundant_counts(graph, k).double() / keys.shape[1]

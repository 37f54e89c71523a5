"""Attention with a bias per pair of tokens (BEiT's relative position bias) after tokens were
removed: the model computes the bias over the full grid ``[1, H, N0, N0]``; each remaining
token reads its rows and columns at its original index (a merged token its destination's),
as the unpruned model would bias those two tokens. Added to saint's key mask (padding, ToMe's
``log(size)``), per image over a packed stream or at once over a padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import TokenState


def _positions(state: TokenState, x: torch.Tensor) -> torch.Tensor:
    """Each token's original index ``[B, N]`` (packed ``[1, T]``)."""
    return state.positions_of(x)[..., 0].expand(x.shape[0], -1)


def gather_pairs(full: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``full [1 or B, H, N0, N0]`` at the original indices ``rows [B, R]`` x ``cols [B, C]``
    -> ``[B, H, R, C]``."""
    b, h = rows.shape[0], full.shape[1]
    full = full.expand(b, -1, -1, -1)
    picked = full.gather(2, rows[:, None, :, None].expand(b, h, rows.shape[1], full.shape[-1]))
    return picked.gather(3, cols[:, None, None, :].expand(b, h, rows.shape[1], cols.shape[1]))


def pair_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: TokenState, prop_attn: bool,
                   scale: float, dropout_p: float, full: torch.Tensor) -> torch.Tensor:
    """Attention of each image over its own tokens, ``q, k, v [B, N, H, D]`` (packed:
    ``B = 1``) -> ``[B, N, H*D]``, biased by ``full``'s pairs of the tokens' original indices
    plus the state's key mask."""
    positions = _positions(state, q)
    key_bias = state.attn_bias(q.dtype, prop_attn)
    if not state.packed:
        mask = gather_pairs(full, positions, positions).to(q.dtype)
        mask = mask if key_bias is None else mask + key_bias
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2).flatten(2)
    out = torch.empty_like(q)
    s = 0
    for i, n in enumerate(state.lengths):
        if n:
            pos = positions[:, s : s + n]
            mask = gather_pairs(full[: 1] if full.shape[0] == 1 else full[i : i + 1], pos, pos).to(q.dtype)
            if key_bias is not None:
                mask = mask + key_bias[s : s + n]
            out[:, s : s + n] = F.scaled_dot_product_attention(
                *(t[:, s : s + n].transpose(1, 2) for t in (q, k, v)), attn_mask=mask, dropout_p=dropout_p,
                scale=scale).transpose(1, 2)
        s += n
    return out.flatten(2)


def first_token_attention(q: torch.Tensor, k: torch.Tensor, state: TokenState, prop_attn: bool, scale: float,
                          full: torch.Tensor) -> torch.Tensor:
    """The class token's (original index 0) attention over its image's tokens, averaged over
    heads, in the padded view ``[B, M]`` (0 at padding): ``q [B, H, D]``, ``k`` in the state's
    layout (``[B, N, H, D]`` or a packed ``[1, T, H, D]``), with ``full``'s row of the class
    token at the keys' original indices and the state's key mask."""
    positions = _positions(state, k)
    key_bias = state.attn_bias(k.dtype, prop_attn)
    cls = torch.zeros(1, 1, dtype=torch.long, device=k.device)
    if not state.packed:
        logits = torch.einsum("bhd,bnhd->bhn", q, k) * scale
        logits = logits + gather_pairs(full, cls.expand(k.shape[0], 1), positions)[:, :, 0].to(logits.dtype)
        if key_bias is not None:
            logits = logits + key_bias[:, 0]
        return logits.softmax(dim=-1).mean(dim=1)
    out = q.new_zeros(len(state.lengths), state.valid.shape[1])
    s = 0
    for i, n in enumerate(state.lengths):
        if n:
            logits = torch.einsum("hd,nhd->hn", q[i], k[0, s : s + n]) * scale
            row = gather_pairs(full[: 1] if full.shape[0] == 1 else full[i : i + 1], cls, positions[:, s : s + n])
            logits = logits + row[0, :, 0].to(logits.dtype)
            if key_bias is not None:
                logits = logits + key_bias[s : s + n]
            out[i, :n] = logits.softmax(dim=-1).mean(dim=0)
        s += n
    return out

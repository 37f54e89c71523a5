"""Attention with a bias per pair of tokens (BEiT's relative position bias) after tokens were
removed: the model computes the bias over the full grid ``[1, H, N0, N0]``; each remaining
token reads its rows and columns at its original index (a merged token its destination's),
as the unpruned model would bias those two tokens. Added to saint's key mask (padding, ToMe's
``log(size)``), per image over a packed stream or at once over a padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.packing import host_ints, packed_attention, padded_slots, resolve_kernel
from ..core.paths import accelerator_path
from .common import TokenState

# the most bytes of gathered pair masks one SDPA call on a batch takes: a [B, H, M, M] mask
# larger than the CPU's cache cost up to 1.9x more per image than groups of images within it
# (a throwaway CPU benchmark, BEiT-B at 224px, 32 images: docs/packed.md)
PAIR_MASK_BYTES = 8 << 20
# the packed kernels that take a bias per pair of tokens (no variable-length one does)
PAIR_KERNELS = ("auto", "loop", "padded")


def _positions(state: TokenState, x: torch.Tensor) -> torch.Tensor:
    """Each token's original index ``[B, N]`` (packed ``[1, T]``)."""
    return state.positions_of(x)[..., 0].expand(x.shape[0], -1)


def gather_pairs(full: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``full [1 or B, H, N0, N0]`` (or ``[H, N0, N0]``) at the original indices ``rows [B, R]``
    x ``cols [B, C]`` -> ``[B, H, R, C]``."""
    full = _four_dims(full)
    b, h, n0 = rows.shape[0], full.shape[1], full.shape[-1]
    pairs = rows[:, :, None] * n0 + cols[:, None, :]  # [B, R, C] into each head's flattened table
    flat = full.reshape(full.shape[0], h, n0 * n0)
    if full.shape[0] == 1:  # one table for every image: one gather (two cost 1.1-1.8x more, docs/packed.md)
        return flat[0].index_select(1, pairs.reshape(-1)).view(h, *pairs.shape).transpose(0, 1)
    return flat.gather(2, pairs.reshape(b, 1, -1).expand(b, h, -1)).view(b, h, *pairs.shape[1:])


def _four_dims(full: torch.Tensor) -> torch.Tensor:
    """A bias for every image ``[H, N0, N0]`` as ``[1, H, N0, N0]``; a 4-D one as it is."""
    return full if full.dim() == 4 else full[None]


def pair_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: TokenState, prop_attn: bool,
                   scale: float, dropout_p: float, full: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """Attention of each image over its own tokens, ``q, k, v [B, N, H, D]`` (packed:
    ``B = 1``) -> ``[B, N, H*D]``, biased by ``full``'s pairs of the tokens' original indices
    plus the state's key mask. A packed stream runs one SDPA call per image (``kernel``
    ``"auto"`` or ``"loop"``): no variable-length kernel takes a bias per pair."""
    key_bias = state.attn_bias(q.dtype, prop_attn)
    if not state.packed and state.positions is None:  # no token removed yet: the tokens are the grid, in order
        mask = full.to(q.dtype)  # the model's own mask, in its own shape: SDPA rounds a 3-D and a 4-D mask apart
        return _sdpa(q, k, v, mask if key_bias is None else mask + key_bias, dropout_p, scale)
    if not state.packed:  # a batch in groups of images whose gathered masks stay small enough to sit in cache
        positions, full = _positions(state, q), _four_dims(full)
        b, m, h = q.shape[:3]
        step = b if accelerator_path(q.device) else max(1, PAIR_MASK_BYTES // (h * m * m * q.element_size()))
        out = q.new_empty(b, m, h * q.shape[-1])
        for s in range(0, b, step):
            pos = positions[s : s + step]
            mask = gather_pairs(full if full.shape[0] == 1 else full[s : s + step], pos, pos).to(q.dtype)
            if key_bias is not None:
                mask = mask + key_bias[s : s + step]
            out[s : s + step] = _sdpa(q[s : s + step], k[s : s + step], v[s : s + step], mask, dropout_p, scale)
        return out
    positions, full = _positions(state, q), _four_dims(full)
    if _pair_kernel(kernel, q, full, dropout_p) == "padded":
        lengths, t = state.lengths, q.shape[1]
        slots, padded = _padded_positions(state, positions)
        out = packed_attention(q[0], k[0], v[0], lengths, key_bias, scale=scale, dropout_p=dropout_p, kernel="padded",
                               slots=slots, pairs=gather_pairs(full, padded, padded))
        return out.reshape(1, t, -1)
    out = q.new_empty(1, q.shape[1], q.shape[2] * q.shape[3])
    s = 0
    for i, n in enumerate(state.lengths):
        if n:
            pos = positions[:, s : s + n]
            mask = gather_pairs(full[: 1] if full.shape[0] == 1 else full[i : i + 1], pos, pos).to(q.dtype)
            if key_bias is not None:
                mask = mask + key_bias[s : s + n]
            out[:, s : s + n] = _sdpa(q[:, s : s + n], k[:, s : s + n], v[:, s : s + n], mask, dropout_p, scale)
        s += n
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float, scale: float
          ) -> torch.Tensor:
    """SDPA on ``[B, N, H, D]`` -> ``[B, N, H*D]``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).flatten(2)


def _pair_kernel(kernel: str, q: torch.Tensor, full: torch.Tensor, dropout_p: float) -> str:
    """The kernel that runs a packed stream's pair-biased attention: ``loop`` (one SDPA
    call per image; ``auto`` on a CPU) or ``padded`` (one call on the images padded to the
    longest, each with its gathered bias; ``auto`` on an accelerator); no variable-length
    kernel takes a bias per pair."""
    check_pair_kernel(kernel)
    return resolve_kernel(kernel, q, full, dropout_p)


def check_pair_kernel(kernel: str) -> None:
    """Refuse (at patch time too) a packed kernel that cannot add a bias per pair of tokens."""
    if kernel not in PAIR_KERNELS:
        raise ValueError(f"kernel={kernel!r} cannot add a relative position bias per pair of tokens (BEiT); "
                         f"use one of {PAIR_KERNELS}")


def _padded_positions(state: TokenState, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed token's slot in the images padded to the longest ``[T]`` and the original
    indices in that layout ``[B, max]`` (0 at padding), worked out on the device."""
    lengths = state.lengths
    b, m = len(lengths), max(lengths)
    slots = state.kernel_slots()
    if slots is None:  # the padded view is wider than the longest image
        slots = padded_slots(host_ints(lengths, positions.device), m, positions.shape[1])
    return slots, positions.new_zeros(b * m).index_copy_(0, slots, positions[0]).view(b, m)


def first_token_attention(q: torch.Tensor, k: torch.Tensor, state: TokenState, prop_attn: bool, scale: float,
                          full: torch.Tensor) -> torch.Tensor:
    """The class token's (original index 0) attention over its image's tokens, averaged over
    heads, in the padded view ``[B, M]`` (0 at padding): ``q [B, H, D]``, ``k`` in the state's
    layout (``[B, N, H, D]`` or a packed ``[1, T, H, D]``), with ``full``'s row of the class
    token at the keys' original indices and the state's key mask."""
    positions, full = _positions(state, k), _four_dims(full)
    key_bias = state.attn_bias(k.dtype, prop_attn)
    cls = torch.zeros(1, 1, dtype=torch.long, device=k.device)
    if state.packed and accelerator_path(k.device):  # one call on the keys padded to the longest image
        slots, positions = _padded_positions(state, positions)
        b, m = positions.shape
        key_bias = k.new_full((b * m,), float("-inf")).index_copy_(
            0, slots, k.new_zeros(k.shape[1]) if key_bias is None else key_bias.to(k.dtype)).view(b, 1, 1, m)
        k = k.new_zeros(b * m, *k.shape[2:]).index_copy_(0, slots, k[0]).view(b, m, *k.shape[2:])
        return F.pad(_first_token_attention(q, k, positions, key_bias, scale, full, cls),
                     (0, state.valid.shape[1] - m))
    if not state.packed:
        return _first_token_attention(q, k, positions, key_bias, scale, full, cls)
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


def _first_token_attention(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, key_bias: torch.Tensor | None,
                          scale: float, full: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """:func:`first_token_attention` of a batch ``k [B, N, H, D]`` at ``positions [B, N]``
    with the key mask ``key_bias [B, 1, 1, N]``."""
    logits = torch.einsum("bhd,bnhd->bhn", q, k) * scale
    logits = logits + gather_pairs(full, cls.expand(k.shape[0], 1), positions)[:, :, 0].to(logits.dtype)
    if key_bias is not None:
        logits = logits + key_bias[:, 0]
    return logits.softmax(dim=-1).mean(dim=1)

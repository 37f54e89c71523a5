"""Packed token streams: every image's real tokens back to back (``[1, T, C]``) plus
per-image lengths, so a ragged batch pays for no padding. Token-wise modules run on
the stream as it is; attention runs per image through :func:`packed_attention`."""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .tome import accumulator_dtype, with_mean_norm

KERNELS = ("auto", "loop", "padded", "flex", "varlen", "flash_attn")
"""``loop``: one SDPA call per image, on views of the stream (CPU default);
``padded``: one SDPA call on a padded copy of q/k/v with a key mask carrying ToMe's size
bias (CUDA default when ``varlen`` cannot run: only attention pays for the padding);
``flex``: ``flex_attention`` with a document mask (any device, supports the ToMe size
bias; slower than ``padded`` on an H200, see docs/packed.md; on a CPU a NaN in one image's
values reaches every image of the stream, as 0 x NaN); ``varlen``:
``torch.nn.attention.varlen`` flash kernel (CUDA, fp16/bf16, no bias; torch >= 2.10,
whose ``varlen_attn`` takes ``scale``); ``flash_attn``: the ``flash-attn`` package's
``flash_attn_varlen_func`` (the same kind of kernel, for a torch without ``varlen``; CUDA,
fp16/bf16, no bias, attention dropout allowed; needs ``pip install flash-attn``);
``auto``: see :func:`auto_kernel`."""


@functools.cache
def varlen_available() -> bool:
    """Whether this torch has ``torch.nn.attention.varlen.varlen_attn`` with a ``scale``
    argument (torch 2.9's has none, so it would silently use the default scale)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "scale" in inspect.signature(varlen_attn).parameters


@functools.cache
def flash_attn_available() -> bool:
    """Whether the ``flash-attn`` package (FlashAttention 2) is installed (looked up once:
    ``auto`` asks in every pruning block)."""
    return importlib.util.find_spec("flash_attn") is not None


def pack(x: torch.Tensor, valid: torch.Tensor | None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """``x [B, N, C]`` -> ``[1, T, C]``: the valid rows of each image, in order (read from
    their :func:`stream_slots` ``slots`` when given: no boolean mask, nothing read back)."""
    if valid is None:
        return x.reshape(1, -1, x.shape[-1])
    if slots is not None:
        return x.reshape(-1, x.shape[-1]).index_select(0, slots)[None]
    return x[valid].unsqueeze(0)


def unpack(x: torch.Tensor, valid: torch.Tensor, fill: float = float("nan"),
           slots: torch.Tensor | None = None) -> torch.Tensor:
    """``[1, T, C]`` -> ``[B, M, C]`` laid out by ``valid [B, M]``; padding holds ``fill``
    (NaN by default, so a padded position can never pass for a token). With the rows'
    :func:`stream_slots` ``slots`` they are written there: no boolean mask, nothing read back."""
    out = x.new_full(valid.shape + x.shape[2:], fill)
    if slots is not None:
        out.view(-1, *x.shape[2:]).index_copy_(0, slots, x[0])
    else:
        out[valid] = x[0]
    return out


def lengths_to_valid(lengths: torch.Tensor) -> torch.Tensor:
    """Per-image lengths ``[B]`` -> validity ``[B, max]`` (real positions first)."""
    m = int(lengths.max()) if lengths.numel() else 0
    return torch.arange(m, device=lengths.device)[None, :] < lengths[:, None]


def padded_index(valid: torch.Tensor) -> torch.Tensor:
    """Position in the packed stream of every padded position ``[B, M]`` (0 where
    ``valid`` is False), so ``stream[0, idx]`` is the padded view of a packed stream."""
    flat = valid.reshape(-1).long()
    pos = (torch.cumsum(flat, 0) - 1).clamp(min=0).reshape(valid.shape)
    return torch.where(valid, pos, 0)


COMPACT_ROWS = 4096  # rows moved per step of an in-place compaction (a small temporary)


def keep_rows(x: torch.Tensor, keep: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """The rows ``keep [T]`` (bool, or the kept rows' indices, ascending) of a contiguous
    stream ``x [1, T, C]`` -> ``[1, T', C]``.
    ``in_place`` moves them to the front of ``x`` itself (in order, a few thousand rows at
    a time: row ``i`` goes to a position ``<= i``, so no row is overwritten before it is
    read) and returns that view: no new tensor the size of the stream."""
    idx = keep.nonzero().squeeze(1) if keep.dtype == torch.bool else keep
    flat = x[0]
    if not in_place:  # index_select copies whole rows: faster than advanced indexing on a CPU
        return flat.index_select(0, idx)[None]
    for start in range(0, idx.numel(), COMPACT_ROWS):
        part = idx[start : start + COMPACT_ROWS]
        flat[start : start + part.numel()] = flat.index_select(0, part)
    return flat[: idx.numel()][None]


def merge_and_keep(
    x: torch.Tensor, sizes: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, keep: torch.Tensor,
    keep_norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of stream rows ``src -> dst`` (``[r]`` positions in ``x [1, T,
    C]``, sources never destinations) and the kept rows ``keep [T]`` in one pass over the
    stream: only the destination rows are recomputed (in fp32). Returns the kept
    ``(x [1, T', C], sizes [1, T', 1])``; ``keep_norm`` as in :func:`saint.core.tome.merge_weighted`."""
    (out,), new_sizes = merge_and_keep_many([x], sizes, src, dst, keep, keep_norm=[keep_norm])
    return out, new_sizes


def merge_and_keep_many(
    xs: Sequence[torch.Tensor], sizes: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, keep: torch.Tensor,
    in_place: Sequence[bool] = (), keep_norm: Sequence[bool] = (),
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`merge_and_keep` of several streams with the same rows (the tokens and their
    projections), the plan's sizes and positions worked out once; ``in_place[i]`` lets
    ``xs[i]`` be overwritten (see :func:`keep_rows`); ``keep_norm[i]`` gives ``xs[i]``'s
    merged rows their parts' size-weighted mean norm (see :func:`saint.core.tome.merge_weighted`)."""
    s = sizes.reshape(-1).float()
    new_s = s.index_add(0, dst, s[src])
    rows, slot = torch.unique(dst, return_inverse=True)
    at = (torch.cumsum(keep, 0) - 1)[rows]
    flags = [bool(f) for f in in_place] + [False] * (len(xs) - len(in_place))
    norm_flags = [bool(f) for f in keep_norm] + [False] * (len(xs) - len(keep_norm))
    kept = keep.nonzero().squeeze(1)  # once for every stream
    s_rows, s_src, new_rows = s[rows, None], s[src, None], new_s[rows, None]  # and the sizes read once
    outs = []
    for x, flag, norm_flag in zip(xs, flags, norm_flags, strict=True):
        acc = accumulator_dtype(x)
        at_rows, at_src = x[0].index_select(0, rows).to(acc), x[0].index_select(0, src).to(acc)
        num = at_rows * s_rows
        num.index_add_(0, slot, at_src * s_src)
        merged = num / new_rows
        if norm_flag:
            norm = at_rows.norm(dim=-1, keepdim=True) * s_rows
            norm.index_add_(0, slot, at_src.norm(dim=-1, keepdim=True) * s_src)
            merged = with_mean_norm(merged, norm / new_rows)
        out = keep_rows(x, kept, flag)
        out[0].index_copy_(0, at, merged.to(x.dtype))
        outs.append(out)
    return outs, new_s[keep].to(sizes.dtype).reshape(1, -1, 1)


def padded_slots(counts: torch.Tensor, width: int, total: int) -> torch.Tensor:
    """For each row of a packed stream of images with ``counts [B]`` tokens (``total``
    rows, known on the host), its position in the flattened ``[B, width]`` padded view
    (real positions first), worked out on the device without reading anything back."""
    starts = counts.cumsum(0) - counts
    doc = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=total)
    return doc * width + torch.arange(total, device=counts.device) - starts[doc]


def stream_slots(valid: torch.Tensor, total: int) -> torch.Tensor:
    """:func:`padded_slots` of the padded view ``valid [B, M]``."""
    return padded_slots(valid.sum(dim=1), valid.shape[1], total)


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``mask.nonzero().squeeze(1)`` of a 1-D bool mask with ``count`` True entries (known
    on the host), without reading anything back: each True entry scatters its position to
    its rank, the False ones to a spare slot that is cut off."""
    rank = torch.cumsum(mask, 0) - 1
    out = torch.empty(count + 1, dtype=torch.long, device=mask.device)
    out.scatter_(0, torch.where(mask, rank, count), torch.arange(mask.numel(), device=mask.device))
    return out[:count]


def merge_and_keep_on_device(
    xs: Sequence[torch.Tensor], sizes: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
    active: torch.Tensor | None, keep: torch.Tensor, kept: torch.Tensor, keep_norm: Sequence[bool] = (),
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`merge_and_keep_many` without reading anything back from the device: plan
    entries with ``active`` False merge nothing (instead of being cut out), the
    destinations' sums go through a stream-length float32 accumulator (instead of
    ``unique``), and the survivors ``kept`` (``keep``'s True positions, ascending) come
    from the caller. A destination that receives nothing keeps its row as it was."""
    s = sizes.reshape(-1).float()
    w = s[src] if active is None else s[src] * active
    new_s = s.index_add(0, dst, w)
    s_dst, new_s_dst = s[dst, None], new_s[dst, None]
    received = new_s_dst > s_dst
    at = (torch.cumsum(keep, 0) - 1)[dst]  # a destination's row among the survivors (repeated when shared)
    norm_flags = [bool(f) for f in keep_norm] + [False] * (len(xs) - len(keep_norm))
    outs = []
    for x, norm_flag in zip(xs, norm_flags, strict=True):
        flat = x[0]
        wide = accumulator_dtype(x)
        at_dst, at_src = flat.index_select(0, dst).to(wide), flat.index_select(0, src).to(wide)
        acc = flat.to(wide) * s[:, None]  # every row's weighted value; the sources add to their destinations'
        acc.index_add_(0, dst, at_src * w[:, None])
        merged = acc.index_select(0, dst) / new_s_dst
        if norm_flag:
            norms = flat.to(wide).norm(dim=-1, keepdim=True) * s[:, None]
            norms.index_add_(0, dst, at_src.norm(dim=-1, keepdim=True) * w[:, None])
            merged = with_mean_norm(merged, norms.index_select(0, dst) / new_s_dst)
        out = flat.index_select(0, kept)
        out.index_copy_(0, at, torch.where(received, merged, at_dst).to(x.dtype))
        outs.append(out[None])
    return outs, new_s.index_select(0, kept).to(sizes.dtype).reshape(1, -1, 1)


def split(x: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """``[1, T, ...]`` -> one ``[n_i, ...]`` tensor per image."""
    return list(x[0].split(list(lengths), dim=0))


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: Sequence[int],
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    kernel: str = "auto",
    slots: torch.Tensor | None = None,
    pairs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each image over its own tokens only.

    ``q, k, v [T, H, D]`` packed streams, ``lengths`` the per-image token counts (host
    ints summing to ``T``), ``bias [T]`` an optional additive bias per key (ToMe's
    ``log(size)``), ``slots [T]`` the tokens' :func:`padded_slots` when the caller has
    them (the ``padded`` kernel then reuses them). ``pairs [B, H or 1, max, max]`` adds a
    bias per pair of each image's tokens, laid out as the images padded to the longest
    (BEiT's relative position bias); only the ``padded`` kernel takes it. Returns
    ``[T, H, D]``; each image's rows equal SDPA run on that image alone.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    if sum(lengths) != q.shape[0]:
        raise ValueError(f"lengths sum to {sum(lengths)} but the stream holds {q.shape[0]} tokens")
    kernel = resolve_kernel(kernel, q, bias, dropout_p)
    if pairs is not None and kernel != "padded":
        raise ValueError(f"a bias per pair of tokens runs on the 'padded' kernel, not {kernel!r}")
    if kernel == "loop":
        return _loop_attention(q, k, v, lengths, bias, scale, dropout_p)
    if kernel == "padded":
        return _padded_attention(q, k, v, lengths, bias, scale, dropout_p, slots, pairs)
    if kernel == "flex":
        return _flex_attention(q, k, v, lengths, bias, scale)
    if kernel == "flash_attn":
        return _flash_attn_attention(q, k, v, lengths, scale, dropout_p)
    return _varlen_attention(q, k, v, lengths, scale)


def resolve_kernel(kernel: str, q: torch.Tensor, bias: torch.Tensor | None, dropout_p: float) -> str:
    """The kernel ``auto`` stands for on ``q``'s device, or a clear error when the named
    one cannot run these inputs."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if kernel == "auto":
        return auto_kernel(q.device.type, half, bias is not None, dropout_p > 0, _under_dispatch_mode())
    if kernel == "varlen":
        if not varlen_available():
            raise ValueError(f"kernel='varlen' needs torch >= 2.10 (varlen_attn with a scale), this is {torch.__version__}; "
                             "use 'padded' or 'loop'")
        if q.device.type != "cuda" or not half:
            raise ValueError(f"kernel='varlen' needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}; use 'loop'")
        if bias is not None:
            raise ValueError("kernel='varlen' cannot add ToMe's size bias (prop_attn); use 'padded' or 'loop'")
    if kernel == "flash_attn":
        if not flash_attn_available():
            raise ValueError("kernel='flash_attn' needs the flash-attn package (pip install flash-attn); "
                             "use 'varlen' (torch >= 2.10), 'padded' or 'loop'")
        if q.device.type != "cuda" or not half:
            raise ValueError(f"kernel='flash_attn' needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}; use 'loop'")
        if bias is not None:
            raise ValueError("kernel='flash_attn' cannot add ToMe's size bias (prop_attn); use 'padded' or 'loop'")
    if kernel in ("varlen", "flex") and dropout_p > 0:
        raise ValueError(f"kernel={kernel!r} has no attention dropout; use 'loop' in training")
    return kernel


def auto_kernel(device_type: str, half: bool, has_bias: bool, dropout: bool, intercepted: bool) -> str:
    """The kernel ``auto`` picks, by the kernel measurements of docs/packed.md: ``loop``
    on CPU, in training (dropout) and under a dispatch mode that intercepts ops
    (``intercepted``: FLOP counting, tracing), where per-image SDPA is what such modes
    understand and counts exactly the real tokens' attention; on CUDA ``varlen`` when it
    can run (fp16/bf16, no bias), else the same kind of kernel from the ``flash-attn``
    package when it is installed (a torch older than 2.10), else ``padded``."""
    if device_type != "cuda" or dropout or intercepted:
        return "loop"
    if not half or has_bias:
        return "padded"
    if varlen_available():
        return "varlen"
    return "flash_attn" if flash_attn_available() else "padded"


def _under_dispatch_mode() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def _loop_attention(q, k, v, lengths, bias, scale, dropout_p) -> torch.Tensor:
    """One SDPA call per image on views of the stream (images are contiguous in it)."""
    out = torch.empty_like(v)
    qt, kt, vt = (t.transpose(0, 1) for t in (q, k, v))  # [H, T, D] views
    s = 0
    for n in lengths:
        if n:
            mask = None if bias is None else bias[s : s + n].to(q.dtype)[None, None, :]
            o = F.scaled_dot_product_attention(
                qt[:, s : s + n], kt[:, s : s + n], vt[:, s : s + n], attn_mask=mask, dropout_p=dropout_p, scale=scale
            )
            out[s : s + n] = o.transpose(0, 1)
        s += n
    return out


def host_ints(values: Sequence[int], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` as a tensor on ``device``. On a GPU the copy goes through pinned memory
    without blocking: a plain ``torch.tensor(values, device="cuda")`` waits for the GPU
    to finish its queue, every pruning block."""
    t = torch.tensor(list(values), dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _padded_attention(q, k, v, lengths, bias, scale, dropout_p, slots=None, pairs=None) -> torch.Tensor:
    """One SDPA call on ``[B, max, H, D]`` copies of the stream; padded keys get ``-inf``,
    real keys ``bias`` (plus ``pairs``, a bias per pair in the padded layout). Positions
    are computed on the device, so nothing waits for it."""
    t, b, m = q.shape[0], len(lengths), max(lengths, default=0)
    if t == 0:
        return torch.empty_like(v)
    flat = padded_slots(host_ints(lengths, q.device), m, t) if slots is None else slots  # each token's padded slot

    qkv = torch.stack([q, k, v], dim=1)  # one padded copy of the three: [B * max, 3, H, D]
    pq, pk, pv = (qkv.new_zeros(b * m, *qkv.shape[1:]).index_copy_(0, flat, qkv).view(b, m, *qkv.shape[1:])
                  .transpose(1, 3).unbind(2))  # [B, H, max, D] each
    key = torch.full((b * m,), float("-inf"), dtype=q.dtype, device=q.device)
    key.index_copy_(0, flat, bias.to(q.dtype) if bias is not None else q.new_zeros(t))
    mask = key.view(b, 1, 1, m) if pairs is None else pairs.to(q.dtype) + key.view(b, 1, 1, m)
    o = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return o.transpose(1, 2).reshape(b * m, *v.shape[1:]).index_select(0, flat)


def _document_ids(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(list(lengths), device=device))


def _flex_attention(q, k, v, lengths, bias, scale) -> torch.Tensor:
    """``flex_attention`` over the whole stream with a document (same-image) mask;
    compiled on CUDA, eager elsewhere (exact but slow: for testing)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t = q.shape[0]
    doc = _document_ids(lengths, q.device)

    def same_image(b, h, qi, ki):
        return doc[qi] == doc[ki]

    score_mod = None
    if bias is not None:
        key_bias = bias.to(q.dtype)

        def score_mod(s, b, h, qi, ki):
            return s + key_bias[ki]

    block_mask = create_block_mask(same_image, 1, 1, t, t, device=q.device)
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    o = fn(*(x.transpose(0, 1)[None] for x in (q, k, v)), score_mod=score_mod, block_mask=block_mask, scale=scale)
    return o[0].transpose(0, 1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _cumulative_lengths(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[0, l0, l0 + l1, ...]`` as int32 on ``device``: the variable-length kernels' offsets."""
    return host_ints([0, *lengths], device, torch.int32).cumsum(0, dtype=torch.int32)


def _flash_attn_attention(q, k, v, lengths, scale, dropout_p) -> torch.Tensor:
    """``flash_attn_varlen_func`` (FlashAttention 2) over the stream: each image's rows
    attend to their own image only, non-causally."""
    from flash_attn import flash_attn_varlen_func

    cu = _cumulative_lengths(lengths, q.device)
    m = max(lengths)
    return flash_attn_varlen_func(q, k, v, cu, cu, m, m, dropout_p=dropout_p, softmax_scale=scale, causal=False)


def _varlen_attention(q, k, v, lengths, scale) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu = _cumulative_lengths(lengths, q.device)
    m = max(lengths)
    return varlen_attn(q, k, v, cu, cu, m, m, scale=scale)

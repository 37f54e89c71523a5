"""What every adapter shares: the per-forward token state (validity, ToMe sizes,
source tracing), applying a selection to it, per-block statistics, and reading
head-averaged keys from a fused qkv projection."""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..core import (
    additive_key_mask,
    gather_tokens,
    keep_mask_to_indices,
    max_tome_r,
    merge_weighted,
    packed_query_attention,
    query_attention,
)
from ..core.packing import (
    KERNELS,
    keep_rows,
    merge_and_keep_many,
    merge_and_keep_on_device,
    pack,
    packed_attention,
    padded_index,
    resolve_kernel,
    stream_slots,
    true_positions,
    unpack,
)
from ..core.paths import accelerator_path
from ..methods import Selection

SAINT_ATTR = "_saint_patch"
SITE_ATTR = "_saint_site"  # on each wrapped module: (handle, block index)
PICKLE_HINT = (
    "a model patched by saint cannot be pickled (torch.save(model) / pickle); unpatch first: "
    "saint.unpatch(model), save it (or save model.state_dict()), and patch again after loading"
)
MASKABLE_ATTENTION = ("eager", "sdpa")  # attention implementations that take an additive/boolean key mask


class RefusePickle:
    """A hook function that refuses to be pickled with the "unpatch first" hint (pickle
    meets a patched model's hooks before its handle)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(PICKLE_HINT)


LAYOUTS = ("packed", "padded")


@dataclass
class TokenStats:
    """Tokens entering each block in the last forward, one count per sample, and the
    layout the ragged part of the batch ran in: ``"packed"`` (no padding),
    ``"padded"`` (padded + masked) or ``"rectangular"`` (the batch never became ragged)."""

    blocks: list[str]
    tokens: list[list[int]]
    layout: str = "rectangular"

    def mean(self) -> list[float]:
        """Mean over the batch, per block."""
        return [sum(t) / len(t) if t else 0.0 for t in self.tokens]

    def per_sample_differs(self) -> bool:
        return any(len(set(t)) > 1 for t in self.tokens)

    def as_dict(self) -> dict[str, list[int]]:
        return dict(zip(self.blocks, self.tokens, strict=True))

    def __str__(self) -> str:
        rows = [f"{'layout':>12}: {self.layout}"]
        for name, t in zip(self.blocks, self.tokens, strict=True):
            shown = t[0] if len(set(t)) == 1 else t
            rows.append(f"{name:>12}: {shown}")
        return "\n".join(rows)


def check_layout(layout: str, kernel: str) -> None:
    """Reject an unknown layout or attention kernel, or a kernel without packing."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    if layout == "padded" and kernel != "auto":
        raise ValueError(f"kernel={kernel!r} picks the packed attention kernel; it does nothing with layout='padded'")


@dataclass
class TokenState:
    """Per-forward state of a pruned sequence.

    Between blocks the tokens are either a rectangular ``[B, N, C]`` tensor, a padded
    one with ``valid [B, M]`` marking real positions (``layout="padded"``), or a packed
    stream ``[1, T, C]`` of every image's real tokens back to back (``packed``;
    ``lengths`` per image, ``valid`` then describes the padded view the selections
    see). ``sizes`` counts the original tokens each one stands for (ToMe), in the
    tokens' own layout; ``origin [B, N0]`` (only with trace) holds each original
    token's position in the padded view, or -1. With ``track_positions`` (rotary
    models) ``positions`` holds the original sequence index of every current token
    (``[B, N, 1]``, or ``[1, T, 1]`` packed; None until a step removes a token): a
    merged token keeps its destination's index.
    """

    layout: str = "packed"
    valid: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    packed: bool = False
    lengths: list[int] = field(default_factory=list)
    origin: torch.Tensor | None = None
    origins: list[torch.Tensor] = field(default_factory=list)
    counts: list[torch.Tensor] = field(default_factory=list)
    ran: str = "rectangular"
    track_positions: bool = False
    positions: torch.Tensor | None = None
    _bias: dict[tuple[torch.dtype, bool], torch.Tensor | None] = field(default_factory=dict, repr=False)
    _index: torch.Tensor | None = field(default=None, repr=False)
    _slots: torch.Tensor | None = field(default=None, repr=False)
    _filled: bool = field(default=False, repr=False)  # the padded layout's padding rows were filled on leaving
    unmerged: bool = field(default=False, repr=False)  # the last block's output left as one row per original token
    stamp: torch.Tensor | None = field(default=None, repr=False)  # channel 0 of the tokens forward_features returned

    def reset(self, x: torch.Tensor, trace: bool, valid: torch.Tensor | None = None) -> None:
        """Start a call on ``x [B, N, C]``; ``valid [B, N]`` marks its real tokens when the
        model's input is already padded (Siglip2's NaFlex patches), None when all are."""
        if valid is not None:
            if valid.shape != x.shape[:2]:
                raise ValueError(f"the padding mask is {tuple(valid.shape)} but the tokens are {tuple(x.shape[:2])}")
            valid = valid.to(device=x.device, dtype=torch.bool)
            if not bool(valid.any(dim=1).all()):
                raise ValueError("an image of the batch has no real patch (its padding mask is all zero)")
            if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
                raise ValueError("the padding mask must mark each image's real patches first, then padding")
            if bool(valid.all()):
                valid = None
        self.valid = valid
        self.sizes = None
        self.packed = False
        self.lengths = []
        self.ran = "rectangular"
        self._bias = {}
        self._index = self._slots = None
        self._filled = False
        self.counts = []
        self.origins = []
        self.positions = None
        if valid is not None:
            self.lengths = valid.sum(dim=1).tolist()
            self.ran = self.layout
        b, n = x.shape[:2]
        self.origin = torch.arange(n, device=x.device).expand(b, n).clone() if trace else None
        if self.origin is not None and valid is not None:  # the input's padding is no token (NaFlex)
            self.origin.masked_fill_(~valid.to(self.origin.device), -1)

    def snapshot(self) -> TokenState:
        """A fresh state that continues from this one (recorded counts and steps left out)."""
        return TokenState(
            layout=self.layout, valid=self.valid, sizes=self.sizes, packed=self.packed, lengths=list(self.lengths),
            origin=self.origin, ran=self.ran, track_positions=self.track_positions, positions=self.positions,
            _bias=dict(self._bias), _index=self._index, _slots=self._slots, _filled=self._filled,
            unmerged=self.unmerged,
        )

    def positions_of(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's original index ``[B, N, 1]`` (packed ``[1, T, 1]``) with
        ``track_positions``; before any step removed a token, ``x``'s own order."""
        if self.positions is not None:
            return self.positions
        return torch.arange(x.shape[1], device=x.device).reshape(1, -1, 1)

    def record(self, x: torch.Tensor) -> None:
        """Remember how many real tokens enter the next block, per sample (kept on the
        model's device: no host sync in the forward)."""
        if self.valid is None:
            self.counts.append(torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device))
        else:
            self.counts.append(self.valid.sum(dim=1))

    def attn_bias(self, dtype: torch.dtype, prop_attn: bool) -> torch.Tensor | None:
        """The additive key mask ``[B, 1, 1, N]`` for the current padded or rectangular
        sequence, built once per pruning step (blocks in between reuse it); for a packed
        stream the per-key bias ``[T]`` (``log(size)``, or None) that
        :func:`~saint.core.packed_attention` takes."""
        key = (dtype, prop_attn)
        if key not in self._bias:
            if self.packed:
                sizes = self.sizes if prop_attn else None
                self._bias[key] = None if sizes is None else sizes.reshape(-1).to(dtype).log()
            else:
                self._bias[key] = additive_key_mask(self.valid, self.sizes if prop_attn else None, dtype)
        return self._bias[key]

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """A block's input in the state's layout: tokens that left the packed stream at a
        block boundary (see :meth:`leave`) are packed again, and tokens that left as every
        original token's row (see :meth:`unmerge`) are each read from their own row."""
        if self.unmerged:
            self.unmerged = False
            if x.dim() != 3 or x.shape[:2] != self.origin.shape:
                raise ValueError(f"a block's input must be the previous block's {tuple(self.origin.shape)} rows, "
                                 f"got {tuple(x.shape)}")
            if self.positions is not None:  # a token's own row is its original index's (a destination keeps it)
                x = x.gather(1, self.positions.expand(-1, -1, x.shape[-1]))
        if self._filled:  # the padded layout computes its padding rows: finite values again
            x, self._filled = x.masked_fill(~self.valid[..., None], 0.0), False
        if self.layout == "packed" and not self.packed and self.valid is not None:
            slots = self._device_slots(x.device)
            x = pack(x, self.valid, slots)
            if self.sizes is not None:
                self.sizes = pack(self.sizes, self.valid, slots)
            if self.positions is not None:
                self.positions = pack(self.positions, self.valid, slots)
            self.packed, self._bias = True, {}
        return x

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens that leave the patched blocks: a packed stream becomes the padded view
        ``[B, M, C]`` with NaN at padding (``valid`` marks real tokens, ``sizes`` is 1
        there), so no padding value can pass for a token. In grad mode the padding is 0
        instead: a trainable norm or projection after the blocks multiplies every row by
        its weight, and a NaN row would make that weight's gradient NaN although the row's
        own gradient is 0 (also when the blocks are frozen and ``x`` needs no gradient).
        The padded layout's padding rows are filled the same way (they hold what the
        masked computation left there)."""
        fill = 0.0 if torch.is_grad_enabled() else float("nan")
        if not self.packed:
            if self.valid is None:
                return x
            self._filled = True
            return x.masked_fill(~self.valid[..., None], fill)
        slots = self._device_slots(x.device)
        if self.sizes is not None:
            self.sizes = unpack(self.sizes, self.valid, fill=1.0, slots=slots)
        if self.positions is not None:
            self.positions = unpack(self.positions, self.valid, fill=0, slots=slots)
        self.packed, self._bias = False, {}
        return unpack(x, self.valid, fill=fill, slots=slots)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens ``x [B, M, C]`` that left the blocks (:meth:`leave`) as one row per
        original token ``[B, N0, C]``: the row of the token each one became (ToMe's unmerge),
        for outputs laid out on the input's grid (a backbone's feature maps). Needs the
        origins and the positions (a call inside :meth:`Runs.unmerging` tracks both) and a
        method that merges: a dropped token has no row."""
        if self.origin is None or not self.track_positions:
            raise RuntimeError("unmerging needs the tokens' origins and positions, tracked from the call's start")
        if self.positions is None:  # nothing removed yet: every token is its own
            return x
        self.unmerged = True
        return x.gather(1, self.origin.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))

    def padded(self, t: torch.Tensor) -> torch.Tensor:
        """The padded view ``[B, M, ...]`` of a packed ``[1, T, ...]`` tensor (padding
        positions repeat a real token; ``valid`` marks them); other tensors as they are."""
        if not self.packed:
            return t
        return t[0][self._padded_index()]

    def first(self, t: torch.Tensor) -> torch.Tensor:
        """Each image's first token ``[B, ...]`` (its class token where it has one) of a
        packed ``[1, T, ...]`` or padded ``[B, M, ...]`` tensor, without padding the rest."""
        if not self.packed:
            return t[:, 0]
        return t[0][self._padded_index()[:, 0]]

    def _padded_index(self) -> torch.Tensor:
        if self._index is None:
            self._index = padded_index(self.valid)
        return self._index

    def stream_slots(self) -> torch.Tensor:
        """Each packed token's position in the flattened padded view ``[B * M]`` (worked
        out on the device once per step: the attention kernels and the selection share it)."""
        if self._slots is None:
            self._slots = stream_slots(self.valid, sum(self.lengths))
        return self._slots

    def _device_slots(self, device: torch.device) -> torch.Tensor | None:
        """:meth:`stream_slots` where packing and unpacking should read nothing back (an
        accelerator); None on a CPU, whose boolean-mask copies are as fast and need no slots."""
        return self.stream_slots() if accelerator_path(device) else None

    def kernel_slots(self) -> torch.Tensor | None:
        """:meth:`stream_slots` for kernels that pad to the longest image, or None when the
        padded view is wider (a model input padded wider: a NaFlex batch), where a kernel
        works out its own."""
        return self.stream_slots() if self.valid.shape[1] == max(self.lengths) else None

    def apply(self, x: torch.Tensor, sel: Selection) -> torch.Tensor:
        """Merge (if planned) then keep the survivors, in their original order or laid
        out by ``sel.order``.

        A step that removes nothing merges nothing either (merge sources are exactly the
        removed tokens), so it leaves the sequence, and the attention path, untouched.
        With ``layout="packed"`` a step that leaves images with different counts turns
        the tokens into a packed stream; one that evens them out turns it back."""
        return self.apply_many([x], sel)[0]

    def apply_many(self, tensors: Sequence[torch.Tensor], sel: Selection,
                   in_place: Sequence[bool] = ()) -> list[torch.Tensor]:
        """:meth:`apply` to several per-token tensors of the same layout at once (the
        tokens and, e.g., their qkv projection): each is merged with the same sizes and
        kept alike; the state advances once. ``in_place[i]`` lets the survivors of a
        contiguous ``tensors[i]`` that nothing else reads be compacted inside it
        (packed layout; see :func:`saint.core.packing.keep_rows`). ``tensors[0]`` is the
        residual stream: with ``sel.keep_norm`` its merged tokens keep their parts' mean
        norm, the projections are plain size-weighted means."""
        if self.origin is None and accelerator_path(sel.keep.device):
            if sel.count is not None and self.valid is None:
                return self._apply_uniform(tensors, sel)
            if self.layout == "packed" and sel.order is None and not any(t.requires_grad for t in tensors):
                return self._apply_packed_one_read(tensors, sel)  # inference: its merge writes shared rows twice
            if self.layout == "padded":
                return self._apply_padded_one_read(tensors, sel)
        keep = sel.keep if self.valid is None else sel.keep & self.valid
        if bool(keep.all() if self.valid is None else (keep == self.valid).all()):
            if self.origin is not None:
                self.origins.append(self.origin.clone())
            return list(tensors)
        self._begin_step(keep)
        if self.origin is not None:
            self._trace(sel, *keep_mask_to_indices(keep, order=sel.order))
        if self.layout == "padded":
            return self._apply_padded(tensors, sel, keep)
        return self._apply_packed(tensors, sel, keep, in_place)

    def _begin_step(self, keep: torch.Tensor) -> None:
        """A step that removes tokens: cached attention biases go stale, and rotary models
        start tracking each token's original position."""
        self._bias = {}
        if self.track_positions and self.positions is None:
            b, n = keep.shape
            self.positions = torch.arange(n, device=keep.device).expand(b, n).reshape(b, n, 1)

    def _merge_and_gather(self, tensors: Sequence[torch.Tensor], sel: Selection, idx: torch.Tensor
                          ) -> list[torch.Tensor]:
        """Merge (if planned) then gather the rows ``idx [B, M]`` of each tensor, and of
        the sizes and positions (a merged token keeps its destination's index)."""
        out = list(tensors)
        if sel.merge is not None:
            if self.sizes is None:
                self.sizes = torch.ones(*sel.keep.shape, 1, dtype=torch.float32, device=sel.keep.device)
            merged = [merge_weighted(t, self.sizes, sel.merge, sel.keep_norm and i == 0) for i, t in enumerate(out)]
            out, self.sizes = [m[0] for m in merged], merged[0][1]
        out = [gather_tokens(t, idx) for t in out]
        if self.sizes is not None:
            self.sizes = gather_tokens(self.sizes, idx)
        if self.positions is not None:
            self.positions = gather_tokens(self.positions, idx)
        return out

    def _apply_uniform(self, tensors: Sequence[torch.Tensor], sel: Selection) -> list[torch.Tensor]:
        """A rectangular batch where every image keeps ``sel.count`` tokens stays
        rectangular, in either layout, and nothing is read back from the device (each read
        makes a GPU wait for the host)."""
        b, n = sel.keep.shape
        if sel.count == n:
            return list(tensors)
        self._begin_step(sel.keep)
        idx, _ = keep_mask_to_indices(sel.keep, order=sel.order, count=sel.count)
        out = self._merge_and_gather(tensors, sel, idx)
        self.lengths = [sel.count] * b
        self._index = self._slots = None
        return out

    def _apply_packed_one_read(self, tensors: Sequence[torch.Tensor], sel: Selection) -> list[torch.Tensor]:
        """:meth:`_apply_packed` reading back only the per-image counts, which the next
        attention needs on the host anyway; everything else is worked out on the device
        from them (each read-back makes a GPU wait for the host). Inference only: a
        destination shared by several sources is written once per source (the same value),
        which autograd would count as many times."""
        keep = sel.keep if self.valid is None else sel.keep & self.valid
        b, n = keep.shape
        counts = keep.sum(dim=1)
        lengths = counts.tolist()
        before = self.lengths if self.valid is not None else [n] * b
        if lengths == before:  # keep lies within valid: equal counts, nothing removed
            return list(tensors)
        self._begin_step(keep)
        streams = [t if self.packed else t.reshape(1, -1, t.shape[-1]) for t in tensors]
        total = sum(before)
        flat = keep.reshape(-1)
        if self.valid is not None:
            flat = flat.index_select(0, self.stream_slots())
        kept = true_positions(flat, sum(lengths))
        if self.positions is not None:  # kept like the tokens, never merged: a destination keeps its index
            self.positions = self.positions.reshape(1, -1, 1).index_select(1, kept)
        if sel.merge is not None:
            if self.sizes is None:
                self.sizes = torch.ones(1, total, 1, dtype=torch.float32, device=keep.device)
            index = self._padded_index() if self.valid is not None else torch.arange(total, device=keep.device).view(b, n)
            plan = sel.merge
            src, dst = (torch.gather(index, 1, t).reshape(-1) for t in (plan.src, plan.dst))
            active = None if plan.active is None else plan.active.reshape(-1)
            streams, self.sizes = merge_and_keep_on_device(streams, self.sizes, src, dst, active, flat, kept,
                                                           [sel.keep_norm])
        else:
            streams = [t[0].index_select(0, kept)[None] for t in streams]
            if self.sizes is not None:
                self.sizes = self.sizes.reshape(1, -1, 1).index_select(1, kept)
        return self._finish_packed(streams, counts, lengths)

    def _apply_padded_one_read(self, tensors: Sequence[torch.Tensor], sel: Selection) -> list[torch.Tensor]:
        """:meth:`_apply_padded` reading back only the per-image counts (kept and, on a
        padded batch, real ones) in one copy: whether anything goes, the padded width and
        whether the result is rectangular all follow from them on the host."""
        keep = sel.keep if self.valid is None else sel.keep & self.valid
        b, n = keep.shape
        counts = keep.sum(dim=1)
        kept, real = (torch.stack([counts, self.valid.sum(dim=1)]).tolist() if self.valid is not None
                      else (counts.tolist(), [n] * b))
        if kept == real:  # keep lies within valid: equal counts, nothing removed
            return list(tensors)
        self._begin_step(keep)
        return self._apply_padded(tensors, sel, keep, kept)

    def _apply_padded(self, tensors: Sequence[torch.Tensor], sel: Selection, keep: torch.Tensor,
                      kept: list[int] | None = None) -> list[torch.Tensor]:
        """Merge and gather the survivors into a padded batch; ``kept`` the per-image
        counts when the host has them (its width and whether it is rectangular follow)."""
        idx, valid = keep_mask_to_indices(keep, order=sel.order, width=None if kept is None else max(kept, default=0))
        out = self._merge_and_gather(tensors, sel, idx)
        rectangular = bool(valid.all()) if kept is None else len(set(kept)) <= 1
        self.valid = None if rectangular else valid
        if self.valid is not None:
            self.ran = "padded"
        return out

    def _apply_packed(self, tensors: Sequence[torch.Tensor], sel: Selection, keep: torch.Tensor,
                      in_place: Sequence[bool] = ()) -> list[torch.Tensor]:
        streams = [t if self.packed else t.reshape(1, -1, t.shape[-1]) for t in tensors]
        # a rectangular batch is its own stream, row after row (a batch of one: as it is), so a
        # token's position there is its row's offset plus its index: no boolean mask, no padded index
        flat = keep.reshape(-1) if self.valid is None else keep[self.valid]
        if self.positions is not None:  # kept like the tokens, never merged: a destination keeps its index
            self.positions = self.positions.reshape(1, -1, 1)[:, flat]
        flags = [bool(f) for f in in_place] + [False] * (len(streams) - len(in_place))
        if sel.merge is not None:
            if self.sizes is None:
                self.sizes = torch.ones(1, streams[0].shape[1], 1, dtype=torch.float32, device=keep.device)
            plan = sel.merge
            if self.valid is not None:
                index = self._padded_index()
                src, dst = (torch.gather(index, 1, t).reshape(-1) for t in (plan.src, plan.dst))
            else:
                offsets = torch.arange(0, keep.numel(), keep.shape[1], device=keep.device)[:, None]
                src, dst = (plan.src + offsets).reshape(-1), (plan.dst + offsets).reshape(-1)
            if plan.active is not None:
                active = plan.active.reshape(-1)
                src, dst = src[active], dst[active]
            streams, self.sizes = merge_and_keep_many(streams, self.sizes, src, dst, flat, flags, [sel.keep_norm])
        else:
            kept = flat.nonzero().squeeze(1)  # once for every stream
            streams = [keep_rows(t, kept, f) for t, f in zip(streams, flags, strict=True)]
            if self.sizes is not None:
                self.sizes = self.sizes.reshape(1, -1, 1)[:, flat]
        if sel.order is not None:  # each image's survivors laid out by the key
            idx, real = keep_mask_to_indices(keep, order=sel.order)
            slot = (torch.cumsum(keep.reshape(-1), 0) - 1).reshape(keep.shape)
            perm = torch.gather(slot, 1, idx)[real]
            streams = [t[:, perm] for t in streams]
            if self.sizes is not None:
                self.sizes = self.sizes[:, perm]
            if self.positions is not None:
                self.positions = self.positions[:, perm]
        counts = keep.sum(dim=1)
        return self._finish_packed(streams, counts, counts.tolist())

    def _finish_packed(self, streams: list[torch.Tensor], counts: torch.Tensor, lengths: list[int]
                       ) -> list[torch.Tensor]:
        """The survivors' streams, ``counts`` per image (and the same ``lengths`` on the
        host): back to a rectangular ``[B, n, C]`` when every image kept ``n``, else a
        packed stream with ``valid`` describing its padded view."""
        b = len(lengths)
        self.lengths = lengths
        self._index = self._slots = None
        if b == 0 or len(set(lengths)) == 1:
            self.packed, self.valid = False, None
            n = lengths[0] if b else 0
            if self.sizes is not None:
                self.sizes = self.sizes.reshape(b, n, 1)
            if self.positions is not None:
                self.positions = self.positions.reshape(b, n, 1)
            return [t.reshape(b, n, t.shape[-1]) for t in streams]
        self.packed, self.ran = True, "packed"
        self.valid = torch.arange(max(lengths), device=counts.device)[None, :] < counts[:, None]
        return streams

    def _trace(self, sel: Selection, idx: torch.Tensor, valid: torch.Tensor) -> None:
        b, n = sel.keep.shape
        new_pos = torch.full((b, n), -1, dtype=torch.long, device=idx.device)
        pos = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        new_pos.scatter_(1, idx, torch.where(valid, pos, -1))
        if sel.merge is not None:
            moved = torch.gather(new_pos, 1, sel.merge.dst)
            if sel.merge.active is not None:
                moved = torch.where(sel.merge.active, moved, torch.gather(new_pos, 1, sel.merge.src))
            new_pos.scatter_(1, sel.merge.src, moved)
        origin = self.origin
        mapped = torch.gather(new_pos, 1, origin.clamp(min=0))
        self.origin = torch.where(origin >= 0, mapped, -1)
        self.origins.append(self.origin.clone())


@dataclass
class Run:
    """One forward call of a patched model: its token state, the keys captured for
    its pruning blocks, and (with gradients on) the state each block started from, so
    that recomputing a block (gradient checkpointing) selects the same tokens."""

    state: TokenState
    recompute: bool = False
    next: int = 0
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_valid: list[torch.Tensor | None] = field(default_factory=list)
    input_valid: torch.Tensor | None = None  # the first block's input (padded models), None: all real
    entries: dict[int, tuple[weakref.ref, TokenState]] = field(default_factory=dict)

    def alive(self) -> bool:
        return any(ref() is not None for ref, _ in self.entries.values())


@contextlib.contextmanager
def _this_thread_in(threads: set[int]) -> Iterator[None]:
    """This thread's id in ``threads`` for the block's duration."""
    tid = threading.get_ident()
    threads.add(tid)
    try:
        yield
    finally:
        threads.discard(tid)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device and a.shape == b.shape and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


class Runs:
    """The forward calls of one patched model, kept apart per call: each thread's call
    in progress has its own state (one instance may run in several threads at once),
    a block recomputed during backward starts again from the state it first started
    from, and :meth:`last` is the last call that ran every block."""

    def __init__(self, depth: int, layout: str = "packed", track_positions: bool = False) -> None:
        self.depth = depth
        self.layout = layout
        self.track_positions = track_positions
        self._unpad: set[int] = set()  # threads whose call returns every block's output unpadded
        self._unmerge: set[int] = set()  # threads whose call returns every block's output unmerged
        self._input_valid: dict[int, torch.Tensor | None] = {}  # per thread: its call's input padding
        self._lock = threading.Lock()
        self._current: dict[int, Run] = {}  # per thread: its forward call
        self._executing: dict[int, Run] = {}  # per thread: the call whose block runs now
        self._saved: list[Run] = []
        self.last: Run | None = None

    def enter(self, index: int, x: torch.Tensor, trace: bool) -> Run:
        """The call that block ``index`` belongs to, given its input ``x``."""
        tid = threading.get_ident()
        run = self._current.get(tid)
        if run is None or run.next != index:
            run = self._executing.get(tid)
            if run is None or not run.recompute or run.next != index:
                run = self._recomputation_of(index, x)
                with self._lock:
                    if run is None and index == 0:  # a call that unmerges tracks origins and positions
                        unmerge = tid in self._unmerge
                        run = Run(TokenState(layout=self.layout, track_positions=self.track_positions or unmerge))
                        run.state.reset(x, trace or unmerge, self._input_valid.get(tid))
                        run.input_valid = run.state.valid
                        self._current[tid] = run
                        self._saved = [r for r in self._saved if r.alive()]
                        self._forget_finished_threads()
                    elif run is None:
                        raise RuntimeError(
                            f"block {index} of a patched model ran without blocks 0..{index - 1} before it "
                            "in this call; run the model (or all its blocks in order) instead"
                        )
        run.next = index + 1
        self._executing[tid] = run
        if not run.recompute and torch.is_grad_enabled():
            if not run.entries:
                with self._lock:
                    self._saved.append(run)
            run.entries[index] = (weakref.ref(x), run.state.snapshot())
        return run

    def leave(self, index: int, run: Run) -> None:
        """Block ``index`` of ``run`` finished; after the last block the call is complete."""
        if index == self.depth - 1 and not run.recompute:
            self.last = run

    def unmerging(self) -> contextlib.AbstractContextManager[None]:
        """Within this block, this thread's forward leaves every block's output as one row
        per original token (:meth:`TokenState.unmerge`)."""
        return _this_thread_in(self._unmerge)

    def unmerges_every_block(self) -> bool:
        return threading.get_ident() in self._unmerge

    def unpadding(self) -> contextlib.AbstractContextManager[None]:
        """Within this block, this thread's forward unpads every block's output (for
        calls that return intermediate outputs: hidden states, intermediates)."""
        return _this_thread_in(self._unpad)

    def unpads_every_block(self) -> bool:
        return threading.get_ident() in self._unpad

    @contextlib.contextmanager
    def input_padding(self, valid: torch.Tensor | None) -> Iterator[None]:
        """Within this block, this thread's forward starts from tokens of which only
        ``valid [B, N]`` are real (None: all are); the layers may then take the model's
        own padding mask, which the state replaces."""
        tid = threading.get_ident()
        self._input_valid[tid] = valid
        try:
            yield
        finally:
            self._input_valid.pop(tid, None)

    def takes_padding_mask(self) -> bool:
        """Whether this thread's forward runs inside :meth:`input_padding`."""
        return threading.get_ident() in self._input_valid

    def _forget_finished_threads(self) -> None:
        """Drop the complete calls of threads that have ended (bounded memory when many
        short-lived threads call one model); a call in progress is never dropped."""
        alive = {t.ident for t in threading.enumerate()}
        for per_thread in (self._current, self._executing):
            for tid in set(per_thread) - alive:
                run = per_thread.get(tid)
                if run is not None and run.next >= self.depth:
                    per_thread.pop(tid, None)

    def abandon(self) -> None:
        """Forget this thread's call if it stopped before its last block (on purpose, as
        calibration's counting forwards do): the per-call reads (``token_mask``) then
        describe the last complete call, as ``stats`` does."""
        tid = threading.get_ident()
        run = self._current.get(tid)
        if run is not None and run.next < self.depth:
            self._current.pop(tid, None)
            self._executing.pop(tid, None)

    def current(self) -> Run | None:
        """This thread's call in progress (or its last one), else the last complete call."""
        return self._current.get(threading.get_ident()) or self.last

    def executing(self) -> Run:
        """The call whose block runs now in this thread (for hooks inside a block)."""
        return self._executing[threading.get_ident()]

    def _recomputation_of(self, index: int, x: torch.Tensor) -> Run | None:
        """A fresh run starting from block ``index``'s first state when ``x`` is the very
        input that block had in an earlier call (a checkpointed block recomputed)."""
        with self._lock:
            saved = list(self._saved)
        for run in reversed(saved):
            entry = run.entries.get(index)
            if entry is None:
                continue
            first = entry[0]()
            if first is not None and _same_storage(first, x):
                return Run(entry[1].snapshot(), recompute=True)
        return None



def packed_attention_of(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: TokenState, prop_attn: bool,
    scale: float, dropout_p: float, kernel: str,
) -> torch.Tensor:
    """Per-image attention over a packed stream, ``q, k, v [T, H, D]`` -> ``[1, T, H*D]``,
    with the state's ToMe size bias when ``prop_attn``."""
    bias = state.attn_bias(q.dtype, prop_attn)
    kernel = resolve_kernel(kernel, q, bias, dropout_p)
    slots = state.kernel_slots() if kernel == "padded" else None
    out = packed_attention(q, k, v, state.lengths, bias, scale=scale, dropout_p=dropout_p, kernel=kernel, slots=slots)
    return out.reshape(1, out.shape[0], -1)


def attention_of(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: TokenState, prop_attn: bool,
    scale: float, dropout_p: float, kernel: str,
) -> torch.Tensor:
    """Attention of each image over its own real tokens, ``q, k, v [B, N, H, D]`` (a packed
    stream: ``B = 1``) -> ``[B, N, H*D]``: the per-image packed kernel, or SDPA with the
    state's key mask (padding, ToMe sizes) on a rectangular or padded batch."""
    if state.packed:
        return packed_attention_of(q[0], k[0], v[0], state, prop_attn, scale, dropout_p, kernel)
    b, n, h, d = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=state.attn_bias(q.dtype, prop_attn), dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(b, n, h * d)


def drop_path_of(drop_path: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, state: TokenState
                 ) -> torch.Tensor:
    """A residual branch through its block's drop path, ``drop_path(x)``. On a packed stream
    in training the module's per-sample decision becomes per image: the module draws it on
    one value per image (the draws it makes on a padded batch of as many images) and each
    image's tokens take their image's factor."""
    if not (state.packed and getattr(drop_path, "training", False) and getattr(drop_path, "drop_prob", 0.0) > 0):
        return drop_path(x)
    lengths = state.lengths
    if x.dim() != 3 or x.shape[0] != 1 or sum(lengths) != x.shape[1]:
        raise ValueError(f"a packed stream of {lengths} tokens cannot be {tuple(x.shape)}")
    factor = drop_path(x.new_ones(len(lengths), 1, 1)).reshape(-1)
    per_token = factor.repeat_interleave(torch.tensor(lengths, device=x.device), output_size=x.shape[1])
    return x * per_token[None, :, None]


def output_unshared(module: torch.nn.Module, saint_hooks: int = 0) -> bool:
    """Whether the output ``module`` has just returned is read by saint alone, so its rows
    may be compacted in place: gradients off (autograd would keep it), and no forward hook
    on the module but saint's own ``saint_hooks`` (the key capture), none global."""
    return (not torch.is_grad_enabled() and len(module._forward_hooks) <= saint_hooks
            and not torch.nn.modules.module._global_forward_hooks)


def patch_table_rows(table: torch.Tensor, positions: torch.Tensor, npt: int,
                     prefix_row: torch.Tensor | float | None = None) -> torch.Tensor:
    """Rows of a per-patch table (rotary embeddings: ``[P, D]``, or ``[H, P, D]`` per head)
    at each token's patch index: ``positions [..., N, 1]`` (original sequence indices, the
    first ``npt`` being prefix tokens) -> ``[..., N, 1, D]`` (``[..., N, H, D]``). Prefix
    tokens get ``prefix_row`` when given (a rotation's identity)."""
    idx = (positions[..., 0] - npt).clamp(min=0)
    rows = table[idx].unsqueeze(-2) if table.dim() == 2 else table[:, idx].movedim(0, -2)
    if prefix_row is None:
        return rows
    return torch.where((positions < npt)[..., None], prefix_row, rows)


def check_static_counts(n: int, spec: Any, settings: dict[int, dict[str, Any]], unit: str = "block") -> None:
    """Reject a fixed-count schedule (``r`` or ``keep`` per layer) that cannot fit ``n``
    prunable tokens entering the first layer (the model's default image size). A merging
    method's ``r`` (ToMe's) is at most half the tokens at each layer, as in the reference."""
    for i in sorted(settings):
        s = settings[i]
        if "r" in s and spec.merges:
            n -= min(s["r"], max_tome_r(n))
        elif "r" in s:
            limit = n - 1
            if s["r"] > limit:
                raise ValueError(
                    f"r={s['r']} at {unit} {i} is more than {spec.public_name} can remove there: "
                    f"{n} prunable tokens enter it, at most {limit} can go"
                )
            n -= s["r"]
        elif "keep" in s:
            if s["keep"] > n:
                raise ValueError(f"keep={s['keep']} at {unit} {i} exceeds the {n} prunable tokens entering it")
            n = s["keep"]


@dataclass(frozen=True)
class Hooked:
    """A submodule saint hooked (or gave a per-instance forward) at patch time and where it
    sits (``find(owner)``), so a forward can refuse a model in which something replaced it
    since (PEFT/LoRA, quantisation): saint's hook or forward stays on the old module, and the
    model would compute without it."""

    owner: torch.nn.Module
    find: Callable[[torch.nn.Module], torch.nn.Module]
    module: torch.nn.Module
    label: str

    def check(self) -> None:
        current = self.find(self.owner)
        if current is not self.module:
            raise RuntimeError(
                f"{self.label} was replaced after saint.patch ({_class_path(self.module)} -> "
                f"{_class_path(current)}, e.g. by PEFT/LoRA or quantization); saint's hook stays on the "
                "module it replaced and would read what the model no longer computes. Patch after such "
                "changes: saint.unpatch(model), then saint.patch(model, ...) again"
            )


@dataclass(frozen=True)
class PatchedBlocks:
    """The blocks saint patched and where the model keeps them (``owner.get_submodule(path)``),
    so a forward can refuse blocks replaced, added or removed since (a truncated
    ``model.blocks``, a fresh block): an unpatched block would run on saint's packed or
    shortened tokens. A module that wraps a patched block (activation checkpointing,
    ``torch.compile`` of one block) runs that block, and passes."""

    owner: torch.nn.Module
    path: str
    blocks: tuple[torch.nn.Module, ...]

    def check(self) -> None:
        current = self.owner.get_submodule(self.path)
        if len(current) != len(self.blocks):
            change = f"{len(self.blocks)} blocks were patched, {len(current)} are there now"
        else:
            stray = [i for i, (now, block) in enumerate(zip(current, self.blocks, strict=True))
                     if now is not block and not any(child is block for child in now.children())]
            if not stray:
                return
            change = f"{self.path}.{stray[0]} is not the block saint patched"
        raise RuntimeError(
            f"{self.path} changed after saint.patch ({change}): an unpatched block would run on saint's pruned "
            "tokens. Patch after such changes: saint.unpatch(model), change the blocks, then saint.patch(model, ...)"
        )


def _class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def cls_attention(q: torch.Tensor, k: torch.Tensor, state: TokenState, scale: float, prop_attn: bool) -> torch.Tensor:
    """The class token's attention over its image's tokens, averaged over heads, in the
    padded view ``[B, M]`` (0 at padding): ``q [B, H, D]`` (its query), ``k`` the keys in
    the state's layout (``[B, N, H, D]``, or a packed ``[1, T, H, D]``, which is never
    padded: only the ``[B, H, M]`` logits are), with the mask or size bias the layer
    attended with."""
    bias = state.attn_bias(k.dtype, prop_attn)
    if state.packed:
        att = packed_query_attention(q, k[0], state.lengths, scale, bias,
                                     slots=state.kernel_slots() if accelerator_path(q.device) else None)
        return F.pad(att, (0, state.valid.shape[1] - att.shape[1]))  # as wide as a padded NaFlex input
    return query_attention(q, k, scale, None if bias is None else bias[:, 0, 0])


def transformers_loaded() -> bool:
    """Whether transformers is imported: a transformers model implies it, so adapters
    skip it (and its import cost) for any other model."""
    return sys.modules.get("transformers") is not None


def language_model(mm: torch.nn.Module) -> torch.nn.Module:
    """The decoder of a Hugging Face multimodal model (``language_model``; Idefics3 and
    SmolVLM call it ``text_model``)."""
    lm = mm._modules.get("language_model")
    return lm if lm is not None else mm.text_model


def transformers_classes(module: str, *names: str) -> tuple[type, ...]:
    """The classes ``names`` of ``transformers.models.<module>.modeling_<module>`` that this
    transformers has (none of a module it lacks)."""
    import importlib

    try:
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    except ImportError:  # pragma: no cover - transformers missing or older
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


def get_handle(model: torch.nn.Module) -> Any:
    """The patch handle stored on a patched model, or None."""
    return model.__dict__.get(SAINT_ATTR)


def copies_stamp(x: torch.Tensor, stamp: torch.Tensor) -> bool:
    """Whether ``x [B, N, C]`` holds, in channel 0 of its tokens, the values ``stamp``
    ``[B, M]`` holds in its last ``N`` tokens (NaN where it has NaN): a copy of the tokens
    it was taken from (or of their patch tokens, after a prefix)."""
    n = x.shape[1] if x.dim() == 3 else -1
    if n < 0 or x.shape[0] != stamp.shape[0] or n > stamp.shape[1]:
        return False
    a, b = x[..., 0].detach().double(), stamp[:, stamp.shape[1] - n :].to(x.device, torch.float64)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())

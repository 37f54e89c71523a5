"""timm ``Cait`` (CaiT: ``cait_*``): self-attention blocks over the patch tokens alone
(``LayerScaleBlock`` with talking-heads attention), then class-attention blocks in which
the class token, added only there, attends every patch token (``LayerScaleBlockClassAttn``).

The pruning sites are the self-attention blocks. They hold no class token, so every patch
is prunable and methods that rank by the class token's attention are refused. Each
block's ``forward`` is wrapped per instance and runs the block's own modules in timm's
order (norms, ``qkv``, ``proj``, MLP, layer scales ``gamma_1``/``gamma_2``, drop path) on
the tokens in the state's layout; until a step removes or merges a token it is timm's
forward. The talking-heads attention mixes the heads' logits before the softmax
(``proj_l``) and their probabilities after it (``proj_w``), which no fused kernel
computes: saint runs timm's products itself, per image on a packed stream (a CPU) or on
the padded view (``kernel="padded"``, an accelerator's default). A key that stands for
``s`` patches (ToMe's sizes; 0 at padding) gets ``log(s)`` after ``proj_l`` and ``s``
times ``proj_w``'s bias after ``proj_w``: exactly what ``s`` copies of the token get, so
a merged token reads as its parts and padding reads as nothing.

``forward_cls`` is wrapped per instance: the class token attends each image's real
patches (a merged one biased by ``log(size)``), on the padded view, where the blocks'
one query makes the attention cheap. ``forward_features`` returns the class token and the
last block's patch tokens (NaN at padding): :func:`saint.token_mask` and
:func:`saint.token_sizes` describe the patches, ``features[:, 1:]``. The head's average
(``global_pool="avg"``) is size-weighted over each image's real patches.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..core import head_mean
from ..core.packing import pack
from ..core.paths import accelerator_path
from ..methods import LayerContext, MethodSpec
from .base import (
    Probe,
    Site,
    TokenStateHandle,
    mlp_width,
    select_at_of,
    vit_block_flops,
)
from .common import SAINT_ATTR, SITE_ATTR, TokenState, drop_path_of, output_unshared
from .timm_vit import (
    TOKENS_ATTR,
    TimmPatch,
    TimmProbe,
    TimmViT,
    _forward_features,
    _forward_intermediates,
    begin_patch,
    block_sites,
    check_blocks,
    install,
    resolve_settings,
    state_of_tokens,
    uninstall,
)

KERNELS = ("auto", "loop", "padded")


def _cait() -> Any:
    try:
        from timm.models import cait
    except ImportError:  # timm not installed
        return None
    return cait


def matches(model: torch.nn.Module) -> bool:
    cait = _cait()
    return cait is not None and isinstance(model, cait.Cait)


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
    layout: str = "packed", kernel: str = "auto", **kwargs: Any,
) -> TimmPatch:
    """Patch a timm ``Cait`` in place (see :func:`saint.patch`)."""
    cait = _cait()
    spec, config = begin_patch(model, method, layout, kernel, kwargs)
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: CaiT's talking-heads attention mixes its heads before and after the "
                         f"softmax, which no fused kernel computes; use one of {KERNELS}")
    check_blocks(list(model.blocks),
                 lambda blk: type(blk) is cait.LayerScaleBlock and type(getattr(blk, "attn", None)) is cait.TalkingHeadAttn,
                 "timm CaiT's LayerScaleBlock with TalkingHeadAttn")
    check_blocks(list(model.blocks_token_only or ()),
                 lambda blk: type(blk) is cait.LayerScaleBlockClassAttn and type(getattr(blk, "attn", None)) is cait.ClassAttn,
                 "timm CaiT's class-attention blocks (LayerScaleBlockClassAttn with ClassAttn)")
    # the class token joins only after the pruning blocks: none of their tokens is a prefix
    settings, _ = resolve_settings(model, spec, config, has_class_token=False)
    handle = TimmPatch(spec, config, settings, 0, trace=trace, kernel=kernel)
    return install(model, handle, _block_forward, None, layout, _methods())


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper: the model is the original object again."""
    uninstall(model, _methods())


def _methods() -> dict[str, Callable[..., Any]]:
    """The per-instance methods a patched model gets: tagged features, the class attention
    and the head per image, unpadded intermediates."""
    return {"forward_features": _forward_features, "forward_cls": _forward_cls, "forward_head": _forward_head,
            "forward_intermediates": _forward_intermediates}


# ---------------------------------------------------------------------------- the blocks
def _block_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ``LayerScaleBlock`` of a patched CaiT: timm's forward until a step removes or merges
    a token; after that its own modules around saint's talking-heads attention over each
    image's real tokens, the selection between the attention residual and the MLP (or
    before attention, ``select_at="attention"``, on the block's own keys)."""
    handle, index = self.__dict__[SITE_ATTR]
    run, x, settings = handle.enter_site(index, x)
    state = run.state
    if settings is None and not state.packed and _key_weights(state, handle.config.size_bias) is None:
        return _leave(handle, index, run, type(self).forward(self, x))
    handle.attention_from_parts(index)
    attn = self.attn
    qkv = attn.qkv(self.norm1(x))
    sel = None
    if settings is not None:
        sel = handle.spec.select(_context(handle, run, attn, index, x, qkv), settings, handle.config)
        if handle.config.select_at == "attention":
            x, qkv = state.apply_many([x, qkv], sel, in_place=[False, output_unshared(attn.qkv)])
            sel = None
    x = x + drop_path_of(self.drop_path, self.gamma_1 * _attend(attn, qkv, state, handle), state)
    if sel is not None:
        x = state.apply(x, sel)
    return _leave(handle, index, run, x + drop_path_of(self.drop_path, self.gamma_2 * self.mlp(self.norm2(x)), state))


def _leave(handle: TokenStateHandle, index: int, run: Any, x: torch.Tensor) -> torch.Tensor:
    """The block's output as :meth:`~saint.adapters.base.TokenStateHandle.leave_site` hands
    it on; the last block's tagged with its call's state, which ``forward_cls`` reads
    without checking the tokens against it (a check reads values back from the device)."""
    out = handle.leave_site(index, run, x)
    if index == handle.runs.depth - 1:
        setattr(out, TOKENS_ATTR, run.state)
    return out


def _context(handle: TokenStateHandle, run: Any, attn: torch.nn.Module, index: int, x: torch.Tensor,
             qkv: torch.Tensor) -> LayerContext:
    """What the selection sees, in the padded view: the keys (``qkv``'s middle third, before
    the scale) averaged over heads; no class token."""
    state = run.state
    c = qkv.shape[-1] // 3
    keys = head_mean(qkv[..., c : 2 * c].unflatten(-1, (attn.num_heads, -1)))
    return LayerContext(keys=state.padded(keys), num_protected=0, valid=state.valid, cls_attention=None,
                        tokens=(lambda: state.padded(x)) if state.packed else x, layer=index)


def _key_weights(state: TokenState, prop_attn: bool) -> torch.Tensor | None:
    """How many patches each token stands for as a key, in the state's layout (``[B, N]``,
    a packed stream's ``[T]``): its size with proportional attention, else 1; 0 at padding.
    None when every key is one real token (the block's own attention is exact)."""
    sizes = state.sizes if prop_attn else None
    if state.packed:
        return None if sizes is None else sizes.reshape(-1).float()
    if sizes is None and state.valid is None:
        return None
    w = sizes.reshape(sizes.shape[:2]).float() if sizes is not None else None
    if state.valid is None:
        return w
    valid = state.valid.float()
    return valid if w is None else w * valid


def _attend(attn: torch.nn.Module, qkv: torch.Tensor, state: TokenState, handle: TokenStateHandle) -> torch.Tensor:
    """``TalkingHeadAttn`` from its ``qkv`` output: each image over its own real tokens, keys
    weighted by :func:`_key_weights`; its ``proj`` and dropouts."""
    w = _key_weights(state, handle.config.size_bias)
    if not state.packed and w is None:  # every image's tokens whole and real: timm's own ops, bit for bit
        out = timm_talking_heads(attn, qkv)
    elif not state.packed:
        out = talking_heads(attn, qkv, w)
    elif handle.kernel == "padded" or (handle.kernel == "auto" and accelerator_path(qkv.device)):
        weights = torch.ones(qkv.shape[1], device=qkv.device) if w is None else w
        padded_w = state.padded(weights[None]) * state.valid
        slots = state.stream_slots() if accelerator_path(qkv.device) else None
        out = pack(talking_heads(attn, state.padded(qkv), padded_w), state.valid, slots)
    else:
        out = torch.empty(qkv.shape[:2] + (qkv.shape[-1] // 3,), dtype=qkv.dtype, device=qkv.device)
        s = 0
        for n in state.lengths:
            if n:
                out[:, s : s + n] = talking_heads(attn, qkv[:, s : s + n], None if w is None else w[None, s : s + n])
            s += n
    return attn.proj_drop(attn.proj(out))


def talking_heads(attn: torch.nn.Module, qkv: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """timm ``TalkingHeadAttn``'s products on its ``qkv`` output ``[B, N, 3C]`` -> ``[B, N,
    C]`` (before ``proj``), key ``j`` of image ``b`` standing for ``weights[b, j]`` tokens
    (None: one each): ``log(w)`` joins the logits after ``proj_l`` and ``proj_w``'s bias
    counts ``w`` times, so a key of weight ``s`` acts as ``s`` copies of itself and one of
    weight 0 (padding) as none."""
    b, n, c3 = qkv.shape
    h = attn.num_heads
    q, k, v = qkv.reshape(b, n, 3, h, c3 // (3 * h)).permute(2, 0, 3, 1, 4)
    a = mix_heads(attn.proj_l, (q * attn.scale) @ k.transpose(-2, -1))
    if weights is not None:
        a = a + weights.to(a.dtype).log()[:, None, None, :]
    a = mix_heads(attn.proj_w, a.softmax(dim=-1))
    if weights is not None and attn.proj_w.bias is not None:
        a = a + attn.proj_w.bias.to(a.dtype)[None, :, None, None] * (weights.to(a.dtype) - 1)[:, None, None, :]
    return (attn.attn_drop(a) @ v).transpose(1, 2).reshape(b, n, c3 // 3)


def timm_talking_heads(attn: torch.nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """:func:`talking_heads` of whole, real tokens with the head mixings as timm writes them,
    so that a block with nothing pruned gives timm's answer bit for bit (:func:`mix_heads`
    differs at rounding level on some CPUs)."""
    b, n, c3 = qkv.shape
    h = attn.num_heads
    q, k, v = qkv.reshape(b, n, 3, h, c3 // (3 * h)).permute(2, 0, 3, 1, 4)
    a = attn.proj_l((q * attn.scale @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    a = attn.proj_w(a.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return (attn.attn_drop(a) @ v).transpose(1, 2).reshape(b, n, c3 // 3)


def mix_heads(linear: torch.nn.Linear, a: torch.Tensor) -> torch.Tensor:
    """``linear`` (``H -> H``) applied across the heads of ``a [B, H, N, M]``, as timm's
    ``linear(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)`` but as one batched product on the
    scores as they lie: no permuted copies, and the softmax between the mixings runs along
    a contiguous axis (the CaiT-S/24 geometry ran 1.51x faster so, nothing merged, CPU; at
    rounding level it differs from timm's on some CPUs, so blocks with nothing pruned use
    timm's form)."""
    b, h, n, m = a.shape
    flat = a.reshape(b, h, n * m)
    weight = linear.weight.expand(b, h, h)
    if linear.bias is None:
        return torch.bmm(weight, flat).view(b, h, n, m)
    return torch.baddbmm(linear.bias[None, :, None].expand(b, h, n * m), weight, flat).view(b, h, n, m)


# ---------------------------------------------------------------------------- after the blocks
def _patch_state(model: torch.nn.Module, x: torch.Tensor) -> TokenState:
    """The state of the call whose patch tokens are ``x[:, num_prefix_tokens:]`` (its tag,
    else the last call's if they fit it: :func:`~saint.adapters.timm_vit.state_of_tokens`)."""
    tagged = getattr(x, TOKENS_ATTR, None)
    return tagged if tagged is not None else state_of_tokens(model, x[:, model.num_prefix_tokens :])


def _forward_cls(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``forward_cls`` over each image's real patch tokens ``x [B, M, C]`` (NaN at
    padding): the class-attention blocks' own modules, their attention over ``[class;
    patches]`` with padding masked and, with proportional attention, merged keys biased
    by ``log(size)``. Tokens left as one row per original patch (a backbone's unmerged
    output) are every patch's own: timm's forward as it is."""
    handle = self.__dict__[SAINT_ATTR]
    if handle.runs.unmerges_every_block():
        return type(self).forward_cls(self, x)
    state = state_of_tokens(self, x)
    w = _key_weights(state, handle.config.size_bias)  # the padded view the last block left
    if w is None:
        return type(self).forward_cls(self, x)
    real = x if state.valid is None else x.masked_fill(~state.valid[..., None], 0.0)
    bias = F.pad(w.to(x.dtype).log(), (1, 0))[:, None, None, :]  # the class token: one token
    cls = self.cls_token.expand(x.shape[0], -1, -1)
    for blk in self.blocks_token_only:
        u = blk.norm1(torch.cat((cls, real), dim=1))
        cls = cls + blk.drop_path(blk.gamma_1 * _class_attention(blk.attn, u, bias))
        cls = cls + blk.drop_path(blk.gamma_2 * blk.mlp(blk.norm2(cls)))
    return torch.cat((cls, x), dim=1)


def _class_attention(attn: torch.nn.Module, u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """timm ``ClassAttn`` of the normed ``[class; patches]`` ``u [B, N, C]`` with the additive
    key mask ``bias [B, 1, 1, N]``: its own q/k/v/proj, SDPA."""
    b, n, c = u.shape
    h = attn.num_heads
    q = attn.q(u[:, :1]).reshape(b, 1, h, c // h).transpose(1, 2)
    k = attn.k(u).reshape(b, n, h, c // h).transpose(1, 2)
    v = attn.v(u).reshape(b, n, h, c // h).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, 1, c)))


def _forward_head(self: torch.nn.Module, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """timm's ``forward_head``; its average (``global_pool="avg"``) taken per image over
    the real patch tokens, each weighted by its size, once tokens were removed or merged."""
    if self.global_pool == "avg":
        w = _key_weights(_patch_state(self, x), prop_attn=True)  # the average weighs sizes
        if w is not None:
            patches = x[:, self.num_prefix_tokens :]
            w = w.to(x.dtype)[..., None]
            pooled = (patches.masked_fill(w == 0, 0.0) * w).sum(1) / w.sum(1)
            x = self.head_drop(pooled)
            return x if pre_logits else self.head(x)
    return type(self).forward_head(self, x, pre_logits=pre_logits)


# ---------------------------------------------------------------------------- protocol
class CaitProbe(TimmProbe):
    """timm's ViT probe (queries/keys from each block's ``qkv`` output; hidden states at its
    output) without a prefix: the class token joins after the pruning blocks."""

    def __init__(self, model: torch.nn.Module, sites: list[Site]) -> None:
        super().__init__(model, sites)
        self.num_prefix = 0
        self.has_cls = False


class TimmCait(TimmViT):
    """timm ``Cait``: sites are ``model.blocks`` (the self-attention blocks), no protected
    prefix (the class token joins after them); grid and embedding as for timm's ViT."""

    name = "timm_cait"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return block_sites(model)

    def protected(self, model: torch.nn.Module) -> int:
        return 0

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        """A ViT block whose whole qkv runs on every entering token, plus the talking heads'
        two ``H x H`` mixings per pair of tokens attending. The class-attention blocks,
        like the patch embedding and the head, are not counted."""
        blk = model.blocks[0]
        where = select_at_of(model, select_at)
        n_attn = n_in if where == "mlp" else n_out
        h = int(blk.attn.num_heads)
        dim = blk.norm1.normalized_shape[0]
        return (vit_block_flops(n_in, n_out, dim, mlp_width(blk.mlp, dim), where, keys_first=False)
                + 2 * 2 * h * h * n_attn * n_attn)

    def probe(self, model: torch.nn.Module) -> Probe:
        return CaitProbe(model, self.sites(model))


ADAPTER = TimmCait()

"""open_clip's own vision transformer (``open_clip.transformer.VisionTransformer``: OpenAI's
and LAION's CLIP ViTs, CoCa's tower), alone or as the ``visual`` of open_clip's ``CLIP``,
``CustomTextCLIP`` and ``CoCa`` (``encode_image`` and the image-text logits are pruned, the
text side is untouched).

Each ``ResidualAttentionBlock`` runs through the shared pre-norm encoder layer
(:func:`saint.adapters.hf_encoder.layer_forward`): ``ln_1 -> attn -> ls_1 -> residual ->
[selection] -> ln_2 -> mlp -> ls_2 -> residual``, with the block's own modules. Its
``nn.MultiheadAttention`` keeps one fused ``in_proj_weight`` and no projection modules, so
where a block selects, carries a key mask (padding, merged sizes) or runs packed, saint
runs the attention from the module's own weights: queries, keys and values as products
on the rows of ``in_proj_weight`` (its key rows as a small module, so that saint's key
capture has a hook point), SDPA over each image's real tokens, the module's ``out_proj``;
mathematically the module's own computation, to float rounding. Blocks that need none of
that call their own forward.

The class token (position 0) is protected. Pooling is per image: the class token
(``pool_type='tok'``), each image's size-weighted mean of its real patch tokens
(``'avg'``), or CoCa's attentional poolers over each image's real tokens with merged keys
weighted by ``log(size)``. ``output_tokens`` and ``pool_type='none'`` hand the tokens back
as the padded view (NaN at padding when packed; ``saint.token_mask(model)`` marks the real
positions, class token included). ``forward_intermediates`` unpads every block's output;
spatial (``NCHW``) maps need a merging method (each patch then holds the token it became).
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

import torch
import torch.nn.functional as F

from ..methods import MethodSpec
from .base import FamilyAdapter, Grid, Probe, Site, save_output, select_at_of, vit_block_flops
from .common import SAINT_ATTR, SITE_ATTR, get_handle
from .hf_encoder import (
    HFEncoderPatch,
    LayerParts,
    attach_head,
    encoder_sites,
    layer_forward,
    patch_encoder,
    patched_through,
    pool_per_image,
    unpatch_tower_of,
)
from .hf_mean_head import mean_of_real_tokens
from .timm_vit import bind_methods, maps_unmerge, unbind_methods

KEYS_ATTR = "_saint_key_projection"  # where a block keeps its attention's key rows as a module


def _classes() -> dict[str, type] | None:
    """open_clip's classes, when open_clip is imported (an open_clip model implies it is)."""
    if sys.modules.get("open_clip") is None:
        return None
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    return {"tower": VisionTransformer, "block": ResidualAttentionBlock, "timm": TimmModel,
            "wrappers": (CLIP, CustomTextCLIP, CoCa)}


def _visual(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vision tower of ``model`` (the model itself for a tower), or None when ``model``
    is not an open_clip model."""
    c = _classes()
    if c is None:
        return None
    if isinstance(model, c["wrappers"]):
        return getattr(model, "visual", None)
    return model if isinstance(model, (c["tower"], c["timm"])) else None


def _tower(model: torch.nn.Module) -> torch.nn.Module:
    tower = _visual(model)
    c = _classes()
    if tower is None or c is None or not isinstance(tower, c["tower"]):
        raise TypeError(f"expected open_clip's VisionTransformer, or a CLIP / CoCa holding one, got {type(model).__name__}")
    return tower


def matches(model: torch.nn.Module) -> bool:
    """open_clip's ``VisionTransformer``, or a ``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` whose
    ``visual`` is one (never imports open_clip itself)."""
    c = _classes()
    return c is not None and isinstance(_visual(model), c["tower"])


def _in_proj(attn: torch.nn.MultiheadAttention, part: int, x: torch.Tensor) -> torch.Tensor:
    """Queries (``part`` 0), keys (1) or values (2) of ``x`` through the rows of the
    attention's own fused ``in_proj_weight`` (and bias)."""
    c = attn.embed_dim
    rows = slice(part * c, (part + 1) * c)
    bias = attn.in_proj_bias
    return F.linear(x, attn.in_proj_weight[rows], None if bias is None else bias[rows])


class KeyProjection(torch.nn.Module):
    """The key rows of a ``nn.MultiheadAttention``'s fused input projection as a module:
    what saint's key capture hooks (the attention has no key module). It holds the
    attention unregistered, so the block's parameters and state dict stay its own."""

    def __init__(self, attn: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.__dict__["attention"] = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _in_proj(self.__dict__["attention"], 1, x)


def _key_projection(block: torch.nn.Module) -> KeyProjection:
    """The patched block's :class:`KeyProjection` (made when patching, kept in its
    ``__dict__``, where a copy of the block gets its own with its copy of the attention); for
    an unpatched block, or one whose attention was replaced since, a fresh one (nothing is
    left on a model that is only read)."""
    keys = block.__dict__.get(KEYS_ATTR)
    if keys is None or keys.__dict__["attention"] is not block.attn:
        return KeyProjection(block.attn)
    return keys


def layer_parts(block: torch.nn.Module) -> LayerParts:
    """Where a ``ResidualAttentionBlock`` keeps its parts (layer scales, no drop path);
    saint runs its attention wherever it needs a mask or selects (``own_attention``)."""
    a = block.attn
    return LayerParts(block.ln_1, a, functools.partial(_in_proj, a, 0), _key_projection(block),
                      functools.partial(_in_proj, a, 2), a.out_proj, int(a.num_heads), int(a.head_dim),
                      float(a.head_dim) ** -0.5, float(a.dropout), block.ln_2, block.mlp, ls1=block.ls_1,
                      ls2=block.ls_2, own_attention=True)


def _block_forward(self: torch.nn.Module, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                   v_x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A block of a patched tower (per-instance ``forward``, open_clip's signature; its
    transformer and gradient checkpointing call it so)."""
    if k_x is not None or v_x is not None or attn_mask is not None:
        raise ValueError("a pruned open_clip vision block attends over its own tokens only; call it without "
                         "k_x, v_x or attn_mask (as open_clip's VisionTransformer does)")
    return layer_forward(self, q_x)


def _check_tower(tower: torch.nn.Module) -> None:
    """Refuse what saint's attention would not compute as the tower does."""
    if not tower.transformer.batch_first:
        raise ValueError("saint patches open_clip towers that run batch first (open_clip >= 2.24's default)")
    c = _classes()
    for i, block in enumerate(tower.transformer.resblocks):
        a = getattr(block, "attn", None)
        if type(block) is not c["block"] or type(a) is not torch.nn.MultiheadAttention:
            raise TypeError(f"block {i} is {type(block).__name__} with {type(a).__name__}; saint supports "
                            "open_clip's ResidualAttentionBlock with nn.MultiheadAttention (not the custom "
                            "blocks of qk_norm / scaled cosine attention)")
        if (not a.batch_first or not a._qkv_same_embed_dim or a.bias_k is not None or a.add_zero_attn
                or hasattr(block, "ln_1_kv")):
            raise ValueError(f"block {i}'s attention is not plain batch-first self-attention (separate k/v "
                             "dimensions, bias_k/bias_v, add_zero_attn or cross-attention); saint does not patch it")


def patch(model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
          kernel: str = "auto", **kwargs: Any) -> HFEncoderPatch:
    """Patch an open_clip vision transformer (or the one a CLIP / CoCa holds) in place (see
    :func:`saint.patch`)."""
    tower = _tower(model)
    _check_tower(tower)
    if get_handle(tower) is not None:
        raise ValueError(f"{type(tower).__name__} is already patched by saint; unpatch it first")
    blocks = list(tower.transformer.resblocks)
    for block in blocks:  # the key capture hooks one module per block for the whole patch
        block.__dict__[KEYS_ATTR] = KeyProjection(block.attn)
    try:
        handle = patch_encoder(tower, blocks, "transformer.resblocks", _classes()["block"],
                               torch.nn.MultiheadAttention, layer_parts, 1, int(tower.grid_size[0] * tower.grid_size[1]),
                               method, kwargs, trace, layout, kernel, block_forward=_block_forward, hf_tower=False)
    except BaseException:  # a refused patch leaves the blocks as they were
        _forget_keys(tower)
        raise
    bind_methods(tower, _pooling_methods(tower))
    for find in _poolers_reading_tokens(tower):
        attach_head(handle, find(tower), _attentional_pool, find, "attentional pooler")
    return patched_through(model, tower, handle)


def unpatch(model: torch.nn.Module) -> None:
    """Every wrapper and hook removed: the model computes exactly what it did before."""
    handle = get_handle(model)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by saint")
    unbind_methods(handle.tower, _pooling_methods(handle.tower))
    _forget_keys(handle.tower)
    unpatch_tower_of(model)


def _forget_keys(tower: torch.nn.Module) -> None:
    for block in tower.transformer.resblocks:
        block.__dict__.pop(KEYS_ATTR, None)


def _pooling_methods(tower: torch.nn.Module) -> dict[str, Any]:
    """The tower's methods saint wraps per instance: the average over the tokens (when the
    tower pools its tokens itself) and ``forward_intermediates``."""
    methods: dict[str, Any] = {"forward_intermediates": _forward_intermediates}
    if tower.attn_pool is None:
        methods["_global_pool"] = _global_pool
    return methods


def _attn_pool(tower: torch.nn.Module) -> torch.nn.Module:
    return tower.attn_pool


def _contrastive_pool(tower: torch.nn.Module) -> torch.nn.Module:
    return tower.attn_pool_contrastive


def _poolers_reading_tokens(tower: torch.nn.Module) -> list[Any]:
    """Getters of the attentional poolers that read the tower's tokens (CoCa's; a
    ``cascade`` contrastive pooler reads the first pooler's queries instead)."""
    if tower.attn_pool is None:
        return []
    return [_attn_pool] + ([_contrastive_pool] if getattr(tower, "attn_pool_type", "") == "parallel" else [])


def _global_pool(self: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's pooling of the tokens: with ``pool_type='avg'`` each image's mean of its
    real patch tokens, a merged one weighted by its size (the mean over the original
    patches); otherwise (and when every position is one real token) the tower's own."""
    if self.pool_type == "avg":
        mean = mean_of_real_tokens(x, self.__dict__[SAINT_ATTR].output_weights(), 1)
        if mean is not None:
            return mean, x[:, 1:]
    return type(self)._global_pool(self, x)


def _attentional_pool(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CoCa's attentional pooler over each image's real tokens, merged keys biased by
    ``log(size)`` (the pooler's own modules); its own call when every token is real and
    whole, or one row per original patch (unmerged intermediates)."""
    handle = self.__dict__[SITE_ATTR][0]
    if handle.state.unmerged:
        return type(self).forward(self, x)
    return pool_per_image(self, x, lambda h, bias: _pool_over(self, h, bias), lambda: type(self).forward(self, x))


def _pool_over(pooler: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The pooler's forward with a key bias ``[B, N]`` (``-inf`` never: the tokens are real)."""
    x = pooler.ln_k(x)
    q = pooler.ln_q(pooler.query)
    return pooler.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), x, x, need_weights=False,
                       key_padding_mask=bias.to(x.dtype))[0]


def _forward_intermediates(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """open_clip's ``forward_intermediates`` with every block's output unpadded (NaN at
    padding; ``saint.token_mask(model, block)`` marks the real positions, class token
    first). Spatial (``NCHW``, open_clip's default) maps need a row for every patch: with a
    merging method every block's output then leaves unmerged (each patch the row of the
    token it became); a dropping method is refused once it prunes before the deepest
    block returned."""
    from open_clip.transformer import feature_take_indices

    handle = self.__dict__[SAINT_ATTR]
    bound = inspect.signature(type(self).forward_intermediates).bind(self, *args, **kwargs)
    bound.apply_defaults()
    unmerge = False
    if bound.arguments["output_fmt"] == "NCHW":
        _, deepest = feature_take_indices(len(self.transformer.resblocks), bound.arguments["indices"])
        unmerge = maps_unmerge(handle, deepest, "output_fmt='NLC'")
    with handle.runs.unmerging() if unmerge else handle.runs.unpadding():
        return type(self).forward_intermediates(self, *args, **kwargs)


def _encode(model: torch.nn.Module, inputs: torch.Tensor) -> Any:
    """The image side: a CLIP's / CoCa's ``encode_image``, a tower's own output."""
    c = _classes()
    if c is not None and isinstance(model, c["wrappers"]):
        return model.encode_image(inputs)
    return model(inputs)


def _pooled(out: Any) -> torch.Tensor:
    """The pooled embedding of an image-side output (a tower with ``output_tokens`` returns
    ``(pooled, tokens)``)."""
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------- protocol
class OpenClipProbe(Probe):
    """Queries/keys from each block's attention input (``ln_1``'s output through the rows
    of ``in_proj_weight``), hidden states at each block's output."""

    def __init__(self, sites: list[Site]) -> None:
        self.sites = sites
        self.num_prefix = 1
        self.has_cls = True

    def hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        return [self.sites[i].block.ln_1.register_forward_hook(save_output(store, "x"))]

    def qk(self, i: int, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, a = store.pop("x"), self.sites[i].attn
        b, n, _ = x.shape
        return (_in_proj(a, 0, x).reshape(b, n, a.num_heads, a.head_dim),
                _in_proj(a, 1, x).reshape(b, n, a.num_heads, a.head_dim))


class OpenClipVision(FamilyAdapter):
    """open_clip's ``VisionTransformer`` (alone or in a CLIP / CoCa): sites are its
    ``transformer.resblocks``."""

    name = "open_clip"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return encoder_sites(list(_tower(model).transformer.resblocks), "transformer.resblocks", layer_parts)

    def protected(self, model: torch.nn.Module) -> int:
        return 1

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        tower = _tower(model)
        size = tuple(int(s) for s in tower.image_size)
        if inputs is not None and tuple(inputs.shape[-2:]) != size:
            raise ValueError(f"{type(model).__name__} takes {size[0]}x{size[1]} images (its position table is "
                             f"fixed), got {tuple(inputs.shape[-2:])}")
        return Grid(int(tower.grid_size[0]), int(tower.grid_size[1]), tuple(int(p) for p in tower.patch_size))

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        block = _tower(model).transformer.resblocks[0]
        return vit_block_flops(n_in, n_out, int(block.attn.embed_dim), int(block.mlp.c_fc.out_features),
                               select_at_of(model, select_at))

    def probe(self, model: torch.nn.Module) -> Probe:
        return OpenClipProbe(self.sites(model))

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        return _encode(model, inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _pooled(self.forward(model, inputs)), None


ADAPTER = OpenClipVision()

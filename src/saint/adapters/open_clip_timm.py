"""open_clip's timm towers (``open_clip.timm_model.TimmModel``: open_clip's SigLIP, SigLIP 2,
EVA, Perception Encoder and other timm-based image towers), alone or as the ``visual`` of
its ``CLIP`` / ``CustomTextCLIP``.

Patching patches the tower's timm ``trunk`` through that model's own adapter (timm ViT, Eva,
Beit, VisionTransformerRelPos, Cait), which pools each image over its real tokens; the
tower's ``head`` (projection) then runs on the pooled features. A trunk that hands back its
tokens instead of pooling them (``global_pool=''``, open_clip's ``abs_attn`` / ``rot_attn``
pools) is refused. The handle goes on the model patched too, which cannot be bypassed: the
trunk cannot be unpatched on its own. Every protocol call but the forward and the embedding
is the trunk's.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..methods import MethodSpec
from . import timm_cait, timm_eva, timm_relpos, timm_vit
from .base import (
    DelegatingAdapter,
    TokenStateHandle,
    found_or_refused,
    patch_inner,
    unpatch_inner,
    with_adapter,
)
from .open_clip_vit import _classes, _encode, _pooled, _visual

TRUNKS = (timm_vit.ADAPTER, timm_eva.ADAPTER, timm_relpos.ADAPTER, timm_cait.ADAPTER)  # the adapters of the trunks


def _trunk(model: torch.nn.Module) -> tuple[torch.nn.Module, Any] | None:
    """The timm trunk of ``model``'s tower and its adapter, or None when ``model`` is not an
    open_clip model with a timm tower that saint patches."""
    c = _classes()
    tower = _visual(model)
    return with_adapter(getattr(tower, "trunk", None), TRUNKS) if c is not None and isinstance(tower, c["timm"]) else None


def inner_of(model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """The tower's timm trunk and its adapter (a TypeError for anything else)."""
    return found_or_refused(_trunk(model), model, "open_clip's TimmModel with a timm ViT, Eva, Beit, "
                            "VisionTransformerRelPos or Cait trunk, or a CLIP holding one")


def matches(model: torch.nn.Module) -> bool:
    """open_clip's ``TimmModel`` (or a CLIP holding one) whose trunk a timm adapter patches."""
    return _trunk(model) is not None


def patch(model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
          **kwargs: Any) -> TokenStateHandle:
    """Patch the tower's trunk (see :func:`saint.patch`); the handle goes on ``model`` too."""
    trunk, adapter = inner_of(model)
    if not getattr(trunk, "global_pool", "avg"):
        raise ValueError(f"this {type(model).__name__}'s timm trunk returns its tokens unpooled (global_pool=''), "
                         "which its attention pool then reads as a grid; saint patches towers whose trunk pools")
    return patch_inner(model, trunk, adapter, method, trace, kwargs, type(model).__name__)


def unpatch(model: torch.nn.Module) -> None:
    """Unpatch ``model`` and its trunk: both are the original objects again."""
    unpatch_inner(model, *inner_of(model))


class OpenClipTimm(DelegatingAdapter):
    """open_clip's ``TimmModel`` towers (alone or in a CLIP): the trunk's protocol, the
    model's image side."""

    name = "open_clip_timm"
    family = sys.modules[__name__]

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        return _encode(model, inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _pooled(self.forward(model, inputs)), None


ADAPTER = OpenClipTimm()

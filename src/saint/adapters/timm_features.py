"""timm's ``features_only`` wrapper (``FeatureGetterNet``) of a timm ViT, Eva, Beit, VisionTransformerRelPos or Cait: spatial maps
of every patch from the inner model's ``forward_intermediates``.

Patching the wrapper patches its inner model (through that model's own adapter) with a
merging method (``tome``, ``saint_match``, ``saint_plus``, ``saint_fold``): after merging,
every block's output leaves unmerged (each patch holds the token it became,
:meth:`saint.adapters.common.TokenState.unmerge`), so every map lies on the grid. A method
that drops tokens is refused (a dropped patch has no row). The handle is stored on both; the
inner model cannot be unpatched on its own while the wrapper is patched. Every protocol call
but the forward and the embedding is the inner model's.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..methods import MethodSpec, get_method, require_merging
from . import timm_cait, timm_eva, timm_relpos, timm_vit
from .base import (
    DelegatingAdapter,
    TokenStateHandle,
    found_or_refused,
    patch_inner,
    unpatch_inner,
    with_adapter,
)

INNER = (timm_vit.ADAPTER, timm_eva.ADAPTER, timm_relpos.ADAPTER, timm_cait.ADAPTER)  # the adapters of the models a wrapper may hold


def _inner(model: torch.nn.Module) -> tuple[torch.nn.Module, Any] | None:
    """The wrapper's model and its adapter, or None when ``model`` is not such a wrapper."""
    return with_adapter(getattr(model, "model", None), INNER) if type(model).__name__ == "FeatureGetterNet" else None


def inner_of(model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """The wrapper's model and its adapter (a TypeError for anything else)."""
    return found_or_refused(_inner(model), model,
                            "timm's features_only wrapper of a ViT, Eva, Beit, VisionTransformerRelPos or Cait")


def matches(model: torch.nn.Module) -> bool:
    """A ``FeatureGetterNet`` holding a timm ViT, Eva, Beit, VisionTransformerRelPos or Cait."""
    return _inner(model) is not None


def patch(model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
          **kwargs: Any) -> TokenStateHandle:
    """Patch the wrapper's model with a merging method; the handle goes on both."""
    inner, adapter = inner_of(model)
    require_merging(method if isinstance(method, MethodSpec) else get_method(method), "features_only maps")
    return patch_inner(model, inner, adapter, method, trace, kwargs, "features_only wrapper")


def unpatch(model: torch.nn.Module) -> None:
    """Unpatch the wrapper and its model: both are the original objects again."""
    unpatch_inner(model, *inner_of(model))


class TimmFeatures(DelegatingAdapter):
    """timm ``FeatureGetterNet`` (``features_only=True``) of a timm ViT, Eva, Beit, VisionTransformerRelPos or Cait."""

    name = "timm_features"
    family = sys.modules[__name__]

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The deepest map, flattened (a dense output has no pooled embedding)."""
        return self.forward(model, inputs)[-1].flatten(1), None


ADAPTER = TimmFeatures()

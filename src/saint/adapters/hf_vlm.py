"""The adapter protocol for Hugging Face VLMs pruned inside their language model whose
``*ForConditionalGeneration`` holds the multimodal model as ``model.model`` (Qwen-VL,
LLaVA-OneVision): LLaVA's protocol (sites = decoder layers, processor-dict inputs)
applied to that multimodal model, with the family module's ``matches``/``patch``/``unpatch``."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from .base import Handle, Probe, Site
from .llava import Llava


def multimodal(model: torch.nn.Module) -> torch.nn.Module:
    """The multimodal model (``*Model``) of a ``*ForConditionalGeneration``, or the model itself."""
    return model.model if hasattr(model, "lm_head") else model


class HFVlm(Llava):
    """Subclasses set ``name`` and ``family`` (the adapter module)."""

    family: ModuleType

    def matches(self, model: torch.nn.Module) -> bool:
        return self.family.matches(model)

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return super().sites(multimodal(model))

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float) -> float:
        return super().block_flops(multimodal(model), n_in, n_out)

    def probe(self, model: torch.nn.Module) -> Probe:
        return super().probe(multimodal(model))

    def patch(self, model: torch.nn.Module, method: Any = "saint", trace: bool = False, **kwargs: Any) -> Handle:
        return self.family.patch(model, method, trace=trace, **kwargs)

    def unpatch(self, model: torch.nn.Module) -> None:
        self.family.unpatch(model)


def install_forward_hooks(handle: Any, model: torch.nn.Module, mm: torch.nn.Module, mm_pre: Any,
                          lm_post: tuple[Any, ...] = ()) -> None:
    """The hooks of one patched forward, as LLaVA's: the handle's lock around the whole
    call, the decoder pruner, ``mm_pre`` on the multimodal model, the language model's
    post-hook (outputs back in input coordinates, statistics) then ``lm_post``, and the
    labels/logits hooks of a ``*ForConditionalGeneration``."""
    from .common import RefusePickle
    from .llava import _make_guard, _make_lm_post, _make_top_post, _make_top_pre

    lm = mm.language_model
    hooks = handle.hooks
    # calls from several threads run one after another: the per-forward state is the handle's
    hooks.append(model.register_forward_pre_hook(RefusePickle(_make_guard(handle, enter=True)), prepend=True))
    handle.pruner.install()
    hooks.append(mm.register_forward_pre_hook(RefusePickle(mm_pre), with_kwargs=True))
    for hook in (_make_lm_post(handle), *lm_post):
        hooks.append(lm.register_forward_hook(hook))
    if model is not mm:
        hooks.append(model.register_forward_pre_hook(RefusePickle(_make_top_pre(handle)), with_kwargs=True))
        hooks.append(model.register_forward_hook(RefusePickle(_make_top_post(handle)), with_kwargs=True))
    hooks.append(model.register_forward_hook(RefusePickle(_make_guard(handle, enter=False)), always_call=True))

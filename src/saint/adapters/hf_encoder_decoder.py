"""Hugging Face ``VisionEncoderDecoderModel`` (image captioning such as ViT-GPT2, TrOCR's OCR)
whose encoder saint patches on its own (a ViT, DeiT, BEiT, DINOv2 ... of
:mod:`saint.adapters.hf_vit`, or a CLIP / SigLIP tower of :mod:`saint.adapters.hf_vision`).

The encoder is patched through its own adapter and the model marked as its owner; the
decoder, which cross-attends every encoder token at every generated token, gets the forward
pre-hook BLIP's readers have (:func:`saint.adapters.hf_encoder.image_key_mask_hook`, laid out
per query token), which hands it saint's key mask of the encoder's last call (padding masked and its
rows zeroed, a merged token's key biased by ``log(size)``: it counts as its parts), repeated
for generation's copies of each image (beams). So a batch's logits and generated text are
each image's alone. Every protocol call is the encoder's: calibration and the benchmarks run
and embed the encoder alone (the decoder needs text).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..methods import MethodSpec
from . import hf_vision, hf_vit
from .base import (
    SAINT_ATTR,
    DelegatingAdapter,
    TokenStateHandle,
    found_or_refused,
    patch_inner,
    unpatch_inner,
    with_adapter,
)
from .common import copies_stamp
from .hf_encoder import attach_reader, image_key_mask_hook

ENCODERS = (hf_vit.ADAPTER, hf_vision.ADAPTER)  # the adapters of the encoders saint patches


def _encoder(model: torch.nn.Module) -> tuple[torch.nn.Module, Any] | None:
    """The model's encoder and its adapter, or None when ``model`` is not a vision
    encoder-decoder whose encoder saint patches."""
    if type(model).__name__ != "VisionEncoderDecoderModel" or sys.modules.get("transformers") is None:
        return None
    return with_adapter(getattr(model, "encoder", None), ENCODERS)


def inner_of(model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """The encoder and its adapter (a TypeError for anything else)."""
    return found_or_refused(_encoder(model), model,
                            "a VisionEncoderDecoderModel whose encoder is a ViT-style or CLIP-style model saint patches")


def matches(model: torch.nn.Module) -> bool:
    """A ``VisionEncoderDecoderModel`` whose encoder a Hugging Face vision adapter patches."""
    return _encoder(model) is not None


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    return model.decoder


def patch(model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
          **kwargs: Any) -> TokenStateHandle:
    """Patch the encoder (see :func:`saint.patch`) and give the decoder saint's key mask."""
    encoder, adapter = inner_of(model)
    handle = patch_inner(model, encoder, adapter, method, trace, kwargs, type(model).__name__)
    attach_reader(handle, model, _decoder, "decoder", _decoder_key_mask)
    handle.hooks.append(encoder.register_forward_hook(_stamp_output))
    handle.hooks.append(model.register_forward_pre_hook(_check_encoder_outputs, with_kwargs=True))
    return handle


def _stamp_output(encoder: torch.nn.Module, args: Any, output: Any) -> None:
    """Record channel 0 of the encoder's output tokens with its call's state: it tells that
    call's tokens (and copies of them) from another call's (see :func:`_check_encoder_outputs`)."""
    encoder.__dict__[SAINT_ATTR].state.stamp = output[0][..., 0].detach().clone()


def _check_encoder_outputs(model: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
    """Refuse ``encoder_outputs`` (``generate(encoder_outputs=...)``, a decoder-only step)
    that are not the patched encoder's last output in this thread (generation's copies of
    each image included): the decoder's key mask is that call's padding and merged sizes."""
    given = kwargs.get("encoder_outputs")
    if given is None:
        return
    states = given if isinstance(given, torch.Tensor) else given[0]
    stamp = model.__dict__[SAINT_ATTR].state.stamp
    if stamp is None:
        fits = not bool(states[..., 0].isnan().any())  # an unpatched encoder's: nothing to mask
    else:  # every token (no prefix left out), each image's copies repeated as generation repeats them
        copies = states.shape[0] // max(stamp.shape[0], 1)
        fits = (states.dim() == 3 and states.shape[1] == stamp.shape[1]
                and copies_stamp(states, stamp.repeat_interleave(copies, dim=0)))
    if not fits:
        raise ValueError("encoder_outputs are not the patched encoder's last output in this thread (another batch "
                         "ran since, or they were changed): the decoder's key mask is that call's padding and "
                         "merged sizes; pass pixel_values, or run model.encoder on these images right before")


def _decoder_key_mask(decoder: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """:func:`~saint.adapters.hf_encoder.image_key_mask_hook`, the mask laid out for each of the
    decoder's query tokens (``[B, 1, T, N]``, a view): TrOCR's eager attention takes no other
    shape. (A Q-Former's queries are more than its ``input_ids``: this is the decoders'.)"""
    out = image_key_mask_hook(decoder, args, kwargs)
    if out is None:
        return None
    args, kwargs = out
    queries = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if queries is not None:
        kwargs["encoder_attention_mask"] = kwargs["encoder_attention_mask"].expand(-1, -1, queries.shape[1], -1)
    return args, kwargs


def unpatch(model: torch.nn.Module) -> None:
    """Unpatch the encoder and the decoder's hook: the model is the original object again."""
    unpatch_inner(model, *inner_of(model))


class HFVisionEncoderDecoder(DelegatingAdapter):
    """``VisionEncoderDecoderModel``: the encoder's protocol; its forward and embedding are
    the encoder's alone."""

    name = "hf_vision_encoder_decoder"
    family = sys.modules[__name__]

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        encoder, adapter = inner_of(model)
        return adapter.forward(encoder, inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoder, adapter = inner_of(model)
        return adapter.embed(encoder, inputs)


ADAPTER = HFVisionEncoderDecoder()

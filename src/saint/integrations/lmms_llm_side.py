"""lmms-eval models ``saint_internvl`` and ``saint_mistral3``: Hugging Face InternVL
(``InternVLForConditionalGeneration``) and Mistral 3 (``Mistral3ForConditionalGeneration``)
checkpoints pruned by :func:`saint.patch` (:mod:`saint.adapters.internvl`: SAINT's
``llm``, ``vit`` and ``hybrid`` modes or FastV; :mod:`saint.adapters.llm_side_vlm`: SAINT's
``llm`` mode or FastV inside Mistral 3's language model), for any lmms-eval image task::

    python -m lmms_eval --model saint_internvl \\
        --model_args pretrained=OpenGVLab/InternVL3-8B-hf,llm_layers=7-16,llm_tau=0.83 \\
        --tasks mme --batch_size 8

Everything but what differs per family is :class:`~saint.integrations.lmms_eval.SaintLlava`'s
(model arguments, batching, ``until``, log-likelihood, multi-round, ``stats_path``).
Each image enters the prompt as the processor's image token in front of the task's text
(unless the task placed them), then the chat template (``chat_template=``, else the
tokenizer's, else ChatML for InternVL and Mistral's ``[INST]`` format for Mistral 3).
InternVL's processor expands an image to its tiles (``image_seq_length`` tokens each,
between ``<img>`` and ``</img>``); Pixtral's to rows of image tokens closed by row
breaks and an image end, with ``image_sizes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..adapters import internvl, llm_side_vlm
from .lmms_eval import CHATML_TEMPLATE, SaintLlava

__all__ = ["SaintInternVL", "SaintMistral3"]

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]{{ message['content'] }}"
    "[/INST]{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


class SaintLlmSide(SaintLlava):
    """What both share: the adapter (its ``make_config`` validates the settings before
    any weights load), the model class named by ``MODEL_CLASS`` and the image token
    placed in front of the task's text."""

    ADAPTER: Any = llm_side_vlm.MISTRAL3
    MODEL_CLASS = ""
    TITLE = ""

    @classmethod
    def _family_hint(cls) -> str:  # type: ignore[override]
        return f"{cls.TITLE} checkpoints (model_type {cls.MODEL_TYPES[0]!r})"

    @classmethod
    def _model_class(cls, model_type: str) -> Any:  # type: ignore[override]
        import transformers

        return getattr(transformers, cls.MODEL_CLASS)


class SaintInternVL(SaintLlmSide):
    """An InternVL checkpoint (``model_type: internvl``, the ``-hf`` conversions) patched
    once by :func:`saint.patch`, evaluated by lmms-eval (``--model saint_internvl``)."""

    NAME = "saint_internvl"
    ADAPTER = internvl
    MODEL_TYPES = ("internvl",)
    MODEL_CLASS = "InternVLForConditionalGeneration"
    TITLE = "InternVL"
    DEFAULT_CHAT_TEMPLATE = CHATML_TEMPLATE

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The tiles of the first prompt's images (the first ``len(visuals)`` images):
        its image tokens over ``image_seq_length`` per tile."""
        if not visuals:
            return {}
        tokens = int((enc["input_ids"][0] == self.model.config.image_token_id).sum())
        return {"pixel_values": enc["pixel_values"][: tokens // int(self.processor.image_seq_length)]}


class SaintMistral3(SaintLlmSide):
    """A Mistral 3 checkpoint (``model_type: mistral3``, a Pixtral tower) patched once by
    :func:`saint.patch`, evaluated by lmms-eval (``--model saint_mistral3``)."""

    NAME = "saint_mistral3"
    MODEL_TYPES = ("mistral3",)
    MODEL_CLASS = "Mistral3ForConditionalGeneration"
    TITLE = "Mistral 3"
    DEFAULT_CHAT_TEMPLATE = MISTRAL_TEMPLATE

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Pixels and sizes of the first ``len(visuals)`` images of a processor output."""
        n = len(visuals)
        return {"pixel_values": enc["pixel_values"][:n], "image_sizes": enc["image_sizes"][:n]} if n else {}

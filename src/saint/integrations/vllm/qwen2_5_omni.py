"""Qwen2.5-Omni's thinker for vLLM with SAINT image-token pruning after the vision tower.

Registered over ``Qwen2_5OmniForConditionalGeneration`` and ``Qwen2_5OmniModel`` (the
architectures a Qwen2.5-Omni checkpoint names; vLLM serves their thinker, text out) by the
``saint`` plugin; without ``saint_keep_ratio`` in the HF config it is vLLM's class unchanged.
With it, the three steps of the Qwen2.5-VL override (:mod:`saint.integrations.vllm.qwen2_5_vl`)
on the thinker's tower (Qwen2.5-VL's, q/k/v projected separately): every image gets
``kept_tokens(N)`` placeholders, the fixed-budget drop keeps that many merged embeddings,
and each kept row carries its M-RoPE (t, h, w) of the full grid plus the step to the text
after the image.

vLLM's thinker has no multimodal-pruning path, so this class adds it, as for Qwen2-VL. Once
pruning is on, vLLM hands every media item's embeddings, audio included, to
``recompute_mrope_positions``: each audio row carries its positions too (an audio clip's
M-RoPE positions run on one by one in all three channels, as in the unpruned prompt), and
audio is never pruned. Videos (and so audio read from a video) are refused while pruning is
on (``--limit-mm-per-prompt '{"video": 0}'``), as for Qwen2-VL.

``saint_keep_ratio`` goes in the top-level config (``--hf-overrides '{"saint_keep_ratio":
0.25}'``), not the thinker's.
"""

from __future__ import annotations

from typing import Any

import torch

from .compat import install_torchvision_shim

install_torchvision_shim()  # vLLM's qwen2_vl module imports a torchvision-only one

from transformers import Qwen2_5OmniConfig  # noqa: E402
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning  # noqa: E402
from vllm.model_executor.models.qwen2_5_omni_thinker import (  # noqa: E402
    Qwen2_5OmniThinkerDummyInputsBuilder,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2_5OmniThinkerMultiModalProcessor,
    Qwen2_5OmniThinkerProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from .qwen_common import SaintAddedPruningMixin, SaintBudgetPromptMixin  # noqa: E402
from .settings import ImagesOnlyInfo  # noqa: E402


def audio_positions(num_tokens: int) -> torch.Tensor:
    """``[n, 4]`` per audio token: its (t, h, w) offset from the clip's start (one step per
    token in every channel, as vLLM's and transformers' prompt positions give audio) and the
    step to the text after the clip (its length)."""
    offsets = torch.arange(num_tokens)
    return torch.stack([offsets, offsets, offsets, torch.full_like(offsets, num_tokens)], dim=1)


class SaintQwen2_5OmniProcessingInfo(ImagesOnlyInfo, Qwen2_5OmniThinkerProcessingInfo):
    """The thinker's processing info with the SAINT settings read in the front end (images
    and audio; no videos while pruning)."""

    saint_family = "Qwen2.5-Omni"

    def saint_hf_config(self) -> Any:
        return self.ctx.get_hf_config(Qwen2_5OmniConfig)


class SaintQwen2_5OmniMultiModalProcessor(SaintBudgetPromptMixin, Qwen2_5OmniThinkerMultiModalProcessor):
    """Gives each image as many ``<|IMAGE|>`` placeholders as SAINT will keep."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintQwen2_5OmniMultiModalProcessor,
    info=SaintQwen2_5OmniProcessingInfo,
    dummy_inputs=Qwen2_5OmniThinkerDummyInputsBuilder,
)
class SaintQwen2_5OmniThinkerForConditionalGeneration(
    SaintAddedPruningMixin, Qwen2_5OmniThinkerForConditionalGeneration, SupportsMultiModalPruning
):
    """vLLM's Qwen2.5-Omni thinker; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    saint_family = "Qwen2.5-Omni"

    def saint_hf_config(self, vllm_config: Any) -> Any:
        return vllm_config.model_config.hf_config

    def saint_media_token_ids(self) -> tuple[int, ...]:
        return (self.config.image_token_index, self.config.video_token_index, self.config.audio_token_index)

    def _process_audio_input(self, audio_input: Any) -> tuple[torch.Tensor, ...]:
        embeds = super()._process_audio_input(audio_input)
        if self.saint is None:
            return embeds
        return tuple(torch.cat([e, audio_positions(len(e)).to(e.device, e.dtype)], dim=1) for e in embeds)

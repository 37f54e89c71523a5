"""The thinkers of Qwen2.5-Omni and Qwen3-Omni for vLLM with SAINT image-token pruning after
the vision tower.

Registered over the architectures their checkpoints name (``Qwen2_5OmniForConditionalGeneration``,
``Qwen2_5OmniModel``, ``Qwen3OmniMoeForConditionalGeneration``; vLLM serves their thinker, text
out) by the ``saint`` plugin; without ``saint_keep_ratio`` in the HF config each is vLLM's class
unchanged. With it, the three steps of the Qwen2.5-VL override
(:mod:`saint.integrations.vllm.qwen2_5_vl`) on the thinker's tower (Qwen2.5-VL's with q/k/v
projected separately; Qwen3-Omni: Qwen3-VL's, whose deepstack levels follow the kept rows as
in :mod:`saint.integrations.vllm.qwen3_vl`): every image gets ``kept_tokens(N)`` placeholders,
the fixed-budget drop keeps that many merged embeddings, and each kept row carries its M-RoPE
(t, h, w) of the full grid plus the step to the text after the image.

vLLM's thinkers have no multimodal-pruning path, so these classes add it, as for Qwen2-VL.
Once pruning is on, vLLM hands every media item's embeddings, audio included, to
``recompute_mrope_positions``: each audio row carries its positions too (an audio clip's
M-RoPE positions run on one by one in all three channels, as in the unpruned prompt), and
audio is never pruned. Videos (and so audio read from a video) are refused while pruning is
on (``--limit-mm-per-prompt '{"video": 0}'``), as for Qwen2-VL.

``saint_keep_ratio`` goes in the top-level config (``--hf-overrides '{"saint_keep_ratio":
0.25}'``); given in the thinker's (a nested override) it is refused at start, as settings in
any sub-config are (:func:`~saint.integrations.vllm.settings.refuse_unsupported_model`).
"""

from __future__ import annotations

from typing import Any

import torch

from .compat import install_torchvision_shim

install_torchvision_shim()  # vLLM's qwen2_vl module imports a torchvision-only one

from vllm.model_executor.models.interfaces import SupportsMultiModalPruning  # noqa: E402
from vllm.model_executor.models.qwen2_5_omni_thinker import (  # noqa: E402
    Qwen2_5OmniThinkerDummyInputsBuilder,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2_5OmniThinkerMultiModalProcessor,
    Qwen2_5OmniThinkerProcessingInfo,
)
from vllm.model_executor.models.qwen3_omni_moe_thinker import (  # noqa: E402
    Qwen3OmniMoeThinkerDummyInputsBuilder,
    Qwen3OmniMoeThinkerForConditionalGeneration,
    Qwen3OmniMoeThinkerMultiModalProcessor,
    Qwen3OmniMoeThinkerProcessingInfo,
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


class SaintOmniPruningMixin(SaintAddedPruningMixin):
    """For an Omni thinker: audio rows given their positions (the settings come from the
    top-level config and the audio token joins the media tokens in the shared mixin)."""

    def _process_audio_input(self, audio_input: Any) -> tuple[torch.Tensor, ...]:
        embeds = super()._process_audio_input(audio_input)  # type: ignore[misc]
        if self.saint is None:
            return embeds
        return tuple(torch.cat([e, audio_positions(len(e)).to(e.device, e.dtype)], dim=1) for e in embeds)


class SaintQwen2_5OmniProcessingInfo(ImagesOnlyInfo, Qwen2_5OmniThinkerProcessingInfo):
    """Qwen2.5-Omni's thinker's processing info with the SAINT settings checked."""

    saint_family = "Qwen2.5-Omni"


class SaintQwen2_5OmniMultiModalProcessor(SaintBudgetPromptMixin, Qwen2_5OmniThinkerMultiModalProcessor):
    """Gives each image as many ``<|IMAGE|>`` placeholders as SAINT will keep."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintQwen2_5OmniMultiModalProcessor,
    info=SaintQwen2_5OmniProcessingInfo,
    dummy_inputs=Qwen2_5OmniThinkerDummyInputsBuilder,
)
class SaintQwen2_5OmniThinkerForConditionalGeneration(
    SaintOmniPruningMixin, Qwen2_5OmniThinkerForConditionalGeneration, SupportsMultiModalPruning
):
    """vLLM's Qwen2.5-Omni thinker; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    saint_family = "Qwen2.5-Omni"


class SaintQwen3OmniProcessingInfo(ImagesOnlyInfo, Qwen3OmniMoeThinkerProcessingInfo):
    """Qwen3-Omni's thinker's processing info with the SAINT settings checked."""

    saint_family = "Qwen3-Omni"


class SaintQwen3OmniMultiModalProcessor(SaintBudgetPromptMixin, Qwen3OmniMoeThinkerMultiModalProcessor):
    """Gives each image as many ``<|image_pad|>`` placeholders as SAINT will keep."""


@MULTIMODAL_REGISTRY.register_processor(
    SaintQwen3OmniMultiModalProcessor,
    info=SaintQwen3OmniProcessingInfo,
    dummy_inputs=Qwen3OmniMoeThinkerDummyInputsBuilder,
)
class SaintQwen3OmniMoeThinkerForConditionalGeneration(
    SaintOmniPruningMixin, Qwen3OmniMoeThinkerForConditionalGeneration, SupportsMultiModalPruning
):
    """vLLM's Qwen3-Omni thinker; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT,
    which scores each row's main features (its deepstack levels follow the kept rows)."""

    saint_family = "Qwen3-Omni"

    def saint_features(self, emb: torch.Tensor) -> torch.Tensor:
        return emb[:, : self.visual_dim]

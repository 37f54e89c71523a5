"""lmms-eval's ``saint_qwen_omni``: Qwen2.5-Omni and Qwen3-Omni checkpoints evaluated through their
thinker (the text-generating half) patched once by :func:`saint.patch` (the Qwen-VL adapter),
images and videos, as ``saint_qwen_vl`` serves Qwen.

What the Omni models change: the whole model's talker speaks from the thinker's hidden states
at every prompt position, which pruning removes, so this class loads the thinker alone
(``Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained`` on the whole checkpoint, as
transformers documents, or on a thinker checkpoint). An image enters the prompt as
``<|vision_bos|><|IMAGE|><|vision_eos|>`` (the processor's own start and end tokens), a
video likewise, and every video carries its seconds per temporal patch
(``video_second_per_grid``, from the rate its frames were sampled at), which the thinker's
M-RoPE reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .lmms_eval import SaintQwenVL
from .lmms_video import Video


class SaintQwenOmni(SaintQwenVL):
    """A Qwen2.5-Omni or Qwen3-Omni checkpoint's thinker patched once by :func:`saint.patch`,
    evaluated by lmms-eval (``--model saint_qwen_omni``); the settings, video sampling and
    statistics are ``saint_qwen_vl``'s (:class:`~saint.integrations.lmms_eval.SaintQwenVL`).
    Audio visuals are refused, as there."""

    NAME = "saint_qwen_omni"
    MODEL_CLASSES = {  # model_type -> the thinker class transformers loads from it (whole or thinker checkpoint)
        "qwen2_5_omni": "Qwen2_5OmniThinkerForConditionalGeneration",
        "qwen2_5_omni_thinker": "Qwen2_5OmniThinkerForConditionalGeneration",
        "qwen3_omni_moe": "Qwen3OmniMoeThinkerForConditionalGeneration",
        "qwen3_omni_moe_thinker": "Qwen3OmniMoeThinkerForConditionalGeneration"}
    MODEL_TYPES = tuple(MODEL_CLASSES)
    TITLE = "Qwen2.5-Omni / Qwen3-Omni (whole, or their thinker)"

    def _image_placeholder(self) -> str:
        return f"{self.processor.vision_bos_token}{self.image_token}{self.processor.vision_eos_token}"

    def _video_placeholder(self) -> str:
        return f"{self.processor.vision_bos_token}{self.processor.video_token}{self.processor.vision_eos_token}"

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The request's pixels and grids, and each video's seconds per temporal patch from the
        rate its frames were sampled at (the Omni processors assume 2 fps whatever the sampling;
        Qwen2.5-VL's reads the sampled rate, as here)."""
        out = super()._media(enc, visuals)
        videos = [v for v in visuals if isinstance(v, Video)]
        if videos:
            step = self.processor.video_processor.temporal_patch_size
            rates = [len(v.frames_indices) * v.fps / v.total_num_frames for v in videos]
            out["video_second_per_grid"] = torch.tensor([step / r for r in rates])
        return out

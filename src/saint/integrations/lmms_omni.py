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
M-RoPE reads.

Audio visuals (lmms-eval's audio tasks give ``{"array": waveform, "sampling_rate": rate}``)
enter the prompt as ``<|audio_bos|><|AUDIO|><|audio_eos|>`` (the processor's tokens), in the
order the task lists its visuals, resampled to the feature extractor's rate (16 kHz). Audio
tokens are never pruned (:func:`saint.patch` keeps them); the images beside them are.
Qwen2.5-Omni's processor truncates a clip at its feature extractor's 30 s, so a longer clip
enters as consecutive 30 s clips (as lmms-eval's own Omni models split long audio, there
into 5 min pieces); Qwen3-Omni's takes a clip of any length whole."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import gcd
from typing import Any

import numpy as np
import torch

from .lmms_eval import SaintQwenVL
from .lmms_video import VIDEO_EXTENSIONS, Video


@dataclass(frozen=True, eq=False)
class Audio:
    """One audio clip of a request: a mono float32 waveform at the feature extractor's rate."""

    wave: np.ndarray


def is_audio(value: Any) -> bool:
    """Whether a task's visual is an audio clip (lmms-eval's ``{"array", "sampling_rate"}``)."""
    return isinstance(value, dict) and "array" in value and "sampling_rate" in value


def to_waveform(value: dict, rate: int, where: str) -> np.ndarray:
    """A task's audio clip as a mono float32 waveform at ``rate`` Hz (resampled by a polyphase
    filter where the task's rate differs; channels averaged)."""
    wave = np.asarray(value["array"], dtype=np.float32)
    source = int(value["sampling_rate"])
    if wave.ndim == 2:  # (channels, samples) or (samples, channels): the shorter axis is the channels
        wave = wave.mean(axis=int(np.argmin(wave.shape)))
    if wave.ndim != 1 or wave.size == 0 or source <= 0:
        raise ValueError(f"{where}: an audio clip must be a non-empty mono or multi-channel waveform with a "
                         f"positive sampling_rate; got shape {np.shape(value['array'])} at {source} Hz")
    if source != rate:
        from scipy.signal import resample_poly  # scipy comes with lmms-eval (scikit-learn)

        g = gcd(source, rate)
        wave = resample_poly(wave, rate // g, source // g).astype(np.float32)
    return wave


class SaintQwenOmni(SaintQwenVL):
    """A Qwen2.5-Omni or Qwen3-Omni checkpoint's thinker patched once by :func:`saint.patch`,
    evaluated by lmms-eval (``--model saint_qwen_omni``); the settings, video sampling and
    statistics are ``saint_qwen_vl``'s (:class:`~saint.integrations.lmms_eval.SaintQwenVL`);
    audio visuals are served too (never pruned)."""

    NAME = "saint_qwen_omni"
    MODEL_CLASSES = {  # model_type -> the thinker class transformers loads from it (whole or thinker checkpoint)
        "qwen2_5_omni": "Qwen2_5OmniThinkerForConditionalGeneration",
        "qwen2_5_omni_thinker": "Qwen2_5OmniThinkerForConditionalGeneration",
        "qwen3_omni_moe": "Qwen3OmniMoeThinkerForConditionalGeneration",
        "qwen3_omni_moe_thinker": "Qwen3OmniMoeThinkerForConditionalGeneration"}
    MODEL_TYPES = tuple(MODEL_CLASSES)
    TITLE = "Qwen2.5-Omni / Qwen3-Omni (whole, or their thinker)"
    FLOAT_INPUTS = (*SaintQwenVL.FLOAT_INPUTS, "input_features")

    def _visual(self, v: Any, where: str) -> Any:
        if not is_audio(v):
            return super()._visual(v, where)
        extractor = self.processor.feature_extractor
        wave = to_waveform(v, int(extractor.sampling_rate), where)
        # Qwen2.5-Omni's processor pads every clip to, and truncates it at, its extractor's n_samples
        piece = extractor.n_samples if self.model.config.model_type.startswith("qwen2_5_omni") else len(wave)
        return [Audio(wave[i : i + piece]) for i in range(0, len(wave), piece)]

    @staticmethod
    def _other_visuals() -> str:
        return (f"videos are file paths ending in {', '.join(VIDEO_EXTENSIONS)} or 4-D uint8 frame arrays; "
                "audio clips are {'array', 'sampling_rate'} dicts")

    def _audio_placeholder(self) -> str:
        return f"{self.processor.audio_bos_token}{self.processor.audio_token}{self.processor.audio_eos_token}"

    def _media_tokens(self) -> tuple[str, ...]:
        return *super()._media_tokens(), self.processor.audio_token

    def _placeholder(self, visual: Any) -> str:
        return self._audio_placeholder() if isinstance(visual, Audio) else super()._placeholder(visual)

    def _processor_media(self, visuals: Sequence[Any]) -> dict[str, Any]:
        out = super()._processor_media([v for v in visuals if not isinstance(v, Audio)])
        clips = [v.wave for v in visuals if isinstance(v, Audio)]
        if clips:
            out["audio"] = clips
        return out

    def _image_placeholder(self) -> str:
        return f"{self.processor.vision_bos_token}{self.image_token}{self.processor.vision_eos_token}"

    def _video_placeholder(self) -> str:
        return f"{self.processor.vision_bos_token}{self.processor.video_token}{self.processor.vision_eos_token}"

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The request's pixels and grids, and each video's seconds per temporal patch from the
        rate its frames were sampled at (the Omni processors assume 2 fps whatever the sampling;
        Qwen2.5-VL's reads the sampled rate, as here)."""
        out = super()._media(enc, [v for v in visuals if not isinstance(v, Audio)])
        clips = sum(isinstance(v, Audio) for v in visuals)
        if clips:
            out.update(input_features=enc["input_features"][:clips],
                       feature_attention_mask=enc["feature_attention_mask"][:clips])
        videos = [v for v in visuals if isinstance(v, Video)]
        if videos:
            step = self.processor.video_processor.temporal_patch_size
            rates = [len(v.frames_indices) * v.fps / v.total_num_frames for v in videos]
            out["video_second_per_grid"] = torch.tensor([step / r for r in rates])
        return out

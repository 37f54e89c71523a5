"""lmms-eval models ``saint_llava_next``, ``saint_llava_next_video`` and ``saint_llava_onevision``:
Hugging Face LLaVA-NeXT (``LlavaNextForConditionalGeneration``), LLaVA-NeXT-Video
(``LlavaNextVideoForConditionalGeneration``) and LLaVA-OneVision
(``LlavaOnevisionForConditionalGeneration``) checkpoints pruned by :func:`saint.patch`
(:mod:`saint.adapters.llava_anyres`), for any lmms-eval image task::

    python -m lmms_eval --model saint_llava_onevision \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,mode=llm,llm_layers=7-16,llm_tau=0.83 \\
        --tasks mme --batch_size 8

Everything but what differs per family is :class:`~saint.integrations.lmms_eval.SaintLlava`'s
(model arguments, batching, ``until``, log-likelihood, multi-round, ``stats_path``).
Prompts follow lmms-eval's ``llava_hf`` model, which serves these families too: one
``<image>`` per image in front of the task's text unless it placed them, then the
chat template (``chat_template=``, else the tokenizer's, else the family's: Vicuna for
NeXT and NeXT-Video as ``llava_hf``, ChatML for OneVision's Qwen2 as lmms-eval's ``llava_onevision``).
The processor expands each ``<image>`` to the image's anyres token count and returns
``image_sizes``, which the model (and saint's packing) needs to cut the crop grid.

Pruning settings are LLaVA's (:class:`saint.adapters.llava.LlavaPruneConfig`), with
the anyres adapter's rules: ``method`` is ``saint`` (``mode`` ``llm`` by default,
``vit`` or ``hybrid``), ``fastv`` or ``none``; ``vit_keep`` is patches kept per crop
(the base image is a crop); the newline tokens closing every row of the crop grid are
never pruned, so ``llm_input`` in the stats counts the image tokens without them.

OneVision: a prompt with several images gets no crops for them (the processor is given
the images grouped per prompt, as the original LLaVA-OneVision evaluates multi-image
tasks with ``image_aspect_ratio=pad``). Videos (OneVision, NeXT-Video) follow lmms-eval's ``llava_hf``: a video
file's path in ``doc_to_visual`` (or a ``T x H x W x 3`` uint8 frame array), entered as
``<video>``, exactly ``max_frames_num`` frames (default 32) spread evenly over it (repeated
when it is shorter, as ``llava_hf`` samples), decoded with
PyAV (:mod:`saint.integrations.lmms_video`). Video tokens are never pruned (see the
adapter); ``stats_path`` counts them as ``video_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..adapters import llava_anyres
from .lmms_eval import CHATML_TEMPLATE, SaintLlava
from .lmms_video import VIDEO_EXTENSIONS, Video, to_video

__all__ = ["SaintLlavaAnyres", "SaintLlavaAnyresVideo", "SaintLlavaNext", "SaintLlavaNextVideo", "SaintLlavaOneVision"]


class SaintLlavaAnyres(SaintLlava):
    """What LLaVA-NeXT and LLaVA-OneVision share: the family's adapter and model class,
    and per-image inputs of several tensors (pixels ``[images, crops, 3, H, W]``,
    ``image_sizes``)."""

    FAMILY: llava_anyres.Family = llava_anyres.NEXT
    ADAPTER: Any = FAMILY  # its make_config validates the settings before any weights load

    @classmethod
    def _family_hint(cls) -> str:  # type: ignore[override]
        return f"{cls.FAMILY.name} checkpoints (model_type {cls.FAMILY.key!r})"

    @classmethod
    def _model_class(cls, model_type: str) -> Any:  # type: ignore[override]
        return cls.FAMILY.model_classes()[0]

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Pixels and sizes of the first ``len(visuals)`` images of a processor output."""
        n = len(visuals)
        return {"pixel_values": enc["pixel_values"][:n], "image_sizes": enc["image_sizes"][:n]} if n else {}


class SaintLlavaNext(SaintLlavaAnyres):
    """A LLaVA-NeXT checkpoint patched once by :func:`saint.patch`, evaluated by
    lmms-eval (``--model saint_llava_next``); images only."""

    NAME = "saint_llava_next"
    FAMILY = ADAPTER = llava_anyres.NEXT
    MODEL_TYPES = (llava_anyres.NEXT.key,)


class SaintLlavaAnyresVideo(SaintLlavaAnyres):
    """What the families with videos share (lmms-eval's ``llava_hf`` way): ``max_frames_num``
    frames per video (lmms-eval's argument, default 32), ``<video>`` placeholders, and the
    video tokens counted in the statistics."""

    def __init__(self, pretrained: str, max_frames_num: int | str = 32, **kwargs: Any) -> None:
        frames = int(max_frames_num)
        if frames < 1 or frames != float(max_frames_num):
            raise ValueError(f"max_frames_num={max_frames_num!r} must be a positive integer")
        self.max_frames_num = frames
        super().__init__(pretrained, **kwargs)

    # ---------------------------------------------------------------- visuals and prompts
    def _visual(self, v: Any, where: str) -> Any:
        """Images as LLaVA's; a video as exactly ``max_frames_num`` frames spread evenly over
        it, repeated when it has fewer (lmms-eval's ``llava_hf``), so videos batch together."""
        video = to_video(v, self.max_frames_num)
        if video is None:
            return super()._visual(v, where)
        n = self.max_frames_num
        if len(video.frames) != n:
            pick = np.linspace(0, len(video.frames) - 1, n).round().astype(int)
            video = Video(video.frames[pick], video.fps, video.total_num_frames,
                          [video.frames_indices[i] for i in pick])
        return video

    @staticmethod
    def _other_visuals() -> str:
        return f"videos are file paths ending in {', '.join(VIDEO_EXTENSIONS)} or 4-D uint8 frame arrays; audio is not supported"

    def _placeholders(self, context: str, visuals: Sequence[Any]) -> str:
        """``<image>`` / ``<video>`` per visual in front of ``context``, unless the task placed them."""
        video_token = self.processor.video_token
        if not visuals or self.image_token in context or video_token in context:
            return context
        return " ".join(video_token if isinstance(v, Video) else self.image_token for v in visuals) + "\n" + context

    def _processor_media(self, visuals: Sequence[Any]) -> dict[str, Any]:
        """The images and the videos' frames, each in prompt order."""
        images = [v for v in visuals if not isinstance(v, Video)]
        videos = [v.frames for v in visuals if isinstance(v, Video)]
        return {"images": images or None, "videos": videos or None}

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The first prompt's images (pixels, sizes) and videos."""
        n_videos = sum(isinstance(v, Video) for v in visuals)
        out = super()._media(enc, [v for v in visuals if not isinstance(v, Video)])
        if n_videos:
            out["pixel_values_videos"] = enc["pixel_values_videos"][:n_videos]
        return out

    def _visual_token_ids(self) -> dict[str, int]:
        cfg = self.model.config
        return {"image_tokens": cfg.image_token_id, "video_tokens": cfg.video_token_id}


class SaintLlavaNextVideo(SaintLlavaAnyresVideo):
    """A LLaVA-NeXT-Video checkpoint patched once by :func:`saint.patch`, evaluated by
    lmms-eval (``--model saint_llava_next_video``), images (as LLaVA-NeXT's) and videos."""

    NAME = "saint_llava_next_video"
    FAMILY = ADAPTER = llava_anyres.NEXT_VIDEO
    MODEL_TYPES = (llava_anyres.NEXT_VIDEO.key,)


class SaintLlavaOneVision(SaintLlavaAnyresVideo):
    """A LLaVA-OneVision checkpoint patched once by :func:`saint.patch`, evaluated by
    lmms-eval (``--model saint_llava_onevision``), images and videos.
    ``max_frames_num``: frames taken from a video (lmms-eval's argument, default 32)."""

    NAME = "saint_llava_onevision"
    FAMILY = ADAPTER = llava_anyres.ONEVISION
    MODEL_TYPES = (llava_anyres.ONEVISION.key,)
    DEFAULT_CHAT_TEMPLATE = CHATML_TEMPLATE

    def _processor_inputs(self, texts: Sequence[str], visuals: Sequence[Any]) -> Any:
        """The processor's output, its images grouped per prompt (by the prompts'
        ``<image>`` counts) so that a prompt with several images gets no crops."""
        media = self._processor_media(visuals)
        images = media["images"] or []
        counts = [t.count(self.image_token) for t in texts]
        if sum(counts) != len(images):
            raise ValueError(f"prompts hold {sum(counts)} {self.image_token} tokens for {len(images)} images")
        groups, start = [], 0
        for n in counts:
            groups.append(images[start:start + n])
            start += n
        media["images"] = groups if images else None
        return self.processor(text=list(texts), **media, return_tensors="pt", padding=True)

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The first prompt's images (pixels, sizes, their count) and videos."""
        out = super()._media(enc, visuals)
        if any(not isinstance(v, Video) for v in visuals):
            out["batch_num_images"] = enc["batch_num_images"][:1]
        return out

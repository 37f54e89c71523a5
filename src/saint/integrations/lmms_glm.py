"""lmms-eval's ``saint_glm4v``: GLM-4.1V, GLM-4.5V, GLM-4.6V and GLM-OCR checkpoints patched once by
:func:`saint.patch` (the Qwen-VL adapter), images and videos, as ``saint_qwen_vl`` serves Qwen.

What GLM changes: an image enters the prompt as ``<|begin_of_image|><|image|><|end_of_image|>``
and a video as ``<|begin_of_video|><|video|><|end_of_video|>``, which the processor expands
into one image-token run per frame group, each followed by its timestamp; so a video's
frames are image tokens, told apart by their place between the video's start and end
tokens. transformers' GLM takes images or videos in one forward, not both: a batch is run
as its image prompts and its video prompts, and a prompt holding both is refused."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .lmms_eval import LoglikelihoodResult, SaintQwenVL
from .lmms_video import Video, is_frame_array, is_video_path

# GLM-4.1V's chat format (``[gMASK]<sop>``, then ``<|role|>`` turns), for a tokenizer without a template
GLM_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class SaintGlm4v(SaintQwenVL):
    """A GLM-4.1V / 4.5V / 4.6V or GLM-OCR checkpoint patched once by :func:`saint.patch`, evaluated by
    lmms-eval (``--model saint_glm4v``); the settings, video sampling and statistics are
    ``saint_qwen_vl``'s (:class:`~saint.integrations.lmms_eval.SaintQwenVL`)."""

    NAME = "saint_glm4v"
    MODEL_CLASSES = {"glm4v": "Glm4vForConditionalGeneration", "glm4v_moe": "Glm4vMoeForConditionalGeneration",
                     "glm46v": "Glm46VForConditionalGeneration", "glm_ocr": "GlmOcrForConditionalGeneration"}
    MODEL_TYPES = tuple(MODEL_CLASSES)
    TITLE = "GLM-4.1V / GLM-4.5V / GLM-4.6V / GLM-OCR"
    DEFAULT_CHAT_TEMPLATE = GLM_CHAT_TEMPLATE

    def _image_placeholder(self) -> str:
        return f"<|begin_of_image|>{self.image_token}<|end_of_image|>"

    def _video_placeholder(self) -> str:
        return f"<|begin_of_video|>{self.processor.video_token}<|end_of_video|>"

    def _token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 for an image's tokens, 2 for a video frame's (image tokens between the video's
        start and end tokens), 0 elsewhere: what GLM's processor returns as ``mm_token_type_ids``."""
        cfg = self.model.config
        depth = (input_ids == cfg.video_start_token_id).long().cumsum(1) - (input_ids == cfg.video_end_token_id).long().cumsum(1)
        image = input_ids == cfg.image_token_id
        return (image & (depth == 0)).int() + 2 * (image & (depth > 0)).int()

    def _row_inputs(self, input_ids: torch.Tensor, scored: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": self._token_types(input_ids)}

    def _visual_counts(self, input_ids: torch.Tensor) -> dict[str, list[int]]:
        types = self._token_types(input_ids)
        return {"image_tokens": (types == 1).sum(dim=1).tolist(), "video_tokens": (types == 2).sum(dim=1).tolist()}

    # ------------------------------------------------------------------ one modality per forward
    def _generate(self, prompts: Sequence[str], images: Sequence[Sequence[Any]],
                  gen_kwargs: dict[str, Any], kind: str) -> list[str]:
        groups = _by_modality([_modality(ims, f"prompt {i}") for i, ims in enumerate(images)])
        texts: list[str | None] = [None] * len(prompts)
        for rows in groups:
            out = super()._generate([prompts[r] for r in rows], [images[r] for r in rows], gen_kwargs, kind)
            for r, text in zip(rows, out, strict=True):
                texts[r] = text
        return texts  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Any]) -> list[LoglikelihoodResult]:
        modalities = []
        for req in requests:
            _, _, doc_to_visual, doc_id, task, split = req.args
            visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
            modalities.append(_modality(_flat(visuals), f"{task}/{doc_id}"))
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        for rows in _by_modality(modalities):
            for r, result in zip(rows, super().loglikelihood([requests[r] for r in rows]), strict=True):
                results[r] = result
        return results  # type: ignore[return-value]


def _flat(visuals: Any) -> list[Any]:
    out: list[Any] = []
    for v in visuals or []:
        out.extend(_flat(v) if isinstance(v, (list, tuple)) else [] if v is None else [v])
    return out


def _modality(visuals: Sequence[Any], where: str) -> str:
    """``"video"``, ``"image"`` or ``"text"``: what one prompt holds (GLM: never both)."""
    videos = [isinstance(v, Video) or is_video_path(v) or is_frame_array(v) for v in visuals]
    if any(videos) and not all(videos):
        raise ValueError(f"{where}: transformers' GLM-4.1V takes images or videos in one prompt, not both")
    return "video" if any(videos) else "image" if visuals else "text"


def _by_modality(modalities: Sequence[str]) -> list[list[int]]:
    """Row indices in groups a GLM forward can take together: text rows join the image rows
    (or the video rows when there are no images)."""
    video = [i for i, m in enumerate(modalities) if m == "video"]
    rest = [i for i, m in enumerate(modalities) if m != "video"]
    if video and all(modalities[i] == "text" for i in rest):
        return [sorted(video + rest)]
    return [g for g in (rest, video) if g]

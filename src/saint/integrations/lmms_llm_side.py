"""lmms-eval models ``saint_internvl``, ``saint_mistral3``, ``saint_gemma3``,
``saint_idefics3``, ``saint_paligemma``, ``saint_fast_vlm``, ``saint_aya_vision``,
``saint_cohere2_vision``, ``saint_ovis2``, ``saint_lighton_ocr``, ``saint_deepseek_vl``,
``saint_deepseek_vl_hybrid``, ``saint_janus``, ``saint_gemma4``, ``saint_paddleocr_vl``,
``saint_idefics2`` and ``saint_vipllava``: Hugging Face InternVL
(``InternVLForConditionalGeneration``), Mistral 3 (``Mistral3ForConditionalGeneration``), Gemma 3 (``Gemma3ForConditionalGeneration``),
Idefics3 / SmolVLM, PaliGemma / PaliGemma 2, FastVLM (``FastVlmForConditionalGeneration``), Aya Vision
(``AyaVisionForConditionalGeneration``), Command A Vision (``Cohere2VisionForConditionalGeneration``),
Ovis2 (``Ovis2ForConditionalGeneration``), LightOnOCR (``LightOnOcrForConditionalGeneration``),
DeepSeek-VL (and its hybrid), Janus, Gemma 4, PaddleOCR-VL, Idefics2 and VipLLaVA checkpoints pruned by :func:`saint.patch`
(:mod:`saint.adapters.pooled_vlm`, InternVL, Gemma 3, Idefics3 / SmolVLM, PaliGemma, Aya Vision,
Command A Vision, Ovis2, DeepSeek-VL and Janus: SAINT's ``llm``, ``vit`` and ``hybrid`` modes, FastV
or ``random``; :mod:`saint.adapters.llm_side_vlm`: SAINT's ``llm`` mode or FastV inside the language
models of Mistral 3, FastVLM, LightOnOCR, DeepSeek-VL-Hybrid, Gemma 4, PaddleOCR-VL, Idefics2 and VipLLaVA), for any lmms-eval image task::

    python -m lmms_eval --model saint_internvl \\
        --model_args pretrained=OpenGVLab/InternVL3-8B-hf,llm_layers=7-16,llm_tau=0.83 \\
        --tasks mme --batch_size 8

Everything but what differs per family is :class:`~saint.integrations.lmms_eval.SaintLlava`'s
(model arguments, batching, ``until``, log-likelihood, multi-round, ``stats_path``).
Each image enters the prompt as the processor's image token in front of the task's text
(unless the task placed them), then the chat template (``chat_template=``, else the
tokenizer's, else ChatML for InternVL, FastVLM, Ovis2 and LightOnOCR, DeepSeek's turns for DeepSeek-VL and Janus, Mistral's ``[INST]`` format for Mistral 3,
Gemma's turns for Gemma 3 and Cohere's turns for Aya Vision and Command A Vision). InternVL's processor expands an image to its tiles
(``image_seq_length`` tokens each, between ``<img>`` and ``</img>``); Pixtral's to rows of
image tokens closed by row breaks and an image end, with ``image_sizes``; Gemma 3's to
``<start_of_image>``, ``image_seq_length`` image tokens and ``<end_of_image>``, with
``token_type_ids`` marking the image tokens (they attend to each other both ways); FastVLM's
(LLaVA's processor) to one image token per cell of its tower's last stage; Aya Vision's to its
tiles and a thumbnail (``<|IMG_PATCH|>`` tokens, each tile led by its tile marker); Command A
Vision's to its tiles and a thumbnail, each a run of image tokens closed by a line break; Ovis2's
to its thumbnail and tiles, each a run of ``<IMG_ATOM>`` tokens between indicator tokens.
PaliGemma takes no chat template: its processor puts the image tokens and ``<bos>`` in front
of the task's text and ends it with a newline, and the whole prompt attends both ways; a
scored continuation follows as its suffix (``token_type_ids`` 1: causal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..adapters import llm_side_vlm, pooled_vlm
from .lmms_eval import CHATML_TEMPLATE, SaintLlava

__all__ = ["SaintAyaVision", "SaintCohere2Vision", "SaintDeepseekVL", "SaintDeepseekVLHybrid", "SaintFastVlm",
           "SaintGemma3", "SaintGemma4", "SaintIdefics2", "SaintIdefics3", "SaintInternVL", "SaintJanus", "SaintLfm2Vl",
           "SaintLightOnOcr", "SaintMistral3", "SaintOvis2", "SaintPaddleOCRVL", "SaintPaliGemma", "SaintTiled", "SaintVideoLlava", "SaintVipLlava"]

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]{{ message['content'] }}"
    "[/INST]{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else message['role'] }}\n{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

DEEPSEEK_TEMPLATE = (  # DeepSeek-VL's and Janus's turns
    "{% for message in messages %}{% if message['role'] == 'user' %}<|User|>: {{ message['content'] }}\n\n"
    "{% else %}<|Assistant|>: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)
PADDLEOCR_TEMPLATE = (  # PaddleOCR-VL's turns; an image's tokens between <|IMAGE_START|> and <|IMAGE_END|>
    "{{ bos_token }}{% for message in messages %}{{ 'User: ' if message['role'] == 'user' else 'Assistant: ' }}"
    "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)
COHERE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|START_OF_TURN_TOKEN|>"
    "{{ '<|CHATBOT_TOKEN|>' if message['role'] == 'assistant' else '<|USER_TOKEN|>' }}{{ message['content'] }}"
    "<|END_OF_TURN_TOKEN|>{% endfor %}{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    "{% endif %}"
)


class SaintLlmSide(SaintLlava):
    """What both share: the adapter (its ``make_config`` validates the settings before
    any weights load), the model class named by ``MODEL_CLASS`` and the image token
    placed in front of the task's text."""

    ADAPTER: Any = llm_side_vlm.MISTRAL3
    MODEL_CLASS = ""
    TITLE = ""
    NESTED_IMAGES = False  # the processor takes each prompt's images as a list of their own (Gemma 3, Idefics3)
    MEDIA_KEYS: tuple[str, ...] = ("pixel_values",)  # processor outputs with one row per image
    MEDIA_PER_PROMPT = False  # MEDIA_KEYS have one row per prompt instead (Idefics2 / Idefics3)
    IMAGE_TYPES: str | None = None  # a per-token input marking the image tokens (1) and the rest (0)

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The ``MEDIA_KEYS`` rows of the first ``len(visuals)`` images (the first prompt's row)."""
        if not visuals:
            return {}
        n = 1 if self.MEDIA_PER_PROMPT else len(visuals)
        return {k: enc[k][:n] for k in self.MEDIA_KEYS if k in enc}

    def _row_inputs(self, input_ids: torch.Tensor, scored: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """``IMAGE_TYPES``, as the processor marks the image tokens, where the family takes one."""
        if self.IMAGE_TYPES is None:
            return {}
        return {self.IMAGE_TYPES: (input_ids == self.model.config.image_token_id).long()}

    def _processor_inputs(self, texts: Sequence[str], visuals: Sequence[Any]) -> Any:
        """The processor's output; with ``NESTED_IMAGES`` the flat ``visuals`` are split by
        prompt (each takes as many as its text has image placeholders)."""
        if not visuals or not self.NESTED_IMAGES:
            return super()._processor_inputs(texts, visuals)
        images, k = [], 0
        for text in texts:
            n = text.count(self.image_token)
            images.append(list(visuals[k:k + n]))
            k += n
        if k != len(visuals):  # a prompt may have none (a text-only request beside image ones)
            raise ValueError(f"{self.NAME}: {len(visuals)} images for prompts with "
                             f"{[t.count(self.image_token) for t in texts]} image placeholders")
        return self.processor(text=list(texts), images=images, return_tensors="pt", padding=True)

    @classmethod
    def _family_hint(cls) -> str:  # type: ignore[override]
        return f"{cls.TITLE} checkpoints (model_type {cls.MODEL_TYPES[0]!r})"

    @classmethod
    def _model_class(cls, model_type: str) -> Any:  # type: ignore[override]
        import transformers

        return getattr(transformers, cls.MODEL_CLASS)


class SaintTiled(SaintLlmSide):
    """Families whose processor lays every tile of a batch's images out in order (InternVL,
    Aya Vision, Command A Vision, Ovis2): the first prompt's tiles are its image tokens over
    the tokens of one tile (:meth:`_tile_tokens`)."""

    def _tile_tokens(self) -> int:
        """Image tokens of one tile, from the processor's settings."""
        return int(self.processor.image_seq_length)

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The tiles of the first prompt's images (the first ``len(visuals)`` images)."""
        if not visuals:
            return {}
        tokens = int((enc["input_ids"][0] == self.model.config.image_token_id).sum())
        return {"pixel_values": enc["pixel_values"][: tokens // self._tile_tokens()]}


class SaintInternVL(SaintTiled):
    """An InternVL checkpoint (``model_type: internvl``, the ``-hf`` conversions) patched
    once by :func:`saint.patch`, evaluated by lmms-eval (``--model saint_internvl``)."""

    NAME = "saint_internvl"
    ADAPTER = pooled_vlm.INTERNVL
    MODEL_TYPES = ("internvl",)
    MODEL_CLASS = "InternVLForConditionalGeneration"
    TITLE = "InternVL"
    DEFAULT_CHAT_TEMPLATE = CHATML_TEMPLATE


class SaintMistral3(SaintLlmSide):
    """A Mistral 3 checkpoint (``model_type: mistral3``, a Pixtral tower) patched once by
    :func:`saint.patch`, evaluated by lmms-eval (``--model saint_mistral3``)."""

    NAME = "saint_mistral3"
    MODEL_TYPES = ("mistral3",)
    MODEL_CLASS = "Mistral3ForConditionalGeneration"
    TITLE = "Mistral 3"
    DEFAULT_CHAT_TEMPLATE = MISTRAL_TEMPLATE
    MEDIA_KEYS = ("pixel_values", "image_sizes")


class SaintFastVlm(SaintLlmSide):
    """A FastVLM checkpoint (``model_type: fast_vlm``, Apple's FastViTHD tower, a Qwen2
    language model) patched once by :func:`saint.patch`, evaluated by lmms-eval
    (``--model saint_fast_vlm``)."""

    NAME = "saint_fast_vlm"
    ADAPTER = llm_side_vlm.FASTVLM
    MODEL_TYPES = ("fast_vlm",)
    MODEL_CLASS = "FastVlmForConditionalGeneration"
    TITLE = "FastVLM"
    DEFAULT_CHAT_TEMPLATE = CHATML_TEMPLATE


class SaintAyaVision(SaintTiled):
    """An Aya Vision checkpoint (``model_type: aya_vision``, a SigLIP tower, a Cohere 2 language
    model) patched once by :func:`saint.patch`, evaluated by lmms-eval (``--model saint_aya_vision``)."""

    NAME = "saint_aya_vision"
    ADAPTER = pooled_vlm.AYA_VISION
    MODEL_TYPES = ("aya_vision",)
    MODEL_CLASS = "AyaVisionForConditionalGeneration"
    TITLE = "Aya Vision"
    DEFAULT_CHAT_TEMPLATE = COHERE_TEMPLATE

    def _tile_tokens(self) -> int:
        return (int(self.processor.img_size) // int(self.processor.patch_size)) ** 2


class SaintCohere2Vision(SaintTiled):
    """A Command A Vision checkpoint (``model_type: cohere2_vision``, a SigLIP tower, a Cohere 2
    language model) patched once by :func:`saint.patch`, evaluated by lmms-eval
    (``--model saint_cohere2_vision``)."""

    NAME = "saint_cohere2_vision"
    ADAPTER = pooled_vlm.COHERE2_VISION
    MODEL_TYPES = ("cohere2_vision",)
    MODEL_CLASS = "Cohere2VisionForConditionalGeneration"
    TITLE = "Command A Vision"
    DEFAULT_CHAT_TEMPLATE = COHERE_TEMPLATE

    def _tile_tokens(self) -> int:
        return int(self.processor.patch_size) ** 2  # its processor's patch_size: tokens per tile side


class SaintOvis2(SaintTiled):
    """An Ovis2 checkpoint (``model_type: ovis2``, a Qwen2 language model) patched once by
    :func:`saint.patch`, evaluated by lmms-eval (``--model saint_ovis2``)."""

    NAME = "saint_ovis2"
    ADAPTER = pooled_vlm.OVIS2
    MODEL_TYPES = ("ovis2",)
    MODEL_CLASS = "Ovis2ForConditionalGeneration"
    TITLE = "Ovis2"
    DEFAULT_CHAT_TEMPLATE = CHATML_TEMPLATE


class SaintLfm2Vl(SaintLlmSide):
    """An LFM2-VL checkpoint (``model_type: lfm2_vl``: a NaFlex SigLIP 2 tower whose tiles have
    their own patch grids, an LFM2 language model) patched once by :func:`saint.patch` on the
    vision side (SAINT's ``vit`` mode by default, or ``method=random``), evaluated by lmms-eval
    (``--model saint_lfm2_vl``)."""

    NAME = "saint_lfm2_vl"
    ADAPTER = pooled_vlm.LFM2_VL
    MODEL_TYPES = ("lfm2_vl",)
    MODEL_CLASS = "Lfm2VlForConditionalGeneration"
    TITLE = "LFM2-VL"
    DEFAULT_CHAT_TEMPLATE = CHATML_TEMPLATE
    NESTED_IMAGES = True
    MEDIA_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The tiles of the first prompt's images: the first tiles whose tokens (each tile's
        grid over the pixel unshuffle's factor, as the processor counts them) add up to that
        prompt's image tokens."""
        if not visuals:
            return {}
        want = int((enc["input_ids"][0] == self.model.config.image_token_id).sum())
        factor = int(self.model.config.downsample_factor)
        tiles, tokens = 0, 0
        for h, w in enc["spatial_shapes"].tolist():
            if tokens >= want:
                break
            tokens += -(-h // factor) * -(-w // factor)
            tiles += 1
        if tokens != want:
            raise ValueError(f"{self.NAME}: the first prompt holds {want} image tokens, its tiles {tokens}")
        return {k: enc[k][:tiles] for k in self.MEDIA_KEYS}


class SaintLightOnOcr(SaintMistral3):
    """A LightOnOCR checkpoint (``model_type: lighton_ocr``: Mistral 3's Pixtral tower and patch
    merger, a Qwen3 language model) patched once by :func:`saint.patch`, evaluated by lmms-eval
    (``--model saint_lighton_ocr``)."""

    NAME = "saint_lighton_ocr"
    ADAPTER = llm_side_vlm.LIGHTON_OCR
    MODEL_TYPES = ("lighton_ocr",)
    MODEL_CLASS = "LightOnOcrForConditionalGeneration"
    TITLE = "LightOnOCR"
    DEFAULT_CHAT_TEMPLATE = CHATML_TEMPLATE


class SaintDeepseekVL(SaintLlmSide):
    """A DeepSeek-VL checkpoint (``model_type: deepseek_vl``, a SigLIP tower) patched once by
    :func:`saint.patch`, evaluated by lmms-eval (``--model saint_deepseek_vl``)."""

    NAME = "saint_deepseek_vl"
    ADAPTER = pooled_vlm.DEEPSEEK_VL
    MODEL_TYPES = ("deepseek_vl",)
    MODEL_CLASS = "DeepseekVLForConditionalGeneration"
    TITLE = "DeepSeek-VL"
    DEFAULT_CHAT_TEMPLATE = DEEPSEEK_TEMPLATE


class SaintDeepseekVLHybrid(SaintDeepseekVL):
    """A DeepSeek-VL-Hybrid checkpoint (``model_type: deepseek_vl_hybrid``, SigLIP and SAM
    towers) patched once by :func:`saint.patch`, evaluated by lmms-eval
    (``--model saint_deepseek_vl_hybrid``)."""

    NAME = "saint_deepseek_vl_hybrid"
    ADAPTER = llm_side_vlm.DEEPSEEK_VL_HYBRID
    MODEL_TYPES = ("deepseek_vl_hybrid",)
    MODEL_CLASS = "DeepseekVLHybridForConditionalGeneration"
    TITLE = "DeepSeek-VL-Hybrid"
    MEDIA_KEYS = ("pixel_values", "high_res_pixel_values")  # both towers' pixels


class SaintJanus(SaintLlmSide):
    """A Janus checkpoint (``model_type: janus``; its image understanding) patched once by
    :func:`saint.patch`, evaluated by lmms-eval (``--model saint_janus``)."""

    NAME = "saint_janus"
    ADAPTER = pooled_vlm.JANUS
    MODEL_TYPES = ("janus",)
    MODEL_CLASS = "JanusForConditionalGeneration"
    TITLE = "Janus"
    DEFAULT_CHAT_TEMPLATE = DEEPSEEK_TEMPLATE


class SaintGemma3(SaintLlmSide):
    """A Gemma 3 checkpoint (``model_type: gemma3``, a SigLIP tower) patched once by
    :func:`saint.patch`, evaluated by lmms-eval (``--model saint_gemma3``)."""

    NAME = "saint_gemma3"
    NESTED_IMAGES = True
    ADAPTER = pooled_vlm.GEMMA3
    MODEL_TYPES = ("gemma3",)
    MODEL_CLASS = "Gemma3ForConditionalGeneration"
    TITLE = "Gemma 3"
    DEFAULT_CHAT_TEMPLATE = GEMMA_TEMPLATE
    IMAGE_TYPES = "token_type_ids"  # its image tokens attend to each other both ways

    def _load_processor(self, pretrained: str, chat_template: str | None, revision: str | None,
                        trust_remote_code: bool) -> None:
        """The checkpoint's processor; pan-and-scan is refused (its crops add images the
        requests' batches cannot line up with their prompts)."""
        super()._load_processor(pretrained, chat_template, revision, trust_remote_code)
        if getattr(self.processor.image_processor, "do_pan_and_scan", False):
            raise ValueError(f"{self.NAME} runs each image whole; this checkpoint's image processor has "
                             "do_pan_and_scan=True: save the processor with do_pan_and_scan=False")


class SaintGemma4(SaintLlmSide):
    """A Gemma 4 checkpoint (``model_type: gemma4``) patched once by :func:`saint.patch` (inside
    its language model), evaluated by lmms-eval (``--model saint_gemma4``)."""

    NAME = "saint_gemma4"
    NESTED_IMAGES = True
    ADAPTER = llm_side_vlm.GEMMA4
    MODEL_TYPES = ("gemma4",)
    MODEL_CLASS = "Gemma4ForConditionalGeneration"
    TITLE = "Gemma 4"
    DEFAULT_CHAT_TEMPLATE = GEMMA_TEMPLATE
    MEDIA_KEYS = ("pixel_values", "image_position_ids")  # each image's patches and their cells
    IMAGE_TYPES = "mm_token_type_ids"  # its image tokens attend both ways where the checkpoint says so


class SaintPaddleOCRVL(SaintLlmSide):
    """A PaddleOCR-VL checkpoint (``model_type: paddleocr_vl``) patched once by :func:`saint.patch`
    (inside its language model), evaluated by lmms-eval (``--model saint_paddleocr_vl``)."""

    NAME = "saint_paddleocr_vl"
    ADAPTER = llm_side_vlm.PADDLEOCR_VL
    MODEL_TYPES = ("paddleocr_vl",)
    MODEL_CLASS = "PaddleOCRVLForConditionalGeneration"
    TITLE = "PaddleOCR-VL"
    DEFAULT_CHAT_TEMPLATE = PADDLEOCR_TEMPLATE
    IMAGE_TYPES = "mm_token_type_ids"  # its M-RoPE positions are built from them

    def _image_placeholder(self) -> str:
        """An image between its start and end tokens, as PaddleOCR-VL's chat template writes it."""
        return f"<|IMAGE_START|>{self.image_token}<|IMAGE_END|>"

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The patches and grids of the first ``len(visuals)`` images."""
        if not visuals:
            return {}
        grid = enc["image_grid_thw"][: len(visuals)]
        return {"pixel_values": enc["pixel_values"][: int(grid.prod(dim=-1).sum())], "image_grid_thw": grid}


class SaintIdefics3(SaintLlmSide):
    """An Idefics3 or SmolVLM checkpoint (``model_type: idefics3`` / ``smolvlm``) patched once
    by :func:`saint.patch`, evaluated by lmms-eval (``--model saint_idefics3``). The
    processor splits an image into tiles plus a global view; every tile's run of image
    tokens is one unit of the ``vit`` mode."""

    NAME = "saint_idefics3"
    NESTED_IMAGES = True
    ADAPTER = pooled_vlm.IDEFICS3
    MODEL_TYPES = ("idefics3", "smolvlm")
    MODEL_CLASS = "Idefics3ForConditionalGeneration"
    TITLE = "Idefics3 / SmolVLM"
    DEFAULT_CHAT_TEMPLATE = IDEFICS3_TEMPLATE
    MEDIA_KEYS = ("pixel_values", "pixel_attention_mask")  # [prompts, tiles, 3, h, w]: the first prompt's
    MEDIA_PER_PROMPT = True

    @classmethod
    def _model_class(cls, model_type: str) -> Any:  # type: ignore[override]
        import transformers

        return transformers.SmolVLMForConditionalGeneration if model_type == "smolvlm" else \
            transformers.Idefics3ForConditionalGeneration


class SaintIdefics2(SaintLlmSide):
    """An Idefics2 checkpoint (``model_type: idefics2``) patched once by :func:`saint.patch`
    (inside its language model), evaluated by lmms-eval (``--model saint_idefics2``)."""

    NAME = "saint_idefics2"
    NESTED_IMAGES = True
    ADAPTER = llm_side_vlm.IDEFICS2
    MODEL_TYPES = ("idefics2",)
    MODEL_CLASS = "Idefics2ForConditionalGeneration"
    TITLE = "Idefics2"
    DEFAULT_CHAT_TEMPLATE = IDEFICS3_TEMPLATE
    MEDIA_KEYS = SaintIdefics3.MEDIA_KEYS  # [prompts, images, 3, h, w]: the first prompt's
    MEDIA_PER_PROMPT = True


class SaintVipLlava(SaintLlmSide):
    """A VipLLaVA checkpoint (``model_type: vipllava``) patched once by :func:`saint.patch`
    (inside its language model), evaluated by lmms-eval (``--model saint_vipllava``)."""

    NAME = "saint_vipllava"
    ADAPTER = llm_side_vlm.VIPLLAVA
    MODEL_TYPES = ("vipllava",)
    MODEL_CLASS = "VipLlavaForConditionalGeneration"
    TITLE = "VipLLaVA"


class SaintVideoLlava(SaintLlmSide):
    """A Video-LLaVA checkpoint (``model_type: video_llava``) patched once by :func:`saint.patch`
    (inside its language model), evaluated by lmms-eval on image tasks (``--model
    saint_video_llava``; its processor's images arrive as ``pixel_values_images``)."""

    NAME = "saint_video_llava"
    ADAPTER = llm_side_vlm.VIDEO_LLAVA
    MODEL_TYPES = ("video_llava",)
    MODEL_CLASS = "VideoLlavaForConditionalGeneration"
    TITLE = "Video-LLaVA"
    MEDIA_KEYS = ("pixel_values_images", "pixel_values")


class SaintPaliGemma(SaintLlmSide):
    """A PaliGemma or PaliGemma 2 checkpoint (``model_type: paligemma``, a SigLIP tower)
    patched once by :func:`saint.patch`, evaluated by lmms-eval (``--model saint_paligemma``).
    Prompts are PaliGemma's own: the task's text as the prefix (e.g. ``answer en ...``), no
    chat template."""

    NAME = "saint_paligemma"
    NESTED_IMAGES = True
    ADAPTER = pooled_vlm.PALIGEMMA
    MODEL_TYPES = ("paligemma",)
    MODEL_CLASS = "PaliGemmaForConditionalGeneration"
    TITLE = "PaliGemma"

    def _load_processor(self, pretrained: str, chat_template: str | None, revision: str | None,
                        trust_remote_code: bool) -> None:
        if chat_template is not None:
            raise ValueError(f"{self.NAME}: PaliGemma takes the task's text as its prefix, without a chat "
                             "template; drop chat_template=")
        super()._load_processor(pretrained, None, revision, trust_remote_code)

    def _prompt(self, context: str, visuals: Sequence[Any]) -> str:
        """The task's text behind its images' tokens (the processor adds ``<bos>`` and the newline)."""
        if not visuals:
            raise ValueError(f"{self.NAME}: PaliGemma needs an image in every prompt")
        return context if self.image_token in context else self.image_token * len(visuals) + context

    def _processor_inputs(self, texts: Sequence[str], visuals: Sequence[Any]) -> Any:
        """The processor's output without its training ``labels``."""
        enc = super()._processor_inputs(texts, visuals)
        enc.pop("labels", None)
        return enc

    def _loglikelihood_row(self, req: Any) -> tuple[list[int], int, dict[str, torch.Tensor]]:
        """The prompt as the prefix, the continuation's tokens as its suffix."""
        context, continuation = self._continuation(req)
        _, _, doc_to_visual, doc_id, task, split = req.args
        where = f"{task}/{doc_id}"
        images = self._visuals(doc_to_visual, self._doc(task, split, doc_id), where)
        enc = self._processor_inputs([self._prompt(context, images)], images)
        prefix = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
        suffix = self._tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not suffix:
            raise ValueError(f"{where}: the continuation {continuation!r} adds no token to the prompt")
        return prefix + suffix, len(suffix), self._media(enc, images)

    def _row_inputs(self, input_ids: torch.Tensor, scored: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """``token_type_ids``: 0 for the prefix (it attends both ways), 1 for a scored suffix."""
        types = torch.zeros_like(input_ids)
        for row, n in enumerate(scored or ()):
            types[row, input_ids.shape[1] - n:] = 1
        return {"token_type_ids": types}

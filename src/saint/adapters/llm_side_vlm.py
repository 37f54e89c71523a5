"""Hugging Face VLMs that saint prunes inside their language model only (each is one
:class:`Family` below):

- Mistral 3 (``Mistral3ForConditionalGeneration`` / ``Mistral3Model``, a Pixtral tower; a Mistral or
  Ministral 3 language model);
- FastVLM (``FastVlmForConditionalGeneration`` / ``FastVlmModel``, a convolutional FastViTHD tower);
- PerceptionLM (``PerceptionLMForConditionalGeneration`` / ``PerceptionLMModel``, images and videos);
- LightOnOCR (``LightOnOcrForConditionalGeneration`` / ``LightOnOcrModel``, Mistral 3's Pixtral tower
  and patch merger before a Qwen3 language model);
- Gemma 4 (``Gemma4ForConditionalGeneration`` / ``Gemma4Model``: images and videos, whose frames
  are images to its tower);
- PaddleOCR-VL (``PaddleOCRVLForConditionalGeneration`` / ``PaddleOCRVLModel``: a NaViT tower, an
  ERNIE 4.5 language model with M-RoPE positions, which kept tokens keep);
- Idefics2 (``Idefics2ForConditionalGeneration`` / ``Idefics2Model``: a perceiver resampler's
  latents are its image tokens, a Mistral language model);
- VipLLaVA (``VipLlavaForConditionalGeneration`` / ``VipLlavaModel``: LLaVA's layout, its
  projector reading several tower layers);
- Video-LLaVA (``VideoLlavaForConditionalGeneration`` / ``VideoLlavaModel``: images and videos,
  each through its own CLIP tower, a Llama language model);
- DeepSeek-VL-Hybrid (``DeepseekVLHybridForConditionalGeneration`` / ``DeepseekVLHybridModel``;
  a SigLIP and a SAM tower, a Llama language model; DeepSeek-VL itself and Janus are pooled
  families, :mod:`saint.adapters.pooled_vlm`).

A family needs nothing of the model but a decoder :mod:`saint.adapters.hf_llm` prunes in and
its placeholder token ids (``config.image_token_id``, PerceptionLM's ``video_token_id`` too).

Methods (``saint.patch(model, method=..., **settings)``; see :class:`LlmSidePruneConfig`):

- ``"saint"`` with ``mode="llm"`` (the default here): SAINT's graph drop of the image
  tokens after every decoder layer ``llm_layers = (start, end)``;
- ``"fastv"``: FastV (``fastv_layer`` K, ``fastv_ratio`` R).

Both run on the LLaVA machinery of :mod:`saint.adapters.hf_llm` (per-sample counts,
kept tokens at their original positions, cached and batched generation, outputs in
the input's coordinates with NaN logits at dropped positions). The vision side is not
pruned (each family's settings class says why, ``LLM_ONLY``), so ``mode="vit"`` /
``"hybrid"`` are refused with what works. Image tokens are the runs of
the family's placeholder ids (images; PerceptionLM's videos too: a video's frame tokens are
visual tokens like an image's); everything else (Pixtral's row breaks and image end) is
text and never dropped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..methods import MethodSpec
from .base import Grid
from .common import language_model, transformers_classes, transformers_loaded
from .hf_vlm import HFVlm, multimodal
from .vlm_config import LLM_FIELDS, VlmPruneConfig
from .vlm_handle import Forward, VlmPatch, installing, unpatch
from .vlm_hooks import Media, install_forward_hooks, make_mm_pre
from .vlm_prompt import begin_prefill, continue_prompt
from .vlm_schedule import decoder_pruner, split_method

__all__ = ["ADAPTERS", "DEEPSEEK_VL_HYBRID", "FASTVLM", "FIELDS", "GEMMA4", "IDEFICS2", "LIGHTON_OCR", "MISTRAL3",
           "PADDLEOCR_VL", "PERCEPTION_LM", "VIDEO_LLAVA", "VIPLLAVA", "DeepseekVLHybridPruneConfig", "FastVlmPruneConfig", "Family",
           "Gemma4PruneConfig", "Idefics2PruneConfig", "LightOnOcrPruneConfig", "LlmSidePruneConfig", "LlmSideVlm",
           "Mistral3PruneConfig", "PaddleOCRVLPruneConfig", "PerceptionLMPruneConfig", "VideoLlavaPruneConfig",
           "VipLlavaPruneConfig"]

FIELDS: dict[str, tuple[str, ...]] = {
    "saint/llm": ("mode", *LLM_FIELDS),
    "fastv": ("fastv_layer", "fastv_ratio"),
}
MEDIA = Media()  # images only: pixel_values / mm_encoder_outputs["image"], image_token_id
IMAGES_AND_VIDEOS = Media(pixels=("pixel_values", "pixel_values_videos"), features=("image", "video"),
                          token_ids=("image_token_id", "video_token_id"), tokens="image or video")


@dataclass
class LlmSidePruneConfig(VlmPruneConfig):
    """Settings of SAINT's ``llm`` mode or FastV on a VLM pruned inside its language
    model only (defaults: SAINT after decoder layers 7..16, tau 0.83, K 5, gamma 10, as
    for LLaVA-1.5-7B; see :class:`~saint.adapters.vlm_config.VlmPruneConfig`)."""

    METHODS: ClassVar[tuple[str, ...]] = ("saint", "fastv")
    FIELDS: ClassVar[dict[str, tuple[str, ...]]] = FIELDS
    LLM_ONLY: ClassVar[str] = ""  # why the tower keeps every patch

    mode: str = "llm"

    def _check_vision(self) -> None:
        raise ValueError(f"mode={self.mode!r}: saint prunes {self.FAMILY} inside the language model only "
                         f"({self.LLM_ONLY}); use mode='llm' or method='fastv'")


@dataclass
class Mistral3PruneConfig(LlmSidePruneConfig):
    FAMILY: ClassVar[str] = "Mistral 3"
    LLM_ONLY: ClassVar[str] = ("its patch merger folds every 2x2 block of patches into one token, so the tower must "
                               "keep every patch")


@dataclass
class FastVlmPruneConfig(LlmSidePruneConfig):
    FAMILY: ClassVar[str] = "FastVLM"
    LLM_ONLY: ClassVar[str] = ("its FastViTHD tower is convolutional up to its last stage, whose cells are the image "
                               "tokens")


@dataclass
class PerceptionLMPruneConfig(LlmSidePruneConfig):
    FAMILY: ClassVar[str] = "PerceptionLM"
    LLM_ONLY: ClassVar[str] = ("its projector pools each 2x2 block of the tower's patches into one token; pruning "
                               "its timm Perception Encoder tower ahead of that pooling is not built")


@dataclass
class LightOnOcrPruneConfig(LlmSidePruneConfig):
    FAMILY: ClassVar[str] = "LightOnOCR"
    LLM_ONLY: ClassVar[str] = Mistral3PruneConfig.LLM_ONLY


@dataclass
class Gemma4PruneConfig(LlmSidePruneConfig):
    FAMILY: ClassVar[str] = "Gemma 4"
    LLM_ONLY: ClassVar[str] = ("its tower pools every k x k block of an image's patches by their positions, for "
                               "images of their own sizes; pruning the tower ahead of that pooling is not built")


@dataclass
class PaddleOCRVLPruneConfig(LlmSidePruneConfig):
    FAMILY: ClassVar[str] = "PaddleOCR-VL"
    LLM_ONLY: ClassVar[str] = ("its projector folds each 2x2 block of its tower's patches into one token; pruning the "
                               "tower ahead of it is not built")


@dataclass
class Idefics2PruneConfig(LlmSidePruneConfig):
    FAMILY: ClassVar[str] = "Idefics2"
    LLM_ONLY: ClassVar[str] = ("its perceiver resampler reads every patch into a fixed set of latents, the image "
                               "tokens")


@dataclass
class VipLlavaPruneConfig(LlmSidePruneConfig):
    FAMILY: ClassVar[str] = "VipLLaVA"
    LLM_ONLY: ClassVar[str] = ("its projector reads several tower layers (vision_feature_layers), which saint's vit "
                               "mode would have to cut alike")


@dataclass
class VideoLlavaPruneConfig(LlmSidePruneConfig):
    FAMILY: ClassVar[str] = "Video-LLaVA"
    LLM_ONLY: ClassVar[str] = ("its images and videos go through two CLIP towers (a video's frames as images, each "
                               "keeping its class token); pruning them is not built")


@dataclass
class DeepseekVLHybridPruneConfig(LlmSidePruneConfig):
    FAMILY: ClassVar[str] = "DeepSeek-VL-Hybrid"
    LLM_ONLY: ClassVar[str] = ("each image token joins a SigLIP patch and a cell of its high-resolution SAM tower; "
                               "pruning both towers alike is not built")


@dataclass(frozen=True)
class Family:
    """One VLM pruned inside its language model: the adapter's name, the model classes
    (``module`` and ``classes`` inside ``transformers.models``), its settings class
    (which names the family in errors and says why the tower keeps every patch), and why
    its kept tokens map to no one patch grid (none: an image's tokens are its tower's patches,
    the grid of ``vision_config``). Its ``make_config``/``matches``/``patch``/
    ``unpatch`` are the family functions of its adapter."""

    key: str
    module: str
    classes: tuple[str, ...]
    config: type[LlmSidePruneConfig]
    no_grid: str = ""  # why its image tokens map to no one patch grid ("": they are its tower's patches)
    media: Media = MEDIA  # the visual inputs and placeholder tokens it prunes

    @property
    def name(self) -> str:
        return self.config.FAMILY

    def matches(self, model: torch.nn.Module) -> bool:
        return transformers_loaded() and type(model) in transformers_classes(self.module, *self.classes)

    def make_config(self, method: str = "saint", **kwargs: Any) -> LlmSidePruneConfig:
        """Build and validate the settings, rejecting those the chosen method does not
        use (so a typo never silently does nothing)."""
        return self.config.build(method, **kwargs)

    def patch(self, model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
              **kwargs: Any) -> VlmPatch:
        """Patch a model of this family in place (see the module docstring and
        :func:`saint.patch`). ``method`` may be a SAINT-family :class:`~saint.methods.MethodSpec`
        (e.g. a calibration probe): it then selects the image tokens of ``mode="llm"``."""
        method, llm_spec = split_method(method, self.name)
        cfg = self.make_config(method, **kwargs)
        mm = multimodal(model)
        pruner = decoder_pruner(cfg, language_model(mm), llm_spec)
        handle = VlmPatch(cfg, model, mm, int(mm.config.image_token_id), pruner, trace=trace)
        with installing(handle):
            install_forward_hooks(handle, model, mm,
                                  make_mm_pre(handle, self.media, functools.partial(prefill, self.media),
                                              continue_prompt))
        return handle

    def unpatch(self, model: torch.nn.Module) -> None:
        unpatch(model)


MISTRAL3 = Family("mistral3", "mistral3", ("Mistral3ForConditionalGeneration", "Mistral3Model"), Mistral3PruneConfig,
                  no_grid="keeps every image at its own size (row-break tokens between its rows of image tokens)")
FASTVLM = Family("fast_vlm", "fast_vlm", ("FastVlmForConditionalGeneration", "FastVlmModel"), FastVlmPruneConfig,
                 no_grid="reads a convolutional tower: its image tokens are cells of the tower's last stage, "
                         "sized by its strides, not by its config")
PERCEPTION_LM = Family("perception_lm", "perception_lm", ("PerceptionLMForConditionalGeneration", "PerceptionLMModel"),
                       PerceptionLMPruneConfig, media=IMAGES_AND_VIDEOS,
                       no_grid="splits an image into tiles and a thumbnail, and a video into frames, each pooled "
                               "to its own grid")

LIGHTON_OCR = Family("lighton_ocr", "lighton_ocr", ("LightOnOcrForConditionalGeneration", "LightOnOcrModel"),
                     LightOnOcrPruneConfig, no_grid=MISTRAL3.no_grid)
DEEPSEEK_VL_HYBRID = Family(  # its tokens: the low-resolution SigLIP's patches (the SAM cells are necked to them)
    "deepseek_vl_hybrid", "deepseek_vl_hybrid", ("DeepseekVLHybridForConditionalGeneration", "DeepseekVLHybridModel"),
    DeepseekVLHybridPruneConfig)
GEMMA4 = Family("gemma4", "gemma4", ("Gemma4ForConditionalGeneration", "Gemma4Model"), Gemma4PruneConfig,
                no_grid="keeps every image at its own size (its soft tokens pool the patches of each image's own grid)",
                media=IMAGES_AND_VIDEOS)
PADDLEOCR_VL = Family("paddleocr_vl", "paddleocr_vl", ("PaddleOCRVLForConditionalGeneration", "PaddleOCRVLModel"),
                      PaddleOCRVLPruneConfig,
                      no_grid="keeps every image at its own size (a grid of merged patches per image)")
IDEFICS2 = Family("idefics2", "idefics2", ("Idefics2ForConditionalGeneration", "Idefics2Model"), Idefics2PruneConfig,
                  no_grid="reads its image tokens from a perceiver resampler's latents, which map to no patch")
VIPLLAVA = Family("vipllava", "vipllava", ("VipLlavaForConditionalGeneration", "VipLlavaModel"), VipLlavaPruneConfig)
VIDEO_LLAVA = Family("video_llava", "video_llava", ("VideoLlavaForConditionalGeneration", "VideoLlavaModel"),
                     VideoLlavaPruneConfig, media=IMAGES_AND_VIDEOS,
                     no_grid="splits a video into frames, each with its own grid of patches and a class token")


def prefill(media: Media, handle: VlmPatch, module: torch.nn.Module, kwargs: dict[str, Any], fwd: Forward
            ) -> dict[str, Any]:
    """A prompt with images (or videos) on an empty cache: the decoder pruner starts on its
    visual tokens, the runs of ``media``'s placeholder ids."""
    ids = kwargs["input_ids"]
    fwd.input_length = ids.shape[1]
    begin_prefill(handle, fwd, torch.isin(ids, media.ids(module, ids.device)), kwargs.get("attention_mask"))
    return kwargs


class LlmSideVlm(HFVlm):
    """A VLM pruned inside its language model only: sites are the language model's
    decoder layers; inputs are processor-output dicts (``input_ids``, ``pixel_values``,
    ``attention_mask``, Mistral 3's ``image_sizes``, PerceptionLM's ``pixel_values_videos``)."""

    def __init__(self, family: Family) -> None:
        self.family = family  # type: ignore[assignment]  # matches/patch/unpatch, as a family module's
        self.name = family.key

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        """The tower's patch grid, one image token per patch; or a clear error where the
        family's image tokens map to no one patch grid (``Family.no_grid``)."""
        if self.family.no_grid:
            raise ValueError(f"{type(model).__name__} {self.family.no_grid}: there is no one patch grid to map "
                             "kept tokens to")
        vc = multimodal(model).config.vision_config
        (h, w), (ph, pw) = (v if isinstance(v, (list, tuple)) else (v, v) for v in (vc.image_size, vc.patch_size))
        return Grid(int(h) // int(ph), int(w) // int(pw), (int(ph), int(pw)))


ADAPTERS = tuple(LlmSideVlm(f) for f in (MISTRAL3, FASTVLM, PERCEPTION_LM, LIGHTON_OCR, DEEPSEEK_VL_HYBRID, GEMMA4,
                                          PADDLEOCR_VL, IDEFICS2, VIPLLAVA, VIDEO_LLAVA))

"""Model adapters: one module per model family, each exporting an ``ADAPTER`` that
implements :class:`saint.adapters.base.Adapter`. :func:`find_adapter` picks the one
for a model; tools use only that protocol, never the model's own structure."""

from __future__ import annotations

import torch

from . import (
    hf_aimv2,
    hf_blip2,
    hf_encoder_decoder,
    hf_kosmos2,
    hf_siglip2,
    hf_vision,
    hf_vit,
    hf_vjepa2,
    llava,
    llava_anyres,
    llm_side_vlm,
    open_clip_timm,
    open_clip_vit,
    pooled_vlm,
    qwen_vl,
    timm_cait,
    timm_eva,
    timm_features,
    timm_naflex,
    timm_relpos,
    timm_vit,
)
from .base import Adapter, Grid, Handle, Probe, Site

ADAPTERS: list[Adapter] = [
    timm_vit.ADAPTER, timm_eva.ADAPTER, timm_relpos.ADAPTER, timm_cait.ADAPTER, timm_naflex.ADAPTER, timm_features.ADAPTER, llava.ADAPTER, llava_anyres.NEXT_ADAPTER,
    llava_anyres.NEXT_VIDEO_ADAPTER, llava_anyres.ONEVISION_ADAPTER, qwen_vl.ADAPTER,
    *pooled_vlm.ADAPTERS, *llm_side_vlm.ADAPTERS,
    hf_vision.ADAPTER, hf_vit.ADAPTER, hf_siglip2.ADAPTER, hf_aimv2.ADAPTER, hf_vjepa2.ADAPTER,
    hf_blip2.ADAPTER, hf_kosmos2.ADAPTER, open_clip_vit.ADAPTER,
    open_clip_timm.ADAPTER, hf_encoder_decoder.ADAPTER,
]
SUPPORTED = (  # what the TypeError for an unknown model lists (tests/test_bad_inputs.py keeps it complete)
    "timm VisionTransformer (ViT, DeiT, DeiT-III, CLIP, DINOv2); timm Eva (EVA-02, DINOv3, Perception "
    "Encoder, RoPE ViTs); timm Beit (BEiT, BEiT v2); timm VisionTransformerRelPos (vit_relpos, vit_srelpos; pre-norm blocks); timm Cait (CaiT); timm NaFlexVit with ViT blocks (NaFlex batches); timm's features_only wrapper of a ViT, "
    "Eva, Beit, VisionTransformerRelPos or Cait (merging methods); open_clip's VisionTransformer, alone or in "
    "its CLIP, CustomTextCLIP or CoCa; open_clip's TimmModel towers (SigLIP, EVA ...) whose timm trunk is one of "
    "those timm models, alone or in a CLIP; Hugging Face "
    "CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel (and MetaCLIP 2's MetaClip2*), "
    "ChineseCLIPVisionModel, ChineseCLIPModel, AltCLIPVisionModel, AltCLIPModel, "
    "SiglipVisionModel, SiglipModel, "
    "Siglip2VisionModel, Siglip2Model (NaFlex), Aimv2VisionModel, Aimv2Model, ViTModel, ViTMAEModel, "
    "ViTForImageClassification, ViTMSNModel, ViTMSNForImageClassification, DeiTModel, DeiTForImageClassification, DeiTForImageClassificationWithTeacher, Dinov2Model, "
    "Dinov2WithRegistersModel, DINOv3ViTModel, IJepaModel, BeitModel, BeitForImageClassification (BEiT, DiT), "
    "Data2VecVisionModel, Data2VecVisionForImageClassification, "
    "and the classifiers that average their tokens "
    "(CLIPForImageClassification, MetaClip2ForImageClassification, SiglipForImageClassification, "
    "Siglip2ForImageClassification, Dinov2ForImageClassification, Dinov2WithRegistersForImageClassification, "
    "IJepaForImageClassification); the video transformers VideoMAEModel, VideoMAEForVideoClassification, "
    "VivitModel, VivitForVideoClassification, VJEPA2Model, VJEPA2ForVideoClassification; the BLIP, BLIP-2 and "
    "InstructBLIP vision towers (BlipVisionModel, Blip2VisionModel, InstructBlipVisionModel), alone or in "
    "BlipForConditionalGeneration, BlipForQuestionAnswering, BlipForImageTextRetrieval, BlipModel (the text model "
    "cross-attends each image's real tokens), Blip2ForConditionalGeneration, "
    "Blip2Model, Blip2VisionModelWithProjection, Blip2ForImageTextRetrieval, InstructBlipForConditionalGeneration, "
    "InstructBlipModel, InstructBlipVideoForConditionalGeneration, InstructBlipVideoModel (the Q-Former reads each "
    "image's real tokens); Kosmos2VisionModel, alone or in Kosmos2ForConditionalGeneration and Kosmos2Model "
    "(the image-to-text projection's latent queries read each image's real tokens); "
    "VisionEncoderDecoderModel with one of those ViT-style or CLIP-style encoders (ViT-GPT2 captioning, TrOCR: "
    "the decoder reads each image's real tokens); "
    "Dinov2Backbone, Dinov2WithRegistersBackbone, DINOv3ViTBackbone, alone or as the .backbone of a dense head "
    "(Depth Anything, DPT, UperNet, ZoeDepth ...; merging methods), DPTModel, DPTForDepthEstimation, "
    "DPTForSemanticSegmentation, BeitBackbone, BeitForSemanticSegmentation, Data2VecVisionForSemanticSegmentation, "
    "VitPoseBackbone alone or in VitPoseForPoseEstimation, the OWL-ViT and OWLv2 detectors "
    "(OwlViTForObjectDetection, Owlv2ForObjectDetection, and their OwlViTVisionTransformer / "
    "Owlv2VisionTransformer), CLIPSegForImageSegmentation (and its CLIPSegVisionModel) (merging methods); LLaVA "
    "(LlavaForConditionalGeneration / LlavaModel with a Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Phi-3 or "
    "Granite language model); Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 (vision side), Qwen3.5-MoE (vision "
    "side), GLM-4.1V, GLM-4.5V, GLM-4.6V and GLM-OCR (*ForConditionalGeneration / *Model), the Qwen2.5-Omni and "
    "Qwen3-Omni thinkers (*ThinkerForConditionalGeneration / *ThinkerModel); LLaVA-NeXT, "
    "LLaVA-NeXT-Video and LLaVA-OneVision (*ForConditionalGeneration / *Model; saint llm/vit/hybrid modes, FastV); InternVL, "
    "Gemma 3, Idefics3, SmolVLM, PaliGemma, Aya Vision, Command A Vision, Ovis2, DeepSeek-VL and Janus "
    "(*ForConditionalGeneration / *Model; saint llm/vit/hybrid modes, FastV, random); LFM2-VL "
    "(*ForConditionalGeneration / *Model; saint vit mode, random); Mistral 3, FastVLM, "
    "PerceptionLM, LightOnOCR, DeepSeek-VL-Hybrid, Gemma 4, PaddleOCR-VL, Idefics2, VipLLaVA and Video-LLaVA "
    "(*ForConditionalGeneration / *Model; saint llm mode, FastV)"
)

REFUSED: dict[str, str] = {**hf_vit.REFUSED, **qwen_vl.REFUSED}  # class name -> why saint does not patch it, and what to do

__all__ = ["ADAPTERS", "Adapter", "Grid", "Handle", "Probe", "Site", "find_adapter", "handle_of"]


def find_adapter(model: torch.nn.Module) -> Adapter:
    """The adapter for ``model``, or a TypeError naming what is supported."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's wrapper
        raise TypeError(
            f"saint cannot patch a torch.compile'd model ({type(model).__name__} of "
            f"{type(model._orig_mod).__name__}); patch the original first, then compile: "
            "saint.patch(model, ...); model = torch.compile(model)"
        )
    if isinstance(model, torch.nn.DataParallel):
        raise TypeError(
            "saint cannot run under DataParallel: it copies the modules on every call, and a patched "
            "block's forward belongs to its own instance; use one patched model per device, or patch "
            "the model and then wrap it in DistributedDataParallel"
        )
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            f"saint cannot patch a DistributedDataParallel wrapper (of {type(model.module).__name__}); patch "
            "the model first, then wrap it: saint.patch(model, ...); model = DistributedDataParallel(model)"
        )
    if type(model).__module__.startswith("peft.") and callable(getattr(model, "get_base_model", None)):
        raise TypeError(
            f"saint does not patch PEFT's {type(model).__name__}; patch the model inside it, after the "
            "adapters are added: saint.patch(peft_model.get_base_model(), ...) (calls through the "
            "PEFT model then run patched)"
        )
    inner = getattr(model, "model", None)
    if type(model).__name__ == "FeatureGetterNet" and isinstance(inner, torch.nn.Module):  # timm features_only
        raise TypeError(
            f"saint patches timm's features_only wrapper of a ViT, Eva, Beit, VisionTransformerRelPos or Cait, not of {type(inner).__name__}"
        )
    reason = REFUSED.get(type(model).__name__)
    if reason is not None:
        raise TypeError(f"saint does not patch {type(model).__name__}: {reason}")
    raise TypeError(f"saint cannot handle {type(model).__name__}; supported models: {SUPPORTED}")


def handle_of(model: torch.nn.Module) -> Handle:
    """The patch handle of a patched model, or a ValueError saying it is not patched."""
    from .common import get_handle

    handle = get_handle(model)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by saint")
    return handle

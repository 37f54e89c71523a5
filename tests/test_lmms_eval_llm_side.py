"""lmms-eval's ``saint_internvl``, ``saint_mistral3``, ``saint_gemma3``, ``saint_idefics3``,
``saint_paligemma``, ``saint_fast_vlm``, ``saint_aya_vision``, ``saint_cohere2_vision`` and ``saint_ovis2``
models on tiny random InternVL (Qwen2 decoder), Mistral 3 (Pixtral tower, Mistral decoder), Gemma 3 (SigLIP
tower, sliding-window decoder), Idefics3, PaliGemma (SigLIP tower, Gemma decoder; no chat template),
FastVLM (FastViT tower, Qwen2 decoder), Aya Vision and Command A Vision (SigLIP tiles, Cohere 2
decoder) and Ovis2 (tiles, Qwen2 decoder) checkpoints saved to disk
with offline processors (BPE tokenizer trained here, the families' own image processors):
nothing pruned equals the unpatched model, both request kinds pruned per prompt (InternVL
also inside its tower), batches of images of different sizes (InternVL: different tile
counts) equal each request alone,
a score is the patched model's loss, bad settings and checkpoints, and lmms-eval's own
command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .lmms_helpers import (
    assert_alone_equals_batched,
    assert_same_results,
    build_llava,
    continuation_loss,
    direct_generation,
    family_fixtures,
    gen_requests,
    ll_requests,
    make_lm,
    need,
    requests,
    run_cli,
    sized_image,
    train_tokenizer,
)

FAMILIES = {"internvl": "SaintInternVL", "mistral3": "SaintMistral3", "gemma3": "SaintGemma3",
            "idefics3": "SaintIdefics3", "paligemma": "SaintPaliGemma", "fast_vlm": "SaintFastVlm",
            "aya_vision": "SaintAyaVision", "cohere2_vision": "SaintCohere2Vision",
            "ovis2": "SaintOvis2", "lighton_ocr": "SaintLightOnOcr", "deepseek_vl": "SaintDeepseekVL",
            "deepseek_vl_hybrid": "SaintDeepseekVLHybrid", "janus": "SaintJanus", "gemma4": "SaintGemma4",
            "paddleocr_vl": "SaintPaddleOCRVL", "idefics2": "SaintIdefics2", "vipllava": "SaintVipLlava",
            "video_llava": "SaintVideoLlava"}
LLM_ARGS = "llm_layers=1-3,llm_tau=0.3,llm_k=1"
FASTV_ARGS = "method=fastv,fastv_layer=2,fastv_ratio=0.5"
VIT_ARGS = "mode=vit,vit_layer=1,vit_ratio=0.5"  # the pooled families: half of every tile's (image's) 16 tokens
NOTHING_ARGS = ("llm_layers=0-4,llm_tau=0.3,llm_k=1000", "method=fastv,fastv_layer=1,fastv_ratio=0")
PRUNING = [("internvl", LLM_ARGS), ("internvl", FASTV_ARGS), ("internvl", VIT_ARGS), ("mistral3", LLM_ARGS),
           ("mistral3", FASTV_ARGS), ("gemma3", LLM_ARGS), ("gemma3", FASTV_ARGS), ("gemma3", VIT_ARGS),
           ("idefics3", LLM_ARGS), ("idefics3", VIT_ARGS), ("paligemma", LLM_ARGS), ("paligemma", FASTV_ARGS),
           ("paligemma", VIT_ARGS), ("fast_vlm", LLM_ARGS), ("fast_vlm", FASTV_ARGS),
           ("aya_vision", LLM_ARGS), ("aya_vision", FASTV_ARGS), ("aya_vision", VIT_ARGS), ("cohere2_vision", LLM_ARGS),
           ("cohere2_vision", VIT_ARGS), ("ovis2", LLM_ARGS), ("ovis2", VIT_ARGS), ("lighton_ocr", LLM_ARGS),
           ("deepseek_vl", LLM_ARGS), ("deepseek_vl", FASTV_ARGS), ("deepseek_vl", VIT_ARGS),
           ("deepseek_vl_hybrid", LLM_ARGS), ("janus", LLM_ARGS), ("janus", VIT_ARGS), ("gemma4", LLM_ARGS),
           ("gemma4", FASTV_ARGS), ("paddleocr_vl", LLM_ARGS), ("paddleocr_vl", FASTV_ARGS), ("idefics2", LLM_ARGS),
           ("vipllava", LLM_ARGS), ("vipllava", FASTV_ARGS), ("video_llava", LLM_ARGS), ("video_llava", FASTV_ARGS)]
FIXED_SIZE = ("gemma3", "paligemma", "fast_vlm", "deepseek_vl", "deepseek_vl_hybrid", "janus", "idefics2",
              "vipllava", "video_llava")  # one token count per image
SIZES = [(64, 64), (128, 64), (48, 48), (64, 128), (100, 60)]  # PIL (width, height): InternVL, Aya Vision 1 to 3 tiles


def _llava_processor(special: list[str], eos: str, side: int, patch: int, strategy: str, extra_tokens: int):
    """A trained tokenizer and LLaVA's processor for ``side`` px images of ``patch`` px cells
    (``special`` besides ``<pad> <s> </s> <image>``; ``extra_tokens``: the tower's class token)."""
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(["<pad>", "<s>", "</s>", "<image>", *special], ["user assistant"]),
        pad_token="<pad>", bos_token="<s>", eos_token=eos, extra_special_tokens={"image_token": "<image>"})
    images = transformers.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return tokenizer, transformers.LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens, image_token="<image>")


def _build(path: Path, family: str) -> None:
    """A tiny random checkpoint of ``family`` (:func:`tests.llm_side_tiny.make`'s
    geometry) with the family's processor around a tokenizer trained on easy-VQA."""
    transformers = pytest.importorskip("transformers")
    extra: dict = {}
    if family == "internvl":
        special = ["<pad>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>",
                   "<|im_end|>"]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["user assistant"]), pad_token="<pad>", bos_token="<s>",
            eos_token="<|im_end|>", extra_special_tokens={
                "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"})
        images = transformers.GotOcr2ImageProcessor(size={"height": 64, "width": 64}, crop_to_patches=True,
                                                    min_patches=1, max_patches=2)
        processor = transformers.InternVLProcessor(
            image_processor=images, tokenizer=tokenizer, image_seq_length=16,
            video_processor=transformers.InternVLVideoProcessor(size={"height": 64, "width": 64}))
        image_token = "<IMG_CONTEXT>"
    elif family == "gemma3":
        special = ["<pad>", "<bos>", "<eos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
                   "<start_of_turn>", "<end_of_turn>"]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["user model"]), pad_token="<pad>", bos_token="<bos>",
            eos_token="<end_of_turn>", extra_special_tokens={
                "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
        images = transformers.Gemma3ImageProcessor(size={"height": 64, "width": 64})
        processor = transformers.Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=16)
        image_token = "<image_soft_token>"
    elif family == "paligemma":
        special = ["<pad>", "<bos>", "<eos>", "<image>"]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["answer en"]), pad_token="<pad>", bos_token="<bos>",
            eos_token="<eos>", extra_special_tokens={"image_token": "<image>"})
        images = transformers.SiglipImageProcessor(size={"height": 64, "width": 64})
        images.image_seq_length = 16  # 64 px, 16 px patches: one token per patch
        processor = transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)
        image_token = "<image>"
    elif family == "idefics3":
        tiles = [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]
        special = ["<pad>", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<global-img>",
                   "<end_of_utterance>", "<|im_start|>", *tiles]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["User: Assistant:"]), pad_token="<pad>", bos_token="<s>",
            eos_token="<end_of_utterance>")
        images = transformers.Idefics3ImageProcessor(size={"longest_edge": 128}, max_image_size={"longest_edge": 64})
        processor = transformers.Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=16)
        image_token = "<image>"
    elif family == "aya_vision":  # GotOcr2 tiles as InternVL's, 64 px: 8 px patches pixel-shuffled 2x2, 16 tokens
        special = ["<pad>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>",
                   "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL", "<|START_OF_TURN_TOKEN|>",
                   "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["user chatbot"]), pad_token="<pad>", bos_token="<BOS_TOKEN>",
            eos_token="<|END_OF_TURN_TOKEN|>")
        images = transformers.GotOcr2ImageProcessor(size={"height": 64, "width": 64}, crop_to_patches=True,
                                                    min_patches=1, max_patches=2)
        processor = transformers.AyaVisionProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                                    img_size=64, downsample_factor=2)
        image_token = "<|IMG_PATCH|>"
    elif family == "cohere2_vision":  # tiles as Aya Vision's; each tile 4 x 4 image tokens and a line break
        special = ["<pad>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_IMG|>", "<|END_OF_IMG|>",
                   "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                   "<|CHATBOT_TOKEN|>"]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["user chatbot"]), pad_token="<pad>", bos_token="<BOS_TOKEN>",
            eos_token="<|END_OF_TURN_TOKEN|>", extra_special_tokens={
                "boi_token": "<|START_OF_IMG|>", "eoi_token": "<|END_OF_IMG|>", "image_token": "<|IMG_PATCH|>",
                "img_line_break_token": "<|IMG_LINE_BREAK|>"})
        images = transformers.Cohere2VisionImageProcessor(size={"height": 64, "width": 64}, patch_size=4,
                                                          min_patches=1, max_patches=2)
        processor = transformers.Cohere2VisionProcessor(image_processor=images, tokenizer=tokenizer)
        image_token = "<|IMG_PATCH|>"
    elif family == "ovis2":  # tiles as InternVL's; 16 <IMG_ATOM> tokens a tile between indicator tokens
        indicators = ["<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]
        special = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>", "<IMG_ATOM>", *indicators]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["user assistant"]), pad_token="<pad>", eos_token="<|im_end|>")
        images = transformers.Ovis2ImageProcessor(size={"height": 64, "width": 64}, crop_to_patches=True,
                                                  min_patches=1, max_patches=2)
        processor = transformers.Ovis2Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=16)
        image_token = "<IMG_ATOM>"
        extra = {"indicator_ids": tokenizer.convert_tokens_to_ids(indicators)}
    elif family == "fast_vlm":  # LLaVA's processor: 128 px, one token per 32 px cell of the tower's last stage
        tokenizer, processor = _llava_processor(["<|im_start|>", "<|im_end|>"], "<|im_end|>", 128, 32, "full", 0)
        image_token = "<image>"
    elif family in ("deepseek_vl", "deepseek_vl_hybrid"):  # 64 px images of 16 px patches: 16 tokens
        special = ["<pad>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<image_placeholder>", "<|User|>",
                   "<|Assistant|>"]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["user assistant"]), pad_token="<pad>",
            bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
            extra_special_tokens={"image_token": "<image_placeholder>"})
        if family == "deepseek_vl":
            images = transformers.DeepseekVLImageProcessor(size={"height": 64, "width": 64})
            processor = transformers.DeepseekVLProcessor(image_processor=images, tokenizer=tokenizer,
                                                         num_image_tokens=16)
        else:  # and the same images at 128 px for its SAM tower
            images = transformers.DeepseekVLHybridImageProcessor(size={"height": 64, "width": 64},
                                                                 high_res_size={"height": 128, "width": 128})
            processor = transformers.DeepseekVLHybridProcessor(image_processor=images, tokenizer=tokenizer,
                                                               num_image_tokens=16)
        image_token = "<image_placeholder>"
    elif family == "gemma4":  # 8 px patches pooled 2x2, at most 70 soft tokens an image (its own size)
        special = ["<pad>", "<bos>", "<eos>", "<|image|>", "<|image>", "<image|>", "<|video|>", "<|audio|>",
                   "<|audio>", "<audio|>", "<start_of_turn>", "<end_of_turn>"]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["user model"]), pad_token="<pad>", bos_token="<bos>",
            eos_token="<end_of_turn>", extra_special_tokens={
                "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"})
        processor = transformers.Gemma4Processor(
            feature_extractor=transformers.Gemma4AudioFeatureExtractor(),
            image_processor=transformers.Gemma4ImageProcessor(max_soft_tokens=70, patch_size=8, pooling_kernel_size=2),
            tokenizer=tokenizer, video_processor=transformers.Gemma4VideoProcessor(), image_seq_length=70)
        image_token = "<|image|>"
        extra = {"video_token_id": tokenizer.convert_tokens_to_ids("<|video|>")}
    elif family == "paddleocr_vl":  # 8 px patches merged 2 x 2, each image at its own size (up to 64 x 64 px)
        special = ["<unk>", "<s>", "</s>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>"]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["user assistant"]), pad_token="<unk>", bos_token="<s>",
            eos_token="</s>", extra_special_tokens={"image_token": "<|IMAGE_PLACEHOLDER|>"})
        images = transformers.PaddleOCRVLImageProcessor(size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
                                                        patch_size=8, merge_size=2, temporal_patch_size=1)
        processor = transformers.PaddleOCRVLProcessor(image_processor=images, tokenizer=tokenizer)
        image_token = "<|IMAGE_PLACEHOLDER|>"
    elif family == "idefics2":  # 64 px images (no splitting), 16 resampler latents each between boundary tokens
        special = ["<pad>", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<end_of_utterance>"]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["user assistant"]), pad_token="<pad>", bos_token="<s>",
            eos_token="<end_of_utterance>")
        images = transformers.Idefics2ImageProcessor(size={"shortest_edge": 64, "longest_edge": 64},
                                                     do_image_splitting=False)
        processor = transformers.Idefics2Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=16)
        image_token = "<image>"
    elif family == "vipllava":  # LLaVA's processor: 64 px, one token per 16 px patch, no class token
        tokenizer, processor = _llava_processor([], "</s>", 64, 16, "default", 1)
        image_token = "<image>"
    elif family == "video_llava":  # as LLaVA's: 64 px images, one token per 16 px patch, no class token
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(["<pad>", "<s>", "</s>", "<image>", "<video>"], ["user assistant"]),
            pad_token="<pad>", bos_token="<s>", eos_token="</s>",
            extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
        images = transformers.VideoLlavaImageProcessor(size={"shortest_edge": 64},
                                                       crop_size={"height": 64, "width": 64})
        videos = transformers.VideoLlavaVideoProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
        processor = transformers.VideoLlavaProcessor(image_processor=images, video_processor=videos,
                                                     tokenizer=tokenizer, patch_size=16,
                                                     vision_feature_select_strategy="default",
                                                     num_additional_image_tokens=1)
        image_token = "<image>"
        extra = dict(video_token_id=tokenizer.convert_tokens_to_ids("<video>"))
    elif family == "janus":  # 64 px images of 16 px patches: 16 tokens between <begin_of_image> and <end_of_image>
        special = ["<pad>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<image_placeholder>",
                   "<begin_of_image>", "<end_of_image>", "<|User|>", "<|Assistant|>"]
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["user assistant"]), pad_token="<pad>",
            bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>", extra_special_tokens={
                "image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"})
        images = transformers.JanusImageProcessor(size={"height": 64, "width": 64})
        processor = transformers.JanusProcessor(image_processor=images, tokenizer=tokenizer, num_image_tokens=16)
        image_token = "<image_placeholder>"
    else:  # Mistral 3, LightOnOCR (its image one run of [IMG] tokens, no row breaks)
        special = ["<pad>", "<s>", "</s>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "<|im_start|>",
                   "<|im_end|>"]
        markers = dict(image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
        lighton = family == "lighton_ocr"
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(special, ["user assistant"]), pad_token="<pad>", bos_token="<s>",
            eos_token="<|im_end|>" if lighton else "</s>", extra_special_tokens=markers if lighton else None)
        images = transformers.PixtralImageProcessor(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8})
        if lighton:
            processor = transformers.LightOnOcrProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                                         spatial_merge_size=2)
        else:
            processor = transformers.PixtralProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                                      spatial_merge_size=2, **markers)
        image_token = "[IMG]"
    processor.save_pretrained(path)
    from .llm_side_tiny import make

    model = make(family, vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(image_token),
                 **extra)
    model.save_pretrained(path)


checkpoint, family, docs = family_fixtures(_build, FAMILIES, SIZES)  # module-scoped fixtures


def visuals(doc: dict) -> list:
    return [sized_image(doc)]


def gen_reqs(docs: list[dict]) -> list:
    return gen_requests(docs, {"max_new_tokens": 4, "temperature": 0}, visuals)


def lm_for(checkpoint, family: str, args: str, docs: list[dict]):
    return make_lm(FAMILIES[family], checkpoint(family), args, docs)


def test_entry_points_resolve():
    need("lmms_eval")
    import lmms_eval.models

    from saint.integrations.lmms_llm_side import (
        SaintAyaVision,
        SaintCohere2Vision,
        SaintFastVlm,
        SaintGemma3,
        SaintIdefics3,
        SaintInternVL,
        SaintMistral3,
        SaintOvis2,
        SaintPaliGemma,
    )

    assert lmms_eval.models.get_model("saint_aya_vision") is SaintAyaVision
    assert lmms_eval.models.get_model("saint_cohere2_vision") is SaintCohere2Vision
    assert lmms_eval.models.get_model("saint_ovis2") is SaintOvis2
    assert lmms_eval.models.get_model("saint_fast_vlm") is SaintFastVlm
    assert lmms_eval.models.get_model("saint_paligemma") is SaintPaliGemma
    assert lmms_eval.models.get_model("saint_internvl") is SaintInternVL
    assert lmms_eval.models.get_model("saint_mistral3") is SaintMistral3
    assert lmms_eval.models.get_model("saint_gemma3") is SaintGemma3
    assert lmms_eval.models.get_model("saint_idefics3") is SaintIdefics3
    assert lmms_eval.models.get_model("saint_video_llava").__name__ == "SaintVideoLlava"


def test_bad_settings_and_checkpoints_refused(checkpoint, tmp_path):
    need("lmms_eval")
    from saint.integrations.lmms_llm_side import (
        SaintDeepseekVL,
        SaintDeepseekVLHybrid,
        SaintFastVlm,
        SaintGemma3,
        SaintGemma4,
        SaintIdefics2,
        SaintIdefics3,
        SaintInternVL,
        SaintJanus,
        SaintLightOnOcr,
        SaintMistral3,
        SaintPaddleOCRVL,
        SaintPaliGemma,
        SaintVideoLlava,
        SaintVipLlava,
    )

    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(ValueError, match="DeepSeek-VL-Hybrid inside the language model only"):
        SaintDeepseekVLHybrid(pretrained=missing, mode="vit")
    with pytest.raises(ValueError, match="unknown Janus method 'pool'"):
        SaintJanus(pretrained=missing, method="pool", pool_size=2)
    with pytest.raises(ValueError, match="Janus checkpoints"):
        SaintJanus(pretrained=str(checkpoint("deepseek_vl")))
    with pytest.raises(ValueError, match=r"DeepSeek-VL checkpoints \(model_type 'deepseek_vl'\)"):
        SaintDeepseekVL(pretrained=str(checkpoint("deepseek_vl_hybrid")))
    with pytest.raises(ValueError, match="Gemma 4 inside the language model only"):
        SaintGemma4(pretrained=missing, mode="vit")
    with pytest.raises(ValueError, match="Gemma 4 checkpoints"):
        SaintGemma4(pretrained=str(checkpoint("gemma3")))
    with pytest.raises(ValueError, match="Idefics2 inside the language model only"):
        SaintIdefics2(pretrained=missing, mode="vit")
    with pytest.raises(ValueError, match="VipLLaVA checkpoints"):
        SaintVipLlava(pretrained=str(checkpoint("idefics2")))
    with pytest.raises(ValueError, match="Video-LLaVA checkpoints"):
        SaintVideoLlava(pretrained=str(checkpoint("vipllava")))
    with pytest.raises(ValueError, match="Video-LLaVA inside the language model only"):
        SaintVideoLlava(pretrained=missing, mode="vit")
    with pytest.raises(ValueError, match="PaddleOCR-VL inside the language model only"):
        SaintPaddleOCRVL(pretrained=missing, mode="hybrid")
    with pytest.raises(ValueError, match="LightOnOCR checkpoints"):
        SaintLightOnOcr(pretrained=str(checkpoint("mistral3")))
    with pytest.raises(ValueError, match="inside the language model only"):
        SaintMistral3(pretrained=missing, mode="vit")
    with pytest.raises(ValueError, match="FastVLM inside the language model only"):
        SaintFastVlm(pretrained=missing, mode="hybrid")
    with pytest.raises(ValueError, match="FastVLM checkpoints"):
        SaintFastVlm(pretrained=str(checkpoint("mistral3")))
    with pytest.raises(ValueError, match=r"vit_ratio=0 must be a fraction in \(0, 1\]"):
        SaintGemma3(pretrained=missing, mode="hybrid", vit_ratio=0)
    with pytest.raises(TypeError, match="does not use"):
        SaintIdefics3(pretrained=missing, method="random", keep_ratio=0.5, vit_layer=2)
    with pytest.raises(ValueError, match=r"vit_ratio=2 must be a fraction in \(0, 1\]"):
        SaintInternVL(pretrained=missing, mode="vit", vit_ratio=2)
    for cls in (SaintInternVL, SaintMistral3):
        with pytest.raises(TypeError, match="does not use"):
            cls(pretrained=missing, method="fastv", llm_tau=0.5)
    with pytest.raises(ValueError, match="Mistral 3 checkpoints"):
        SaintMistral3(pretrained=str(checkpoint("internvl")))
    pan = tmp_path / "pan-and-scan"
    shutil.copytree(checkpoint("gemma3"), pan)
    config = json.loads((pan / "processor_config.json").read_text())
    config["image_processor"]["do_pan_and_scan"] = True
    (pan / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do_pan_and_scan=True"):
        SaintGemma3(pretrained=str(pan))
    with pytest.raises(ValueError, match="without a chat template"):
        SaintPaliGemma(pretrained=str(checkpoint("paligemma")), chat_template="{{ messages }}")
    with pytest.raises(ValueError, match="is neither a file nor a Jinja template"):  # was used as the prompt
        SaintGemma3(pretrained=str(checkpoint("gemma3")), chat_template=str(tmp_path / "missing.jinja"))
    build_llava(tmp_path)
    with pytest.raises(ValueError, match="InternVL checkpoints"):
        SaintInternVL(pretrained=str(tmp_path))


def test_nothing_pruned_equals_the_unpatched_model(checkpoint, family, docs):
    """``method=none`` generates what the unpatched model generates from the processor's
    prompt (its image token in front, the chat template); settings that prune nothing
    give the same texts and scores."""
    base = lm_for(checkpoint, family, "method=none", docs)
    gen, ll = gen_reqs(docs), ll_requests(docs, visuals)
    texts, scores = base.generate_until(gen), base.loglikelihood(ll)
    assert texts[0] == direct_generation(base, docs[0]["question"], visuals(docs[0]))
    assert_same_results({args: lm_for(checkpoint, family, args, docs) for args in NOTHING_ARGS}, gen, ll, texts, scores)


@pytest.mark.parametrize("family, args", PRUNING, ids=[f"{f}-{a.split(',')[0]}" for f, a in PRUNING])
def test_batches_are_pruned_and_equal_single_requests(checkpoint, family, docs, args):
    """Images of different sizes in one batch: every prompt's image tokens reach the
    language model (InternVL's vit mode: half of each tile's) and fewer leave it (vit mode:
    as many); each request alone gets the same text and score, and a score is the patched
    model's loss."""
    lm = lm_for(checkpoint, family, args, docs)
    gen, ll = gen_reqs(docs), ll_requests(docs, visuals)
    batched = (lm.generate_until(gen), lm.loglikelihood(ll))
    assert {e["request"] for e in lm.pruning_log} == {"generate_until", "loglikelihood"}
    counts = {n for e in lm.pruning_log for n in e["image_tokens"]}
    # images of different token counts (FIXED_SIZE families resize them all)
    assert len(counts) > 1 or family in FIXED_SIZE
    for e in lm.pruning_log:
        if args == VIT_ARGS:
            assert e["llm_input"] == [n // 2 for n in e["image_tokens"]] == e["llm_output"]
        else:
            assert e["llm_input"] == e["image_tokens"]
            assert all(o < i for o, i in zip(e["llm_output"], e["llm_input"], strict=True))
    assert_alone_equals_batched(lm, gen, ll, batched)
    req = ll[2]
    (result,) = lm.loglikelihood([req])
    ids, n, media = lm._loglikelihood_row(req)
    assert result[0] == pytest.approx(continuation_loss(lm, ids, n, media), abs=1e-5)


@pytest.mark.parametrize("family", ["gemma3", "idefics3", "gemma4", "idefics2"])
def test_a_text_only_request_batches_beside_image_requests(checkpoint, family, docs):
    """The families whose processor takes images per prompt: a generation batch holding a
    text-only request and image requests runs, each as alone (the batch was refused as if
    the images were miscounted)."""
    lm = lm_for(checkpoint, family, LLM_ARGS, docs)
    gen = gen_reqs(docs)
    text_only = requests("generate_until", [("Say hello.", {"max_new_tokens": 4, "temperature": 0},
                                               lambda doc: [], 0, "t", "test")])
    mixed = [*text_only, *gen]
    batched = lm.generate_until(mixed)
    assert_alone_equals_batched(lm, mixed, [], (batched, []))


def test_lmms_eval_cli_end_to_end(checkpoint, tmp_path):
    """``python -m lmms_eval --model saint_internvl ...`` completes and prunes both kinds
    of request (run once, on InternVL: Mistral 3 shares the class's code)."""
    results, (stats,) = run_cli("saint_internvl", checkpoint("internvl"), LLM_ARGS, tmp_path, 3, timeout=300)
    assert {"saint_easyvqa_gen", "saint_easyvqa_mc"} <= set(results)
    lines = stats.read_text().splitlines()
    assert any('"llm_output"' in line for line in lines)


def test_paligemma_scores_a_continuation_as_its_processor_suffix(checkpoint, docs):
    """``saint_paligemma``'s score is the model's mean NLL of the continuation laid out as
    PaliGemma's own processor lays out a suffix (after the prefix's newline, causal:
    ``token_type_ids`` 1), its end-of-sequence token not scored."""
    import torch

    lm = lm_for(checkpoint, "paligemma", "method=none", docs)
    for req in ll_requests(docs, visuals)[:4]:
        (result,) = lm.loglikelihood([req])
        question, continuation, _, j = req.args[:4]
        enc = lm.processor(text=[question], images=visuals(docs[j]), suffix=[continuation], return_tensors="pt")
        enc.pop("labels")
        suffix = int(enc["token_type_ids"].sum()) - 1  # the suffix's tokens, without its end of sequence
        assert suffix >= 1
        with torch.no_grad():
            logits = lm.model(**enc).logits[0]
        ids = enc["input_ids"][0]
        end = len(ids) - 1  # the end-of-sequence token
        logp = logits[end - suffix - 1:end - 1].log_softmax(-1).gather(1, ids[end - suffix:end, None])
        assert result[0] == pytest.approx(float(-logp.mean()), abs=1e-5)

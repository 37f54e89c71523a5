"""Random Qwen2.5-VL, Qwen2-VL, Qwen2.5-Omni, Qwen3-VL, Qwen3.5, GLM-4.1V, LLaVA-1.5 / NeXT (Granite Vision too) / OneVision, Idefics3, InternVL (both formats), Gemma 3,
PaliGemma and Mistral 3 checkpoints written to a folder that vLLM and
transformers both load, without a hub download: a byte-level BPE tokenizer trained on the
spot (with the model's special tokens), the PIL image processor and random weights.

Used by the vLLM plugin's tests (tiny geometry) and its benchmark (tiny, or the 7B
geometry on a GPU). vLLM's CPU attention needs a head size >= 32, and the vision tower's
``out_hidden_size`` must equal the text hidden size.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vision_depth=2, vision_hidden_size=64, vision_heads=2,
    vision_intermediate_size=128, fullatt_block_indexes=[1], vocab_size=512,
)
# Qwen2.5-VL-7B's geometry (random weights), for the GPU benchmark.
QWEN2_5_VL_7B: dict[str, Any] = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vision_depth=32, vision_hidden_size=1280, vision_heads=16,
    vision_intermediate_size=3420, fullatt_block_indexes=[7, 15, 23, 31], vocab_size=152064,
)


def _tokenizer(vocab_size: int, special: list[str] = SPECIAL_TOKENS, extra: dict[str, str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Describe the picture in one sentence.", "What is in the image? A cat on a mat."]
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 512), special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=special[2], pad_token=special[0],
        additional_special_tokens=special[1:], chat_template=CHAT_TEMPLATE,
        **({} if extra is None else {"extra_special_tokens": extra}),
    )


def write_checkpoint(
    path: str | Path,
    geometry: dict[str, Any] | None = None,
    min_pixels: int = 56 * 56,
    max_pixels: int = 448 * 448,
    seed: int = 0,
    dtype: str = "float32",
    family: str = "qwen2_5_vl",
) -> Path:
    """Write a random Qwen2.5-VL (``geometry``: :data:`TINY` by default) to ``path``;
    ``family="qwen2_vl"``: a Qwen2-VL of the same sizes (no windows; its tower's MLP
    ratio is the geometry's MLP over its width)."""
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    g = {**TINY, **(geometry or {})}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(g["vocab_size"])
    tokenizer.save_pretrained(path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = g["hidden_size"] // g["num_attention_heads"]
    section = [head_dim // 8, (head_dim // 2 - head_dim // 8) // 2]
    section.append(head_dim // 2 - sum(section))  # 3-D M-RoPE halves: t, h, w
    rope = {"rope_type": "default", "mrope_section": section, "rope_theta": 1000000.0}
    text = dict(
        hidden_size=g["hidden_size"], intermediate_size=g["intermediate_size"],
        num_hidden_layers=g["num_hidden_layers"], num_attention_heads=g["num_attention_heads"],
        num_key_value_heads=g["num_key_value_heads"], vocab_size=g["vocab_size"],
        max_position_embeddings=4096, rope_parameters=rope, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=g["vision_depth"], num_heads=g["vision_heads"], patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if family == "qwen2_vl":
        vision.update(embed_dim=g["vision_hidden_size"], hidden_size=g["hidden_size"],
                      mlp_ratio=g["vision_intermediate_size"] // g["vision_hidden_size"])
    else:
        vision.update(hidden_size=g["vision_hidden_size"], intermediate_size=g["vision_intermediate_size"],
                      out_hidden_size=g["hidden_size"], fullatt_block_indexes=g["fullatt_block_indexes"],
                      window_size=112, tokens_per_second=2)
    names = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
             "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")}
    config_name, model_name, processor_name = names[family]
    config = getattr(transformers, config_name)(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(getattr(torch, dtype)).eval()
    _sharpen(model)
    model.save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    image_processor.save_pretrained(path)
    # save_pretrained of the processor needs a video processor (torchvision); write it by hand.
    (path / "processor_config.json").write_text(
        json.dumps({"processor_class": processor_name}, indent=2)
    )
    gen = {"eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


OMNI_TOKENS = {  # the placeholder and bracket tokens of each Omni family (the hub's names)
    "qwen2_5_omni": {"image": "<|IMAGE|>", "video": "<|VIDEO|>", "audio": "<|AUDIO|>", "vision_bos": "<|vision_bos|>",
                     "vision_eos": "<|vision_eos|>", "audio_bos": "<|audio_bos|>", "audio_eos": "<|audio_eos|>"},
    "qwen3_omni_moe": {"image": "<|image_pad|>", "video": "<|video_pad|>", "audio": "<|audio_pad|>",
                       "vision_bos": "<|vision_start|>", "vision_eos": "<|vision_end|>",
                       "audio_bos": "<|audio_start|>", "audio_eos": "<|audio_end|>"},
}


def write_qwen_omni_checkpoint(path: str | Path, family: str = "qwen2_5_omni", min_pixels: int = 56 * 56,
                               max_pixels: int = 448 * 448, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-Omni (``family="qwen3_omni_moe"``: Qwen3-Omni) to ``path`` in
    the hub's whole-model layout (the Omni config, the thinker's weights under ``thinker.``; no
    talker: vLLM serves the thinker alone) with the Omni processor (Qwen2-VL's image
    processor, Whisper's feature extractor) and a one-layer audio tower (128 mel bins, 25 tokens
    per second of audio). Qwen2.5-Omni: :data:`TINY`'s LM and tower (q/k/v projected
    separately), patch 14. Qwen3-Omni: Qwen3-VL's tower (patch 16, blocks 0 and 1 feeding two
    deepstack levels) and a 2-layer MoE LM (4 experts, 2 per token), as in
    :func:`write_qwen3_vl_checkpoint`."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    g = TINY
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = OMNI_TOKENS[family]
    special = SPECIAL_TOKENS[:3] + list(names.values())
    tokenizer = _tokenizer(g["vocab_size"], special, extra={f"{n}_token": t for n, t in names.items()})
    tokenizer.save_pretrained(path)
    ids = {n: tokenizer.convert_tokens_to_ids(t) for n, t in names.items()}
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = dict(
        hidden_size=g["hidden_size"], intermediate_size=g["intermediate_size"],
        num_hidden_layers=g["num_hidden_layers"], num_attention_heads=g["num_attention_heads"],
        num_key_value_heads=g["num_key_value_heads"], vocab_size=g["vocab_size"], max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1000000.0},
        rms_norm_eps=1e-6, eos_token_id=eos, pad_token_id=pad,
        tie_word_embeddings=False,  # vLLM's thinker reads it here, transformers from the thinker's config
    )
    vision = dict(
        depth=g["vision_depth"], hidden_size=g["vision_hidden_size"], intermediate_size=g["vision_intermediate_size"],
        num_heads=g["vision_heads"], out_hidden_size=g["hidden_size"], fullatt_block_indexes=g["fullatt_block_indexes"],
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    )
    audio = dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=64,
                 output_dim=g["hidden_size"], n_window=50, max_source_positions=1500)
    token_ids = dict(vision_start_token_id=ids["vision_bos"], audio_start_token_id=ids["audio_bos"],
                     position_id_per_seconds=25, tie_word_embeddings=False)
    patch = 14
    if family == "qwen2_5_omni":
        name = "Qwen2_5Omni"
        token_ids.update(image_token_index=ids["image"], video_token_index=ids["video"],
                         audio_token_index=ids["audio"], vision_end_token_id=ids["vision_eos"],
                         audio_end_token_id=ids["audio_eos"], seconds_per_chunk=2)
    else:
        name, patch = "Qwen3OmniMoe", 16
        del vision["fullatt_block_indexes"], vision["window_size"]
        vision.update(depth=3, patch_size=patch, num_position_embeddings=256, deepstack_visual_indexes=[0, 1],
                      image_size=256, apply_vit_abs_pos_embed=True)  # as the hub config gives them (vLLM reads both)
        text.update(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, norm_topk_prob=True,
                    rope_parameters={"rope_type": "default", "mrope_section": [6, 5, 5], "rope_theta": 1000000.0,
                                     "mrope_interleaved": True})
        audio.update(downsample_hidden_size=32)
        token_ids.update(image_token_id=ids["image"], video_token_id=ids["video"], audio_token_id=ids["audio"])
    thinker = getattr(transformers, f"{name}ThinkerConfig")(
        vision_config=vision, text_config=text, audio_config=audio, **token_ids)
    config = getattr(transformers, f"{name}Config")(thinker_config=thinker.to_dict(), enable_audio_output=False)
    config.architectures = [f"{name}ForConditionalGeneration"]
    config.save_pretrained(path)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ThinkerForConditionalGeneration")(thinker).eval()
    _sharpen(model)
    save_file({f"thinker.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    images = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels,
                                      max_pixels=max_pixels)
    images.save_pretrained(path)
    # save_pretrained of the processor needs a video processor (torchvision); write it by hand.
    processor = {"processor_class": f"{name}Processor", "image_processor": images.to_dict(),
                 "feature_extractor": transformers.WhisperFeatureExtractor(feature_size=128).to_dict()}
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2, default=str))
    gen = {"eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


def write_qwen3_vl_checkpoint(
    path: str | Path, min_pixels: int = 64 * 64, max_pixels: int = 512 * 512, seed: int = 0, moe: bool = False,
    family: str = "qwen3_vl",
) -> Path:
    """Write a tiny random Qwen3-VL to ``path``: patch 16, merge 2 (an image of H x W pixels
    gives (H / 32) x (W / 32) merged tokens after the processor's rounding), a 3-block tower
    whose blocks 0 and 1 feed two deepstack levels into the first two decoder layers, and a
    2-layer Qwen3 LM (head size 32, interleaved M-RoPE). ``moe``: Qwen3-VL-MoE, each decoder
    layer's MLP 4 experts of which 2 run per token. ``family="qwen3_5"``: a Qwen3.5 of the
    same tower without deepstack, its LM a Gated DeltaNet layer (head size 128, which vLLM's
    CPU kernel needs) then a gated full-attention layer (all of each head rotary, where the hub
    turns a quarter: the positions then move the tiny model's outputs well beyond bfloat16's
    rounding); with ``moe`` a shared expert too."""
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(512)
    tokenizer.save_pretrained(path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    rope = {
        "rope_type": "default", "rope_theta": 1000000.0,
        "mrope_section": [6, 5, 5], "mrope_interleaved": True,  # head size 32: 16 frequencies
    }
    text = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=4096,
        rope_parameters=rope, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=3, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=128,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
        num_position_embeddings=256, deepstack_visual_indexes=[0, 1],
    )
    name = "Qwen3VL"
    if family == "qwen3_5":
        name = "Qwen3_5Moe" if moe else "Qwen3_5"
        del vision["deepstack_visual_indexes"]
        rope["partial_rotary_factor"] = 1.0
        text.update(layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                    linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1,
                    linear_num_value_heads=2, partial_rotary_factor=1.0)
        if moe:
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96,
                        shared_expert_intermediate_size=96)
    elif moe:  # norm_topk_prob as on the hub (vLLM reads it). Expert matrices not square (2 x 96 and 96 vs
        # 128): transformers transposes the hub's layout on load only where the shape says so.
        name = "Qwen3VLMoe"
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, norm_topk_prob=True)
    config = getattr(transformers, f"{name}Config")(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(config).eval()
    _sharpen(model)
    model.save_pretrained(path)
    if moe and family == "qwen3_vl":  # the hub's layout, which vLLM reads (and transformers converts on load): experts [E, in, out]
        from safetensors.torch import load_file, save_file

        weights = load_file(path / "model.safetensors")
        fused = (".experts.gate_up_proj", ".experts.down_proj")
        save_file({k: v.transpose(1, 2).contiguous() if k.endswith(fused) else v for k, v in weights.items()},
                  path / "model.safetensors", metadata={"format": "pt"})
    Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels,
        max_pixels=max_pixels, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(path)
    # save_pretrained of the processor needs a video processor (torchvision); write it by hand.
    (path / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen3VLProcessor"}, indent=2)
    )
    gen = {"eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


GLM4V_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|assistant|>", "<|user|>", "<|begin_of_image|>", "<|image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|video|>", "<|end_of_video|>",
]


def write_glm4v_checkpoint(
    path: str | Path, min_pixels: int = 56 * 56, max_pixels: int = 448 * 448, seed: int = 0, moe: bool = False,
    ocr: bool = False,
) -> Path:
    """Write a tiny random GLM-4.1V to ``path``: patch 14, merge 2 (the portrait test image of
    224 x 168 pixels gives 8 x 6 merged tokens, as for Qwen2.5-VL), a 2-block tower and a
    2-layer GLM-4 LM (head size 32, half of it rotary: M-RoPE sections 2, 3, 3). Its eos is
    ``<|user|>`` (the next turn), as on the hub. ``moe``: GLM-4.5V's layout, layer 0 dense and
    layer 1 4 routed experts (2 per token) plus a shared one. ``ocr``: a GLM-OCR (q/k norms in
    the tower, no learned position table) with GLM-4.6V's processors, as its checkpoints name
    them; its LM's MLP is as wide as the merger's input, as vLLM's GLM-OCR reads it."""
    import torch
    import transformers
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(512, GLM4V_SPECIAL_TOKENS)
    tokenizer.save_pretrained(path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GLM4V_SPECIAL_TOKENS}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "partial_rotary_factor": 0.5}
    text = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, rope_parameters=rope,
        rms_norm_eps=1e-5, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|user|>"],
    )
    vision = dict(
        depth=2, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=128, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, image_size=112,
    )
    name, processor = "Glm4v", "Glm4vProcessor"
    if ocr:
        name, processor = "GlmOcr", "Glm46VProcessor"
        text.update(intermediate_size=3 * vision["out_hidden_size"])
    if moe:
        name = "Glm4vMoe"
        text.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
                    first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
                    head_dim=32, use_qk_norm=False)  # as the hub config.json gives them (vLLM reads both)
    config = getattr(transformers, f"{name}Config")(
        text_config=text, vision_config=vision, image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(config).eval()
    _sharpen(model)
    model.save_pretrained(path)
    (Glm46VImageProcessorPil if ocr else Glm4vImageProcessorPil)(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=14, merge_size=2,
        temporal_patch_size=2,
    ).save_pretrained(path)
    # save_pretrained of the processor needs a video processor (torchvision); write it by hand.
    (path / "processor_config.json").write_text(json.dumps({"processor_class": processor}, indent=2))
    gen = {"eos_token_id": ids["<|user|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


PADDLEOCR_VL_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>",
                               "<|video_pad|>"]
# transformers' module names -> the hub's (PaddleOCR's original layout, the one vLLM loads)
_PADDLEOCR_HUB_NAMES = (("model.visual.", "visual."), ("model.projector.", "mlp_AR."), ("model.language_model.", "model."))


def write_paddleocr_vl_checkpoint(path: str | Path, min_pixels: int = 56 * 56, max_pixels: int = 448 * 448,
                                  seed: int = 0) -> Path:
    """Write a tiny random PaddleOCR-VL to ``path``: patch 14, merge 2 (the portrait test image
    of 224 x 168 pixels gives 8 x 6 merged tokens, as for Qwen2.5-VL), a 2-layer tower and a
    2-layer ERNIE 4.5 LM with M-RoPE (sections 4, 6, 6 of a 32-wide head), its weights under the hub's names
    (``visual.``, ``mlp_AR.``, ``model.``), which vLLM loads and transformers converts."""
    import safetensors.torch
    import torch
    import transformers
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import (
        PaddleOCRVLImageProcessorPil,
    )
    from transformers.models.paddleocr_vl.processing_paddleocr_vl import PaddleOCRVLProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(512, PADDLEOCR_VL_SPECIAL_TOKENS, {"image_token": "<|IMAGE_PLACEHOLDER|>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in PADDLEOCR_VL_SPECIAL_TOKENS}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    text = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rope_parameters=rope,
                pad_token_id=ids["<unk>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                  spatial_merge_size=2)
    config = transformers.PaddleOCRVLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|IMAGE_PLACEHOLDER|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|IMAGE_START|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.PaddleOCRVLForConditionalGeneration(config).eval()
    _sharpen(model)
    config.architectures = ["PaddleOCRVLForConditionalGeneration"]
    config.save_pretrained(path)
    weights = {}
    for name, tensor in model.state_dict().items():
        for ours, hub in _PADDLEOCR_HUB_NAMES:
            if name.startswith(ours):
                name = hub + name[len(ours):]
                break
        weights[name] = tensor.clone().contiguous()  # tied embeddings saved as two tensors
    safetensors.torch.save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    images = PaddleOCRVLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2,
                                          temporal_patch_size=1)
    PaddleOCRVLProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    gen = {"eos_token_id": ids["</s>"], "pad_token_id": ids["<unk>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


def _sharpen(model) -> None:
    """Random init of 0.02 std gives near-uniform logits (greedy ids decided by rounding):
    redraw every matrix with std 2 / sqrt(fan-in)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)


LLAVA_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]


def _save_with_hub_tower_names(model, path: Path) -> None:
    """Save ``model``; transformers 5 writes a CLIP / SigLIP tower as ``vision_tower.*``, vLLM
    (and the hub's llava-hf and Gemma 3 checkpoints) name it ``vision_tower.vision_model.*``."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()}
    save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})


# LLaVA-NeXT / OneVision crop grids of the tiny 112 px tower: up to 2 x 2 crops.
TINY_GRID_PINPOINTS = [[112, 224], [224, 112], [224, 224]]


def write_llava_checkpoint(path: str | Path, image_size: int = 112, seed: int = 0, family: str = "llava",
                           granite: bool = False) -> Path:
    """Write a tiny random LLaVA-1.5 (CLIP tower, patch 14, Llama LM) to ``path``: an
    ``image_size`` image gives ``(image_size // 14) ** 2`` image tokens. ``family``
    ``"llava_next"`` / ``"llava_onevision"``: the same tower and LM with anyres tiling
    (``TINY_GRID_PINPOINTS``: a base view plus up to 2 x 2 crops, rows ended by a newline).
    ``granite``: as Granite Vision 3.x, a Granite LM (its multipliers not 1) reading the
    tower's last two layers side by side."""
    import torch
    import transformers

    classes = {"llava": ("Llava", "CLIPImageProcessorPil", "clip"),
               "llava_next": ("LlavaNext", "LlavaNextImageProcessorPil", "llava_next"),
               "llava_onevision": ("LlavaOnevision", "LlavaOnevisionImageProcessorPil", "llava_onevision")}
    name, image_processor, module = classes[family]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(512, LLAVA_SPECIAL_TOKENS)
    tokenizer.save_pretrained(path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS}
    text = dict(
        model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
    )
    if granite:
        # logits_scaling stays 1: vLLM's Granite divides the logits by it, transformers' LLaVA-NeXT head does not
        text.update(model_type="granite", attention_multiplier=0.3, embedding_multiplier=4.0, residual_multiplier=0.5)
    vision = dict(
        model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=64,
    )
    tiling = {} if family == "llava" else {"image_grid_pinpoints": TINY_GRID_PINPOINTS}
    config = getattr(transformers, f"{name}Config")(
        text_config=text, vision_config=vision, image_token_index=ids["<image>"],
        vision_feature_layer=[-2, -1] if granite else -2, vision_feature_select_strategy="default",
        pad_token_id=ids["<pad>"], tie_word_embeddings=False, **tiling,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(config).eval()
    _sharpen(model)
    if family != "llava":  # transformers draws the newline from the hidden size's scale: make it stand out
        with torch.no_grad():
            model.model.image_newline.normal_(0.0, 1.0)
    _save_with_hub_tower_names(model, path)
    images = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
    getattr(images, image_processor)(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, **tiling,
    ).save_pretrained(path)
    processor = {
        "processor_class": f"{name}Processor", "patch_size": 14, "image_token": "<image>",
        "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
    }
    if family == "llava_onevision":
        processor["num_image_tokens"] = (image_size // 14) ** 2
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2))
    gen = {"eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


IDEFICS3_SPECIAL_TOKENS = ["<pad>", "<s>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                           "<global-img>", *[f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]]


def write_idefics3_checkpoint(path: str | Path, tile: int = 64, seed: int = 0) -> Path:
    """Write a tiny random Idefics3 (SigLIP-like tower, 8 px patches, pixel shuffle 2, Llama
    LM) to ``path``: images are split into ``tile`` px tiles plus a global view (up to
    ``2 x tile`` on the longest side), each ``(tile // 16) ** 2`` image tokens."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(512, IDEFICS3_SPECIAL_TOKENS)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in IDEFICS3_SPECIAL_TOKENS[:4]}
    text = dict(
        model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
        bos_token_id=ids["<s>"], eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<pad>"],
    )
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=tile, patch_size=8)
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=2, image_token_id=ids["<image>"],
                            pad_token_id=ids["<pad>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    _sharpen(model)
    model.save_pretrained(path)
    images = Idefics3ImageProcessor(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile})
    Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=(tile // 16) ** 2).save_pretrained(path)
    gen = {"eos_token_id": ids["<end_of_utterance>"], "pad_token_id": ids["<pad>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


# ``<|video_pad|>``: vLLM's InternVL chat format (on a Qwen2 LM) takes videos only with it.
INTERNVL_SPECIAL_TOKENS = [
    "<pad>", "<s>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>", "<|video_pad|>",
]


def write_internvl_checkpoint(path: str | Path, tile: int = 64, seed: int = 0) -> Path:
    """Write a tiny random InternVL in the transformers format (InternViT-like tower, 8 px
    patches, pixel shuffle 0.5, Qwen2 LM) to ``path``: images are cropped into up to 4
    ``tile`` px tiles plus a thumbnail, each ``(tile // 16) ** 2`` context tokens."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from .compat import install_torchvision_shim

    install_torchvision_shim()  # without torchvision: a placeholder video processor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(512, INTERNVL_SPECIAL_TOKENS, extra={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in INTERNVL_SPECIAL_TOKENS}
    text = dict(
        model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
        bos_token_id=ids["<s>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<pad>"],
    )
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[tile, tile], patch_size=[8, 8])
    config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids["<IMG_CONTEXT>"],
                            pad_token_id=ids["<pad>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    _sharpen(model)
    model.save_pretrained(path)
    # InternVL normalizes with ImageNet's statistics (its -hf processors say so; GOT-OCR2's defaults are CLIP's).
    images = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                      max_patches=4, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
    InternVLProcessor(image_processor=images, tokenizer=tokenizer, image_seq_length=(tile // 16) ** 2,
                      video_processor=InternVLVideoProcessor()).save_pretrained(path)
    gen = {"eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<pad>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


# The remote-code config of the InternVL chat format, as far as vLLM's InternVLChatModel reads it.
INTERNVL_CHAT_CONFIG_CODE = '''"""A tiny InternVL chat (remote-code format) config, written by saint's tests."""
from transformers import PretrainedConfig, Qwen2Config


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"

    def __init__(self, vision_config=None, llm_config=None, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = InternVisionConfig(**(vision_config or {}))
        self.llm_config = Qwen2Config(**(llm_config or {}))

    def to_dict(self):
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        return out
'''
# The transformers format's InternVL weights -> the remote-code format's (InternViT, ``mlp1``).
_INTERNVL_CHAT_NAMES = [
    ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
    ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("vision_tower.encoder.layer.", "vision_model.encoder.layers."),
    (".attention.projection_layer.", ".attn.proj."),
    (".lambda_1", ".ls1"), (".lambda_2", ".ls2"),
    (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."),
    ("multi_modal_projector.layer_norm.", "mlp1.0."),
    ("multi_modal_projector.linear_1.", "mlp1.1."),
    ("multi_modal_projector.linear_2.", "mlp1.3."),
]


def write_internvl_chat_checkpoint(path: str | Path, hf_dir: str | Path) -> Path:
    """Write the InternVL of ``hf_dir`` (by :func:`write_internvl_checkpoint`) in the
    remote-code format (``InternVLChatModel``; load with ``trust_remote_code``) to ``path``:
    the same weights (q/k/v fused into InternViT's ``qkv``), tokenizer and tiling (up to 4
    tiles plus a thumbnail), so transformers' ``InternVLForConditionalGeneration`` on
    ``hf_dir`` is its reference."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    path, hf_dir = Path(path), Path(hf_dir)
    path.mkdir(parents=True, exist_ok=True)
    hf = json.loads((hf_dir / "config.json").read_text())
    hf_weights, weights = load_file(hf_dir / "model.safetensors"), {}
    for name, tensor in hf_weights.items():
        if ".attention.k_proj." in name or ".attention.v_proj." in name:
            continue
        if ".attention.q_proj." in name:
            qkv = [hf_weights[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            tensor, name = torch.cat(qkv), name.replace(".attention.q_proj.", ".attn.qkv.")
        for old, new in _INTERNVL_CHAT_NAMES:
            name = name.replace(old, new)
        weights[name] = tensor.clone().contiguous()  # tied embeddings saved as two tensors
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    vision, text = hf["vision_config"], hf["text_config"]
    if vision["use_qk_norm"] or vision["attention_bias"]:
        raise ValueError("the chat format writer takes InternVL towers without q/k norms and q/k/v bias")
    tile = vision["image_size"][0]
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "vision_config": {
            "hidden_size": vision["hidden_size"], "intermediate_size": vision["intermediate_size"],
            "num_hidden_layers": vision["num_hidden_layers"], "num_attention_heads": vision["num_attention_heads"],
            "image_size": tile, "patch_size": vision["patch_size"][0], "num_channels": 3, "qkv_bias": False,
            "qk_normalization": False, "norm_type": vision["norm_type"], "layer_norm_eps": vision["layer_norm_eps"],
            "hidden_act": vision["hidden_act"], "initializer_factor": 0.1, "drop_path_rate": 0.0,
            "dropout": 0.0, "attention_dropout": 0.0, "use_flash_attn": False,
        },
        "llm_config": {**text, "architectures": ["Qwen2ForCausalLM"]},
        "select_layer": hf["vision_feature_layer"], "downsample_ratio": hf["downsample_ratio"], "ps_version": "v2",
        "force_image_size": tile, "dynamic_image_size": True, "use_thumbnail": True,
        "min_dynamic_patch": 1, "max_dynamic_patch": 4, "template": "internvl2_5",
        "tie_word_embeddings": hf.get("tie_word_embeddings", False), "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "configuration_internvl_chat.py").write_text(INTERNVL_CHAT_CONFIG_CODE)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (hf_dir / name).exists():
            shutil.copy(hf_dir / name, path / name)
    return path


GEMMA3_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
                         "<start_of_turn>", "<end_of_turn>"]


def write_gemma3_checkpoint(path: str | Path, image_size: int = 64, seed: int = 0) -> Path:
    """Write a tiny random Gemma 3 (SigLIP-like tower, 8 px patches, 2x2 average pool: 16
    image tokens per image; a Gemma 3 LM with a 16-token sliding window on its first layer)
    to ``path``. The tokenizer has Gemma's newline runs as tokens, which vLLM's processor
    looks up."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(512, GEMMA3_SPECIAL_TOKENS, extra={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    tokenizer.add_tokens(["\n", "\n\n", "\n\n\n", "\n\n\n\n"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA3_SPECIAL_TOKENS}
    text = dict(
        model_type="gemma3_text", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=len(tokenizer),
        max_position_embeddings=2048, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        bos_token_id=ids["<bos>"], eos_token_id=ids["<end_of_turn>"], pad_token_id=ids["<pad>"],
    )
    vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                          image_token_index=ids["<image_soft_token>"], boi_token_index=ids["<start_of_image>"],
                          eoi_token_index=ids["<end_of_image>"], pad_token_id=ids["<pad>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    _sharpen(model)
    _save_with_hub_tower_names(model, path)
    images = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=16).save_pretrained(path)
    gen = {"eos_token_id": ids["<end_of_turn>"], "pad_token_id": ids["<pad>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


GEMMA4_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<|image|>", "<|image>", "<image|>", "<|video|>", "<|audio|>",
                         "<|audio>", "<audio|>", "<start_of_turn>", "<end_of_turn>"]


def write_gemma4_checkpoint(path: str | Path, max_soft_tokens: int = 70, seed: int = 0) -> Path:
    """Write a tiny random Gemma 4 to ``path``: a 2-layer vision tower of 16 px patches pooled
    3 x 3 into soft tokens (an image resized to at most ``max_soft_tokens`` of them: the
    portrait test image gives 63), a 2-layer LM (a sliding-window layer and a global one) with
    per-layer input embeddings, as Gemma 4 E2B / E4B have; no audio tower. Written as the hub's
    configs are (the vision config's ``default_output_length``, which vLLM reads); the
    processor config is written by hand (its video processor needs torchvision)."""
    import torch
    import transformers
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    markers = dict(image_token="<|image|>", boi_token="<|image>", eoi_token="<image|>", audio_token="<|audio|>",
                   boa_token="<|audio>", eoa_token="<audio|>")
    tokenizer = _tokenizer(512, GEMMA4_SPECIAL_TOKENS, markers)
    tokenizer.save_pretrained(path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA4_SPECIAL_TOKENS}
    text = dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, global_head_dim=32, hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=512, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=2048, pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"],
        bos_token_id=ids["<bos>"],
    )
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, patch_size=16, pooling_kernel_size=3,
                  position_embedding_size=256, default_output_length=max_soft_tokens)
    config = transformers.Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, image_token_id=ids["<|image|>"],
        boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"], video_token_id=ids["<|video|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    _sharpen(model)
    model.save_pretrained(path)
    Gemma4ImageProcessorPil(max_soft_tokens=max_soft_tokens, patch_size=16, pooling_kernel_size=3).save_pretrained(path)
    processor = {"processor_class": "Gemma4Processor", "image_seq_length": max_soft_tokens}
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2))
    gen = {"eos_token_id": ids["<eos>"], "pad_token_id": ids["<pad>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


PALIGEMMA_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<image>"]


def write_paligemma_checkpoint(path: str | Path, image_size: int = 64, seed: int = 0, gemma2: bool = False) -> Path:
    """Write a tiny random PaliGemma (SigLIP-like tower, 8 px patches, every patch one image
    token: 64 per image; a Gemma LM, or with ``gemma2`` PaliGemma 2's Gemma 2 with softcapped
    logits and a 16-token sliding window) to ``path``. As PaliGemma 2's tokenizer, it adds no
    ``<bos>`` itself (vLLM then puts the image tokens and ``<bos>`` in front of the prompt)."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(512, PALIGEMMA_SPECIAL_TOKENS, extra={"image_token": "<image>"})
    tokenizer.add_tokens(["\n"])
    tokenizer.bos_token = "<bos>"
    tokenizer.add_bos_token = False
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in PALIGEMMA_SPECIAL_TOKENS}
    text = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, vocab_size=len(tokenizer), max_position_embeddings=2048,
        bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"],
    )
    if gemma2:
        text.update(model_type="gemma2", query_pre_attn_scalar=32, sliding_window=16)
    else:
        text.update(model_type="gemma")
    vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=8, projection_dim=128)
    config = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                             projection_dim=128, pad_token_id=ids["<pad>"],
                             tie_word_embeddings=True)  # as Gemma's, which vLLM's Gemma / Gemma 2 always tie
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    _sharpen(model)
    _save_with_hub_tower_names(model, path)
    images = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    images.image_seq_length = (image_size // 8) ** 2  # PaliGemma's processor reads it here, as the hub's configs give it
    PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    gen = {"eos_token_id": ids["<eos>"], "pad_token_id": ids["<pad>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


MISTRAL3_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def write_mistral3_checkpoint(path: str | Path, longest_edge: int = 128, seed: int = 0,
                              family: str = "mistral3") -> Path:
    """Write a tiny random Mistral 3 (Pixtral tower, 16 px patches merged 2 x 2, Mistral LM)
    to ``path``: an image is resized to at most ``longest_edge`` px and gives one row of
    ``[IMG]`` tokens per 32 px of height, one per 32 px of width, each row ended by
    ``[IMG_BREAK]`` (the last by ``[IMG_END]``). ``family="llava"``: the same tower and LM as
    a Pixtral-based LLaVA (Pixtral-12B's layout): no merge, one token per 16 px patch.
    ``family="lighton_ocr"``: Mistral 3's tower and merge before a Qwen3 LM, saved as the
    hub's LightOnOCR-1B is (``model_type`` ``mistral3``, architecture
    ``LightOnOCRForConditionalGeneration``, transformers' LightOnOCR weight names), the
    format vLLM serves: an image is one run of ``[IMG]`` tokens, no row breaks or end."""
    import torch
    import transformers
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from .compat import install_torchvision_shim

    install_torchvision_shim()  # without torchvision: the processor module imports through the PIL twin
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    if family not in ("mistral3", "llava", "lighton_ocr"):
        raise ValueError(f"family={family!r}: 'mistral3', 'llava' or 'lighton_ocr'")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    markers = dict(image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
    tokenizer = _tokenizer(512, MISTRAL3_SPECIAL_TOKENS)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in MISTRAL3_SPECIAL_TOKENS}
    text = dict(
        model_type="mistral", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=2048, sliding_window=None,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
    )
    if family == "lighton_ocr":  # Qwen3: q/k norms, no sliding window
        text.update(model_type="qwen3")
        del text["sliding_window"]
    vision = dict(model_type="pixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=32, image_size=longest_edge, patch_size=16)
    merge = 1 if family == "llava" else 2
    common = dict(text_config=text, vision_config=vision, image_token_index=ids["[IMG]"], vision_feature_layer=-1,
                  pad_token_id=ids["<pad>"], tie_word_embeddings=False)
    if family == "lighton_ocr":
        config = transformers.LightOnOcrConfig(text_config=text, vision_config=vision, image_token_id=ids["[IMG]"],
                                               spatial_merge_size=merge, tie_word_embeddings=False)
        model_class = transformers.LightOnOcrForConditionalGeneration
    elif family == "mistral3":
        config = transformers.Mistral3Config(**common, spatial_merge_size=merge)
        model_class = transformers.Mistral3ForConditionalGeneration
    else:
        config = transformers.LlavaConfig(**common, vision_feature_select_strategy="full")
        model_class = transformers.LlavaForConditionalGeneration
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _sharpen(model)
    model.save_pretrained(path)
    images = PixtralImageProcessorPil(size={"longest_edge": longest_edge}, patch_size={"height": 16, "width": 16})
    PixtralProcessor(image_processor=images, tokenizer=tokenizer, patch_size=16, spatial_merge_size=merge,
                     **markers).save_pretrained(path)
    if family == "lighton_ocr":  # the hub's config: Mistral 3's model type, LightOnOCR's architecture
        saved = json.loads((path / "config.json").read_text())
        saved.update(model_type="mistral3", architectures=["LightOnOCRForConditionalGeneration"])
        (path / "config.json").write_text(json.dumps(saved, indent=2))
    gen = {"eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path

"""Tiny random InternVL, Mistral 3, Gemma 3, Idefics3 / SmolVLM, PaliGemma, FastVLM, PerceptionLM, Aya Vision /
Command A Vision, Ovis2, LightOnOCR, DeepSeek-VL (and its hybrid) and Janus models and processor-shaped prompts
for the tests."""

from __future__ import annotations

import torch
import transformers

from .conftest import left_pad

IMG, START, END, BREAK, VID = 120, 121, 122, 123, 124  # image, InternVL <img> </img> (Gemma 3's start / end of
# image), Pixtral row break (and image end), PerceptionLM's video token
DEPTH = 6  # decoder layers
VDEPTH = 4  # InternVL and Gemma 3 vision layers
SIZE, PATCH = 64, 8  # InternVL tiles: 8x8 patches, pixel-shuffled to 4x4 tokens; Mistral 3 merges 2x2 too
WINDOW = 10  # Gemma 3's sliding window, shorter than every prompt; its layers 2 and 5 attend globally
HIGH_RES = 128  # DeepSeek-VL-Hybrid's SAM input
PIXTRAL = ("mistral3", "ministral3", "lighton_ocr")  # images at their own sizes (Mistral 3: rows ended by break tokens)


def make(family: str = "internvl", impl: str = "sdpa", seed: int = 0, vocab_size: int = 128,
         image_token_id: int = IMG, indicator_ids: list[int] | None = None,
         video_token_id: int = VID) -> torch.nn.Module:
    """A tiny random model of ``family``; ``vocab_size``, ``image_token_id``, Ovis2's
    ``indicator_ids`` (its 5 visual indicator tokens) and Gemma 4's ``video_token_id`` to match
    a tokenizer."""
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=DEPTH, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0, max_position_embeddings=256)
    torch.manual_seed(seed)
    if family == "internvl":
        vision = transformers.InternVLVisionConfig(hidden_size=32, num_hidden_layers=VDEPTH, num_attention_heads=2,
                                                   intermediate_size=64, image_size=[SIZE, SIZE],
                                                   patch_size=[PATCH, PATCH], use_qk_norm=True)  # as InternViT-6B
        cfg = transformers.InternVLConfig(vision_config=vision, text_config=transformers.Qwen2Config(**text),
                                          image_token_id=image_token_id, attn_implementation=impl)
        model = transformers.InternVLForConditionalGeneration(cfg)
    elif family == "gemma3":  # 64 px images, 8x8 patches pooled to 4x4 image tokens
        vision = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=VDEPTH, num_attention_heads=2,
                                                 intermediate_size=64, image_size=SIZE, patch_size=PATCH,
                                                 vision_use_head=False)  # as Gemma 3's
        gemma = transformers.Gemma3TextConfig(**text, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                              layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)
        cfg = transformers.Gemma3Config(vision_config=vision, text_config=gemma, mm_tokens_per_image=16,
                                        image_token_index=image_token_id, boi_token_index=START, eoi_token_index=END,
                                        attn_implementation=impl)
        model = transformers.Gemma3ForConditionalGeneration(cfg)
        with torch.no_grad():  # transformers leaves the projection at zeros: every image would embed alike
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    elif family in ("paligemma", "paligemma2"):  # 64 px images, 16 px patches: 4x4 image tokens, one per patch
        vision = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=VDEPTH, num_attention_heads=2,
                                                 intermediate_size=64, image_size=SIZE, patch_size=16,
                                                 vision_use_head=False)
        if family == "paligemma":
            decoder = transformers.GemmaConfig(**text, head_dim=16)
        else:  # PaliGemma 2: Gemma 2, softcapped logits, every other layer a sliding window; eager attention only
            decoder = transformers.Gemma2Config(**text, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW)
            impl = "eager"
        cfg = transformers.PaliGemmaConfig(vision_config=vision, text_config=decoder, image_token_index=image_token_id,
                                           projection_dim=64, attn_implementation=impl)
        model = transformers.PaliGemmaForConditionalGeneration(cfg)
    elif family in ("idefics3", "smolvlm"):  # 64 px tiles, 8x8 patches pixel-shuffled to 4x4 tokens
        name = "Idefics3" if family == "idefics3" else "SmolVLM"
        vision = getattr(transformers, f"{name}VisionConfig")(hidden_size=32, num_hidden_layers=VDEPTH,
                                                              num_attention_heads=2, intermediate_size=64,
                                                              image_size=SIZE, patch_size=PATCH)
        cfg = getattr(transformers, f"{name}Config")(vision_config=vision, text_config=transformers.LlamaConfig(**text),
                                                     scale_factor=2, image_token_id=image_token_id,
                                                     attn_implementation=impl)
        model = getattr(transformers, f"{name}ForConditionalGeneration")(cfg)
    elif family == "idefics2":  # 64 px images, a perceiver resampler of 16 latents: 16 image tokens; Mistral LM
        vision = dict(hidden_size=32, num_hidden_layers=VDEPTH, num_attention_heads=2, intermediate_size=64,
                      image_size=SIZE, patch_size=PATCH)
        perceiver = dict(hidden_size=64, resampler_n_latents=16, resampler_depth=1, resampler_n_heads=2,
                         resampler_head_dim=16, num_key_value_heads=2)
        cfg = transformers.Idefics2Config(vision_config=vision, perceiver_config=perceiver,
                                          text_config=transformers.MistralConfig(**text, sliding_window=None).to_dict(),
                                          image_token_id=image_token_id)
        cfg._attn_implementation = impl
        for sub in (cfg.text_config, cfg.vision_config, cfg.perceiver_config):
            sub._attn_implementation = impl
        model = transformers.Idefics2ForConditionalGeneration(cfg)
    elif family == "vipllava":  # LLaVA's layout: a CLIP tower of 16 px patches (16 tokens), two layers read
        vision = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=VDEPTH, num_attention_heads=2,
                                               intermediate_size=64, image_size=SIZE, patch_size=16)
        cfg = transformers.VipLlavaConfig(vision_config=vision.to_dict(), text_config=transformers.LlamaConfig(**text),
                                          image_token_index=image_token_id, vision_feature_layers=[-2, -3],
                                          attn_implementation=impl)
        model = transformers.VipLlavaForConditionalGeneration(cfg)
    elif family == "video_llava":  # LLaVA's layout for images and videos: CLIP towers of 16 px patches
        vision = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=VDEPTH, num_attention_heads=2,
                                               intermediate_size=64, image_size=SIZE, patch_size=16)
        cfg = transformers.VideoLlavaConfig(vision_config=vision.to_dict(), text_config=transformers.LlamaConfig(**text),
                                            image_token_index=image_token_id, video_token_index=video_token_id,
                                            attn_implementation=impl)
        model = transformers.VideoLlavaForConditionalGeneration(cfg)
    elif family == "fast_vlm":  # FastViT-T8 (stride 32) on 128 px images: 4x4 image tokens; a Qwen2 LM
        vision = transformers.TimmWrapperConfig(architecture="fastvit_t8", hidden_size=768, do_pooling=False)
        cfg = transformers.FastVlmConfig(vision_config=vision, text_config=transformers.Qwen2Config(**text),
                                         image_token_id=image_token_id, attn_implementation=impl)
        model = transformers.FastVlmForConditionalGeneration(cfg)
    elif family == "perception_lm":  # a 2-block Perception Encoder, 64 px tiles of 8x8 patches pooled 2x2: 16 tokens
        vision = transformers.TimmWrapperConfig(  # no pooling head, as the hub's configs
            architecture="vit_pe_core_tiny_patch16_384", hidden_size=32, do_pooling=False,
            model_args=dict(img_size=SIZE, patch_size=PATCH, depth=2, embed_dim=32, num_heads=2, global_pool=""))
        cfg = transformers.PerceptionLMConfig(vision_config=vision, text_config=transformers.LlamaConfig(**text),
                                              image_token_id=image_token_id, video_token_id=VID,
                                              projector_pooling_ratio=2, vision_use_cls_token=True,
                                              attn_implementation=impl)
        model = transformers.PerceptionLMForConditionalGeneration(cfg)
    elif family in ("aya_vision", "cohere2_vision"):  # SigLIP, 64 px tiles of 8x8 patches pixel-shuffled to 4x4
        vision = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=VDEPTH, num_attention_heads=2,
                                                 intermediate_size=64, image_size=SIZE, patch_size=PATCH,
                                                 vision_use_head=False)
        cohere = transformers.Cohere2Config(  # layers 1, 3, 5 global without position embedding
            **text, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * (DEPTH // 2))
        name = "AyaVision" if family == "aya_vision" else "Cohere2Vision"
        cfg = getattr(transformers, f"{name}Config")(vision_config=vision, text_config=cohere, downsample_factor=2,
                                                     image_token_id=image_token_id, attn_implementation=impl)
        model = getattr(transformers, f"{name}ForConditionalGeneration")(cfg)
    elif family == "ovis2":  # 64 px tiles, 8x8 patches folded 2x2 into 16 tokens; indicators: <img>, </img>, break
        vision = transformers.Ovis2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=VDEPTH,
                                                num_attention_heads=2, image_size=SIZE, patch_size=PATCH, vocab_size=64,
                                                hidden_stride=2)
        cfg = transformers.Ovis2Config(vision_config=vision, text_config=transformers.Qwen2Config(**text),
                                       image_token_id=image_token_id,
                                       visual_indicator_token_ids=indicator_ids or [START, END, BREAK, 125, 126],
                                       vocab_size=vocab_size, hidden_size=text["hidden_size"], attn_implementation=impl)
        model = transformers.Ovis2ForConditionalGeneration(cfg)
    elif family in ("deepseek_vl", "deepseek_vl_hybrid"):  # SigLIP, 64 px images of 16 px patches: 16 tokens
        siglip = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=VDEPTH, num_attention_heads=2,
                                                 intermediate_size=64, image_size=SIZE, patch_size=16).to_dict()
        llama = transformers.LlamaConfig(**text).to_dict()
        if family == "deepseek_vl":
            cfg = transformers.DeepseekVLConfig(vision_config=siglip, text_config=llama, image_token_id=image_token_id,
                                                attn_implementation=impl)
            model = transformers.DeepseekVLForConditionalGeneration(cfg)
        else:  # and a SAM tower on 128 px (8 px patches, necked down to the same 4x4 cells)
            sam = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                       image_size=HIGH_RES, patch_size=PATCH, global_attn_indexes=[1], window_size=4, mlp_dim=64)
            cfg = transformers.DeepseekVLHybridConfig(vision_config=siglip, high_res_vision_config=sam,
                                                      text_config=llama, image_token_id=image_token_id,
                                                      attn_implementation=impl)
            model = transformers.DeepseekVLHybridForConditionalGeneration(cfg)
    elif family == "janus":  # its SigLIP-like tower, 64 px images of 16 px patches: 16 tokens; a tiny VQ-VAE
        vision = dict(hidden_size=32, num_hidden_layers=VDEPTH, num_attention_heads=2, image_size=SIZE,
                      patch_size=16, mlp_ratio=2.0, projection_dim=64, depth=2)
        vq = dict(embed_dim=8, num_embeddings=32, base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1,
                  projection_dim=64, image_token_embed_dim=64, latent_channels=8, num_patches=4)
        cfg = transformers.JanusConfig(vision_config=vision, vq_config=vq,
                                       text_config=transformers.LlamaConfig(**text).to_dict(),
                                       image_token_id=image_token_id, attn_implementation=impl)
        model = transformers.JanusForConditionalGeneration(cfg)
    elif family.startswith("gemma4"):  # 64 px images of 8 px patches, pooled 2x2 into 16 soft tokens; per-layer inputs
        vision = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=VDEPTH,
                                                 num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                                 patch_size=PATCH, pooling_kernel_size=2, position_embedding_size=64)
        gemma = transformers.Gemma4TextConfig(
            **text, head_dim=16, global_head_dim=16, hidden_size_per_layer_input=8, sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            num_kv_shared_layers=2 if family == "gemma4_shared" else 0,  # shared: layers 4, 5 reuse 3's and 2's
            use_bidirectional_attention="vision" if family == "gemma4_bidi" else None)  # image tokens both ways
        cfg = transformers.Gemma4Config(vision_config=vision, text_config=gemma, audio_config=None,
                                        image_token_id=image_token_id, boi_token_id=START, eoi_token_id=END,
                                        video_token_id=video_token_id, attn_implementation=impl)
        model = transformers.Gemma4ForConditionalGeneration(cfg)
    elif family == "paddleocr_vl":  # 64 px images of 8 px patches (8 x 8), merged 2 x 2 into 16 tokens; M-RoPE
        cfg = transformers.PaddleOCRVLConfig(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=VDEPTH, num_attention_heads=2,
                               patch_size=PATCH, spatial_merge_size=2, image_size=SIZE),
            text_config=dict(**text, head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                        mrope_section=[2, 3, 3])),
            image_token_id=image_token_id, video_token_id=VID, vision_start_token_id=START)
        cfg._attn_implementation = impl
        cfg.text_config._attn_implementation = cfg.vision_config._attn_implementation = impl
        model = transformers.PaddleOCRVLForConditionalGeneration(cfg)
    else:  # Mistral 3, LightOnOCR: Pixtral, 2x2 patches merged into one token; LightOnOCR a Qwen3 LM
        vision = transformers.PixtralVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                  intermediate_size=64, image_size=64, patch_size=PATCH, head_dim=16)
        if family == "lighton_ocr":
            cfg = transformers.LightOnOcrConfig(vision_config=vision, spatial_merge_size=2,
                                                image_token_id=image_token_id,
                                                text_config=transformers.Qwen3Config(**text, head_dim=16),
                                                attn_implementation=impl)
            model = transformers.LightOnOcrForConditionalGeneration(cfg)
        else:
            if family == "ministral3":  # Ministral 3: queries scaled by absolute position (past every test prompt
                # here; a left-padded forward without position ids scales other positions than the prompt alone)
                rope = dict(rope_type="default", rope_theta=10000.0, llama_4_scaling_beta=0.5,
                            original_max_position_embeddings=256)
                decoder = transformers.Ministral3Config(**text, rope_parameters=rope)
            else:
                decoder = transformers.MistralConfig(**text, sliding_window=None)
            cfg = transformers.Mistral3Config(vision_config=vision, spatial_merge_size=2, image_token_id=image_token_id,
                                              text_config=decoder, attn_implementation=impl)
            model = transformers.Mistral3ForConditionalGeneration(cfg)
    model = model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # always new tokens: rows alone and batched stay aligned
    return model


def image_tokens(family: str, size: tuple[int, int]) -> list[int]:
    """The tokens the processor puts in place of one image of ``size`` (h, w) pixels."""
    if family not in PIXTRAL:  # one tile per image here: <img>, 16 context tokens, </img> (or their likes)
        return [START, *[IMG] * 16, END]
    rows, cols = (s // PATCH // 2 for s in size)
    if family == "lighton_ocr":  # one run, no row breaks or end (its processor's layout)
        return [IMG] * (rows * cols)
    out: list[int] = []
    for _ in range(rows):
        out += [IMG] * cols + [BREAK]
    return out[:-1] + [END]


def row(family: str, parts: list, seed: int) -> torch.Tensor:
    """A prompt: ints are text lengths, tuples ``(h, w)`` images."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for p in parts:
        out += torch.randint(3, 100, (p,), generator=g).tolist() if isinstance(p, int) else image_tokens(family, p)
    return torch.tensor(out)


def inputs(family: str, rows: list[list], seeds: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A left-padded batch of prompts with their images (a redundant, half-flat image for even seeds)."""
    seeds = seeds or list(range(len(rows)))
    ids, mask = left_pad([row(family, r, s) for r, s in zip(rows, seeds, strict=True)])
    sizes = [(p, 10 * s + j) for r, s in zip(rows, seeds, strict=True) for j, p in enumerate(r) if not isinstance(p, int)]
    side = 2 * SIZE if family == "fast_vlm" else SIZE
    h = max(p[0] for p, _ in sizes) if family in PIXTRAL else side
    w = max(p[1] for p, _ in sizes) if family in PIXTRAL else side
    pixels = torch.zeros(len(sizes), 3, h, w)
    for i, ((ph, pw), s) in enumerate(sizes):
        g = torch.Generator().manual_seed(100 + s)
        pixels[i, :, :ph, :pw] = torch.randn(3, ph, pw, generator=g)
        if s % 2 == 0:
            pixels[i, :, : ph // 2] = 0.5
    if family in ("idefics3", "smolvlm", "idefics2"):  # [prompts, images, 3, h, w], all-zero images padding the rows
        per_row = [sum(1 for p in r if not isinstance(p, int)) for r in rows]
        stacked = torch.zeros(len(rows), max(per_row), 3, SIZE, SIZE)
        for r, chunk in enumerate(pixels.split(per_row)):
            stacked[r, : len(chunk)] = chunk
        pixels = stacked
    if family == "perception_lm":  # [images, tiles, 3, h, w]: one tile each
        pixels = pixels[:, None]
    out = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    if family in PIXTRAL:
        out["image_sizes"] = torch.tensor([p for p, _ in sizes])
    if family == "paddleocr_vl":  # as its processor: every image's 8 px patches in raster order, and its grid
        n = SIZE // PATCH
        out["pixel_values"] = pixels.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).permute(0, 2, 3, 1, 4, 5).reshape(
            len(sizes) * n * n, 3, PATCH, PATCH)
        out["image_grid_thw"] = torch.tensor([[1, n, n]] * len(sizes))
        out["mm_token_type_ids"] = (ids == IMG).int()
    if family.startswith("gemma4"):  # as its processor: each image's 8 px patches flattened, with their (x, y) cells
        n = SIZE // PATCH
        out["pixel_values"] = pixels.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).permute(0, 2, 3, 4, 5, 1).reshape(
            len(sizes), n * n, PATCH * PATCH * 3)
        cells = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="xy"), dim=-1).reshape(n * n, 2)
        out["image_position_ids"] = cells.expand(len(sizes), n * n, 2).clone()
        out["mm_token_type_ids"] = (ids == IMG).long()
    if family == "deepseek_vl_hybrid":  # the same images at 128 px for its SAM tower
        out["high_res_pixel_values"] = torch.nn.functional.interpolate(pixels, size=(HIGH_RES, HIGH_RES))
    if family == "gemma3":  # as its processor: 1 marks the image tokens (they attend to each other both ways)
        out["token_type_ids"] = (ids == IMG).long()
    if family.startswith("paligemma"):  # as its processor: 0 marks the prompt, the prefix that attends both ways
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def perception_inputs(rows: list[list], seeds: list[int] | None = None,
                      family: str = "perception_lm") -> dict[str, torch.Tensor]:
    """A left-padded PerceptionLM (or Video-LLaVA) batch: ints are text lengths, ``(h, w)`` 64 px
    images and ``("video", frames)`` videos (16 tokens a frame, Video-LLaVA's 17 with each frame's
    class token; the videos of one batch have as many frames, as their processors give them);
    even seeds give half-flat pixels."""
    per_frame = 17 if family == "video_llava" else 16
    seeds = seeds or list(range(len(rows)))
    ids, images, videos = [], [], []
    for r, s in zip(rows, seeds, strict=True):
        g = torch.Generator().manual_seed(s)
        out: list[int] = []
        for j, p in enumerate(r):
            if isinstance(p, int):
                out += torch.randint(3, 100, (p,), generator=g).tolist()
                continue
            frames = p[1] if p[0] == "video" else 1
            x = torch.randn(frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(100 + 10 * s + j))
            if s % 2 == 0:
                x[:, :, : SIZE // 2] = 0.5
            (videos if p[0] == "video" else images).append(x)
            out += [START, *([VID] * (per_frame * frames) if p[0] == "video" else [IMG] * 16), END]
        ids.append(torch.tensor(out))
    input_ids, mask = left_pad(ids)
    x = dict(input_ids=input_ids, attention_mask=mask)
    if images:  # PerceptionLM: [images, tiles, 3, h, w]; Video-LLaVA: [images, 3, h, w]
        x["pixel_values"] = torch.cat(images) if family == "video_llava" else torch.stack(images)
    if videos:
        x["pixel_values_videos"] = torch.stack(videos)  # [videos, frames, 3, h, w]
    return x

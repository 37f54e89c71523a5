"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense and MoE) models and processor-shaped prompts for the tests."""

from __future__ import annotations

import torch
import transformers

from .conftest import left_pad

IMG, VID, VS, VE = 120, 121, 122, 123
GLM_VIDEO, GLM_VS, GLM_VE = 124, 125, 126  # GLM-4.1V: its video token id never appears (frames hold IMG)
AUD, AS, AE = 117, 118, 119  # Qwen2.5-Omni / Qwen3-Omni: audio tokens, audio start / end
OMNI = ("qwen2_5_omni", "qwen3_omni_moe")  # the thinkers of the Omni models
PATCH = 4
IN = 3 * 2 * PATCH * PATCH  # one flattened patch: channels x temporal patch x patch x patch
DEPTH = 6  # decoder layers
VDEPTH = 4  # vision blocks


def make(family: str = "qwen2_5_vl", impl: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``family`` (``"glm4v/video"``: GLM-4.1V, whose test batch holds videos)."""
    family = family.split("/")[0]
    vision = dict(depth=VDEPTH, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, in_channels=3)
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=DEPTH,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    torch.manual_seed(seed)
    if family == "qwen2_vl":  # no window attention; LayerNorm and a GELU MLP; width embed_dim
        vision = dict(vision, embed_dim=vision.pop("hidden_size"), hidden_size=vision.pop("out_hidden_size"),
                      mlp_ratio=2)
        del vision["intermediate_size"]
        text.update(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
        cfg = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, attn_implementation=impl, **ids)
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
    elif family == "qwen2_5_vl":
        vision.update(window_size=16, fullatt_block_indexes=[1, 3])
        text.update(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
        cfg = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, attn_implementation=impl, **ids)
        model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    elif family == "qwen2_5_omni":  # Qwen2.5-Omni's thinker: Qwen2.5-VL's tower with separate q/k/v, an audio tower
        vision.update(window_size=16, fullatt_block_indexes=[1, 3])
        text.update(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
        audio = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                     output_dim=64, n_window=4, max_source_positions=64)
        cfg = transformers.Qwen2_5OmniThinkerConfig(
            vision_config=vision, text_config=text, audio_config=audio, attn_implementation=impl,
            image_token_index=IMG, video_token_index=VID, audio_token_index=AUD, vision_start_token_id=VS,
            audio_start_token_id=AS, audio_end_token_id=AE, position_id_per_seconds=2, seconds_per_chunk=1)
        model = transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    elif family == "qwen3_omni_moe":  # Qwen3-Omni's thinker: Qwen3-VL's tower (deepstack), an MoE text model
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        text.update(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3],
                                         mrope_interleaved=True))
        audio = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                     output_dim=64, max_source_positions=64, downsample_hidden_size=8)
        cfg = transformers.Qwen3OmniMoeThinkerConfig(
            vision_config=vision, text_config=text, audio_config=audio, attn_implementation=impl,
            image_token_id=IMG, video_token_id=VID, audio_token_id=AUD, vision_start_token_id=VS,
            audio_start_token_id=AS, position_id_per_seconds=2)
        model = transformers.Qwen3OmniMoeThinkerForConditionalGeneration(cfg)
    elif family.startswith("glm"):  # GLM-4.1V / 4.5V / 4.6V, GLM-OCR: RMS norms, a conv downsample, half-rotary M-RoPE
        vision.update(image_size=32)
        text.update(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2],
                                         partial_rotary_factor=0.5))
        name = "Glm4v"
        if family == "glm46v":  # GLM-4.6V: its own classes around GLM-4.1V's tower and text model
            name = "Glm46V"
            vision.update(model_type="glm4v_vision")
            text.update(model_type="glm4v_text")
        if family == "glm_ocr":  # GLM-OCR: q/k norms in the tower, no learned position table, a GLM-4 text model
            name = "GlmOcr"
        if family == "glm4v_moe":  # 4 routed experts, 2 per token, one shared; layer 0 dense
            name = "Glm4vMoe"
            text.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1)
        glm_ids = dict(image_token_id=IMG, video_token_id=GLM_VIDEO, image_start_token_id=VS,
                       image_end_token_id=VE, video_start_token_id=GLM_VS, video_end_token_id=GLM_VE)
        cfg = getattr(transformers, f"{name}Config")(vision_config=vision, text_config=text,
                                                     attn_implementation=impl, **glm_ids)
        model = getattr(transformers, f"{name}ForConditionalGeneration")(cfg)
    elif family.startswith("qwen3_5"):  # Qwen3.5: Qwen3-VL's tower, no deepstack; a hybrid LM (Gated DeltaNet)
        vision.update(num_position_embeddings=64)
        text.update(head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"] * (DEPTH // 2),
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 0],
                                         mrope_interleaved=True, partial_rotary_factor=0.25))
        name = "Qwen3_5"
        if family == "qwen3_5_moe":  # 4 experts, 2 per token, and a shared one
            name = "Qwen3_5Moe"
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32)
        cfg = getattr(transformers, f"{name}Config")(vision_config=vision, text_config=text, attn_implementation=impl,
                                                     **ids)
        model = getattr(transformers, f"{name}ForConditionalGeneration")(cfg)
    else:
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        text.update(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                      mrope_section=[2, 3, 3], mrope_interleaved=True))
        name = "Qwen3VL"
        if family == "qwen3_vl_moe":  # 4 experts, 2 per token; layer 1 a dense MLP
            name = "Qwen3VLMoe"
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1])
        cfg = getattr(transformers, f"{name}Config")(vision_config=vision, text_config=text, attn_implementation=impl,
                                                     **ids)
        model = getattr(transformers, f"{name}ForConditionalGeneration")(cfg)
    model = model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # always NEW tokens: rows alone and batched stay aligned
    return model


def tokens(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // 4


def row(parts: list, seed: int = 0, family: str = "qwen2_5_vl") -> torch.Tensor:
    """A prompt: ints are text lengths, ('image'|'video', grid) an image or video span
    (Qwen3-VL's processor wraps every video frame in its own timestamp + start/end tokens,
    GLM-4.1V's in start/end tokens + a timestamp inside the video's start/end; its frames
    are written with VID here, which :func:`inputs` turns into GLM's image tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in parts:
        if isinstance(p, int):
            out.append(torch.randint(3, 100, (p,), generator=g))
        elif p[0] == "audio":  # Qwen2.5-Omni: ("audio", mel frames)
            out += [torch.tensor([AS]), torch.full((audio_tokens(p[1], family),), AUD), torch.tensor([AE])]
        elif p[0] == "video+audio":  # Qwen2.5-Omni's use_audio_in_video: ("video+audio", grid, mel frames)
            out.append(_video_with_audio(p[1], audio_tokens(p[2], family)))
        elif p[0] == "image" or not family.startswith(("qwen3_vl", "qwen3_5", "glm")):
            tok = IMG if p[0] == "image" else VID
            out += [torch.tensor([VS]), torch.full((tokens(p[1]),), tok), torch.tensor([VE])]
        elif family.startswith("glm"):  # every frame an image span followed by its timestamp
            t, h, w = p[1]
            out.append(torch.tensor([GLM_VS]))
            for i in range(t):
                out += [torch.tensor([VS]), torch.full((tokens((1, h, w)),), VID), torch.tensor([VE, 100 + i])]
            out.append(torch.tensor([GLM_VE]))
        else:
            t, h, w = p[1]
            for i in range(t):
                out += [torch.tensor([100 + i, VS]), torch.full((tokens((1, h, w)),), VID), torch.tensor([VE])]
    return torch.cat(out)


def _video_with_audio(grid: tuple[int, int, int], audio: int) -> torch.Tensor:
    """A video whose audio the processor interleaves with its frames, one chunk per second
    (:func:`make`'s 1 s per grid, 2 positions per second, 1 s per chunk: a frame's tokens,
    then two audio tokens), wrapped in vision and audio start / end tokens."""
    t, h, w = grid
    parts = [torch.tensor([VS, AS])]
    for j in range(max(t, (audio + 1) // 2)):
        if j < t:
            parts.append(torch.full((tokens((1, h, w)),), VID))
        parts.append(torch.full((max(0, min(2, audio - 2 * j)),), AUD))
    return torch.cat([*parts, torch.tensor([AE, VE])])


def audio_tokens(frames: int, family: str = "qwen2_5_omni") -> int:
    """The audio tokens for ``frames`` mel frames: Qwen2.5-Omni's count (its get_rope_index's),
    or Qwen3-Omni's (its encoder's: 13 per window of 100 frames, then the rest's)."""
    if family == "qwen3_omni_moe":
        feat = (frames % 100 - 1) // 2 + 1
        return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (frames // 100) * 13
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def pixels(grid: tuple[int, int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    t, h, w = grid
    x = torch.randn(t * h * w, IN, generator=g)
    if seed % 2 == 0:  # a redundant image: half its patches identical
        x[: len(x) // 2] = x[0]
    return x


def inputs(rows: list[list], seeds: list[int] | None = None, family: str = "qwen2_5_vl") -> dict[str, torch.Tensor]:
    """Left-padded batch with everything the processor returns."""
    seeds = seeds or list(range(len(rows)))
    ids = [row(r, s, family) for r, s in zip(rows, seeds, strict=True)]
    input_ids, mask = left_pad(ids)
    out: dict[str, torch.Tensor] = dict(input_ids=input_ids, attention_mask=mask)
    if family in OMNI:  # their processors return no token types; each video's seconds per grid
        out.update(_audio_inputs(rows, seeds))
        n_videos = sum(1 for r in rows for p in r if not isinstance(p, int) and p[0].startswith("video"))
        if n_videos:
            out["video_second_per_grid"] = torch.full((n_videos,), 1.0)
        if any(not isinstance(p, int) and p[0] == "video+audio" for r in rows for p in r):
            out["use_audio_in_video"] = True
    else:
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == IMG] = 1
        types[input_ids == VID] = 2
        out["mm_token_type_ids"] = types
    if family.startswith("glm"):  # GLM-4.1V's video frames hold image tokens (types 2)
        out["input_ids"] = input_ids.masked_fill(input_ids == VID, IMG)
    for kind, key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                ("video", "pixel_values_videos", "video_grid_thw")):
        items = [(p[1], 10 * s + j) for r, s in zip(rows, seeds, strict=True)
                 for j, p in enumerate(r) if not isinstance(p, int) and p[0].split("+")[0] == kind]
        if items:
            out[key] = torch.cat([pixels(g, s) for g, s in items])
            out[grid_key] = torch.tensor([list(g) for g, _ in items])
    return out


def _audio_inputs(rows: list[list], seeds: list[int]) -> dict[str, torch.Tensor]:
    """Qwen2.5-Omni's mel features of every audio part, padded, and their mask."""
    frames = [(p[-1], 10 * s + j) for r, s in zip(rows, seeds, strict=True)
              for j, p in enumerate(r) if not isinstance(p, int) and p[0] in ("audio", "video+audio")]
    if not frames:
        return {}
    n = max(f for f, _ in frames)
    features = torch.zeros(len(frames), 8, n)
    mask = torch.zeros(len(frames), n, dtype=torch.long)
    for i, (f, s) in enumerate(frames):
        features[i, :, :f] = torch.randn(8, f, generator=torch.Generator().manual_seed(200 + s))
        mask[i, :f] = 1
    return dict(input_features=features, feature_attention_mask=mask)


def rope_index(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpatched model's 3-D positions of the whole prompt and their deltas (Qwen2.5-Omni's
    get_rope_index takes the audio lengths and the seconds per video grid, the others the token types)."""
    if "mm_token_type_ids" in x:
        return model.model.get_rope_index(x["input_ids"], x["mm_token_type_ids"], x.get("image_grid_thw"),
                                          x.get("video_grid_thw"), attention_mask=x["attention_mask"])
    mask = x.get("feature_attention_mask")
    return model.model.get_rope_index(
        x["input_ids"], x.get("image_grid_thw"), x.get("video_grid_thw"), x["attention_mask"],
        use_audio_in_video=bool(x.get("use_audio_in_video")), audio_seqlens=None if mask is None else mask.sum(1),
        second_per_grids=x.get("video_second_per_grid"))

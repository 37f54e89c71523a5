"""Tiny random anyres LLaVAs (LLaVA-NeXT: CLIP tower with a class token, Llama decoder;
LLaVA-NeXT-Video: the same, and videos; LLaVA-OneVision: SigLIP tower, Qwen2 decoder) and
processor-shaped prompts for the tests.

Crops are 32x32 pixels, 4x4 patches of 8 pixels; the pinpoints allow 1x1, 1x2, 2x1 and
2x2 crop grids."""

from __future__ import annotations

import torch
import transformers

from .conftest import left_pad

IMG, VID = 120, 121
DEPTH = 6  # decoder layers
VDEPTH = 2  # vision tower layers
SIDE = 4  # patches per crop side
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
FAMILIES = ("llava_next", "llava_next_video", "llava_onevision")


def make(family: str = "llava_onevision", seed: int = 0, aspect: str | None = None, vocab_size: int = 128,
         image_token_id: int = IMG, video_token_id: int = VID, mistral: bool = False,
         granite: bool = False) -> torch.nn.Module:
    """A tiny random model of ``family`` (``aspect``: OneVision's ``vision_aspect_ratio``;
    vocabulary size and placeholder ids to match a tokenizer; ``mistral``: LLaVA-NeXT with
    a Mistral decoder without sliding windows, as llava-v1.6-mistral-7b; ``granite``: as Granite
    Vision 3.x, a Granite decoder and the features of several tower layers concatenated)."""
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=VDEPTH, num_attention_heads=2,
                 image_size=32, patch_size=8)
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=DEPTH,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, max_position_embeddings=1024)
    torch.manual_seed(seed)
    if family in ("llava_next", "llava_next_video"):
        name = "LlavaNext" if family == "llava_next" else "LlavaNextVideo"
        video = {} if family == "llava_next" else dict(video_token_id=video_token_id, spatial_pool_stride=2)
        if mistral:
            decoder = transformers.MistralConfig(sliding_window=None, **text)
        elif granite:
            decoder = transformers.GraniteConfig(**text, attention_multiplier=0.3, embedding_multiplier=4.0,
                                                 residual_multiplier=0.5, logits_scaling=2.0)
        else:
            decoder = transformers.LlamaConfig(**text)
        cfg = getattr(transformers, f"{name}Config")(
            vision_config=transformers.CLIPVisionConfig(**tower), text_config=decoder,
            image_token_id=image_token_id, image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="default",
            vision_feature_layer=[-2, -1] if granite else -1, attn_implementation="sdpa", **video)
        model = getattr(transformers, f"{name}ForConditionalGeneration")(cfg)
    else:
        extra = {} if aspect is None else dict(vision_aspect_ratio=aspect)
        cfg = transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(**tower), text_config=transformers.Qwen2Config(**text),
            image_token_id=image_token_id, video_token_id=video_token_id, image_grid_pinpoints=PINPOINTS,
            vision_feature_select_strategy="full", vision_feature_layer=-1, attn_implementation="sdpa", **extra)
        model = transformers.LlavaOnevisionForConditionalGeneration(cfg)
    model = model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # always the same number of new tokens
    return model


def is_onevision(model: torch.nn.Module) -> bool:
    return model.config.model_type == "llava_onevision"


def crops(model: torch.nn.Module, size: tuple[int, int], alone: bool) -> int:
    """Crops (base image included) the processor makes of an image of ``size``; OneVision
    does not crop the images of a prompt with several."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    if is_onevision(model) and not alone:
        return 1
    return image_size_to_num_patches(size, PINPOINTS, 32)


def inputs(model: torch.nn.Module, rows: list, seeds: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompts, one per row ``[(text before each image, text after), size, size, ...]``,
    whose image-token runs hold what the unpatched model packs per image."""
    seeds = seeds or list(range(len(rows)))
    sizes = torch.tensor([s for r in rows for s in r[1:]])
    per_prompt = torch.tensor([len(r) - 1 for r in rows])
    n_crops = [crops(model, tuple(s), len(r) == 2) for r in rows for s in r[1:]]
    px = torch.zeros(len(sizes), max(n_crops), 3, 32, 32)
    k = 0
    for r, s in zip(rows, seeds, strict=True):
        for j in range(len(r) - 1):
            g = torch.Generator().manual_seed(10 * s + j)
            px[k, : n_crops[k]] = torch.randn(n_crops[k], 3, 32, 32, generator=g)
            k += 1
    x = dict(pixel_values=px, image_sizes=sizes)
    if is_onevision(model):
        x["batch_num_images"] = per_prompt
    lengths = token_counts(model, x)
    ids, k = [], 0
    for r, s in zip(rows, seeds, strict=True):
        g = torch.Generator().manual_seed(s)
        pre, post = r[0]
        parts = []
        for _ in r[1:]:
            parts += [torch.randint(1, 100, (pre,), generator=g), torch.full((lengths[k],), IMG)]
            k += 1
        ids.append(torch.cat([*parts, torch.randint(1, 100, (post,), generator=g)]))
    input_ids, mask = left_pad(ids)
    return dict(input_ids=input_ids, attention_mask=mask, **x)


def features(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The packed per-image features ``model`` hands its language model for ``x``."""
    extra = {"batch_num_images": x["batch_num_images"]} if "batch_num_images" in x else {}
    with torch.no_grad():
        return list(model.model.get_image_features(x["pixel_values"], x["image_sizes"], **extra).pooler_output)


def token_counts(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> list[int]:
    return [len(f) for f in features(model, x)]


def gen(model: torch.nn.Module, x: dict[str, torch.Tensor], new: int = 4, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**x, **{**dict(max_new_tokens=new, do_sample=False, suppress_tokens=[IMG]), **kw})[:, -new:]


def logits(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits

"""The transformers reference for the vLLM plugin: the same checkpoint run by transformers'
Qwen2_5_VLForConditionalGeneration, with SAINT's fixed-budget drop applied to the merged
image features (``saint.core.fixed_budget_keep_mask``, the plugin's budget rule) and the kept
tokens given their full-grid M-RoPE positions from transformers' own ``get_rope_index``.

saint's own transformers path for Qwen2.5-VL is not on main yet (and prunes inside the
tower, not after it), so this reference is built here from transformers' public pieces.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saint.core import fixed_budget_keep_mask
from saint.integrations.vllm.settings import SaintVllmSettings


@torch.no_grad()
def transformers_greedy(
    model_dir: Path, image_path: Path, prompt_ids: list[int], keep_ratio: float, max_tokens: int
) -> dict:
    """Greedy ids and kept indices for ``prompt_ids`` (vLLM's prompt: the image's run of
    placeholders already shortened to the kept count)."""
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    inputs = processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    feats = model.model.get_image_features(inputs["pixel_values"], grid).pooler_output[0]
    n = feats.shape[0]
    settings = SaintVllmSettings(keep_ratio)
    keep = fixed_budget_keep_mask(feats[None], settings.kept_tokens(n), settings.step_div)[0]

    image_token = model.config.image_token_id
    ids = torch.tensor(prompt_ids)
    where = (ids == image_token).nonzero().flatten()
    start, k = int(where[0]), len(where)
    assert k == int(keep.sum()), (k, int(keep.sum()))
    full = torch.cat([ids[:start], torch.full((n,), image_token), ids[start + k:]])[None]
    positions, _ = model.model.get_rope_index(
        full, mm_token_type_ids=(full == image_token).int(), image_grid_thw=grid
    )
    columns = torch.ones(full.shape[1], dtype=torch.bool)
    columns[start:start + n] = keep
    positions = positions[:, :, columns]  # [3, 1, L]: the kept tokens' full-grid positions

    embed = model.model.get_input_embeddings()
    embeds = embed(ids[None])
    embeds[0, start:start + k] = feats[keep]
    out = []
    for _ in range(max_tokens):
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions)
        token = int(model.lm_head(hidden.last_hidden_state[:, -1]).argmax(-1))
        out.append(token)
        if token == model.config.text_config.eos_token_id:
            break
        embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
        step = (positions.max() + 1).view(1, 1, 1).expand(3, 1, 1)  # text after: max + 1
        positions = torch.cat([positions, step], dim=2)
    return {"token_ids": out, "kept": keep.nonzero().flatten().tolist()}


@torch.no_grad()
def transformers_llava_greedy(
    model_dir: Path, image_path: Path, prompt_ids: list[int], keep_ratio: float, max_tokens: int
) -> dict:
    """The same for LLaVA: the fixed-budget drop on the projector's output, and the
    shortened prompt numbered 0..L-1 (LLaVA's 1-D positions)."""
    from PIL import Image
    from transformers import LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = CLIPImageProcessorPil.from_pretrained(model_dir)
    pixels = processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    feats = model.model.get_image_features(pixel_values=pixels["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)
    feats = (feats[0] if isinstance(feats, (list, tuple)) else feats).reshape(-1, feats[0].shape[-1])
    settings = SaintVllmSettings(keep_ratio)
    keep = fixed_budget_keep_mask(feats[None], settings.kept_tokens(len(feats)), settings.step_div)[0]

    ids = torch.tensor(prompt_ids)
    where = (ids == model.config.image_token_index).nonzero().flatten()
    assert len(where) == int(keep.sum()), (len(where), int(keep.sum()))
    embed = model.model.get_input_embeddings()
    embeds = embed(ids[None])
    embeds[0, where] = feats[keep]
    out = []
    for _ in range(max_tokens):
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        token = int(model.lm_head(hidden[:, -1]).argmax(-1))
        out.append(token)
        if token == model.config.text_config.eos_token_id:
            break
        embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
    return {"token_ids": out, "kept": keep.nonzero().flatten().tolist()}

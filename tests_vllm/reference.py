"""The transformers references for the vLLM plugin: the same checkpoint run by transformers
(Qwen2.5-VL, Qwen3-VL, GLM-4.1V, LLaVA-1.5, Idefics3, InternVL, Gemma 3, PaliGemma), with SAINT's fixed-budget drop applied to the image features (``saint.core.fixed_budget_keep_mask``,
the plugin's budget rule) and, for the Qwen models, the kept tokens given their full-grid
M-RoPE positions from transformers' own ``get_rope_index``.

Each reference scores vLLM's prompt and greedy output in one forward pass (teacher forcing)
and returns the log-probabilities ``[steps, vocab]`` of every output step, for
``conftest.assert_same_greedy_decoding``, and the kept indices.

saint's own transformers path for Qwen2.5-VL (``saint.adapters.qwen_vl``) prunes inside the
tower (``vit`` mode) or picks a random set (``random``), not the fixed-budget drop on the
merged embeddings, so this reference is built here from transformers' public pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saint.core import fixed_budget_keep_mask
from saint.integrations.vllm.compat import install_torchvision_shim
from saint.integrations.vllm.settings import SaintVllmSettings


def _keep(feats: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """The plugin's choice among one image's ``[N, D]`` features."""
    settings = SaintVllmSettings(keep_ratio)
    return fixed_budget_keep_mask(feats[None], settings.kept_tokens(len(feats)), settings.step_div)[0]


def _step_logprobs(logits: torch.Tensor, prompt_len: int, steps: int) -> torch.Tensor:
    """``[steps, vocab]``: the log-probabilities that predicted each output token."""
    return torch.log_softmax(logits[0, prompt_len - 1 : prompt_len - 1 + steps].float(), dim=-1)


def _runs(ids: torch.Tensor, token: int) -> list[tuple[int, int]]:
    """``(start, length)`` of every run of ``token`` in ``ids``, in order."""
    where = (ids == token).nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for i in where:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [(a, n) for a, n in runs]


def _kept_embeddings(model, image_token: int, feats, keeps, prompt_ids, output_ids):
    """The embeddings ``[1, L, D]`` of vLLM's prompt and output with each image's kept
    features in its (already shortened) run of placeholders, the mask of those slots, and
    the runs ``(start, length)``, checked against the kept counts."""
    runs = _runs(torch.tensor(prompt_ids), image_token)
    assert [k for _, k in runs] == [int(keep.sum()) for keep in keeps], (runs, [int(k.sum()) for k in keeps])
    embeds = model.model.get_input_embeddings()(torch.tensor(prompt_ids + output_ids)[None])
    mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    for (start, k), f, keep in zip(runs, feats, keeps, strict=True):
        embeds[0, start : start + k] = f[keep]
        mask[0, start : start + k] = True
    return embeds, mask, runs


def _one_d_logprobs(model, decoder, image_token: int, feats, keeps, prompt_ids, output_ids) -> torch.Tensor:
    """``[steps, vocab]`` for a model with 1-D positions: vLLM's prompt and output, each image
    run filled with its kept features, numbered 0..L-1, through ``decoder`` and ``lm_head``."""
    embeds, _, _ = _kept_embeddings(model, image_token, feats, keeps, prompt_ids, output_ids)
    hidden = decoder(inputs_embeds=embeds).last_hidden_state
    return _step_logprobs(model.lm_head(hidden), len(prompt_ids), len(output_ids))


def _qwen_inputs(model, image_token: int, feats, keeps, prompt_ids, output_ids, rope_index):
    """Embeddings and M-RoPE positions ``[3, 1, L]`` of vLLM's prompt (each image's run
    already shortened to its kept count) followed by its output: kept tokens keep their
    full-grid positions (``rope_index(ids)``, transformers' ``get_rope_index`` on the
    unpruned prompt ``ids [1, L_full]``), the text after an image keeps its unpruned positions."""
    embeds, mask, runs = _kept_embeddings(model, image_token, feats, keeps, prompt_ids, output_ids)
    ids = torch.tensor(prompt_ids)
    parts, columns, end = [], [], 0
    for (start, k), f, keep in zip(runs, feats, keeps, strict=True):
        parts += [ids[end:start], torch.full((len(f),), image_token)]
        columns += [torch.ones(start - end, dtype=torch.bool), keep]
        end = start + k
    parts.append(ids[end:])
    columns.append(torch.ones(len(ids) - end, dtype=torch.bool))
    positions = rope_index(torch.cat(parts)[None])[:, :, torch.cat(columns)]
    after = positions.max() + 1 + torch.arange(len(output_ids))  # decoding continues from there
    positions = torch.cat([positions, after.view(1, 1, -1).expand(3, 1, -1)], dim=2)
    return embeds, positions, mask


@torch.no_grad()
def transformers_scores(
    model_dir: Path, image_paths: Path | list[Path], prompt_ids: list[int], output_ids: list[int],
    keep_ratio: float, dtype: torch.dtype = torch.float32,
) -> dict:
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5, dense or MoE, or GLM-4.1V / GLM-4.5V (by the checkpoint), one image or several in prompt order:
    the fixed-budget drop on each image's merged features (Qwen3-VL: the tower's main
    output; its deepstack features, added to the first decoder layers at the image's
    positions, are taken for the same kept tokens). ``kept``: the kept indices per image;
    ``tokens``: each image's merged tokens before the drop."""
    from PIL import Image
    from transformers import (
        AutoConfig,
        Glm4vForConditionalGeneration,
        Glm4vMoeForConditionalGeneration,
        GlmOcrForConditionalGeneration,
        PaddleOCRVLForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5MoeForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeForConditionalGeneration,
    )
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import (
        PaddleOCRVLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    paths = image_paths if isinstance(image_paths, list) else [image_paths]
    model_type = AutoConfig.from_pretrained(model_dir).model_type
    qwen3 = model_type.startswith("qwen3_vl")
    cls = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": Qwen3VLForConditionalGeneration, "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
           "glm4v": Glm4vForConditionalGeneration, "glm4v_moe": Glm4vMoeForConditionalGeneration,
           "glm_ocr": GlmOcrForConditionalGeneration, "paddleocr_vl": PaddleOCRVLForConditionalGeneration,
           "qwen3_5": Qwen3_5ForConditionalGeneration, "qwen3_5_moe": Qwen3_5MoeForConditionalGeneration}[model_type]
    model = cls.from_pretrained(model_dir, dtype=dtype).eval()
    if model_type == "paddleocr_vl":  # vLLM 0.32 resamples the tower's position table with align_corners=False,
        # transformers 5.19 with True (0.06 apart on the tiny tower): the reference follows vLLM's
        model.model.visual.vision_model.embeddings.interpolation_align_corners = False
    processor_cls = {"glm4v": Glm4vImageProcessorPil, "glm4v_moe": Glm4vImageProcessorPil,
                     "glm_ocr": Glm46VImageProcessorPil,
                     "paddleocr_vl": PaddleOCRVLImageProcessorPil}.get(model_type, Qwen2VLImageProcessorPil)
    processor = processor_cls.from_pretrained(model_dir)
    inputs = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    vision = model.model.get_image_features(inputs["pixel_values"].to(dtype), grid)
    feats = list(vision.pooler_output)
    keeps = [_keep(f, keep_ratio) for f in feats]
    image_token = model.config.image_token_id
    embeds, positions, mask = _qwen_inputs(
        model, image_token, feats, keeps, prompt_ids, output_ids,
        lambda ids: model.model.get_rope_index(ids, mm_token_type_ids=(ids == image_token).int(),
                                               image_grid_thw=grid)[0],
    )
    deepstack = {}
    if qwen3:
        levels = [torch.cat([level[i][keep] for i, keep in enumerate(keeps)]) for level in vision.deepstack_features]
        deepstack = {"visual_pos_masks": mask, "deepstack_visual_embeds": levels}
    hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions, **deepstack)
    logits = model.lm_head(hidden.last_hidden_state)
    return {
        "logprobs": _step_logprobs(logits, len(prompt_ids), len(output_ids)),
        "kept": [keep.nonzero().flatten().tolist() for keep in keeps],
        "tokens": [len(f) for f in feats],
    }


@torch.no_grad()
def transformers_omni_scores(
    model_dir: Path, image_paths: Path | list[Path], prompt_ids: list[int], output_ids: list[int],
    keep_ratio: float, audio=None,
) -> dict:
    """Qwen2.5-Omni's or Qwen3-Omni's thinker (of the whole-model checkpoint vLLM serves), one
    image or several in prompt order, as :func:`transformers_scores` (Qwen3-Omni: with the kept
    tokens' deepstack features); ``audio`` (a 16 kHz waveform, the prompt's one audio clip): its
    features, from the checkpoint's own processor, fill the audio run, and the positions count
    its tokens as transformers' ``get_rope_index`` does."""
    import transformers
    from PIL import Image
    from safetensors.torch import load_file

    paths = image_paths if isinstance(image_paths, list) else [image_paths]
    config = transformers.AutoConfig.from_pretrained(model_dir)
    name = {"qwen2_5_omni": "Qwen2_5Omni", "qwen3_omni_moe": "Qwen3OmniMoe"}[config.model_type]
    # the whole model's from_pretrained wants the talker's files: build the thinker alone
    thinker = getattr(transformers, f"{name}ThinkerForConditionalGeneration")(config.thinker_config)
    weights = load_file(str(Path(model_dir) / "model.safetensors"))
    thinker.load_state_dict({k.removeprefix("thinker."): v for k, v in weights.items()}, strict=True)
    thinker = thinker.float().eval()
    install_torchvision_shim()  # the Omni processor needs a video processor (torchvision's)
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    inputs = processor.image_processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    vision = thinker.get_image_features(inputs["pixel_values"], grid)
    feats = list(vision.pooler_output)
    keeps = [_keep(f, keep_ratio) for f in feats]
    config, seqlens = thinker.config, None
    image_token, audio_token = ((config.image_token_index, config.audio_token_index) if name == "Qwen2_5Omni"
                                else (config.image_token_id, config.audio_token_id))
    if audio is not None:
        sound = processor(text=processor.audio_token, audio=[audio], return_tensors="pt")
        seqlens = sound["feature_attention_mask"].sum(-1)
        sound = thinker.get_audio_features(sound["input_features"], sound["feature_attention_mask"])
    embeds, positions, mask = _qwen_inputs(
        thinker, image_token, feats, keeps, prompt_ids, output_ids,
        lambda ids: thinker.get_rope_index(ids, image_grid_thw=grid, attention_mask=torch.ones_like(ids),
                                           audio_seqlens=seqlens)[0],
    )
    audio_runs = _runs(torch.tensor(prompt_ids), audio_token)
    assert len(audio_runs) == (audio is not None), audio_runs
    for start, n in audio_runs:
        assert n == len(sound.last_hidden_state), (n, sound.last_hidden_state.shape)
        embeds[0, start : start + n] = sound.last_hidden_state
    deepstack = {}
    if name == "Qwen3OmniMoe":
        levels = [torch.cat([level[i][keep] for i, keep in enumerate(keeps)]) for level in vision.deepstack_features]
        deepstack = {"visual_pos_masks": mask, "deepstack_visual_embeds": levels}
    hidden = thinker.model(inputs_embeds=embeds, position_ids=positions, **deepstack).last_hidden_state
    return {
        "logprobs": _step_logprobs(thinker.lm_head(hidden), len(prompt_ids), len(output_ids)),
        "kept": [keep.nonzero().flatten().tolist() for keep in keeps],
        "tokens": [len(f) for f in feats],
    }


@torch.no_grad()
def transformers_llava_scores(
    model_dir: Path, image_paths: Path | list[Path], prompt_ids: list[int], output_ids: list[int],
    keep_ratio: float,
) -> dict:
    """LLaVA, one image or several in prompt order: the fixed-budget drop on each image's
    projector output, and the shortened prompt numbered 0..L-1 (LLaVA's 1-D positions).
    ``kept``: the kept indices per image; ``tokens``: each image's tokens before the drop."""
    from PIL import Image
    from transformers import LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    paths = image_paths if isinstance(image_paths, list) else [image_paths]
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = CLIPImageProcessorPil.from_pretrained(model_dir)
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
    out = model.model.get_image_features(pixel_values=pixels["pixel_values"])
    out = getattr(out, "pooler_output", out)
    feats = [f.reshape(-1, f.shape[-1]) for f in (out if isinstance(out, (list, tuple)) else out.unbind(0))]
    keeps = [_keep(f, keep_ratio) for f in feats]

    return {
        "logprobs": _one_d_logprobs(model, model.model.language_model, model.config.image_token_index, feats,
                                    keeps, prompt_ids, output_ids),
        "kept": [keep.nonzero().flatten().tolist() for keep in keeps],
        "tokens": [len(f) for f in feats],
    }


def transformers_idefics3_scores(
    model_dir: Path, image_path: Path, prompt_ids: list[int], output_ids: list[int], keep_ratio: float,
) -> dict:
    """Idefics3, one image: the fixed-budget drop on each tile's (and the global view's)
    connector output, each tile's run of placeholders filled with its kept features, the
    shortened prompt numbered 0..L-1. ``kept``: the image's kept indices over its tiles'
    tokens in order; ``tiles``: how many tiles (with the global view) it was split into."""
    from PIL import Image
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = Idefics3Processor.from_pretrained(model_dir)
    pixels = processor.image_processor(images=[[Image.open(image_path).convert("RGB")]], return_tensors="pt")
    out = model.model.get_image_features(pixel_values=pixels["pixel_values"],
                                         pixel_attention_mask=pixels["pixel_attention_mask"])
    feats = getattr(out, "pooler_output", out)  # [tiles, tokens, D], or one flat tensor per prompt
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    tiles = list(feats.reshape(-1, int(processor.image_seq_len), feats.shape[-1]))
    keeps = [_keep(t, keep_ratio) for t in tiles]
    return {
        "logprobs": _one_d_logprobs(model, model.model.text_model, model.config.image_token_id, tiles, keeps,
                                    prompt_ids, output_ids),
        "kept": [torch.cat(keeps).nonzero().flatten().tolist()],
        "tiles": len(tiles),
    }


def transformers_internvl_scores(
    model_dir: Path, image_paths: Path | list[Path], prompt_ids: list[int], output_ids: list[int],
    keep_ratio: float,
) -> dict:
    """InternVL, one image or several in prompt order: the fixed-budget drop on each tile's
    (and the thumbnail's) projector output, each image's one run of context tokens filled
    with its tiles' kept features in order, the shortened prompt numbered 0..L-1. ``kept``:
    per image, the kept indices over its tiles' tokens; ``tiles``: per image, how many tiles
    (with the thumbnail)."""
    from PIL import Image
    from transformers import InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = GotOcr2ImageProcessorPil.from_pretrained(model_dir)
    feats, keeps, tiles = [], [], []
    for path in image_paths if isinstance(image_paths, list) else [image_paths]:
        pixels = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")
        out = model.model.get_image_features(pixel_values=pixels["pixel_values"])
        image = getattr(out, "pooler_output", out)  # [tiles, tokens, D]
        feats.append(image.flatten(0, 1))
        keeps.append(torch.cat([_keep(t, keep_ratio) for t in image]))
        tiles.append(len(image))
    return {
        "logprobs": _one_d_logprobs(model, model.model.language_model, model.config.image_token_id, feats,
                                    keeps, prompt_ids, output_ids),
        "kept": [keep.nonzero().flatten().tolist() for keep in keeps],
        "tiles": tiles,
    }


def transformers_unit_scores(
    model_dir: Path, image_paths: Path | list[Path], prompt_ids: list[int], output_ids: list[int],
    keep_ratio: float, **image_kwargs: object,
) -> dict:
    """Gemma 3 and PaliGemma, one image or several in prompt order (``image_kwargs``: the
    image processor's, e.g. Gemma 3's pan-and-scan): the fixed-budget drop on each image's
    (and crop's) projector output, each run of image tokens filled with its kept features,
    the shortened prompt numbered 0..L-1, causal attention throughout (the tests switch
    vLLM's bidirectional image attention off: its CPU backend has none). ``kept``: per
    image, the kept indices over its units' tokens; ``tiles``: per image, its units (the
    image and its crops)."""
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    config.text_config.use_bidirectional_attention = False  # PaliGemma's default: the whole prompt both ways
    model = AutoModelForImageTextToText.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    units, unit_keeps, kept, tiles = [], [], [], []
    for path in image_paths if isinstance(image_paths, list) else [image_paths]:
        pixels = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt", **image_kwargs)
        out = model.model.get_image_features(pixel_values=pixels["pixel_values"])
        image = getattr(out, "pooler_output", out)  # [units, tokens, D]
        keeps = [_keep(u, keep_ratio) for u in image]
        units += list(image)
        unit_keeps += keeps
        kept.append(torch.cat(keeps).nonzero().flatten().tolist())
        tiles.append(len(image))
    return {
        "logprobs": _one_d_logprobs(model, model.model.language_model, model.config.image_token_id, units,
                                    unit_keeps, prompt_ids, output_ids),
        "kept": kept,
        "tiles": tiles,
    }


def transformers_anyres_scores(
    model_dir: Path, image_paths: Path | list[Path], prompt_ids: list[int], output_ids: list[int],
    keep_ratio: float, family: str = "llava_next",
) -> dict:
    """LLaVA-NeXT / OneVision, one image or several in prompt order (each processed on its
    own): the fixed-budget drop on the packed features' base view and, separately, on its
    grid tokens, every newline kept; the newline rows are found by running the model's own
    ``pack_image_features`` on marker features. The shortened prompt numbered 0..L-1.
    ``kept``: per image, the kept indices; ``base``: the base view's token count;
    ``newlines``: per image, the newline count."""
    import importlib

    import transformers
    from PIL import Image

    name = {"llava_next": "LlavaNext", "llava_onevision": "LlavaOnevision"}[family]
    model = getattr(transformers, f"{name}ForConditionalGeneration").from_pretrained(
        model_dir, dtype=torch.float32).eval()
    images = importlib.import_module(f"transformers.models.{family}.image_processing_pil_{family}")
    processor = getattr(images, f"{name}ImageProcessorPil").from_pretrained(model_dir)
    vision = model.config.vision_config
    base = (vision.image_size // vision.patch_size) ** 2
    marker_kwargs = {"vision_feature_select_strategy": "default"} if family == "llava_next" else {}
    feats, keeps, newlines = [], [], []
    for path in image_paths if isinstance(image_paths, list) else [image_paths]:
        pixels = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")
        out = model.model.get_image_features(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
        (image,) = getattr(out, "pooler_output", out)
        crops = pixels["pixel_values"].shape[1]
        marks, _ = model.model.pack_image_features(
            image_features=[torch.zeros(crops, base, 1)], image_sizes=pixels["image_sizes"],
            image_newline=torch.ones(1), **marker_kwargs)
        newline = marks[0][:, 0] == 1
        assert len(newline) == len(image) and not newline[:base].any()
        grid = ~newline
        grid[:base] = False
        keep = newline.clone()
        keep[:base] = _keep(image[:base], keep_ratio)
        keep[grid] = _keep(image[grid], keep_ratio)
        feats.append(image)
        keeps.append(keep)
        newlines.append(int(newline.sum()))
    return {
        "logprobs": _one_d_logprobs(model, model.model.language_model, model.config.image_token_id, feats,
                                    keeps, prompt_ids, output_ids),
        "kept": [keep.nonzero().flatten().tolist() for keep in keeps],
        "base": base,
        "newlines": newlines,
    }


def transformers_mistral3_scores(
    model_dir: Path, image_path: Path, prompt_ids: list[int], output_ids: list[int], keep_ratio: float,
) -> dict:
    """Mistral 3 or a Pixtral-based LLaVA, one image: the fixed-budget drop on each row of the
    projector's output (the rows of the image's prompt, each ended by a break token), each
    row's run of placeholders filled with its kept features, the shortened prompt numbered
    0..L-1. ``kept``: the kept indices over the image's tokens; ``rows``, ``columns``: its grid."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = PixtralImageProcessorPil.from_pretrained(model_dir)
    pixels = processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    out = model.model.get_image_features(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
    feats = getattr(out, "pooler_output", out)
    feats = feats[0] if isinstance(feats, (list, tuple)) else feats.flatten(0, -2)  # the one image's tokens
    merged = model.config.vision_config.patch_size * getattr(model.config, "spatial_merge_size", 1)
    height, width = (int(s) for s in pixels["image_sizes"][0])
    rows, columns = -(-height // merged), -(-width // merged)
    grid = list(feats.reshape(rows, columns, -1))
    keeps = [_keep(row, keep_ratio) for row in grid]
    return {
        "logprobs": _one_d_logprobs(model, model.model.language_model, model.config.image_token_index, grid,
                                    keeps, prompt_ids, output_ids),
        "kept": [torch.cat(keeps).nonzero().flatten().tolist()],
        "rows": rows,
        "columns": columns,
    }


@torch.no_grad()
def transformers_lighton_ocr_scores(
    model_dir: Path, image_path: Path, prompt_ids: list[int], output_ids: list[int], keep_ratio: float,
) -> dict:
    """LightOnOCR saved as the hub's checkpoint (Mistral 3's model type, LightOnOCR's weights),
    one image: transformers' LightOnOCR with that config, the fixed-budget drop over the
    image's whole run of merged tokens, the shortened prompt numbered 0..L-1. ``kept``: the
    kept indices; ``tokens``: the image's merged tokens before the drop."""
    from PIL import Image
    from transformers import LightOnOcrConfig, LightOnOcrForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    saved = json.loads((Path(model_dir) / "config.json").read_text())
    config = LightOnOcrConfig(**{k: v for k, v in saved.items() if k not in ("model_type", "architectures")})
    model = LightOnOcrForConditionalGeneration.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()
    processor = PixtralImageProcessorPil.from_pretrained(model_dir)
    pixels = processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    out = model.model.get_image_features(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
    feats = list(out.pooler_output)
    keeps = [_keep(f, keep_ratio) for f in feats]
    return {
        "logprobs": _one_d_logprobs(model, model.model.language_model, config.image_token_id, feats, keeps,
                                    prompt_ids, output_ids),
        "kept": [keep.nonzero().flatten().tolist() for keep in keeps],
        "tokens": [len(f) for f in feats],
    }


@torch.no_grad()
def transformers_gemma4_scores(
    model_dir: Path, image_path: Path, prompt_ids: list[int], output_ids: list[int], keep_ratio: float,
) -> dict:
    """Gemma 4, one image: the fixed-budget drop on the image's soft tokens, then transformers'
    own Gemma 4 on vLLM's (already shortened) prompt and output with the kept features (its
    per-layer inputs, masks and embedding scale as it builds them). ``kept``: the kept indices;
    ``tokens``: the image's soft tokens before the drop."""
    from PIL import Image
    from transformers import Gemma4ForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    model = Gemma4ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = Gemma4ImageProcessorPil.from_pretrained(model_dir)
    pixels = processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    out = model.model.get_image_features(pixels["pixel_values"], pixels["image_position_ids"])
    feats = list(out.pooler_output)
    keeps = [_keep(f, keep_ratio) for f in feats]
    kept = BaseModelOutputWithPooling(pooler_output=[f[k] for f, k in zip(feats, keeps, strict=True)])
    ids = torch.tensor(prompt_ids + output_ids)[None]
    logits = model(input_ids=ids, mm_encoder_outputs={"image": kept}).logits
    return {
        "logprobs": _step_logprobs(logits, len(prompt_ids), len(output_ids)),
        "kept": [keep.nonzero().flatten().tolist() for keep in keeps],
        "tokens": [len(f) for f in feats],
    }

"""The benchmark's prompts and images, and the prefill / decode calls it times."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .geometry import Geometry


@dataclass
class VlmInputs:
    """A batch of prompts with one image each, already on the device, plus what every
    decode step needs (2-D masks, positions), prepared beforehand."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    media: dict[str, torch.Tensor]  # pixel values and what goes with them (Qwen-VL: grids, token types)
    decode_masks: list[torch.Tensor]
    decode_positions: list[torch.Tensor]
    suppress: torch.Tensor  # [vocab] bool: tokens greedy decoding must not pick (image/video tokens)
    text_tokens: int  # tokens per prompt that are not image tokens (text and image markers)
    image_tokens: int

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def batch(self) -> dict[str, torch.Tensor]:
        """The prompts as a processor would return them (what ``saint.calibrate`` takes)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.media}


def make_inputs(geometry: Geometry, batch_size: int, prompt_len: int, new_tokens: int,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> VlmInputs:
    """Random prompts: ``prompt_len // 2`` text tokens, the image's span (its tokens and
    the family's markers), the rest of the text (the image sits between a system prompt
    and a question, as in LLaVA-1.5's and Qwen-VL's chat templates)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if prompt_len < 1:
        raise ValueError(f"prompt length (text tokens) must be >= 1, got {prompt_len}")
    if new_tokens < 1:
        raise ValueError(f"new tokens must be >= 1, got {new_tokens}")
    run = torch.tensor(geometry.image_run())
    n_img = geometry.image_tokens
    total = prompt_len + len(run) + new_tokens
    max_pos = geometry.text["max_position_embeddings"]
    if total > max_pos:
        raise ValueError(f"prompt ({prompt_len} text + {len(run)} image tokens) + {new_tokens} new tokens = {total} "
                         f"exceeds the language model's {max_pos} positions")
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(2, geometry.text_id_limit, (batch_size, prompt_len), generator=g)
    text[:, 0] = 1  # BOS
    pre = prompt_len // 2
    ids = torch.cat([text[:, :pre], run.expand(batch_size, -1), text[:, pre:]], dim=1)
    media = geometry.media(ids, g)
    length = ids.shape[1]
    dev = torch.device(device)
    ones = torch.ones(batch_size, length + new_tokens, dtype=torch.long, device=dev)
    suppress = torch.zeros(geometry.text["vocab_size"], dtype=torch.bool)
    suppress[geometry.suppressed_ids] = True
    return VlmInputs(
        input_ids=ids.to(dev),
        attention_mask=ones[:, :length],
        media={k: v.to(device=dev, dtype=dtype) if v.is_floating_point() else v.to(dev) for k, v in media.items()},
        decode_masks=[ones[:, : length + t + 1] for t in range(new_tokens)],
        decode_positions=[geometry.decode_positions(length, t, batch_size).to(dev) for t in range(new_tokens)],
        suppress=suppress.to(dev),
        text_tokens=length - n_img,
        image_tokens=n_img,
    )


def prefill(model: torch.nn.Module, inputs: VlmInputs) -> Any:
    """The first forward of generation: prompt + image, cache on, logits of the last position."""
    return model(**inputs.batch, use_cache=True, logits_to_keep=1)


def decode(model: torch.nn.Module, inputs: VlmInputs, out: Any, steps: int | None = None) -> torch.Tensor:
    """``steps`` greedy single-token forwards on ``out``'s cache; returns the tokens fed."""
    cache, logits = out.cache, out.logits[:, -1]
    steps = len(inputs.decode_masks) if steps is None else steps
    fed = []
    for t in range(steps):
        tok = logits.masked_fill(inputs.suppress, float("-inf")).argmax(dim=-1, keepdim=True)
        fed.append(tok)
        o = model(input_ids=tok, attention_mask=inputs.decode_masks[t], position_ids=inputs.decode_positions[t],
                  cache=cache, use_cache=True, logits_to_keep=1)
        logits = o.logits[:, -1]
    return torch.cat(fed, dim=1)


def kv_cache_bytes(cache: Any) -> int | None:
    """Bytes held by a transformers cache's key/value tensors (None if unknown layout)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if not isinstance(t, torch.Tensor):
                return None
            total += t.numel() * t.element_size()
    return total

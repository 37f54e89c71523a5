"""The prompt a VLM's language model sees when a vision-side reduction leaves fewer
visual tokens than the processor emitted (LLaVA, Qwen-VL): the surplus placeholder
tokens are taken out of every row before layer 0 (rows right-aligned again, as the
processor left-padded them), and each later decoding step's 2-D attention mask is
mapped to that shorter prompt. The maps live on the pruned prompt stored on the cache
(``extra``: ``src0``, ``valid0``, ``removed``), so cached generations may interleave."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..core import keep_mask_to_indices
from . import hf_llm
from .vlm_handle import Forward, VlmPatch


def refuse_static_cache(kwargs: dict[str, Any]) -> None:
    """A static cache cannot take a prompt shorter than the processor's."""
    if getattr(kwargs.get("cache"), "is_compileable", False):
        raise ValueError(
            "a static cache sizes its masks for the processor's prompt, which the vision-side token "
            "reduction shortens; use a dynamic cache (the default) with this method"
        )


def shrink_rows(kwargs: dict[str, Any], keep0: torch.Tensor, fwd: Forward
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where every slot of the shortened rows comes from (``src [B, L']``, input
    positions, right-aligned), which slots are real (``valid``) and the shortened 2-D
    attention mask, always given: Qwen-VL's kept tokens keep full-grid positions, whose
    gaps transformers reads as packed sequences when a call has neither a mask nor a
    cache (``use_cache=False``). Records the maps on ``fwd``; the caller gathers its own
    inputs (ids, positions) through ``src``."""
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        raise ValueError(
            "a 4-D attention mask cannot follow the vision-side token reduction; pass a 2-D attention_mask "
            "(and a dynamic cache)"
        )
    src, valid = keep_mask_to_indices(keep0, align="right")
    new_mask = valid.long() if mask is None else torch.gather(mask, 1, src).masked_fill(~valid, 0)
    fwd.src0, fwd.valid0, fwd.removed = src, valid, (~keep0).sum(dim=1)
    return src, valid, new_mask


def run_index(visual: torch.Tensor, joined: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the image (video, tile) each visual token of ``visual [B, L]`` belongs to
    (maximal runs, row-major; the processors separate them: Qwen-VL's vision start/end
    tokens, LFM2-VL's tile markers), -1 elsewhere. ``joined``: tokens that may sit inside a
    video's run (the Omni processors interleave a video's audio with its frames,
    ``use_audio_in_video``); runs of those alone are no image."""
    span = visual if joined is None else visual | joined
    start = span & ~F.pad(span[:, :-1], (1, 0), value=False)
    run = start.flatten().long().cumsum(0).view_as(span) - 1
    if joined is not None and bool(visual.any()):
        has_visual = torch.zeros(int(run.max()) + 1, dtype=torch.long, device=run.device)
        has_visual[run[visual]] = 1
        run = (has_visual.cumsum(0) - 1)[run.clamp(min=0)]
    return run.masked_fill(~visual, -1)


def keep_last(input_ids: torch.Tensor, token_id: int, before: Sequence[int], after: Sequence[int]) -> torch.Tensor:
    """Keep mask ``[B, L]`` that shrinks every image's run of ``before[i]`` placeholder
    tokens to its last ``after[i]`` (images in prompt order, row after row, as the
    model assigns features to placeholders: the kept features fill the kept slots in
    order); other tokens are kept. The last ones, so that a prompt ending with its image
    keeps its last token, whose logits generation reads. The caller checks that the
    placeholders number ``sum(before)``."""
    flat = (input_ids == token_id).reshape(-1)
    pos = flat.nonzero().squeeze(1)
    if len(pos) != sum(before) or any(a > b for a, b in zip(after, before, strict=True)):
        raise ValueError(f"{len(pos)} placeholder tokens (id {token_id}) cannot shrink from {list(before)} to "
                         f"{list(after)} tokens per image")
    device = input_ids.device
    before_t = torch.tensor(list(before), dtype=torch.long, device=device)
    ends = before_t.cumsum(0)
    starts = ends - before_t
    rows = pos // input_ids.shape[1]
    nonempty = before_t > 0
    if not torch.equal(rows[starts[nonempty]], rows[ends[nonempty] - 1]):
        raise ValueError("the image tokens of one image span two prompts of the batch; check input_ids")
    image_of = torch.repeat_interleave(torch.arange(len(before), device=device), before_t)
    from_end = ends[image_of] - 1 - torch.arange(len(pos), device=device)
    keep = torch.ones_like(flat)
    keep[pos] = from_end < torch.tensor(list(after), dtype=torch.long, device=device)[image_of]
    return keep.reshape(input_ids.shape)


def begin_prefill(handle: VlmPatch, fwd: Forward, prunable: torch.Tensor, mask: Any = None) -> None:
    """Start the decoder pruner on the layer-0 sequence: ``prunable [B, L]`` flags the
    tokens it may drop (real slots only); their count per row is the tower's output.
    ``mask``: the call's 2-D attention mask over that sequence (its real tokens: a
    right-padded row's last one is not in the last column)."""
    if fwd.valid0 is not None:
        prunable = prunable & fwd.valid0
    fwd.tower_counts = prunable.sum(dim=1).cpu()
    real = mask.bool() if isinstance(mask, torch.Tensor) and mask.shape == prunable.shape else None
    if fwd.valid0 is not None:
        real = fwd.valid0 if real is None else real & fwd.valid0
    handle.pruner.begin_prefill(prunable, real)


def step_shape(kwargs: dict[str, Any]) -> tuple[int, int, torch.device]:
    """Rows, new tokens and device of a decoding step (ids or embeddings)."""
    x = kwargs.get("input_ids")
    x = kwargs["inputs_embeds"] if x is None else x
    return x.shape[0], x.shape[1], x.device


def continued_mask(prompt: hf_llm.PrunedPrompt, kwargs: dict[str, Any], past: int) -> torch.Tensor | None:
    """A decoding step's 2-D attention mask over the shortened prompt + every token
    after it (None when the call had none and no row of the prompt was shortened)."""
    src0, valid0 = prompt.extra["src0"], prompt.extra["valid0"]
    b, q, _ = step_shape(kwargs)
    length0, t = prompt.input_length, past - prompt.length
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != length0 + t + q:
            raise ValueError(
                f"attention_mask of shape {tuple(getattr(mask, 'shape', ()))} does not continue the pruned prompt "
                f"of {length0} input tokens + {t} generated; pass the full 2-D mask of the sequence so far (no 4-D "
                "masks or static caches with a vision-side reduction)"
            )
        head = torch.gather(mask[:, :length0], 1, src0).masked_fill(~valid0, 0)
        return torch.cat([head, mask[:, length0:]], dim=1)
    if not bool(valid0.all()):
        return torch.cat([valid0.long(), valid0.new_ones(b, t + q, dtype=torch.long)], dim=1)
    return None


def continue_prompt(handle: VlmPatch, module: torch.nn.Module, prompt: hf_llm.PrunedPrompt,
                    kwargs: dict[str, Any], past: int) -> dict[str, Any]:
    """A decoding step after a pruned prompt, for 1-D positions: the decoder pruner
    continues that prompt; the mask is mapped to the shortened prompt and positions
    count only the tokens that stayed."""
    handle.pruner.begin_continuation(prompt)
    if prompt.extra.get("src0") is None:
        return kwargs
    b, q, device = step_shape(kwargs)
    length0, t = prompt.input_length, past - prompt.length
    mask = continued_mask(prompt, kwargs, past)
    pos = kwargs.get("position_ids")
    if pos is None:
        start = length0 + t + handle.position_offset  # as the model numbers a step itself
        pos = torch.arange(start, start + q, device=device).expand(b, q)
    pos = pos.expand(b, q) - prompt.extra["removed"][:, None].to(pos.device)
    return dict(kwargs, attention_mask=mask, position_ids=pos)

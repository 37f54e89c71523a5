"""M-RoPE positions of pruned images, through vLLM's own ``recompute_mrope_positions``: the
kept tokens keep their full-grid positions and the text after the image keeps its unpruned
positions, for any kept subset and any grid shape; for Qwen2.5-VL's 4 position channels and
Qwen3-VL's 5. No engine needed."""

from __future__ import annotations

import pytest
import torch

from saint.integrations.vllm.qwen_common import media_positions

TEXT, START, END, IMAGE, VIDEO = 9, 3, 4, 5, 6


def unpruned(before: int, h: int, w: int, after: int) -> torch.Tensor:
    """Qwen2.5-VL's positions of ``before`` text tokens (the last one <|vision_start|>),
    an h x w image and ``after`` text tokens: the known answer."""
    text = torch.arange(before).expand(3, -1)
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([torch.zeros(h * w, dtype=torch.long), hh.flatten(), ww.flatten()]) + before
    tail = torch.arange(after).expand(3, -1) + before + max(h, w)
    return torch.cat([text, image, tail], dim=1)


def random_keep(h: int, w: int, share: float) -> torch.Tensor:
    n = h * w
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=torch.Generator().manual_seed(n))[: max(1, int(share * n))]] = True
    return keep


def pruned_prompt(before: int, k: int, after: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``before`` text tokens (the last one <|vision_start|>), ``k`` kept image
    tokens and ``after`` text tokens (the first one <|vision_end|>), and the text-only
    positions vLLM starts from."""
    ids = torch.tensor([TEXT] * (before - 1) + [START] + [IMAGE] * k + [END] + [TEXT] * (after - 1))
    return ids, torch.arange(len(ids)).expand(3, -1).clone()


def expected(before: int, h: int, w: int, after: int, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The unpruned positions of the kept columns, and the delta that makes decoding
    continue where the unpruned prompt would."""
    full = unpruned(before, h, w, after)
    columns = torch.cat([torch.ones(before, dtype=torch.bool), keep, torch.ones(after, dtype=torch.bool)])
    length = before + int(keep.sum()) + after
    return full[:, columns], int(full.max()) + 1 - length


GRIDS = [(8, 6), (6, 8), (5, 5), (1, 7)]
SHARES = [1.0, 0.5, 0.25]


@pytest.mark.parametrize("h, w", GRIDS)
@pytest.mark.parametrize("share", SHARES)
def test_kept_tokens_and_following_text_keep_unpruned_positions(h, w, share):
    from vllm.multimodal.video_prune.evs import recompute_mrope_positions

    before, after, keep = 4, 3, random_keep(h, w, share)
    ids, stale = pruned_prompt(before, int(keep.sum()), after)
    mm = media_positions([1, 2 * h, 2 * w], 2)[keep].T
    got, delta = recompute_mrope_positions(ids, [mm], stale, 0, START, IMAGE, VIDEO)
    want, want_delta = expected(before, h, w, after, keep)
    assert torch.equal(got, want)
    assert delta == want_delta


@pytest.mark.parametrize("h, w", GRIDS)
@pytest.mark.parametrize("share", SHARES)
def test_qwen3_vl_rows_give_unpruned_positions_and_lose_their_channels(h, w, share):
    from saint.integrations.vllm.qwen3_vl import image_position_channels, recompute_positions

    before, after, keep = 4, 3, random_keep(h, w, share)
    ids, stale = pruned_prompt(before, int(keep.sum()), after)
    features = torch.randn(int(keep.sum()), 16)
    rows = torch.cat([features, image_position_channels([1, 2 * h, 2 * w], 2)[keep].float()], dim=1)
    embeds, got, delta = recompute_positions(
        ids, [rows], stale, 0, vision_start_token_id=START, image_token_id=IMAGE,
        video_token_id=VIDEO,
    )
    want, want_delta = expected(before, h, w, after, keep)
    assert torch.equal(got, want)
    assert delta == want_delta
    assert len(embeds) == 1 and torch.equal(embeds[0], features)


def test_vllm_qwen3_vl_rule_shifts_the_text_after_an_image_without_its_last_row():
    """Why the Qwen3-VL override exists: vLLM's own 5-channel rule starts the text after an
    image at the largest kept offset + 1, so dropping a portrait image's last row moves
    every later token (the override keeps them where the unpruned prompt has them)."""
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

    before, after, h, w = 4, 3, 8, 6
    keep = torch.ones(h * w, dtype=torch.bool)
    keep[-w:] = False  # the last row
    ids, stale = pruned_prompt(before, int(keep.sum()), after)
    pos = media_positions([1, 2 * h, 2 * w], 2)
    vllm_rows = torch.cat([torch.randn(h * w, 16), pos[:, :3].float(), torch.zeros(h * w, 2)], 1)
    _, got, _ = Qwen3VLForConditionalGeneration._recompute_mrope_positions(
        ids, [vllm_rows[keep]], stale, 0, vision_start_token_id=START, image_token_id=IMAGE,
        video_token_id=VIDEO,
    )
    want, _ = expected(before, h, w, after, keep)
    tail = slice(before + int(keep.sum()), None)
    assert torch.equal(got[:, :tail.start], want[:, :tail.start])
    assert torch.equal(got[:, tail], want[:, tail] - 1)

"""M-RoPE positions of pruned images, through vLLM's own ``recompute_mrope_positions``: the
kept tokens keep their full-grid positions and the text after the image keeps its unpruned
positions, for any kept subset and any grid shape. No engine needed."""

from __future__ import annotations

import pytest
import torch

from saint.integrations.vllm.qwen2_5_vl import media_positions

TEXT, START, END, IMAGE, VIDEO = 9, 3, 4, 5, 6


def unpruned(before: int, h: int, w: int, after: int) -> torch.Tensor:
    """Qwen2.5-VL's positions of ``before`` text tokens (the last one <|vision_start|>),
    an h x w image and ``after`` text tokens: the known answer."""
    text = torch.arange(before).expand(3, -1)
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([torch.zeros(h * w, dtype=torch.long), hh.flatten(), ww.flatten()]) + before
    tail = torch.arange(after).expand(3, -1) + before + max(h, w)
    return torch.cat([text, image, tail], dim=1)


@pytest.mark.parametrize("h, w", [(8, 6), (6, 8), (5, 5), (1, 7)])
@pytest.mark.parametrize("share", [1.0, 0.5, 0.25])
def test_kept_tokens_and_following_text_keep_unpruned_positions(h, w, share):
    from vllm.multimodal.video_prune.evs import recompute_mrope_positions

    before, after, n = 4, 3, h * w
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=torch.Generator().manual_seed(h * w))[: max(1, int(share * n))]] = True
    k = int(keep.sum())
    ids = torch.tensor([TEXT] * (before - 1) + [START] + [IMAGE] * k + [END] + [TEXT] * (after - 1))
    stale = torch.arange(len(ids)).expand(3, -1).clone()  # what vLLM starts from: text-only
    mm = media_positions([1, 2 * h, 2 * w], 2)[keep].T
    got, delta = recompute_mrope_positions(ids, [mm], stale, 0, START, IMAGE, VIDEO)
    full = unpruned(before, h, w, after)
    columns = torch.cat([torch.ones(before, dtype=torch.bool), keep, torch.ones(after, dtype=torch.bool)])
    assert torch.equal(got, full[:, columns])
    assert delta == int(full.max()) + 1 - len(ids)  # decoding continues where unpruned would

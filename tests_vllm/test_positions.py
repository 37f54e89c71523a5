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


# ---------------------------------------------------------------------------- prompt positions
def image_feature(offset: int, k: int, h: int, w: int):
    """vLLM's record of an image of ``h x w`` merged tokens (2 x 2 merge) whose run of ``k``
    placeholders starts at ``offset``."""
    from vllm.multimodal.inputs import (
        MultiModalFeatureSpec,
        MultiModalFieldConfig,
        MultiModalFieldElem,
        MultiModalKwargsItem,
        PlaceholderRange,
    )

    grid = MultiModalFieldElem(data=torch.tensor([1, 2 * h, 2 * w]), field=MultiModalFieldConfig.batched("image").field)
    return MultiModalFeatureSpec(data=MultiModalKwargsItem({"image_grid_thw": grid}), modality="image",
                                 identifier=f"image{offset}", mm_position=PlaceholderRange(offset=offset, length=k))


def vllm_prompt_positions(family: str):
    """vLLM's own prompt positions of ``family`` (each image run read as its full grid), as
    ``fn(tokens, features) -> (positions [3, L], delta)``."""
    from functools import partial
    from types import SimpleNamespace

    import saint.integrations.vllm.qwen2_5_vl  # noqa: F401  (the torchvision shim vLLM's modules need)

    vision = SimpleNamespace(spatial_merge_size=2, tokens_per_second=1.0)
    config = SimpleNamespace(vision_config=vision, video_token_id=VIDEO, vision_start_token_id=START,
                             vision_end_token_id=END)
    if family == "qwen3_vl":
        from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

        return partial(Qwen3VLForConditionalGeneration._get_mrope_input_positions, config=config)
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as Model

    fake = SimpleNamespace(config=config)
    fake.iter_mm_grid_thw = partial(Model.iter_mm_grid_thw, fake)
    return partial(Model.get_mrope_input_positions, fake)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("share", SHARES)
def test_prompt_positions_with_two_pruned_images(family, share):
    """The prompt positions the runner starts from (``positions_with_pruned_images`` around
    vLLM's own, which reads every image run as its full grid): the text keeps its unpruned
    positions and decoding continues where the unpruned prompt would, before any image's
    embeddings are computed (a request whose images come from the prefix cache keeps these);
    after ``recompute_mrope_positions`` with both images' kept tokens, every position is the
    unpruned one. vLLM's own rule fails on two pruned images (the second run would start
    before the first one ends)."""
    from vllm.multimodal.video_prune.evs import recompute_mrope_positions

    from saint.integrations.vllm.qwen3_vl import image_position_channels, recompute_positions
    from saint.integrations.vllm.qwen_common import positions_with_pruned_images

    (h1, w1), (h2, w2) = (8, 6), (5, 7)
    keep1, keep2 = random_keep(h1, w1, share), random_keep(h2, w2, share)
    k1, k2 = int(keep1.sum()), int(keep2.sum())
    ids = torch.tensor([TEXT] * 3 + [START] + [IMAGE] * k1 + [END, TEXT, START] + [IMAGE] * k2 + [END, TEXT, TEXT])
    features = [image_feature(4, k1, h1, w1), image_feature(4 + k1 + 3, k2, h2, w2)]
    # the known answer: text, image 1 from 4, text from 4 + 8, image 2 from 15, text from 15 + 7
    grid1 = unpruned(4, h1, w1, 0)[:, 4:]
    grid2 = unpruned(15, h2, w2, 0)[:, 15:]
    full = torch.cat([torch.arange(4).expand(3, -1), grid1, torch.arange(12, 15).expand(3, -1), grid2,
                      torch.arange(22, 25).expand(3, -1)], dim=1)
    text = ids != IMAGE
    columns = torch.cat([torch.ones(4, dtype=torch.bool), keep1, torch.ones(3, dtype=torch.bool), keep2,
                         torch.ones(3, dtype=torch.bool)])
    want, want_delta = full[:, columns], 25 - len(ids)

    vllm_positions = vllm_prompt_positions(family)
    start, delta = positions_with_pruned_images(vllm_positions, ids.tolist(), features, 2)
    assert start.shape == want.shape and torch.equal(start[:, text], want[:, text])
    assert delta == want_delta
    if share == 1.0:
        assert torch.equal(start, vllm_positions(ids.tolist(), features)[0])
    else:
        with pytest.raises(ValueError, match="non-negative"):
            vllm_positions(ids.tolist(), features)

    tokens = dict(vision_start_token_id=START, image_token_id=IMAGE, video_token_id=VIDEO)
    if family == "qwen2_5_vl":
        mm = [media_positions([1, 2 * h1, 2 * w1], 2)[keep1].T, media_positions([1, 2 * h2, 2 * w2], 2)[keep2].T]
        got, delta = recompute_mrope_positions(ids, mm, start, 0, **tokens)
    else:
        rows = [torch.cat([torch.randn(int(keep.sum()), 16), image_position_channels([1, 2 * h, 2 * w], 2)[keep].float()],
                          dim=1) for keep, h, w in ((keep1, h1, w1), (keep2, h2, w2))]
        _, got, delta = recompute_positions(ids, rows, start, 0, **tokens)
    assert torch.equal(got, want)
    assert delta == want_delta

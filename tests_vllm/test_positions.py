"""M-RoPE positions of pruned images, through the overrides' ``recompute_mrope_positions``
(``qwen_common.recompute_media_positions``): the kept tokens keep their full-grid positions
and the text after the image keeps its unpruned positions, for any kept subset and any grid
shape, two images behind a short or a long text, in chunks or after a cached image; for
Qwen2.5-VL's 4 position channels and Qwen3-VL's 5; an Omni prompt's audio clip before a
pruned image. No engine needed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from saint.integrations.vllm.qwen_common import (
    media_positions,
    media_token_ids,
    recompute_media_positions,
    refuse_touching_media,
)

TEXT, START, END, IMAGE, VIDEO = 9, 3, 4, 5, 6
AUDIO_START, AUDIO = 7, 8


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
    before, after, keep = 4, 3, random_keep(h, w, share)
    ids, stale = pruned_prompt(before, int(keep.sum()), after)
    mm = media_positions([1, 2 * h, 2 * w], 2)[keep].T
    got, delta = recompute_media_positions(ids, [mm], stale, 0, (IMAGE, VIDEO))
    want, want_delta = expected(before, h, w, after, keep)
    assert torch.equal(got, want)
    assert delta == want_delta


def rows_of(keep: torch.Tensor, h: int, w: int, channels) -> torch.Tensor:
    """An image's kept rows as the model returns them: features, then its position channels."""
    return torch.cat([torch.randn(int(keep.sum()), 16), channels([1, 2 * h, 2 * w], 2)[keep].float()], dim=1)


def saint_model(channels: int):
    """What the overrides' ``recompute_mrope_positions`` reads of its model."""
    from types import SimpleNamespace

    from saint.integrations.vllm.qwen_common import SaintImagePruningMixin

    model = SimpleNamespace(saint=object(), saint_channels=channels,
                            config=SimpleNamespace(image_token_id=IMAGE, video_token_id=VIDEO))
    model.saint_media_token_ids = lambda: SaintImagePruningMixin.saint_media_token_ids(model)
    return model


@pytest.mark.parametrize("h, w", GRIDS)
@pytest.mark.parametrize("share", SHARES)
def test_qwen3_vl_rows_give_unpruned_positions_and_lose_their_channels(h, w, share):
    from saint.integrations.vllm.qwen3_vl import POSITION_CHANNELS, image_position_channels
    from saint.integrations.vllm.qwen_common import SaintImagePruningMixin

    before, after, keep = 4, 3, random_keep(h, w, share)
    ids, stale = pruned_prompt(before, int(keep.sum()), after)
    rows = rows_of(keep, h, w, image_position_channels)
    embeds, got, delta = SaintImagePruningMixin.recompute_mrope_positions(
        saint_model(POSITION_CHANNELS), input_ids=ids.tolist(), multimodal_embeddings=[rows], mrope_positions=stale,
        num_computed_tokens=0)
    want, want_delta = expected(before, h, w, after, keep)
    assert torch.equal(got, want)
    assert delta == want_delta
    assert len(embeds) == 1 and torch.equal(embeds[0], rows[:, :16])


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


def two_image_prompt(before: int, share: float):
    """``before`` text tokens (the last one <|vision_start|>), an 8 x 6 image, 3 text tokens, a
    5 x 7 image and 3 text tokens, each image cut to ``share``: the ids, the image features,
    their keep masks and grids, and the known answer (the unpruned positions of the kept
    columns, and the decoding offset)."""
    (h1, w1), (h2, w2) = (8, 6), (5, 7)
    keep1, keep2 = random_keep(h1, w1, share), random_keep(h2, w2, share)
    k1, k2 = int(keep1.sum()), int(keep2.sum())
    ids = torch.tensor([TEXT] * (before - 1) + [START] + [IMAGE] * k1 + [END, TEXT, START] + [IMAGE] * k2
                       + [END, TEXT, TEXT])
    features = [image_feature(before, k1, h1, w1), image_feature(before + k1 + 3, k2, h2, w2)]
    # text, image 1 from `before`, text from before + 8, image 2 from before + 11, text from before + 18
    second = before + max(h1, w1) + 3
    full = torch.cat([torch.arange(before).expand(3, -1), unpruned(before, h1, w1, 0)[:, before:],
                      torch.arange(before + 8, second).expand(3, -1), unpruned(second, h2, w2, 0)[:, second:],
                      torch.arange(second + 7, second + 10).expand(3, -1)], dim=1)
    columns = torch.cat([torch.ones(before, dtype=torch.bool), keep1, torch.ones(3, dtype=torch.bool), keep2,
                         torch.ones(3, dtype=torch.bool)])
    return ids, features, ((keep1, h1, w1), (keep2, h2, w2)), (full[:, columns], second + 10 - len(ids))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("before", [4, 20])  # 20: more text before the first image than it keeps tokens
def test_prompt_positions_with_two_pruned_images(family, share, before):
    """The prompt positions the runner starts from (``positions_with_pruned_images`` around
    vLLM's own, which reads every image run as its full grid): the text keeps its unpruned
    positions and decoding continues where the unpruned prompt would, before any image's
    embeddings are computed (a request whose images come from the prefix cache keeps these);
    after ``recompute_mrope_positions`` with both images' kept tokens, every position is the
    unpruned one. vLLM's own rule fails on two pruned images (the second run would start
    before the first one ends)."""
    from saint.integrations.vllm.qwen3_vl import POSITION_CHANNELS, image_position_channels
    from saint.integrations.vllm.qwen_common import SaintImagePruningMixin
    from saint.integrations.vllm.qwen_common import (
        positions_with_pruned_images as with_pruned_images,
    )

    ids, features, images, (want, want_delta) = two_image_prompt(before, share)
    text = ids != IMAGE
    vllm_positions = vllm_prompt_positions(family)
    start, delta = with_pruned_images(vllm_positions, ids.tolist(), features, 2)
    assert start.shape == want.shape and torch.equal(start[:, text], want[:, text])
    assert delta == want_delta
    if share == 1.0:
        assert torch.equal(start, vllm_positions(ids.tolist(), features)[0])
    else:
        with pytest.raises(ValueError, match="non-negative"):
            vllm_positions(ids.tolist(), features)

    channels, c = (media_positions, 4) if family == "qwen2_5_vl" else (image_position_channels, POSITION_CHANNELS)
    rows = [rows_of(keep, h, w, channels) for keep, h, w in images]
    _, got, delta = SaintImagePruningMixin.recompute_mrope_positions(
        saint_model(c), input_ids=ids.tolist(), multimodal_embeddings=rows, mrope_positions=start,
        num_computed_tokens=0)
    assert torch.equal(got, want)
    assert delta == want_delta


@pytest.mark.parametrize("before", [4, 20])
def test_positions_in_chunks_and_after_a_cached_image(before):
    """The runner hands ``recompute_mrope_positions`` the media of each step's tokens only: a
    chunk that ends inside an image (its first rows, then the rest with the second image), or
    a request whose first image came from the prefix cache (the second image alone, computed
    tokens past the first). Each way ends at the unpruned positions."""
    ids, features, images, (want, want_delta) = two_image_prompt(before, 0.5)
    start, _ = positions_with_pruned_images_qwen(ids, features)
    (keep1, h1, w1), (keep2, h2, w2) = images
    mm1 = media_positions([1, 2 * h1, 2 * w1], 2)[keep1].T
    mm2 = media_positions([1, 2 * h2, 2 * w2], 2)[keep2].T
    split = before + 5  # the first chunk ends after 5 of image 1's tokens
    first, _ = recompute_media_positions(ids, [mm1[:, :5]], start, 0, (IMAGE, VIDEO))
    got, delta = recompute_media_positions(ids, [mm1[:, 5:], mm2], first, split, (IMAGE, VIDEO))
    assert torch.equal(got, want) and delta == want_delta
    cached = before + len(keep1.nonzero()) + 2  # image 1 and the text after it came from the cache
    got, delta = recompute_media_positions(ids, [mm2], want.clone(), cached, (IMAGE, VIDEO))
    assert torch.equal(got, want) and delta == want_delta


def test_vllm_evs_helper_misplaces_a_second_image_behind_a_long_text():
    """Why the overrides carry their own position rewrite: vLLM's EVS helper steps from one
    image to the next by the image's length only, so with more text before the first image
    than it keeps tokens (20 > 12: a system prompt) it writes the second image over the
    first one's slots."""
    from vllm.multimodal.video_prune.evs import recompute_mrope_positions

    ids, features, images, (want, _) = two_image_prompt(20, 0.25)
    start, _ = positions_with_pruned_images_qwen(ids, features)
    mm = [media_positions([1, 2 * h, 2 * w], 2)[keep].T for keep, h, w in images]
    got, _ = recompute_mrope_positions(ids, mm, start, 0, START, IMAGE, VIDEO)
    first = slice(20, 20 + len(images[0][0].nonzero()))
    assert not torch.equal(got[:, first], want[:, first])
    assert torch.equal(recompute_media_positions(ids, mm, start, 0, (IMAGE, VIDEO))[0], want)


def positions_with_pruned_images_qwen(ids: torch.Tensor, features: list):
    from saint.integrations.vllm.qwen_common import positions_with_pruned_images

    return positions_with_pruned_images(vllm_prompt_positions("qwen2_5_vl"), ids.tolist(), features, 2)


@pytest.mark.parametrize("share", SHARES)
def test_audio_before_a_pruned_image_keeps_every_unpruned_position(share):
    """An Omni prompt: text, an audio clip of 7 tokens (one position each, in all three
    channels), text, a pruned 6 x 8 image, text. The audio rows' channels
    (``qwen_omni.audio_positions``) and the image's give every token its unpruned position."""
    from saint.integrations.vllm.qwen_omni import audio_positions

    audio, before, h, w, after = 7, 4, 6, 8, 3
    keep = random_keep(h, w, share)
    ids = torch.tensor([TEXT, TEXT, AUDIO_START] + [AUDIO] * audio + [TEXT] * (before - 1) + [START]
                       + [IMAGE] * int(keep.sum()) + [END] + [TEXT] * (after - 1))
    stale = torch.arange(len(ids)).expand(3, -1).clone()
    head = 3 + audio  # the text and audio before the image's own text, at one position per token
    rows = [torch.cat([torch.randn(audio, 16), audio_positions(audio).float()], dim=1),
            rows_of(keep, h, w, media_positions)]
    model = saint_model(4)
    model.config.audio_token_id = AUDIO  # an Omni thinker's config: the audio token is a media token
    from saint.integrations.vllm.qwen_common import SaintImagePruningMixin

    _, got, delta = SaintImagePruningMixin.recompute_mrope_positions(
        model, input_ids=ids.tolist(), multimodal_embeddings=rows, mrope_positions=stale, num_computed_tokens=0)
    want, want_delta = expected(before, h, w, after, keep)
    assert torch.equal(got[:, :head], torch.arange(head).expand(3, -1))
    assert torch.equal(got[:, head:], want + head)
    assert delta == want_delta


def test_media_items_whose_placeholders_touch_are_refused_before_processing():
    """Two images inside one vision_start/vision_end pair: their runs touch, the position
    rewrite would take them for one item (a different answer at ratio 1.0). The processor
    refuses such a prompt in the front end; separated items, or one already expanded run
    per item, pass."""
    ids = media_token_ids(SimpleNamespace(image_token_id=IMAGE, video_token_id=VIDEO, audio_token_index=AUDIO))
    assert ids == {IMAGE, VIDEO, AUDIO}
    refuse_touching_media([TEXT, START, IMAGE, END, START, IMAGE, END, TEXT], ids, items=2)
    refuse_touching_media([TEXT, START, IMAGE, IMAGE, IMAGE, END, TEXT], ids, items=1)  # one expanded run
    for touching in ([START, IMAGE, IMAGE, END], [START, IMAGE, VIDEO, END], [AUDIO, IMAGE, TEXT]):
        with pytest.raises(ValueError, match="2 media items but 1 runs of media placeholders"):
            refuse_touching_media([TEXT, *touching, TEXT], ids, items=2)

"""Qwen2.5-Omni's thinker: what its audio adds to the Qwen-VL adapter. Audio tokens are never
dropped, prompts that mix audio and images prune as each prompt alone, and a video whose audio
the processor interleaves with its frames (``use_audio_in_video``) is one image for the
statistics and keeps its full-grid positions (the family's other tests run in
tests/test_qwen_vl.py)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .qwen_tiny import AUD, IMG, OMNI, VID, audio_tokens, inputs, make, rope_index, tokens  # noqa: E402
from .test_qwen_vl import CONFIGS, NOTHING, gen, logits  # noqa: E402

AUDIO_ROWS = [[2, ("audio", 20), 1, ("image", (1, 8, 8)), 3], [1, ("image", (1, 8, 12)), 2, ("audio", 28), 2]]
VIDEO_AUDIO = [2, ("video+audio", (2, 8, 8), 20), 3]


@pytest.mark.parametrize("family", OMNI)
@pytest.mark.parametrize("name", sorted(NOTHING))
def test_pruning_nothing_with_audio_is_identical_to_unpatched(family, name):
    model = make(family)
    x = inputs(AUDIO_ROWS, family=family)
    ref, ref_ids = logits(model, x), gen(model, x)
    saint.patch(model, **NOTHING[name])
    assert torch.equal(logits(model, x), ref)
    assert torch.equal(gen(model, x), ref_ids)


@pytest.mark.parametrize("family", OMNI)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_audio_tokens_stay_and_each_prompt_prunes_as_alone(family, name):
    """Every method drops image tokens only: the audio tokens all reach the last layer, and
    each prompt of a batch mixing audio and images of different sizes gets what it gets alone."""
    model = make(family)
    saint.patch(model, **CONFIGS[name])
    x = inputs(AUDIO_ROWS, family=family)
    ids, last = gen(model, x), logits(model, x)[:, -1]
    kept = get_handle(model).kept_input
    audio = x["input_ids"] == AUD
    assert int(audio.sum()) == audio_tokens(20, family) + audio_tokens(28, family)
    assert bool(kept[audio].all())
    dropped = ~kept & x["attention_mask"].bool()
    assert bool(dropped.any()) and bool((x["input_ids"][dropped] == IMG).all())
    solo = [inputs([r], seeds=[i], family=family) for i, r in enumerate(AUDIO_ROWS)]
    assert torch.equal(ids, torch.cat([gen(model, xi) for xi in solo]))
    torch.testing.assert_close(last, torch.cat([logits(model, xi)[:, -1] for xi in solo]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", OMNI)
def test_a_video_with_interleaved_audio_is_one_image_and_keeps_its_positions(family):
    """use_audio_in_video: the video's frames and its audio alternate by the second inside one
    pair of vision start / end tokens. vit mode keeps round(0.5 x 16) groups of each frame
    group, counted as one video; the kept tokens and the audio keep the positions
    get_rope_index gives the full prompt; cached decoding equals uncached."""
    model = make(family)
    x = inputs([VIDEO_AUDIO], family=family)
    assert x["use_audio_in_video"] is True
    ids = x["input_ids"][0]
    assert int((ids == VID).sum()) == 2 * tokens((1, 8, 8)) and int((ids == AUD).sum()) == audio_tokens(20, family)
    video = (ids == VID).nonzero().squeeze(1)
    assert int(video[-1] - video[0]) + 1 > len(video)  # audio sits between the frames
    ref = gen(model, x)
    saint.patch(model, **NOTHING["vit"])
    assert torch.equal(gen(model, x), ref)
    saint.unpatch(model)

    full, _ = rope_index(model, x)
    saint.patch(model, mode="vit", vit_layer=1, vit_ratio=0.5)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"][-3:].clone()), with_kwargs=True)
    out = gen(model, x)
    hook.remove()
    stats = get_handle(model).image_stats()
    assert stats.tokens == [[32], [16], [16]]
    kept = get_handle(model).kept_input[0]
    assert bool(kept[ids == AUD].all()) and int(kept[ids == VID].sum()) == 16
    assert torch.equal(seen[0][:, 0], full[:, 0, kept])
    assert torch.equal(out, gen(model, x, use_cache=False))


@pytest.mark.parametrize("family", OMNI)
def test_splitting_follows_each_video_and_refuses_audio(family):
    """The protocol's split hands each prompt its videos' seconds per grid (the M-RoPE time
    step), and refuses to split audio, whose features it cannot assign to prompts."""
    adapter = saint.adapters.find_adapter(make(family))
    rows = [[1, ("video", (2, 8, 8)), 2], [2, ("image", (1, 8, 8)), 1], [1, ("video", (1, 4, 8)), 3]]
    x = inputs(rows, family=family)
    x["video_second_per_grid"] = torch.tensor([0.5, 2.0])
    x["mm_token_type_ids"] = (x["input_ids"] == IMG).int() + 2 * (x["input_ids"] == VID).int()
    parts = list(adapter.split(x, 1))
    assert [p["video_second_per_grid"].tolist() for p in parts] == [[0.5], [], [2.0]]
    with pytest.raises(ValueError, match="with audio"):
        list(adapter.split(inputs(AUDIO_ROWS, family=family), 1))


@pytest.mark.parametrize("name", ["Qwen2_5OmniForConditionalGeneration", "Qwen3OmniMoeForConditionalGeneration"])
def test_the_whole_omni_model_is_refused_with_its_thinker_named(name):
    """Qwen2_5OmniForConditionalGeneration's talker reads the thinker's hidden states at every
    prompt position: the error names the thinker to patch instead (checked by class name, as
    the registry does; the whole model's talker and vocoder are too large to build here)."""
    whole = type(name, (torch.nn.Module,), {})()
    with pytest.raises(TypeError, match=r"saint\.patch\(model\.thinker"):
        saint.patch(whole, "saint", mode="vit")

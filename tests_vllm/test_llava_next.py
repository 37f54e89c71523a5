"""LLaVA-NeXT (also as Granite Vision 3.x: a Granite LM reading two tower layers) and
LLaVA-OneVision (tiny, random, anyres: a 112 px base view plus up to 2 x 2
crops, the crop grid's rows ended by a newline): pruning off equals transformers; SAINT
keeping a quarter feeds the LLM a quarter of the base view and a quarter of the grid plus
every newline, chosen and decoded as transformers does on the same kept set; OneVision
pruning with videos allowed is refused at start."""

from __future__ import annotations

import json

import pytest
from conftest import EngineFailed, assert_same_greedy_decoding
from reference import transformers_anyres_scores


@pytest.mark.parametrize("family, fixture", [("llava_next", "llava_next_dir"),
                                             ("llava_onevision", "llava_onevision_dir"),
                                             ("llava_next", "granite_vision_dir")])  # Granite Vision 3.x
@pytest.mark.parametrize("ratio", [None, 0.25])
def test_anyres_image_tokens_and_outputs(request, run_engine, image_path, family, fixture, ratio):
    model_dir = request.getfixturevalue(fixture)
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(model_dir, image_path, overrides)
    image_token = json.loads((model_dir / "config.json").read_text())["image_token_index"]
    ref = transformers_anyres_scores(model_dir, image_path, got["prompt_token_ids"], got["token_ids"],
                                     ratio or 1.0, family)
    # The 224 x 168 portrait: a 2 x 1 crop grid of 8 x 8 tokens unpadded to 16 rows of 12, a newline each.
    assert (ref["base"], ref["newlines"]) == (64, [16])
    expected = 64 + 16 * 12 + 16 if ratio is None else 16 + 48 + 16
    assert got["prompt_token_ids"].count(image_token) == expected
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])


def test_onevision_pruning_with_videos_fails_at_engine_start(run_engine, llava_onevision_dir, image_path):
    with pytest.raises(EngineFailed) as err:
        run_engine(llava_onevision_dir, image_path, {"saint_keep_ratio": 0.25}, engine={"limit_mm_per_prompt": {"image": 1}})
    assert "SAINT pruning of LLaVA-OneVision serves images only" in err.value.output


def test_anyres_keep_mask_keeps_newlines_and_refuses_other_layouts():
    """On a hand-built image (4 base tokens, 3 rows of 5 grid tokens each ended by the
    newline): a quarter of the base view and of the grid, every newline; a layout whose
    rows differ in length, or without newlines, is refused."""
    import torch

    from saint.integrations.vllm.llava_next import anyres_keep_mask
    from saint.integrations.vllm.settings import SaintSettingsError, SaintVllmSettings

    torch.manual_seed(0)
    newline = torch.full((8,), 7.0)
    rows = [torch.cat([torch.randn(5, 8), newline[None]]) for _ in range(3)]
    embeds = torch.cat([torch.randn(4, 8), *rows])
    keep = anyres_keep_mask(embeds, newline, 4, SaintVllmSettings(0.25))
    assert keep[:4].sum() == 1 and keep[4:][torch.arange(18) % 6 != 5].sum() == 4  # round(0.25 * 15)
    assert keep[4:][torch.arange(18) % 6 == 5].all()
    alone = anyres_keep_mask(torch.cat([embeds[:4], newline[None]]), newline, 4, SaintVllmSettings(0.25))
    assert alone.tolist() == keep[:4].tolist() + [True]  # the base view alone, then its newline
    uneven = torch.cat([embeds[:9], embeds[10:]])  # the first row loses a token
    for bad in (uneven, torch.randn(22, 8)):
        with pytest.raises(SaintSettingsError, match="LLaVA-NeXT's layout"):
            anyres_keep_mask(bad, newline, 4, SaintVllmSettings(0.25))

"""Mistral 3 (tiny, random: a Pixtral tower, 16 px patches merged 2 x 2, at most 128 px; the
portrait image gives 4 rows of 3 tokens) and a Pixtral-based LLaVA (the same tower unmerged:
8 rows of 6): pruning off equals transformers; SAINT keeping half feeds half of every row to
the LLM, every row still ended by its break token, chosen and decoded as transformers does
on the same kept set."""

from __future__ import annotations

import json

import pytest
from conftest import assert_same_greedy_decoding
from reference import transformers_mistral3_scores


@pytest.mark.parametrize("checkpoint, ratio, rows, columns, per_row", [
    ("mistral3_dir", None, 4, 3, 3), ("mistral3_dir", 0.5, 4, 3, 2), ("llava_pixtral_dir", None, 8, 6, 6),
    ("llava_pixtral_dir", 0.5, 8, 6, 3),
])
def test_mistral3_rows_and_outputs(run_engine, request, image_path, checkpoint, ratio, rows, columns, per_row):
    model_dir = request.getfixturevalue(checkpoint)
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    got = run_engine(model_dir, image_path, overrides)
    config = json.loads((model_dir / "config.json").read_text())
    image_token = config["image_token_index"]
    ref = transformers_mistral3_scores(model_dir, image_path, got["prompt_token_ids"], got["token_ids"],
                                       ratio or 1.0)
    assert (ref["rows"], ref["columns"]) == (rows, columns)
    ids = got["prompt_token_ids"]
    first = ids.index(image_token)
    image = ids[first : first + ref["rows"] * (per_row + 1)]
    ends = image[per_row :: per_row + 1]  # every row: per_row image tokens, then its break (the last: the end)
    assert image.count(image_token) == ref["rows"] * per_row and len(set(ends)) == 2 and image_token not in ends
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])


def test_kept_rows_cuts_every_row_and_keeps_its_end():
    from saint.integrations.vllm.rows import kept_rows
    from saint.integrations.vllm.settings import SaintVllmSettings

    row = [5] * 5
    assert kept_rows([*row, 9, *row, 9, *row, 7], 5, SaintVllmSettings(0.5)) == [5, 5, 5, 9] * 2 + [5, 5, 5, 7]
    assert kept_rows([5, 9, 5, 7], 5, SaintVllmSettings(0.1)) == [5, 9, 5, 7]  # at least one per row

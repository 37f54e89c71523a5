"""InternVL (tiny, random), in the transformers format that vLLM serves with its InternS1
classes and in the remote-code format (``InternVLChatModel``, the same weights): pruning
off equals transformers; SAINT keeping a quarter of every tile's 16 context tokens feeds 4
per tile to the LLM, chosen and decoded as transformers does on the same kept set; pruning
with videos allowed is refused at start."""

from __future__ import annotations

import json

import pytest
from conftest import EngineFailed, assert_same_greedy_decoding
from reference import transformers_internvl_scores


@pytest.mark.parametrize("ratio, per_tile", [(None, 16), (0.25, 4)])
@pytest.mark.parametrize("checkpoint", ["internvl_dir", "internvl_chat_dir"])
def test_internvl_image_tokens_and_outputs(run_engine, request, internvl_dir, image_path, checkpoint, ratio, per_tile):
    overrides = {} if ratio is None else {"saint_keep_ratio": ratio}
    # The remote-code format, pruned, as vllm serve runs it: its config class and the plugin
    # load in the engine core's own process.
    processes = checkpoint == "internvl_chat_dir" and ratio is not None
    got = run_engine(request.getfixturevalue(checkpoint), image_path, overrides, processes=processes)
    image_token = json.loads((internvl_dir / "config.json").read_text())["image_token_id"]
    ref = transformers_internvl_scores(internvl_dir, image_path, got["prompt_token_ids"], got["token_ids"],
                                       ratio or 1.0)
    (tiles,) = ref["tiles"]
    assert tiles > 1  # the portrait image is cropped into tiles: every tile keeps its own share
    assert got["prompt_token_ids"].count(image_token) == per_tile * tiles
    assert got["kept"] == ([] if ratio is None else ref["kept"])
    assert_same_greedy_decoding(got, ref["logprobs"])


@pytest.mark.parametrize("checkpoint", ["internvl_dir", "internvl_chat_dir"])
def test_internvl_pruning_with_videos_fails_at_engine_start(run_engine, request, image_path, checkpoint):
    with pytest.raises(EngineFailed) as err:
        run_engine(request.getfixturevalue(checkpoint), image_path, {"saint_keep_ratio": 0.25}, engine={"limit_mm_per_prompt": {"image": 1}})
    assert "SAINT pruning of InternVL serves images only" in err.value.output


def test_chat_format_processor_pixels_equal_transformers(internvl_dir, image_path):
    """vLLM's own InternVL processor (imported by the plugin against its PIL stand-in of
    torchvision's transforms, which nothing else sees) tiles and normalizes the test image
    exactly as transformers' GOT-OCR2 processor of the transformers-format checkpoint."""
    import sys

    import torch
    from PIL import Image
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    import saint.integrations.vllm.internvl  # noqa: F401  (imports vLLM's InternVL processor first)

    assert "torchvision" not in sys.modules
    InternVLImageProcessor = sys.modules["vllm.transformers_utils.processors.internvl"].InternVLImageProcessor
    image = Image.open(image_path).convert("RGB")
    ours = InternVLImageProcessor(image_size=64, min_dynamic_patch=1, max_dynamic_patch=4, dynamic_image_size=True,
                                  use_thumbnail=True)(images=[image], return_tensors="pt")
    ref = GotOcr2ImageProcessorPil.from_pretrained(internvl_dir)(images=[image], return_tensors="pt")
    assert ours["image_num_patches"].tolist() == ref["num_patches"].tolist() == [5]
    assert torch.equal(ours["pixel_values_flat"], ref["pixel_values"])

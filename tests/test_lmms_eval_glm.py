"""lmms-eval's ``saint_glm4v`` model on a tiny random GLM-4.1V saved to disk with an offline
processor (a tokenizer trained here with GLM's special tokens, GLM-4.1V's image and video
processors): request batching, pruning of both request kinds, videos (frames held in image
tokens, told apart by the video's start and end tokens) batched beside images, lmms-eval's
own command line, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .lmms_helpers import (
    assert_alone_equals_batched,
    continuation_loss,
    easy_vqa_docs,
    gen_requests,
    ll_requests,
    make_lm,
    need,
    run_cli,
    train_tokenizer,
)
from .test_lmms_eval_qwen import (
    N_IMAGE_TOKENS,
    N_VIDEO_TOKENS,
    PRUNE_ARGS,
    VIDEO_ARGS,
    video_requests,
    write_clip,
)

SPECIAL = ["<pad>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|image|>", "<|end_of_image|>",
           "<|begin_of_video|>", "<|video|>", "<|end_of_video|>", "[gMASK]", "<sop>"]


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory, one_thread) -> Path:
    """A tiny GLM-4.1V: 32 px images (8 x 8 patches of 4 px, merged 2 x 2), videos of up to 4
    frames of 32 px, a 6-layer LM with half-rotary M-RoPE."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny_glm4v")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(SPECIAL, ["user assistant system"]), pad_token="<pad>", eos_token="<|user|>")
    # GLM's resize counts both frames of a temporal patch: 2 x 32 x 32 pixels keeps an image at 32 px
    image_processor = transformers.Glm4vImageProcessor(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 2 * 32 * 32})
    video_processor = transformers.Glm4vVideoProcessor(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 4 * 32 * 32})
    transformers.Glm4vProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=video_processor).save_pretrained(path)
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token", "<|image|>"), ("video_token", "<|video|>"), ("image_start_token", "<|begin_of_image|>"),
        ("image_end_token", "<|end_of_image|>"), ("video_start_token", "<|begin_of_video|>"),
        ("video_end_token", "<|end_of_video|>"))}
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, in_channels=3, image_size=32)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                eos_token_id=tokenizer.eos_token_id,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2],
                                     partial_rotary_factor=0.5))
    torch.manual_seed(0)
    config = transformers.Glm4vConfig(vision_config=vision, text_config=text, **ids)
    transformers.Glm4vForConditionalGeneration(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(glm_dir):
    return make_lm("SaintGlm4v", glm_dir, PRUNE_ARGS, easy_vqa_docs(5))


def test_entry_point_resolves_saint_glm4v():
    need("lmms_eval")
    import lmms_eval.models

    from saint.integrations.lmms_glm import SaintGlm4v

    assert lmms_eval.models.get_model("saint_glm4v") is SaintGlm4v


def test_both_request_kinds_are_pruned_and_batches_equal_single_requests(lm):
    import saint

    docs = lm.task_dict["t"]["test"]
    assert saint.is_patched(lm.model) and lm.model.__dict__["_saint_patch"].family == "glm4v"
    lm.pruning_log.clear()
    gen, ll = gen_requests(docs), ll_requests(docs)
    batched = (lm.generate_until(gen), lm.loglikelihood(ll))
    assert {e["request"] for e in lm.pruning_log} == {"generate_until", "loglikelihood"}
    for e in lm.pruning_log:
        assert e["image_tokens"] == [N_IMAGE_TOKENS] * len(e["image_tokens"])
        assert e["video_tokens"] == [0] * len(e["image_tokens"])
        assert e["llm_input"] == [N_IMAGE_TOKENS // 2] * len(e["image_tokens"])  # vit_ratio 0.5 in the tower
        assert all(o < N_IMAGE_TOKENS // 2 for o in e["llm_output"])  # and SAINT inside the language model
    assert_alone_equals_batched(lm, gen, ll, batched)


def test_lmms_eval_cli_end_to_end(glm_dir, tmp_path):
    """``python -m lmms_eval --model saint_glm4v ...`` completes and prunes both kinds of request."""
    import json

    need("lmms_eval")
    results, (stats,) = run_cli("saint_glm4v", glm_dir, PRUNE_ARGS, tmp_path, 3, timeout=300)
    assert 0.0 <= results["saint_easyvqa_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["saint_easyvqa_mc"]["acc,none"] <= 1.0
    summary = json.loads(stats.read_text().splitlines()[-1])["summary"]
    for kind in ("generate_until", "loglikelihood"):
        s = summary[kind]
        assert s["image_tokens"] == N_IMAGE_TOKENS and s["video_tokens"] == 0
        assert s["llm_input"] == N_IMAGE_TOKENS // 2 and s["llm_output"] < N_IMAGE_TOKENS // 2


def test_loglikelihood_is_the_patched_models_loss(lm):
    req = ll_requests(lm.task_dict["t"]["test"][:1])[0]
    (result,) = lm.loglikelihood([req])
    ids, n, media = lm._loglikelihood_row(req)
    assert result[0] == pytest.approx(continuation_loss(lm, ids, n, media), abs=1e-5)


@pytest.fixture(scope="module")
def video_docs(tmp_path_factory) -> list[dict]:
    """Two video documents between two image ones (one batch of each request kind)."""
    root = tmp_path_factory.mktemp("clips")
    images = easy_vqa_docs(2)
    return [images[0], {"question": "What moves in the video?", "answer": "square",
                        "video": write_clip(root / "a.mp4")},
            {"question": "Which color?", "answer": "red", "video": write_clip(root / "b.mp4", shift=8)}, images[1]]


def test_videos_beside_images_are_pruned_per_frame_group_and_batches_equal_single_requests(glm_dir, video_docs):
    """A batch of two image and two video requests runs as one forward per modality; each
    video's 4 frames (2 frame groups, each an image-token run with its timestamp) keep half
    their tokens in the tower, and each request alone gets what it got in its batch."""
    video_lm = make_lm("SaintGlm4v", glm_dir, VIDEO_ARGS, video_docs)
    gen, ll = video_requests(video_docs)
    batched = (video_lm.generate_until(gen), video_lm.loglikelihood(ll))
    seen = set()
    for e in video_lm.pruning_log:  # every forward holds one modality
        kinds = {(image, video) for image, video in zip(e["image_tokens"], e["video_tokens"], strict=True)}
        assert kinds in ({(N_IMAGE_TOKENS, 0)}, {(0, N_VIDEO_TOKENS)})
        assert e["llm_input"] == [(image + video) // 2 for image, video in zip(e["image_tokens"], e["video_tokens"],
                                                                             strict=True)]
        seen |= {(e["request"], kind) for kind in kinds}
    assert len(seen) == 4  # both modalities in both request kinds
    req = ll[1]
    ids, n, media = video_lm._loglikelihood_row(req)
    assert tuple(media["video_grid_thw"][0].tolist()) == (2, 8, 8)
    assert video_lm._token_types(torch.tensor([ids])).eq(2).sum() == N_VIDEO_TOKENS
    assert video_lm.loglikelihood([req])[0][0] == pytest.approx(continuation_loss(video_lm, ids, n, media), abs=1e-5)
    assert_alone_equals_batched(video_lm, gen, ll, batched)


def test_bad_checkpoints_and_prompts_refused(lm, tmp_path, video_docs):
    need("lmms_eval")
    from saint.integrations.lmms_glm import SaintGlm4v

    from .lmms_helpers import build_llava

    build_llava(tmp_path)
    with pytest.raises(ValueError, match="model_type 'glm4v', 'glm4v_moe' or 'glm46v'"):
        SaintGlm4v(pretrained=str(tmp_path))
    from PIL import Image

    image = Image.open(lm.task_dict["t"]["test"][0]["image"]).convert("RGB")
    with pytest.raises(ValueError, match="images or videos in one prompt, not both"):
        lm._generate(["x"], [[image, lm._visual(video_docs[1]["video"], "t/1")]], {"max_new_tokens": 2},
                     "generate_until")

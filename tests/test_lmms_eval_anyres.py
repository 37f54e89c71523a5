"""lmms-eval's ``saint_llava_next``, ``saint_llava_next_video`` and ``saint_llava_onevision`` models on
tiny random LLaVA-NeXT (CLIP + Llama), LLaVA-NeXT-Video (the same) and LLaVA-OneVision (SigLIP + Qwen2)
checkpoints saved to disk
with an offline processor (BPE tokenizer trained here, the families' own image
processors): nothing pruned equals the unpatched model, llm / vit / hybrid pruning of
both request kinds with per-image stats, batches of different image sizes equal each
request alone, OneVision's multi-image prompts, NeXT-Video's and OneVision's videos, bad settings,
and lmms-eval's
own command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .lmms_helpers import (
    assert_alone_equals_batched,
    assert_same_results,
    build_llava,
    continuation_loss,
    direct_generation,
    easy_vqa_docs,
    family_fixtures,
    gen_requests,
    ll_requests,
    make_lm,
    need,
    requests,
    run_cli,
    sized_image,
    train_tokenizer,
)

FAMILIES = {"llava_next": "SaintLlavaNext", "llava_next_video": "SaintLlavaNextVideo",
            "llava_onevision": "SaintLlavaOneVision"}
# 32 px crops of 4 x 4 patches: a 64 x 64 image is a 2 x 2 crop grid + the base image,
# 16 base tokens + an 8 x 8 grid closed by 8 newline tokens
TOKENS_64, NEWLINES_64, CROPS_64 = 88, 8, 5
LLM_ARGS = "mode=llm,llm_layers=1-3,llm_tau=0.3,llm_k=2"
VIT_ARGS = "mode=vit,vit_keep=7,vit_layer=0"
HYBRID_ARGS = "mode=hybrid,vit_keep=9,vit_layer=1,llm_layers=1-3,llm_tau=0.3,llm_k=2"
NOTHING_ARGS = ("mode=vit,vit_keep=16,vit_layer=0", "mode=llm,llm_layers=0-4,llm_tau=0.3,llm_k=1000")
SIZES = [(64, 64), (60, 30), (32, 32), (30, 60), (64, 40)]  # PIL (width, height): 1 x 1 to 2 x 2 crop grids


def _build(path: Path, family: str) -> None:
    """A tiny random checkpoint of ``family`` (:func:`tests.anyres_tiny.make`) with the
    family's processor around a tokenizer trained on easy-VQA, saved like a hub one."""
    transformers = pytest.importorskip("transformers")
    from .anyres_tiny import PINPOINTS, make

    tok = train_tokenizer(["<pad>", "<s>", "</s>", "<image>", "<video>"],
                          ["USER: ASSISTANT: user assistant <|im_start|> <|im_end|>"])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    if family in ("llava_next", "llava_next_video"):
        images = transformers.LlavaNextImageProcessor(size={"shortest_edge": 32}, image_grid_pinpoints=PINPOINTS,
                                                      crop_size={"height": 32, "width": 32})
        common = dict(image_processor=images, tokenizer=tokenizer, patch_size=8,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1)
        if family == "llava_next":
            processor = transformers.LlavaNextProcessor(**common)
        else:  # frames of 4 x 4 patches pooled 2 x 2: 4 tokens a frame
            videos = transformers.LlavaNextVideoVideoProcessor(size={"shortest_edge": 32},
                                                               crop_size={"height": 32, "width": 32})
            processor = transformers.LlavaNextVideoProcessor(video_processor=videos, **common)
    else:
        images = transformers.LlavaOnevisionImageProcessor(size={"height": 32, "width": 32},
                                                           image_grid_pinpoints=PINPOINTS)
        videos = transformers.LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
        processor = transformers.LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer,
                                                         video_processor=videos, num_image_tokens=16,
                                                         vision_feature_select_strategy="full")
    processor.save_pretrained(path)
    ids = {key: tokenizer.convert_tokens_to_ids(t) for key, t in (("image_token_id", "<image>"),
                                                                  ("video_token_id", "<video>"))}
    make(family, vocab_size=len(tokenizer), **ids).save_pretrained(path)


checkpoint, family, docs = family_fixtures(_build, FAMILIES, SIZES)  # module-scoped fixtures


def visuals(doc: dict) -> list:
    """The document's image at its size, and a second image when it names one."""
    from PIL import Image

    out = [sized_image(doc)]
    return out + ([Image.open(doc["image2"])] if "image2" in doc else [])


def gen_reqs(docs: list[dict], max_new_tokens: int = 4) -> list:
    return gen_requests(docs, {"max_new_tokens": max_new_tokens, "temperature": 0}, visuals)


def ll_reqs(docs: list[dict]) -> list:
    return ll_requests(docs, visuals)


def lm_for(checkpoint, family: str, args: str, docs: list[dict]):
    return make_lm(FAMILIES[family], checkpoint(family), args, docs)


# ---------------------------------------------------------------------------- registration and errors
def test_entry_points_resolve():
    need("lmms_eval")
    import lmms_eval.models

    from saint.integrations.lmms_anyres import (
        SaintLlavaNext,
        SaintLlavaNextVideo,
        SaintLlavaOneVision,
    )

    assert lmms_eval.models.get_model("saint_llava_next") is SaintLlavaNext
    assert lmms_eval.models.get_model("saint_llava_next_video") is SaintLlavaNextVideo
    assert lmms_eval.models.get_model("saint_llava_onevision") is SaintLlavaOneVision


def test_bad_settings_and_checkpoints_refused(checkpoint, tmp_path):
    """Settings are refused before any weights load; a checkpoint of another family and
    a per-crop budget over the crop's patches are refused with the reason."""
    need("lmms_eval")
    from saint.integrations.lmms_anyres import (
        SaintLlavaNext,
        SaintLlavaNextVideo,
        SaintLlavaOneVision,
    )

    missing = str(tmp_path / "no-such-checkpoint")
    for cls in (SaintLlavaNext, SaintLlavaNextVideo, SaintLlavaOneVision):
        with pytest.raises(ValueError, match="random/pool baselines take one square grid"):
            cls(pretrained=missing, method="random", visual_keep=4)
        with pytest.raises(TypeError, match="does not use"):
            cls(pretrained=missing, mode="vit", llm_tau=0.5)
        with pytest.raises(TypeError, match="unpruned"):
            cls(pretrained=missing, method="none", vit_keep=4)
    for cls in (SaintLlavaNextVideo, SaintLlavaOneVision):
        with pytest.raises(ValueError, match="max_frames_num"):
            cls(pretrained=missing, max_frames_num=0)
    with pytest.raises(ValueError, match="model_type 'llava_next_video'"):
        SaintLlavaNextVideo(pretrained=str(checkpoint("llava_next")))
    with pytest.raises(ValueError, match="exceeds the 16 patches"):
        SaintLlavaNext(pretrained=str(checkpoint("llava_next")), mode="vit", vit_keep=17, vit_layer=0)
    with pytest.raises(ValueError, match="model_type 'llava_onevision'"):
        SaintLlavaOneVision(pretrained=str(checkpoint("llava_next")))
    build_llava(tmp_path)
    with pytest.raises(ValueError, match="LLaVA-NeXT checkpoints"):
        SaintLlavaNext(pretrained=str(tmp_path))


# ---------------------------------------------------------------------------- nothing pruned
def test_nothing_pruned_equals_the_unpatched_model(checkpoint, family, docs):
    """``method=none`` generates what the unpatched model generates from lmms-eval's
    ``llava_hf`` prompt (``<image>`` in front, chat template); settings that prune
    nothing (vit budget = every patch, llm k beyond the tokens) give the same texts and
    scores as ``method=none``."""
    base = lm_for(checkpoint, family, "method=none", docs)
    gen, ll = gen_reqs(docs), ll_reqs(docs)
    texts, scores = base.generate_until(gen), base.loglikelihood(ll)
    assert all("llm_input" not in e for e in base.pruning_log)  # unpatched: nothing reported pruned
    assert base.image_token == "<image>"
    assert texts[0] == direct_generation(base, docs[0]["question"], visuals(docs[0]))
    assert_same_results({args: lm_for(checkpoint, family, args, docs) for args in NOTHING_ARGS}, gen, ll, texts, scores)


# ---------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("args", [LLM_ARGS, VIT_ARGS, HYBRID_ARGS], ids=["llm", "vit", "hybrid"])
def test_both_request_kinds_are_pruned_per_image(checkpoint, family, args):
    """64 px images: 88 image tokens from the processor; llm mode hands the language
    model the 80 that are not newlines and prunes some; vit mode keeps 7 patches of each
    of the 5 crops and prunes nothing more; hybrid does both."""
    docs = easy_vqa_docs(3)
    lm = lm_for(checkpoint, family, args, docs)
    lm.generate_until(gen_reqs(docs))
    lm.loglikelihood(ll_reqs(docs))
    assert {e["request"] for e in lm.pruning_log} == {"generate_until", "loglikelihood"}
    into = {LLM_ARGS: TOKENS_64 - NEWLINES_64, VIT_ARGS: 7 * CROPS_64, HYBRID_ARGS: 9 * CROPS_64}[args]
    for e in lm.pruning_log:
        assert e["image_tokens"] == [TOKENS_64] * len(e["image_tokens"])
        assert e["llm_input"] == [into] * len(e["image_tokens"])
        assert all(o == into if args == VIT_ARGS else o < into for o in e["llm_output"])
    summary = lm.pruning_summary()
    assert summary["generate_until"]["samples"] == 3 and summary["loglikelihood"]["samples"] == 6


@pytest.mark.parametrize("args", [LLM_ARGS, VIT_ARGS], ids=["llm", "vit"])
def test_batches_of_different_image_sizes_equal_single_requests(checkpoint, family, docs, args):
    """Images of 1 x 1 to 2 x 2 crop grids in one batch (the processor pads the crops):
    each request alone gets the same text and score; a score is the patched model's loss."""
    lm = lm_for(checkpoint, family, args, docs)
    gen, ll = gen_reqs(docs), ll_reqs(docs)
    batched = (lm.generate_until(gen), lm.loglikelihood(ll))
    assert len({tuple(e["image_tokens"]) for e in lm.pruning_log}) > 1
    assert_alone_equals_batched(lm, gen, ll, batched)
    req = ll[2]  # a 60 x 30 image: 1 x 2 crops, fewer than the batch's padding
    ids, n, media = lm._loglikelihood_row(req)
    assert batched[1][2][0] == pytest.approx(continuation_loss(lm, ids, n, media), abs=1e-5)


def test_onevision_multi_image_prompts_get_no_crops(checkpoint):
    """Two images in one prompt: each is its base image only (16 tokens + a newline), as
    OneVision evaluates multi-image tasks; a single-image prompt in the same batch keeps
    its crops."""
    two = dict(easy_vqa_docs(2)[1], image2=easy_vqa_docs(1)[0]["image"])
    docs = [easy_vqa_docs(1)[0], two]
    lm = lm_for(checkpoint, "llava_onevision", LLM_ARGS, docs)
    lm.generate_until(gen_reqs(docs))
    (e,) = lm.pruning_log
    pairs = sorted(zip(e["image_tokens"], e["llm_input"], strict=True))  # batch rows: longest prompt first
    assert pairs == [(2 * 17, 2 * 16), (TOKENS_64, TOKENS_64 - NEWLINES_64)]


# ---------------------------------------------------------------------------- OneVision videos
def clip(frames: int, seed: int) -> object:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8)


def media(doc: dict) -> list:
    return [doc["video"]] if "video" in doc else visuals(doc)


@pytest.mark.parametrize("family, video_tokens", [("llava_next_video", 16), ("llava_onevision", 17)])
def test_videos_are_served_unpruned(checkpoint, family, video_tokens):
    """Frame arrays as videos (``max_frames_num=4``: a 6-frame clip thinned, a 2-frame
    clip repeated to 4, as ``llava_hf`` samples), mixed with an image in one batch:
    ``<video>`` expands to 4 frames of 2 x 2 pooled patches (OneVision: and a newline),
    video tokens are never pruned, and each request alone gets what it got in the batch."""
    image = easy_vqa_docs(1)[0]
    docs = [{"question": "What moves?", "answer": "square", "video": clip(6, 0)},
            {"question": "Which color?", "answer": "red", "video": clip(2, 1)}, image]
    lm = lm_for(checkpoint, family, LLM_ARGS + ",max_frames_num=4", docs)
    assert len(lm._visual(clip(2, 1), "t").frames) == 4
    gen = requests("generate_until", [(d["question"], {"max_new_tokens": 3, "temperature": 0}, media, j, "t", "test")
                                      for j, d in enumerate(docs)])
    ll = requests("loglikelihood", [(d["question"], f" {d['answer']}", media, j, "t", "test")
                                    for j, d in enumerate(docs)])
    batched = (lm.generate_until(gen), lm.loglikelihood(ll))
    rows = [(i, v, o) for e in lm.pruning_log
            for i, v, o in zip(e["image_tokens"], e["video_tokens"], e.get("llm_output", [None] * 3), strict=True)]
    assert sorted((i, v) for i, v, _ in rows) == [(0, video_tokens)] * 4 + [(TOKENS_64, 0)] * 2
    assert all(o < TOKENS_64 - NEWLINES_64 for i, _, o in rows if i)
    assert_alone_equals_batched(lm, gen, ll, batched)


# ---------------------------------------------------------------------------- lmms-eval's CLI
def test_lmms_eval_cli_end_to_end(checkpoint, tmp_path):
    """``python -m lmms_eval --model saint_llava_onevision ...`` (hybrid) completes on the
    easy-VQA tasks and the stats file shows both request kinds pruned."""
    need("lmms_eval")
    results, (stats,) = run_cli("saint_llava_onevision", checkpoint("llava_onevision"), HYBRID_ARGS, tmp_path, 3,
                                timeout=300)
    assert 0.0 <= results["saint_easyvqa_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["saint_easyvqa_mc"]["acc,none"] <= 1.0
    summary = json.loads(stats.read_text().splitlines()[-1])["summary"]
    for kind in ("generate_until", "loglikelihood"):
        s = summary[kind]
        assert s["image_tokens"] == TOKENS_64 and s["llm_input"] == 9 * CROPS_64 and s["llm_output"] < 9 * CROPS_64

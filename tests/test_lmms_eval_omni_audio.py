"""lmms-eval's ``saint_qwen_omni`` with audio visuals (lmms-eval's ``{"array", "sampling_rate"}``)
on tiny random Qwen2.5-Omni and Qwen3-Omni thinkers: clips enter the prompt whole and in order
beside images, which are pruned while audio tokens pass; batches equal single requests; the
scores are the patched model's own loss; clips are resampled to 16 kHz, averaged to mono, and
split where Qwen2.5-Omni's processor would truncate them."""

from __future__ import annotations

import numpy as np
import pytest

from .lmms_helpers import (
    assert_alone_equals_batched,
    build_omni,
    built_once,
    continuation_loss,
    easy_vqa_docs,
    make_lm,
    need,
    requests,
)

PRUNE_ARGS = "mode=hybrid,vit_ratio=0.5,vit_layer=1,llm_layers=0-3,llm_tau=0.3,llm_k=2"
N_IMAGE_TOKENS = 16  # easy-VQA's 64 px images resized to 32 px: 8x8 patches of 4 px, merged 2x2


def clip(seconds: float, rate: int = 16000, seed: int = 0) -> dict:
    """An lmms-eval audio visual: quiet noise of ``seconds`` at ``rate`` Hz."""
    wave = np.random.default_rng(seed).standard_normal(int(seconds * rate)).astype(np.float32) * 0.1
    return {"array": wave, "sampling_rate": rate}


def audio_visuals(doc: dict) -> list:
    """A clip (its length by the document), then the image, except for the audio-only documents."""
    from PIL import Image

    sound = clip(doc["seconds"], doc.get("rate", 16000), seed=doc["seed"])
    return [sound] if doc.get("audio_only") else [sound, Image.open(doc["image"])]


@pytest.fixture(scope="module")
def omni_checkpoint(tmp_path_factory, one_thread):
    return built_once(tmp_path_factory, build_omni)


@pytest.fixture(scope="module", params=["qwen2_5_omni", "qwen3_omni_moe"])
def omni_lm(request, omni_checkpoint):
    need("lmms_eval")
    docs = [dict(d, seconds=s, seed=i, **extra) for i, (d, s, extra) in enumerate(zip(
        easy_vqa_docs(4), (1.0, 0.5, 1.5, 0.75), ({}, {"rate": 8000}, {"audio_only": True}, {}), strict=True))]
    return make_lm("SaintQwenOmni", omni_checkpoint(request.param), PRUNE_ARGS, docs)


def audio_requests(docs: list[dict]) -> tuple[list, list]:
    kw = {"max_new_tokens": 4, "temperature": 0}
    gen = requests("generate_until", [(d["question"], dict(kw), audio_visuals, j, "t", "test")
                                      for j, d in enumerate(docs)])
    ll = requests("loglikelihood", [(d["question"], f" {c}", audio_visuals, j, "t", "test")
                                    for j, d in enumerate(docs) for c in ("yes", "red")])
    return gen, ll


def test_clips_enter_whole_beside_pruned_images_and_batches_equal_single_requests(omni_lm):
    docs = omni_lm.task_dict["t"]["test"]
    processor, config = omni_lm.processor, omni_lm.model.config
    audio_id = processor.tokenizer.convert_tokens_to_ids(processor.audio_token)
    gen, ll = audio_requests(docs)
    for req, doc in zip(ll[::2], docs, strict=True):
        ids, _, media = omni_lm._loglikelihood_row(req)
        wave = clip(doc["seconds"], 16000, seed=doc["seed"])["array"]  # the clip at 16 kHz, as resampled
        alone = processor(text=processor.audio_token, audio=[wave], return_tensors="pt")["input_ids"]
        assert ids.count(audio_id) == int((alone == audio_id).sum()) > 0  # the whole clip, once
        assert ("pixel_values" in media) != bool(doc.get("audio_only"))
    omni_lm.pruning_log.clear()
    batched = (omni_lm.generate_until(gen), omni_lm.loglikelihood(ll))
    for e in omni_lm.pruning_log:  # the prompts with an image: pruned in the tower and in the language model
        with_image = [i for i, n in enumerate(e["image_tokens"]) if n]
        assert [e["image_tokens"][i] for i in with_image] == [N_IMAGE_TOKENS] * len(with_image)
        assert [e["llm_input"][i] for i in with_image] == [N_IMAGE_TOKENS // 2] * len(with_image)
    assert {e["request"] for e in omni_lm.pruning_log} == {"generate_until", "loglikelihood"}
    assert_alone_equals_batched(omni_lm, gen, ll, batched)
    assert config.model_type.endswith("_thinker")


def test_audio_loglikelihood_is_the_patched_models_loss(omni_lm):
    docs = omni_lm.task_dict["t"]["test"]
    _, ll = audio_requests(docs)
    for req in ll[::4]:  # with an image, then audio alone
        (result,) = omni_lm.loglikelihood([req])
        ids, n, media = omni_lm._loglikelihood_row(req)
        assert "input_features" in media
        assert result[0] == pytest.approx(continuation_loss(omni_lm, ids, n, media, mask=True), abs=1e-5)


def test_clips_are_resampled_averaged_and_split_where_the_processor_truncates(omni_lm):
    from saint.integrations.lmms_omni import Audio, to_waveform

    t = np.arange(8000) / 8000
    up = to_waveform({"array": np.sin(2 * np.pi * 50 * t), "sampling_rate": 8000}, 16000, "w")
    want = np.sin(2 * np.pi * 50 * np.arange(16000) / 16000)
    assert up.dtype == np.float32 and len(up) == 16000
    assert np.abs(up[1000:-1000] - want[1000:-1000]).max() < 1e-3  # away from the filter's edges
    stereo = np.stack([np.ones(400), 3 * np.ones(400)]).astype(np.float32)
    assert np.array_equal(to_waveform({"array": stereo, "sampling_rate": 16000}, 16000, "w"), 2 * np.ones(400))
    with pytest.raises(ValueError, match="w: an audio clip must be"):
        to_waveform({"array": np.zeros(0), "sampling_rate": 16000}, 16000, "w")
    long = clip(31)
    pieces = omni_lm._visual(long, "w")
    if omni_lm.model.config.model_type.startswith("qwen2_5_omni"):  # its processor truncates at 30 s
        assert [len(p.wave) for p in pieces] == [30 * 16000, 16000]
    else:
        assert [len(p.wave) for p in pieces] == [31 * 16000]
    assert all(isinstance(p, Audio) for p in pieces)
    assert np.array_equal(np.concatenate([p.wave for p in pieces]), long["array"])
    with pytest.raises(ValueError, match="audio clips are .*'sampling_rate'.* dicts"):
        omni_lm._visual("not a visual", "w")

"""lmms-eval's ``saint_qwen_omni`` on tiny random Qwen2.5-Omni and Qwen3-Omni thinker checkpoints saved
to disk with an offline processor (ChatML tokenizer trained here, Qwen2-VL image processor, Whisper
feature extractor): request batching and pruning of both request kinds, as ``saint_qwen_vl``'s tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .lmms_helpers import (
    assert_alone_equals_batched,
    built_once,
    continuation_loss,
    easy_vqa_docs,
    gen_requests,
    ll_requests,
    make_lm,
    need,
    train_tokenizer,
)
from .test_lmms_eval_qwen import N_IMAGE_TOKENS, PRUNE_ARGS

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>",
           "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]


def _build_omni(path: Path, family: str) -> None:
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(SPECIAL, ["user assistant system"])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
                              "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                              "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"},
    )
    pixels = dict(min_pixels=32 * 32, max_pixels=32 * 32)
    size = {"shortest_edge": 32 * 32, "longest_edge": 32 * 32}
    image_processor = transformers.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, size=size,
                                                         **pixels)
    video_processor = transformers.Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                         cap_pixels_per_frame=False, size=size)
    name = "Qwen2_5Omni" if family == "qwen2_5_omni" else "Qwen3OmniMoe"
    processor = getattr(transformers, f"{name}Processor")(
        image_processor=image_processor, video_processor=video_processor,
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=8), tokenizer=tokenizer)
    processor.save_pretrained(path)
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|IMAGE|>"), ("video_token_id", "<|VIDEO|>"), ("audio_token_id", "<|AUDIO|>"),
        ("vision_start_token_id", "<|vision_bos|>"), ("audio_start_token_id", "<|audio_bos|>"))}
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, in_channels=3)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    audio = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                 output_dim=64, max_source_positions=64)
    torch.manual_seed(0)
    if family == "qwen2_5_omni":
        vision.update(window_size=16, fullatt_block_indexes=[1, 3])
        ids = {k.replace("_token_id", "_token_index") if k in ("image_token_id", "video_token_id", "audio_token_id")
               else k: v for k, v in ids.items()}
        config = transformers.Qwen2_5OmniThinkerConfig(vision_config=vision, text_config=text, audio_config=audio,
                                                       **ids)
    else:
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        text.update(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        text["rope_parameters"]["mrope_interleaved"] = True
        config = transformers.Qwen3OmniMoeThinkerConfig(vision_config=vision, text_config=text,
                                                        audio_config=dict(audio, downsample_hidden_size=8), **ids)
    getattr(transformers, f"{name}ThinkerForConditionalGeneration")(config).save_pretrained(path)


@pytest.fixture(scope="module")
def omni_checkpoint(tmp_path_factory, one_thread):
    return built_once(tmp_path_factory, _build_omni)


@pytest.fixture(scope="module", params=["qwen2_5_omni", "qwen3_omni_moe"])
def lm(request, omni_checkpoint):
    return make_lm("SaintQwenOmni", omni_checkpoint(request.param), PRUNE_ARGS, easy_vqa_docs(5))


def test_entry_point_resolves_saint_qwen_omni():
    need("lmms_eval")
    import lmms_eval.models

    from saint.integrations.lmms_omni import SaintQwenOmni

    assert lmms_eval.models.get_model("saint_qwen_omni") is SaintQwenOmni


def test_both_request_kinds_are_pruned_and_batches_equal_single_requests(lm):
    import saint

    docs = lm.task_dict["t"]["test"]
    assert saint.is_patched(lm.model) and type(lm.model).__name__.endswith("ThinkerForConditionalGeneration")
    lm.pruning_log.clear()
    gen, ll = gen_requests(docs), ll_requests(docs)
    batched = (lm.generate_until(gen), lm.loglikelihood(ll))
    assert {e["request"] for e in lm.pruning_log} == {"generate_until", "loglikelihood"}
    for e in lm.pruning_log:
        assert e["image_tokens"] == [N_IMAGE_TOKENS] * len(e["image_tokens"])
        assert e["llm_input"] == [N_IMAGE_TOKENS // 2] * len(e["image_tokens"])  # vit_ratio 0.5 in the tower
        assert all(o < N_IMAGE_TOKENS // 2 for o in e["llm_output"])  # and SAINT inside the language model
    assert_alone_equals_batched(lm, gen, ll, batched)


def test_loglikelihood_is_the_patched_models_loss(lm):
    """The score is the patched model's own loss; the thinkers' forward ignores logits_to_keep and
    returns every position, which the scoring must cut to the tail (it read the prompt's start)."""
    docs = lm.task_dict["t"]["test"]
    req = ll_requests(docs[:1])[0]
    (result,) = lm.loglikelihood([req])
    ids, n, media = lm._loglikelihood_row(req)
    # without a mask the thinkers fall back to 1-D positions (transformers' own behaviour)
    assert result[0] == pytest.approx(continuation_loss(lm, ids, n, media, mask=True), abs=1e-5)


def test_other_checkpoints_are_refused(tmp_path):
    need("lmms_eval")
    from saint.integrations.lmms_omni import SaintQwenOmni

    from .lmms_helpers import build_llava

    build_llava(tmp_path)
    with pytest.raises(ValueError, match="model_type 'qwen2_5_omni', 'qwen2_5_omni_thinker'"):
        SaintQwenOmni(pretrained=str(tmp_path))


def test_a_whole_omni_checkpoint_serves_its_thinker(omni_checkpoint, tmp_path):
    """A checkpoint of the whole model (model_type 'qwen2_5_omni', the thinker's weights under
    ``thinker.``, as on the hub) loads the thinker alone and answers as the thinker's own checkpoint."""
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    thinker_dir = omni_checkpoint("qwen2_5_omni")
    for f in thinker_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, tmp_path / f.name)
    thinker_config = transformers.AutoConfig.from_pretrained(thinker_dir)
    transformers.Qwen2_5OmniConfig(thinker_config=thinker_config.to_dict()).save_pretrained(tmp_path)
    weights = load_file(thinker_dir / "model.safetensors")
    save_file({f"thinker.{k}": v for k, v in weights.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    docs = easy_vqa_docs(3)
    whole, alone = (make_lm("SaintQwenOmni", d, PRUNE_ARGS, docs) for d in (tmp_path, thinker_dir))
    assert whole.model.config.model_type == "qwen2_5_omni_thinker"
    assert type(whole.model) is type(alone.model)
    assert whole.generate_until(gen_requests(docs)) == alone.generate_until(gen_requests(docs))

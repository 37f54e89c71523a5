"""lmms-eval's ``saint_qwen_vl`` model on tiny random Qwen2.5-VL and Qwen3-VL checkpoints
saved to disk with an offline processor (ChatML tokenizer trained here, Qwen2-VL image processor): request
batching, pruning of both request kinds, and lmms-eval's own command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .lmms_helpers import (
    assert_alone_equals_batched,
    build_llava,
    continuation_loss,
    easy_vqa_docs,
    gen_requests,
    ll_requests,
    make_lm,
    need,
    run_cli,
)

PRUNE_ARGS = "mode=hybrid,vit_ratio=0.5,vit_layer=1,llm_layers=0-3,llm_tau=0.3,llm_k=2"
N_IMAGE_TOKENS = 16  # easy-VQA's 64 px images resized to 32 px: 8x8 patches of 4 px, merged 2x2
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]


def _build_qwen(path: Path, family: str = "qwen2_5_vl") -> None:
    easy_vqa = need("easy_vqa")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = easy_vqa.get_test_questions()[0][:1500] + easy_vqa.get_answers() + ["user assistant system"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    pixels = dict(min_pixels=32 * 32, max_pixels=32 * 32)
    image_processor = transformers.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                         size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32},
                                                         **pixels)
    video_cls, processor_cls = (
        (transformers.Qwen2VLVideoProcessor, transformers.Qwen2_5_VLProcessor) if family == "qwen2_5_vl"
        else (transformers.Qwen3VLVideoProcessor, transformers.Qwen3VLProcessor))
    video_processor = video_cls(patch_size=4, merge_size=2, temporal_patch_size=2,
                                size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32})
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)
    processor.save_pretrained(path)
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, in_channels=3)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    torch.manual_seed(0)
    if family == "qwen2_5_vl":
        vision.update(window_size=16, fullatt_block_indexes=[1, 3])
        config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    else:
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        text.update(head_dim=16)
        text["rope_parameters"]["mrope_interleaved"] = True
        config = transformers.Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
        transformers.Qwen3VLForConditionalGeneration(config).save_pretrained(path)


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory, one_thread):
    """``qwen_checkpoint(family)``: the folder of a tiny checkpoint of that family, built once."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tmp_path_factory.mktemp(f"tiny_{family}")
            _build_qwen(built[family], family)
        return built[family]

    return get


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def qwen_dir(request, qwen_checkpoint) -> Path:
    return qwen_checkpoint(request.param)


@pytest.fixture(scope="module")
def lm(qwen_dir):
    return make_lm("SaintQwenVL", qwen_dir, PRUNE_ARGS, easy_vqa_docs(5))


def test_entry_point_resolves_saint_qwen_vl():
    need("lmms_eval")
    import lmms_eval.models

    from saint.integrations.lmms_eval import SaintQwenVL

    assert lmms_eval.models.get_model("saint_qwen_vl") is SaintQwenVL


def test_both_request_kinds_are_pruned_and_batches_equal_single_requests(lm):
    import saint

    docs = lm.task_dict["t"]["test"]
    assert saint.is_patched(lm.model) and lm.model.config.model_type == lm.model.__dict__["_saint_patch"].family
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
    docs = lm.task_dict["t"]["test"]
    req = ll_requests(docs[:1])[0]
    (result,) = lm.loglikelihood([req])
    ids, n, media = lm._loglikelihood_row(req)
    assert result[0] == pytest.approx(continuation_loss(lm, ids, n, media), abs=1e-5)


def test_bad_settings_and_checkpoints_refused(tmp_path):
    need("lmms_eval")
    from saint.integrations.lmms_eval import SaintQwenVL

    with pytest.raises(TypeError, match="vit_keep"):
        SaintQwenVL(pretrained=str(tmp_path / "none"), mode="vit", vit_keep=10)
    build_llava(tmp_path)
    with pytest.raises(ValueError, match="model_type 'qwen2_5_vl' or 'qwen3_vl'"):
        SaintQwenVL(pretrained=str(tmp_path))


def test_lmms_eval_cli_end_to_end(qwen_checkpoint, tmp_path):
    """``python -m lmms_eval --model saint_qwen_vl ...`` completes and prunes both kinds of
    request (run once, on Qwen2.5-VL: the class is the same for Qwen3-VL)."""
    need("lmms_eval")
    results, (stats,) = run_cli("saint_qwen_vl", qwen_checkpoint("qwen2_5_vl"), PRUNE_ARGS, tmp_path, 3, timeout=300)
    assert 0.0 <= results["saint_easyvqa_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["saint_easyvqa_mc"]["acc,none"] <= 1.0
    summary = json.loads(stats.read_text().splitlines()[-1])["summary"]
    for kind in ("generate_until", "loglikelihood"):
        s = summary[kind]
        assert s["image_tokens"] == N_IMAGE_TOKENS and s["llm_input"] == N_IMAGE_TOKENS // 2
        assert s["llm_output"] < N_IMAGE_TOKENS // 2

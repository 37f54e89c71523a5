"""Hugging Face BLIP: the vision tower pruned as BLIP-2's, and the text model that cross-attends
every image token (the captioning decoder, the question-answering and retrieval encoders, the
multimodal features) reading each image's real tokens, merged ones weighted by ``log(size)``,
at every generated token and in every beam."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters import find_adapter  # noqa: E402

from .conftest import (  # noqa: E402
    assert_merged_tokens_read_as_their_parts,
    assert_nothing_to_prune_then_unpatch_exactly,
    spread_weights,
)
from .test_hf_blip2 import IDS, METHODS, TOL, VISION  # noqa: E402

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
            encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=3, sep_token_id=4, pad_token_id=0,
            eos_token_id=4)
PROMPT = torch.tensor([[3, 10, 11, 12, 13]])


def blip(kind: str = "captioning") -> torch.nn.Module:
    """A tiny BLIP with weights that make its tokens differ (BLIP initialises them tiny)."""
    torch.manual_seed(0)
    t = transformers
    model_cls = {"captioning": t.BlipForConditionalGeneration, "vqa": t.BlipForQuestionAnswering,
                 "retrieval": t.BlipForImageTextRetrieval, "model": t.BlipModel}[kind]
    model = model_cls(t.BlipConfig(vision_config=VISION, text_config=TEXT)).eval()
    if kind == "captioning":
        model.decoder_input_ids = 3
    return spread_weights(model)


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=images, input_ids=PROMPT.expand(len(images), -1)).logits


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", METHODS, ids=IDS)
def test_the_captioning_decoder_reads_each_images_tokens_as_alone(method, kw, layout, images):
    model = blip()
    with torch.no_grad():
        ref = _logits(model, images)
    saint.patch(model, method, layout=layout, **kw)
    assert find_adapter(model).name == "hf_blip2"
    with torch.no_grad():
        got = _logits(model, images)
    assert saint.stats(model).layout == ("rectangular" if method == "tome" else layout)
    assert bool(torch.isfinite(got).all()) and not torch.allclose(got, ref, atol=1e-3)
    for i in range(len(images)):
        with torch.no_grad():
            torch.testing.assert_close(got[i], _logits(model, images[i : i + 1])[0], **TOL)


def test_a_merged_token_counts_in_the_decoders_cross_attention_as_its_parts(images):
    """The decoder's cross-attention over a merged token biased by ``log(size)`` equals its
    attention over the token repeated ``size`` times (ToMe's proportional attention)."""
    model = blip()

    def reference(tokens: torch.Tensor) -> torch.Tensor:
        return model.text_decoder(input_ids=PROMPT, encoder_hidden_states=tokens,
                                  encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long)).logits

    assert_merged_tokens_read_as_their_parts(model, images, lambda x: _logits(model, x), reference)


@pytest.mark.parametrize("beams", [1, 3])
def test_captions_of_a_batch_are_each_images_alone(beams, images):
    """Greedy and beam-search captions of a ragged batch are each image's alone: every beam
    of an image reads that image's mask."""
    model = blip()
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        batch = model.generate(pixel_values=images, max_new_tokens=5, num_beams=beams, do_sample=False)
        assert saint.stats(model).layout == "packed"
        for i in range(len(images)):
            alone = model.generate(pixel_values=images[i : i + 1], max_new_tokens=5, num_beams=beams, do_sample=False)
            assert torch.equal(batch[i], alone[0])


def test_question_answering_retrieval_and_multimodal_features_per_image_as_alone(images):
    """The question encoder (VQA), the image-text matching encoder (retrieval) and BlipModel's
    multimodal features cross-attend each image's real tokens; its contrastive features read
    the tower's class token."""
    question = PROMPT.expand(len(images), -1)
    vqa, retrieval, both = blip("vqa"), blip("retrieval"), blip("model")
    for model in (vqa, retrieval, both):
        saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        answers = vqa.generate(pixel_values=images, input_ids=question, max_new_tokens=4)
        matching = retrieval(pixel_values=images, input_ids=question).itm_score
        multimodal = both.get_multimodal_features(pixel_values=images, input_ids=question)
        contrastive = both.get_image_features(pixel_values=images).pooler_output
        assert saint.stats(both).layout == "packed"
        for i in range(len(images)):
            one, q = images[i : i + 1], question[:1]
            assert torch.equal(answers[i], vqa.generate(pixel_values=one, input_ids=q, max_new_tokens=4)[0])
            torch.testing.assert_close(matching[i], retrieval(pixel_values=one, input_ids=q).itm_score[0], **TOL)
            torch.testing.assert_close(multimodal[i], both.get_multimodal_features(pixel_values=one, input_ids=q)[0],
                                       **TOL)
            torch.testing.assert_close(contrastive[i], both.get_image_features(pixel_values=one).pooler_output[0],
                                       **TOL)


def test_nothing_to_prune_unpatch_calibration_and_refusals(images):
    model = blip()
    assert_nothing_to_prune_then_unpatch_exactly(model, images, lambda x: _logits(model, x))
    # (4 tiny images: the counts move in steps of about 3%)
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_match", tol=0.03)
    assert cal.reached and abs(cal.achieved / 1.4 - 1) < 0.03
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=images).last_hidden_state
        with pytest.raises(ValueError, match="call it only through the patched model"):
            model.text_decoder(input_ids=PROMPT, encoder_hidden_states=hidden[:, :-1])


@pytest.mark.parametrize("kind", ["captioning", "model"])
def test_nothing_to_prune_before_attention_is_bit_for_bit(kind, images):
    # BLIP's attention is eager products: a selecting layer that needs no mask runs the
    # module's own attention at either placement (select_at="attention" ran saint's SDPA: 3e-6 off)
    model = blip(kind)
    call = (lambda x: _logits(model, x)) if kind == "captioning" else (
        lambda x: model.get_image_features(pixel_values=x).pooler_output)
    with torch.no_grad():
        ref = call(images)
        saint.patch(model, "saint_match", tau=1.0, fraction=1.0, select_at="attention")
        assert torch.equal(call(images), ref)


def test_a_captioning_cache_continues_only_under_its_patch(images):
    # after saint.unpatch, continuing it read the pruned batch's padding keys unmasked
    model = blip()
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        first = model.generate(pixel_values=images, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True)
        ids = torch.cat([first.sequences, torch.full((len(images), 1), 4)], 1)  # BLIP's generate drops the last
        kw = dict(input_ids=ids, past_key_values=first.past_key_values, max_new_tokens=1)
        model.generate(pixel_values=images, **kw)
        saint.unpatch(model)
        with pytest.raises(ValueError, match="pruned under a patch since removed"):
            model.generate(pixel_values=images, **kw)

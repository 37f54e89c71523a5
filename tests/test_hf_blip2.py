"""Hugging Face BLIP-2 and InstructBLIP: the vision tower pruned (a fused q/k/v projection,
an attention without a mask), and the Q-Former's cross-attention reading each image's real
tokens, merged ones weighted by ``log(size)``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters import find_adapter  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .conftest import (  # noqa: E402
    assert_merged_tokens_read_as_their_parts,
    assert_real_tokens_as_alone,
    spread_weights,
)

TOL = dict(rtol=0, atol=1e-5)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32,
              patch_size=8)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               encoder_hidden_size=32, vocab_size=100)
TEXT = dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, vocab_size=100,
            word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=2, eos_token_id=2, pad_token_id=1)
IMAGE_TOKEN = 99
METHODS = [("tome", dict(r=3)), ("saint_match", dict(tau=0.3, fraction=0.7)),
           ("saint_match", dict(tau=0.3, fraction=0.7, select_at="attention", guard=0.2)), ("saint", dict(tau=0.3, k=1))]
IDS = ["tome", "saint_match", "saint_match_guard_before_attention", "saint"]


def blip2(kind: str = "blip2") -> torch.nn.Module:
    """A tiny BLIP-2 (or InstructBLIP, InstructBLIP-Video) with an OPT language model and 4 query tokens."""
    torch.manual_seed(0)
    t = transformers
    config_cls, model_cls = {
        "blip2": (t.Blip2Config, t.Blip2ForConditionalGeneration),
        "instructblip": (t.InstructBlipConfig, t.InstructBlipForConditionalGeneration),
        "instructblipvideo": (t.InstructBlipVideoConfig, t.InstructBlipVideoForConditionalGeneration),
    }[kind]
    cfg = config_cls(vision_config=VISION, qformer_config=QFORMER, text_config=TEXT, num_query_tokens=4,
                     image_token_index=IMAGE_TOKEN)
    model = model_cls(cfg).eval()
    return spread_weights(model)


def _features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the language model reads of each image: the projected query outputs."""
    kw = {}
    if isinstance(model, transformers.InstructBlipForConditionalGeneration):
        kw = dict(qformer_input_ids=torch.tensor([[5, 6, 7]] * len(images)))
    return model.get_image_features(pixel_values=images, **kw).pooler_output


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", METHODS, ids=IDS)
@pytest.mark.parametrize("kind", ["blip2", "instructblip"])
def test_each_images_query_outputs_as_alone(kind, method, kw, layout, images):
    model = blip2(kind)
    with torch.no_grad():
        ref = _features(model, images)
        ref_pooled = model.vision_model(pixel_values=images).pooler_output
    saint.patch(model, method, layout=layout, **kw)
    assert find_adapter(model).name == "hf_blip2"
    with torch.no_grad():
        got = _features(model, images)
        tower = model.vision_model(pixel_values=images, output_hidden_states=True)
    assert saint.stats(model).layout == ("rectangular" if method == "tome" else layout)
    assert got.shape == ref.shape and bool(torch.isfinite(got).all())
    assert not torch.allclose(tower.pooler_output, ref_pooled, atol=1e-3)
    masks = [get_handle(model).hidden_state_valid(i) for i in range(len(tower.hidden_states))]
    for i in range(len(images)):
        with torch.no_grad():
            torch.testing.assert_close(got[i], _features(model, images[i : i + 1])[0], **TOL)
            alone = model.vision_model(pixel_values=images[i : i + 1], output_hidden_states=True)
        assert_real_tokens_as_alone(tower.hidden_states, alone.hidden_states, masks, i)


def test_a_merged_token_counts_in_the_qformer_as_its_parts(images):
    """The Q-Former's cross-attention over a merged token biased by ``log(size)`` equals its
    attention over the token repeated ``size`` times (ToMe's proportional attention)."""
    model = blip2()
    query = model.query_tokens.expand(1, -1, -1)

    def reference(tokens: torch.Tensor) -> torch.Tensor:
        out = model.qformer(query_embeds=query, encoder_hidden_states=tokens,
                            encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long))
        return model.language_projection(out.last_hidden_state)

    assert_merged_tokens_read_as_their_parts(model, images, lambda x: _features(model, x), reference)


def test_generation_batches_as_each_image_alone(images):
    """Greedy captions of a ragged batch are each image's alone."""
    model = blip2()
    prompt = torch.tensor([[IMAGE_TOKEN] * 4 + [2, 10, 11]] * len(images))
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        batch = model.generate(pixel_values=images, input_ids=prompt, max_new_tokens=5, do_sample=False)
        for i in range(len(images)):
            alone = model.generate(pixel_values=images[i : i + 1], input_ids=prompt[:1], max_new_tokens=5,
                                   do_sample=False)
            assert torch.equal(batch[i], alone[0])


def test_nothing_to_prune_unpatch_calibration_and_refusals(images):
    model = blip2()
    with torch.no_grad():
        ref = _features(model, images)
        saint.patch(model, "tome", r=0)
        assert torch.equal(_features(model, images), ref)
        with pytest.raises(ValueError, match="makes no attention weights"):
            model.vision_model(pixel_values=images, output_attentions=True)
        saint.unpatch(model)
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert not model.qformer._forward_pre_hooks
        assert torch.equal(_features(model, images), ref)
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_match")
    assert cal.reached and abs(cal.achieved / 1.4 - 1) < 0.1
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    model.vision_model(pixel_values=images)
    with pytest.raises(ValueError, match="call it only through the patched model"):
        model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=torch.zeros(1, 17, 32))


def test_instructblip_video_gives_each_clip_its_frames_alone(images):
    """InstructBLIP-Video's frames reach the tower as a batch of images, each with its own
    budget: a batch of clips gives each clip's query outputs as the clip alone."""
    model = blip2("instructblipvideo")
    clips = torch.stack([images, images.flip(0)], dim=0)  # [2 clips, 4 frames, 3, 32, 32]
    prompt = torch.tensor([[5, 6, 7]] * 2)
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        got = model.get_video_features(pixel_values=clips, qformer_input_ids=prompt).pooler_output
        assert saint.stats(model).layout == "packed" and bool(torch.isfinite(got).all())
        for i in range(2):
            alone = model.get_video_features(pixel_values=clips[i : i + 1], qformer_input_ids=prompt[:1]).pooler_output
            torch.testing.assert_close(got[i], alone[0], **TOL)

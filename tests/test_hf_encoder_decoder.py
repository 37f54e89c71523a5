"""Hugging Face ``VisionEncoderDecoderModel`` (ViT-GPT2 captioning, TrOCR): the encoder is
pruned through its own adapter and the decoder reads each image's real tokens (a merged one
as its parts) at every step, so each image's logits, greedy and beam-searched text are the
image's alone; nothing to prune and unpatching give the unpatched model bit for bit."""

from __future__ import annotations

import pytest
import torch

import saint
from saint.adapters import find_adapter

from .conftest import (
    assert_merged_tokens_read_as_their_parts,
    assert_nothing_to_prune_then_unpatch_exactly,
)

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=4)


def make(decoder: str = "gpt2", seed: int = 0) -> torch.nn.Module:
    """A tiny random vision encoder-decoder: a ViT encoder and a GPT-2 decoder (ViT-GPT2's
    captioning layout), or a DeiT encoder and a TrOCR decoder (TrOCR's)."""
    t = transformers
    torch.manual_seed(seed)
    if decoder == "gpt2":
        encoder = t.ViTModel(t.ViTConfig(**VISION))
        dec = t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32,
                                             add_cross_attention=True, is_decoder=True, bos_token_id=1,
                                             eos_token_id=2, pad_token_id=0))
    else:
        encoder = t.DeiTModel(t.DeiTConfig(**VISION))
        dec = t.TrOCRForCausalLM(t.TrOCRConfig(d_model=32, decoder_layers=2, decoder_attention_heads=2,
                                               decoder_ffn_dim=64, vocab_size=50, max_position_embeddings=32,
                                               cross_attention_hidden_size=32, bos_token_id=1, eos_token_id=2,
                                               pad_token_id=0, decoder_start_token_id=1))
    with torch.no_grad():  # weights of 0.02 (the decoders' init) let the image barely move the logits
        for m in dec.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(std=0.15)
    model = t.VisionEncoderDecoderModel(encoder=encoder, decoder=dec)
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = 1, 0, 2
    model.generation_config.decoder_start_token_id = 1
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model.eval()


def text(n: int) -> torch.Tensor:
    ids = torch.randint(3, 50, (n, 5), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 1
    return ids


def logits(model: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=images, decoder_input_ids=ids).logits


def generate(model: torch.nn.Module, images: torch.Tensor, beams: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(pixel_values=images, max_new_tokens=6, num_beams=beams, do_sample=False,
                              min_new_tokens=6)


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize(("method", "kw"), [("saint_match", dict(tau=0.6, fraction=0.7)), ("saint", dict(tau=0.6, k=1))])
@pytest.mark.parametrize("decoder", ["gpt2", "trocr"])
def test_each_image_is_captioned_as_alone(decoder, method, kw, layout, images):
    """A ragged batch: each image's teacher-forced logits, greedy and beam-searched captions
    equal the image's alone; pruning changes the logits."""
    model = make(decoder)
    ids = text(len(images))
    plain = logits(model, images, ids)
    saint.patch(model, method, layout=layout, **kw)
    assert find_adapter(model).name == "hf_vision_encoder_decoder"
    out = logits(model, images, ids)
    assert saint.stats(model).layout == layout and saint.stats(model).per_sample_differs()
    assert not torch.allclose(out, plain, atol=1e-3)
    greedy, beam = generate(model, images, 1), generate(model, images, 2)
    for i in range(len(images)):
        one = images[i : i + 1]
        torch.testing.assert_close(out[i : i + 1], logits(model, one, ids[i : i + 1]), **TOL)
        assert torch.equal(greedy[i : i + 1], generate(model, one, 1))
        assert torch.equal(beam[i : i + 1], generate(model, one, 2))


@pytest.mark.parametrize("decoder", ["gpt2", "trocr"])
def test_merged_tokens_are_read_as_their_parts_and_unpatch_is_exact(decoder, images):
    """After ToMe merges, the decoder's logits equal the unpatched decoder's over each image's
    encoder tokens repeated their sizes; with nothing to prune and after unpatching the model
    is the unpatched one bit for bit."""
    model = make(decoder)
    ids = text(1).expand(len(images), -1)  # one caption prefix for every image: the reference reads it too
    assert_merged_tokens_read_as_their_parts(
        model, images, lambda x: logits(model, x, ids),
        lambda tokens: model.decoder(input_ids=ids[:1], encoder_hidden_states=tokens).logits,
        tower=lambda m: m.encoder)


def test_the_protocol_runs_the_encoder_alone(images):
    """Calibration and the benchmarks see the encoder (its sites, its class token, its
    embedding); an encoder saint does not patch is refused naming what it patches."""
    model = make("gpt2")
    adapter = find_adapter(model)
    assert adapter.protected(model) == 1 and len(adapter.sites(model)) == 3
    emb, extra = adapter.embed(model, images)
    assert emb.shape == (len(images), 32) and extra is None
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_match")
    assert cal.reached and saint.is_patched(model) and saint.is_patched(model.encoder)
    with pytest.raises(ValueError, match="patched through its VisionEncoderDecoderModel"):
        saint.unpatch(model.encoder)
    saint.unpatch(model)
    assert_nothing_to_prune_then_unpatch_exactly(model, images, lambda x: logits(model, x, text(len(x))))
    swin = transformers.VisionEncoderDecoderModel(
        encoder=transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16,
                                                               depths=[1, 1], num_heads=[1, 1], window_size=2)),
        decoder=model.decoder)
    with pytest.raises(TypeError, match="cannot handle VisionEncoderDecoderModel"):
        saint.patch(swin, "tome", r=2)


def test_encoder_outputs_of_another_call_are_refused(images):
    # the decoder's key mask is the encoder's last call's: encoder_outputs of an earlier
    # batch of the same size were read with another batch's padding (NaN read as tokens)
    model = make()
    saint.patch(model, "saint_match", tau=0.6, fraction=0.7)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        want = model.generate(pixel_values=images, **kw)
        enc = model.encoder(pixel_values=images)
        assert torch.equal(model.generate(encoder_outputs=enc, **kw), want)  # its own, beams' copies too
        model.generate(encoder_outputs=enc, num_beams=2, **kw)
        model.encoder(pixel_values=images.flip(0))
        with pytest.raises(ValueError, match="encoder_outputs are not the patched encoder's last output"):
            model.generate(encoder_outputs=enc, **kw)


@pytest.mark.parametrize("after", ["unpatch", "repatch"])
def test_a_cache_continues_only_under_its_patch(after, images):
    # its cross-attention keys hold the padded, merged tokens only that patch masks: after
    # saint.unpatch, image 0 of a batch continued 0.009 off image 0 alone
    model = make()
    saint.patch(model, "saint_match", tau=0.6, fraction=0.7)
    kw = dict(max_new_tokens=1, return_dict_in_generate=True, do_sample=False)
    with torch.no_grad():
        first = model.generate(pixel_values=images, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True)
        model.generate(pixel_values=images, decoder_input_ids=first.sequences, past_key_values=first.past_key_values,
                       **kw)  # under its patch: continues
        saint.unpatch(model)
        if after == "repatch":
            saint.patch(model, "saint_match", tau=0.6, fraction=0.7)
        with pytest.raises(ValueError, match="pruned under a patch since removed"):
            model.generate(pixel_values=images, decoder_input_ids=first.sequences,
                           past_key_values=first.past_key_values, **kw)

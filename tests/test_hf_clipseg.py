"""Hugging Face CLIPSeg (``CLIPSegForImageSegmentation``): its decoder reads three of the
tower's hidden states whole, so saint runs the tower as a backbone with a merging method
(every layer's output one row per patch, the row of the token it became). Each image's
masks equal the image alone, in both layouts, with text or image prompts; the decoder's
inputs are the traced origins' rows; dropping methods are refused."""

from __future__ import annotations

import pytest
import torch

import saint
from saint.adapters import find_adapter, handle_of

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)


def make(seed: int = 0) -> torch.nn.Module:
    """A tiny random CLIPSeg on 32x32 images (64 patches of 4x4), decoding blocks 0-2."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=4)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=62, eos_token_id=63, pad_token_id=0)
    config = transformers.CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=32,
                                        extract_layers=[0, 1, 2], reduce_dim=16, decoder_num_attention_heads=2,
                                        decoder_intermediate_size=32)
    torch.manual_seed(seed)
    return transformers.CLIPSegForImageSegmentation(config).eval()


def prompts(n: int) -> torch.Tensor:
    """One text prompt per image (token ids ending in the end-of-text id)."""
    ids = torch.randint(1, 60, (n, 6), generator=torch.Generator().manual_seed(2))
    ids[:, -1] = 63
    return ids


def masks(model: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=images).logits


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize(("method", "kw"), [("saint_match", dict(tau=0.3, fraction=0.7)), ("saint_plus", dict(tau=0.3)),
                                            ("tome", dict(r=5))])
def test_each_image_segments_as_alone(method, kw, layout, images):
    """A ragged batch: every image's mask logits equal the image run alone (its prompt with
    it); the packed and padded layouts agree; pruning changes the masks."""
    model = make()
    ids = prompts(len(images))
    plain = masks(model, images, ids)
    saint.patch(model, method, layout=layout, **kw)
    assert find_adapter(model).name == "hf_vit"
    out = masks(model, images, ids)
    assert out.shape == plain.shape and (method == "tome" or saint.stats(model).layout == layout)
    for i in range(len(images)):
        torch.testing.assert_close(out[i : i + 1], masks(model, images[i : i + 1], ids[i : i + 1]), **TOL)
    assert not torch.allclose(out, plain, atol=1e-3)
    saint.patch(model, method, layout="padded" if layout == "packed" else "packed", **kw)
    torch.testing.assert_close(masks(model, images, ids), out, **TOL)


def test_the_decoder_reads_each_patch_as_the_token_it_became_and_image_prompts(images):
    """The hidden states the decoder reads lie on the grid: patches merged together hold
    equal rows; an image prompt (``conditional_pixel_values``, the same tower pooled) runs
    pruned too, each image as alone; the protocol embeds the image side alone and
    calibration reaches a FLOPs target; a dropping method is refused; unpatching restores
    the masks bit for bit."""
    model = make()
    ids = prompts(len(images))
    plain = masks(model, images, ids)
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7, trace=True)
    activations = find_adapter(model).forward(model, images)  # [B, 3, 65, C]
    assert saint.stats(model).layout == "packed"
    origin = handle_of(model).origins()  # one [B, 65] per pruning block
    last = activations[:, -1]
    for i in range(len(images)):
        for pos in origin[-1][i].unique():
            rows = last[i][origin[-1][i] == pos]
            assert torch.equal(rows, rows[:1].expand_as(rows))
    with torch.no_grad():
        out = model(pixel_values=images, conditional_pixel_values=images.flip(0)).logits
        for i in range(len(images)):
            alone = model(pixel_values=images[i : i + 1], conditional_pixel_values=images.flip(0)[i : i + 1]).logits
            torch.testing.assert_close(out[i : i + 1], alone, **TOL)
    saint.unpatch(model)
    assert torch.equal(masks(model, images, ids), plain)
    emb, logits = find_adapter(model).embed(model, images)
    assert emb.shape == (len(images), 3 * 65 * 32) and logits is None
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_match")
    assert cal.reached and saint.is_patched(model)
    with pytest.raises(ValueError, match="need a row for every patch"):
        saint.patch(model, "saint", tau=0.3, k=1)

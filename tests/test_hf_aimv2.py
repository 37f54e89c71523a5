"""Hugging Face AIMv2 (RMS norms, SwiGLU MLP, attention-pooling head): patch, prune and
unpatch a tiny random tower and dual encoder; each image's result equals the image alone."""

from __future__ import annotations

import pytest
import torch

import saint
from saint.adapters import find_adapter, hf_aimv2

transformers = pytest.importorskip("transformers")

N = (32 // 8) ** 2
RAGGED = {
    "saint": dict(tau=0.3, k=1),
    "saint_fold": dict(tau=0.3, k=1),
    "saint_plus": dict(tau=0.3),
    "saint_match": dict(tau=0.2, fraction=0.5),
}


def make(use_head: bool = True, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Aimv2VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                         num_attention_heads=2, image_size=32, patch_size=8, use_head=use_head,
                                         qkv_bias=True, attn_implementation=attn)  # fmt: skip
    model = transformers.Aimv2VisionModel(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1 and the head's query to 0: randomise them
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1 or name.endswith("cls_token"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("use_head", [True, False])
@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("method", sorted(RAGGED))
def test_packed_equals_padded_equals_alone(method, select_at, use_head, images):
    model = make(use_head)
    adapter = find_adapter(model)
    outs = {}
    for layout in ("packed", "padded"):
        saint.patch(model, method, layout=layout, select_at=select_at, **RAGGED[method])
        with torch.no_grad():
            emb, _ = adapter.embed(model, images)
            stats = saint.stats(model)
            solo = torch.cat([adapter.embed(model, images[i : i + 1])[0] for i in range(len(images))])
        assert stats.layout == layout and stats.per_sample_differs()
        torch.testing.assert_close(emb, solo, rtol=0, atol=1e-5)
        outs[layout] = emb
        saint.unpatch(model)
    torch.testing.assert_close(outs["packed"], outs["padded"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_nothing_to_prune_and_unpatch_are_bit_identical(attn, images):
    model = make(attn=attn)
    with torch.no_grad():
        ref = model(pixel_values=images, output_hidden_states=True)
    saint.patch(model, "saint", k=100)  # no candidate can have 100 links
    with torch.no_grad():
        out = model(pixel_values=images, output_hidden_states=True)
    assert torch.equal(out.pooler_output, ref.pooler_output)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states, strict=True))
    saint.patch(model, "tome", r=2)
    saint.unpatch(model)
    with torch.no_grad():
        again = model(pixel_values=images)
    assert torch.equal(again.pooler_output, ref.pooler_output)
    assert torch.equal(again.last_hidden_state, ref.last_hidden_state)


def test_pooling_head_weights_merged_keys_by_size():
    """Known answer: the head over tokens ``[a, a, b]`` equals saint's head over ``[a, b]``
    with sizes ``[2, 1]`` (proportional attention is exact for identical tokens), and with
    sizes 1 it is the model's own head."""
    head = make().head
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 1, 32, generator=g), torch.randn(1, 1, 32, generator=g)
    with torch.no_grad():
        own = head(torch.cat([a, a, b], dim=1))
        merged = hf_aimv2._pool(head, torch.cat([a, b], dim=1), torch.tensor([[2.0, 1.0]]).log())
        plain = hf_aimv2._pool(head, torch.cat([a, b], dim=1), torch.zeros(1, 2))
        unmerged = head(torch.cat([a, b], dim=1))
    torch.testing.assert_close(merged, own, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain, unmerged, rtol=0, atol=1e-6)
    assert not torch.allclose(merged, plain)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_block_flops_match_the_flop_counter(attn):
    from saint.measure.flops import count_flops

    model = make(attn=attn)
    x = torch.randn(2, N, 32)
    total, _ = count_flops(lambda: model.encoder.layers[0](x))
    assert find_adapter(model).block_flops(model, N, N) == total / 2


def test_dual_model_prunes_its_vision_side(images):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=100)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = transformers.Aimv2Model(transformers.Aimv2Config(text_config=text, vision_config=vision,
                                                             projection_dim=16)).eval()
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2]])
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=images)
    saint.patch(model, "saint_match", tau=0.2, fraction=0.5)
    assert find_adapter(model).name == "hf_aimv2"
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=images).pooler_output
        tower = model.vision_model(pixel_values=images).pooler_output
        out = model(input_ids=ids, pixel_values=images)
        solo = torch.cat([model.get_image_features(pixel_values=images[i : i + 1]).pooler_output
                          for i in range(len(images))])
    torch.testing.assert_close(feats, model.visual_projection(tower), rtol=0, atol=1e-6)
    torch.testing.assert_close(feats, solo, rtol=0, atol=1e-5)
    assert torch.equal(out.text_embeds, ref.text_embeds)
    assert not torch.allclose(out.image_embeds, ref.image_embeds)
    with pytest.raises(ValueError, match="patched through its Aimv2Model"):
        saint.unpatch(model.vision_model)
    saint.unpatch(model)
    with torch.no_grad():
        again = model(input_ids=ids, pixel_values=images)
    assert torch.equal(again.logits_per_image, ref.logits_per_image)


def test_refusals(images):
    model = make()
    with pytest.raises(ValueError, match="class token"):
        saint.patch(model, "attn", r=1)
    with pytest.raises(ValueError, match="class token"):
        saint.patch(model, "saint_match", tau=0.2, fraction=0.5, guard=0.1)
    saint.patch(model, "tome", r=2)
    with pytest.raises(ValueError, match="call the head only through the patched model"):
        with torch.no_grad():
            model(pixel_values=images)
            model.head(torch.randn(4, N, 32))

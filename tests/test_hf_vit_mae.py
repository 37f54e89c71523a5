"""Hugging Face ``ViTMAEModel`` (MAE's encoder): ViT's layers over the class token and the
patches its random masking leaves visible, in the shuffled order it returns. With the masking's
noise given, each image's tokens equal the image's alone (every layout, every kind of method);
kept tokens run as the model's own layers run them; the masking's outputs are untouched;
nothing to prune and unpatch are bit for bit; the pretraining model is refused."""

from __future__ import annotations

import pytest
import torch

import saint
from saint.adapters import find_adapter, handle_of

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=0, atol=1e-5)
PATCHES = (32 // 8) ** 2
METHODS = {"saint": dict(tau=0.3, k=1), "saint_match": dict(tau=0.3, fraction=0.7, guard=0.2),
           "tome": dict(r=2), "saint_plus": dict(tau=0.3, k=1)}


def make(mask_ratio: float, impl: str = "sdpa") -> torch.nn.Module:
    """A tiny random ``ViTMAEModel`` whose norms and class token are away from 1 / 0."""
    torch.manual_seed(0)
    config = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8, mask_ratio=mask_ratio,
                                       attn_implementation=impl)
    model = transformers.ViTMAEModel(config)
    with torch.no_grad():
        model.embeddings.cls_token.normal_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(std=0.1)
    return model.eval()


def noise_for(images: torch.Tensor) -> torch.Tensor:
    return torch.rand(len(images), PATCHES, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_each_image_is_its_own_alone(mask_ratio, method, layout, images):
    """With the masking's noise given, each image's real tokens after a ragged (or merged)
    batch equal the image run alone; the masking's ``mask`` and ``ids_restore`` are the
    unpatched model's."""
    model = make(mask_ratio)
    noise = noise_for(images)
    with torch.no_grad():
        ref = model(pixel_values=images, noise=noise)
    saint.patch(model, method, layout=layout, **METHODS[method])
    with torch.no_grad():
        out = model(pixel_values=images, noise=noise)
        mask = saint.token_mask(model)
        tokens = saint.per_image(out.last_hidden_state, mask)
        assert torch.equal(out.mask, ref.mask) and torch.equal(out.ids_restore, ref.ids_restore)
        assert min(saint.stats(model).tokens[-1]) < 1 + int(PATCHES * (1 - mask_ratio))
        for i in range(len(images)):
            alone = model(pixel_values=images[i : i + 1], noise=noise[i : i + 1]).last_hidden_state[0]
            torch.testing.assert_close(tokens[i], alone[~alone[:, 0].isnan()], **TOL)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
def test_kept_tokens_run_as_the_models_own_layers(select_at, images):
    """Dropping in layer 1 (ragged, packed): each image's last hidden state equals the
    model's own layers run on the visible tokens with the dropped ones removed there (known
    answer; before attention, or between its attention and its MLP)."""
    model = make(0.25)
    noise = noise_for(images)
    saint.patch(model, "saint", tau=0.3, k=1, layers=[1], select_at=select_at, trace=True)
    with torch.no_grad():
        out = model(pixel_values=images, noise=noise).last_hidden_state
    assert saint.stats(model).layout == "packed" and saint.stats(model).per_sample_differs()
    origin = handle_of(model).origins()[0]
    saint.unpatch(model)
    with torch.no_grad():
        for i in range(len(images)):
            kept = torch.nonzero(origin[i] >= 0).flatten()
            assert kept[0] == 0 and len(kept) < origin.shape[1]
            x = model.embeddings(images[i : i + 1], noise=noise[i : i + 1])[0]
            x = model.layers[0](x)
            layer = model.layers[1]
            if select_at == "attention":
                x = layer(x[:, kept])
            else:
                x = x + layer.attention(layer.layernorm_before(x))[0]
                x = x[:, kept]
                x = x + layer.mlp(layer.layernorm_after(x))
            for later in model.layers[2:]:
                x = later(x)
            torch.testing.assert_close(out[i, : len(kept)], model.layernorm(x)[0], **TOL)


def test_nothing_to_prune_unpatch_embed_and_refusals(images):
    """Nothing to prune gives the unpatched model's tokens bit for bit, and so does unpatching;
    the adapter protects the class token and embeds it; the pretraining model (its decoder puts
    every visible token back at its place) is refused with what to prune instead."""
    model = make(0.5)
    noise = noise_for(images)
    with torch.no_grad():
        ref = model(pixel_values=images, noise=noise).last_hidden_state
        saint.patch(model, "tome", r=0)
        assert torch.equal(model(pixel_values=images, noise=noise).last_hidden_state, ref)
        saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
        adapter = find_adapter(model)
        assert adapter.protected(model) == 1
        torch.manual_seed(3)  # the masking draws its noise: the embedding reads the same call's class token
        emb, logits = adapter.embed(model, images)
        torch.manual_seed(3)
        want = model(pixel_values=images).last_hidden_state[:, 0]
        assert logits is None and torch.equal(emb, want)
        saint.unpatch(model)
        assert torch.equal(model(pixel_values=images, noise=noise).last_hidden_state, ref)
    pretraining = transformers.ViTMAEForPreTraining(model.config).eval()
    with pytest.raises(TypeError, match="prune a ViTMAEModel"):
        saint.patch(pretraining, "tome", r=2)
    assert not saint.is_patched(pretraining)

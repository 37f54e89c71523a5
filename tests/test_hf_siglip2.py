"""Hugging Face Siglip2 (NaFlex): a batch of images at their own aspect ratios is padded
before any pruning; saint starts from its real patches, so each image's result equals the
image run alone, in the packed and the padded layout, for every method and placement."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import saint
from saint.adapters import find_adapter, hf_siglip2

transformers = pytest.importorskip("transformers")

P = 4  # patch size
SHAPES = [(4, 4), (3, 5), (2, 3)]  # each image's patch grid; max_num_patches 16 pads the last two
METHODS = {
    "saint": dict(tau=0.3, k=1, layers=[0, 1]),
    "saint_fold": dict(tau=0.3, k=1, layers=[0, 1]),
    "saint_plus": dict(tau=0.3),
    "saint_match": dict(tau=0.2, fraction=0.5),
    "tome": dict(r=1),
    "random": dict(r=1),
    "budget": dict(keep=4, layers=[1]),
}


def make(attn: str = "sdpa", **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=2, patch_size=P, num_patches=16,
                                           attn_implementation=attn, **extra)  # fmt: skip
    model = transformers.Siglip2VisionModel(cfg).eval()
    with torch.no_grad():  # HF initialises every LayerNorm to 1/0: randomise them
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return model


def images(shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = [torch.randn(1, 3, P * h, P * w, generator=g) for h, w in shapes]
    out[0] = out[0] * 0.1 + 0.3  # a redundant image
    return out


def naflex(imgs: list[torch.Tensor], n: int = 16) -> Any:
    """What Siglip2's processor makes of these images: patches padded to ``n``, a mask, the grids."""
    pv = torch.zeros(len(imgs), n, P * P * 3)
    mask = torch.zeros(len(imgs), n, dtype=torch.int32)
    shapes = []
    for i, img in enumerate(imgs):
        d = hf_siglip2.patchify(img, P)
        k = d["pixel_values"].shape[1]
        pv[i, :k], mask[i, :k] = d["pixel_values"][0], 1
        shapes.append(d["spatial_shapes"][0])
    # the processor's own output type (a Mapping, not a dict)
    return transformers.BatchFeature({"pixel_values": pv, "pixel_attention_mask": mask,
                                      "spatial_shapes": torch.stack(shapes)})


def alone(model, imgs) -> torch.Tensor:
    """Each image run by itself, unpadded."""
    return torch.cat([model(**hf_siglip2.patchify(img, P)).pooler_output for img in imgs])


def test_patchify_is_the_image_processors_layout():
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    img = torch.randn(1, 3, 12, 20)
    d = hf_siglip2.patchify(img, P)
    assert torch.equal(d["pixel_values"][0], convert_image_to_patches(img[0], P))
    assert d["spatial_shapes"].tolist() == [[3, 5]] and bool(d["pixel_attention_mask"].all())
    with pytest.raises(ValueError, match="multiples of 4"):
        hf_siglip2.patchify(torch.randn(1, 3, 10, 12), P)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_padded_batch_packed_equals_padded_equals_alone(method, select_at):
    model = make()
    imgs = images()
    inputs = naflex(imgs)
    outs = {}
    for layout in ("packed", "padded"):
        saint.patch(model, method, layout=layout, select_at=select_at, **METHODS[method])
        with torch.no_grad():
            out = model(**inputs)
            stats = saint.stats(model)
            mask = saint.token_mask(model)
            solo = alone(model, imgs)
        assert stats.layout == layout
        assert stats.tokens[0] == [h * w for h, w in SHAPES], "the first layer sees each image's real patches"
        assert stats.tokens[-1] != stats.tokens[0], "the settings prune"
        torch.testing.assert_close(out.pooler_output, solo, rtol=0, atol=1e-5)
        if mask is not None:  # the output's real tokens, and padding that cannot pass for one
            assert bool(torch.isfinite(out.last_hidden_state[mask]).all())
            if layout == "packed":
                assert bool(out.last_hidden_state[~mask].isnan().all())
        outs[layout] = out
        saint.unpatch(model)
    torch.testing.assert_close(outs["packed"].pooler_output, outs["padded"].pooler_output, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_tome_r_above_an_image_s_half_merges_what_the_image_merges_alone(layout):
    """ToMe's r is at most half of each image's patches (the reference's clamp, image by
    image): the 6-patch image merges 3, 1 and 1 where the 16-patch one merges 4 each time."""
    model = make()
    imgs = images()
    saint.patch(model, "tome", r=4, layout=layout)
    with torch.no_grad():
        out = model(**naflex(imgs))
        stats = saint.stats(model)
        solo = alone(model, imgs)
    assert stats.tokens == [[n - m for n, m in zip((16, 15, 6), merged, strict=True)]
                            for merged in ([0, 0, 0], [4, 4, 3], [8, 8, 4], [12, 11, 5])]
    torch.testing.assert_close(out.pooler_output, solo, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_nothing_to_prune_equals_the_model(attn):
    """A padded batch with nothing to prune runs only the real patches: each image's
    pooled output and real tokens equal the unpatched model's on the image alone (and its
    own padded batch), padding is NaN; an unpadded batch is the unpatched answer bit for bit."""
    model = make(attn)
    imgs = images()
    inputs = naflex(imgs)
    with torch.no_grad():
        ref = model(**inputs)
        ref_alone = [model(**hf_siglip2.patchify(img, P)) for img in imgs]
        full = hf_siglip2.patchify(torch.cat([images([(4, 4)])[0]] * 2 + [torch.randn(1, 3, 16, 16)]), P)
        ref_full = model(**full)
    saint.patch(model, "saint", tau=1.0, k=1)
    with torch.no_grad():
        out = model(**inputs)
        mask = saint.token_mask(model)
        assert saint.stats(model).layout == "packed"
        same = model(**full)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=1e-5)
    assert mask.sum(dim=1).tolist() == [h * w for h, w in SHAPES]
    for i, r in enumerate(ref_alone):
        torch.testing.assert_close(out.pooler_output[i], r.pooler_output[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.last_hidden_state[i][mask[i]], r.last_hidden_state[0], rtol=0, atol=1e-5)
    assert bool(out.last_hidden_state[~mask].isnan().all())
    assert torch.equal(same.pooler_output, ref_full.pooler_output)
    assert torch.equal(same.last_hidden_state, ref_full.last_hidden_state)
    saint.unpatch(model)
    with torch.no_grad():
        again = model(**inputs)
    assert torch.equal(again.pooler_output, ref.pooler_output)
    assert torch.equal(again.last_hidden_state, ref.last_hidden_state)


def test_hidden_states_are_per_image():
    model = saint.patch(make(), "saint_match", tau=0.2, fraction=0.5)
    imgs = images()
    with torch.no_grad():
        out = model(**naflex(imgs), output_hidden_states=True)
        handle = saint.adapters.handle_of(model)
        valid = [handle.hidden_state_valid(i) for i in range(len(out.hidden_states))]
        solo = [model(**hf_siglip2.patchify(img, P), output_hidden_states=True).hidden_states for img in imgs]
    assert torch.equal(valid[0], naflex(imgs)["pixel_attention_mask"].bool())
    for layer in range(1, len(out.hidden_states)):
        h = out.hidden_states[layer]
        for i in range(len(imgs)):
            real = h[i][valid[layer][i]]
            torch.testing.assert_close(real, solo[i][layer][0], rtol=0, atol=1e-5)
        assert bool(h[~valid[layer]].isnan().all())


def test_dual_model_prunes_its_vision_side():
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, patch_size=P,
                  num_patches=16)
    model = transformers.Siglip2Model(transformers.Siglip2Config(text_config=text, vision_config=vision)).eval()
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2]])
    imgs = images()
    inputs = naflex(imgs)
    with torch.no_grad():
        ref = model(input_ids=ids, **inputs)
    saint.patch(model, "saint_match", tau=0.2, fraction=0.5)
    assert find_adapter(model).name == "hf_siglip2"
    with torch.no_grad():
        feats = model.get_image_features(**inputs).pooler_output
        out = model(input_ids=ids, **inputs)
        solo = torch.cat([model.get_image_features(**hf_siglip2.patchify(img, P)).pooler_output for img in imgs])
    torch.testing.assert_close(feats, solo, rtol=0, atol=1e-5)
    assert torch.equal(out.text_embeds, ref.text_embeds)
    assert not torch.allclose(out.image_embeds, ref.image_embeds)
    with pytest.raises(ValueError, match="patched through its Siglip2Model"):
        saint.unpatch(model.vision_model)
    saint.unpatch(model)
    with torch.no_grad():
        again = model(input_ids=ids, **inputs)
    assert torch.equal(again.logits_per_image, ref.logits_per_image)


def test_gradient_checkpointing_recomputes_from_the_padding():
    """HF recomputes checkpointed layers with the model's padding mask during backward."""
    inputs = naflex(images())

    def run(checkpointing: bool):
        model = make().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        saint.patch(model, "saint", tau=0.3, k=1, layers=[0, 1])
        x = inputs["pixel_values"].clone().requires_grad_(True)
        out = model(**{**inputs, "pixel_values": x}).pooler_output
        out.square().sum().backward()
        return out.detach(), x.grad, saint.stats(model).tokens

    ref, ckpt = run(False), run(True)
    torch.testing.assert_close(ckpt[0], ref[0], rtol=0, atol=0)
    assert torch.equal(ckpt[1], ref[1]) and ckpt[2] == ref[2]
    assert bool((ref[1][inputs["pixel_attention_mask"] == 0] == 0).all()), "padding patches get no gradient"


def test_refusals():
    model = make()
    with pytest.raises(ValueError, match="class token"):
        saint.patch(model, "attn", r=1)
    saint.patch(model, "saint", tau=0.3, k=1)
    inputs = naflex(images())
    holed = inputs["pixel_attention_mask"].clone()
    holed[1, 2] = 0
    with pytest.raises(ValueError, match="real patches first"):
        model(**{**inputs, "pixel_attention_mask": holed})
    empty = inputs["pixel_attention_mask"].clone()
    empty[2] = 0
    with pytest.raises(ValueError, match="no real patch"):
        model(**{**inputs, "pixel_attention_mask": empty})
    x = torch.randn(1, 16, 32)
    with pytest.raises(ValueError, match="cannot take an attention_mask"):
        model.encoder(inputs_embeds=x, attention_mask=torch.zeros(1, 1, 16, 16))
    saint.unpatch(model)


@pytest.mark.parametrize("method,kw", [("tome", dict(r=1)), ("saint", dict(tau=0.3, k=1))])
def test_attention_weights_of_a_padded_input_are_refused_when_packed(method, kw):
    """A NaFlex batch is ragged from its input: ToMe (equal counts on rectangular input)
    packs it too, and returned no attention weights without a word; refused as the ragged
    methods are, and with the padded layout each layer's weights are given."""
    inputs = naflex(images())
    assert not bool(inputs["pixel_attention_mask"].bool().all())
    model = saint.patch(make("eager"), method, **kw)
    with torch.no_grad(), pytest.raises(ValueError, match="per-image attention of a packed batch"):
        model(**inputs, output_attentions=True)
    saint.patch(model, method, layout="padded", **kw)
    with torch.no_grad():
        assert len(model(**inputs, output_attentions=True).attentions) == model.config.num_hidden_layers


def test_protocol_takes_images_and_processor_dicts():
    model = make()
    adapter = find_adapter(model)
    imgs = images()
    inputs = naflex(imgs)
    assert adapter.batch_size(inputs) == 3
    parts = list(adapter.split(inputs, 2))
    assert [adapter.batch_size(p) for p in parts] == [2, 1]
    adapter.check_inputs(inputs)
    with pytest.raises(ValueError, match="missing"):
        adapter.check_inputs({"pixel_values": inputs["pixel_values"]})
    with torch.no_grad():
        emb, logits = adapter.embed(model, inputs)
        solo = alone(model, imgs)
    assert logits is None
    torch.testing.assert_close(emb, solo, rtol=0, atol=1e-5)
    square = torch.randn(2, 3, 16, 16)
    assert (adapter.grid(model, square).rows, adapter.grid(model, square).cols) == (4, 4)
    assert (adapter.grid(model).rows, adapter.grid(model).cols) == (4, 4)
    with pytest.raises(ValueError, match="different patch grids"):
        adapter.grid(model, inputs)


def test_copies_and_threads_keep_their_own_padding():
    """A deep copy is an independent patched model; two threads calling one model with
    differently padded batches each get their own images' answers."""
    import copy
    import threading

    model = saint.patch(make(), "saint_match", tau=0.2, fraction=0.5)
    imgs = images()
    batches = [naflex(imgs), naflex(imgs[1:]), naflex(imgs[::-1])]
    with torch.no_grad():
        expected = [model(**b).pooler_output for b in batches]
        twin = copy.deepcopy(model)
        assert torch.equal(twin(**batches[0]).pooler_output, expected[0])
    results: dict[int, list[torch.Tensor]] = {}

    def work(i: int) -> None:
        with torch.no_grad():
            results[i] = [model(**batches[i]).pooler_output for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        for r in results[i]:
            torch.testing.assert_close(r, expected[i], rtol=0, atol=1e-6)


def test_calibration_and_harness_take_padded_processor_dicts():
    """The tools run on NaFlex dicts whose images have different grids: calibration hits
    its target on the real patches, the harness counts what each variant computes."""
    from saint.measure.harness import Harness
    from saint.spec import BASELINE, Variant

    model = make()
    inputs = naflex(images() * 3)
    assert find_adapter(model).max_patches(model, inputs) == 16
    cal = saint.calibrate(model, inputs, flops_speedup=1.5, method="saint_match")
    assert cal.achieved == pytest.approx(1.5, rel=0.05)
    saint.unpatch(model)
    base, pruned = Harness(model).measure([BASELINE, Variant("tome", "tome", {"r": 1})], inputs, warmup=0,
                                          repeats=1, memory=False)
    assert base.tokens[0] == 16, "the unpatched model computes every padded position"
    assert pruned.tokens[0] == pytest.approx(sum(h * w for h, w in SHAPES) / 3), "saint computes the real patches"
    assert pruned.flops_per_image < base.flops_per_image


def test_analysis_refuses_a_batch_padded_by_its_processor():
    """``token_evolution`` reads every token of a batch: a NaFlex batch's padding counted as
    patches (an image's statistics differed from its own alone). Refused, named."""
    from saint.analysis import token_evolution

    with pytest.raises(ValueError, match="this batch is padded"):
        token_evolution(make(), [naflex(images())])

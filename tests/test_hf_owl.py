"""Hugging Face OWL-ViT and OWLv2 detectors (``OwlViTForObjectDetection``,
``Owlv2ForObjectDetection``): their class and box heads read every patch of the grid, so
saint runs their vision transformer as a backbone with a merging method (each patch holds the
token it became). Each image's detections equal the image alone, in both layouts; the maps
are the unpatched heads' inputs through the traced origins; dropping methods are refused."""

from __future__ import annotations

import pytest
import torch

import saint
from saint.adapters import find_adapter, handle_of

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)  # OWL-ViT's logits run to ~20
QUERIES = 2  # text queries per image


def make(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random OWL-ViT or OWLv2 detector on 32x32 images (64 patches of 4x4)."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=4)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=62, eos_token_id=63, pad_token_id=0)
    torch.manual_seed(seed)
    if kind == "owlv2":
        config = transformers.Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
        return transformers.Owlv2ForObjectDetection(config).eval()
    config = transformers.OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32)
    return transformers.OwlViTForObjectDetection(config).eval()


def queries(n: int) -> torch.Tensor:
    """``QUERIES`` text queries per image (token ids, no padding)."""
    return torch.randint(1, 64, (n * QUERIES, 6), generator=torch.Generator().manual_seed(2))


def detect(model: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Class logits, boxes (and OWLv2's objectness) for ``images`` and their text queries."""
    with torch.no_grad():
        out = model(input_ids=queries(len(images)) if ids is None else ids, pixel_values=images)
    keys = ["logits", "pred_boxes"] + (["objectness_logits"] if out.get("objectness_logits") is not None else [])
    return {k: out[k] for k in keys}


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize(("method", "kw"), [("saint_match", dict(tau=0.3, fraction=0.7)), ("saint_plus", dict(tau=0.3)),
                                            ("tome", dict(r=5))])
@pytest.mark.parametrize("kind", ["owlvit", "owlv2"])
def test_each_image_detects_as_alone(kind, method, kw, layout, images):
    """A ragged batch: every image's class logits, boxes (and OWLv2's objectness) equal the
    image run alone; the packed and padded layouts agree; the text side is untouched."""
    model = make(kind)
    plain = detect(model, images)
    saint.patch(model, method, layout=layout, **kw)
    assert find_adapter(model).name == "hf_vit"
    out = detect(model, images)
    stats = saint.stats(model)
    assert stats.tokens[-1] != stats.tokens[0] and (method == "tome" or stats.layout == layout)
    for i in range(len(images)):
        alone = detect(model, images[i : i + 1], queries(len(images))[i * QUERIES : (i + 1) * QUERIES])
        for key, value in out.items():
            torch.testing.assert_close(value[i : i + 1], alone[key], **TOL)
    assert not torch.allclose(out["logits"], plain["logits"], atol=1e-3)
    other = "padded" if layout == "packed" else "packed"
    saint.patch(model, method, layout=other, **kw)
    for key, value in detect(model, images).items():
        torch.testing.assert_close(value, out[key], **TOL)


@pytest.mark.parametrize("kind", ["owlvit", "owlv2"])
def test_every_patch_holds_the_token_it_became(kind, images):
    """The tower's last hidden state lies on the grid: each patch's row is the row of the
    token it became (rows of patches merged together are equal); the heads read those maps
    as they read the unpatched ones, so the class token and the grid keep their shape."""
    model = make(kind)
    tower = model.owlv2.vision_model if kind == "owlv2" else model.owlvit.vision_model
    seen = {}
    hook = tower.register_forward_hook(lambda m, a, out: seen.update(h=out.last_hidden_state))
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7, trace=True)
    with torch.no_grad():
        embeds = model.image_embedder(pixel_values=images)[0]
    hook.remove()
    assert saint.stats(model).layout == "packed"
    hidden, origin = seen["h"], handle_of(model).origins()[-1]  # [B, 65, C]; [B, 65] positions after the last step
    assert hidden.shape == (len(images), 65, 32) and embeds.shape == (len(images), 8, 8, 32)
    assert bool(torch.isfinite(hidden).all())
    for i in range(len(images)):
        for pos in origin[i].unique():
            rows = hidden[i][origin[i] == pos]
            assert torch.equal(rows, rows[:1].expand_as(rows))
        assert len(origin[i].unique()) < 65


def test_image_guided_detection_and_the_protocol(images):
    """Image-guided detection runs both images' towers pruned, each image as alone; the
    adapter embeds the image side alone (no text needed) and calibration reaches a FLOPs
    target; dropping methods are refused (a dropped patch has no row for the heads)."""
    model = make("owlv2")
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        out = model.image_guided_detection(pixel_values=images, query_pixel_values=images.flip(0))
        assert saint.stats(model).layout == "packed"
        for i in range(len(images)):
            alone = model.image_guided_detection(pixel_values=images[i : i + 1],
                                                 query_pixel_values=images.flip(0)[i : i + 1])
            torch.testing.assert_close(out.logits[i : i + 1], alone.logits, **TOL)
            torch.testing.assert_close(out.target_pred_boxes[i : i + 1], alone.target_pred_boxes, **TOL)
    saint.unpatch(model)
    adapter = find_adapter(model)
    emb, logits = adapter.embed(model, images)
    assert emb.shape == (len(images), 64 * 32) and logits is None
    assert adapter.grid(model).num_patches == 64 and adapter.protected(model) == 1
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_match")
    assert cal.reached and saint.is_patched(model)
    with pytest.raises(ValueError, match="need a row for every patch"):
        saint.patch(model, "saint", tau=0.3, k=1)


@pytest.mark.parametrize("kind", ["owlvit", "owlv2"])
def test_nothing_to_prune_and_unpatch_are_the_unpatched_detector(kind, images):
    """A merging method that merges nothing leaves the detections bit for bit; unpatching
    after a pruned forward gives them back bit for bit too."""
    model = make(kind)
    plain = detect(model, images)
    saint.patch(model, "saint_match", tau=1.0, fraction=0.7)
    assert all(torch.equal(v, plain[k]) for k, v in detect(model, images).items())
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    detect(model, images)
    saint.unpatch(model)
    assert all(torch.equal(v, plain[k]) for k, v in detect(model, images).items())


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_attention_weights_are_refused_on_the_unmerged_hidden_states(layout, images):
    # the padded layout returned weights over the merged, padded tokens beside hidden states
    # on the input's grid, with no mask for their padding rows (which looked real)
    model = make("owlvit")
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7, layout=layout)
    with torch.no_grad(), pytest.raises(ValueError, match="unpatch it to read output_attentions"):
        model.owlvit.vision_model(pixel_values=images, output_attentions=True)

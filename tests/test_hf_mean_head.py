"""Hugging Face classifiers that average their tower's tokens (CLIP, MetaCLIP 2, SigLIP,
Siglip2, DINOv2 with and without registers, I-JEPA): the model's own forward runs and its
classifier reads each image's mean over the original patches of the token each became."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters import find_adapter  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .conftest import assert_two_threads_agree  # noqa: E402
from .test_hf_vision import make_classifier  # noqa: E402
from .test_hf_vit import PROTECTED, make  # noqa: E402

TOL = dict(rtol=0, atol=1e-5)
VIT_KINDS = ("dinov2_classifier", "dinov2_reg_classifier", "ijepa_classifier")
VISION_KINDS = ("clip_classifier", "metaclip_2_classifier", "siglip_classifier")
PREFIX = {**{k: PROTECTED[k] for k in VIT_KINDS}, "clip_classifier": 1, "metaclip_2_classifier": 1,
          "siglip_classifier": 0}
WITH_CLS = ("dinov2_classifier", "dinov2_reg_classifier")  # the class token goes before the mean
# a rectangular merge, a ragged merge and a ragged drop
METHODS = [("tome", dict(r=3)), ("saint_match", dict(tau=0.3, fraction=0.7)), ("saint", dict(tau=0.3, k=1))]


def classifier(kind: str) -> torch.nn.Module:
    return make(kind) if kind in VIT_KINDS else make_classifier(kind)


def what_every_patch_became(kind: str, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The expected features, from the traced origins: each image's mean over its original
    patches (after the prefix) of the token each one ended in (a dropped patch counts for
    nothing), with the class token before it where the model puts it there."""
    with torch.no_grad():  # the tower the classifier holds, as it ran in the model's call
        hidden = get_handle(model).tower(pixel_values=images).last_hidden_state
    origin = get_handle(model).origins()[-1]
    skip = PREFIX[kind]
    rows = []
    for i in range(len(images)):
        became = origin[i, skip:][origin[i, skip:] >= 0]
        mean = hidden[i, became].mean(dim=0)
        rows.append(torch.cat([hidden[i, 0], mean]) if kind in WITH_CLS else mean)
    return torch.stack(rows)


@pytest.mark.parametrize("method,kw", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("kind", VIT_KINDS + VISION_KINDS)
def test_the_classifier_reads_the_mean_of_what_every_patch_became(kind, method, kw, images):
    model = classifier(kind)
    adapter = find_adapter(model)
    saint.patch(model, method, trace=True, **kw)
    features, logits = adapter.embed(model, images)
    assert saint.stats(model).layout == ("rectangular" if method == "tome" else "packed")
    torch.testing.assert_close(features, what_every_patch_became(kind, model, images), **TOL)
    torch.testing.assert_close(logits, model.classifier(features), **TOL)
    labels = torch.arange(len(images)) % 5
    with torch.no_grad():
        out = model(pixel_values=images, labels=labels)
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, labels), **TOL)
    for i in range(len(images)):
        torch.testing.assert_close(features[i], adapter.embed(model, images[i : i + 1])[0][0], **TOL)


@pytest.mark.parametrize("kind", VIT_KINDS + VISION_KINDS)
def test_nothing_to_prune_gives_the_classifier_the_models_own_input(kind, images):
    model = classifier(kind)
    with torch.no_grad():
        ref = model(pixel_values=images).logits
        saint.patch(model, "tome", r=0)
        assert torch.equal(model(pixel_values=images).logits, ref)
        saint.unpatch(model)
        saint.patch(model, "tome", r=3)
        assert not torch.allclose(model(pixel_values=images).logits, ref, atol=1e-6)
        saint.unpatch(model)
        assert "forward" not in model.__dict__
        assert not model.classifier._forward_pre_hooks
        assert torch.equal(model(pixel_values=images).logits, ref)


def test_outside_the_models_call_nothing_is_replaced(images):
    """The tower called on its own, then the classifier on the caller's own features: the
    classifier computes on what it is given."""
    model = classifier("dinov2_classifier")
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        model(pixel_values=images)
        model.dinov2(pixel_values=images)
        x = torch.randn(len(images), model.classifier.in_features)
        torch.testing.assert_close(model.classifier(x), torch.nn.functional.linear(
            x, model.classifier.weight, model.classifier.bias), rtol=0, atol=0)


def test_each_thread_reads_its_own_call(images):
    model = classifier("clip_classifier")
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)

    @torch.no_grad()
    def logits(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).logits

    assert_two_threads_agree(logits, [(images,), (images[:2].flip(0),)] * 5)


def test_a_replaced_classifier_is_refused(images):
    model = classifier("ijepa_classifier")
    saint.patch(model, "tome", r=2)
    model.classifier = torch.nn.Linear(model.classifier.in_features, 5)
    with pytest.raises(RuntimeError, match="classifier was replaced after saint.patch"):
        model(pixel_values=images)


def test_a_classifier_with_a_foreign_forward_is_refused_untouched(images):
    model = classifier("siglip_classifier")
    model.forward = model.forward  # what accelerate's hooks do: a per-instance forward
    with pytest.raises(ValueError, match="already has a per-instance forward"):
        saint.patch(model, "tome", r=2)
    assert not saint.is_patched(model) and not saint.is_patched(model.vision_model)


def test_a_deep_copy_pools_with_its_own_handle(images):
    model = classifier("dinov2_reg_classifier")
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    twin = copy.deepcopy(model)
    assert get_handle(twin) is not get_handle(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(pixel_values=images).logits, model(pixel_values=images).logits, **TOL)
    assert saint.stats(twin).layout == "packed"
    saint.unpatch(model)  # the copy stays patched, and pools as before
    with torch.no_grad():
        alone = [twin(pixel_values=images[i : i + 1]).logits for i in range(len(images))]
        torch.testing.assert_close(twin(pixel_values=images).logits, torch.cat(alone), **TOL)


@pytest.mark.parametrize("kind", ["dinov2_classifier", "clip_classifier"])
def test_the_loss_trains_every_image_as_alone(kind, images):
    """A ragged batch's loss (the model's own, mean over the batch) has the gradient of the
    images' losses taken one at a time: the pooling saint hands the classifier is
    differentiable, and padding (0 while autograd records) reaches no weight."""
    model = classifier(kind)
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    labels = torch.arange(len(images)) % 5

    def grads(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        model.zero_grad()
        for x, y in batches:
            (model(pixel_values=x, labels=y).loss * len(x) / len(images)).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    batch = grads([(images, labels)])
    assert saint.stats(model).layout == "packed"
    alone = grads([(images[i : i + 1], labels[i : i + 1]) for i in range(len(images))])
    assert len(batch) == len(alone) and all(bool(torch.isfinite(g).all()) for g in batch)
    for a, b in zip(batch, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_image_classification_pipeline_batches_as_it_runs_alone():
    """transformers' ``pipeline("image-classification")`` on a patched classifier: a batch
    of photos of different sizes scores each as the photo alone."""
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    model = classifier("dinov2_classifier")
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    pipe = transformers.pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    rng = np.random.default_rng(0)
    photos = [image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(5)]
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    batched = pipe(photos, batch_size=5, top_k=5)
    assert saint.stats(model).layout == "packed"
    for photo, got in zip(photos, batched, strict=True):
        want = pipe(photo, top_k=5)
        assert [d["label"] for d in got] == [d["label"] for d in want]
        torch.testing.assert_close(torch.tensor([d["score"] for d in got]), torch.tensor([d["score"] for d in want]),
                                   rtol=0, atol=1e-5)


def test_a_subclass_pools_as_its_base(images):
    """A user's subclass of a supported classifier gets the same per-image pooling (it is
    matched as a wrapper of the tower, so it must never run with the plain mean)."""

    class MyClassifier(transformers.Dinov2ForImageClassification):
        pass

    base = classifier("dinov2_classifier")
    mine = MyClassifier(base.config).eval()
    mine.load_state_dict(base.state_dict())
    for model in (base, mine):
        saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        want, got = base(pixel_values=images).logits, mine(pixel_values=images).logits
    assert saint.stats(mine).layout == "packed" and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def siglip2_classifier() -> torch.nn.Module:
    """A tiny ``Siglip2ForImageClassification`` on test_hf_siglip2's tower (NaFlex inputs)."""
    from .test_hf_siglip2 import make as make_siglip2

    tower = make_siglip2()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    cfg = transformers.Siglip2Config(text_config=text, vision_config=tower.config.to_dict(), num_labels=5)
    model = transformers.Siglip2ForImageClassification(cfg).eval()
    model.vision_model.load_state_dict(tower.state_dict())
    return model


SIGLIP2_METHODS = [("tome", dict(r=1)), ("saint_match", dict(tau=0.2, fraction=0.5)),
                   ("saint", dict(tau=0.3, k=1, layers=[0, 1]))]


@pytest.mark.parametrize("method,kw", SIGLIP2_METHODS, ids=[m for m, _ in SIGLIP2_METHODS])
def test_siglip2s_classifier_reads_the_mean_of_what_every_patch_became(method, kw):
    """Siglip2's forward averages under the input's padding mask; inside its call saint pools
    each image's real tokens instead (the model's own mean, of zeros, is never read). A
    padded NaFlex batch, with tokens merged or dropped, scores each image as alone, and the
    features are the mean over each image's original patches of the token each became."""
    from saint.adapters import hf_siglip2

    from .test_hf_siglip2 import images as siglip2_images
    from .test_hf_siglip2 import naflex

    model, imgs = siglip2_classifier(), siglip2_images()
    inputs = naflex(imgs)
    adapter = find_adapter(model)
    saint.patch(model, method, trace=True, **kw)
    features, logits = adapter.embed(model, inputs)
    assert saint.stats(model).layout == "packed" and bool(torch.isfinite(logits).all())
    with torch.no_grad():
        hidden = get_handle(model).tower(**inputs).last_hidden_state
        labels = torch.tensor([0, 3, 4])
        out = model(**inputs, labels=labels)
    origin = get_handle(model).origins()[-1]
    want = torch.stack([hidden[i, origin[i][origin[i] >= 0]].mean(dim=0) for i in range(len(imgs))])
    torch.testing.assert_close(features, want, **TOL)
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, labels), **TOL)
    for i, img in enumerate(imgs):  # alone: every patch real, the batch of one rectangular
        with torch.no_grad():
            alone = model(**hf_siglip2.patchify(img, 4)).logits
        torch.testing.assert_close(logits[i], alone[0], **TOL)


def test_siglip2s_classifier_with_nothing_to_prune():
    """Unpadded images: the model's own masked mean, bit for bit. A padded batch: saint pools
    the real patches (the packed batch never computes padding), as the model's mask does."""
    from saint.adapters import hf_siglip2

    from .test_hf_siglip2 import images as siglip2_images
    from .test_hf_siglip2 import naflex

    model, imgs = siglip2_classifier(), siglip2_images()
    square = hf_siglip2.patchify(torch.cat([imgs[0], imgs[0].flip(-1)]), 4)
    with torch.no_grad():
        ref_square, ref_padded = model(**square).logits, model(**naflex(imgs)).logits
        saint.patch(model, "tome", r=0)
        assert torch.equal(model(**square).logits, ref_square)
        torch.testing.assert_close(model(**naflex(imgs)).logits, ref_padded, **TOL)
        saint.unpatch(model)
        assert "forward" not in model.__dict__ and not model.vision_model._forward_hooks
        assert torch.equal(model(**naflex(imgs)).logits, ref_padded)

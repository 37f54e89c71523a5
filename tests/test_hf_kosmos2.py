"""Hugging Face Kosmos-2: the CLIP vision tower pruned, and the image-to-text projection's
latent queries reading each image's real tokens, merged ones weighted by ``log(size)``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters import find_adapter  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .conftest import (  # noqa: E402
    assert_merged_tokens_read_as_their_parts,
    assert_nothing_to_prune_then_unpatch_exactly,
    assert_real_tokens_as_alone,
    spread_weights,
)
from .test_hf_blip2 import IDS, METHODS, TOL, VISION  # noqa: E402

TEXT = dict(embed_dim=32, layers=2, attention_heads=2, ffn_dim=64, vocab_size=100, max_position_embeddings=64)
LATENTS = 4


def kosmos2(kind: str = "generation") -> torch.nn.Module:
    """A tiny Kosmos-2 with 4 latent queries and weights that make its tokens differ."""
    torch.manual_seed(0)
    cfg = transformers.Kosmos2Config(vision_config=VISION, text_config=TEXT, latent_query_num=LATENTS)
    cls = transformers.Kosmos2ForConditionalGeneration if kind == "generation" else transformers.Kosmos2Model
    model = cls(cfg).eval()
    return spread_weights(model)


def _features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the language model reads of each image: the latent queries' outputs."""
    return model.get_image_features(pixel_values=images).pooler_output


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", METHODS, ids=IDS)
@pytest.mark.parametrize("kind", ["generation", "model"])
def test_each_images_latent_outputs_as_alone(kind, method, kw, layout, images):
    model = kosmos2(kind)
    with torch.no_grad():
        ref = _features(model, images)
    saint.patch(model, method, layout=layout, **kw)
    assert find_adapter(model).name == "hf_kosmos2"
    with torch.no_grad():
        got = _features(model, images)
        tower = model.vision_model(pixel_values=images, output_hidden_states=True)
    assert saint.stats(model).layout == ("rectangular" if method == "tome" else layout)
    assert got.shape == ref.shape and bool(torch.isfinite(got).all()) and not torch.allclose(got, ref, atol=1e-3)
    masks = [get_handle(model).hidden_state_valid(i) for i in range(len(tower.hidden_states))]
    for i in range(len(images)):
        with torch.no_grad():
            torch.testing.assert_close(got[i], _features(model, images[i : i + 1])[0], **TOL)
            alone = model.vision_model(pixel_values=images[i : i + 1], output_hidden_states=True)
        assert_real_tokens_as_alone(tower.hidden_states, alone.hidden_states, masks, i)


def test_a_merged_token_counts_in_the_projection_as_its_parts(images):
    """The latent queries' attention over a merged token biased by ``log(size)`` equals their
    attention over the token repeated ``size`` times (ToMe's proportional attention)."""
    model = kosmos2()

    def reference(tokens: torch.Tensor) -> torch.Tensor:
        embeds = torch.nn.functional.normalize(model.vision_model.model.post_layernorm(tokens), dim=-1)
        return model.image_to_text_projection(embeds)[0]

    assert_merged_tokens_read_as_their_parts(model, images, lambda x: _features(model, x), reference)


def test_generation_batches_as_each_image_alone(images):
    """Greedy text of a ragged batch is each image's alone."""
    model = kosmos2()
    prompt = torch.tensor([[0] + [5] * LATENTS + [6, 10, 11]] * len(images))
    position = torch.zeros_like(prompt, dtype=torch.bool)
    position[:, 1 : 1 + LATENTS] = True
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        batch = model.generate(pixel_values=images, input_ids=prompt, image_embeds_position_mask=position,
                               max_new_tokens=5, do_sample=False)
        assert saint.stats(model).layout == "packed"
        for i in range(len(images)):
            alone = model.generate(pixel_values=images[i : i + 1], input_ids=prompt[:1],
                                   image_embeds_position_mask=position[:1], max_new_tokens=5, do_sample=False)
            assert torch.equal(batch[i], alone[0])


def test_nothing_to_prune_unpatch_calibration_and_the_vision_model_alone(images):
    model = kosmos2()
    assert_nothing_to_prune_then_unpatch_exactly(model, images, lambda x: _features(model, x))
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_match")
    assert cal.reached and abs(cal.achieved / 1.4 - 1) < 0.1 and saint.is_patched(model)  # with the result
    saint.unpatch(model)
    vision = model.vision_model
    saint.patch(vision, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        pooled = vision(pixel_values=images).pooler_output
        for i in range(len(images)):
            torch.testing.assert_close(pooled[i], vision(pixel_values=images[i : i + 1]).pooler_output[0], **TOL)
    saint.unpatch(vision)

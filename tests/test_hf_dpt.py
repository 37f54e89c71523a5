"""Hugging Face DPT (``DPTModel`` and the depth / segmentation models on it, ViT and hybrid):
its attention takes no mask, so saint runs the layers' q/k/v/out itself where a layer needs
one; with a merging method every layer's output leaves as one row per patch, so DPT's neck
reassembles the input's grid."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters import find_adapter  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .test_hf_backbone import METHODS  # noqa: E402

TOL = dict(rtol=0, atol=1e-5)
LAYER = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
NECK = dict(backbone_out_indices=[0, 1, 2, 3], fusion_hidden_size=16, head_hidden_size=8)


def dpt_config(kind: str = "vit", **extra) -> transformers.DPTConfig:
    """A tiny DPT: ViT-style patch embedding (32px, 8px patches), or the hybrid's BiT stem
    (64px, stride 16); both a 4 x 4 grid."""
    if kind == "hybrid":
        bit = dict(model_type="bit", global_padding="same", layer_type="bottleneck", depths=[1, 1, 1],
                   out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True,
                   hidden_sizes=[32, 64, 64], num_groups=8, embedding_size=16)
        return transformers.DPTConfig(**LAYER, **NECK, image_size=64, patch_size=16, is_hybrid=True,
                                      neck_hidden_sizes=[32, 64, 16, 32], reassemble_factors=[1, 1, 1, 0.5],
                                      backbone_featmap_shape=[1, 64, 4, 4], backbone_config=bit, **extra)
    return transformers.DPTConfig(**LAYER, **NECK, image_size=32, patch_size=8, neck_hidden_sizes=[8, 16, 16, 32],
                                  reassemble_factors=[4, 2, 1, 0.5], **extra)


def _spread(model: torch.nn.Module, heads_too: bool) -> torch.nn.Module:
    """Random class token and positions (DPT starts them at zero), and with ``heads_too`` a
    neck and head whose outputs are not vanishingly small."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "position_embeddings")) or (heads_too and ".dpt." not in f".{name}"
                                                                        and "embeddings" not in name):
                p.normal_(0, 1.0 if "embeddings" in name else 0.1)
    return model


def dpt_and_vit() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A ``DPTModel`` and a ``ViTModel`` with the same weights (the ViT's layers are the
    refactored layout, run through its own attention with saint's mask)."""
    torch.manual_seed(0)
    dpt = _spread(transformers.DPTModel(dpt_config(), add_pooling_layer=False), heads_too=False).eval()
    vit = transformers.ViTModel(transformers.ViTConfig(**LAYER, image_size=32, patch_size=8),
                                add_pooling_layer=False).eval()
    names = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
             "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "encoder.layer.": "layers."}
    state = {}
    for key, value in dpt.state_dict().items():
        for old, new in names.items():
            key = key.replace(old, new)
        state[key] = value
    vit.load_state_dict(state)
    return dpt, vit


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", METHODS, ids=["tome", "saint_match", "saint_match_before_attention"])
def test_hidden_states_hold_the_token_every_patch_became(method, kw, layout, images):
    """Each layer's output is the ViT's (same weights, patched alike) gathered through the
    traced origins: saint's own attention on DPT equals the ViT's own attention with
    saint's mask, and each patch holds the token it became."""
    dpt, vit = dpt_and_vit()
    with torch.no_grad():
        ref = dpt(pixel_values=images, output_hidden_states=True)
        torch.testing.assert_close(vit(pixel_values=images).last_hidden_state, ref.last_hidden_state, **TOL)
    saint.patch(vit, method, trace=True, layout=layout, **kw)
    saint.patch(dpt, method, layout=layout, **kw)
    with torch.no_grad():
        want = vit(pixel_values=images, output_hidden_states=True)
        got = dpt(pixel_values=images, output_hidden_states=True)
    assert saint.stats(dpt).layout == ("rectangular" if method == "tome" else layout)
    assert saint.stats(dpt).tokens == saint.stats(vit).tokens
    origins = get_handle(vit).origins()
    assert len(got.hidden_states) == 5
    for layer, (hidden, mine) in enumerate(zip(want.hidden_states[1:], got.hidden_states[1:], strict=True)):
        origin = origins[min(layer, len(origins) - 1)]
        rows = hidden.gather(1, origin[..., None].expand(-1, -1, hidden.shape[-1]))
        assert mine.shape == (len(images), 17, 32) and not bool(mine.isnan().any())
        torch.testing.assert_close(mine, rows, **TOL)
    torch.testing.assert_close(got.last_hidden_state, dpt.layernorm(got.hidden_states[-1]), **TOL)
    assert not torch.allclose(got.last_hidden_state, ref.last_hidden_state, atol=1e-3)
    assert saint.token_mask(dpt) is None and saint.token_sizes(dpt) is None  # every row one patch
    for i in range(len(images)):
        with torch.no_grad():
            alone = dpt(pixel_values=images[i : i + 1]).last_hidden_state
        torch.testing.assert_close(got.last_hidden_state[i], alone[0], **TOL)


def _heads(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "segmentation":
        model = transformers.DPTForSemanticSegmentation(dpt_config(num_labels=3, id2label={i: str(i) for i in range(3)}))
    else:
        model = transformers.DPTForDepthEstimation(dpt_config("hybrid" if kind == "hybrid" else "vit"))
    return _spread(model, heads_too=True).eval()


def _prediction(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=images)
    return out.logits if isinstance(model, transformers.DPTForSemanticSegmentation) else out.predicted_depth


@pytest.mark.parametrize("kind", ["depth", "segmentation", "hybrid"])
def test_dpt_predicts_each_image_as_alone(kind, images):
    """DPT's neck and head run unchanged on the unmerged hidden states: a ragged batch
    predicts each image as the image alone; nothing to prune and unpatch give the model's
    own prediction bit for bit."""
    model = _heads(kind)
    if kind == "hybrid":
        images = torch.nn.functional.interpolate(images, scale_factor=2)
    with torch.no_grad():
        ref = _prediction(model, images)
        saint.patch(model, "tome", r=0)
        assert torch.equal(_prediction(model, images), ref)
        saint.unpatch(model)
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7, guard=0.1)
    assert saint.is_patched(model.dpt)
    emb, logits = find_adapter(model).embed(model, images)
    assert logits is None
    with torch.no_grad():
        got = _prediction(model, images)
        assert saint.stats(model).layout == "packed"
        assert got.shape == ref.shape and not torch.allclose(got, ref, atol=1e-3)
        torch.testing.assert_close(emb, got.flatten(1), **TOL)
        for i in range(len(images)):
            torch.testing.assert_close(got[i], _prediction(model, images[i : i + 1])[0], **TOL)
    with pytest.raises(ValueError, match=f"patched through its {type(model).__name__}"):
        saint.unpatch(model.dpt)
    saint.unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(_prediction(model, images), ref)


def test_attention_weights_and_dropping_methods_are_refused_with_what_to_do(images):
    model = _heads("depth")
    with pytest.raises(ValueError, match=r"row for every patch.*use a merging method"):
        saint.patch(model, "saint", tau=0.3)
    assert not saint.is_patched(model)
    saint.patch(model, "tome", r=2)
    with pytest.raises(ValueError, match="makes no attention weights; unpatch it to read output_attentions"):
        model(pixel_values=images, output_attentions=True)
    saint.unpatch(model)


def test_calibration_probe_reads_dpts_own_projections(images):
    """The probe behind calibration and analysis hooks DPT's ``query``/``key`` (it has no
    ``q_proj``): the keys it reads are the key projection's output."""
    dpt, _ = dpt_and_vit()
    adapter = find_adapter(dpt)
    probe = adapter.probe(dpt)
    store: dict[str, torch.Tensor] = {}
    hooks = probe.hooks(0, store)
    try:
        with torch.no_grad():
            dpt(pixel_values=images)
    finally:
        for h in hooks:
            h.remove()
    q, k = probe.qk(0, store)
    layer = dpt.encoder.layer[0]
    with torch.no_grad():
        emb = dpt.embeddings(images).last_hidden_states
        want = layer.attention.attention.key(layer.layernorm_before(emb))
    assert q.shape == k.shape == (len(images), 17, 2, 16)
    torch.testing.assert_close(k.flatten(2), want, **TOL)
    cal = saint.calibrate(dpt, images, speedup=1.3, method="saint_match")
    assert cal.reached and abs(cal.achieved / 1.3 - 1) < 0.1
    saint.patch(dpt, "saint_match", **cal.patch_kwargs())
    with torch.no_grad():
        assert dpt(pixel_values=images).last_hidden_state.shape == (len(images), 17, 32)

"""Hugging Face BEiT (``BeitModel``, ``BeitForImageClassification``; DiT is BEiT): a relative
position bias per pair of tokens, per layer or shared, that each remaining token reads at its
original index; layer scales; a pooler that averages the patch tokens."""

from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters import find_adapter  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .conftest import assert_real_tokens_as_alone  # noqa: E402

TOL = dict(rtol=0, atol=1e-5)
SHARED = {"per_layer": dict(use_relative_position_bias=True), "shared": dict(use_shared_relative_position_bias=True)}
# a rectangular merge, a ragged merge (with the class-attention guard, before attention), a ragged drop
METHODS = [("tome", dict(r=3)), ("saint_match", dict(tau=0.3, fraction=0.7)),
           ("saint_match", dict(tau=0.3, fraction=0.7, select_at="attention", guard=0.3)), ("saint", dict(tau=0.3, k=1))]
IDS = ["tome", "saint_match", "saint_match_guard_before_attention", "saint"]


def beit(bias: str = "per_layer", classifier: bool = True, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                  image_size=32, patch_size=8, layer_scale_init_value=0.5, num_labels=5,
                                  **SHARED[bias], **extra)
    model = transformers.BeitForImageClassification(cfg) if classifier else transformers.BeitModel(cfg)
    with torch.no_grad():  # BEiT starts its bias tables and class token at zero
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith("cls_token"):
                p.normal_()
    return model.eval()


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", METHODS, ids=IDS)
@pytest.mark.parametrize("bias", sorted(SHARED))
def test_each_image_as_alone_and_the_pooler_reads_what_every_patch_became(bias, method, kw, layout, images):
    model = beit(bias)
    adapter = find_adapter(model)
    with torch.no_grad():
        ref = model(pixel_values=images).logits
    saint.patch(model, method, layout=layout, trace=True, **kw)
    with torch.no_grad():
        out = model.beit(pixel_values=images, output_hidden_states=True)
        logits = model(pixel_values=images).logits
    assert saint.stats(model).layout == ("rectangular" if method == "tome" else layout)
    assert not torch.allclose(logits, ref, atol=1e-3)
    origin = get_handle(model).origins()[-1]
    hidden = out.last_hidden_state
    want = torch.stack([hidden[i, origin[i, 1:][origin[i, 1:] >= 0]].mean(dim=0) for i in range(len(images))])
    torch.testing.assert_close(out.pooler_output, model.beit.pooler.layernorm(want), **TOL)
    emb, got_logits = adapter.embed(model, images)
    torch.testing.assert_close(emb, out.pooler_output, **TOL)
    torch.testing.assert_close(got_logits, logits, **TOL)
    masks = [get_handle(model).hidden_state_valid(i) for i in range(len(out.hidden_states))]
    for i in range(len(images)):
        with torch.no_grad():
            alone = model.beit(pixel_values=images[i : i + 1], output_hidden_states=True)
            torch.testing.assert_close(logits[i], model(pixel_values=images[i : i + 1]).logits[0], **TOL)
        assert_real_tokens_as_alone(out.hidden_states, alone.hidden_states, masks, i)


@pytest.mark.parametrize("bias", sorted(SHARED))
def test_kept_tokens_read_their_pairs_of_the_full_grids_bias(bias, images):
    """Patches dropped before layer 1's attention: every later layer equals the model's own
    modules run on the kept tokens with the full grid's bias at their original indices as
    the attention's mask."""
    model = beit(bias, classifier=False)
    saint.patch(model, "budget", layers=[1], keep=8, select_at="attention", trace=True)  # 8 patches and the class token
    with torch.no_grad():
        got = model(pixel_values=images).last_hidden_state
    kept = torch.stack([torch.nonzero(o >= 0)[:, 0] for o in get_handle(model).origins()[-1]])
    assert kept.shape == (len(images), 9) and bool((kept[:, 0] == 0).all())  # the class token stays first
    saint.unpatch(model)
    window, n0 = (4, 4), 17
    with torch.no_grad():
        h = model.layers[0](model.embeddings(images), attention_mask=_shared(model, window, n0), resolution=(32, 32))
        h = h.gather(1, kept[..., None].expand(-1, -1, h.shape[-1]))
        for layer in model.layers[1:]:
            full = _shared(model, window, n0)
            if layer.relative_position_bias is not None:
                full = layer.relative_position_bias(window, False, dim_size=n0)
            mask = torch.stack([full[0][:, k][:, :, k] for k in kept])
            attn, _ = layer.attention(layer.layernorm_before(h), attention_mask=mask)
            h = layer.lambda_1 * attn + h
            h = layer.lambda_2 * layer.mlp(layer.layernorm_after(h)) + h
        torch.testing.assert_close(got, model.layernorm(h), **TOL)


def _shared(model: torch.nn.Module, window: tuple[int, int], n0: int) -> torch.Tensor | None:
    bias = model.shared_position_bias
    return None if bias is None else bias(window, False, dim_size=n0)


def test_nothing_to_prune_unpatch_and_what_is_refused(images):
    model = beit("shared")
    with torch.no_grad():
        ref = model(pixel_values=images).logits
        saint.patch(model, "tome", r=0)
        assert torch.equal(model(pixel_values=images).logits, ref)
        with pytest.raises(ValueError, match="makes no attention weights"):
            model(pixel_values=images, output_attentions=True)
        saint.unpatch(model)
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert torch.equal(model(pixel_values=images).logits, ref)
    cal = saint.calibrate(model, images, flops_speedup=1.4, method="saint_match", tol=0.03)  # (4 tiny images: steps of ~3%)
    assert cal.reached and abs(cal.achieved / 1.4 - 1) < 0.03
    torch.manual_seed(0)
    mim = transformers.BeitForMaskedImageModeling(model.config)
    with pytest.raises(TypeError, match="reconstructs every patch"):
        saint.patch(mim, "tome", r=2)


@pytest.mark.parametrize("bias", sorted(SHARED))
def test_pair_bias_attention_and_class_attention_equal_the_models_own(bias, images):
    """On every token (nothing removed), saint's attention with the gathered pair bias and
    the class token's attention it ranks by are the model's own (eager, with its weights)."""
    from saint.adapters.common import TokenState
    from saint.adapters.pair_bias import first_token_attention, pair_attention

    model = beit(bias, classifier=False, attn_implementation="eager")
    layer = model.layers[2]
    x = torch.randn(len(images), 17, 32, generator=torch.Generator().manual_seed(3))
    full = _shared(model, (4, 4), 17)
    if layer.relative_position_bias is not None:
        full = layer.relative_position_bias((4, 4), False, dim_size=17)
    normed = layer.layernorm_before(x)
    with torch.no_grad():
        want, weights = layer.attention(normed, attention_mask=full)
        a = layer.attention
        q, k, v = (proj(normed).unflatten(-1, (2, 16)) for proj in (a.q_proj, a.k_proj, a.v_proj))
        state = TokenState()
        state.reset(x, trace=False, valid=None)
        torch.testing.assert_close(a.o_proj(pair_attention(q, k, v, state, False, a.scaling, 0.0, full)), want, **TOL)
        got = first_token_attention(q[:, 0], k, state, False, a.scaling, full)
    torch.testing.assert_close(got, weights[:, :, 0].mean(dim=1), **TOL)


LAYERS = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8, layer_scale_init_value=0.5, use_relative_position_bias=True)


def _spread(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith("cls_token"):
                p.normal_()
    return model.eval()


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", METHODS[:3], ids=IDS[:3])
def test_backbone_maps_hold_the_token_every_patch_became(method, kw, layout, images):
    """``BeitBackbone`` with a merging method: every layer's output leaves as one row per patch,
    the patched encoder's own hidden states gathered through the traced origins."""
    torch.manual_seed(0)
    backbone = _spread(transformers.BeitBackbone(transformers.BeitConfig(**LAYERS, out_indices=[1, 2, 3, 4])))
    encoder = _spread(transformers.BeitModel(transformers.BeitConfig(**LAYERS), add_pooling_layer=False))
    encoder.load_state_dict(backbone.beit.state_dict())
    saint.patch(encoder, method, trace=True, layout=layout, **kw)
    saint.patch(backbone, method, layout=layout, **kw)
    with torch.no_grad():
        want = encoder(pixel_values=images, output_hidden_states=True).hidden_states[1:]
        maps = backbone(pixel_values=images).feature_maps
    origins = get_handle(encoder).origins()
    for layer, (hidden, got) in enumerate(zip(want, maps, strict=True)):
        rows = hidden.gather(1, origins[min(layer, len(origins) - 1)][..., None].expand(-1, -1, hidden.shape[-1]))
        torch.testing.assert_close(got, rows[:, 1:].transpose(1, 2).reshape(len(images), 32, 4, 4), **TOL)
    assert saint.token_mask(backbone) is None and saint.token_sizes(backbone) is None
    with pytest.raises(ValueError, match="row for every patch"):
        saint.patch(_spread(transformers.BeitBackbone(transformers.BeitConfig(**LAYERS))), "saint", tau=0.3)


def _dense(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    t = transformers
    if kind == "segmentation":
        return _spread(t.BeitForSemanticSegmentation(t.BeitConfig(**LAYERS, out_indices=[1, 2, 3, 4], num_labels=3,
                                                                  use_auxiliary_head=False)))
    if kind == "data2vec_segmentation":
        return _spread(t.Data2VecVisionForSemanticSegmentation(t.Data2VecVisionConfig(
            **LAYERS, out_indices=[1, 2, 3, 4], num_labels=3, use_auxiliary_head=False)))
    backbone = dict(LAYERS, model_type="beit", out_indices=[1, 2, 3, 4])
    if kind == "upernet":
        return _spread(t.UperNetForSemanticSegmentation(t.UperNetConfig(backbone_config=backbone, hidden_size=16,
                                                                         num_labels=3, use_auxiliary_head=False)))
    cfg = t.DPTConfig(backbone_config=dict(backbone, reshape_hidden_states=False), hidden_size=32, patch_size=8,
                      image_size=32, neck_hidden_sizes=[8, 16, 16, 32], fusion_hidden_size=16, head_hidden_size=8,
                      reassemble_factors=[4, 2, 1, 0.5])
    return _spread(t.DPTForDepthEstimation(cfg))


@pytest.mark.parametrize("kind", ["segmentation", "data2vec_segmentation", "upernet", "dpt"])
def test_dense_heads_on_beit_predict_each_image_as_alone(kind, images):
    """BEiT's and Data2Vec-vision's own segmentation heads, UperNet and DPT on a BEiT backbone
    (DPT-BEiT) run on the unmerged maps: a ragged batch predicts each image as alone; nothing
    to prune bit for bit."""
    model = _dense(kind)

    def predict(x: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=x)
        return out.predicted_depth if kind == "dpt" else out.logits

    with torch.no_grad():
        ref = predict(images)
        saint.patch(model, "tome", r=0)
        assert torch.equal(predict(images), ref)
        saint.unpatch(model)
        saint.patch(model, "saint_match", tau=0.3, fraction=0.7, guard=0.2)
        got = predict(images)
        scale = float(ref.abs().max())  # DPT's random head predicts tiny depths
        assert saint.stats(model).layout == "packed" and not torch.allclose(got, ref, rtol=0, atol=1e-3 * scale)
        for i in range(len(images)):
            torch.testing.assert_close(got[i], predict(images[i : i + 1])[0], rtol=0, atol=1e-5 * scale)
        saint.unpatch(model)
        assert torch.equal(predict(images), ref)


def test_copies_and_threads_pool_their_own_calls(images):
    """The pooler's per-instance forward finds its handle through the module, so a deep copy
    pools with its own, and each thread reads its own call's tokens."""
    import copy

    from .conftest import assert_two_threads_agree

    model = beit()
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(pixel_values=images).logits, model(pixel_values=images).logits, **TOL)
    assert twin.beit.pooler.forward.__self__ is twin.beit.pooler

    @torch.no_grad()
    def logits(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).logits

    assert_two_threads_agree(logits, [(images,), (images[:2].flip(0),)] * 5)


NAMES_D2V = (  # BEiT's parameter names -> Data2Vec-vision's, applied in order
    ("beit.layers.", "data2vec_vision.encoder.layer."), ("beit.shared_position_bias.",
                                                        "data2vec_vision.encoder.relative_position_bias."),
    ("beit.", "data2vec_vision."), (".attention.q_proj", ".attention.attention.query"),
    (".attention.k_proj", ".attention.attention.key"), (".attention.v_proj", ".attention.attention.value"),
    (".attention.o_proj", ".attention.output.dense"), (".mlp.fc1", ".intermediate.dense"),
    (".mlp.fc2", ".output.dense"),
)


def data2vec_like(model: torch.nn.Module) -> torch.nn.Module:
    """A ``Data2VecVisionForImageClassification`` with the BEiT classifier's weights: the same
    model in transformers' older layer layout (a layer's bias inside its self-attention)."""
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
            "patch_size", "layer_scale_init_value", "num_labels", "use_relative_position_bias",
            "use_shared_relative_position_bias")
    cfg = transformers.Data2VecVisionConfig(**{k: getattr(model.config, k) for k in keys})
    twin = transformers.Data2VecVisionForImageClassification(cfg).eval()
    state = {}
    for key, value in model.state_dict().items():
        for old, new in NAMES_D2V:
            key = key.replace(old, new)
        key = re.sub(r"layer\.(\d+)\.relative_position_bias", r"layer.\1.attention.attention.relative_position_bias", key)
        state[key] = value
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", METHODS, ids=IDS)
@pytest.mark.parametrize("bias", sorted(SHARED))
def test_data2vec_vision_prunes_as_the_same_beit(bias, method, kw, layout, images):
    """Data2Vec-vision (BEiT's layers in the older layout, optional layer scales) with a BEiT
    classifier's weights: patched alike, it keeps the same tokens and gives the same logits,
    each image as alone; nothing to prune bit for bit."""
    model = beit(bias)
    twin = data2vec_like(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(pixel_values=images).logits, model(pixel_values=images).logits, **TOL)
        ref = twin(pixel_values=images).logits
        saint.patch(twin, "tome", r=0)
        assert torch.equal(twin(pixel_values=images).logits, ref)
        saint.unpatch(twin)
    saint.patch(model, method, layout=layout, **kw)
    saint.patch(twin, method, layout=layout, **kw)
    with torch.no_grad():
        got, want = twin(pixel_values=images).logits, model(pixel_values=images).logits
    assert saint.stats(twin).tokens == saint.stats(model).tokens
    torch.testing.assert_close(got, want, **TOL)
    for i in range(len(images)):
        with torch.no_grad():
            torch.testing.assert_close(got[i], twin(pixel_values=images[i : i + 1]).logits[0], **TOL)


def test_pair_bias_kernels_agree_and_the_others_are_refused(images):
    """A packed stream's pair-biased attention: per image (``loop``, the CPU's ``auto``) and
    padded to the longest image (``padded``, an accelerator's ``auto``) agree; a kernel that
    cannot add a bias per pair is a clear error when patching, not a silent loop."""
    model = beit("per_layer")
    outs = {}
    for kernel in ("loop", "padded"):
        saint.patch(model, "saint_match", tau=0.3, fraction=0.7, guard=0.3, kernel=kernel)
        with torch.no_grad():
            outs[kernel] = model(pixel_values=images).logits
        assert saint.stats(model).layout == "packed"
    torch.testing.assert_close(outs["padded"], outs["loop"], **TOL)
    saint.unpatch(model)
    for kernel in ("flex", "varlen", "flash_attn"):  # refused when patching, the model left as it was
        with pytest.raises(ValueError, match="relative position bias per pair"):
            saint.patch(model, "saint_match", tau=0.3, fraction=0.7, kernel=kernel)
        assert not saint.is_patched(model)

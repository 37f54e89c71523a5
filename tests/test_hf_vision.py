"""Hugging Face CLIP / SigLIP / MetaCLIP 2 vision towers: patch, prune, unpatch on tiny random models."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters import hf_vision  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8
)
PATCHES = (32 // 8) ** 2
PROTECTED = {"clip": 1, "siglip": 0, "metaclip_2": 1, "chinese_clip": 1, "altclip": 1}
KINDS = ["clip", "siglip", "metaclip_2", "chinese_clip", "altclip"]  # the last three: CLIP's tower, own class names
CLIP_PREFIX = {"clip": "CLIP", "metaclip_2": "MetaClip2", "chinese_clip": "ChineseCLIP", "altclip": "AltCLIP"}


def make(kind: str, impl: str = "sdpa", seed: int = 0, projection: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind in CLIP_PREFIX:
        prefix = CLIP_PREFIX[kind]
        cfg = getattr(transformers, f"{prefix}VisionConfig")(**TINY, projection_dim=16, attn_implementation=impl)
        cls = getattr(transformers, f"{prefix}VisionModelWithProjection" if projection else f"{prefix}VisionModel")
    else:
        cfg = transformers.SiglipVisionConfig(**TINY, attn_implementation=impl)
        cls = transformers.SiglipVisionModel
    return cls(cfg).eval()


# method settings that prune a known or data-dependent amount; attn needs a class token
SETTINGS = {
    "saint": dict(tau=0.3, k=2),
    "tome": dict(r=2),
    "random": dict(r=3, layers=[0, 2]),
    "attn": dict(r=3, layers=[1, 2]),
    "budget": dict(keep=5, layers=[1]),
}
if "saint_fold" in saint.METHODS:  # registered by a later change; same graph, folded drops
    SETTINGS["saint_fold"] = dict(tau=0.3, k=2)


def run(model: torch.nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True)


def assert_outputs_equal(a, b) -> None:
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)
    assert len(a.hidden_states) == len(b.hidden_states)
    for ha, hb in zip(a.hidden_states, b.hidden_states, strict=True):
        assert torch.equal(ha, hb)


@pytest.mark.parametrize("kind", KINDS)
def test_unpatch_is_bit_identical(kind, images):
    model = make(kind)
    ref = run(model, images)
    saint.patch(model, method="saint", tau=0.3, k=2)
    pruned = run(model, images)
    assert pruned.last_hidden_state.shape[1] < ref.last_hidden_state.shape[1]
    saint.unpatch(model)
    assert not saint.is_patched(model)
    assert all("forward" not in layer.__dict__ for layer in model.encoder.layers)
    assert_outputs_equal(run(model, images), ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "method,kw",
    [
        ("random", dict(r=0)),
        ("tome", dict(r=0)),
        ("budget", dict(keep=PATCHES, layers=[0, 3])),
        ("saint", dict(k=100, rate="sample")),  # no candidate can have 100 links
    ],
)
def test_config_pruning_nothing_is_bit_identical(kind, method, kw, images):
    model = make(kind)
    ref = run(model, images)
    saint.patch(model, method=method, **kw)
    out = run(model, images)
    assert saint.stats(model).tokens == [[PATCHES + PROTECTED[kind]] * 4] * 4
    assert_outputs_equal(out, ref)


# attn needs a class token: SigLIP has none (see test_attn_on_siglip_is_refused)
@pytest.mark.parametrize(
    "kind,method", [(k, m) for k in KINDS for m in sorted(SETTINGS) if (k, m) != ("siglip", "attn")]
)
def test_every_method_runs_and_stats_match_sequences(kind, method, images):
    model = make(kind)
    saint.patch(model, method=method, **SETTINGS[method])
    handle = get_handle(model)
    out = run(model, images)
    st = saint.stats(model)
    assert st.blocks == [f"encoder.layers.{i}" for i in range(4)]
    n0 = PATCHES + PROTECTED[kind]
    assert st.tokens[0] == [n0] * 4
    for i in range(4):
        # tokens entering layer i == real positions of hidden_states[i]
        h = out.hidden_states[i]
        valid = handle.hidden_state_valid(i)
        real = [h.shape[1]] * 4 if valid is None else valid.sum(dim=1).tolist()
        assert st.tokens[i] == real
        assert h.shape[1] == max(real)
    last = handle.hidden_state_valid(-1)
    real_last = [out.hidden_states[-1].shape[1]] * 4 if last is None else last.sum(dim=1).tolist()
    assert out.last_hidden_state.shape[1] == out.hidden_states[-1].shape[1]
    assert out.pooler_output.shape == (4, 32)
    assert torch.isfinite(out.pooler_output).all()
    expected = {
        "tome": [n0, n0 - 2, n0 - 4, n0 - 6],
        "random": [n0, n0 - 3, n0 - 3, n0 - 6],
        "attn": [n0, n0, n0 - 3, n0 - 6],
        "budget": [n0, n0, 5 + PROTECTED[kind], 5 + PROTECTED[kind]],
    }
    if method in expected:
        assert st.tokens == [[n] * 4 for n in expected[method]]
        assert handle.state.valid is None
    else:  # saint, saint_fold
        assert st.per_sample_differs()  # the images differ in redundancy
        assert handle.state.valid is not None
    # the last hidden state's validity marks as many real tokens as each image has alone
    assert real_last == [run(model, images[b : b + 1]).hidden_states[-1].shape[1] for b in range(4)]


@pytest.mark.parametrize("kind", KINDS)
def test_budget_leaves_exactly_keep_plus_protected(kind, images):
    model = make(kind)
    saint.patch(model, method="budget", keep=7, layers=[2])
    out = run(model, images)
    assert out.last_hidden_state.shape == (4, 7 + PROTECTED[kind], 32)
    assert out.hidden_states[2].shape[1] == PATCHES + PROTECTED[kind]
    assert out.hidden_states[3].shape[1] == 7 + PROTECTED[kind]
    if PROTECTED[kind]:  # the class token is kept first
        saint.unpatch(model)
        saint.patch(model, method="budget", keep=7, layers=[0], trace=True)
        run(model, images)
        origin = get_handle(model).state.origin
        assert origin[:, 0].tolist() == [0] * 4
        assert ((origin >= 0).sum(dim=1) == 8).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "method,kw",
    [("saint", dict(tau=0.3, k=2, rate="sample")), ("tome", dict(r=3)), ("tome", dict(r=3, order="reference"))],
)
def test_each_image_alone_equals_in_batch(kind, method, kw, images):
    model = make(kind)
    saint.patch(model, method=method, **kw)
    batch = run(model, images)
    handle = get_handle(model)
    counts = saint.stats(model).tokens
    valid = handle.state.valid
    if method == "saint":
        assert saint.stats(model).per_sample_differs() and valid is not None and not bool(valid.all())
    for b in range(images.shape[0]):
        alone = run(model, images[b : b + 1])
        assert [c[0] for c in saint.stats(model).tokens] == [c[b] for c in counts]
        torch.testing.assert_close(alone.pooler_output[0], batch.pooler_output[b], rtol=0, atol=1e-5)
        n = alone.last_hidden_state.shape[1]
        rows = batch.last_hidden_state[b] if valid is None else batch.last_hidden_state[b][valid[b]]
        torch.testing.assert_close(alone.last_hidden_state[0], rows[:n], rtol=0, atol=1e-5)
        assert rows.shape[0] == n


def test_siglip_pooling_head_ignores_padding(images):
    """The padded batch pools like its rectangular part; without the key mask it would not."""
    model = make("siglip")
    saint.patch(model, method="saint", tau=0.3, k=2, rate="sample")
    out = run(model, images)
    valid = get_handle(model).state.valid
    assert valid is not None and not bool(valid.all())
    b = int((~valid).sum(dim=1).argmax())  # the most padded sample
    head = model.head
    with torch.no_grad():
        unmasked = type(head).forward(head, out.last_hidden_state[b : b + 1])[0]
        real = type(head).forward(head, out.last_hidden_state[b : b + 1, valid[b]])[0]
    torch.testing.assert_close(out.pooler_output[b], real, rtol=0, atol=1e-5)
    assert not torch.allclose(out.pooler_output[b], unmasked, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,kw", [("saint", dict(tau=0.3, k=2, rate="sample")), ("tome", dict(r=3))])
def test_sdpa_and_eager_agree(kind, method, kw, images):
    sdpa, eager = make(kind, "sdpa"), make(kind, "eager")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    torch.testing.assert_close(run(sdpa, images).pooler_output, run(eager, images).pooler_output)
    for m in (sdpa, eager):
        saint.patch(m, method=method, **kw)
    a, b = run(sdpa, images), run(eager, images)
    assert saint.stats(sdpa).tokens == saint.stats(eager).tokens
    if method == "saint":
        assert get_handle(sdpa).state.valid is not None
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=1e-5, equal_nan=True)


def test_clip_with_projection(images):
    model = make("clip", projection=True)
    with torch.no_grad():
        ref = model(pixel_values=images)
    saint.patch(model, method="budget", keep=4, layers=[1])
    with torch.no_grad():
        out = model(pixel_values=images)
    assert out.last_hidden_state.shape == (4, 5, 32) and out.image_embeds.shape == (4, 16)
    assert saint.stats(model).tokens[2] == [5] * 4
    with pytest.raises(ValueError, match="already patched"):
        hf_vision.patch_tower(model.vision_model, "random", r=1)
    saint.unpatch(model)
    assert not saint.is_patched(model) and not saint.is_patched(model.vision_model)
    with torch.no_grad():
        again = model(pixel_values=images)
    assert torch.equal(again.image_embeds, ref.image_embeds)


def make_dual(kind: str) -> torch.nn.Module:
    """A tiny ``CLIPModel`` (or MetaCLIP 2's, Chinese-CLIP's, AltCLIP's) / ``SiglipModel``: both
    encoders, projections and logit scale."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind in CLIP_PREFIX:
        prefix = CLIP_PREFIX[kind]
        cfg = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=TINY, projection_dim=16)
        return getattr(transformers, f"{prefix}Model")(cfg).eval()
    cfg = transformers.SiglipConfig(text_config=text, vision_config=TINY)
    return transformers.SiglipModel(cfg).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_dual_encoder_prunes_its_vision_side(kind, images):
    """``CLIPModel`` / ``SiglipModel``: the vision tower is pruned as the stand-alone tower
    on the same weights (image features = its pooled output through the projection), per
    image in a packed batch; image-text logits follow; the text side and the unpatched
    model are untouched; the tower is unpatched through the dual model."""
    model = make_dual(kind)
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2]])
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=images)
    method, kw = ("saint", dict(tau=0.3, k=2)) if PROTECTED[kind] else ("budget", dict(keep=6, layers=[1]))
    saint.patch(model, method, **kw)
    assert saint.is_patched(model) and saint.is_patched(model.vision_model)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=images).pooler_output
        out = model(input_ids=ids, pixel_values=images)
        layout = saint.stats(model).layout
        tower = model.vision_model(pixel_values=images).pooler_output
        alone = torch.cat([model.get_image_features(pixel_values=images[i : i + 1]).pooler_output for i in range(4)])
    assert layout == ("packed" if PROTECTED[kind] else "rectangular")
    proj = model.visual_projection(tower) if PROTECTED[kind] else tower
    torch.testing.assert_close(feats, proj, rtol=0, atol=1e-6)
    torch.testing.assert_close(feats, alone, rtol=0, atol=1e-5)
    assert torch.equal(out.text_embeds, ref.text_embeds)
    assert not torch.allclose(out.image_embeds, ref.image_embeds)
    with pytest.raises(ValueError, match=f"patched through its {type(model).__name__}"):
        saint.unpatch(model.vision_model)
    saint.unpatch(model)
    with torch.no_grad():
        again = model(input_ids=ids, pixel_values=images)
    assert torch.equal(again.logits_per_image, ref.logits_per_image)


def test_patch_tower_inside_llava(images):
    """The tower LLaVA reads ``hidden_states[vision_feature_layer]`` from gets the pruned sequence."""
    vision = transformers.CLIPVisionConfig(**TINY)
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=63, vision_feature_layer=-2)
    llava = transformers.LlavaForConditionalGeneration(cfg).eval()
    tower = llava.model.vision_tower
    handle = hf_vision.patch_tower(tower, "saint", tau=0.3, k=2, rate="sample", layers=[1])
    with torch.no_grad():
        feats = llava.model.get_image_features(pixel_values=images, vision_feature_layer=-2).pooler_output
    valid = handle.hidden_state_valid(-2)  # output of layer 2 of 4
    assert valid is not None and torch.equal(valid, handle.state.valid)
    counts = valid.sum(dim=1)
    assert counts.tolist() == saint.stats(tower).tokens[3]
    assert len(set(counts.tolist())) > 1
    # "default" strategy drops the class token, so features = max real tokens - 1
    assert all(f.shape == (int(counts.max()) - 1, 32) for f in feats)
    hf_vision.unpatch_tower(tower)
    assert not saint.is_patched(tower)


def test_attn_on_siglip_is_refused():
    model = make("siglip")
    with pytest.raises(ValueError, match="no class token"):
        saint.patch(model, method="attn", r=2)
    assert not saint.is_patched(model)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="saint", layers=[4]), r"out of range.*4 blocks"),
        (dict(method="random", r=16, layers=[0]), "at most 15"),
        (dict(method="budget", keep=17, layers=[0]), "exceeds the 16"),
        (dict(method="budget", keep=4), "needs explicit layers"),
    ],
)
def test_bad_settings_raise_clear_errors(kw, match):
    model = make("clip")
    with pytest.raises(ValueError, match=match):
        saint.patch(model, **kw)
    assert not saint.is_patched(model)
    assert all("forward" not in layer.__dict__ for layer in model.encoder.layers)


def test_mask_needing_config_refuses_unmaskable_attention(images):
    model = make("clip")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        saint.patch(model, method="saint", rate="sample", layout="padded")
    # packed ragged batches run their own per-image attention, and a rectangular,
    # unmerged schedule needs no mask: both are allowed
    saint.patch(model, method="saint", rate="sample")
    saint.patch(model, method="tome", r=2, prop_attn=False)
    assert saint.is_patched(model)
    # switching the kernel after patching is caught by a layer that needs the mask
    other = make("clip")
    saint.patch(other, method="saint", tau=0.3, k=2, rate="sample", layout="padded")
    run(other, images)
    assert get_handle(other).state.valid is not None
    hidden = other.embeddings(images)
    if hasattr(other, "pre_layrnorm"):
        hidden = other.pre_layrnorm(hidden)
    for layer in other.encoder.layers[:2]:  # the layers that prune (default: first half)
        hidden = layer(hidden, None)
    other.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*cannot take saint"):
        other.encoder.layers[2](hidden, None)


def test_bad_calls_raise(images):
    with pytest.raises(TypeError, match="patch_tower expects"):
        hf_vision.patch_tower(torch.nn.Linear(2, 2), "saint")
    model = make("clip")
    saint.patch(model, method="random", r=2)
    with pytest.raises(IndexError, match="5 hidden states"):
        get_handle(model).hidden_state_valid(5)
    with pytest.raises(RuntimeError, match="call the model first"):
        get_handle(model).hidden_state_valid(1)


@pytest.mark.parametrize("kind", KINDS)
def test_tome_sizes_reach_attention_as_log_bias(kind, images):
    """Proportional attention: later layers get log(size) on the merged keys, sizes sum to N0."""
    model = make(kind)
    saint.patch(model, method="tome", r=3, layers=[0])
    seen = {}

    def grab(module, args, kwargs):
        seen["mask"] = kwargs["attention_mask"]

    hook = model.encoder.layers[2].self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    run(model, images)
    hook.remove()
    sizes = get_handle(model).state.sizes
    n = PATCHES + PROTECTED[kind]
    assert sizes.shape == (4, n - 3, 1) and sizes.sum(dim=(1, 2)).tolist() == [float(n)] * 4
    assert int((sizes > 1).sum()) > 0
    torch.testing.assert_close(seen["mask"], sizes.squeeze(-1).log()[:, None, None, :].to(seen["mask"].dtype))


def make_classifier(kind: str) -> torch.nn.Module:
    """A tiny ``CLIPForImageClassification`` (or MetaCLIP 2's / SigLIP's): the tower and a
    linear head over the mean of its tokens (the class token excluded)."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    prefix = CLIP_PREFIX.get(kind.removesuffix("_classifier"), "Siglip")
    cfg = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=TINY, num_labels=5)
    return getattr(transformers, f"{prefix}ForImageClassification")(cfg).eval()

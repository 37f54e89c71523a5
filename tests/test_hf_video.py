"""Hugging Face video transformers: VideoMAE (``VideoMAEModel``,
``VideoMAEForVideoClassification``: a ViT over a clip's tubelets, no class token, every token
prunable, in transformers' older layer layout, whose classifier averages the tokens before
its ``fc_norm``) and ViViT (``VivitModel``, ``VivitForVideoClassification``: ViT's layers over
tubelets, a class token)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters import find_adapter  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .conftest import assert_real_tokens_as_alone  # noqa: E402

TOL = dict(rtol=0, atol=1e-5)
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8, num_frames=4, tubelet_size=2)  # 2 tubelet frames of 4 x 4 patches: 32 tokens
# a rectangular merge, a ragged merge (at both placements) and a ragged drop
METHODS = [("tome", dict(r=3)), ("saint_match", dict(tau=0.7, fraction=0.7)),
           ("saint_match", dict(tau=0.7, fraction=0.7, select_at="attention")), ("saint", dict(tau=0.7, k=1))]
IDS = ["tome", "saint_match", "saint_match_before_attention", "saint"]


def _spread_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Norms away from 1 / 0 (HF initialises every one so): a swapped norm would show."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(std=0.1)
    return model


def videos() -> torch.Tensor:
    """Three clips ``[3, 4, 3, 32, 32]`` that differ in redundancy (a still, near-uniform one)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 3, 32, 32, generator=g)
    x[0] = x[0, :1].mean(dim=(2, 3), keepdim=True) + 0.02 * torch.randn(4, 3, 32, 32, generator=g)
    x[1, :, :, :16] = 0.5
    return x


def make_video(kind: str) -> torch.nn.Module:
    """A tiny random video model of ``kind`` (``videomae``, ``vivit``, ``*_classifier``), norms
    away from 1 / 0 and ViViT's class token and positions away from 0."""
    if kind.startswith("vivit"):
        model = vivit()
        model = model if kind.endswith("_classifier") else model.vivit
    else:
        model = classifier() if kind.endswith("_classifier") else transformers.VideoMAEModel(
            transformers.VideoMAEConfig(**TINY))
    return _spread_norms(model).eval()


def classifier(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(**TINY, num_labels=5, **extra))
    return model.eval()


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", METHODS, ids=IDS)
def test_each_clip_as_alone_and_the_classifier_reads_what_every_tubelet_became(method, kw, layout):
    model, x = classifier(), videos()
    adapter = find_adapter(model)
    saint.patch(model, method, trace=True, layout=layout, **kw)
    features, logits = adapter.embed(model, x)
    assert saint.stats(model).layout == ("rectangular" if method == "tome" else layout)
    counts = saint.stats(model).tokens[-1]
    assert method == "tome" or len(set(counts)) > 1, counts  # ragged
    with torch.no_grad():
        hidden = model.videomae(pixel_values=x, output_hidden_states=True)
    origin = get_handle(model).origins()[-1]
    want = torch.stack([hidden.last_hidden_state[i, origin[i][origin[i] >= 0]].mean(dim=0) for i in range(len(x))])
    torch.testing.assert_close(features, want, **TOL)
    torch.testing.assert_close(logits, model.classifier(model.fc_norm(features)), **TOL)
    labels = torch.tensor([0, 3, 4])
    with torch.no_grad():
        out = model(pixel_values=x, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, labels), **TOL)
    masks = [get_handle(model).hidden_state_valid(i) for i in range(len(hidden.hidden_states))]
    for i in range(len(x)):
        with torch.no_grad():
            alone = model.videomae(pixel_values=x[i : i + 1], output_hidden_states=True)
            torch.testing.assert_close(logits[i], model(pixel_values=x[i : i + 1]).logits[0], **TOL)
        assert_real_tokens_as_alone(hidden.hidden_states, alone.hidden_states, masks, i)


def test_nothing_to_prune_and_unpatch_give_the_models_own_answer():
    """Bit for bit, although VideoMAE's embeddings are a transposed (non-contiguous) view:
    the layers add their residuals in the model's order, so the output's layout, and the
    classifier's mean over it, are the model's."""
    model, x = classifier(), videos()
    with torch.no_grad():
        ref = model(pixel_values=x).logits
        saint.patch(model, "tome", r=0)
        assert torch.equal(model(pixel_values=x).logits, ref)
        saint.unpatch(model)
        saint.patch(model, "saint_match", tau=0.7, fraction=0.7)
        assert not torch.allclose(model(pixel_values=x).logits, ref, atol=1e-4)
        saint.unpatch(model)
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert torch.equal(model(pixel_values=x).logits, ref)


def test_masked_pretraining_inputs_run_per_clip_as_alone():
    """``bool_masked_pos`` (the same tubelets hidden in every clip) leaves the encoder fewer
    tokens; pruning starts from those."""
    torch.manual_seed(0)
    model = transformers.VideoMAEModel(transformers.VideoMAEConfig(**TINY)).eval()
    x = videos()
    hidden = torch.zeros(32, dtype=torch.bool)
    hidden[torch.randperm(32, generator=torch.Generator().manual_seed(0))[:8]] = True
    pos = hidden.expand(len(x), -1)
    saint.patch(model, "saint_match", tau=0.7, fraction=0.7)
    with torch.no_grad():
        out = model(pixel_values=x, bool_masked_pos=pos).last_hidden_state
    assert saint.stats(model).tokens[0] == [24, 24, 24]
    mask = saint.token_mask(model)
    for i in range(len(x)):
        with torch.no_grad():
            alone = model(pixel_values=x[i : i + 1], bool_masked_pos=pos[:1]).last_hidden_state
        torch.testing.assert_close(out[i] if mask is None else out[i][mask[i]], alone[0], **TOL)


def test_calibration_takes_video_batches():
    model, x = classifier(), videos()
    adapter = find_adapter(model)
    assert adapter.grid(model, x).num_patches == 32 and adapter.grid(model).num_patches == 32
    cal = saint.calibrate(model, x, speedup=1.5, method="saint_match", tol=0.03)  # (tiny clips: steps of ~2%)
    assert cal.reached and abs(cal.achieved / 1.5 - 1) < 0.03
    saint.patch(model, "saint_match", **cal.patch_kwargs())
    with torch.no_grad():
        assert model(pixel_values=x).logits.shape == (3, 5)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        adapter.check_inputs(torch.randn(3, 32, 32))


def test_position_zero_classifier_and_pretraining_are_refused_with_what_to_do():
    model = classifier(use_mean_pooling=False)
    with pytest.raises(TypeError, match=r"position 0.*use_mean_pooling=True"):
        saint.patch(model, "tome", r=2)
    assert not saint.is_patched(model)
    torch.manual_seed(0)
    pretraining = transformers.VideoMAEForPreTraining(transformers.VideoMAEConfig(**TINY))
    with pytest.raises(TypeError, match="reconstructs every masked tubelet"):
        saint.patch(pretraining, "tome", r=2)


def vivit() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.VivitConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                   image_size=32, num_frames=4, tubelet_size=[2, 8, 8], num_labels=5)
    model = transformers.VivitForVideoClassification(cfg).eval()
    with torch.no_grad():  # ViViT starts its class token and positions at zero
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "position_embeddings")):
                p.normal_()
    return model


VIVIT_METHODS = [("tome", dict(r=3)), ("saint_match", dict(tau=0.6, fraction=0.7)),
                 ("saint_match", dict(tau=0.6, fraction=0.7, select_at="attention", guard=0.1)),
                 ("saint", dict(tau=0.6, k=1))]


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", VIVIT_METHODS, ids=IDS)
def test_vivit_classifies_each_clip_as_alone(method, kw, layout):
    model, x = vivit(), videos()
    adapter = find_adapter(model)
    assert adapter.grid(model, x) == adapter.grid(model) and adapter.grid(model).num_patches == 32
    ref_emb, _ = adapter.embed(model, x)
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    saint.patch(model, method, layout=layout, **kw)
    emb, logits = adapter.embed(model, x)
    assert not torch.allclose(emb, ref_emb, atol=1e-4)
    counts = saint.stats(model).tokens[-1]
    assert method == "tome" or len(set(counts)) > 1, counts  # ragged
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(logits, out.logits, **TOL)
    masks = [get_handle(model).hidden_state_valid(i) for i in range(len(out.hidden_states))]
    for i in range(len(x)):
        with torch.no_grad():
            alone = model(pixel_values=x[i : i + 1], output_hidden_states=True)
        torch.testing.assert_close(out.logits[i], alone.logits[0], **TOL)
        assert_real_tokens_as_alone(out.hidden_states, alone.hidden_states, masks, i)
    saint.unpatch(model)
    saint.patch(model, "tome", r=0)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, ref)


def vjepa2(classifier: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.VJEPA2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2.0,
                                    crop_size=32, patch_size=8, frames_per_clip=4, tubelet_size=2,
                                    pred_hidden_size=16, pred_num_hidden_layers=1, pred_num_attention_heads=2,
                                    num_pooler_layers=1, num_labels=5)
    model = transformers.VJEPA2ForVideoClassification(cfg) if classifier else transformers.VJEPA2Model(cfg)
    return _spread_norms(model).eval()


VJEPA2_METHODS = [("tome", dict(r=3)), ("saint_match", dict(tau=0.5, fraction=0.7)),
                  ("saint_match", dict(tau=0.5, fraction=0.7, select_at="attention")), ("saint", dict(tau=0.5, k=1))]


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", VJEPA2_METHODS, ids=IDS)
def test_vjepa2_classifies_each_clip_as_alone(method, kw, layout):
    """V-JEPA 2's rotary attention rotates each token to its original index, and the attentive
    pooler reads each clip's real tokens (merged keys weighted by size): a ragged batch gives
    each clip's features, logits and hidden states as the clip alone."""
    model, x = vjepa2(), videos()
    adapter = find_adapter(model)
    assert adapter.name == "hf_vjepa2" and adapter.grid(model, x).num_patches == adapter.grid(model).num_patches == 32
    ref_features, _ = adapter.embed(model, x)
    saint.patch(model, method, layout=layout, **kw)
    features, logits = adapter.embed(model, x)
    counts = saint.stats(model).tokens[-1]
    assert method == "tome" or len(set(counts)) > 1, counts  # ragged
    assert not torch.allclose(features, ref_features, atol=1e-4)
    with torch.no_grad():
        hidden = model.vjepa2(pixel_values_videos=x, skip_predictor=True, output_hidden_states=True)
    masks = [get_handle(model).hidden_state_valid(i) for i in range(len(hidden.hidden_states))]
    for i in range(len(x)):
        alone_features, alone_logits = adapter.embed(model, x[i : i + 1])
        torch.testing.assert_close(features[i], alone_features[0], **TOL)
        torch.testing.assert_close(logits[i], alone_logits[0], **TOL)
        with torch.no_grad():
            alone = model.vjepa2(pixel_values_videos=x[i : i + 1], skip_predictor=True, output_hidden_states=True)
        assert_real_tokens_as_alone(hidden.hidden_states, alone.hidden_states, masks, i)


def test_vjepa2_rotates_each_kept_token_at_its_original_position():
    """Tubelets dropped before layer 1's attention: the encoder equals the model's own layers
    run on the kept tokens with their original indices as ``position_mask``."""
    model, x = vjepa2(classifier=False), videos()
    saint.patch(model, "budget", layers=[1], keep=20, select_at="attention", trace=True)
    with torch.no_grad():
        got = model(pixel_values_videos=x, skip_predictor=True).last_hidden_state
    origin = get_handle(model).origins()[-1]
    saint.unpatch(model)
    encoder = model.encoder
    with torch.no_grad():
        h = encoder.layer[0](encoder.embeddings(x), None)[0]
        kept = torch.stack([torch.nonzero(o >= 0)[:, 0] for o in origin])  # original indices, in order
        assert kept.shape == (len(x), 20) and not torch.equal(kept[0], kept[1])
        h = h.gather(1, kept[..., None].expand(-1, -1, h.shape[-1]))
        for layer in encoder.layer[1:]:
            h = layer(h, kept)[0]
        torch.testing.assert_close(got, encoder.layernorm(h), **TOL)


def test_vjepa2_nothing_to_prune_unpatch_and_the_predictor():
    model, x = vjepa2(), videos()
    with torch.no_grad():
        ref = model(pixel_values_videos=x).logits
        saint.patch(model, "tome", r=0)
        assert torch.equal(model(pixel_values_videos=x).logits, ref)
        with pytest.raises(ValueError, match="skip_predictor=True"):
            model.vjepa2(pixel_values_videos=x)
        # the masks' tubelet indices are the whole clip's (they picked whichever survivors sat there)
        mask = [torch.arange(4, 12).expand(len(x), -1)]
        with pytest.raises(ValueError, match="context_mask index tubelets of the whole clip"):
            model.vjepa2(pixel_values_videos=x, skip_predictor=True, context_mask=mask)
        saint.unpatch(model)
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert torch.equal(model(pixel_values_videos=x).logits, ref)
    cal = saint.calibrate(model, x, flops_speedup=1.5, method="saint_match", tol=0.03)  # (tiny clips: steps of ~2%)
    assert cal.reached and abs(cal.achieved / 1.5 - 1) < 0.03
    with pytest.raises(ValueError, match=r"clips \[N, T, 3, H, W\]"):
        find_adapter(model).check_inputs(torch.randn(3, 3, 32, 32))


def test_vjepa2_copies_and_threads_pool_their_own_calls():
    import copy

    from .conftest import assert_two_threads_agree

    model, x = vjepa2(), videos()
    saint.patch(model, "saint_match", tau=0.5, fraction=0.7)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(pixel_values_videos=x).logits, model(pixel_values_videos=x).logits, **TOL)
    assert twin.pooler.forward.__self__ is twin.pooler

    @torch.no_grad()
    def logits(clips: torch.Tensor) -> torch.Tensor:
        return model(pixel_values_videos=clips).logits

    assert_two_threads_agree(logits, [(x,), (x[:2].flip(0),)] * 5)


@pytest.mark.parametrize("kind", ["videomae", "vivit", "vjepa2"])
def test_token_analysis_reads_clips(kind):
    """``saint.analysis`` takes a video model's clips through its adapter; each clip's
    statistics do not depend on how the clips are batched."""
    from saint.analysis.collect import token_evolution

    model = vjepa2() if kind == "vjepa2" else make_video(f"{kind}_classifier")
    x = videos()
    batched = token_evolution(model, x, tau=0.5, k=2, batch_size=2)
    first = token_evolution(model, x[:1], tau=0.5, k=2)
    assert batched.values["key_cosine"].shape == (3, 4)
    torch.testing.assert_close(batched.values["key_cosine"][:1], first.values["key_cosine"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, (T, )?3, H, W\]"):
        token_evolution(model, torch.zeros(3, 32, 32))

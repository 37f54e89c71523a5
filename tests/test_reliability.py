"""No silent wrong answers: gradient checkpointing recomputes the same selection, a
deep copy is an independent patched model, one instance serves several threads,
``random`` gives each image the same draw alone or in any batch, and packed training
gives every parameter the padded layout's finite gradient."""

from __future__ import annotations

import copy
import functools
import io
import pickle
import threading

import pytest
import timm
import torch

import saint
import saint.adapters.common

from .conftest import assert_two_threads_agree, make_tiny, spread_zero_biases

# every method that prunes the tiny ViT, ragged (rate="sample"), merging or rectangular
CASES = {
    "saint": dict(tau=0.3, k=2),
    "saint_batch": dict(tau=0.3, k=2, rate="batch"),
    "saint_fold": dict(tau=0.3, k=2),
    "saint_plus": dict(tau=0.3),
    "saint_match": dict(tau=0.3, fraction=0.7),
    "tome": dict(r=2),
    "random": dict(r=3),
    "attn": dict(r=3),
    "budget": dict(keep=8, layers=[1]),
}


def patched(case: str, seed: int = 0, **extra) -> torch.nn.Module:
    model = make_tiny("vit", seed=seed, **extra)
    return saint.patch(model, case.split("_batch")[0], **CASES[case])


def outputs_and_input_grad(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_checkpointing_recomputes_the_same_selection(case, images):
    """timm's checkpointed blocks run again during backward; they must select the
    same tokens, so outputs, gradients and stats equal the plain run exactly."""
    plain = patched(case)
    ref_out, ref_grad = outputs_and_input_grad(plain, images)
    ckpt = patched(case)
    ckpt.set_grad_checkpointing(True)
    out, grad = outputs_and_input_grad(ckpt, images)
    assert torch.equal(out, ref_out)
    assert torch.equal(grad, ref_grad)
    assert saint.stats(ckpt).tokens == saint.stats(plain).tokens


def test_hf_gradient_checkpointing_recomputes_the_same_selection(images):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8
    )

    def run(checkpointing: bool):
        torch.manual_seed(0)
        model = transformers.CLIPVisionModel(cfg)  # train mode: HF checkpoints only while training
        if checkpointing:
            model.activation_checkpointing_enable()
        saint.patch(model, "saint", tau=0.3, k=2)
        x = images.clone().requires_grad_(True)
        out = model(pixel_values=x).last_hidden_state
        out.nan_to_num().square().sum().backward()  # packed ragged output: NaN at padding
        return out.detach(), x.grad, saint.stats(model).tokens

    ref, ckpt = run(False), run(True)
    torch.testing.assert_close(ckpt[0], ref[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ckpt[1], ref[1]) and ckpt[2] == ref[2]


def test_random_draw_of_an_image_is_independent_of_its_batch(images):
    """Each image keeps the same tokens alone, in its batch, or at another row."""
    model = saint.patch(make_tiny("vit"), "random", r=3, trace=True)
    handle = saint.adapters.common.get_handle(model)
    with torch.no_grad():
        batch = model(images)
        kept = [o.clone() for o in handle.state.origins]
        for i in range(images.shape[0]):
            torch.testing.assert_close(model(images[i : i + 1])[0], batch[i], atol=1e-5, rtol=1e-5)
            assert all(torch.equal(o[0], k[i]) for o, k in zip(handle.state.origins, kept, strict=True))
        model(images.flip(0))
        assert all(torch.equal(o, k.flip(0)) for o, k in zip(handle.state.origins, kept, strict=True))


def test_deepcopy_is_an_independent_patched_model(images):
    model = patched("saint")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        ref2 = model(images[:2])
        ref = model(images)
        assert torch.equal(clone(images[:2]), ref2)
        assert [len(t) for t in saint.stats(clone).tokens] == [2] * 4
        assert [len(t) for t in saint.stats(model).tokens] == [4] * 4  # the copy's call is not the model's
        saint.unpatch(clone)
        assert saint.is_patched(model) and not saint.is_patched(clone)
        assert torch.equal(model(images), ref)
        assert torch.equal(clone(images), make_tiny("vit")(images))  # the copy is the original model again


def test_deepcopy_of_a_patched_hf_tower_is_independent(images):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = saint.patch(transformers.SiglipVisionModel(cfg).eval(), "saint", tau=0.3, k=2)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        ref1 = model(pixel_values=images[:1]).pooler_output
        ref = model(pixel_values=images).pooler_output
        assert torch.equal(clone(pixel_values=images[:1]).pooler_output, ref1)
        assert [len(t) for t in saint.stats(model).tokens] == [4] * 4
        saint.unpatch(model)
        assert saint.is_patched(clone)
        assert torch.equal(clone(pixel_values=images).pooler_output, ref)


def test_distributed_data_parallel_around_a_patched_model(images, tmp_path):
    """Patched first, then wrapped: DistributedDataParallel (one CPU process, gloo) gives the
    patched answer and trains; patching the wrapper, or a DataParallel, is refused with what to do."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = patched("saint_match")
        with torch.no_grad():
            ref = model(images)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        with torch.no_grad():
            assert torch.equal(wrapped(images), ref)
        with pytest.raises(TypeError, match="patch the model first, then wrap it"):
            saint.patch(torch.nn.parallel.DistributedDataParallel(make_tiny("vit")), "tome", r=2)
        model.train()
        wrapped(images).square().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    finally:
        dist.destroy_process_group()
    with pytest.raises(TypeError, match="cannot run under DataParallel"):
        saint.patch(torch.nn.DataParallel(make_tiny("vit")), "tome", r=2)


@pytest.mark.parametrize("arch", ["vit_small_patch16_224", "vit_small_patch16_dinov3", "beit_base_patch16_224",
                                  "vit_relpos_medium_patch16_cls_224", "cait_xxs24_224"])
def test_timm_features_only_takes_a_merging_method(arch, images):
    """timm's features_only wrapper (spatial maps of every patch, from its model's
    forward_intermediates): a merging method leaves every map on the grid, each image's as
    alone; a dropping method is refused, the model left unpatched; its model cannot be
    unpatched on its own while the wrapper is patched; unpatched, the maps are the model's own."""
    features = timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, depth=4,
                                 features_only=True, out_indices=(0, 3)).eval()
    spread_zero_biases(features)
    with torch.no_grad():
        ref = features(images)
    with pytest.raises(ValueError, match=r"row for every patch.*use a merging method"):
        saint.patch(features, "saint", tau=0.3, k=1, layers=[1])
    assert not saint.is_patched(features) and not saint.is_patched(features.model)
    saint.patch(features, "saint_match", tau=0.3, fraction=0.7, layers=[1])
    with torch.no_grad():
        maps = features(images)
        assert saint.stats(features).layout == "packed"
        assert [m.shape for m in maps] == [r.shape for r in ref]
        assert torch.equal(maps[0], ref[0]) and not torch.allclose(maps[1], ref[1], atol=1e-4)
        for i in range(len(images)):
            for grid, one in zip(maps, features(images[i : i + 1]), strict=True):
                torch.testing.assert_close(grid[i], one[0], rtol=0, atol=1e-5)
    for call in (lambda: saint.unpatch(features.model), lambda: saint.patch(features.model, "tome", r=2)):
        with pytest.raises(ValueError, match="patched through its FeatureGetterNet"):
            call()
    saint.unpatch(features)
    assert not saint.is_patched(features) and not saint.is_patched(features.model)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(features(images), ref, strict=True))


@pytest.mark.parametrize("kind", ["timm", "hf"])
def test_blocks_wrapped_by_accelerate_are_refused_and_left_alone(kind, images):
    """A block whose forward accelerate replaced (its hooks of a device map across devices)
    is refused: saint used to overwrite a timm block's, dropping the hook while patched and
    for good after unpatch (an HF tower's own hooked forward too). accelerate's cpu_offload
    of a timm model (hooks on the leaves and the model, whose forward saint keeps) runs patched."""
    accelerate = pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    from accelerate.hooks import ModelHook, add_hook_to_module

    def make() -> torch.nn.Module:
        if kind == "timm":
            return make_tiny("vit")
        torch.manual_seed(0)
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32,
            patch_size=8)).eval()

    def run(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(images) if kind == "timm" else model(pixel_values=images).pooler_output

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = make()
    blocks = model.blocks if kind == "timm" else model.encoder.layers
    for blk in blocks:
        add_hook_to_module(blk, Count())
    want = run(model)
    with pytest.raises(ValueError, match="already has a per-instance forward, set by another library"):
        saint.patch(model, "saint_plus", tau=0.2)
    Count.calls = 0
    assert not saint.is_patched(model) and torch.equal(run(model), want) and Count.calls == len(blocks)

    patched_alone, offloaded = saint.patch(make(), "saint_plus", tau=0.2), make()
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))  # hooks the leaves and the model
    if kind == "hf":  # saint replaces the tower's own forward, which accelerate's hook holds
        with pytest.raises(ValueError, match="CLIPVisionModel already has a per-instance forward"):
            saint.patch(offloaded, "saint_plus", tau=0.2)
        return
    unpatched = run(offloaded)
    saint.patch(offloaded, "saint_plus", tau=0.2)
    assert torch.equal(run(offloaded), run(patched_alone))
    # selecting before attention runs the key projection (offloaded: its own forward) too
    saint.patch(offloaded, "saint_plus", tau=0.2, select_at="attention")
    saint.patch(patched_alone, "saint_plus", tau=0.2, select_at="attention")
    torch.testing.assert_close(run(offloaded), run(patched_alone), rtol=1e-5, atol=1e-6)  # whole vs split qkv
    saint.unpatch(offloaded)  # accelerate's forwards on the leaves stay
    assert torch.equal(run(offloaded), unpatched)


def test_a_key_projection_with_its_own_forward_runs_it(images):
    """A per-instance ``forward`` on a block's qkv (a user's wrapper): selecting before
    attention runs it as a hook on the projection would run (not the weight's rows on their
    own), and unpatching leaves it in place."""
    def doubled(model: torch.nn.Module, how: str) -> torch.nn.Module:
        for blk in model.blocks:
            if how == "forward":
                blk.attn.qkv.forward = functools.partial(lambda x, f: f(x) * 2, f=blk.attn.qkv.forward)
            else:
                blk.attn.qkv.register_forward_hook(lambda mod, args, out: out * 2)
        return model

    own, hooked = doubled(make_tiny("vit"), "forward"), doubled(make_tiny("vit"), "hook")
    with torch.no_grad():
        want = own(images)
        for model in (own, hooked):
            saint.patch(model, "saint", select_at="attention", **CASES["saint"])
        assert torch.equal(own(images), hooked(images))
        saint.unpatch(own)
        assert "forward" in own.blocks[0].attn.qkv.__dict__ and torch.equal(own(images), want)


def test_pickling_a_patched_model_says_unpatch_first():
    model = patched("tome")
    with pytest.raises(TypeError, match="unpatch first"):
        torch.save(model, io.BytesIO())
    with pytest.raises(TypeError, match="unpatch first"):
        pickle.dumps(model)
    saint.unpatch(model)
    torch.save(model, io.BytesIO())


@pytest.mark.parametrize("case", ["saint", "tome", "random"])
def test_one_instance_in_two_threads_gives_every_call_its_own_answer(case, images):
    model = patched(case)
    inputs = [images[: 1 + i % 4] * (1 + i / 10) for i in range(12)]

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    assert_two_threads_agree(call, [(x,) for x in inputs])


def test_stats_is_the_last_complete_forward(images):
    model = patched("saint")
    with pytest.raises(RuntimeError, match="call the model first"):
        saint.stats(model)
    with torch.no_grad():
        model(images[:2])
        good = saint.stats(model).tokens

        def fail(module, args):
            raise RuntimeError("boom")

        hook = model.blocks[2].register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="boom"):
            model(images)  # fails after two blocks ran
        hook.remove()
    assert saint.stats(model).tokens == good


def test_calling_a_middle_block_alone_is_refused(images):
    model = patched("saint")
    with torch.no_grad():
        tokens = model.forward_features(images)
        with pytest.raises(RuntimeError, match="ran without blocks 0..2"):
            model.blocks[3](tokens)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("arch", ["vit", "mae_avgpool"])
def test_empty_batch_gives_an_empty_output_like_the_unpatched_model(case, arch):
    empty = torch.zeros(0, 3, 32, 32)
    with torch.no_grad():
        want = make_tiny(arch)(empty)
        model = saint.patch(make_tiny(arch), case.split("_batch")[0], **CASES[case])
        got = model(empty)
        assert got.shape == want.shape
        assert saint.stats(model).tokens == [[]] * 4


def test_calls_from_many_short_lived_threads_do_not_accumulate(images):
    model = patched("saint")
    handle = saint.adapters.common.get_handle(model)

    def call() -> None:
        with torch.no_grad():
            model(images[:1])

    for _ in range(8):
        t = threading.Thread(target=call)
        t.start()
        t.join()
    call()  # a new call forgets the finished threads' calls
    assert len(handle.runs._current) == 1 and len(handle.runs._executing) == 1
    assert [len(t) for t in saint.stats(model).tokens] == [1] * 4


def _parameter_grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_finite_and_equal(packed: dict[str, torch.Tensor], padded: dict[str, torch.Tensor]) -> None:
    assert packed.keys() == padded.keys()
    for name, g in packed.items():
        assert bool(torch.isfinite(g).all()), name
        torch.testing.assert_close(g, padded[name], rtol=1e-4, atol=1e-5, msg=name)


RAGGED = ["saint", "saint_fold", "saint_plus", "saint_match"]


@pytest.mark.parametrize("method", RAGGED)
def test_packed_training_gives_finite_gradients_equal_to_padded(method, images):
    """A packed ragged batch leaves the blocks padded; when autograd records it the
    padding is 0, not NaN, so the final norm's weight (which multiplies every row) gets
    a finite gradient, and every parameter's gradient equals the padded layout's."""
    grads = {}
    for layout in ("packed", "padded"):
        model = saint.patch(make_tiny("vit").train(), method, layout=layout, **CASES[method])
        grads[layout] = _parameter_grads(model, model(images).square().sum())
        assert saint.stats(model).layout == layout
    assert "norm.weight" in grads["packed"]
    _assert_finite_and_equal(grads["packed"], grads["padded"])


def test_packed_siglip_training_gives_finite_gradients(images):
    """SigLIP norms the whole padded sequence (``post_layernorm``) before its pooling head."""
    from .test_hf_vision import make

    grads = {}
    for layout in ("packed", "padded"):
        model = saint.patch(make("siglip").train(), "saint", layout=layout, tau=0.3, k=2)
        out = model(pixel_values=images).pooler_output
        grads[layout] = _parameter_grads(model, out.square().sum())
        assert saint.stats(model).layout == layout
    assert "post_layernorm.weight" in grads["packed"]
    _assert_finite_and_equal(grads["packed"], grads["padded"])


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_training_only_the_final_norm_of_frozen_blocks_gives_finite_gradients(layout, images):
    """LN-tuning / norm-and-head probing: the blocks are frozen, so the tokens leaving them
    need no gradient, but autograd records the norm after them: its padding rows must be 0
    (a NaN row made the norm's weight gradient NaN, and one step every later output)."""
    grads = {}
    for patched in (False, True):
        model = make_tiny("vit").train()
        if patched:
            saint.patch(model, "saint", layout=layout, **CASES["saint"])
        model.requires_grad_(False)
        model.norm.requires_grad_(True)
        grads[patched] = _parameter_grads(model, model(images).square().sum())
    assert saint.stats(model).layout == layout and saint.token_mask(model) is not None
    assert grads[True].keys() == grads[False].keys() == {"norm.weight", "norm.bias"}
    assert all(bool(torch.isfinite(g).all()) for g in grads[True].values())


def test_packed_output_keeps_nan_padding_without_autograd(images):
    model = saint.patch(make_tiny("vit"), "saint", **CASES["saint"])
    with torch.no_grad():
        feats = model.forward_features(images)
    mask = saint.token_mask(model)
    assert mask is not None and not bool(mask.all())
    assert bool(feats[~mask].isnan().all()) and bool(torch.isfinite(feats[mask]).all())


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("case", sorted(set(CASES) - {"saint_batch"}))  # a batch vote mixes the images by design
def test_an_image_of_nan_leaves_the_others_as_they_are_alone(case, layout, images):
    """A corrupt image (NaN pixels) first in the batch: the others keep their own tokens and
    answers. A padded view repeats the batch's first token at its padding, and the masked
    anchors were set to ``-inf`` by adding it, which leaves NaN: another image's candidates
    then had a NaN best match and merged nothing."""
    model = saint.patch(make_tiny("vit"), case, layout=layout, **CASES[case])
    x = images.clone()
    x[0, :, :8, :8] = float("nan")
    with torch.no_grad():
        out = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(1, len(x))])
    assert bool(out[0].isnan().any())
    torch.testing.assert_close(out[1:], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["timm", "clip"])
def test_a_hook_on_an_attention_module_saint_computes_itself_is_refused(kind, images):
    """saint computes a packed batch's attention (and a selection before attention's) from
    the attention module's parts: a user's hook on that module would silently not run, so
    the forward refuses it and names the module; where the module runs (the padded layout)
    its hook runs and changes the answer as it does unpatched."""
    from .test_hf_vision import make

    def build() -> tuple[torch.nn.Module, torch.nn.Module, str]:
        if kind == "timm":
            model = make_tiny("vit")
            return model, model.blocks[1].attn, "blocks.1.attn"
        model = make("clip")
        return model, model.encoder.layers[1].self_attn, "encoder.layers.1.self_attn"

    def run(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(images) if kind == "timm" else model(pixel_values=images).pooler_output

    calls = []
    for how in (dict(layout="packed"), dict(layout="padded", select_at="attention")):
        model, attn = build()[:2]
        attn.register_forward_hook(lambda mod, args, out: calls.append(1))
        saint.patch(model, "saint", **how, **CASES["saint"])
        with pytest.raises(RuntimeError, match=rf"{build()[2]} has a forward hook, which would not run"):
            run(model)
    assert not calls
    ablated, attn, _ = build()
    attn.register_forward_hook(lambda mod, args, out: (out[0] * 0, *out[1:]) if isinstance(out, tuple) else out * 0)
    saint.patch(ablated, "saint", layout="padded", **CASES["saint"])
    reference, attn, _ = build()
    proj = attn.proj if kind == "timm" else attn.out_proj
    torch.nn.init.zeros_(proj.weight), torch.nn.init.zeros_(proj.bias)
    saint.patch(reference, "saint", layout="padded", **CASES["saint"])
    torch.testing.assert_close(run(ablated), run(reference))
    assert saint.token_mask(ablated) is not None  # the batch was ragged


@pytest.mark.parametrize("kind", ["eva02", "beit", "cait", "hf_beit"])
def test_a_hook_on_an_attention_module_saint_computes_itself_is_refused_in_the_padded_layout(kind, images):
    """Eva, relative-position and talking-heads blocks, and HF towers whose attention takes no
    key mask, compute a pruning block's attention (and every later block's, once the batch is
    ragged) from the module's parts in the padded layout too: a user's hook there is refused."""
    from .test_hf_beit import beit

    if kind == "hf_beit":
        model, name = beit(classifier=False), "layers.1.attention"
        attn = model.layers[1].attention
    else:
        model = make_tiny(kind)
        attn, name = model.blocks[1].attn, "blocks.1.attn"
    calls = []
    attn.register_forward_hook(lambda mod, args, out: calls.append(1))
    saint.patch(model, "saint", layout="padded", **CASES["saint"])
    with torch.no_grad(), pytest.raises(RuntimeError, match=rf"{name} has a forward hook, which would not run"):
        model(images) if kind != "hf_beit" else model(pixel_values=images)
    assert not calls

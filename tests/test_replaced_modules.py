"""A module saint hooked at patch time, replaced afterwards (PEFT/LoRA wraps a projection,
``modules_to_save`` swaps in a copy, quantisation swaps the class): the hook stays on the
old module and would read what the model no longer computes, so the forward is refused,
every time, with the order that works (saint.unpatch, then saint.patch again), and that
order gives what patching the changed model gives. PEFT's own wrapper is refused with
the model to patch inside it. A LLaVA and its vision tower patched apart are refused too,
and so is an attention implementation switched after patching to one that cannot take
saint's masks."""

from __future__ import annotations

import copy

import pytest
import torch

import saint
from saint.adapters import find_adapter, hf_vision
from saint.adapters.common import SITE_ATTR

from .conftest import make_tiny
from .test_protocol import HF_TINY, llava_inputs, qwen_inputs, tiny_llava, tiny_qwen

transformers = pytest.importorskip("transformers")


class Delta(torch.nn.Module):
    """A LoRA-like wrapper: the wrapped projection plus a fixed low-rank update."""

    def __init__(self, base: torch.nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.base_layer = base
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(0.3 * torch.randn(2, base.in_features, generator=g))
        self.b = torch.nn.Parameter(0.3 * torch.randn(base.out_features, 2, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + x @ self.a.t() @ self.b.t()


class Copied(torch.nn.Module):
    """A ``modules_to_save``-like wrapper: it runs a deep copy of the module it replaced."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.copy = copy.deepcopy(module)

    def forward(self, *args, **kwargs):
        return self.copy(*args, **kwargs)


def tiny_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_TINY)).eval()


def wrap_attr(owner: torch.nn.Module, name: str, wrapper=Delta) -> None:
    setattr(owner, name, wrapper(getattr(owner, name)))


def tiny_siglip() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF_TINY)).eval()


def new_head(model: torch.nn.Module) -> None:
    """Replace SigLIP's attention-pooling head by a fresh one (seeded: the same every time)."""
    torch.manual_seed(1)
    model.head = type(model.head)(model.config).eval()


# family -> (model, the change, call, guard); SigLIP has no class token for the guard
VISION = {
    "timm": (lambda: make_tiny("vit"), lambda m: wrap_attr(m.blocks[1].attn, "qkv"), lambda m, x: m(x), 0.1),
    "clip": (tiny_clip, lambda m: wrap_attr(m.encoder.layers[1].self_attn, "k_proj"),
             lambda m, x: m(pixel_values=x).pooler_output, 0.1),
    # before: the new head pooled over the NaN padding of a ragged batch (NaN pooler_output)
    "siglip_head": (tiny_siglip, new_head, lambda m, x: m(pixel_values=x).pooler_output, 0.0),
}


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("family", sorted(VISION))
def test_vision_hooked_module_replaced_after_patching(family, select_at, images):
    make, change, call, guard = VISION[family]
    settings = dict(method="saint_match", tau=0.3, fraction=0.8, guard=guard, select_at=select_at)
    x = images
    model = make()
    saint.patch(model, **settings)
    change(model)
    for _ in range(2):  # refused on every call, not only the first
        with torch.no_grad(), pytest.raises(RuntimeError, match="replaced after saint.patch .*saint.unpatch"):
            call(model, x)
    saint.unpatch(model)
    assert not any(SITE_ATTR in m.__dict__ or "forward" in m.__dict__ or m._forward_hooks for m in model.modules())
    saint.patch(model, **settings)
    reference = make()  # the same change before patching
    change(reference)
    saint.patch(reference, **settings)
    with torch.no_grad():
        assert torch.equal(call(model, x), call(reference, x))


def tiny_internvl() -> torch.nn.Module:
    from .llm_side_tiny import make

    return make("internvl")


def internvl_inputs(n: int) -> dict[str, torch.Tensor]:
    from .llm_side_tiny import inputs

    return inputs("internvl", [[3, (64, 64), 4]] * n)


def tiny_gemma3() -> torch.nn.Module:
    from .llm_side_tiny import make

    return make("gemma3")


def gemma3_inputs(n: int) -> dict[str, torch.Tensor]:
    from .llm_side_tiny import inputs

    return inputs("gemma3", [[3, (64, 64), 4]] * n)


def tiny_idefics3() -> torch.nn.Module:
    from .llm_side_tiny import make

    return make("idefics3")


def idefics3_inputs(n: int) -> dict[str, torch.Tensor]:
    from .llm_side_tiny import inputs

    return inputs("idefics3", [[3, (64, 64), 4]] * n)


VLM = {
    "llava_llm": (tiny_llava, dict(mode="llm", llm_layers=(1, 3), llm_tau=0.3, llm_k=2), llava_inputs,
                  lambda m: wrap_attr(m.model.language_model.layers[1].self_attn, "k_proj")),
    "llava_fastv": (tiny_llava, dict(method="fastv", fastv_layer=2, fastv_ratio=0.5), llava_inputs,
                    lambda m: wrap_attr(m.model.language_model.layers[1].self_attn, "q_proj")),
    "llava_pool": (tiny_llava, dict(method="pool", visual_keep=4), llava_inputs,
                   lambda m: wrap_attr(m.model, "multi_modal_projector", Copied)),
    "qwen_vit": (tiny_qwen, dict(mode="vit", vit_layer=1, vit_ratio=0.5), qwen_inputs,
                 lambda m: wrap_attr(m.model.visual.blocks[1].attn, "qkv")),
    "qwen_merger": (tiny_qwen, dict(mode="vit", vit_layer=1, vit_ratio=0.5), qwen_inputs,
                    lambda m: wrap_attr(m.model.visual, "merger", Copied)),
    # before: the new tower ran unpruned while the prompt was planned for vit mode, without a word
    "qwen_tower": (tiny_qwen, dict(mode="vit", vit_layer=1, vit_ratio=0.5), qwen_inputs,
                   lambda m: setattr(m.model, "visual", tiny_qwen().model.visual)),
    "internvl_vit": (tiny_internvl, dict(mode="vit", vit_layer=1, vit_ratio=0.5), internvl_inputs,
                     lambda m: wrap_attr(m.model.vision_tower.encoder.layer[1].attention, "k_proj")),
    "internvl_norm": (tiny_internvl, dict(mode="vit", vit_layer=1, vit_ratio=0.5), internvl_inputs,
                      lambda m: wrap_attr(m.model.vision_tower, "layernorm", Copied)),
    "internvl_llm": (tiny_internvl, dict(method="fastv", fastv_layer=2, fastv_ratio=0.5), internvl_inputs,
                     lambda m: wrap_attr(m.model.language_model.layers[1].self_attn, "q_proj")),
    "gemma3_vit": (tiny_gemma3, dict(mode="vit", vit_layer=1, vit_ratio=0.5), gemma3_inputs,
                   lambda m: wrap_attr(m.model.vision_tower.encoder.layers[1].self_attn, "k_proj")),
    "gemma3_norm": (tiny_gemma3, dict(mode="vit", vit_layer=1, vit_ratio=0.5), gemma3_inputs,
                    lambda m: wrap_attr(m.model.vision_tower, "post_layernorm", Copied)),
    "idefics3_vit": (tiny_idefics3, dict(mode="vit", vit_layer=1, vit_ratio=0.5), idefics3_inputs,
                     lambda m: wrap_attr(m.model.vision_model.encoder.layers[1].self_attn, "k_proj")),
    "idefics3_tower": (tiny_idefics3, dict(mode="vit", vit_layer=1, vit_ratio=0.5), idefics3_inputs,
                       lambda m: setattr(m.model, "vision_model", tiny_idefics3().model.vision_model)),
}



@pytest.mark.parametrize("name", sorted(VLM))
def test_vlm_hooked_module_replaced_after_patching(name):
    """Before: the LLM-side selections read keys/queries without the update (the last
    logits moved by ~0.1 on a tiny LLaVA with PEFT's LoRA). A copied projector keeps the
    first patch's hook; after unpatch and patch it is left alone."""
    make, settings, make_inputs, change = VLM[name]
    x = make_inputs(2)
    model = make()
    saint.patch(model, **settings)
    change(model)
    for _ in range(2):  # the forward lock is released after the refusal
        with torch.no_grad(), pytest.raises(RuntimeError, match="replaced after saint.patch"):
            model(**x)
    saint.unpatch(model)
    saint.patch(model, **settings)
    reference = make()  # the same change before patching
    change(reference)
    saint.patch(reference, **settings)
    with torch.no_grad():
        assert torch.equal(model(**x).logits[:, -1], reference(**x).logits[:, -1])


def test_peft_lora_end_to_end(images):
    """With PEFT itself: LoRA added after patching is refused; added before, patching the
    model inside PEFT's wrapper runs through the wrapper and equals the LoRA merged into the
    weights; the wrapper itself is refused with that call."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["qkv", "fc1"], init_lora_weights=False)
    settings = dict(method="saint_match", tau=0.3, fraction=0.8)
    x = images
    torch.manual_seed(1)
    lora = peft.get_peft_model(make_tiny("vit"), copy.deepcopy(config))
    with pytest.raises(TypeError, match=r"patch the model inside it.*get_base_model\(\)"):
        saint.patch(lora, **settings)
    merged = copy.deepcopy(lora).merge_and_unload()
    saint.patch(merged, **settings)
    saint.patch(lora.get_base_model(), **settings)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), merged(x), atol=1e-5, rtol=0)
    late = make_tiny("vit")
    saint.patch(late, **settings)
    late = peft.get_peft_model(late, copy.deepcopy(config))
    with torch.no_grad(), pytest.raises(RuntimeError, match="replaced after saint.patch"):
        late(x)


LLM = dict(mode="llm", llm_layers=(1, 3), llm_tau=0.3, llm_k=2)
NESTED = {  # a VLM, its inputs, a module inside it that saint patches on its own, and how
    "llava_model": (tiny_llava, llava_inputs, lambda m: m.model, LLM),
    "llava_tower": (tiny_llava, llava_inputs, lambda m: m.model.vision_tower, dict(method="tome", r=2)),
    "qwen_model": (tiny_qwen, qwen_inputs, lambda m: m.model, LLM),
    "gemma3_tower": (tiny_gemma3, gemma3_inputs, lambda m: m.model.vision_tower, dict(method="tome", r=2)),
    "internvl_model": (tiny_internvl, internvl_inputs, lambda m: m.model, dict(method="fastv", fastv_layer=2,
                                                                                fastv_ratio=0.5)),
}


@pytest.mark.parametrize("name", sorted(NESTED))
def test_a_vlm_and_a_module_inside_it_patched_apart_are_refused(name):
    """A VLM and its inner ``*Model`` or its vision tower each patched: both pruned the same
    prompt, and the forward failed on an index or a shape (LLaVA's tower alone was caught,
    at the next forward). Refused when patching, in either order, with the call that works;
    one patch alone then runs as a fresh one."""
    make, make_inputs, inner_of, inner_settings = NESTED[name]
    x = make_inputs(2)
    model = make()
    inner = inner_of(model)
    saint.patch(inner, **inner_settings)
    for settings in (LLM, dict(mode="vit", vit_layer=1, vit_ratio=0.5) if "qwen" in name else LLM):
        with pytest.raises(ValueError, match=r"inside this .* is already patched by saint on its own; unpatch it"):
            saint.patch(model, **settings)
        assert not saint.is_patched(model)
    saint.unpatch(inner)
    saint.patch(model, **LLM)
    with pytest.raises(ValueError, match=r"is inside a .* that saint patched; patch one of the two"):
        saint.patch(inner, **inner_settings)
    assert not saint.is_patched(inner)
    if name.endswith("_model"):  # past saint.patch (the adapter's own call): refused at the forward
        adapter = find_adapter(inner)
        adapter.patch(inner, **inner_settings)
        with torch.no_grad(), pytest.raises(ValueError, match="was patched by saint on its own after it"):
            model(**x)
        adapter.unpatch(inner)
    fresh = make()
    saint.patch(fresh, **LLM)
    with torch.no_grad():
        assert torch.equal(model(**x).logits[:, -1], fresh(**x).logits[:, -1])
    saint.unpatch(model)
    saint.patch(inner, **inner_settings)  # alone now: as any model
    assert saint.is_patched(inner)


def fresh_layer(model: torch.nn.Module, i: int) -> None:
    """Decoder layer ``i`` rebuilt with the same weights (as a conversion tool would)."""
    lm = model.model.language_model
    old = lm.layers[i]
    new = type(old)(lm.config, i).eval()
    new.load_state_dict(old.state_dict())
    lm.layers[i] = new


@pytest.mark.parametrize("settings", [dict(mode="llm", llm_layers=(1, 3), llm_tau=0.3, llm_k=2),
                                      dict(method="fastv", fastv_layer=2, fastv_ratio=0.5),
                                      dict(mode="vit", vit_keep=8, vit_layer=1)], ids=["llm", "fastv", "vit"])
@pytest.mark.parametrize("layer", [0, 2])
def test_a_decoder_layer_replaced_after_patching_is_refused(settings, layer):
    """A layer without saint's hooks ran on the pruned sequence: a shape error, or with the
    first layer replaced a silently different answer; now every forward says what to do,
    and after patching again the model equals one patched after the same change."""
    x = llava_inputs(2)
    model = tiny_llava()
    saint.patch(model, **settings)
    fresh_layer(model, layer)
    for _ in range(2):  # the forward lock is released after the refusal
        with torch.no_grad(), pytest.raises(RuntimeError, match="layers changed after saint.patch"):
            model(**x)
    saint.unpatch(model)
    saint.patch(model, **settings)
    reference = tiny_llava()
    fresh_layer(reference, layer)
    saint.patch(reference, **settings)
    with torch.no_grad():
        assert torch.equal(model(**x).logits[:, -1], reference(**x).logits[:, -1])


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_a_vlm_and_its_vision_tower_patched_apart_are_refused(family):
    """A tower patched on its own, before or after its LLaVA, used to fail inside
    transformers ("Image features and image tokens do not match") or to replace the LLaVA's
    own tower patch (then removed by the LLaVA's unpatch); each order now says what to do,
    and the LLaVA's own tower patch can be undone only through the LLaVA."""
    if family == "llava":
        make, x = tiny_llava, llava_inputs(2)
    else:
        from .test_protocol import anyres_inputs, tiny_anyres

        make = lambda: tiny_anyres("llava_next")  # noqa: E731
        x = anyres_inputs(make(), 2)
    llm = dict(mode="llm", llm_layers=(1, 3), llm_tau=0.3, llm_k=2)
    vit = dict(mode="vit", vit_keep=8, vit_layer=1)
    model = make()
    tower = model.model.vision_tower
    saint.patch(tower, "tome", r=2)
    for settings in (llm, vit):
        with pytest.raises(ValueError, match="patched by saint on its own; unpatch it first"):
            saint.patch(model, **settings)
        assert not saint.is_patched(model)
    saint.unpatch(tower)
    saint.patch(model, **llm)
    with pytest.raises(ValueError, match="is inside a .* that saint patched"):
        saint.patch(tower, "tome", r=2)
    hf_vision.patch_tower(tower, "tome", r=2)  # past saint.patch (the internal call): refused at the forward
    for _ in range(2):
        with torch.no_grad(), pytest.raises(ValueError, match="was patched by saint on its own after this"):
            model(**x)
    hf_vision.unpatch_tower(tower)
    saint.patch(model, **vit)
    for call in (saint.unpatch, lambda t: saint.patch(t, "tome", r=2)):
        with pytest.raises(ValueError, match="was patched through its Llava"):
            call(tower)
    with torch.no_grad():
        out = model(**x).logits[:, -1]
    saint.unpatch(model)
    assert not saint.is_patched(tower)
    fresh = make()
    saint.patch(fresh, **vit)
    with torch.no_grad():
        assert torch.equal(out, fresh(**x).logits[:, -1])
    fresh.model.vision_tower = make().model.vision_tower  # an unpatched tower in place of the patched one
    with torch.no_grad(), pytest.raises(RuntimeError, match="vision tower of this .* was replaced after saint.patch"):
        fresh(**x)


def test_attention_implementation_switched_after_patching():
    """``set_attn_implementation`` after patching: to one that takes saint's 4-D masks
    (eager) the answer stays the patched one; to one that does not (flex), the next forward
    says so and how to switch back (before: a BlockMask TypeError, or an IndexError for FastV)."""
    x = llava_inputs(2)
    for settings in (dict(mode="llm", llm_layers=(1, 3), llm_tau=0.3, llm_k=2),
                     dict(method="fastv", fastv_layer=2, fastv_ratio=0.5)):
        model = saint.patch(tiny_llava(), **settings)
        with torch.no_grad():
            want = model(**x).logits[:, -1]
            model.set_attn_implementation("eager")
            torch.testing.assert_close(model(**x).logits[:, -1], want, atol=1e-5, rtol=0)
            model.set_attn_implementation("flex_attention")
            with pytest.raises(ValueError, match=r"'flex_attention' \(set since saint.patch\).*set_attn_implementation"):
                model(**x)
            model.set_attn_implementation("sdpa")
            assert torch.equal(model(**x).logits[:, -1], want)


BLOCKS = {
    "timm": (lambda: make_tiny("vit"), "blocks", lambda m, x: m(x)),
    "clip": (tiny_clip, "encoder.layers", lambda m, x: m(pixel_values=x).pooler_output),
}


@pytest.mark.parametrize("family", sorted(BLOCKS))
def test_blocks_changed_after_patching(family, images):
    """Blocks truncated or replaced after patching are refused (before: a timm ViT cut to
    its first 3 blocks returned one row for a batch of 4, its last block having run unpatched
    on the packed stream); a wrapper that runs the patched block (activation checkpointing)
    gives the patched answer; unpatch restores every patched block, kept or not."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    make, path, call = BLOCKS[family]
    x = images
    model = make()
    saint.patch(model, "saint_match", tau=0.3, fraction=0.8)
    with torch.no_grad():
        want = call(model, x)
    blocks = model.get_submodule(path)
    patched = list(blocks)
    parent, name = model.get_submodule(path.rpartition(".")[0]) if "." in path else model, path.rpartition(".")[2]
    setattr(parent, name, blocks[:3])
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"3 are there now.*saint.unpatch\(model\), change the blocks"):
        call(model, x)
    setattr(parent, name, blocks)
    blocks[2] = make().get_submodule(path)[2]  # the same weights, never patched
    with torch.no_grad(), pytest.raises(RuntimeError, match=f"{path}.2 is not the block saint patched"):
        call(model, x)
    blocks[2] = checkpoint_wrapper(patched[2])
    with torch.no_grad():
        assert torch.equal(call(model, x), want)
    setattr(parent, name, blocks[:3])
    saint.unpatch(model)
    assert not any("forward" in b.__dict__ or SITE_ATTR in b.__dict__ for b in patched)

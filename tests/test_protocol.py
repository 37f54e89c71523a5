"""Every tool works on every model family through the adapter protocol: calibrate,
the bench harness (FLOPs + one timed round), token analysis and kept-patch tracing on
a tiny timm ViT, tiny timm EVA-02 and DINOv3 (rotary), a tiny timm NaFlexVit, a tiny Hugging Face DINOv3, a tiny CLIP tower and CLIPModel,
two tiny open_clip CLIPs (its own tower, a timm one), a tiny SigLIP tower, a tiny Siglip2 tower, a tiny AIMv2 tower, a tiny LLaVA, a tiny Qwen2.5-VL, a tiny
LLaVA-NeXT and a tiny LLaVA-OneVision."""

from __future__ import annotations

import copy

import pytest
import torch

import saint
from saint.adapters import find_adapter
from saint.analysis.collect import token_evolution
from saint.analysis.viz import trace_kept
from saint.measure.harness import Harness
from saint.spec import BASELINE, Variant

from .conftest import full_layer_scale, make_tiny
from .test_hf_vision import make_classifier, make_dual

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

IMG = 127
HF_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
               image_size=32, patch_size=8)  # fmt: skip


DINO_TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8)


def tiny_llava() -> torch.nn.Module:
    vision = transformers.CLIPVisionConfig(**HF_TINY)
    text = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                    max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMG,
                                   vision_feature_layer=-2, attn_implementation="sdpa")  # fmt: skip
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def llava_inputs(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    rows = [torch.cat([torch.randint(1, 100, (3,), generator=g), torch.full((16,), IMG),
                       torch.randint(1, 100, (4,), generator=g)]) for _ in range(n)]  # fmt: skip
    px = torch.randn(n, 3, 32, 32, generator=g)
    px[0] = px[0].mean(dim=(1, 2), keepdim=True)  # one redundant image
    return {"input_ids": torch.stack(rows), "pixel_values": px}


def open_clip_model(maker: str) -> torch.nn.Module:
    """A tiny open_clip CLIP (its own tower, or a timm one) from tests/test_open_clip.py."""
    pytest.importorskip("open_clip")
    from . import test_open_clip

    return getattr(test_open_clip, maker)()


def tiny_qwen(family: str = "qwen2_5_vl") -> torch.nn.Module:
    from .qwen_tiny import make

    return make(family)


def qwen_inputs(n: int, family: str = "qwen2_5_vl") -> dict[str, torch.Tensor]:
    from .qwen_tiny import inputs

    return inputs([[3, ("image", (1, 8, 8)), 4]] * n, seeds=list(range(n)), family=family)


def tiny_anyres(family: str) -> torch.nn.Module:
    from .anyres_tiny import make

    return make(family)


def anyres_inputs(model: torch.nn.Module, n: int) -> dict[str, torch.Tensor]:
    from .anyres_tiny import inputs

    return inputs(model, [[(3, 4), (30, 60)]] * n, seeds=list(range(n)))


def llm_side(family: str) -> tuple:
    from .llm_side_tiny import inputs, make

    size = (128, 128) if family == "fast_vlm" else (64, 64)  # FastVLM's tiny tower: stride 32, 4x4 tokens
    return (make(family), inputs(family, [[3, size, 4]] * 4),
            dict(patch_settings={"mode": "llm"}, llm_layers=(0, 2), llm_k=1),
            Variant("fastv", "fastv", {"fastv_layer": 2, "fastv_ratio": 0.5}))


def vision_inputs(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    x[: n // 2] = x[: n // 2] * 0.2 + torch.linspace(-1, 1, 32)  # smooth images: redundant tokens
    return x


def one(model, inputs):
    """The first sample of a batch, split by the model's adapter."""
    return next(iter(find_adapter(model).split(inputs, 1)))


# family -> (model, inputs, SAINT settings calibration passes through, a pruning variant)
FAMILIES = {
    "timm": lambda: (make_tiny("vit"), vision_inputs(6), dict(k=1),
                     Variant("tome", "tome", {"r": 2})),
    "timm_naflex": lambda: (full_layer_scale(timm.create_model(
        "naflexvit_base_patch16_gap", pretrained=False, embed_dim=32, depth=4, num_heads=2, patch_size=8,
        pretrained_cfg_overlay=dict(input_size=(3, 32, 32))).eval()),
        vision_inputs(6), dict(k=1), Variant("saint_match", "saint_match", {"tau": 0.2, "fraction": 0.5})),
    "timm_eva02": lambda: (make_tiny("eva02"), vision_inputs(6), dict(k=1), Variant("tome", "tome", {"r": 2})),
    "timm_dinov3": lambda: (make_tiny("dinov3"), vision_inputs(6), dict(k=1),
                            Variant("saint_match", "saint_match", {"tau": 0.2, "fraction": 0.5, "guard": 0.1})),
    "clip": lambda: (transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_TINY)).eval(),
                     vision_inputs(6), dict(k=1), Variant("tome", "tome", {"r": 2})),
    "siglip": lambda: (transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF_TINY)).eval(),
                       vision_inputs(6), dict(k=1), Variant("budget", "budget", {"keep": 6, "layers": [1]})),
    "siglip2": lambda: (transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(
        **{k: v for k, v in HF_TINY.items() if k != "image_size"}, num_patches=16)).eval(),
        vision_inputs(6), dict(k=1), Variant("tome", "tome", {"r": 2})),
    "aimv2": lambda: (transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(
        **{k: v for k, v in HF_TINY.items() if k != "intermediate_size"}, intermediate_size=48)).eval(),
        vision_inputs(6), dict(k=1), Variant("saint_match", "saint_match", {"tau": 0.2, "fraction": 0.5})),
    "dinov2": lambda: (transformers.Dinov2Model(transformers.Dinov2Config(**DINO_TINY)).eval(),
                       vision_inputs(6), dict(k=1), Variant("tome", "tome", {"r": 2})),
    "dinov2_reg": lambda: (transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**DINO_TINY, num_register_tokens=2)).eval(),
        vision_inputs(6), dict(k=1), Variant("budget", "budget", {"keep": 6, "layers": [1]})),
    "clip_dual": lambda: (make_dual("clip"), vision_inputs(6), dict(k=1), Variant("tome", "tome", {"r": 2})),
    "open_clip": lambda: (open_clip_model("make_clip"), vision_inputs(6), dict(k=1),
                          Variant("saint_match", "saint_match", {"tau": 0.3, "fraction": 0.5, "guard": 0.1})),
    "open_clip_timm": lambda: (open_clip_model("make_timm_clip"), vision_inputs(6), dict(k=1),
                               Variant("tome", "tome", {"r": 2})),
    "clip_classifier": lambda: (make_classifier("clip_classifier"), vision_inputs(6), dict(k=1),
                                Variant("tome", "tome", {"r": 2})),
    "dinov2_classifier": lambda: (transformers.Dinov2ForImageClassification(
        transformers.Dinov2Config(**DINO_TINY, num_labels=5)).eval(), vision_inputs(6), dict(k=1),
        Variant("saint_match", "saint_match", {"tau": 0.2, "fraction": 0.5})),
    "dinov3": lambda: (transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        **HF_TINY, num_register_tokens=2)).eval(),
        vision_inputs(6), dict(k=1), Variant("tome", "tome", {"r": 2})),
    "vit_classifier": lambda: (transformers.ViTForImageClassification(transformers.ViTConfig(**HF_TINY)).eval(),
                               vision_inputs(6), dict(k=1), Variant("tome", "tome", {"r": 2})),
    "deit": lambda: (transformers.DeiTModel(transformers.DeiTConfig(**HF_TINY)).eval(),
                     vision_inputs(6), dict(k=1), Variant("attn", "attn", {"r": 2, "layers": [1]})),
    "llava": lambda: (tiny_llava(), llava_inputs(4), dict(patch_settings={"mode": "llm"}, llm_layers=(0, 2), llm_k=1),
                      Variant("fastv", "fastv", {"fastv_layer": 2, "fastv_ratio": 0.5})),
    "qwen_vl": lambda: (tiny_qwen(), qwen_inputs(4), dict(patch_settings={"mode": "llm"}, llm_layers=(0, 2), llm_k=1),
                        Variant("fastv", "fastv", {"fastv_layer": 2, "fastv_ratio": 0.5})),
    **{name: (lambda name=name: (tiny_qwen(name), qwen_inputs(4, name),
                                 dict(patch_settings={"mode": "llm"}, llm_layers=(0, 2), llm_k=1),
                                 Variant("fastv", "fastv", {"fastv_layer": 2, "fastv_ratio": 0.5})))
       for name in ("qwen2_vl", "glm4v")},
    **{name: (lambda name=name: (
        (m := tiny_anyres(name)), anyres_inputs(m, 4),
        dict(patch_settings={"mode": "llm"}, llm_layers=(0, 2), llm_k=1),
        Variant("fastv", "fastv", {"fastv_layer": 2, "fastv_ratio": 0.5})))
       for name in ("llava_next", "llava_next_video", "llava_onevision")},
    "internvl": lambda: llm_side("internvl"),
    "mistral3": lambda: llm_side("mistral3"),
    "fast_vlm": lambda: llm_side("fast_vlm"),
    "perception_lm": lambda: llm_side("perception_lm"),
    "lighton_ocr": lambda: llm_side("lighton_ocr"),
    "gemma4": lambda: llm_side("gemma4"),
    "paddleocr_vl": lambda: llm_side("paddleocr_vl"),
    "idefics2": lambda: llm_side("idefics2"),
    "vipllava": lambda: llm_side("vipllava"),
    "deepseek_vl": lambda: llm_side("deepseek_vl"),
    "deepseek_vl_hybrid": lambda: llm_side("deepseek_vl_hybrid"),
    "janus": lambda: llm_side("janus"),
    "aya_vision": lambda: llm_side("aya_vision"),
    "gemma3": lambda: llm_side("gemma3"),
    "idefics3": lambda: llm_side("idefics3"),
}
QWEN_ADAPTER = ("qwen_vl", "qwen2_vl", "glm4v")  # the models of the qwen_vl adapter
VLMS = ("llava", *QWEN_ADAPTER, "llava_next", "llava_next_video", "llava_onevision", "internvl", "gemma3", "idefics3",
        "aya_vision", "deepseek_vl", "janus")  # + vision side
NO_GRID = ("mistral3", "fast_vlm", "perception_lm", "lighton_ocr", "gemma4", "paddleocr_vl",
           "idefics2")  # pruned in the LM only; no one patch grid
LLM_ONLY = ("deepseek_vl_hybrid", "vipllava")  # pruned in the language model only; one token per patch
ALL_VLMS = (*VLMS, *NO_GRID, *LLM_ONLY)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    name, (model, inputs, *rest) = request.param, FAMILIES[request.param]()
    if isinstance(inputs, dict):  # what a processor returns: transformers' BatchFeature, a Mapping but no dict
        inputs = transformers.BatchFeature(inputs)
    return name, model, inputs, *rest


def test_calibrate_hits_the_target_and_reproduces(family):
    name, model, inputs, settings, _ = family
    adapter = find_adapter(model)
    with torch.no_grad():
        before = adapter.forward(model, inputs)
    cal = saint.calibrate(model, inputs, keep=0.8, tol=0.02, **settings)
    assert cal.achieved == pytest.approx(0.8, rel=0.1)
    assert cal.tau_setting == adapter.tau_setting
    assert saint.is_patched(model)
    with torch.no_grad():
        adapter.forward(model, inputs)
    counts = [t.tolist() for t in saint.adapters.handle_of(model).site_tokens()]
    for again in (cal, saint.Calibration.from_json(cal.to_json())):  # also from its JSON (block keys as strings)
        saint.patch(model, "saint", **again.patch_kwargs())
        with torch.no_grad():
            adapter.forward(model, inputs)
        assert [t.tolist() for t in saint.adapters.handle_of(model).site_tokens()] == counts
    assert min(counts[-1]) < max(counts[0]), "the calibrated model prunes"
    saint.unpatch(model)
    with torch.no_grad():
        after = adapter.forward(model, inputs)
    key = "logits" if name in ALL_VLMS or name.endswith("_classifier") else (
        "last_hidden_state" if not name.startswith(("timm", "open_clip")) else None)
    a, b = (before, after) if key is None else (getattr(before, key), getattr(after, key))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL_VLMS)
def test_vlm_calibration_refuses_what_it_cannot_do(name):
    """On a VLM, a measured-speed target (with patch_settings, as VLM calibration needs)
    and a merging method (the language model's pruning drops tokens) are refused with what
    to do, and the model is left unpatched (before: "dict() got multiple values for keyword
    argument 'mode'"; "'SaintConfig' object has no attribute 'keep_norm'" from inside the
    decoder)."""
    model, inputs, settings, _ = FAMILIES[name]()
    with pytest.raises(TypeError, match="for VLMs calibrate flops_speedup and time with saint bench"):
        saint.calibrate(model, inputs, measured_speedup=1.5, batch_size=2, **settings)
    assert not saint.is_patched(model)
    for method in ("saint_plus", "saint_fold"):
        with pytest.raises(TypeError, match=f"'{method}' merges tokens.*calibrate with method='saint'"):
            saint.calibrate(model, inputs, flops_speedup=1.4, method=method, **settings)
        assert not saint.is_patched(model)


def test_harness_counts_flops_and_times_one_round(family):
    name, model, inputs, _, variant = family
    harness = Harness(model)
    base, pruned = harness.measure([BASELINE, variant], inputs, warmup=0, repeats=1, memory=False)
    depth = len(find_adapter(model).sites(model))
    assert len(base.tokens) == len(pruned.tokens) == depth
    assert base.tokens[0] == pruned.tokens[0]
    assert pruned.tokens[-1] < base.tokens[-1]
    assert 0 < pruned.flops_per_image < base.flops_per_image
    assert base.timing is not None and pruned.timing is not None
    assert not saint.is_patched(harness.release())


def test_token_analysis_reads_every_site(family):
    name, model, inputs, _, _ = family
    adapter = find_adapter(model)
    batches = [inputs] if name in ALL_VLMS else inputs
    evo = token_evolution(model, batches, batch_size=3)
    assert evo.blocks == [s.name for s in adapter.sites(model)]
    assert evo.num_images == adapter.batch_size(inputs)
    assert torch.isfinite(evo.values["key_cosine"]).all()
    assert torch.isnan(evo.values["cls_entropy"]).all() == (not adapter.probe(model).has_cls)  # registers alone: NaN


def test_trace_kept_maps_the_patch_grid(family):
    name, model, inputs, _, _ = family
    if name in ("llava_next", "llava_next_video", "llava_onevision"):
        pytest.skip("an anyres image is a base grid plus a crop grid: kept-patch pictures draw one grid")
    if name in NO_GRID:
        pytest.skip(f"{name}'s image tokens map to no one patch grid (Mistral 3, LightOnOCR, Gemma 4, PaddleOCR-VL: "
                    "images at their own sizes; FastVLM: a convolutional tower's cells; PerceptionLM: tiles and frames; "
                    "Idefics2: a resampler's latents)")
    grid = find_adapter(model).grid(model, one(model, inputs) if name in QWEN_ADAPTER else None)
    vlm = name in ALL_VLMS
    settings = dict(mode="llm", llm_layers=(0, 1), llm_tau=0.0, llm_k=1) if vlm else dict(tau=0.0, k=1)
    kept = trace_kept(model, one(model, inputs), "saint", **settings)
    assert [g.shape for g in kept.groups] == [(grid.rows, grid.cols)] * len(kept.layers)
    assert kept.kept[0] < grid.num_patches, "tau=0 drops candidates at the first pruning site"
    assert all(a >= b for a, b in zip(kept.kept, kept.kept[1:], strict=False))
    assert not saint.is_patched(model)


@pytest.mark.parametrize("method,settings", [("saint", dict(mode="vit", vit_keep=5, vit_layer=0)),
                                             ("random", dict(visual_keep=8))])
def test_tracing_a_vision_side_reduction_is_refused(method, settings):
    """The trace follows the language model's drop; a vision-side reduction hands it a subset
    of the patches that the trace does not record (``trace_kept`` drew an empty map, or
    failed to fill the grid with ``mode="hybrid"``)."""
    model, inputs, _, _ = FAMILIES["llava"]()
    with pytest.raises(ValueError, match="trace with mode='llm'"):
        trace_kept(model, one(model, inputs), method, **settings)
    assert not saint.is_patched(model)


VISION_SIDE = {"llava": dict(mode="vit", vit_keep=5, vit_layer=0), "qwen_vl": dict(mode="vit", vit_ratio=0.5, vit_layer=0),
               "qwen2_vl": dict(mode="vit", vit_ratio=0.5, vit_layer=0),
               "glm4v": dict(mode="vit", vit_ratio=0.5, vit_layer=0),
               "internvl": dict(mode="vit", vit_ratio=0.5, vit_layer=0),
               "gemma3": dict(mode="vit", vit_ratio=0.5, vit_layer=0),
               "idefics3": dict(mode="vit", vit_ratio=0.5, vit_layer=0),
               "aya_vision": dict(mode="vit", vit_ratio=0.5, vit_layer=0),
               "deepseek_vl": dict(mode="vit", vit_ratio=0.5, vit_layer=0),
               "janus": dict(mode="vit", vit_ratio=0.5, vit_layer=0),
               "llava_next": dict(mode="vit", vit_keep=5, vit_layer=0),
               "llava_next_video": dict(mode="vit", vit_keep=5, vit_layer=0),
               "llava_onevision": dict(mode="vit", vit_keep=5, vit_layer=0)}


@pytest.mark.parametrize("name", VLMS)
def test_assisted_generation_of_an_image_prompt(name, monkeypatch):
    """Assisted generation runs its first candidate tokens in the prompt's forward, then
    crops the rejected ones from the end of every layer's cache, into the prompt. SAINT
    (mode="llm", vision side) generates what plain greedy decoding does: the pruned
    prompt's maps follow the crop (before: 5 of 12 random LLaVA prompts stopped on
    "attention width 30 is smaller than the 31 prompt slots"). FastV, which ranks by the
    prompt's last token (there a candidate), is refused with what to do (before: other tokens)."""
    from saint.adapters.hf_llm import pruned_prompt_of

    into_prompt = []
    crop = transformers.DynamicCache.crop

    def recording_crop(cache, n):
        out = crop(cache, n)
        prompt = pruned_prompt_of(cache)
        into_prompt.append(prompt is not None and cache.get_seq_length() < prompt.length)
        return out

    monkeypatch.setattr(transformers.DynamicCache, "crop", recording_crop)
    model, inputs, _, variant = FAMILIES[name]()
    sample = one(model, inputs)
    ids = sample["input_ids"]
    sample["input_ids"] = torch.cat([ids, ids[:, -4:], ids[:, -4:]], dim=1)  # text the lookup finds again
    if "attention_mask" in sample:
        sample["attention_mask"] = torch.ones_like(sample["input_ids"])
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in sample:
            sample[key] = torch.cat([sample[key], torch.zeros_like(ids[:, :8])], dim=1)
    greedy = dict(max_new_tokens=8, do_sample=False)
    saint.patch(model, method=variant.method, **variant.kwargs)
    with torch.no_grad(), pytest.raises(ValueError, match="FastV ranks the image tokens .* generate without it"):
        model.generate(**sample, prompt_lookup_num_tokens=3, **greedy)
    for settings in (dict(mode="llm", llm_layers=(0, 2), llm_tau=0.3, llm_k=1), VISION_SIDE[name]):
        saint.patch(model, **settings)
        with torch.no_grad():
            want = model.generate(**sample, **greedy)
            into_prompt.clear()
            assert torch.equal(model.generate(**sample, prompt_lookup_num_tokens=4, **greedy), want)
        if settings["mode"] == "llm":
            assert any(into_prompt), "no crop reached into the pruned prompt: the test lost its point"
    saint.unpatch(model)


@pytest.mark.parametrize("name", VLMS)
def test_a_new_generate_call_on_a_cache_of_a_shortened_prompt_is_refused(name):
    """A conversation continued on the cache of a prompt whose image tokens saint removed
    before the language model: generate feeds the ids past the cache's length, which is
    shorter than the ids it came from (before: 51 stale ids fed again instead of 6 on a
    tiny LLaVA, with negative positions). Refused; with mode="llm" the cache continues and
    the answer equals the whole conversation run from scratch."""
    model, inputs, _, _ = FAMILIES[name]()
    sample = one(model, inputs)
    saint.patch(model, **VISION_SIDE[name])
    with torch.no_grad():
        out = model.generate(**sample, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        with pytest.raises(ValueError, match="past_key_values holds a prompt whose image tokens saint removed"):
            model.generate(input_ids=out.sequences, past_key_values=out.past_key_values, max_new_tokens=2)
        saint.patch(model, **VISION_SIDE[name])  # a new patch: not this cache's (it was accepted, misplaced)
        with pytest.raises(ValueError, match="pruned under a patch since removed"):
            model.generate(input_ids=out.sequences, past_key_values=out.past_key_values, max_new_tokens=2)
    saint.unpatch(model)
    with torch.no_grad(), pytest.raises(ValueError, match="pruned under a patch since removed"):
        model.generate(input_ids=out.sequences, past_key_values=out.past_key_values, max_new_tokens=2)
    if name != "llava":
        return
    saint.patch(model, mode="llm", llm_layers=(0, 2), llm_tau=0.3, llm_k=1)
    follow = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.generate(**sample, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        conversation = torch.cat([out.sequences, follow], dim=1)
        kept = copy.deepcopy(out.past_key_values)
        cached = model.generate(input_ids=conversation, past_key_values=out.past_key_values, max_new_tokens=4,
                                do_sample=False)
        scratch = model.generate(input_ids=conversation, pixel_values=sample["pixel_values"], max_new_tokens=4,
                                 do_sample=False)
    assert torch.equal(cached, scratch)
    # a deep copy continues on its own layers (saint's cache methods are bound to each copy: they were
    # the original's, so continuing a copy grew the original)
    lengths = [layer.keys.shape[2] for layer in kept.layers]
    with torch.no_grad():
        again = model.generate(input_ids=conversation, past_key_values=copy.deepcopy(kept), max_new_tokens=4,
                               do_sample=False)
    assert torch.equal(again, scratch) and [layer.keys.shape[2] for layer in kept.layers] == lengths
    # the cache's layers follow this patch's pruning: after a new patch or unpatch it is refused (its
    # layers hold different lengths; continuing crashed inside the attention, or misplaced every token)
    for again in (True, False):
        if again:
            saint.patch(model, mode="llm", llm_layers=(0, 2), llm_tau=0.3, llm_k=1)
        else:
            saint.unpatch(model)
        with torch.no_grad(), pytest.raises(ValueError, match="pruned under a patch since removed"):
            model.generate(input_ids=conversation, past_key_values=copy.deepcopy(kept), max_new_tokens=2)


@pytest.mark.parametrize("name", VLMS)
def test_chunked_prefill_of_an_image_prompt_runs_whole_or_is_refused(name):
    """generate(prefill_chunk_size=n): a prompt with images that fits one chunk runs as one
    prefill (generate used to slice the kept features by the unpruned placeholders:
    IndexError, or "features computed outside the patched model"); a longer one is
    refused with what to do, as saint prunes image tokens within one forward."""
    model, inputs, _, variant = FAMILIES[name]()
    length = inputs["input_ids"].shape[1]
    for settings in ({"method": variant.method, **variant.kwargs}, VISION_SIDE[name]):
        saint.patch(model, **settings)
        with torch.no_grad():
            want = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            got = model.generate(**inputs, max_new_tokens=2, do_sample=False, prefill_chunk_size=length)
            assert torch.equal(got, want)
            with pytest.raises(ValueError, match=f"prefill_chunk_size={length - 1} splits this {length}-token prompt"):
                model.generate(**inputs, max_new_tokens=2, do_sample=False, prefill_chunk_size=length - 1)
        saint.unpatch(model)


@pytest.mark.parametrize("make", [tiny_llava, tiny_qwen], ids=["llava", "qwen"])
def test_per_block_reads_of_a_vlm_patch_are_clear_errors(make):
    """``token_mask`` of a VLM patch describes its output (below), not a block's, and it keeps
    no sizes (a Qwen-VL patch's media runs were once taken for a vision patch's: an
    AttributeError); before a prompt ran there is nothing to describe."""
    model = make()
    saint.patch(model, mode="llm", llm_layers=(1, 3), llm_tau=0.3, llm_k=2)
    with pytest.raises(RuntimeError, match="no prompt has run through the patched model"):
        saint.token_mask(model)
    with pytest.raises(ValueError, match="describes its output .* without a block"):
        saint.token_mask(model, 1)
    with pytest.raises(TypeError, match="keeps no per-token sizes"):
        saint.token_sizes(model)


@pytest.mark.parametrize("name", ("llava", "internvl", "qwen_vl"))
def test_stats_after_a_text_only_prompt_say_no_visual_token(name):
    """A prompt batch without media after one with images: ``saint.stats`` describes it (no
    visual token in any row, as a text-only row of a mixed batch), not the earlier prompt
    (it kept the image prompt's counts for one row); decoding steps leave the prompt's."""
    model, inputs, _, _ = FAMILIES[name]()
    sample = one(model, inputs)
    saint.patch(model, **VISION_SIDE[name])
    text = torch.randint(3, 60, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(**sample)
        assert any(c for row in saint.stats(model).tokens for c in row)
        model(input_ids=text)
        stats = saint.stats(model)
        assert stats.tokens == [[0, 0, 0]] * len(stats.tokens) and len(stats.tokens) > 2
        model.generate(**sample, max_new_tokens=3, do_sample=False)
    after = saint.stats(model).tokens  # the generated prompt's, not its last decoding step's
    assert len(after[0]) == 1 and after[0][0] > 0
    saint.unpatch(model)


@pytest.mark.parametrize("name", ("llava", "qwen_vl"))
def test_an_inner_model_marks_dropped_positions_nan_and_token_mask_names_the_rest(name):
    """A patched inner ``*Model`` (no LM head) returns hidden states in the input's
    coordinates: NaN where a token was dropped, as the ``*ForConditionalGeneration``'s
    logits are (they were exact zeros, which a mean over tokens took for tokens), 0 while
    autograd records; ``saint.token_mask`` marks the positions that kept a token."""
    settings = dict(mode="llm", llm_layers=(0, 2), llm_tau=0.3, llm_k=1)
    model, inputs, _, _ = FAMILIES[name]()
    sample = one(model, inputs)
    saint.patch(model, **settings)
    with torch.no_grad():
        dropped = model(**sample).logits.isnan().any(-1)
    saint.unpatch(model)
    assert dropped.any(), "nothing dropped: the test lost its point"
    inner = model.model
    saint.patch(inner, **settings)
    with torch.no_grad():
        hidden = inner(**sample).last_hidden_state
    mask = saint.token_mask(inner)
    assert torch.equal(mask, ~dropped)
    assert bool(hidden[~mask].isnan().all()) and not bool(hidden[mask].isnan().any())
    hidden = inner(**sample).last_hidden_state  # autograd on: no NaN to reach a gradient
    assert bool((hidden[~mask] == 0).all()) and not bool(hidden.isnan().any())
    with pytest.raises(ValueError, match="without a block"):
        saint.token_mask(inner, 0)
    with pytest.raises(TypeError, match="keeps no per-token sizes"):
        saint.token_sizes(inner)
    saint.unpatch(inner)

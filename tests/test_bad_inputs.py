"""The specification of saint's errors: every bad input raises at the earliest point
(patch time where possible) with the exception type and a message naming the value
and the fix. One row per case: (id, call, exception type, phrase of the message)."""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import numpy as np
import pytest
import timm
import torch

import saint

from .conftest import make_tiny

NAN, INF = float("nan"), float("inf")
IMAGES = torch.zeros(2, 3, 32, 32)


def patch(method: str = "saint", model: torch.nn.Module | None = None, **kw) -> Callable[[], object]:
    return lambda: saint.patch(make_tiny("vit") if model is None else model, method, **kw)


def tiny(**kw) -> torch.nn.Module:
    return make_tiny("vit", **kw)


def patched(method: str = "saint", **kw) -> torch.nn.Module:
    return saint.patch(tiny(), method, **kw)


def calibrate(model: torch.nn.Module | None = None, **kw) -> Callable[[], object]:
    return lambda: saint.calibrate(tiny() if model is None else model, torch.randn(2, 3, 32, 32), **kw)


def stats_before_forward():
    return saint.stats(patched())


def middle_block_alone():
    model = patched()
    with torch.no_grad():
        model.blocks[2](torch.zeros(1, 17, 32))


def per_image_with_another_forwards_mask(float_mask: bool = False):
    """Tokens of one forward split by the mask of the next (same shapes, other images)."""
    model = patched("saint_plus", tau=0.1)
    first = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first[1] = 0.3  # a redundant image keeps fewer tokens: (3, 2), and the flipped batch (2, 3)
    with torch.no_grad():
        feats = model.forward_features(first)
        model.forward_features(first.flip(0))
    mask = saint.token_mask(model)
    assert mask.shape == feats.shape[:2]
    saint.per_image(feats, mask.float() if float_mask else mask)


def block_with_mask():
    model = patched()
    model.blocks[0](torch.zeros(1, 17, 32), attn_mask=torch.zeros(1, 1, 17, 17))


def siglip_attn():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    saint.patch(transformers.SiglipVisionModel(cfg), "attn", r=2)


def llava(**kw):
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                    num_attention_heads=2, num_key_value_heads=2)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=63, vision_feature_layer=-1)
    saint.patch(transformers.LlavaForConditionalGeneration(cfg), "saint", **kw)


CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # --- per-layer values
    ("gamma nan", patch(gamma=NAN), ValueError, "gamma=nan must be a finite number"),
    ("gamma inf", patch(gamma=INF), ValueError, "gamma=inf must be a finite number"),
    ("gamma negative", patch(gamma=-1.0), ValueError, "gamma=-1.0 must be >= 0"),
    ("tau outside [-1, 1]", patch(tau=1.5), ValueError, "tau=1.5 is outside [-1, 1]"),
    ("tau nan", patch(tau=NAN), ValueError, "tau=nan must be a finite number"),
    ("tau a string", patch(tau="0.5"), TypeError, "tau must be a number, got str"),
    ("k zero", patch(k=0), ValueError, "k=0 must be >= 1"),
    ("k fractional", patch(k=2.5), TypeError, "k must be an integer, got 2.5"),
    ("k a bool", patch(k=True), TypeError, "k must be a number, got bool"),
    ("k a bool tensor", patch(k=torch.tensor(True)), TypeError, "k must be a number, got Tensor"),
    ("tau a bool array", patch(tau=np.array(True)), TypeError, "tau must be a number, got ndarray"),
    ("trace a string", patch(trace="yes"), TypeError, "trace must be True or False, got 'yes'"),
    ("r infinite", patch("tome", r=INF), ValueError, "r=inf must be a finite number"),
    ("r negative", patch("random", r=-1), ValueError, "r=-1 must be >= 0"),
    ("tome without r", patch("tome"), ValueError, "ToMe needs r"),
    ("random without r", patch("random"), ValueError, "random drop needs r"),
    ("attn without r", patch("attn"), ValueError, "attn drop needs r"),
    ("budget without keep", patch("budget", layers=[1]), ValueError, "budget drop needs keep"),
    ("budget keep zero", patch("budget", keep=0, layers=[1]), ValueError, "keep=0 must be >= 1"),
    ("tau list too short", patch(tau=[0.5, 0.6], layers=[0, 1, 2]), ValueError, "tau has 2 values but there are 3"),
    ("tau dict off layers", patch(tau={0: 0.5}, layers=[1]), ValueError, "tau is given for blocks [0]"),
    ("tau dict float block", patch(tau={0.5: 0.3}), TypeError, "integer block indices, got 0.5"),
    ("tau dict, k list elsewhere", patch(tau={0: 0.5, 2: 0.3}, k=[1, 3]), ValueError,
     "k's list means blocks 0..1 without layers=, but another setting is given for blocks [0, 2]"),
    # --- layers
    ("layers fractional", patch(layers=[0.7, 1.9]), TypeError, "layers must hold integer block indices, got 0.7"),
    ("layers bool", patch(layers=[True]), TypeError, "layers must hold integer block indices, got True"),
    ("layers a bool mask", patch(layers=torch.tensor([True, False])), TypeError,
     "layers must hold integer block indices, got tensor(True)"),
    ("layers a string", patch(layers="01"), TypeError, "layers must be a list of block indices, got str"),
    ("layers an int", patch(layers=3), TypeError, "layers must be a list of block indices, got int"),
    ("layers empty", patch(layers=[]), ValueError, "layers is empty"),
    ("layers repeated", patch(layers=[1, 1]), ValueError, "repeated block indices"),
    ("layers out of range", patch(layers=[9]), ValueError, "out of range: the model has 4 blocks"),
    ("layers negative", patch(layers=[-1, 2]), ValueError, "layer indices [-1] are negative: blocks are counted from 0"),
    ("budget needs layers", patch("budget", keep=4), ValueError, "needs explicit layers"),
    # --- other settings
    ("prop_attn a string", patch("tome", r=2, prop_attn="no"), TypeError, "prop_attn must be True or False"),
    ("center a number", patch(center=1), TypeError, "center must be True or False"),
    ("seed fractional", patch("random", r=2, seed=0.5), TypeError, "seed must be an integer"),
    ("rate unknown", patch(rate="image"), ValueError, "rate must be one of"),
    ("metric unknown", patch(metric="values"), ValueError, "metric must be one of"),
    ("tome order unknown", patch("tome", r=2, order="sorted"), ValueError,
     "ToMe order must be one of ('keep', 'reference'), got 'sorted'"),
    ("step_div zero", patch("budget", keep=4, layers=[1], step_div=0), ValueError, "step_div=0 must be >= 1"),
    ("unknown method", patch("magic"), ValueError, "unknown method 'magic'; known methods"),
    ("unknown setting", patch("tome", r=2, tau=0.5), TypeError, "does not take ['tau']"),
    # --- settings against the model
    ("budget keep too large", patch("budget", keep=99, layers=[0]), ValueError, "keep=99 at block 0 exceeds"),
    ("attn without class token", patch("attn", tiny(class_token=False, global_pool="avg"), r=2), ValueError,
     "needs a class token"),
    ("saint_match guard without class token",
     patch("saint_match", tiny(class_token=False, global_pool="avg"), tau=0.5, fraction=0.5, guard=0.1), ValueError,
     "needs a class token (it ranks by class-token attention, guard > 0)"),
    ("saint_match guard negative", patch("saint_match", tau=0.5, fraction=0.5, guard=-0.1), ValueError,
     "guard=-0.1 must be a finite number >= 0"),
    ("layout unknown", patch(layout="ragged"), ValueError, "layout='ragged' is not one of"),
    ("kernel unknown", patch(kernel="flash"), ValueError, "kernel='flash' is not one of"),
    ("tome with max pooling", patch("tome", tiny(global_pool="max"), r=2), ValueError, "merges tokens"),
    ("saint_fold with avgmax pooling", patch("saint_fold", tiny(global_pool="avgmax"), rate="batch"), ValueError,
     "merges tokens"),
    ("attn on SigLIP", siglip_attn, ValueError, "has no class token"),
    ("LLaVA llm_gamma nan", lambda: llava(llm_gamma=NAN, mode="llm", llm_layers=(0, 1)), ValueError,
     "must be a finite number"),
    # --- the API
    ("patch a non-module", lambda: saint.patch("model"), TypeError, "expected a torch.nn.Module, got str"),
    ("patch an unsupported module", lambda: saint.patch(torch.nn.Linear(2, 2)), TypeError,
     "saint cannot handle Linear; supported models"),
    ("patch a ViT with parallel blocks", lambda: saint.patch(timm.create_model(
        "vit_small_patch16_18x2_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)),
     TypeError, "block 0 is ParallelThingsBlock (no .attn); saint supports timm ViT blocks"),
    ("patch a compiled model", lambda: saint.patch(torch.compile(tiny())), TypeError,
     "patch the original first, then compile"),
    ("unpatch an unpatched model", lambda: saint.unpatch(tiny()), ValueError, "is not patched by saint"),
    ("stats of an unpatched model", lambda: saint.stats(tiny()), ValueError, "is not patched by saint"),
    ("stats before a forward", stats_before_forward, RuntimeError, "call the model first"),
    ("pickle a patched model", lambda: torch.save(patched(), io.BytesIO()), TypeError, "unpatch first"),
    ("a middle block alone", middle_block_alone, RuntimeError, "block 2 of a patched model ran without blocks 0..1"),
    ("a block with a mask", block_with_mask, ValueError, "cannot take attn_mask"),
    # --- calibration
    ("calibrate without target", calibrate(), ValueError, "give exactly one target"),
    ("calibrate two targets", calibrate(keep=0.5, speedup=2.0), ValueError, "give exactly one target"),
    ("calibrate speedup below 1", calibrate(speedup=0.5), ValueError, "speedup=0.5 must be > 1"),
    ("calibrate keep above 1", calibrate(keep=1.5), ValueError, "keep=1.5 must be in (0, 1)"),
    ("calibrate keep 1", calibrate(keep=1.0), ValueError, "1 prunes nothing"),
    ("calibrate keep a bool", calibrate(keep=True), TypeError, "keep=True must be a number"),
    ("calibrate keep a string", calibrate(keep="0.5"), TypeError, "keep='0.5' must be a number"),
    ("calibrate a method without tau", calibrate(keep=0.5, method="tome"), ValueError, "has none"),
    ("calibrate with tau", calibrate(keep=0.5, tau=0.9), ValueError, "do not pass tau"),
    ("calibrate a patched model", calibrate(patched("tome", r=2), keep=0.5), ValueError,
     "unpatch it before calibrating"),
    ("calibrate max_iter zero", calibrate(keep=0.5, max_iter=0), ValueError, "max_iter=0 must be an integer >= 1"),
    ("calibrate tol zero", calibrate(keep=0.5, tol=0.0), ValueError, "tol=0.0 must be a number in (0, 1)"),
    ("calibrate mode unknown", calibrate(keep=0.5, mode="best"), ValueError, "mode must be one of"),
    ("calibrate on uint8 pixels", lambda: saint.calibrate(tiny(), torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                                                          keep=0.5), TypeError, "images must be float pixels"),
    ("calibrate on NaN images", lambda: saint.calibrate(tiny(), torch.full((2, 3, 32, 32), float("nan")), keep=0.5),
     ValueError, "images contain NaN or inf"),
    ("per_image with another forward's mask", per_image_with_another_forwards_mask, ValueError,
     "the mask marks padding (NaN) as real tokens: it belongs to another forward"),
    ("per_image with a float mask", lambda: per_image_with_another_forwards_mask(float_mask=True), TypeError,
     "mask must be a bool tensor"),
    ("calibrate with an unknown setting", calibrate(keep=0.5, bogus=1), TypeError,
     "method 'saint' does not take ['bogus']"),
    ("calibrate on a processor's mapping", lambda: saint.calibrate(tiny(), {"pixel_values": torch.randn(2, 3, 32, 32)},
                                                                  keep=0.5), ValueError, "pass inputs['pixel_values']"),
]


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("call", "exc", "phrase"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(call, exc, phrase):
    with pytest.raises(exc, match=re.escape(phrase)):
        call()


def test_the_unsupported_model_error_names_every_vlm_family():
    """The TypeError for an unknown model lists what saint patches: every VLM family of the
    registry by the name its errors use, and every Qwen-VL adapter family."""
    from saint.adapters import ADAPTERS, SUPPORTED
    from saint.adapters.qwen_vl import FAMILY_CLASSES

    names = {a.family.name for a in ADAPTERS if hasattr(getattr(a, "family", None), "name")}
    assert {"LLaVA-NeXT-Video", "Aya Vision", "PaliGemma"} <= names  # the families are found
    qwen = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE",
            "qwen3_5": "Qwen3.5", "qwen3_5_moe": "Qwen3.5-MoE", "glm4v": "GLM-4.1V", "glm4v_moe": "GLM-4.5V",
            "glm46v": "GLM-4.6V", "glm_ocr": "GLM-OCR", "qwen2_5_omni": "Qwen2.5-Omni",
            "qwen3_omni_moe": "Qwen3-Omni"}
    assert set(qwen) == set(FAMILY_CLASSES)
    missing = sorted(n for n in names | set(qwen.values()) if n not in SUPPORTED)
    assert not missing, f"saint.adapters.SUPPORTED does not name {missing}"


def test_the_unsupported_model_error_names_every_hf_vit_family_class():
    """... and every Hugging Face ViT-style model and wrapper class saint patches."""
    pytest.importorskip("transformers")
    from saint.adapters import SUPPORTED
    from saint.adapters.hf_vit import _families

    classes = {cls.__name__ for f in _families() for cls in (f.model, *f.wrappers)}
    missing = sorted(n for n in classes if n not in SUPPORTED)
    assert not missing, f"saint.adapters.SUPPORTED does not name {missing}"


def test_an_integer_setting_is_taken_exactly_at_any_size():
    """A seed past float64's 53 bits of integers was refused as "not an integer"."""
    for seed in (2**53 + 1, 2**63 - 1, 2**70):
        model = patched("random", r=2, seed=seed)
        with torch.no_grad():
            assert bool(model(torch.randn(2, 3, 32, 32)).isfinite().all())


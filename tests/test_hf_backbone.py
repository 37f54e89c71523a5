"""Hugging Face DINOv2 / DINOv3 backbones and the dense heads on them (Depth Anything, DPT):
with a merging method every layer's output leaves as one row per patch, the row of the
token the patch became, so the feature maps lie on the input's grid."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import saint  # noqa: E402
from saint.adapters import find_adapter  # noqa: E402
from saint.adapters.common import get_handle  # noqa: E402

from .test_hf_vit import REGISTERS, TINY, VIT_TINY  # noqa: E402

TOL = dict(rtol=0, atol=1e-5)
KINDS = ("dinov2", "dinov2_reg", "dinov3")
PREFIX = {"dinov2": 1, "dinov2_reg": 1 + REGISTERS, "dinov3": 1 + REGISTERS}
# a rectangular merge and a ragged one (SAINT's graph sets each image's count), at both placements
METHODS = [("tome", dict(r=3)), ("saint_match", dict(tau=0.3, fraction=0.7)),
           ("saint_match", dict(tau=0.3, fraction=0.7, guard=0.1, select_at="attention"))]


def configs(kind: str, **extra):
    t = transformers
    if kind == "dinov2":
        return t.Dinov2Config(**TINY, **extra)
    if kind == "dinov2_reg":
        return t.Dinov2WithRegistersConfig(**TINY, num_register_tokens=REGISTERS, **extra)
    return t.DINOv3ViTConfig(**VIT_TINY, num_register_tokens=REGISTERS, **extra)


def encoder_and_backbone(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The encoder model and a backbone with the same weights (every layer an output)."""
    t = transformers
    encoder_cls, backbone_cls = {"dinov2": (t.Dinov2Model, t.Dinov2Backbone),
                                 "dinov2_reg": (t.Dinov2WithRegistersModel, t.Dinov2WithRegistersBackbone),
                                 "dinov3": (t.DINOv3ViTModel, t.DINOv3ViTBackbone)}[kind]
    torch.manual_seed(0)
    encoder = encoder_cls(configs(kind)).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith(("cls_token", "register_tokens", "position_embeddings", "lambda1")):
                p.normal_() if not name.endswith("lambda1") else p.uniform_(0.5, 1.5)
    backbone = backbone_cls(configs(kind, out_indices=[1, 2, 3, 4])).eval()
    missing, unexpected = backbone.load_state_dict(encoder.state_dict(), strict=False)
    assert not unexpected and all("norm" in k or "mask_token" in k for k in missing), (missing, unexpected)
    if kind == "dinov3":  # DINOv3's backbone norms with "norm", its encoder with "norm" too
        backbone.norm.load_state_dict(encoder.norm.state_dict())
    else:
        backbone.layernorm.load_state_dict(encoder.layernorm.state_dict())
    return encoder, backbone


def feature_maps_from(encoder: torch.nn.Module, kind: str, images: torch.Tensor) -> list[torch.Tensor]:
    """What the backbone's maps must be: each patch's row of the token it became, read from
    the patched encoder's own (padded) hidden states through the traced origins, after the
    final norm, on the grid."""
    with torch.no_grad():
        out = encoder(pixel_values=images, output_hidden_states=True)
    handle = get_handle(encoder)
    origins = handle.origins()
    norm = encoder.norm if kind == "dinov3" else encoder.layernorm
    n0 = PREFIX[kind] + 16
    maps = []
    for layer, hidden in enumerate(out.hidden_states[1:]):
        # the origin after the last step at or before this layer (steps happen in every layer here)
        origin = origins[layer] if layer < len(origins) else origins[-1]
        rows = hidden.gather(1, origin[..., None].expand(-1, -1, hidden.shape[-1]))
        assert rows.shape[1] == n0 and not bool(rows.isnan().any())
        patches = norm(rows)[:, PREFIX[kind]:]
        maps.append(patches.reshape(len(images), 4, 4, -1).permute(0, 3, 1, 2))
    return maps


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", METHODS, ids=["tome", "saint_match", "saint_match_before_attention"])
@pytest.mark.parametrize("kind", KINDS)
def test_feature_maps_hold_the_token_every_patch_became(kind, method, kw, layout, images):
    encoder, backbone = encoder_and_backbone(kind)
    saint.patch(encoder, method, trace=True, layout=layout, **kw)
    saint.patch(backbone, method, layout=layout, **kw)
    want = feature_maps_from(encoder, kind, images)
    with torch.no_grad():
        got = backbone(pixel_values=images, output_hidden_states=True)
    assert saint.stats(backbone).layout == ("rectangular" if method == "tome" else layout)
    assert saint.stats(backbone).tokens == saint.stats(encoder).tokens
    assert len(got.feature_maps) == 4
    for a, b in zip(got.feature_maps, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert all(h.shape[1] == PREFIX[kind] + 16 and not bool(h.isnan().any()) for h in got.hidden_states)
    assert saint.token_mask(backbone) is None and saint.token_sizes(backbone) is None  # every row one patch
    for i in range(len(images)):  # each image's maps as the image alone
        with torch.no_grad():
            alone = backbone(pixel_values=images[i : i + 1]).feature_maps
        for a, b in zip(got.feature_maps, alone, strict=True):
            torch.testing.assert_close(a[i], b[0], **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_to_prune_and_unpatch_give_the_backbones_own_maps(kind, images):
    _, backbone = encoder_and_backbone(kind)
    with torch.no_grad():
        ref = backbone(pixel_values=images).feature_maps
        saint.patch(backbone, "tome", r=0)
        assert all(torch.equal(a, b) for a, b in zip(backbone(pixel_values=images).feature_maps, ref, strict=True))
        saint.unpatch(backbone)
        saint.patch(backbone, "saint_match", tau=0.3, fraction=0.7)
        pruned = backbone(pixel_values=images).feature_maps
        assert not torch.allclose(pruned[-1], ref[-1], atol=1e-4)
        saint.unpatch(backbone)
        assert not any("forward" in m.__dict__ for m in backbone.modules())
        assert all(torch.equal(a, b) for a, b in zip(backbone(pixel_values=images).feature_maps, ref, strict=True))


@pytest.mark.parametrize("method", ["saint", "random", "budget"])
def test_dropping_methods_are_refused_with_what_to_use(method):
    _, backbone = encoder_and_backbone("dinov2")
    kw = {"saint": dict(tau=0.3), "random": dict(r=2), "budget": dict(keep=8, layers=[1])}[method]
    with pytest.raises(ValueError, match=r"row for every patch.*use a merging method \(tome, saint_match"):
        saint.patch(backbone, method, **kw)
    assert not saint.is_patched(backbone)


def depth_anything() -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = dict(TINY, out_indices=[1, 2, 3, 4], model_type="dinov2", reshape_hidden_states=False)
    cfg = transformers.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=8,
                                           neck_hidden_sizes=[8, 16, 16, 32], fusion_hidden_size=16,
                                           head_hidden_size=8)
    return transformers.DepthAnythingForDepthEstimation(cfg).eval()


def test_depth_anything_predicts_each_image_as_alone(images):
    """Depth Anything on a patched DINOv2 backbone: its neck and head run on the unmerged
    maps; a ragged batch predicts each image's depth as the image alone."""
    model = depth_anything()
    with torch.no_grad():
        ref = model(pixel_values=images).predicted_depth
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    assert saint.is_patched(model.backbone)
    adapter = find_adapter(model)
    emb, logits = adapter.embed(model, images)
    assert logits is None and emb.shape == (len(images), ref[0].numel())
    assert saint.stats(model).layout == "packed"
    with torch.no_grad():
        depth = model(pixel_values=images).predicted_depth
        assert depth.shape == ref.shape and bool(torch.isfinite(depth).all())
        torch.testing.assert_close(emb, depth.flatten(1), **TOL)
        for i in range(len(images)):
            torch.testing.assert_close(depth[i], model(pixel_values=images[i : i + 1]).predicted_depth[0], **TOL)
    with pytest.raises(ValueError, match="patched through its DepthAnythingForDepthEstimation"):
        saint.unpatch(model.backbone)
    saint.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=images).predicted_depth, ref)


def test_the_depth_estimation_pipeline_batches_as_it_runs_alone():
    """transformers' ``pipeline("depth-estimation")`` on a patched Depth Anything: a batch of
    photos of different sizes predicts each one's depth as the photo alone."""
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    model = depth_anything()
    processor = transformers.DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False,
                                               ensure_multiple_of=8, do_pad=False)
    pipe = transformers.pipeline("depth-estimation", model=model, image_processor=processor, device="cpu")
    rng = np.random.default_rng(0)
    photos = [image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(4)]
    saint.patch(model, "saint_match", tau=0.3, fraction=0.7)
    batched = pipe(photos, batch_size=4)
    assert saint.stats(model).layout == "packed"
    for photo, got in zip(photos, batched, strict=True):
        want = pipe(photo)["predicted_depth"]
        assert got["predicted_depth"].shape == want.shape == (photo.height, photo.width)
        torch.testing.assert_close(got["predicted_depth"], want, rtol=0, atol=1e-5)


def test_a_segmentation_head_on_the_backbone_labels_each_image_as_alone(images):
    """Any transformers model holding a supported backbone as ``.backbone`` (here UperNet's
    semantic segmentation) runs its head on the unmerged maps, per image as alone."""
    torch.manual_seed(0)
    backbone = transformers.Dinov2Config(**TINY, out_indices=[1, 2, 3, 4])
    cfg = transformers.UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=3, use_auxiliary_head=False)
    model = transformers.UperNetForSemanticSegmentation(cfg).eval()
    with torch.no_grad():
        ref = model(pixel_values=images).logits
    saint.patch(model, "tome", r=3)
    emb, _ = find_adapter(model).embed(model, images)
    with torch.no_grad():
        logits = model(pixel_values=images).logits
        assert logits.shape == ref.shape and not torch.allclose(logits, ref, atol=1e-4)
        torch.testing.assert_close(emb, logits.flatten(1), **TOL)
        for i in range(len(images)):
            torch.testing.assert_close(logits[i], model(pixel_values=images[i : i + 1]).logits[0], **TOL)
    saint.unpatch(model)
    assert not saint.is_patched(model.backbone)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=images).logits, ref)


def vitpose(experts: int = 1) -> torch.nn.Module:
    """A tiny ViTPose (64 x 48 px images of 16 px patches: a 4 x 3 grid, no class token)."""
    torch.manual_seed(0)
    backbone = dict(model_type="vitpose_backbone", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                    image_size=[64, 48], patch_size=[16, 16], out_indices=[4], mlp_ratio=2, num_experts=experts,
                    part_features=8)
    return transformers.VitPoseForPoseEstimation(transformers.VitPoseConfig(backbone_config=backbone)).eval()


def _pose_images() -> torch.Tensor:
    x = torch.randn(4, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    x[:2] = x[:2] * 0.05 + torch.linspace(-1, 1, 48)  # smooth images: more redundant patches
    return x


NO_CLASS_TOKEN = [("tome", dict(r=3)), ("saint_match", dict(tau=0.3, fraction=0.7)),
                  ("saint_match", dict(tau=0.3, fraction=0.7, select_at="attention"))]  # no guard: no class token


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("method,kw", NO_CLASS_TOKEN, ids=["tome", "saint_match", "saint_match_before_attention"])
def test_vitpose_heatmaps_of_each_image_as_alone(method, kw, layout):
    """ViTPose's heatmaps read every patch of its backbone's last map: with a merging method
    each patch holds the token it became (patches merged into one token hold the same row),
    and a ragged batch predicts each image as alone; nothing to prune and unpatch give the
    model's own heatmaps."""
    model, x = vitpose(), _pose_images()
    with torch.no_grad():
        ref = model(pixel_values=x).heatmaps
        saint.patch(model, "tome", r=0)
        assert torch.equal(model(pixel_values=x).heatmaps, ref)
    saint.patch(model, method, layout=layout, trace=True, **kw)
    assert find_adapter(model).name == "hf_vit"
    with torch.no_grad():
        got = model(pixel_values=x).heatmaps
        maps = model.backbone(pixel_values=x).feature_maps[-1]
    assert saint.stats(model).layout == ("rectangular" if method == "tome" else layout)
    assert not torch.allclose(got, ref, atol=1e-4) and maps.shape[1] == 12
    origin = get_handle(model).origins()[-1]  # each patch's token after the last step
    for i in range(len(x)):
        for token in origin[i].unique():
            rows = maps[i, origin[i] == token]
            torch.testing.assert_close(rows, rows[:1].expand_as(rows), rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(got[i], model(pixel_values=x[i : i + 1]).heatmaps[0], **TOL)
    with torch.no_grad():  # one expert: the dataset index changes nothing, as in the unpatched model
        assert torch.equal(model(pixel_values=x, dataset_index=torch.zeros(len(x), dtype=torch.long)).heatmaps, got)
    saint.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).heatmaps, ref)


def test_vitpose_refuses_dropping_methods_and_per_image_experts():
    with pytest.raises(ValueError, match=r"row for every patch.*use a merging method"):
        saint.patch(vitpose(), "saint", tau=0.3)
    moe = vitpose(experts=2)
    with pytest.raises(TypeError, match="experts per image"):
        saint.patch(moe, "tome", r=2)
    assert not saint.is_patched(moe)

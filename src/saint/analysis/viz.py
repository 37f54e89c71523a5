"""Which patches survive each pruning block: trace them through a patched model and
draw a grid (rows: methods, columns: pruning blocks).

Tracing uses ``saint.patch(model, method, trace=True)``: after a forward, the patch
handle's ``origins()`` gives, per pruning block, the current sequence position of
every original token (-1 when dropped); the model's adapter gives the patch grid. Patches sharing a position were merged
(ToMe) and are painted with their group's mean colour, as in ToMe's own figures.
Random and class-attention drop are run at SAINT's per-block counts on the same
image, and ToMe merges the same number, so every row removes as many tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapters import find_adapter, handle_of
from ..adapters.common import get_handle
from ..api import patch, unpatch

DEFAULT_METHODS: tuple[str, ...] = ("saint", "random", "attn", "tome")
ROW_LABELS = {"saint": "SAINT", "random": "random", "attn": "class-attn", "tome": "ToMe (merge)"}


@dataclass
class KeptMap:
    """Where every patch is after each pruning block of one method on one image.

    ``groups[j] [gh, gw]``: the patch's current sequence position after pruning block
    ``layers[j]`` (-1 = dropped); patches with equal positions were merged.
    """

    method: str
    layers: list[int]
    groups: list[np.ndarray]
    num_prefix: int

    @property
    def kept(self) -> list[int]:
        """Patch tokens alive after each pruning block (a merged group counts once)."""
        return [int(np.unique(g[g >= 0]).size) for g in self.groups]


def _grid(model: nn.Module, x: Any = None) -> tuple[tuple[int, int], tuple[int, int]]:
    g = find_adapter(model).grid(model, x)
    return (g.rows, g.cols), g.patch


def _single(x: Any) -> Any:
    if isinstance(x, Mapping):  # one processor output (VLMs: a prompt; Siglip2: an image)
        key = "input_ids" if "input_ids" in x else "pixel_values"
        if x[key].shape[0] != 1:
            raise ValueError(f"expected one prompt or image, got a batch of {x[key].shape[0]}")
        return x
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image [3, H, W] or [1, 3, H, W], got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def trace_kept(model: nn.Module, x: Any, method: str, **settings: Any) -> KeptMap:
    """Run ``model`` on one image (for a VLM: one processor output) patched with
    ``method`` (``settings`` as for :func:`saint.patch`) and return where each patch
    went; the model is unpatched after."""
    if get_handle(model) is not None:
        raise ValueError("the model is already patched by saint; unpatch it before tracing")
    adapter = find_adapter(model)
    x = _single(x)
    (gh, gw), _ = _grid(model, x)
    patch(model, method, trace=True, **settings)
    try:
        handle = handle_of(model)
        adapter.forward(model, x)
        layers = handle.pruning_sites
        origins = handle.origins()
        prefix = int(handle.num_protected)
    finally:
        unpatch(model)
    if len(origins) != len(layers):
        raise RuntimeError(f"traced {len(origins)} pruning steps for {len(layers)} pruning blocks")
    groups = []
    for o in origins:
        patches = o[0, prefix:]
        if patches.numel() != gh * gw:
            raise ValueError(f"{patches.numel()} patch tokens do not fill the {gh}x{gw} grid")
        groups.append(patches.reshape(gh, gw).cpu().numpy().astype(np.int64))
    return KeptMap(method, layers, groups, prefix)


def matched_drops(kept: Sequence[int], num_patches: int) -> list[int]:
    """Tokens removed at each pruning block, from the patch counts left after each."""
    drops, prev = [], num_patches
    for n in kept:
        if n > prev:
            raise ValueError(f"kept counts must not grow: {list(kept)} from {num_patches}")
        drops.append(prev - n)
        prev = n
    return drops


def tome_drops(kept: Sequence[int], num_patches: int) -> list[int]:
    """Per-block ToMe merge counts that follow SAINT's kept counts as closely as bipartite
    matching allows: at most ``floor(n/2)`` per block, while SAINT can drop all
    ``ceil(n/2)`` candidates of an odd count; a shortfall is made up later if possible."""
    drops, n = [], num_patches
    for target in kept:
        r = max(0, min(n - target, n // 2))
        drops.append(r)
        n -= r
    return drops


def compare_methods(
    model: nn.Module,
    x: torch.Tensor,
    methods: Sequence[str] = DEFAULT_METHODS,
    saint_settings: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> list[KeptMap]:
    """Trace SAINT, then every other method in ``methods`` at SAINT's per-block counts
    on the same image (random with ``seed``; ToMe as close as :func:`tome_drops`
    allows). Returns maps in the order of ``methods``."""
    unknown = [m for m in methods if m not in ROW_LABELS]
    if unknown:
        raise ValueError(f"viz compares {sorted(ROW_LABELS)}; got {unknown}")
    x = _single(x)
    (gh, gw), _ = _grid(model, x)
    ref = trace_kept(model, x, "saint", **dict(saint_settings or {}))
    drops = matched_drops(ref.kept, gh * gw)
    out = []
    for m in methods:
        if m == "saint":
            out.append(ref)
            continue
        r = tome_drops(ref.kept, gh * gw) if m == "tome" else drops
        kw: dict[str, Any] = {"layers": ref.layers, "r": r}
        if m == "random":
            kw["seed"] = seed
        out.append(trace_kept(model, x, m, **kw))
    return out


def display_image(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the input normalisation of one image: ``[H, W, 3]`` floats in [0, 1]."""
    x = _single(x)[0].detach().double().cpu()
    m = torch.tensor(list(mean), dtype=torch.float64)[:, None, None]
    s = torch.tensor(list(std), dtype=torch.float64)[:, None, None]
    return (x * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def render_cell(
    image: np.ndarray, groups: np.ndarray, patch_size: tuple[int, int], dim: float = 0.22, scale: int = 1
) -> np.ndarray:
    """The photo with dropped patches dimmed and each merged group filled with its
    mean colour and outlined; kept single patches are left untouched. ``scale``
    enlarges the result by pixel repetition so outlines stay thin."""
    ph, pw = patch_size
    gh, gw = groups.shape
    if image.shape[:2] != (gh * ph, gw * pw):
        raise ValueError(f"image {image.shape[:2]} is not a {gh}x{gw} grid of {ph}x{pw} patches")
    if scale < 1:
        raise ValueError(f"scale={scale} must be >= 1")
    img = np.repeat(np.repeat(image.astype(np.float64), scale, axis=0), scale, axis=1)
    ph, pw = ph * scale, pw * scale
    out = img.copy()
    gid = np.repeat(np.repeat(groups, ph, axis=0), pw, axis=1)
    ids, counts = np.unique(groups[groups >= 0], return_counts=True)
    merged = ids[counts > 1]
    for g in merged:
        mask = gid == g
        out[mask] = img[mask].mean(axis=0)
    out[gid < 0] *= dim
    # Outline merged groups: 1-px edges between different regions, neither side dropped.
    region = np.where(gid < 0, -1, np.where(np.isin(gid, merged), gid, -2))
    v = (region[:, 1:] != region[:, :-1]) & (region[:, 1:] != -1) & (region[:, :-1] != -1)
    h = (region[1:, :] != region[:-1, :]) & (region[1:, :] != -1) & (region[:-1, :] != -1)
    edge = np.zeros(region.shape, dtype=bool)
    edge[:, 1:] |= v
    edge[1:, :] |= h
    out[edge] = 0.3 * out[edge] + 0.7
    return out


def render_grid(
    image: np.ndarray,
    maps: Sequence[KeptMap],
    patch_size: tuple[int, int],
    path: str | Path,
    title: str = "",
    compact: bool = True,
) -> Path:
    """Save a PNG: one row per method, the input then one column per pruning block
    (``compact``: stored with a 256-colour palette)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not maps:
        raise ValueError("no maps to draw")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = 1 + max(len(m.layers) for m in maps)
    scale = max(1, 448 // max(image.shape[:2]))
    num_patches = maps[0].groups[0].size if maps[0].groups else 0
    fig, axes = plt.subplots(len(maps), cols, figsize=(1.9 * cols, 2.0 * len(maps) + 0.4), squeeze=False)
    for r, m in enumerate(maps):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(f"input: {num_patches} patches", fontsize=8)
        axes[r, 0].set_ylabel(ROW_LABELS.get(m.method, m.method), fontsize=10)
        for j, (layer, g, n) in enumerate(zip(m.layers, m.groups, m.kept, strict=True)):
            axes[r, j + 1].imshow(render_cell(image, g, patch_size, scale=scale))
            word = "tokens" if m.method == "tome" else "kept"
            axes[r, j + 1].set_title(f"after block {layer}: {n} {word}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if compact:  # photos make large PNGs; a 256-colour palette cuts them ~3x
        import io

        from PIL import Image

        buf = io.BytesIO()
        fig.savefig(buf, dpi=110, format="png")
        plt.close(fig)
        buf.seek(0)
        with Image.open(buf) as im:
            rgb = im.convert("RGB")
        rgb.quantize(colors=256, dither=Image.Dither.NONE).save(path, optimize=True)
    else:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return path

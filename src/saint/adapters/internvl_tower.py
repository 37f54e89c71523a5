"""SAINT's ``vit`` step inside an InternVL vision tower: after encoder layer
``vit_layer`` every tile keeps ``round(vit_ratio * groups)`` of its 2x2 patch groups
(the blocks the pixel shuffle folds into one token), chosen by SAINT's fixed-budget drop
on each group's mean key. Every tile keeps the same count, so later layers run on a
rectangular batch (class token plus the kept patches) with the model's own attention.
The tower's output is scattered back to the full grid (zeros at dropped groups), so the
model's own pixel shuffle and projector run unchanged; the adapter then keeps the
kept groups' tokens (raster order, the pixel shuffle's token order)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core import fixed_budget_keep_mask, head_mean
from .common import Hooked, TokenStats


def _layers(tower: torch.nn.Module) -> torch.nn.ModuleList:
    return tower.encoder.layer


class TilePruner:
    """Drops whole 2x2 patch groups of every tile after one InternVL tower layer; the
    keep mask of the last tower call is ``keep [tiles, groups]`` (raster order)."""

    def __init__(self, tower: torch.nn.Module, layer: int, ratio: float, step_div: int) -> None:
        self.tower = tower
        self.layer = layer
        self.ratio = ratio
        self.step_div = step_div
        self.hooks: list[Any] = []
        self.hooked: list[Hooked] = []
        self.keep: torch.Tensor | None = None  # [tiles, groups] of the last tower call
        self.counts: tuple[list[int], list[int]] | None = None  # tokens per tile before / after the drop
        self._keys: torch.Tensor | None = None
        self._patches: torch.Tensor | None = None  # [tiles, kept patches] indices into the patch grid

    def install(self) -> None:
        tower, i = self.tower, self.layer
        layer = _layers(tower)[i]
        attn = layer.attention
        self.hooks += [
            tower.register_forward_pre_hook(self._begin),
            attn.k_proj.register_forward_hook(self._capture),
            layer.register_forward_hook(self._prune),
            tower.layernorm.register_forward_hook(self._scatter),
        ]
        self.hooked += [
            Hooked(tower, lambda t: _layers(t)[i], layer, f"vision layer {i}"),
            Hooked(layer, lambda m: m.attention.k_proj, attn.k_proj, f"vision layer {i}'s attention.k_proj"),
            Hooked(tower, lambda t: t.layernorm, tower.layernorm, "the vision tower's final norm"),
        ]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.hooked.clear()
        self.keep = self._keys = self._patches = None

    def _begin(self, module: torch.nn.Module, args: tuple) -> None:
        for hooked in self.hooked:
            hooked.check()
        self.keep = self._keys = self._patches = None

    def _capture(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._keys = output

    def _prune(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        t, n1, c = output.shape
        side = math.isqrt(n1 - 1)
        if side * side != n1 - 1 or side % 2:
            raise ValueError(f"an InternVL tile of {n1 - 1} patches is not an even square grid: saint keeps 2x2 groups")
        half = side // 2
        budget = max(1, round(self.ratio * half * half))
        self.counts = ([n1] * t, [1 + budget * 4] * t)
        keys, self._keys = self._keys, None
        if budget == half * half:  # nothing to drop: the layers after run as unpatched
            self.keep = torch.ones(t, budget, dtype=torch.bool, device=output.device)
            return output
        attn = module.attention
        assert keys is not None
        keys = attn.k_norm(keys)[:, 1:].float()  # the layer's keys, as its attention reads them
        keys = head_mean(keys.view(t, side * side, attn.num_heads, attn.head_dim))  # [T, N, D]
        groups = keys.view(t, half, 2, half, 2, -1).mean(dim=(2, 4)).reshape(t, half * half, -1)
        keep = fixed_budget_keep_mask(groups, budget, self.step_div)
        self.keep = keep
        patch_keep = keep.view(t, half, 1, half, 1).expand(t, half, 2, half, 2).reshape(t, side * side)
        self._patches = patch_keep.nonzero()[:, 1].view(t, budget * 4)  # each group's 4 patches, raster order
        kept = torch.gather(output[:, 1:], 1, self._patches[..., None].expand(-1, -1, c))
        return torch.cat([output[:, :1], kept], dim=1)

    def _scatter(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._patches is None:
            return None
        t, _, c = output.shape
        side2 = self.keep.shape[1] * 4
        full = output.new_zeros(t, 1 + side2, c)
        full[:, :1] = output[:, :1]
        full[:, 1:].scatter_(1, self._patches[..., None].expand(-1, -1, c), output[:, 1:])
        return full

    def stats(self) -> TokenStats:
        """Tokens entering each tower layer in the last forward with images, per tile."""
        if self.counts is None:
            raise RuntimeError("no forward with images has run since patching; call the model first")
        before, after = self.counts
        depth = len(_layers(self.tower))
        return TokenStats([f"vision_tower.encoder.layer.{i}" for i in range(depth)],
                          [before if i <= self.layer else after for i in range(depth)])


def check_tower(mm: torch.nn.Module, cfg: Any) -> None:
    """SAINT's ``vit`` step fits this InternVL: a later layer exists, the features are the
    tower's last layer, and the pixel shuffle folds 2x2 groups."""
    depth = len(_layers(mm.vision_tower))
    if cfg.vit_layer >= depth - 1:
        raise ValueError(
            f"vit_layer={cfg.vit_layer}: the vision tower has {depth} layers (0..{depth - 1}) and pruning after "
            f"the last one saves nothing; vit_layer must be <= {depth - 2}"
        )
    if mm.config.vision_feature_layer not in (-1, None):
        raise ValueError(f"vision_feature_layer={mm.config.vision_feature_layer}: saint's vit mode reads the "
                         "tower's last layer (-1), whose output it scatters back to the full grid")
    if float(mm.config.downsample_ratio) != 0.5:
        raise ValueError(f"downsample_ratio={mm.config.downsample_ratio}: saint's vit mode keeps the 2x2 groups "
                         "a 0.5 pixel shuffle folds into one token")

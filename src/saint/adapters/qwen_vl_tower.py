"""SAINT's ``vit`` step inside a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / GLM / Omni vision tower: after
block ``vit_layer``, whole merge groups (the 4 consecutive tokens the merger concatenates)
are dropped per sample (full-attention segment) by a fixed budget over each group's
mean key (normed where the tower norms its keys, as GLM-OCR's does); later blocks get
shortened ``cu_seqlens`` (full and windowed) and the kept rows of the rotary embeddings,
and every merger writes back to all groups (NaN at dropped ones; 0 under autograd), so the model's own
bookkeeping is unchanged."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..core import fixed_budget_keep_mask, head_mean
from . import hf_llm
from .common import Hooked, TokenStats
from .vlm_hooks import bind


class TowerPruner:
    """Drops whole merge groups after one block of a Qwen-VL vision tower.

    Per call: the tower's token order (window order for Qwen2.5-VL), the samples
    (full-attention segments), the kept groups; later blocks get shortened segment
    boundaries and rotary embeddings, and every merger writes back to all groups."""

    def __init__(self, tower: torch.nn.Module, layer: int, ratio: float, step_div: int) -> None:
        self.tower = tower
        self.layer = layer
        self.ratio = ratio
        self.step_div = step_div
        self.unit = int(tower.spatial_merge_size) ** 2
        self.full_blocks = set(getattr(tower, "fullatt_block_indexes", None) or range(len(tower.blocks)))
        self.hooks: list[Any] = []
        self.hooked: list[Hooked] = []  # the modules whose outputs the hooks read or rewrite
        self.keep_raster: torch.Tensor | None = None  # [groups] of the last call, raster order
        self.counts: tuple[list[int], list[int]] | None = None  # tokens per sample before / after the drop
        # (every tower call of one forward: images, then videos; the handle resets it per forward)
        self._reset()

    def _reset(self) -> None:
        self.order: torch.Tensor | None = None  # window position -> raster group (Qwen2.5-VL)
        self.windows: torch.Tensor | None = None  # windowed-attention cu_seqlens (tokens)
        self.segments: torch.Tensor | None = None  # full-attention cu_seqlens (tokens)
        self.keep_tok: torch.Tensor | None = None  # [tokens] kept, tower order (after pruning)
        self.new: dict[str, Any] = {}
        self.k: torch.Tensor | None = None

    def install(self) -> None:
        tower = self.tower
        self.hooks.append(tower.register_forward_pre_hook(self._begin, with_kwargs=True))
        for i, blk in enumerate(tower.blocks):
            if i > self.layer:
                self.hooks.append(blk.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
        blk = tower.blocks[self.layer]
        name = key_projection(blk.attn)
        proj = getattr(blk.attn, name)
        self.hooks.append(proj.register_forward_hook(self._capture))
        self.hooked.append(Hooked(blk, lambda b: getattr(b.attn, name), proj, f"vision block {self.layer}'s attn.{name}"))
        self.hooks.append(blk.register_forward_hook(self._prune, with_kwargs=True))
        mergers = [(tower, lambda t: t.merger, "the vision merger")]
        deepstack = getattr(tower, "deepstack_merger_list", None)
        for j in range(len(deepstack or ())):
            mergers.append((deepstack, lambda ms, j=j: ms[j], f"deepstack merger {j}"))
        for owner, find, label in mergers:
            self.hooks.append(find(owner).register_forward_hook(self._scatter))
            self.hooked.append(Hooked(owner, find, find(owner), label))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.hooked.clear()
        self._reset()

    def _begin(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        for hooked in self.hooked:
            hooked.check()
        self._reset()
        self.keep_raster = None
        kwargs = bind(type(module).forward, args, kwargs)
        grid = kwargs["grid_thw"]
        if getattr(module, "window_size", None) is not None and hasattr(module, "fullatt_block_indexes"):
            from transformers.vision_utils import get_vision_window_index

            self.order, self.windows = get_vision_window_index(
                grid, module.spatial_merge_size, module.window_size, module.patch_size)
        sizes = (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0])
        self.segments = F.pad(sizes.cumsum(0), (1, 0))

    def _capture(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.k = output

    def _prune(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor):
        seg = self.segments
        assert seg is not None and self.k is not None
        n, c = output.shape
        heads = module.attn.num_heads
        keys = self.k.view(n, heads, -1) if key_projection(module.attn) == "k" else self.k.view(n, 3, heads, -1)[:, 1]
        norm = getattr(module.attn, "k_norm", None)  # GLM-OCR normalizes its keys per head
        keys = head_mean((keys if norm is None else norm(keys)).float())  # [N, head_dim], before the vision RoPE
        self.k = None
        groups = keys.view(n // self.unit, self.unit, -1).mean(dim=1)
        keep = torch.zeros(n // self.unit, dtype=torch.bool, device=output.device)
        gseg = (seg // self.unit).tolist()
        for a, b in zip(gseg[:-1], gseg[1:], strict=True):
            budget = max(1, round(self.ratio * (b - a)))
            keep[a:b] = fixed_budget_keep_mask(groups[None, a:b], budget, self.step_div)[0]
        order = self.order if self.order is not None else torch.arange(len(keep), device=keep.device)
        raster = torch.empty_like(keep)
        raster[order.to(keep.device)] = keep
        self.keep_raster = raster
        keep_tok = keep.repeat_interleave(self.unit)
        self.keep_tok = keep_tok
        before, after = self.counts or ([], [])
        self.counts = (before + (seg[1:] - seg[:-1]).tolist(),
                       after + [int(keep[a:b].sum()) * self.unit for a, b in zip(gseg[:-1], gseg[1:], strict=True)])
        kept_cum = F.pad(keep_tok.long().cumsum(0), (1, 0))
        cos, sin = kwargs["position_embeddings"]
        idx = keep_tok.nonzero().squeeze(1)
        self.new = {"full": self._bounds(kept_cum, seg), "pos": (cos[idx], sin[idx])}
        if self.windows is not None:
            self.new["window"] = self._bounds(kept_cum, self.windows)
        return output[idx]

    def stats(self) -> TokenStats:
        """Tokens entering each tower block in the last forward with images, per sample
        (image or video frame group; images first)."""
        if self.counts is None:
            raise RuntimeError("no forward with images has run since patching; call the model first")
        before, after = self.counts
        return TokenStats([f"visual.blocks.{i}" for i in range(len(self.tower.blocks))],
                          [before if i <= self.layer else after for i in range(len(self.tower.blocks))])

    @staticmethod
    def _bounds(kept_cum: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        return torch.unique_consecutive(kept_cum[cu.long().to(kept_cum.device)]).to(cu.dtype)

    def _make_pre(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            if not self.new:
                return None
            cu = self.new["full"] if i in self.full_blocks else self.new["window"]
            return args, dict(kwargs, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()),
                              position_embeddings=self.new["pos"])

        return hook

    def _scatter(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.keep_tok is None:
            return None
        keep = self.keep_tok[:: self.unit]
        # NaN at dropped groups (0 while autograd records): get_image_features called directly shows them
        fill = 0.0 if torch.is_grad_enabled() else float("nan")
        out = output.new_full((len(keep), *output.shape[1:]), fill)
        out[keep] = output
        return out



def key_projection(attn: torch.nn.Module) -> str:
    """The tower attention's module whose output holds the keys: a fused ``qkv`` (Qwen-VL,
    GLM), or ``k`` where the queries, keys and values are separate (Qwen2.5-Omni)."""
    return "qkv" if hasattr(attn, "qkv") else "k"


def check_tower(tower: torch.nn.Module, cfg: Any) -> None:
    """SAINT's ``vit`` step fits this tower (a later block exists, maskable attention)."""
    depth = len(tower.blocks)
    if cfg.vit_layer >= depth - 1:
        raise ValueError(
            f"vit_layer={cfg.vit_layer}: the vision tower has {depth} blocks (0..{depth - 1}) and pruning after "
            f"the last one saves nothing; vit_layer must be <= {depth - 2}"
        )
    impl = tower.config._attn_implementation
    if impl not in hf_llm.MASKABLE_ATTENTION:
        raise ValueError(
            f"vision attn_implementation={impl!r}: vit pruning recomputes the tower's segment boundaries per "
            f"block, tested with {hf_llm.MASKABLE_ATTENTION} only; load the model with attn_implementation='sdpa'"
        )
    unit = int(tower.spatial_merge_size) ** 2
    if unit < 1:
        raise ValueError(f"spatial_merge_size={tower.spatial_merge_size} must be >= 1")

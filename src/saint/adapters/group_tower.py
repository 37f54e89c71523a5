"""SAINT's ``vit`` step inside the vision tower of a VLM whose projector folds square
groups of patches into one token (InternVL's pixel shuffle: 2x2; Gemma 3's average
pool: 4x4 at 896 px; Idefics3 / SmolVLM's pixel shuffle: 3x3 or 4x4; Aya Vision's and
Command A Vision's pixel shuffle: 2x2; Ovis2's visual tokenizer: ``hidden_stride`` x
``hidden_stride``; PaliGemma's projector and DeepSeek-VL's and Janus's aligner: single
patches; LFM2-VL's pixel unshuffle: 2x2, its tiles each at their own size, see
:class:`NaflexGroupPruner`): after encoder
layer ``vit_layer`` every image unit (a tile, or Gemma 3's image) keeps ``round(vit_ratio * groups)`` of its groups, chosen by
SAINT's fixed-budget drop on each group's mean key. Every unit keeps the same count, so
later layers run on a rectangular batch (prefix tokens plus the kept patches) with the
model's own attention. The tower's output is scattered back to the full grid (zeros at
dropped groups), so the model's own shuffle or pool and projector run unchanged; the
adapter then keeps the kept groups' tokens (raster order, the projector's token order).
Where the model reads the tower's last layer instead of its final norm (Aya Vision's
``hidden_states[-1]``), that layer's output is scattered back, by a hook that runs before
any other on it (transformers records ``hidden_states`` with forward hooks of its own)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core import fixed_budget_keep_mask, head_mean
from .common import Hooked, TokenStats


@dataclass(frozen=True)
class TowerLayout:
    """Where a tower keeps what the pruner hooks: its encoder layers (and the dotted
    name they have in statistics), each layer's attention attribute (``k_proj``, and a
    ``k_norm`` where the tower has one), the module whose output the model reads and which
    is scattered back (the final norm, or the last layer), and the prefix tokens before the
    patch grid (a class token)."""

    layers: Callable[[torch.nn.Module], torch.nn.ModuleList]
    layer_name: str
    attention: str
    output: Callable[[torch.nn.Module], torch.nn.Module]
    prefix: int
    output_name: str = "the vision tower's final norm"


def _siglip(tower: torch.nn.Module) -> torch.nn.Module:
    """A SigLIP tower's transformer (transformers releases before 5.x nested it in ``vision_model``)."""
    return getattr(tower, "vision_model", tower)


INTERNVL_TOWER = TowerLayout(lambda t: t.encoder.layer, "vision_tower.encoder.layer", "attention",
                             lambda t: t.layernorm, prefix=1)
IDEFICS3_TOWER = TowerLayout(lambda t: _siglip(t).encoder.layers, "vision_model.encoder.layers", "self_attn",
                             lambda t: _siglip(t).post_layernorm, prefix=0)  # DeepSeek-VL's and Janus's too
SIGLIP_TOWER = TowerLayout(lambda t: _siglip(t).encoder.layers, "vision_tower.encoder.layers", "self_attn",
                           lambda t: _siglip(t).post_layernorm, prefix=0)
OVIS2_TOWER = TowerLayout(lambda t: t.transformer.encoder.layers, "vision_tower.transformer.encoder.layers",
                          "attention", lambda t: t.transformer.rms_norm, prefix=0)
SIGLIP_LAST_LAYER = TowerLayout(lambda t: _siglip(t).encoder.layers, "vision_tower.encoder.layers", "self_attn",
                                lambda t: _siglip(t).encoder.layers[-1], prefix=0,
                                output_name="the vision tower's last layer")  # read as hidden_states[-1]


class GroupPruner:
    """Drops whole ``group x group`` patch groups of every image unit after one tower
    layer; the keep mask of the last tower call is ``keep [units, groups]`` (raster order)."""

    def __init__(self, tower: torch.nn.Module, layout: TowerLayout, group: int, layer: int, ratio: float,
                 step_div: int) -> None:
        self.tower = tower
        self.layout = layout
        self.group = group
        self.layer = layer
        self.ratio = ratio
        self.step_div = step_div
        self.hooks: list[Any] = []
        self.hooked: list[Hooked] = []
        self.keep: torch.Tensor | None = None  # [units, groups] of the last tower call
        self.counts: tuple[list[int], list[int]] | None = None  # tokens per unit before / after the drop
        self._keys: torch.Tensor | None = None
        self._patches: torch.Tensor | None = None  # [units, kept patches] indices into the patch grid

    def install(self) -> None:
        tower, i, lay = self.tower, self.layer, self.layout
        layer = lay.layers(tower)[i]
        attn = getattr(layer, lay.attention)
        out = lay.output(tower)
        self.hooks += [
            tower.register_forward_pre_hook(self._begin, with_kwargs=True),
            layer.register_forward_pre_hook(self._refuse_masks, with_kwargs=True),
            attn.k_proj.register_forward_hook(self._capture),
            layer.register_forward_hook(self._prune),
            out.register_forward_hook(self._scatter, prepend=True),  # before transformers' hidden_states record
        ]
        self.hooked += [
            Hooked(tower, lambda t: lay.layers(t)[i], layer, f"vision layer {i}"),
            Hooked(layer, lambda m: getattr(m, lay.attention).k_proj, attn.k_proj,
                   f"vision layer {i}'s {lay.attention}.k_proj"),
            Hooked(tower, lay.output, out, lay.output_name),
        ]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.hooked.clear()
        self.keep = self._keys = self._patches = None

    def _begin(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        for hooked in self.hooked:
            hooked.check()
        self.keep = self._keys = self._patches = None

    @staticmethod
    def _refuse_masks(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """The layers after the drop would get a mask over every patch: only whole units
        (no attention mask inside the tower) can lose groups."""
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None:
            raise ValueError("saint's vit mode drops patch groups of whole image units, and this call masks patches "
                             "inside the vision tower (padded images); send unpadded images, or use mode='llm'")

    def _capture(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._keys = output

    def _prune(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        t, n, c = output.shape
        p, g = self.layout.prefix, self.group
        side = round((n - p) ** 0.5)
        if side * side != n - p or side % g:
            raise ValueError(f"a unit of {n - p} patches is not a square grid of whole {g}x{g} groups: saint keeps "
                             "the groups the projector folds into one token")
        per = side // g
        budget = max(1, round(self.ratio * per * per))
        self.counts = ([n] * t, [p + budget * g * g] * t)
        keys, self._keys = self._keys, None
        if budget == per * per:  # nothing to drop: the layers after run as unpatched
            self.keep = torch.ones(t, budget, dtype=torch.bool, device=output.device)
            return output
        keys = self._patch_keys(module, keys)  # [T, N, D]
        groups = keys.view(t, per, g, per, g, -1).mean(dim=(2, 4)).reshape(t, per * per, -1)
        keep = fixed_budget_keep_mask(groups, budget, self.step_div)
        self.keep = keep
        patch_keep = keep.view(t, per, 1, per, 1).expand(t, per, g, per, g).reshape(t, side * side)
        self._patches = patch_keep.nonzero()[:, 1].view(t, budget * g * g)  # each group's patches, raster order
        kept = torch.gather(output[:, p:], 1, self._patches[..., None].expand(-1, -1, c))
        return torch.cat([output[:, :p], kept], dim=1)

    def _patch_keys(self, layer: torch.nn.Module, keys: torch.Tensor | None) -> torch.Tensor:
        """The layer's captured keys of the patches, as its attention reads them (through its
        k-norm where it has one), averaged over heads: ``[units, patches, D]`` float32."""
        assert keys is not None
        attn = getattr(layer, self.layout.attention)
        norm = getattr(attn, "k_norm", None)
        keys = (keys if norm is None else norm(keys))[:, self.layout.prefix:].float()
        return head_mean(keys.unflatten(-1, (attn.num_heads, attn.head_dim)))

    def _scatter(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """The first output of the module after the drop goes back to the full grid; later
        calls in the same tower call (Janus's norm runs again on its pooled token) are its own."""
        patches, self._patches = self._patches, None
        if patches is None:
            return None
        t, _, c = output.shape
        p = self.layout.prefix
        full = output.new_zeros(t, p + self.keep.shape[1] * self.group ** 2, c)
        full[:, :p] = output[:, :p]
        full[:, p:].scatter_(1, patches[..., None].expand(-1, -1, c), output[:, p:])
        return full

    def stats(self) -> TokenStats:
        """Tokens entering each tower layer in the last forward with images, per unit."""
        if self.counts is None:
            raise RuntimeError("no forward with images has run since patching; call the model first")
        before, after = self.counts
        depth = len(self.layout.layers(self.tower))
        return TokenStats([f"{self.layout.layer_name}.{i}" for i in range(depth)],
                          [before if i <= self.layer else after for i in range(depth)])


class NaflexGroupPruner(GroupPruner):
    """:class:`GroupPruner` of a NaFlex tower (Siglip2's, in LFM2-VL): every unit is
    patchified at its own aspect ratio (``spatial_shapes [U, 2]``, patches in raster order),
    padded to the longest and masked. Each unit keeps ``round(ratio * its groups)`` (at
    least one), so the later layers run on each unit's kept patches padded to the longest
    kept, with the mask the tower itself makes for that padding; ``keep`` is then a list of
    one ``[groups]`` mask per unit (raster order)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shapes: list[list[int]] | None = None  # [U] (rows, cols) of patches, from the tower call
        self._valid: torch.Tensor | None = None  # [U, kept] after the drop: the later layers' padding
        self._kept_patches: list[torch.Tensor] | None = None  # each unit's kept patches, raster order
        self._input_patches = 0  # the tower's padded patch count, which the scattered output has again

    def install(self) -> None:
        super().install()
        for later in self.layout.layers(self.tower)[self.layer + 1 :]:
            self.hooks.append(later.register_forward_pre_hook(self._mask_kept, with_kwargs=True))

    def remove(self) -> None:
        super().remove()
        self._shapes = self._valid = self._kept_patches = None

    def _begin(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        super()._begin(module, args, kwargs)
        self._valid = self._kept_patches = None
        shapes = kwargs.get("spatial_shapes", args[2] if len(args) > 2 else None)
        if shapes is None:
            raise ValueError("saint's vit mode on a NaFlex tower needs the call's spatial_shapes (each unit's patch grid)")
        self._shapes = [[int(v) for v in hw] for hw in shapes.tolist()]

    @staticmethod
    def _refuse_masks(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """A NaFlex tower masks its padding patches: the units' grids say which are real."""

    def _mask_kept(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
                   ) -> tuple[tuple, dict[str, Any]] | None:
        """The layers after the drop attend over each unit's kept patches: the tower's own
        mask for the kept layout's padding (made as the tower makes it)."""
        if self._valid is None:
            return None
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.tower.config, inputs_embeds=args[0], attention_mask=self._valid)
        if len(args) > 1:
            return (args[0], mask, *args[2:]), kwargs
        return args, {**kwargs, "attention_mask": mask}

    def _prune(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        u, n, c = output.shape
        g, shapes = self.group, self._shapes
        if shapes is None or len(shapes) != u:
            raise ValueError(f"{u} units but spatial_shapes describes {0 if shapes is None else len(shapes)}")
        bad = [hw for hw in shapes if hw[0] % g or hw[1] % g or hw[0] * hw[1] > n]
        if bad:
            raise ValueError(f"patch grids {bad} are not made of whole {g}x{g} groups within the tower's {n} patches: "
                             "saint keeps the groups the projector folds into one token")
        keys, self._keys = self._keys, None
        keys = self._patch_keys(module, keys)  # [U, N, D]
        keep, patches = [], []
        for i, (h, w) in enumerate(shapes):
            rows, cols = h // g, w // g
            budget = max(1, round(self.ratio * rows * cols))
            if budget == rows * cols:
                kept = torch.ones(rows * cols, dtype=torch.bool, device=output.device)
            else:
                groups = keys[i, : h * w].view(rows, g, cols, g, -1).mean(dim=(1, 3)).reshape(1, rows * cols, -1)
                kept = fixed_budget_keep_mask(groups, budget, self.step_div)[0]
            keep.append(kept)
            patches.append(kept.view(rows, 1, cols, 1).expand(rows, g, cols, g).reshape(h * w).nonzero().squeeze(1))
        self.keep = keep
        self.counts = ([h * w for h, w in shapes], [len(p) for p in patches])
        if all(len(p) == h * w for p, (h, w) in zip(patches, shapes, strict=True)):
            return output  # nothing to drop: the layers after run as unpatched
        width = max(len(p) for p in patches)
        kept_rows = output.new_zeros(u, width, c)
        valid = torch.zeros(u, width, dtype=torch.long, device=output.device)
        for i, p in enumerate(patches):
            kept_rows[i, : len(p)] = output[i, p]
            valid[i, : len(p)] = 1
        self._valid, self._kept_patches, self._input_patches = valid, patches, n
        return kept_rows

    def _scatter(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """The final norm's output goes back to each unit's patch grid (zeros at dropped
        groups and at the padding), as long as the tower's input."""
        patches, self._kept_patches, self._valid = self._kept_patches, None, None
        if patches is None:
            return None
        full = output.new_zeros(output.shape[0], self._input_patches, output.shape[2])
        for i, p in enumerate(patches):
            full[i, p] = output[i, : len(p)]
        return full


def check_vit_layer(tower: torch.nn.Module, layout: TowerLayout, vit_layer: int) -> None:
    """A tower layer exists after ``vit_layer`` (else pruning saves nothing)."""
    depth = len(layout.layers(tower))
    if vit_layer >= depth - 1:
        raise ValueError(
            f"vit_layer={vit_layer}: the vision tower has {depth} layers (0..{depth - 1}) and pruning after "
            f"the last one saves nothing; vit_layer must be <= {depth - 2}"
        )

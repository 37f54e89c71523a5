"""The adapter protocol: the only place that knows a model family's structure.

Tools (``calibrate``, the bench harness, FLOPs, ``analyze``, ``viz``, ``demo``) ask an
:class:`Adapter` and a :class:`Handle` and never the model, so a new family is one
adapter file that every tool then understands. An adapter describes a model without
changing it (sites, protected prefix, patch grid, FLOPs, capture points) and patches /
unpatches it; a handle is what a patched model carries, with public fields only.
"""

from __future__ import annotations

import abc
import copy
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .common import (
    PICKLE_HINT,
    SAINT_ATTR,
    SITE_ATTR,
    Hooked,
    PatchedBlocks,
    Runs,
    TokenState,
    TokenStats,
    get_handle,
)

Inputs = Any  # a [B, 3, H, W] image batch, or a dict of processor outputs (VLMs)


@dataclass(frozen=True)
class Site:
    """One block (ViT block, encoder layer, decoder layer) that tokens enter; pruning
    happens inside or right after it. ``heads``: the heads its keys are averaged over
    (KV heads for grouped-query attention); ``scale``: its attention scale."""

    index: int
    name: str
    block: nn.Module
    attn: nn.Module
    heads: int
    scale: float


@dataclass(frozen=True)
class Grid:
    """The patch grid of one image: ``rows x cols`` patches of ``patch`` pixels."""

    rows: int
    cols: int
    patch: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols


def vit_block_flops(n_in: float, n_out: float, dim: int, mlp_hidden: float, select_at: str = "mlp",
                    keys_first: bool = True) -> float:
    """FLOPs of one ViT block (multiply-add = 2 FLOPs) with ``n_in`` tokens entering and
    ``n_out`` leaving: with ``select_at="mlp"`` qkv, attention and proj run on ``n_in``
    and the MLP on ``n_out`` (pruning sits between the two); with ``"attention"`` only
    the key projection runs on ``n_in`` and everything after it on ``n_out`` (with
    ``keys_first=False`` the whole qkv projection runs on ``n_in``)."""
    n_attn = n_in if select_at == "mlp" else n_out
    n_qv = n_out if select_at != "mlp" and keys_first else n_in
    return (2 * n_in * dim * dim + 2 * n_qv * 2 * dim * dim + 2 * n_attn * dim * dim
            + 4 * n_attn * n_attn * dim + 2 * n_out * 2 * dim * mlp_hidden)


def mlp_width(mlp: nn.Module, dim: int) -> float:
    """The hidden width of a two-layer ``dim``-wide MLP that costs what ``mlp`` does (its
    linear layers' weights over ``2 * dim``): a GELU MLP's ``fc1`` width, 1.5x the hidden
    width of a SwiGLU (three matrices; timm's ``SwiGLU`` and ``SwiGLUPacked``)."""
    return sum(m.in_features * m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)) / (2 * dim)


def select_at_of(model: nn.Module, select_at: str | None) -> str:
    """``select_at`` if given, else the patched model's own setting (``"mlp"`` unpatched)."""
    if select_at is not None:
        return select_at
    handle = get_handle(model)
    return "mlp" if handle is None else getattr(handle.config, "select_at", "mlp")


class Handle(abc.ABC):
    """What a patched model carries. Public fields every handle has:

    ``config`` the method's config, ``settings`` ``{site index: per-layer settings}`` of
    the pruning sites, ``num_protected`` the prefix never pruned, ``trace`` whether
    token origins are recorded, ``block_names`` one name per site."""

    config: Any
    settings: dict[int, dict[str, Any]]
    num_protected: int
    trace: bool
    block_names: list[str]

    @abc.abstractmethod
    def stats(self) -> TokenStats:
        """Tokens per block in the last forward, per sample (what ``saint.stats`` shows)."""

    @property
    def pruning_sites(self) -> list[int]:
        """Indices of the sites that prune, in order."""
        return sorted(self.settings)

    @abc.abstractmethod
    def site_tokens(self) -> list[torch.Tensor]:
        """Real tokens ``[B]`` entering each site that ran in the last forward."""

    @abc.abstractmethod
    def tokens_after(self, output: Any) -> torch.Tensor:
        """Real tokens ``[B]`` in ``output``, the output of the last site that ran."""

    @abc.abstractmethod
    def origins(self) -> list[torch.Tensor]:
        """With ``trace``: per pruning site, the sequence position of every original
        token after it (``[B, N0]``, -1 = dropped; equal positions = merged)."""


class Probe(abc.ABC):
    """Capture points of an unpatched model, for statistics: the queries/keys where
    they are projected and each site's hidden state, over the prunable span."""

    sites: list[Site]
    num_prefix: int
    has_cls: bool

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    @abc.abstractmethod
    def hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        """Register the hooks that put site ``i``'s projections into ``store``."""

    @abc.abstractmethod
    def qk(self, i: int, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``[B, N, H, D]`` (after any q/k norm) of site ``i``."""

    def hidden(self, output: Any) -> torch.Tensor:
        """A site's output hidden states ``[B, N, C]`` over the analysed span."""
        return output[0] if isinstance(output, (tuple, list)) else output

    def begin(self, inputs: Inputs) -> None:
        """Called with every batch before the forward (e.g. to find image tokens)."""
        return None


def save_output(store: dict[str, torch.Tensor], key: str):
    """A forward hook that stores its module's output under ``key``."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store[key] = output

    return hook


class Adapter(abc.ABC):
    """One model family. ``name`` identifies it; ``tau_setting`` is the keyword that
    carries SAINT's per-site tau in :meth:`patch` (what calibration sets)."""

    name: str = ""
    tau_setting: str = "tau"

    @abc.abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter handles ``model``."""

    @abc.abstractmethod
    def sites(self, model: nn.Module) -> list[Site]:
        """The blocks tokens flow through, in order (the ones that can prune)."""

    @abc.abstractmethod
    def protected(self, model: nn.Module) -> int:
        """Prefix tokens that are never pruned (class, distillation, register tokens)."""

    @abc.abstractmethod
    def grid(self, model: nn.Module, inputs: Inputs | None = None) -> Grid:
        """The patch grid of the images ``inputs`` (the model's default size when None)."""

    def max_patches(self, model: nn.Module, inputs: Inputs | None = None) -> int:
        """The most patches any image of ``inputs`` has (of the model's default grid when None)."""
        return self.grid(model, inputs).num_patches

    @abc.abstractmethod
    def block_flops(self, model: nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        """FLOPs of one site with ``n_in`` tokens entering and ``n_out`` leaving it, the
        selection acting at ``select_at`` (None: the patched model's own setting, ``"mlp"``
        when unpatched)."""

    @abc.abstractmethod
    def probe(self, model: nn.Module) -> Probe:
        """Capture points of the (unpatched) model, for token statistics."""

    @abc.abstractmethod
    def patch(self, model: nn.Module, method: Any = "saint", trace: bool = False, **kwargs: Any) -> Handle:
        """Patch ``model`` in place (see :func:`saint.patch`)."""

    @abc.abstractmethod
    def unpatch(self, model: nn.Module) -> None:
        """Undo :meth:`patch`: the model computes exactly what it did before."""

    # --- running the model: image batches by default; VLM adapters take processor dicts
    def forward(self, model: nn.Module, inputs: Inputs) -> Any:
        """One forward of ``model`` on a batch."""
        return model(inputs)

    def embed(self, model: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pooled embedding ``[B, D]`` of a batch, and logits ``[B, C]`` for classifiers."""
        out = self.forward(model, inputs)
        return out, None

    def check_inputs(self, inputs: Inputs) -> None:
        """Raise a clear error unless ``inputs`` is a batch this family takes."""
        if isinstance(inputs, Mapping) and "pixel_values" in inputs:
            raise ValueError("this model takes the image batch itself: pass inputs['pixel_values'] "
                             "(a processor's output holds it), not the whole mapping")
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or inputs.shape[0] < 1:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"images must be a [N, 3, H, W] batch, got {shape}")
        if not inputs.is_floating_point():
            raise TypeError(f"images must be float pixels as the model takes them (normalised), got {inputs.dtype}")
        if not bool(torch.isfinite(inputs).all()):
            raise ValueError("images contain NaN or inf: every statistic taken on them would be too")

    def batch_size(self, inputs: Inputs) -> int:
        return int(inputs.shape[0])

    def split(self, inputs: Inputs, size: int) -> Iterator[Inputs]:
        """``inputs`` in batches of at most ``size``."""
        n = self.batch_size(inputs)
        for start in range(0, n, size):
            yield inputs[start : start + size]

    def to(self, inputs: Inputs, device: torch.device, dtype: torch.dtype) -> Inputs:
        """A batch on ``device``, floating-point tensors in ``dtype``."""
        return inputs.to(device=device, dtype=dtype)


class FamilyAdapter(Adapter):
    """An adapter whose ``matches`` / ``patch`` / ``unpatch`` are the functions of its
    family's module (``family``, usually ``sys.modules[__name__]``): each exists once,
    there, and the adapter class only describes the model."""

    family: types.ModuleType

    def matches(self, model: nn.Module) -> bool:
        return self.family.matches(model)

    def patch(self, model: nn.Module, method: Any = "saint", trace: bool = False, **kwargs: Any) -> Handle:
        return self.family.patch(model, method, trace=trace, **kwargs)

    def unpatch(self, model: nn.Module) -> None:
        self.family.unpatch(model)


class DelegatingAdapter(FamilyAdapter):
    """The adapter of a wrapper whose pruning happens in an inner model another adapter
    patches (timm's ``features_only`` wrapper, open_clip's timm towers): its family module's
    ``inner_of(model)`` gives ``(inner model, its adapter)``, and every protocol call but the
    forward and the embedding is the inner model's."""

    def sites(self, model: nn.Module) -> list[Site]:
        inner, adapter = self.family.inner_of(model)
        return adapter.sites(inner)

    def protected(self, model: nn.Module) -> int:
        inner, adapter = self.family.inner_of(model)
        return adapter.protected(inner)

    def grid(self, model: nn.Module, inputs: Inputs | None = None) -> Grid:
        inner, adapter = self.family.inner_of(model)
        return adapter.grid(inner, inputs)

    def block_flops(self, model: nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        inner, adapter = self.family.inner_of(model)
        return adapter.block_flops(inner, n_in, n_out, select_at)

    def probe(self, model: nn.Module) -> Probe:
        inner, adapter = self.family.inner_of(model)
        return adapter.probe(inner)


def with_adapter(inner: Any, adapters: Sequence[Adapter]) -> tuple[nn.Module, Adapter] | None:
    """``(inner, the first of adapters that handles it)``, or None when none does (or
    ``inner`` is no module): how a delegating adapter finds the model it patches."""
    if not isinstance(inner, nn.Module):
        return None
    adapter = next((a for a in adapters if a.matches(inner)), None)
    return None if adapter is None else (inner, adapter)


def found_or_refused(found: tuple[nn.Module, Adapter] | None, model: nn.Module, expected: str
                     ) -> tuple[nn.Module, Adapter]:
    """``found`` (:func:`with_adapter`'s answer for ``model``), or a TypeError saying what was
    ``expected``."""
    if found is None:
        raise TypeError(f"expected {expected}, got {type(model).__name__}")
    return found


def patch_inner(model: nn.Module, inner: nn.Module, adapter: Adapter, method: Any, trace: bool,
                settings: dict[str, Any], what: str) -> Handle:
    """Patch ``inner`` (held by ``model``, ``what`` it is) through its ``adapter``; the handle
    goes on ``model`` too, which then owns it (the inner model cannot be unpatched alone)."""
    if get_handle(inner) is not None:
        raise ValueError(f"the {type(inner).__name__} inside this {what} is already patched by saint; unpatch it first")
    handle = adapter.patch(inner, method, trace=trace, **settings)
    model.__dict__[SAINT_ATTR] = handle
    handle.patched_through(inner, model)
    return handle


def unpatch_inner(model: nn.Module, inner: nn.Module, adapter: Adapter) -> None:
    """Undo :func:`patch_inner`: both are the original objects again."""
    if model.__dict__.pop(SAINT_ATTR, None) is None:
        raise ValueError(f"{type(model).__name__} is not patched by saint")
    adapter.unpatch(inner)


def batch_to(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A processor-output dict on ``device``, with its floating tensors in ``dtype``."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device)
        out[k] = v
    return out


@dataclass
class TokenStateHandle(Handle):
    """A handle whose per-call state is a :class:`~saint.adapters.common.TokenState`
    kept per call in ``runs`` (the ViT adapters): ``state`` is this thread's current
    or last call, ``stats()`` the last call that ran every block. A deep copy is an
    independent patched model; pickling is refused with a hint."""

    spec: Any  # the registered method (MethodSpec)
    config: Any
    settings: dict[int, dict[str, Any]]
    num_protected: int
    trace: bool = False
    hooks: list[Any] = field(default_factory=list)
    block_names: list[str] = field(default_factory=list)
    runs: Runs = field(default_factory=lambda: Runs(0))
    kernel: str = "auto"
    hooked: list[Hooked] = field(default_factory=list)  # modules given a hook or a forward, where they sit
    patched_blocks: PatchedBlocks | None = None  # the blocks patched, where the model keeps them
    owner: str | None = None  # the class of the model patched, when the inner one was patched through it

    def patched_through(self, model: nn.Module, wrapper: nn.Module) -> None:
        """Remember that ``wrapper`` (a model holding ``model``, the one patched) was the
        model the user patched."""
        if wrapper is not model:
            self.owner = type(wrapper).__name__

    def check_unpatch(self, model: nn.Module) -> None:
        """Refuse to unpatch the inner model of a patched wrapper on its own: the wrapper
        would stay marked patched with an inner model that no longer prunes."""
        if self.owner is not None and type(model).__name__ != self.owner:
            raise ValueError(
                f"this {type(model).__name__} was patched through its {self.owner}; unpatch (or patch again) "
                f"the {self.owner} itself: saint.unpatch(<the {self.owner}>)"
            )

    @property
    def state(self) -> TokenState:
        """Token state of this thread's current (or last) call, else of the last complete call."""
        run = self.runs.current()
        return TokenState() if run is None else run.state

    def output_weights(self) -> torch.Tensor | None:
        """How many original tokens each position of the last forward's output stands for:
        ``[B, M]`` float (1 for a token nothing merged into, 0 at padding), or None when
        every position is one real token."""
        run = self.runs.current()
        if run is None:
            raise RuntimeError("no forward has run through the patched model since patching; call the model first")
        state = run.state
        if state.packed:
            raise RuntimeError("the forward is still running (its tokens are packed); take the weights after it")
        if state.unmerged:  # a backbone's output: one row per original token
            return None
        if state.sizes is None:  # nothing merged: each real position is one token
            return None if state.valid is None else state.valid.float()
        weights = state.sizes.reshape(state.sizes.shape[:2]).float()
        return weights if state.valid is None else weights.masked_fill(~state.valid, 0.0)

    def stats(self) -> TokenStats:
        run = self.runs.last
        if run is None:
            raise RuntimeError("no forward has run through the patched model since patching; call the model first")
        counts = run.state.counts
        return TokenStats(self.block_names[: len(counts)], [c.tolist() for c in counts], run.state.ran)

    def enter_site(self, index: int, x: torch.Tensor) -> tuple[Any, torch.Tensor, dict[str, Any] | None]:
        """Block ``index`` of a call begins: this call's run, the tokens in its current
        layout (recorded for tracing unless recomputed), and the block's settings (None:
        no selection here, or an empty batch, which gives ``(0, ...)`` as unpatched)."""
        if index == 0:  # once per call: what saint installed is still in place
            refuse_calls_without_data(x)
            if self.patched_blocks is not None:
                self.patched_blocks.check()
            for hooked in self.hooked:
                hooked.check()
        run = self.runs.enter(index, x, self.trace)
        state = run.state
        x = state.enter(x)
        if not run.recompute:
            state.record(x)
        settings = self.settings.get(index)
        if x.shape[0] == 0:  # an empty batch has nothing to select
            settings = None
        return run, x, settings

    def attention_from_parts(self, index: int) -> None:
        """Block ``index`` computes its attention from the attention module's parts (its
        projections) rather than through the module: refuse a user's hook on that module,
        which would silently not run."""
        if self.patched_blocks is not None:
            refuse_attention_hooks(self.patched_blocks.blocks[index], self.block_names[index])

    def leave_site(self, index: int, run: Any, x: torch.Tensor) -> torch.Tensor:
        """Block ``index`` of a call ends: the padded view after the last block (or after
        every block when the layout asks; one row per original token when the call
        unmerges), its output's validity recorded, the run left."""
        state = run.state
        unmerge = self.runs.unmerges_every_block()
        if index == self.runs.depth - 1 or unmerge or self.runs.unpads_every_block():
            x = state.leave(x)
        if not run.recompute:
            run.layer_valid.append(None if unmerge else state.valid)
        if unmerge:
            x = state.unmerge(x)
        self.runs.leave(index, run)
        return x

    def __deepcopy__(self, memo: dict) -> TokenStateHandle:
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in vars(self).items():
            runs = self.runs
            setattr(new, name, Runs(runs.depth, runs.layout, runs.track_positions) if name == "runs"
                    else copy.deepcopy(value, memo))
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(PICKLE_HINT)

    def site_tokens(self) -> list[torch.Tensor]:
        return list(self.state.counts)

    def tokens_after(self, output: Any) -> torch.Tensor:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        valid = self.state.valid
        if valid is not None:
            return valid.sum(dim=1)
        return torch.full((hidden.shape[0],), hidden.shape[1], dtype=torch.long, device=hidden.device)

    def origins(self) -> list[torch.Tensor]:
        if not self.trace:
            raise ValueError("token origins are recorded only with saint.patch(..., trace=True)")
        return list(self.state.origins)


EXPORT_HINT = (
    "a saint-patched model picks its token counts from the data at run time, which torch.jit.trace, "
    "ONNX export and torch.export cannot record as a graph; export the unpatched model "
    "(saint.unpatch(model)), or run the patched one eagerly or under torch.compile"
)


META_HINT = (
    "a saint-patched model picks its token counts from the data, which meta tensors do not carry; "
    "run it on real tensors (torch.utils.flop_counter.FlopCounterMode counts a patched model's FLOPs "
    "on a real batch), or the unpatched model on meta tensors"
)


VMAP_HINT = (
    "torch.func.vmap runs the model on one image at a time as one program, but a saint-patched model "
    "gives each image its own token count; call the patched model on the batch itself, or vmap the "
    "unpatched model"
)


def refuse_calls_without_data(x: torch.Tensor) -> None:
    """Refuse calls that carry no data to pick token counts from, up front: tracing for
    export and meta tensors would otherwise fail deep inside torch or saint (or, for a
    trace, replay one batch's token counts on every later input)."""
    if torch.jit.is_tracing() or _is_exporting():
        raise RuntimeError(EXPORT_HINT)
    if x.device.type == "meta":
        raise RuntimeError(META_HINT)
    if torch._C._functorch.is_batchedtensor(x):
        raise RuntimeError(VMAP_HINT)


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5

ATTENTION_NAMES = ("attn", "self_attn", "attention")  # a block's attention module (timm, HF)


def _user_hook(hook: Callable[..., Any]) -> bool:
    """A hook someone registered: not saint's key capture, nor transformers' own output
    capturing (installed on every attention module at a call with ``output_hidden_states``;
    it records attentions only when asked, which a packed batch refuses)."""
    return hook is not capture_for_selection and _package_of(hook) != "transformers"


def _package_of(fn: Any) -> str:
    """The top-level package a function (or bound method) was defined in, '' if unknown."""
    return (getattr(getattr(fn, "__func__", fn), "__module__", None) or "").partition(".")[0]


def refuse_attention_hooks(block: nn.Module, name: str) -> None:
    """Refuse a user's hook on a block's attention module (or on a module inside it that has
    modules of its own, e.g. HF ViT's self-attention) where saint computes that attention
    itself from its parts (a packed batch, a selection before attention): the hook would
    silently not run. Its projections, norms and the block itself run as modules."""
    attr = next((a for a in ATTENTION_NAMES if isinstance(block._modules.get(a), nn.Module)), None)
    if attr is None:
        return
    attn = block._modules[attr]
    for sub_name, module in (("", attn), *attn._modules.items()):
        if module is None or (module is not attn and not module._modules):
            continue
        if any(map(_user_hook, (*module._forward_pre_hooks.values(), *module._forward_hooks.values()))):
            where = ".".join(filter(None, (name, attr, sub_name)))
            raise RuntimeError(
                f"{where} has a forward hook, which would not run: saint computes this block's attention "
                "itself from its parts here (a packed ragged batch, or a selection before attention). Register "
                f"the hook on the block ({name}) or on the attention's projections instead, or patch with "
                "layout='padded' (and select_at='mlp')"
            )


def capture_for_selection(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    """Forward hook on a pruning block's key projection (timm ``attn.qkv``, HF ``k_proj``):
    keep its output for the call's selection."""
    handle, i = module.__dict__[SITE_ATTR]
    handle.runs.executing().captured[i] = output


def refuse_foreign_forwards(modules: dict[str, nn.Module | None]) -> None:
    """Refuse modules whose ``forward`` another library already replaced per instance
    (e.g. accelerate's hooks when a device map spreads a model): saint would drop that
    wrapper while patched and could not give it back on unpatch."""
    for name, module in modules.items():
        if module is not None and "forward" in module.__dict__:
            raise ValueError(
                f"{name} already has a per-instance forward, set by another library (e.g. accelerate's hooks "
                "for a device map across devices); saint replaces that forward and would lose it: patch a "
                "model without such hooks (on one device)"
            )


def install_sites(handle: TokenStateHandle, owner: nn.Module, prefix: str, forward: Callable[..., Any],
                  key_proj: Callable[[nn.Module], nn.Module] | None, layout: str, track_positions: bool = False) -> None:
    """Give every block of ``owner.<prefix>`` its per-instance ``forward`` (finding ``handle``
    and its index through the block) and every pruning block's key projection a capture hook
    (none when ``key_proj`` is None: the block forward reads its keys itself); name the blocks
    ``prefix.<i>``, remember where they sit, and start the per-call runs (tracking each
    token's original index for rotary models)."""
    blocks = list(owner.get_submodule(prefix))
    handle.patched_blocks = PatchedBlocks(owner, prefix, tuple(blocks))
    handle.block_names = [f"{prefix}.{i}" for i in range(len(blocks))]
    refuse_foreign_forwards(dict(zip(handle.block_names, blocks, strict=True)))
    handle.runs = Runs(len(blocks), layout, track_positions)
    for i, blk in enumerate(blocks):
        blk.__dict__[SITE_ATTR] = (handle, i)
        blk.forward = types.MethodType(forward, blk)
        if i in handle.settings and key_proj is not None:
            proj = key_proj(blk)
            proj.__dict__[SITE_ATTR] = (handle, i)
            handle.hooks.append(proj.register_forward_hook(capture_for_selection))
            handle.hooked.append(Hooked(blk, key_proj, proj, f"the key projection of {handle.block_names[i]}"))


def drop_own_forward(module: nn.Module) -> None:
    """Remove the per-instance ``forward`` saint gave ``module``; one another library set
    (accelerate's offload hook on a key projection saint only hooked) stays."""
    if _package_of(module.__dict__.get("forward")) == "saint":
        del module.__dict__["forward"]


def remove_sites(handle: TokenStateHandle) -> None:
    """Undo :func:`install_sites` on the blocks it patched (wherever they are now): their
    own ``forward`` again, no hooks."""
    for h in handle.hooks:
        h.remove()
    handle.hooks.clear()
    for blk in handle.patched_blocks.blocks if handle.patched_blocks is not None else ():
        blk.__dict__.pop("forward", None)
        blk.__dict__.pop(SITE_ATTR, None)
    for hooked in handle.hooked:  # the modules recorded, even where something replaced them since
        drop_own_forward(hooked.module)
        hooked.module.__dict__.pop(SITE_ATTR, None)
    handle.hooked.clear()
    handle.patched_blocks = None

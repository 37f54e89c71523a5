"""LLaVA (transformers 5 ``LlavaForConditionalGeneration`` / ``LlavaModel``): SAINT's
VLM modes and the VLM baselines, with per-instance hooks only.

Methods (``saint.patch(model, method=..., **settings)``; see :class:`LlavaPruneConfig`):

- ``"saint"`` with ``mode=``
  - ``"vit"``: fixed-budget similarity drop in the vision tower at ``vit_layer`` to
    ``vit_keep`` patches (+ class token), via :func:`saint.adapters.hf_vision.patch_tower`;
  - ``"llm"``: SAINT graph drop of the image tokens only, after every decoder layer
    ``llm_layers = (start, end)`` (inclusive), prefill only;
  - ``"hybrid"`` (default, the reference LLaVA-1.5-7B settings): both.
- ``"fastv"``: FastV. The attention of each row's last token in decoder layer
  ``fastv_layer - 1`` (computed for that layer alone from its q/k projections; sdpa
  stays on) ranks the image tokens; the ``fastv_ratio`` least attended are dropped,
  so layers ``fastv_layer`` and later see the shorter sequence (FastV's ``K``, ``R``).
- ``"random"`` / ``"pool"``: ``visual_keep`` visual tokens right after the projector,
  a seeded random subset of patch positions (the same positions for every image, so
  an image's result never depends on its batch) or adaptive average pooling of the
  patch grid (``visual_keep`` a square number or ``(rows, cols)``).

These baselines act on the image span inside the decoder or on the projector's
output, which the registry's per-block :class:`saint.methods.LayerContext` does not
describe, so they are LLaVA-level methods rather than entries of ``saint.METHODS``.

Image tokens are found per sample from ``config.image_token_id`` (several images per
prompt allowed); text tokens are never dropped, nor is the last token of a prompt.

When the tower yields fewer features per image than the prompt holds image tokens
(``vit``, ``random``, ``pool``), each image's run of tokens is shrunk to its feature
count before the language model runs, exactly as if the processor had emitted that
many tokens: rows are re-aligned to the right (left padding), positions are
contiguous, and ``attention_mask``/``position_ids`` of later decoding steps are mapped
to the shorter prompt. Inside the language model, dropped tokens leave the kept ones
at their original positions (see :mod:`saint.adapters.hf_llm`).

Outputs stay in the coordinates of the input you passed: ``logits`` have the input's
length, and positions whose token was dropped (by either step) carry NaN logits.
With ``labels`` the loss is the model's own loss over the targets that still have a
prediction: a target whose predicting position was dropped is ignored (set to -100),
which never touches a text-only continuation that does not directly follow an image.
``output_hidden_states`` / ``output_attentions`` are refused while pruning. A patched
``LlavaModel`` (no LM head) returns zero hidden states at dropped positions; the
handle's ``kept_input [B, L]`` marks the positions that have an output.

SAINT with ``llm_rate="sample"`` (default) gives every sample its own count: ragged
rows are padded and masked, so a prompt's output is the same alone or in a batch.
``"batch"`` is the reference's batch vote (results depend on the batch).

The per-forward state lives on the patch handle (one forward at a time per model
instance: calls from several threads wait for each other; a deep copy or pickle of a
patched LLaVA is refused with "unpatch first"); the maps a cached generation needs are stored on its cache object, so
cached generations may interleave. Not supported (clear errors): flash/flex
attention, sliding-window layers, ``inputs_embeds``-only prompts with images, adding
images to a non-empty cache, 4-D attention masks (incl. static caches) together
with a vision-side reduction. A cache filled by a pruned prompt must be continued by
the same patched model (not after ``unpatch``). For ``num_beams`` /
``num_return_sequences`` > 1 with a vision-side reduction, generate's private helper
``_expand_multimodal_outputs`` is wrapped per instance to count the kept image tokens.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core import gather_tokens, keep_mask_to_indices
from ..methods import LayerContext, MethodSpec, SaintConfig, get_method
from ..methods import make_config as registry_config
from . import hf_llm, hf_vision
from .base import Adapter, Grid, Handle, Probe, Site, batch_to, save_output
from .common import PICKLE_HINT, SAINT_ATTR, RefusePickle, TokenStats, transformers_loaded

METHODS = ("saint", "fastv", "random", "pool")
EXPAND = "_expand_multimodal_outputs"  # generate's (private) helper for num_beams / num_return_sequences > 1
MODES = ("vit", "llm", "hybrid")
VIT_FIELDS = ("vit_keep", "vit_layer", "vit_step_div")
LLM_FIELDS = ("llm_layers", "llm_tau", "llm_k", "llm_gamma", "llm_rate", "llm_rope_keys")
FIELDS: dict[str, tuple[str, ...]] = {
    "saint/vit": ("mode", *VIT_FIELDS),
    "saint/llm": ("mode", *LLM_FIELDS),
    "saint/hybrid": ("mode", *VIT_FIELDS, *LLM_FIELDS),
    "fastv": ("fastv_layer", "fastv_ratio"),
    "random": ("visual_keep", "seed"),
    "pool": ("visual_keep",),
}


def _llava_classes() -> tuple[type, ...]:
    try:
        from transformers.models.llava.modeling_llava import (
            LlavaForConditionalGeneration,
            LlavaModel,
        )
    except ImportError:  # pragma: no cover - transformers missing
        return ()
    return LlavaForConditionalGeneration, LlavaModel


def matches(model: torch.nn.Module) -> bool:
    if not transformers_loaded():
        return False
    classes = _llava_classes()
    return bool(classes) and isinstance(model, classes)


# ---------------------------------------------------------------------------- config
def _int(name: str, v: Any, low: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}: {v!r}")
    if low is not None and v < low:
        raise ValueError(f"{name}={v} must be >= {low}")
    return v


@dataclass
class LlavaPruneConfig:
    """Settings of one LLaVA pruning method; defaults are the reference LLaVA-1.5-7B
    settings (576 -> 375 patches at CLIP layer 19; SAINT after LLM layers 7..16,
    tau 0.83, K 5, gamma 10). Per-layer ``llm_tau/llm_k/llm_gamma`` take a scalar, a
    list aligned with the layers ``start..end`` or a ``{layer: value}`` dict.
    ``llm_rope_keys``: the metric is the layer's keys after RoPE (as the reference;
    False = before RoPE), averaged over KV heads."""

    method: str = "saint"
    mode: str = "hybrid"
    vit_keep: int = 375
    vit_layer: int = 19
    vit_step_div: int = 16
    llm_layers: tuple[int, int] = (7, 16)
    llm_tau: float | Sequence[float] | Mapping[int, float] = 0.83
    llm_k: int | Sequence[int] | Mapping[int, int] = 5
    llm_gamma: float | Sequence[float] | Mapping[int, float] = 10.0
    llm_rate: str = "sample"
    llm_rope_keys: bool = True
    fastv_layer: int = 2
    fastv_ratio: float = 0.5
    visual_keep: int | tuple[int, int] | None = None
    seed: int = 0

    @property
    def key(self) -> str:
        return f"saint/{self.mode}" if self.method == "saint" else self.method

    @property
    def prunes_vit(self) -> bool:
        return self.method == "saint" and self.mode in ("vit", "hybrid")

    @property
    def prunes_llm(self) -> bool:
        return (self.method == "saint" and self.mode in ("llm", "hybrid")) or self.method == "fastv"

    def validate(self) -> None:
        """Check every setting that does not depend on the model."""
        if self.method not in METHODS:
            raise ValueError(f"unknown LLaVA method {self.method!r}; known: {METHODS}")
        if self.method == "saint" and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.prunes_vit:
            _int("vit_keep", self.vit_keep, 1)
            _int("vit_layer", self.vit_layer, 0)
            _int("vit_step_div", self.vit_step_div, 1)
        if self.method == "saint" and self.mode in ("llm", "hybrid"):
            self.llm_range()
            if self.llm_rate not in ("sample", "batch"):
                raise ValueError(f"llm_rate must be 'sample' or 'batch', got {self.llm_rate!r}")
            if not isinstance(self.llm_rope_keys, bool):
                raise TypeError(f"llm_rope_keys must be True or False, got {self.llm_rope_keys!r}")
        if self.method == "fastv":
            _int("fastv_layer", self.fastv_layer, 1)
            r = self.fastv_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise ValueError(f"fastv_ratio={r!r} must be a fraction in [0, 1) of the image tokens to drop")
        if self.method in ("random", "pool"):
            self.grid_keep()
            _int("seed", self.seed)

    def llm_range(self) -> tuple[int, int]:
        v = self.llm_layers
        if not isinstance(v, (tuple, list)) or len(v) != 2:
            raise TypeError(f"llm_layers must be (start, end), inclusive decoder layer indices; got {v!r}")
        start, end = _int("llm_layers start", v[0], 0), _int("llm_layers end", v[1], 0)
        if end < start:
            raise ValueError(f"llm_layers=({start}, {end}) is empty or reversed: need start <= end")
        return start, end

    def grid_keep(self) -> tuple[int, int] | int:
        v = self.visual_keep
        if v is None:
            raise ValueError(f"method {self.method!r} needs visual_keep (visual tokens per image after the projector)")
        if self.method == "pool":
            if isinstance(v, (tuple, list)):
                if len(v) != 2:
                    raise ValueError(f"visual_keep={v!r}: give (rows, cols) of the pooled grid")
                return _int("visual_keep rows", v[0], 1), _int("visual_keep cols", v[1], 1)
            n = _int("visual_keep", v, 1)
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"pool needs a square visual_keep (e.g. 144 = 12x12) or (rows, cols); got {n}")
            return side, side
        return _int("visual_keep", v, 1)


def make_config(method: str = "saint", **kwargs: Any) -> LlavaPruneConfig:
    """Build and validate a :class:`LlavaPruneConfig`, rejecting settings the chosen
    method/mode does not use (so a typo never silently does nothing)."""
    if method not in METHODS:
        raise ValueError(f"unknown LLaVA method {method!r}; known: {METHODS}")
    names = {f.name for f in dataclasses.fields(LlavaPruneConfig)} - {"method"}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"LLaVA pruning does not take {unknown}; settings: {sorted(names)}")
    cfg = LlavaPruneConfig(method=method, **kwargs)
    if method != "saint" and "mode" in kwargs:
        raise TypeError(f"mode= is for method='saint'; method {method!r} takes {list(FIELDS[method])}")
    allowed = FIELDS.get(cfg.key)
    if allowed is not None:
        unused = sorted(set(kwargs) - set(allowed))
        if unused:
            raise TypeError(f"{cfg.key.replace('/', ' mode=')} does not use {unused}; it takes {list(allowed)}")
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------- handle
@dataclass
class _Forward:
    """State of one forward call (reset by every call)."""

    labels: torch.Tensor | None = None
    input_length: int = 0
    src0: torch.Tensor | None = None  # [B, L'] input position of each layer-0 slot
    valid0: torch.Tensor | None = None
    removed: torch.Tensor | None = None  # [B] tokens removed from each row before layer 0
    tower_counts: torch.Tensor | None = None
    dropped: torch.Tensor | None = None  # [B, L0] input positions without an output


@dataclass
class LlavaPatch(Handle):
    """A patched LLaVA: config, the decoder pruner, the vision-tower patch, the hooks,
    and the statistics of the last forward that carried images. Its sites are the
    language model's decoder layers; ``site_tokens``/``origins`` describe the last
    forward, when that was a prefill (a decoding step replaces them)."""

    config: LlavaPruneConfig
    model: torch.nn.Module
    mm: torch.nn.Module
    image_token_id: int
    pruner: hf_llm.DecoderPruner
    vision: Any = None
    hooks: list[Any] = field(default_factory=list)
    fwd: _Forward = field(default_factory=_Forward)
    pending_labels: torch.Tensor | None = None
    last_stats: TokenStats | None = None
    kept_input: torch.Tensor | None = None  # [B, L] input positions with an output (last forward)
    expand: Any = None  # the per-instance wrapper of generate's multimodal expansion
    trace: bool = False
    lock: Any = field(default_factory=threading.RLock)  # one forward at a time (the state above is per forward)
    num_protected = 0  # image tokens have no protected prefix (text is never pruned)

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(
            "copy.deepcopy of a patched LLaVA is not supported (its hooks belong to this instance); "
            "unpatch first: saint.unpatch(model), copy it, and patch the original and the copy"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(PICKLE_HINT)

    @property
    def settings(self) -> dict[int, dict[str, Any]]:  # type: ignore[override]
        """The decoder layers that prune (after which the image tokens shrink)."""
        return {i: {} for i in sorted(self.pruner.schedule)}

    @property
    def block_names(self) -> list[str]:  # type: ignore[override]
        return [f"language_model.layers.{i}" for i in range(len(self.pruner.layers))]

    def site_tokens(self) -> list[torch.Tensor]:
        return [s.valid.sum(dim=1) for s in self.pruner.stages]

    def tokens_after(self, output: Any) -> torch.Tensor:
        stage = self.pruner.final_stage
        if stage is None:
            raise RuntimeError("no prefill has run since patching; call the model first")
        return stage.valid.sum(dim=1)

    def origins(self) -> list[torch.Tensor]:
        """Per pruning layer, the sequence slot of every image token of the last
        prefill (``[B, image tokens]``, -1 = dropped), in prompt order."""
        if not self.trace:
            raise ValueError("token origins are recorded only with saint.patch(..., trace=True)")
        stages = self.pruner.stages
        if not stages:
            raise RuntimeError("no prefill has run since patching; call the model first")
        image = stages[0].image
        counts = image.sum(dim=1)
        if int(counts.min()) != int(counts.max()):
            raise ValueError(f"tracing needs the same number of image tokens in every prompt, got {counts.tolist()}")
        b, length = image.shape
        positions = image.nonzero()[:, 1].reshape(b, int(counts[0]))
        out = []
        for i in self.pruning_sites:
            stage = stages[i + 1] if i + 1 < len(stages) else self.pruner.final_stage
            slots = torch.arange(stage.length, device=image.device).expand(b, -1)
            where = torch.full((b, length + 1), -1, dtype=torch.long, device=image.device)
            where.scatter_(1, torch.where(stage.valid, stage.idx, length), torch.where(stage.valid, slots, -1))
            out.append(torch.gather(where, 1, positions))
        return out

    def stats(self) -> TokenStats:
        """Visual tokens per sample in the last forward with images: handed to the
        language model (``vision_tower``), entering each decoder layer, and after the
        last one (``language_model.norm``)."""
        if self.last_stats is None:
            raise RuntimeError("no forward with images has run since patching; call the model first")
        return self.last_stats

    def vision_stats(self) -> TokenStats | None:
        """Tokens entering each vision-tower layer, per image (``vit``/``hybrid`` only)."""
        return None if self.vision is None else self.vision.stats()


def patch(model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
          **kwargs: Any) -> LlavaPatch:
    """Patch a LLaVA model in place (see the module docstring and :func:`saint.patch`).

    ``method`` may be a SAINT-family :class:`~saint.methods.MethodSpec` (e.g. a
    calibration probe): it then selects the image tokens of ``mode="llm"/"hybrid"``."""
    llm_spec = None
    if isinstance(method, MethodSpec):
        if not issubclass(method.config_cls, SaintConfig):
            raise TypeError(f"LLaVA's language-model pruning takes a SAINT-family method, not {method.name!r}")
        llm_spec, method = method, "saint"
    cfg = make_config(method, **kwargs)
    mm = model.model if isinstance(model, _llava_classes()[0]) else model
    lm = mm.language_model
    hf_llm.check_decoder(lm)
    schedule, query_layers = llm_schedule(cfg, len(lm.layers), llm_spec)

    tower = mm.vision_tower
    if cfg.prunes_vit:
        _check_vit(mm, cfg)
    if cfg.method in ("random", "pool"):
        _check_grid(mm, cfg)

    pruner = hf_llm.DecoderPruner(lm, schedule, rope_keys=cfg.llm_rope_keys, query_layers=query_layers)
    handle = LlavaPatch(cfg, model, mm, int(mm.config.image_token_id), pruner, trace=trace)
    if cfg.prunes_vit:
        handle.vision = hf_vision.patch_tower(
            tower, "budget", layers=[cfg.vit_layer], keep=cfg.vit_keep, step_div=cfg.vit_step_div
        )
    try:
        # calls from several threads run one after another: the per-forward state is the handle's
        handle.hooks.append(model.register_forward_pre_hook(RefusePickle(_make_guard(handle, enter=True)), prepend=True))
        pruner.install()
        handle.hooks.append(mm.register_forward_pre_hook(RefusePickle(_make_mm_pre(handle)), with_kwargs=True))
        handle.hooks.append(lm.register_forward_hook(_make_lm_post(handle)))
        if cfg.method in ("random", "pool"):
            handle.hooks.append(mm.multi_modal_projector.register_forward_hook(_make_projector_hook(handle)))
        if model is not mm:
            handle.hooks.append(model.register_forward_pre_hook(RefusePickle(_make_top_pre(handle)), with_kwargs=True))
            handle.hooks.append(model.register_forward_hook(RefusePickle(_make_top_post(handle)), with_kwargs=True))
            if hasattr(model, EXPAND) and EXPAND not in model.__dict__:
                handle.expand = _make_expand(handle, getattr(model, EXPAND))
                model.__dict__[EXPAND] = handle.expand
        handle.hooks.append(model.register_forward_hook(RefusePickle(_make_guard(handle, enter=False)), always_call=True))
    except Exception:
        _remove(handle)
        raise
    model.__dict__[SAINT_ATTR] = handle
    return handle


def llm_schedule(cfg: Any, n_layers: int, llm_spec: MethodSpec | None = None
                 ) -> tuple[dict[int, hf_llm.Selector], tuple[int, ...]]:
    """The decoder pruner's schedule for SAINT's llm/hybrid modes (``llm_spec``: a
    SAINT-family method other than "saint", e.g. a calibration probe) or FastV, shared
    by every adapter that prunes inside a language model: ``{layer: selector}`` and
    the layers whose last-token query FastV reads."""
    schedule: dict[int, hf_llm.Selector] = {}
    query_layers: tuple[int, ...] = ()
    if cfg.method == "saint" and cfg.mode in ("llm", "hybrid"):
        start, end = cfg.llm_range()
        if end > n_layers - 2:
            raise ValueError(
                f"llm_layers=({start}, {end}): the language model has {n_layers} layers (0..{n_layers - 1}) and "
                f"pruning after the last one saves nothing; end must be <= {n_layers - 2}"
            )
        saint_cfg = SaintConfig(layers=list(range(start, end + 1)), tau=cfg.llm_tau, k=cfg.llm_k,
                                gamma=cfg.llm_gamma, rate=cfg.llm_rate)
        try:
            settings = saint_cfg.resolve(n_layers)
        except (TypeError, ValueError) as e:
            raise type(e)(f"llm settings: {e} (llm_tau/llm_k/llm_gamma)") from None
        saint_spec = llm_spec or get_method("saint")
        schedule = {i: _selector(saint_spec, s, saint_cfg) for i, s in settings.items()}
    elif cfg.method == "fastv":
        if cfg.fastv_layer > n_layers - 1:
            raise ValueError(
                f"fastv_layer={cfg.fastv_layer}: the language model has {n_layers} layers; the first layer that "
                f"sees the pruned sequence must be in 1..{n_layers - 1}"
            )
        fastv_spec, fastv_cfg = registry_config("fastv", layers=[cfg.fastv_layer - 1], ratio=cfg.fastv_ratio)
        schedule = {i: _selector(fastv_spec, s, fastv_cfg) for i, s in fastv_cfg.resolve(n_layers).items()}
        query_layers = (cfg.fastv_layer - 1,)
    return schedule, query_layers


def unpatch(model: torch.nn.Module) -> None:
    """Remove every hook and the tower patch: the model computes exactly what it did before."""
    handle = model.__dict__.pop(SAINT_ATTR)
    _remove(handle)


def _remove(handle: LlavaPatch) -> None:
    if handle.expand is not None and handle.model.__dict__.get(EXPAND) is handle.expand:
        del handle.model.__dict__[EXPAND]
    handle.expand = None
    for h in handle.hooks:
        h.remove()
    handle.hooks.clear()
    handle.pruner.remove()
    if handle.vision is not None:
        hf_vision.unpatch_tower(handle.vision.tower)
        handle.vision = None


# ---------------------------------------------------------------------------- checks
def _feature_layers(mm: torch.nn.Module) -> list[int]:
    v = mm.config.vision_feature_layer
    return [v] if isinstance(v, int) else list(v)


def _check_vit(mm: torch.nn.Module, cfg: LlavaPruneConfig) -> None:
    tower = mm.vision_tower
    if not hf_vision.matches(tower):
        raise TypeError(f"vit mode needs a CLIP or SigLIP vision tower, this LLaVA has {type(tower).__name__}")
    depth = len(tower.encoder.layers)
    if cfg.vit_layer >= depth:
        raise ValueError(f"vit_layer={cfg.vit_layer} is out of range: the vision tower has {depth} layers (0..{depth - 1})")
    n = int(tower.embeddings.num_patches)
    if cfg.vit_keep > n:
        raise ValueError(f"vit_keep={cfg.vit_keep} exceeds the {n} patches of the vision tower")
    for f in _feature_layers(mm):
        idx = f % (depth + 1)
        if idx <= cfg.vit_layer:
            raise ValueError(
                f"vision_feature_layer={f} (hidden state {idx}) is taken before vit_layer={cfg.vit_layer} prunes; "
                f"LLaVA would get the unpruned patches. Use vit_layer < {idx}"
            )


def _grid(mm: torch.nn.Module) -> int:
    vc = mm.config.vision_config
    return int(vc.image_size) // int(vc.patch_size)


def _check_grid(mm: torch.nn.Module, cfg: LlavaPruneConfig) -> None:
    g = _grid(mm)
    keep = cfg.grid_keep()
    if isinstance(keep, tuple):
        if keep[0] > g or keep[1] > g:
            raise ValueError(f"visual_keep={cfg.visual_keep} exceeds the {g}x{g} patch grid of the vision tower")
    elif keep > g * g:
        raise ValueError(f"visual_keep={keep} exceeds the {g * g} patches of the vision tower")


# ---------------------------------------------------------------------------- selectors
def _selector(spec: MethodSpec, settings: dict[str, Any], config: Any) -> hf_llm.Selector:
    """A registered method's selection over the image tokens of one decoder layer: the
    prunable tokens are packed (keys, last-query attention gathered to them), selected
    like any block's tokens, and the answer is scattered back to the layer's slots."""

    def select(ctx: hf_llm.PruneContext) -> torch.Tensor:
        idx, valid = keep_mask_to_indices(ctx.prunable)
        if idx.shape[1] == 0:
            return ctx.valid
        b, m = idx.shape
        keys = gather_tokens(ctx.keys(), idx) if spec.needs_keys else torch.zeros(b, m, 0, device=idx.device)
        query = (lambda: torch.gather(ctx.last_query_attention(), 1, idx)) if spec.needs_query_attention else None
        layer_ctx = LayerContext(keys=keys, num_protected=0, valid=valid, layer=ctx.layer, query_attention=query)
        keep = spec.select(layer_ctx, settings, config).keep
        dropped = torch.zeros_like(ctx.prunable).scatter(1, idx, valid & ~keep)
        return ~dropped

    return select


# ---------------------------------------------------------------------------- hooks
def _bind(fn: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments of a forward call, turned into keywords."""
    if not args:
        return dict(kwargs)
    names = [p for p in inspect.signature(fn).parameters if p != "self"]
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _make_guard(handle: LlavaPatch, enter: bool):
    """Hooks around the whole forward that hold the handle's lock (returning None, so
    they leave the call's arguments and output alone)."""
    def take(module: torch.nn.Module, args: tuple) -> None:
        handle.lock.acquire()

    def give(module: torch.nn.Module, args: tuple, output: Any) -> None:
        handle.lock.release()

    return take if enter else give


def _make_top_pre(handle: LlavaPatch):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        kwargs = _bind(type(module).forward, args, kwargs)
        labels = kwargs.get("labels")
        handle.pending_labels = None
        if labels is not None:
            labels = labels.clone()
            handle.pending_labels = labels
            kwargs["labels"] = labels
        return (), kwargs

    return hook


def _make_top_post(handle: LlavaPatch):
    from transformers.modeling_utils import slice_logits_to_keep

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        dropped = handle.fwd.dropped
        handle.fwd = _Forward()
        handle.pending_labels = None
        logits = getattr(output, "logits", None)
        if dropped is None or logits is None:
            return None
        d = slice_logits_to_keep(dropped[..., None], kwargs.get("logits_to_keep", 0))
        if d.shape[:-1] == logits.shape[:-1]:
            output.logits = logits.masked_fill(d.to(logits.device), float("nan"))
        return output

    return hook


def _flag(kwargs: dict[str, Any], mm: torch.nn.Module, name: str) -> bool:
    v = kwargs.get(name)
    return bool(v if v is not None else getattr(mm.config, name, False))


def _make_mm_pre(handle: LlavaPatch):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        kwargs = _bind(type(module).forward, args, kwargs)
        fwd = handle.fwd = _Forward(labels=handle.pending_labels)
        handle.pending_labels = None
        pruner = handle.pruner
        pruner.finish()
        input_ids = kwargs.get("input_ids")
        cache = kwargs.get("cache")
        past = int(cache.get_seq_length()) if cache is not None else 0
        mm_out = kwargs.get("mm_encoder_outputs") or {}
        has_images = kwargs.get("pixel_values") is not None or mm_out.get("image") is not None
        prompt = hf_llm.pruned_prompt_of(cache)
        if prompt is not None and prompt.owner != id(pruner):
            prompt = None
        if past > 0:
            if has_images or (input_ids is not None and bool((input_ids == handle.image_token_id).any())):
                raise ValueError(
                    "saint cannot add image tokens to a non-empty cache (multi-turn with a new image, chunked "
                    "prefill); run the prompt with its images on an empty cache"
                )
            if prompt is None:
                return (), kwargs
            return (), _continuation(handle, prompt, kwargs, past)
        if not has_images:
            return (), kwargs
        if input_ids is None:
            raise ValueError("saint locates images by image_token_id: pass input_ids, not inputs_embeds")
        if _flag(kwargs, module, "output_hidden_states") or _flag(kwargs, module, "output_attentions"):
            raise ValueError(
                "output_hidden_states / output_attentions would be misaligned with the pruned sequence; "
                "unpatch the model (saint.unpatch) to read them"
            )
        return (), _prefill(handle, module, kwargs, fwd)

    return hook


def _image_features(module: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run the (patched) tower + projector now, so the per-image feature counts are
    known before the image tokens are matched to them."""
    mm_out = dict(kwargs.get("mm_encoder_outputs") or {})
    if mm_out.get("image") is None:
        mm_out["image"] = module.get_image_features(
            pixel_values=kwargs["pixel_values"],
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
            image_sizes=kwargs.get("image_sizes"),
            return_dict=True,
        )
    kwargs = dict(kwargs, pixel_values=None, mm_encoder_outputs=mm_out)
    return kwargs


def _feature_counts(feats: Any) -> list[int]:
    if isinstance(feats, (list, tuple)):
        return [int(f.shape[0]) for f in feats]
    return [int(feats.shape[1])] * int(feats.shape[0])


def _make_expand(handle: LlavaPatch, original: Any):
    """``generate`` splits the image features per prompt by counting image tokens
    before it repeats them for beams / returned sequences; with a vision-side
    reduction it must count the tokens that will remain, not the processor's."""

    def expand(input_ids: Any, mm_encoder_output: Any, expand_size: int = 1, inputs_embeds: Any = None) -> Any:
        img = mm_encoder_output.get("image") if mm_encoder_output else None
        feats = getattr(img, "pooler_output", None)
        if input_ids is not None and feats is not None and input_ids.numel():
            per = _unpruned_count(handle.mm, None)
            keep0 = _shrink_plan(input_ids, _feature_counts(feats), handle.image_token_id, per)
            if keep0 is not None:
                input_ids = input_ids.masked_fill(~keep0, 0 if handle.image_token_id != 0 else 1)
        return original(input_ids, mm_encoder_output, expand_size=expand_size, inputs_embeds=inputs_embeds)

    return expand


def _unpruned_count(mm: torch.nn.Module, strategy: str | None) -> int:
    """Image tokens per image the processor emits for this LLaVA (unpruned features)."""
    tower = mm.vision_tower
    n = _grid(mm) ** 2 + (1 if getattr(tower.config, "model_type", "") == "clip_vision_model" else 0)
    strategy = strategy or mm.config.vision_feature_select_strategy
    return n - 1 if strategy == "default" else n


def _shrink_plan(input_ids: torch.Tensor, counts: list[int], image_token_id: int,
                 per: int | None = None) -> torch.Tensor | None:
    """Keep mask ``[B, L]`` that shrinks every image's run of ``per`` tokens (the
    processor's count) to its feature count; None when the counts already match."""
    is_img = input_ids == image_token_id
    total, n = int(is_img.sum()), len(counts)
    if total == sum(counts):
        return None
    if per is None and n and total % n == 0:
        per = total // n
    if n == 0 or per is None or total != per * n or max(counts) > per:
        raise ValueError(
            f"input_ids hold {total} image tokens (image_token_id={image_token_id}) for {n} image(s), but the "
            f"pruned vision tower yields {counts} features per image and the processor emits {per} tokens per "
            f"image; give every image either {per} tokens (saint shrinks them) or exactly its feature count"
        )
    b, length = input_ids.shape
    flat = is_img.reshape(-1)
    pos = flat.nonzero().squeeze(1)
    rows = pos // length
    if not torch.equal(rows[::per], rows[per - 1 :: per]):
        raise ValueError("the image tokens of one image span two prompts of the batch; check input_ids")
    k = torch.arange(total, device=input_ids.device)
    image_of, offset = k // per, k % per
    counts_t = torch.tensor(counts, device=input_ids.device)
    keep = torch.ones_like(flat)
    keep[pos] = offset < counts_t[image_of]
    return keep.reshape(b, length)


def _prefill(handle: LlavaPatch, module: torch.nn.Module, kwargs: dict[str, Any], fwd: _Forward) -> dict[str, Any]:
    cfg = handle.config
    input_ids = kwargs["input_ids"]
    b, length = input_ids.shape
    fwd.input_length = length
    image_id = handle.image_token_id
    if cfg.prunes_vit or cfg.method in ("random", "pool"):
        kwargs = _image_features(module, kwargs)
        feats = kwargs["mm_encoder_outputs"]["image"].pooler_output
        per = _unpruned_count(module, kwargs.get("vision_feature_select_strategy"))
        keep0 = _shrink_plan(input_ids, _feature_counts(feats), image_id, per)
    else:
        keep0 = None
    if keep0 is not None:
        if getattr(kwargs.get("cache"), "is_compileable", False):
            raise ValueError(
                "a static cache sizes its masks for the processor's prompt, which the vision-side token "
                "reduction shortens; use a dynamic cache (the default) with this method"
            )
        kwargs = _shrink_inputs(kwargs, keep0, fwd, image_id)
        input_ids = kwargs["input_ids"]
    image = input_ids == image_id
    if fwd.valid0 is not None:
        image &= fwd.valid0
    fwd.tower_counts = image.sum(dim=1).cpu()
    handle.pruner.begin_prefill(image)
    return kwargs


def _shrink_inputs(kwargs: dict[str, Any], keep0: torch.Tensor, fwd: _Forward, image_id: int) -> dict[str, Any]:
    """Drop the surplus image tokens of every image (input_ids, attention mask,
    contiguous positions), right-aligning rows that lost different amounts."""
    input_ids = kwargs["input_ids"]
    b, length = input_ids.shape
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        raise ValueError(
            "a 4-D attention mask cannot follow the vision-side token reduction; pass a 2-D attention_mask "
            "(and a dynamic cache)"
        )
    src, valid = keep_mask_to_indices(keep0, align="right")
    fill = 0 if image_id != 0 else 1
    new_ids = torch.gather(input_ids, 1, src).masked_fill(~valid, fill)
    removed_at = (~keep0).long()
    removed_before = removed_at.cumsum(1) - removed_at
    pos = kwargs.get("position_ids")
    pos = torch.arange(length, device=input_ids.device).expand(b, length) if pos is None else pos.expand(b, length)
    new_pos = (torch.gather(pos, 1, src) - torch.gather(removed_before, 1, src)).masked_fill(~valid, 0)
    if mask is not None:
        new_mask = torch.gather(mask, 1, src).masked_fill(~valid, 0)
    elif not bool(valid.all()):
        new_mask = valid.long()
    else:
        new_mask = None
    fwd.src0, fwd.valid0, fwd.removed = src, valid, removed_at.sum(dim=1)
    return dict(kwargs, input_ids=new_ids, attention_mask=new_mask, position_ids=new_pos)


def _continuation(handle: LlavaPatch, prompt: hf_llm.PrunedPrompt, kwargs: dict[str, Any], past: int) -> dict[str, Any]:
    """Map a decoding step's 2-D mask and positions to the shortened prompt."""
    handle.pruner.begin_continuation(prompt)
    src0 = prompt.extra.get("src0")
    if src0 is None:
        return kwargs
    valid0, removed = prompt.extra["valid0"], prompt.extra["removed"]
    x = kwargs.get("input_ids")
    x = kwargs["inputs_embeds"] if x is None else x
    b, q = x.shape[:2]
    length0, lengthp = prompt.input_length, prompt.length
    t = past - lengthp
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != length0 + t + q:
            raise ValueError(
                f"attention_mask of shape {tuple(mask.shape)} does not continue the pruned prompt of {length0} "
                f"input tokens + {t} generated; pass the full 2-D mask of the sequence so far (no 4-D masks or "
                "static caches with a vision-side reduction)"
            )
        head = torch.gather(mask[:, :length0], 1, src0).masked_fill(~valid0, 0)
        mask = torch.cat([head, mask[:, length0:]], dim=1)
    elif not bool(valid0.all()):
        mask = torch.cat([valid0.long(), valid0.new_ones(b, t + q, dtype=torch.long)], dim=1)
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(length0 + t, length0 + t + q, device=x.device).expand(b, q)
    pos = pos.expand(b, q) - removed[:, None].to(pos.device)
    return dict(kwargs, attention_mask=mask, position_ids=pos)


def _make_lm_post(handle: LlavaPatch):
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        pruner = handle.pruner
        if pruner.phase != "prefill":
            pruner.finish()
            return None
        fwd = handle.fwd
        final = pruner.final_stage
        assert final is not None
        counts = [*pruner.counts, final.image.sum(dim=1).cpu()]
        names = [f"language_model.layers.{i}" for i in range(len(pruner.counts))] + ["language_model.norm"]
        tower = fwd.tower_counts if fwd.tower_counts is not None else counts[0]
        handle.last_stats = TokenStats(["vision_tower", *names], [tower.tolist(), *[c.tolist() for c in counts]])
        reduced = fwd.src0 is not None
        prompt = pruner.pruned_prompt()
        prompt.input_length = fwd.input_length
        prompt.extra = {"src0": fwd.src0, "valid0": fwd.valid0, "removed": fwd.removed}
        hf_llm.attach_prompt(pruner.cache, prompt if (reduced or pruner.dropped_any) else None)
        pruner.finish()
        handle.kept_input = None
        if not (reduced or pruner.dropped_any):
            return None
        hidden = output.last_hidden_state
        length0 = fwd.input_length
        in_pos, real = final.idx, final.valid
        if reduced:
            in_pos = torch.gather(fwd.src0, 1, final.idx)
            real = real & torch.gather(fwd.valid0, 1, final.idx)
        target = torch.where(real, in_pos, length0)
        b, _, c = hidden.shape
        out = hidden.new_zeros(b, length0 + 1, c).scatter_(1, target[..., None].expand(-1, -1, c), hidden)
        kept = torch.zeros(b, length0 + 1, dtype=torch.bool, device=hidden.device).scatter_(1, target, True)
        kept = kept[:, :length0]
        output.last_hidden_state = out[:, :length0]
        fwd.dropped = ~kept
        handle.kept_input = kept
        if fwd.labels is not None:
            fwd.labels[:, 1:].masked_fill_(fwd.dropped[:, :-1].to(fwd.labels.device), -100)
        return output

    return hook


def _make_projector_hook(handle: LlavaPatch):
    """Random subset / adaptive pooling of the projected patch grid (CLS, when the
    feature strategy keeps it, stays in front)."""
    cfg = handle.config
    g = _grid(handle.mm)
    if cfg.method == "random":
        spec, reduce_cfg = registry_config("subset", keep=cfg.grid_keep(), seed=cfg.seed)
    else:
        rows, cols = cfg.grid_keep()  # type: ignore[misc]
        spec, reduce_cfg = registry_config("pool", rows=rows, cols=cols)
    reduce = spec.reduce
    assert reduce is not None

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        n, p, c = output.shape
        if p == g * g:
            head, grid = output[:, :0], output
        elif p == g * g + 1:
            head, grid = output[:, :1], output[:, 1:]
        else:
            raise ValueError(f"the projector produced {p} tokens per image, not a {g}x{g} patch grid (+ CLS)")
        return torch.cat([head, reduce(grid, g, reduce_cfg)], dim=1)

    return hook


# ---------------------------------------------------------------------------- protocol
class LlavaProbe(Probe):
    """The decoder layers of a LLaVA's language model, restricted to the image tokens
    (found per sample from ``image_token_id``). Keys are read pre-RoPE at ``k_proj`` and
    averaged over KV heads; there is no class token."""

    num_prefix = 0
    has_cls = False

    def __init__(self, model: torch.nn.Module, sites: list[Site]) -> None:
        self.sites = sites
        self.image_token_id = int(model.config.image_token_id)
        self.image_mask: torch.Tensor | None = None

    def begin(self, inputs: Any) -> None:
        self.image_mask = inputs["input_ids"] == self.image_token_id

    def hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        return [self.sites[i].attn.k_proj.register_forward_hook(save_output(store, "k"))]

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """The image tokens of ``t [B, N, ...]`` as ``[B, M, ...]`` (M equal per sample)."""
        mask = self.image_mask
        counts = mask.sum(dim=1)
        if int(counts.min()) != int(counts.max()) or int(counts.min()) < 2:
            raise ValueError(f"every prompt of a batch needs the same number (>= 2) of image tokens, got {counts.tolist()}")
        return t[mask].reshape(t.shape[0], int(counts[0]), *t.shape[2:])

    def qk(self, i: int, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        k = store.pop("k")
        b, n, c = k.shape
        h = self.sites[i].heads
        k = self.select(k).reshape(b, -1, h, c // h)
        return k, k  # queries are not used: no class token here

    def hidden(self, output: Any) -> torch.Tensor:
        return self.select(super().hidden(output))


def _mm(model: torch.nn.Module) -> torch.nn.Module:
    return model.model if isinstance(model, _llava_classes()[0]) else model


class Llava(Adapter):
    """LLaVA: sites are the language model's decoder layers (the vision tower is an
    :class:`~saint.adapters.hf_vision.HFVision` model of its own); inputs are
    processor-output dicts (``input_ids``, ``pixel_values``, ``attention_mask``)."""

    name = "llava"
    tau_setting = "llm_tau"

    matches = staticmethod(matches)  # the module's functions: one implementation
    patch = staticmethod(patch)
    unpatch = staticmethod(unpatch)

    def sites(self, model: torch.nn.Module) -> list[Site]:
        lm = _mm(model).language_model
        out = []
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            heads = int(attn.config.num_key_value_heads)
            out.append(Site(i, f"language_model.layers.{i}", layer, attn, heads, float(attn.scaling)))
        return out

    def protected(self, model: torch.nn.Module) -> int:
        return 0

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        vc = _mm(model).config.vision_config
        g, p = _grid(_mm(model)), int(vc.patch_size)
        return Grid(g, g, (p, p))

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float) -> float:
        """One decoder layer on ``n_in`` tokens (pruning follows the layer): q/o and the
        grouped k/v projections, attention, and the gated MLP (3 matmuls)."""
        cfg = _mm(model).language_model.config
        d, inter = int(cfg.hidden_size), int(cfg.intermediate_size)
        kv = int(cfg.num_key_value_heads) * int(getattr(cfg, "head_dim", None) or d // int(cfg.num_attention_heads))
        return 2 * n_in * (2 * d * d + 2 * d * kv) + 4 * n_in * n_in * d + 2 * n_in * 3 * d * inter

    def probe(self, model: torch.nn.Module) -> Probe:
        return LlavaProbe(model, self.sites(model))



    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        return model(**inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next-token logits of every prompt (its last position is never dropped)."""
        out = self.forward(model, inputs)
        logits = getattr(out, "logits", None)
        return (out.last_hidden_state if logits is None else logits)[:, -1], None

    def check_inputs(self, inputs: Any) -> None:
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise ValueError("LLaVA takes batches of processor outputs (dicts with input_ids, pixel_values)")

    def batch_size(self, inputs: Any) -> int:
        return int(inputs["input_ids"].shape[0])

    def split(self, inputs: Any, size: int) -> Any:
        b = self.batch_size(inputs)
        px = inputs.get("pixel_values")
        if px is not None and px.shape[0] != b and size < b:
            raise ValueError(f"{px.shape[0]} images for {b} prompts: split batches need one image per prompt")
        for start in range(0, b, size):
            yield {k: (v[start : start + size] if isinstance(v, torch.Tensor) and v.shape[:1] == (b,) else v)
                   for k, v in inputs.items()}

    def to(self, inputs: Any, device: torch.device, dtype: torch.dtype) -> Any:
        return batch_to(inputs, device, dtype)


ADAPTER = Llava()

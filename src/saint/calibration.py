"""Threshold calibration: pick SAINT's ``tau`` (one global value, or one per layer)
from the model's own key similarities on a few images so that the pruned model hits a
target: ``flops_speedup`` (the real-token FLOPs-ideal speed-up, = 1 / FLOPs fraction,
what the tokens each image keeps cost; ``speedup`` is the old name of it), ``flops``
(FLOPs fraction), ``keep`` (kept-token fraction), or ``measured_speedup`` (wall-clock
speed-up of the patched model over the unpatched one, timed at ``batch_size`` on the
model's device).

Why: key similarity is model dependent (the paper's ``tau=0.75`` halves DINOv2-S/14's
patches in every early block regardless of content), so a fixed tau is a trap. Calibration is deterministic
(bisection on a monotone quantity, no timing) and its result is stored in the patch
config as explicit per-layer taus, so the pruned model is reproducible without it.

* ``mode="global"``: bisection on one tau for every pruning layer.
* ``mode="per_layer"``: bisection on a drop fraction ``f``; each layer's tau is the
  ``1 - f`` quantile (over the calibration set) of every candidate's k-th largest
  similarity to the anchors, measured on the already-pruned stream. Since a
  candidate is redundant exactly when that k-th similarity reaches tau, every layer
  flags about the same share ``f`` of its candidates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .adapters import Adapter, find_adapter, handle_of
from .adapters.base import vit_block_flops
from .adapters.common import Runs
from .api import is_patched, patch, unpatch
from .core import best_matches, prunable_valid, reduce_similarity, split_candidates
from .methods import (
    PROBE_SUFFIX,
    LayerContext,
    MatchConfig,
    MethodSpec,
    SaintConfig,
    Selection,
    get_method,
    is_integer,
    is_real,
    make_config,
    method_settings,
    saint_metric,
)
from .timing import Timing, allocator_settings, paired_speedup, time_round_robin

TARGETS = ("flops_speedup", "measured_speedup", "flops", "keep")


class CalibrationWarning(UserWarning):
    """The calibration target could not be reached; the closest value was used."""
MODES = ("global", "per_layer")


@dataclass
class Calibration:
    """The outcome of :func:`calibrate`; ``patch_kwargs()`` reproduces the pruned model."""

    method: str
    mode: str
    target: str
    value: float
    achieved: float
    tau: dict[int, float]
    settings: dict[str, Any]
    num_images: int
    iterations: int
    history: list[tuple[float, float]] = field(default_factory=list)
    tau_setting: str = "tau"  # the patch keyword that carries tau (LLaVA: "llm_tau")
    per_layer: dict[str, dict[int, float]] = field(default_factory=dict)  # other calibrated settings (saint_match)
    reached: bool = True  # False: the target is out of reach; ``achieved`` is the closest value found
    measured: dict[str, Any] | None = None  # measured_speedup: timing batch, device and each step's times
    inflection: float = 0.0  # saint_match: the merge schedule's slope the per-layer fractions were fitted to
    provenance: dict[str, Any] | None = None  # saint calibrate: the model, photos, command, date and versions

    def patch_kwargs(self) -> dict[str, Any]:
        return {**self.settings, self.tau_setting: dict(self.tau), **{k: dict(v) for k, v in self.per_layer.items()}}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """Read back :meth:`to_json`'s text (e.g. ``saint calibrate --json``'s file), block
        indices as integers again, so ``patch_kwargs()`` reproduces the pruned model."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"not a saint calibration: expected a JSON object, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        unknown = sorted(set(data) - {f.name for f in fields})
        missing = [f.name for f in fields if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in data]
        if unknown or missing:
            raise ValueError(f"not a saint calibration: unknown fields {unknown}, missing fields {missing}")
        data["tau"] = _by_block(data["tau"])
        data["per_layer"] = {name: _by_block(d) for name, d in data.get("per_layer", {}).items()}
        # a per-block setting given as a dict (``k={0: 2, 1: 4}``) came back with string keys
        data["settings"] = {name: {int(k): v for k, v in value.items()} if isinstance(value, dict) else value
                            for name, value in data.get("settings", {}).items()}
        data["history"] = [tuple(h) for h in data.get("history", [])]
        return cls(**data)


def plain(value: Any) -> Any:
    """``value`` in Python's own types (NumPy's and torch's scalars and arrays as numbers and
    lists, recursively), as JSON writes it and a calibration stores its settings."""
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)):
        return value.tolist() if value.ndim else value.item()
    return value


def _by_block(values: dict[str, float]) -> dict[int, float]:
    """``{"3": 0.9}`` (a JSON object's string keys) -> ``{3: 0.9}``."""
    return {int(k): float(v) for k, v in values.items()}


class _StopForward(Exception):
    """Raised after the last pruning layer: later blocks cannot change token counts."""


block_flops = vit_block_flops  # FLOPs of one ViT block (kept under its old name)


def flops_fraction(model: torch.nn.Module, tokens: Sequence[float], select_at: str | None = None,
                   leaving: float | None = None) -> float:
    """Analytic FLOPs of the sites with ``tokens[i]`` entering site i and ``leaving``
    tokens leaving the last one (None: as many as enter it), relative to no pruning
    (``tokens[0]`` everywhere), from the model's adapter, the selection acting at
    ``select_at`` (None: the patched model's setting, ``"mlp"`` unpatched). Patch
    embedding and head are ignored."""
    adapter = find_adapter(model)
    n0 = tokens[0]
    out = [*tokens[1:], tokens[-1] if leaving is None else leaving]
    pruned = sum(adapter.block_flops(model, n_in, n_out, select_at) for n_in, n_out in zip(tokens, out, strict=True))
    return pruned / (len(tokens) * adapter.block_flops(model, n0, n0, select_at))


def _quantile_probe(base: MethodSpec, fraction: float, taus: dict[int, float]) -> MethodSpec:
    """A SAINT spec whose tau at each layer is the quantile that flags ``fraction`` of
    the candidates; the taus it chose are written into ``taus``."""

    def select(ctx: LayerContext, s: dict[str, Any], cfg: SaintConfig) -> Selection:
        metric = saint_metric(ctx, cfg)[:, ctx.num_protected :]
        valid = ctx.valid[:, ctx.num_protected :] if ctx.valid is not None else None
        a, anc, va, vb = split_candidates(metric, prunable_valid(valid, *metric.shape[:2], metric.device))
        k = min(s["k"], anc.shape[1])
        kth = a.new_empty(0)
        if k > 0 and a.shape[1] > 0:  # else too few tokens are left to pair: nothing to flag
            (kth,) = reduce_similarity(a, anc, vb, lambda sim: (sim.topk(k, dim=-1).values[..., -1],))
            kth = kth[va]
            kth = kth[torch.isfinite(kth)]
        if fraction <= 0 or kth.numel() == 0:
            tau = 1.0
        else:
            tau = max(-1.0, min(1.0, quantile_between(kth, max(0.0, 1.0 - fraction))))
        taus[ctx.layer] = tau
        return base.select(ctx, {**s, "tau": tau}, cfg)

    return dataclasses.replace(base, name=base.name + PROBE_SUFFIX, select=select)


def merge_ramp(layers: Sequence[int], inflection: float) -> dict[int, float]:
    """ToMe's ``(r, inflection)`` schedule as weights on a mean ``r``: a straight line over
    ``layers`` from ``1 - inflection`` to ``1 + inflection`` (mean 1; negative inflection
    merges more in early layers; one layer gets weight 1)."""
    if not is_real(inflection) or not -1.0 <= inflection <= 1.0:
        raise ValueError(f"inflection={inflection!r} must be a number in [-1, 1] (ToMe's schedule slope)")
    layers = sorted(layers)
    n = len(layers)
    if n == 1:
        return {layers[0]: 1.0}
    return {layer: 1.0 - inflection + 2.0 * inflection * i / (n - 1) for i, layer in enumerate(layers)}


def _median_probe(base: MethodSpec, r: float, taus: dict[int, float], fractions: dict[int, float],
                  ramp: dict[int, float] | None = None) -> MethodSpec:
    """A saint_match spec whose tau at each layer is the median best-match cosine of the
    candidates (over the whole calibration batch) and whose fraction makes the images
    merge ``r`` tokens each on average (times the layer's ``ramp`` weight, see
    :func:`merge_ramp`), capped at 1 (a layer whose flagged candidates
    fall short of ``r`` merges them all, never unflagged ones: uncapped, the late layers
    of a 3x target merged every candidate and the images collapsed, DINOv2-S 224px
    centered cos 0.48 vs 0.73 capped); both are written into ``taus`` / ``fractions``."""

    def select(ctx: LayerContext, s: dict[str, Any], cfg: MatchConfig) -> Selection:
        best, _, valid = best_matches(ctx.keys, ctx.num_protected, ctx.valid)
        tau = quantile_between(best[valid], 0.5)
        redundant = ((best >= tau) & valid).sum(dim=1).double().mean() if best.shape[0] else 0.0
        r_layer = r * (ramp or {}).get(ctx.layer, 1.0)
        fraction = min(1.0, float(r_layer / redundant)) if r_layer > 0 and redundant > 0 else 0.0
        taus[ctx.layer], fractions[ctx.layer] = tau, fraction
        return base.select(ctx, {**s, "tau": tau, "fraction": fraction}, cfg)

    return dataclasses.replace(base, name=base.name + PROBE_SUFFIX, select=select)


def quantile_between(values: torch.Tensor, q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation), except where that lands on one
    of the values: then the mean of it and the value below it, which flags the same values
    (the rules keep those at or above a threshold) while none sits on the threshold, where
    the rounding of a batch or of a lone image would decide (a calibration photo's token
    counts then differed between the two). 1.0 for no values."""
    n = values.numel()
    if n == 0:
        return 1.0
    v = values.double().flatten().sort().values
    pos = q * (n - 1)
    lo = int(pos)
    if pos > lo:
        return float(v[lo] + (pos - lo) * (v[lo + 1] - v[lo]))
    return float(v[lo]) if lo == 0 else float((v[lo - 1] + v[lo]) / 2)


def _measure(adapter: Adapter, model: torch.nn.Module, inputs: Any, batch_size: int, last_layer: int
             ) -> list[float]:
    """Mean tokens entering each site over ``inputs``, and last the mean leaving the last
    site (a pruning step in the last block shrinks its MLP); sites after the last pruning
    one are not run (their counts equal the count leaving ``last_layer``)."""
    sites = adapter.sites(model)
    depth = len(sites)
    after: list[torch.Tensor] = []

    def leaving(module: torch.nn.Module, args: Any, output: Any) -> None:
        after.append(handle_of(model).tokens_after(output))
        if last_layer + 1 < depth:
            raise _StopForward

    hook = sites[last_layer].block.register_forward_hook(leaving)
    totals = torch.zeros(depth + 1, dtype=torch.float64)
    try:
        with torch.no_grad():
            for batch in adapter.split(inputs, batch_size):
                after.clear()
                try:
                    adapter.forward(model, batch)
                except _StopForward:
                    pass
                counts = handle_of(model).site_tokens()[: last_layer + 1] + after
                runs = getattr(handle_of(model), "runs", None)
                if isinstance(runs, Runs):  # the stopped call is no forward of the user's (token_mask, stats)
                    runs.abandon()
                per_block = [float(c.sum()) for c in counts]
                per_block += [per_block[-1]] * (depth + 1 - len(per_block))
                totals += torch.tensor(per_block, dtype=torch.float64)
    finally:
        hook.remove()
    return (totals / adapter.batch_size(inputs)).tolist()


def _target(**given: float | None) -> tuple[str, float]:
    """The one target given (``speedup`` is ``flops_speedup``'s old name), checked."""
    chosen = [(k, v) for k, v in given.items() if v is not None]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one target of {TARGETS}, got {[k for k, _ in chosen] or 'none'}")
    target, value = chosen[0]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{target}={value!r} must be a number")
    target = "flops_speedup" if target == "speedup" else target
    if not math.isfinite(value):
        raise ValueError(f"{target}={value} must be a finite number")
    if target in ("flops_speedup", "measured_speedup") and not value > 1.0:
        raise ValueError(f"{target}={value} must be > 1 (a speed-up of 1 prunes nothing: leave the model unpatched)")
    if target in ("flops", "keep") and not 0.0 < value < 1.0:
        raise ValueError(f"{target}={value} must be in (0, 1) (1 prunes nothing: leave the model unpatched)")
    return target, value


def check_calibratable(method: str | MethodSpec, mode: str) -> tuple[MethodSpec, bool]:
    """The method's spec and whether it is ``saint_match``'s kind (tau and fraction per
    layer), or a clear error where calibration cannot choose its settings."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    spec = get_method(method)
    matched = issubclass(spec.config_cls, MatchConfig)
    if not (matched or issubclass(spec.config_cls, SaintConfig)):
        raise ValueError(f"calibration picks tau; method {spec.name!r} has none "
                         "(use 'saint', 'saint_fold', 'saint_plus' or 'saint_match')")
    if matched and mode != "per_layer":
        raise ValueError(f"{spec.name} calibrates tau and fraction per layer (mode='per_layer'), not mode={mode!r}")
    return spec, matched


def _check_search(mode: str, tol: float, max_iter: int, batch_size: int) -> None:
    """Reject search settings that cannot work, naming the value."""
    for name, v in (("max_iter", max_iter), ("batch_size", batch_size)):
        if not is_integer(v) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    if not is_real(tol) or not 0 < tol < 1:
        raise ValueError(f"tol={tol!r} must be a number in (0, 1) (relative distance to the target)")


def calibrate(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    flops_speedup: float | None = None,
    measured_speedup: float | None = None,
    flops: float | None = None,
    keep: float | None = None,
    speedup: float | None = None,
    mode: str = "per_layer",
    method: str = "saint",
    tol: float = 0.01,
    max_iter: int = 30,
    batch_size: int = 32,
    apply: bool = True,
    patch_settings: dict[str, Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    inflection: float = 0.0,
    **settings: Any,
) -> Calibration:
    """Choose tau for ``method`` ("saint", "saint_fold", "saint_plus"; for "saint_match" tau
    and fraction per layer, the README's recommendation) so the pruned model hits one
    target on ``images`` (a ``[N, 3, H, W]`` batch; for LLaVA a processor-output dict,
    calibrating ``llm_tau`` of ``mode="llm"``/``"hybrid"``): ``flops_speedup`` (real-token
    FLOPs-ideal, = 1 / FLOPs fraction; ``speedup`` is its old name), ``flops`` (fraction of
    the unpruned block FLOPs), ``keep`` (mean fraction of tokens entering each block) or
    ``measured_speedup`` (wall-clock speed-up over the unpatched model, timed on a batch of
    ``batch_size`` of ``images`` on the model's device; see :func:`_calibrate_measured`).
    Other settings (``k``, ``gamma``, ``layers``, ``rate`` ...)
    are passed through; ``patch_settings`` passes settings whose names are taken here
    (LLaVA's ``mode``: ``patch_settings={"mode": "llm"}``). ``clock`` times a
    ``measured_speedup`` target (wall time by default; ``time.process_time`` counts this
    process's CPU time, robust to other load on a shared machine). ``inflection`` (saint_match
    only) shapes the mean merges per layer like ToMe's ``(r, inflection)`` schedule (see
    :func:`merge_ramp`; -0.5 merges 1.5x the mean in the first layer and 0.5x in the last);
    0 asks every layer for the same mean. With ``apply`` the model is
    left patched with the result. A target out of reach on ``images`` gives a
    :class:`CalibrationWarning` and ``reached=False`` with the closest value found; on an
    error the model is left exactly as it was (unpatched, same train/eval mode).
    """
    given = settings
    settings = {**(patch_settings or {}), **settings}
    target, value = _target(flops_speedup=flops_speedup, measured_speedup=measured_speedup, flops=flops, keep=keep,
                            speedup=speedup)
    _check_search(mode, tol, max_iter, batch_size)
    spec, matched = check_calibratable(method, mode)
    adapter = find_adapter(model)
    if is_patched(model):
        raise ValueError("the model is already patched by saint; unpatch it before calibrating")
    tau_name = adapter.tau_setting
    if tau_name in settings:
        raise ValueError(f"calibration chooses {tau_name} itself; do not pass {tau_name}")
    if matched and (mode != "per_layer" or tau_name != "tau" or "fraction" in settings):
        raise ValueError("saint_match calibrates tau and fraction per layer of a vision model "
                         "(mode='per_layer', no tau/fraction given)")
    if inflection != 0.0 and not matched:
        raise ValueError(f"inflection shapes saint_match's merge schedule; method {method!r} has none")
    adapter.check_inputs(images)
    num_images = adapter.batch_size(images)
    if target == "measured_speedup":
        return _calibrate_measured(
            model, images, value, dict(mode=mode, method=method, tol=tol, max_iter=max_iter, batch_size=batch_size,
                                       inflection=inflection, patch_settings=patch_settings, **given),
            batch_size, apply, clock=clock,
        )
    goal = 1.0 / value if target == "flops_speedup" else value

    def quantity(measured: list[float]) -> float:
        """The target's quantity from :func:`_measure`'s counts (entering each site, then leaving the last)."""
        tokens, leaving = measured[:-1], measured[-1]
        if target == "keep":
            return sum(tokens) / (len(tokens) * tokens[0])
        return flops_fraction(model, tokens, leaving=leaving)

    def run(x: float) -> tuple[float, dict[str, dict[int, float]]]:
        """Patch for bisection point ``x``; return the quantity and the per-layer settings
        used (``{"tau": ..., "fraction": ...}``)."""
        if mode == "global":
            patch(model, method, **settings, **{tau_name: x})
            taus = dict.fromkeys(handle_of(model).pruning_sites, x)
            return quantity(_measure(adapter, model, images, batch_size, max(taus))), {"tau": taus}
        taus: dict[int, float] = {}
        fractions: dict[int, float] = {}
        if matched:  # the probe chooses both per layer; the values given here are placeholders
            patch(model, _median_probe(spec, (1.0 - x) * max_r, taus, fractions, ramp), **settings, tau=0.0,
                  fraction=0.0)
        else:
            patch(model, _quantile_probe(spec, 1.0 - x, taus), **settings)
        # one batch: each layer's quantile is taken over the whole calibration set
        q = quantity(_measure(adapter, model, images, num_images, max(handle_of(model).pruning_sites)))
        return q, {"tau": taus, "fraction": fractions} if matched else {"tau": taus}

    max_r = adapter.max_patches(model, images) / 2 if matched else 0.0  # all candidates of the first layer
    ramp = None
    if matched:
        layers = make_config(spec, **method_settings(settings), tau=0.0, fraction=0.0)[1].resolve(len(adapter.sites(model)))
        ramp = merge_ramp(list(layers), inflection)
    was_training = model.training
    model.eval()
    try:
        best, history = _bisect(run, goal, tol, max_iter, mode)
        chosen = {name: {int(k): float(v) for k, v in values.items()} for name, values in best[2].items()}
        taus = chosen.pop("tau")
        per_layer = chosen
        # measure the fixed taus (what the user will run)
        patch(model, method, **settings, **{tau_name: taus}, **per_layer)
        achieved_q = quantity(_measure(adapter, model, images, batch_size, max(taus)))
    except BaseException:
        if is_patched(model):  # a failed calibration leaves the model as it found it
            unpatch(model)
        raise
    finally:
        model.train(was_training)
    result = Calibration(
        method=method,
        mode=mode,
        target=target,
        value=float(value),
        achieved=float(1.0 / achieved_q if target == "flops_speedup" else achieved_q),
        tau=taus,
        settings=plain(settings),
        num_images=num_images,
        iterations=len(history),
        history=history,
        tau_setting=tau_name,
        per_layer=per_layer,
        reached=bool(abs(achieved_q - goal) <= tol * goal),  # what runs at batch_size (a batch vote depends on it)
        inflection=float(inflection),
    )
    if not result.reached:
        warnings.warn(
            f"calibration cannot reach {target}={value:g} on these images: the closest it gets is "
            f"{result.achieved:.4g} (tau {_fmt_taus(taus)}); "
            + ("the model is patched with that" if apply else "the model is left unpatched"),
            CalibrationWarning,
            stacklevel=2,
        )
    if apply:
        handle_of(model).calibration = result
    else:
        unpatch(model)
    return result


MEASURED_TOL = 0.05  # width of the band above a measured speed-up target the search aims into
MEASURED_STEPS = 5  # FLOPs targets tried at most
MEASURED_REPEATS = 5  # timed rounds per FLOPs target (after one warm-up round)


def band_distance(measured: float, value: float, tol: float = MEASURED_TOL) -> float:
    """How far a measured speed-up is from the band ``[value, value * (1 + tol)]`` (0 inside
    it): the search's yardstick, so that a calibration lands at or just above its target."""
    if measured < value:
        return value - measured
    return max(0.0, measured - value * (1.0 + tol))


def search_measured(value: float, attempt: Callable[[float], tuple[float, bool]],
                    steps: int = MEASURED_STEPS, tol: float = MEASURED_TOL) -> tuple[int, list[tuple[float, float, bool]]]:
    """Find the FLOPs target whose measured speed-up lands in ``[value, value * (1 + tol)]``.

    ``attempt(s)`` calibrates the real-token FLOPs target ``s`` and times it: ``(measured
    speed-up, whether s was reached)``. Each next target moves ``s`` by the ratio still
    missing to the band's middle (``s <- s * value * (1 + tol / 2) / measured``); the search
    stops in the band, when a FLOPs target was out of reach and its speed-up still short of
    ``value`` (pruning cannot go further), or after ``steps`` targets. Returns the index of
    the attempt closest to the band (the first on ties) and every attempt as ``(s,
    measured, reached)``. Aiming into the band rather than within ``tol`` either side
    keeps the search's own error from adding to a slow landing."""
    aim = value * (1.0 + tol / 2.0)
    tried: list[tuple[float, float, bool]] = []
    s = aim
    for _ in range(steps):
        measured, reached = attempt(s)
        tried.append((s, measured, reached))
        if band_distance(measured, value, tol) == 0.0 or (not reached and measured < value):
            break
        s = max(1.0, s * aim / measured)
    best = min(range(len(tried)), key=lambda i: (band_distance(tried[i][1], value, tol), i))
    return best, tried


def _calibrate_measured(model: torch.nn.Module, images: Any, value: float, flops_kwargs: dict[str, Any],
                        batch_size: int, apply: bool, repeats: int = MEASURED_REPEATS,
                        clock: Callable[[], float] = time.perf_counter) -> Calibration:
    """Calibrate to a measured speed-up: calibrate real-token FLOPs targets, time each
    result against the unpatched model on a ``batch_size`` batch of ``images`` (repeated
    cyclically when there are fewer; ``repeats`` round-robin rounds, the median of each
    round's unpatched / patched time, see :func:`saint.timing.paired_speedup`), and move
    the FLOPs target until the measured speed-up lands in ``[value, 1.05 * value]`` (see
    :func:`search_measured`; at most 5 FLOPs targets). It warns when the closest step is
    more than 5% from ``value``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError("measured_speedup times a batch of images; give an [N, 3, H, W] tensor "
                        "(for VLMs calibrate flops_speedup and time with saint bench)")
    device = next(model.parameters()).device
    batch = images[torch.arange(batch_size) % images.shape[0]].to(device)
    calibrations: list[Calibration] = []

    def attempt(s: float) -> tuple[float, bool]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            cal = calibrate(model, images, flops_speedup=s, apply=False, **flops_kwargs)
        calibrations.append(cal)
        return _time_speedup(model, batch, cal, repeats, clock), cal.reached

    best, tried = search_measured(value, attempt)
    steps = [{"flops_speedup": c.achieved, "measured_speedup": m, "reached": r}
             for c, (_, m, r) in zip(calibrations, tried, strict=True)]
    measured, cal = tried[best][1], calibrations[best]
    result = dataclasses.replace(
        cal, target="measured_speedup", value=float(value), achieved=float(measured),
        reached=bool(abs(measured - value) <= MEASURED_TOL * value),
        measured={"batch_size": batch_size, "device": str(device), "repeats": repeats, "tolerance": MEASURED_TOL,
                  "band": [float(value), float(value) * (1.0 + MEASURED_TOL)],
                  "statistic": "median of per-round unpatched / patched time",
                  "clock": "process CPU time" if clock is time.process_time else "wall time",
                  # the allocator variables it timed under: on a CPU they move the speed-up (docs/calibration.md)
                  "allocator": allocator_settings() or "default",
                  "flops_speedup": cal.achieved, "steps": steps},
    )
    if not result.reached:
        warnings.warn(
            f"calibration cannot reach measured_speedup={value:g} at batch {batch_size} on {device}: the closest "
            f"it gets is {measured:.3g}; " + ("the model is patched with that" if apply else "the model is left unpatched"),
            CalibrationWarning,
            stacklevel=3,
        )
    if apply:
        patch(model, result.method, **result.patch_kwargs())
        handle_of(model).calibration = result
    return result


def time_calibration(model: torch.nn.Module, batch: torch.Tensor, cal: Calibration, repeats: int = MEASURED_REPEATS,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[Timing, Timing]:
    """Time the unpatched model and ``cal``'s settings on ``batch`` as a measured calibration
    does (one warm-up round, then ``repeats`` rounds running the two back to back): the
    ``(unpatched, patched)`` timings. The model is left unpatched."""
    adapter = find_adapter(model)

    def variant(patched: bool) -> Any:
        def prepare() -> Any:
            if is_patched(model):
                unpatch(model)
            if patched:
                patch(model, cal.method, **cal.patch_kwargs())
            return lambda: adapter.forward(model, batch)

        return prepare

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            plain, pruned = time_round_robin([variant(False), variant(True)], batch_size=batch.shape[0],
                                             device=batch.device, warmup=1, repeats=repeats, clock=clock)
    finally:
        if is_patched(model):
            unpatch(model)
        model.train(was_training)
    return plain, pruned


def _time_speedup(model: torch.nn.Module, batch: torch.Tensor, cal: Calibration, repeats: int,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """Unpatched time over patched time on ``batch``: the median of the per-round ratios
    (the two run back to back in each round)."""
    plain, pruned = time_calibration(model, batch, cal, repeats, clock)
    return paired_speedup(plain.times, pruned.times)


def _bisect(run: Any, goal: float, tol: float, max_iter: int, mode: str
            ) -> tuple[tuple[float, float, Any], list[tuple[float, float]]]:
    """Bisection on x (the quantity rises with x; global: x = tau, per layer: x = 1 - f,
    saint_match: x = 1 - r / r_max): the best point ``(x, quantity, settings used)`` and
    every point tried."""
    history: list[tuple[float, float]] = []
    lo, hi = (-1.0, 1.0) if mode == "global" else (0.0, 1.0)
    best: tuple[float, float, Any] | None = None
    for _ in range(max_iter):
        x = (lo + hi) / 2
        q, used = run(x)
        history.append((x, q))
        if best is None or abs(q - goal) < abs(best[1] - goal):
            best = (x, q, used)
        if abs(q - goal) <= tol * goal:
            break
        if q < goal:
            lo = x
        else:
            hi = x
    assert best is not None  # max_iter >= 1 is checked up front
    return best, history


def _fmt_taus(taus: dict[int, float]) -> str:
    values = sorted({round(v, 4) for v in taus.values()})
    return f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g}..{values[-1]:g}"

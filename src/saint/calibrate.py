"""Threshold calibration: pick SAINT's ``tau`` (one global value, or one per layer)
from the model's own key similarities on a few images so that the pruned model hits a
target FLOPs fraction, FLOPs-ideal speed-up or kept-token fraction.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters.common import get_handle
from .api import patch, unpatch
from .core import saint_graph
from .methods import LayerContext, MethodSpec, SaintConfig, Selection, get_method, saint_metric

TARGETS = ("speedup", "flops", "keep")
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

    def patch_kwargs(self) -> dict[str, Any]:
        return {**self.settings, "tau": dict(self.tau)}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


class _StopForward(Exception):
    """Raised after the last pruning layer: later blocks cannot change token counts."""


def block_flops(n_attn: float, n_mlp: float, dim: int, mlp_hidden: int) -> float:
    """FLOPs of one ViT block (multiply-add = 2 FLOPs): qkv + proj + attention on
    ``n_attn`` tokens, the MLP on ``n_mlp`` tokens (pruning sits between the two)."""
    return 2 * n_attn * 4 * dim * dim + 4 * n_attn * n_attn * dim + 2 * n_mlp * 2 * dim * mlp_hidden


def flops_fraction(model: torch.nn.Module, tokens: Sequence[float]) -> float:
    """Analytic FLOPs of the blocks with ``tokens[i]`` entering block i, relative to
    no pruning (``tokens[0]`` everywhere). Patch embedding and head are ignored."""
    blocks = list(model.blocks)
    dim = blocks[0].norm1.normalized_shape[0]
    hidden = blocks[0].mlp.fc1.out_features
    n0 = tokens[0]
    pruned = sum(
        block_flops(tokens[i], tokens[i + 1] if i + 1 < len(tokens) else tokens[i], dim, hidden)
        for i in range(len(tokens))
    )
    return pruned / (len(tokens) * block_flops(n0, n0, dim, hidden))


def _quantile_probe(base: MethodSpec, fraction: float, taus: dict[int, float]) -> MethodSpec:
    """A SAINT spec whose tau at each layer is the quantile that flags ``fraction`` of
    the candidates; the taus it chose are written into ``taus``."""

    def select(ctx: LayerContext, s: dict[str, Any], cfg: SaintConfig) -> Selection:
        valid = ctx.valid[:, ctx.num_protected :] if ctx.valid is not None else None
        graph = saint_graph(saint_metric(ctx, cfg)[:, ctx.num_protected :], 1.0, 0.0, valid)
        sim = graph.sim.masked_fill(~graph.anchor_valid[:, None, :], float("-inf"))
        k = min(s["k"], sim.shape[-1])
        kth = sim.topk(k, dim=-1).values[..., -1][graph.candidate_valid]
        kth = kth[torch.isfinite(kth)]
        if fraction <= 0 or kth.numel() == 0:
            tau = 1.0
        else:
            tau = float(torch.quantile(kth.double(), max(0.0, 1.0 - fraction)))
            tau = max(-1.0, min(1.0, tau))
        taus[ctx.layer] = tau
        return base.select(ctx, {**s, "tau": tau}, cfg)

    return dataclasses.replace(base, name=f"{base.name}-calibration", select=select)


def _measure(model: torch.nn.Module, images: torch.Tensor, batch_size: int, last_layer: int) -> list[float]:
    """Mean tokens entering each block over ``images``; blocks after the last pruning
    layer are not run (their counts equal the count entering ``last_layer + 1``)."""
    depth = len(model.blocks)
    stop_at = last_layer + 1
    hook = None
    if stop_at < depth:
        def stop(module: torch.nn.Module, args: Any) -> None:
            get_handle(model).state.record(args[0])
            raise _StopForward

        hook = model.blocks[stop_at].register_forward_pre_hook(stop)
    totals = torch.zeros(depth, dtype=torch.float64)
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                try:
                    model(images[start : start + batch_size])
                except _StopForward:
                    pass
                counts = get_handle(model).state.counts
                per_block = [float(c.sum()) for c in counts[: stop_at + 1]]
                per_block += [per_block[-1]] * (depth - len(per_block))
                totals += torch.tensor(per_block, dtype=torch.float64)
    finally:
        if hook is not None:
            hook.remove()
    return (totals / images.shape[0]).tolist()


def calibrate(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    speedup: float | None = None,
    flops: float | None = None,
    keep: float | None = None,
    mode: str = "per_layer",
    method: str = "saint",
    tol: float = 0.01,
    max_iter: int = 30,
    batch_size: int = 32,
    apply: bool = True,
    **settings: Any,
) -> Calibration:
    """Choose tau for ``method`` ("saint" or "saint_fold") so the pruned model hits one
    target on ``images``: ``speedup`` (FLOPs-ideal, = 1 / FLOPs fraction), ``flops``
    (fraction of the unpruned block FLOPs) or ``keep`` (mean fraction of tokens
    entering each block). Other settings (``k``, ``gamma``, ``layers``, ``rate`` ...)
    are passed through. With ``apply`` the model is left patched with the result.
    """
    given = {"speedup": speedup, "flops": flops, "keep": keep}
    chosen = [(k, v) for k, v in given.items() if v is not None]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one target of {TARGETS}, got {[k for k, _ in chosen] or 'none'}")
    target, value = chosen[0]
    if target == "speedup" and not value >= 1.0:
        raise ValueError(f"speedup={value} must be >= 1")
    if target in ("flops", "keep") and not 0.0 < value <= 1.0:
        raise ValueError(f"{target}={value} must be in (0, 1]")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    spec = get_method(method)
    if not issubclass(spec.config_cls, SaintConfig):
        raise ValueError(f"calibration picks tau; method {method!r} has none (use 'saint' or 'saint_fold')")
    if "tau" in settings:
        raise ValueError("calibration chooses tau itself; do not pass tau")
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a [N, 3, H, W] batch, got shape {tuple(images.shape)}")
    goal = 1.0 / value if target == "speedup" else value

    def quantity(tokens: list[float]) -> float:
        return sum(tokens) / (len(tokens) * tokens[0]) if target == "keep" else flops_fraction(model, tokens)

    def run(x: float) -> tuple[float, dict[int, float]]:
        """Patch for bisection point ``x``; return the quantity and the taus used."""
        if mode == "global":
            patch(model, method, **settings, tau=x)
            taus = dict.fromkeys(get_handle(model).settings, x)
            return quantity(_measure(model, images, batch_size, max(taus))), taus
        taus = {}
        patch(model, _quantile_probe(spec, 1.0 - x, taus), **settings)
        # one batch: each layer's quantile is taken over the whole calibration set
        q = quantity(_measure(model, images, images.shape[0], max(get_handle(model).settings)))
        return q, taus

    history: list[tuple[float, float]] = []
    was_training = model.training
    model.eval()
    # bisection on x; the quantity rises with x (global: x = tau; per layer: x = 1 - f)
    lo, hi = (-1.0, 1.0) if mode == "global" else (0.0, 1.0)
    best: tuple[float, float, dict[int, float]] | None = None
    for _ in range(max_iter):
        x = (lo + hi) / 2
        q, taus = run(x)
        history.append((x, q))
        if best is None or abs(q - goal) < abs(best[1] - goal):
            best = (x, q, taus)
        if abs(q - goal) <= tol * goal:
            break
        if q < goal:
            lo = x
        else:
            hi = x
    assert best is not None
    taus = {int(k): float(v) for k, v in best[2].items()}
    # measure the fixed taus (what the user will run), then patch or restore
    patch(model, method, **settings, tau=taus)
    tokens = _measure(model, images, batch_size, max(taus))
    achieved_q = quantity(tokens)
    achieved = 1.0 / achieved_q if target == "speedup" else achieved_q
    handle = get_handle(model)
    result = Calibration(
        method=method,
        mode=mode,
        target=target,
        value=float(value),
        achieved=float(achieved),
        tau=taus,
        settings=dict(settings),
        num_images=int(images.shape[0]),
        iterations=len(history),
        history=history,
    )
    if apply:
        handle.calibration = result
    else:
        unpatch(model)
    model.train(was_training)
    return result

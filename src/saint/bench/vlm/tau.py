"""SAINT's llm/hybrid tau for a visual-token budget on the benchmark's own prompt."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ... import api
from .geometry import REFERENCE_TAU
from .inputs import VlmInputs
from .variants import VlmVariant


def _image_features(model: torch.nn.Module, inputs: VlmInputs) -> Any:
    return model.get_image_features(pixel_values=inputs.pixel_values, return_dict=True)


def calibrate_tau(model: torch.nn.Module, inputs: VlmInputs, variant: VlmVariant, *, iters: int = 12,
                  history: list[tuple[float, float]] | None = None, tol: float = 0.5) -> dict[str, Any]:
    """Choose ``llm_tau`` for an ``llm``/``hybrid`` variant so that the mean visual-token
    count after the last pruning layer, on ``inputs``, is as close as possible to the budget.

    A bracketing search on tau in [-1, 1] (higher tau, fewer edges, more tokens kept):
    steps alternate between linear interpolation of the count inside the bracket and
    plain bisection, so the bracket at least halves every two steps; it stops once the
    count is within ``tol`` of the budget or after ``iters`` steps, and keeps the tau
    whose count was closest (ties: the smaller count). tau = -1 (every candidate
    redundant) gives the smallest count SAINT's layers can reach; a budget below it is
    flagged ``reachable: False``. The image features are computed once (they do not
    depend on tau) and each step runs the language model only. ``history`` holds
    ``(tau, count)`` pairs of earlier calls with the same vision side; they narrow the
    bracket and are extended. Sets ``variant.kwargs['llm_tau']`` and
    ``variant.calibration``; returns the latter.
    """
    if not variant.needs_tau or variant.kwargs is None or variant.budget is None:
        raise ValueError(f"{variant.name} has no tau to calibrate")
    budget = float(variant.budget)
    history = [] if history is None else history
    kwargs = {k: v for k, v in variant.kwargs.items() if k != "llm_tau"}
    api.patch(model, **kwargs, llm_tau=REFERENCE_TAU)  # the tower patch (hybrid) does not depend on tau
    upper = float(kwargs.get("vit_keep", inputs.image_tokens))  # tokens handed to the language model
    with torch.inference_mode():
        feats = _image_features(model, inputs)

        def count(tau: float) -> float:
            api.patch(model, **kwargs, llm_tau=tau)
            model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                  mm_encoder_outputs={"image": feats}, use_cache=False, logits_to_keep=1)
            return float(statistics.fmean(api.stats(model).tokens[-1]))  # one image per prompt

        if not any(t == -1.0 for t, _ in history):
            history.append((-1.0, count(-1.0)))  # every candidate redundant: the most SAINT can drop
        evals = 0
        floor = min(a for _, a in history)
        while floor < budget and evals < iters:
            best = min(history, key=lambda h: (abs(h[1] - budget), h[1]))
            if abs(best[1] - budget) <= tol:
                break
            below = [h for h in history if h[1] < budget]
            above = [h for h in history if h[1] > budget]
            lo, a_lo = max(below) if below else (-1.0, floor)
            hi, a_hi = min(above) if above else (1.0, upper)  # tau = 1 keeps (almost) every token
            if hi - lo < 1e-6:
                break
            tau = (lo + hi) / 2
            if evals % 2 == 0 and a_hi > a_lo:
                frac = (budget - a_lo) / (a_hi - a_lo)
                tau = lo + min(max(frac, 0.05), 0.95) * (hi - lo)
            history.append((tau, count(tau)))
            evals += 1
    tau, achieved = min(history, key=lambda h: (abs(h[1] - budget), h[1]))
    reachable = floor <= budget + tol
    variant.kwargs = dict(kwargs, llm_tau=tau)
    variant.calibration = {
        "llm_tau": tau,
        "achieved": achieved,
        "budget": variant.budget,
        "reachable": reachable,
        "floor": floor,
        "evaluations": evals,
        "rule": "bracketing search on tau (interpolation alternating with bisection): mean visual tokens "
                "after the last pruning layer closest to the budget",
    }
    return variant.calibration

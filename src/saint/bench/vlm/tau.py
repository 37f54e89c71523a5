"""SAINT's llm/hybrid taus for a visual-token budget, chosen by :func:`saint.calibrate`
on the benchmark's own prompts.

SAINT's count is dynamic, so a budget is turned into a target ``saint.calibrate`` takes:
``keep``, the mean fraction of the prompt's tokens (text included, as the adapter counts
them) entering each decoder layer, of the schedule that removes the same share of the
visual tokens at every pruning layer and ends at the budget.
That is the schedule ``saint.calibrate``'s per-layer mode produces (each layer's tau is
the quantile that flags the same share of its candidates), so the calibrated model ends
near the budget after its last pruning layer; the count reached is measured and reported.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ...adapters import find_adapter
from ...calibration import CalibrationWarning, calibrate
from .inputs import VlmInputs
from .variants import VlmVariant


def keep_target(n0: int, budget: float, depth: int, layers: tuple[int, int], text: int) -> float:
    """Mean fraction of a prompt's ``text + n0`` tokens entering each of ``depth`` decoder
    layers when every layer ``start..end`` keeps the same share of the ``n0`` visual
    tokens and ``budget`` remain after ``end`` (a layer's pruning shows in the layers
    after it; text is never pruned)."""
    start, end = layers
    steps = end - start + 1
    r = (budget / n0) ** (1.0 / steps)
    visual = [n0 * r ** min(max(i - start, 0), steps) for i in range(depth)]
    return sum(text + v for v in visual) / (depth * (text + n0))


def floor_count(n0: int, steps: int) -> int:
    """The fewest visual tokens ``steps`` SAINT steps can leave of ``n0``: each drops at
    most its candidates (every other token), so ``floor(n / 2)`` remain."""
    for _ in range(steps):
        n0 //= 2
    return n0


def calibrate_variant(model: torch.nn.Module, inputs: VlmInputs, variant: VlmVariant, *,
                      max_iter: int = 12, tol: float = 0.002) -> dict[str, Any]:
    """Choose per-layer ``llm_tau`` for an ``llm``/``hybrid`` variant with
    :func:`saint.calibrate` (``mode="per_layer"``, target :func:`keep_target` of its
    budget within ``tol``, relative) on ``inputs``. Each SAINT step removes at most half
    of the image tokens, so a budget below :func:`floor_count` cannot be reached
    (``reachable`` False; the calibration keeps the closest it found). Sets
    ``variant.kwargs`` (with the taus) and ``variant.calibration``; returns the latter."""
    if not variant.needs_tau or variant.kwargs is None or variant.budget is None or variant.llm_input is None:
        raise ValueError(f"{variant.name} has no tau to calibrate")
    settings = {k: v for k, v in variant.kwargs.items() if k not in ("mode", "llm_tau")}
    depth = len(find_adapter(model).sites(model))
    start, end = settings["llm_layers"]
    goal = keep_target(variant.llm_input, variant.budget, depth, (start, end), inputs.text_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # out of reach: reported as reached=False
        cal = calibrate(model, inputs.batch, keep=goal, mode="per_layer", method="saint", tol=tol, max_iter=max_iter,
                        batch_size=inputs.batch_size, apply=False, patch_settings={"mode": variant.kwargs["mode"]},
                        **settings)
    variant.kwargs = cal.patch_kwargs()
    variant.calibration = {
        "llm_tau": {str(k): v for k, v in cal.tau.items()},
        "keep_target": goal,
        "keep_achieved": cal.achieved,
        "reached": cal.reached,
        "floor": floor_count(variant.llm_input, end - start + 1),
        "reachable": variant.budget >= floor_count(variant.llm_input, end - start + 1),
        "iterations": cal.iterations,
        "rule": "saint.calibrate(mode='per_layer', keep=target): the mean kept fraction over the decoder layers of "
                "the schedule that removes the same share at every pruning layer and ends at the budget",
    }
    return variant.calibration


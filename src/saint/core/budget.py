"""Fixed-budget similarity drop (SAINT paper, arXiv:2503.11549, "ViT-only" mode): iteratively remove the
tokens most similar to the rest until exactly ``keep`` prunable tokens remain."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gather import EPS, drop_top_ranked, prunable_valid, without_autocast


def fixed_budget_keep_mask(
    metric: torch.Tensor,
    keep: int,
    step_div: int = 16,
    num_protected: int = 0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool keep mask ``[B, N]`` leaving exactly ``keep`` prunable tokens per sample.

    The full similarity graph is computed once; each round scores the remaining
    tokens by their summed similarity to the other remaining ones and drops the
    ``min(remaining - keep, max(1, remaining // step_div))`` highest. A token's
    similarity to itself (1, the same for all) is left out and the graph made exactly
    symmetric, so that two tokens left for one place tie exactly and the lower index
    goes (:func:`drop_top_ranked`), in a batch as alone (their scores differed by the
    rounding of the products).
    """
    if step_div < 1:
        raise ValueError(f"step_div must be >= 1, got {step_div}")
    b, n, _ = metric.shape
    valid = prunable_valid(valid, b, n, metric.device)
    pv = valid[:, num_protected:]
    available = int(pv.sum(dim=1).min()) if b else 0
    if keep < 1 or keep > available:
        raise ValueError(
            f"keep={keep} must be in [1, {available}] (the prunable tokens available at this layer)"
        )
    m = F.normalize(metric[:, num_protected:].float(), dim=-1, eps=EPS)
    with without_autocast(m.device):
        sim = m @ m.transpose(1, 2)
    sim = (sim + sim.transpose(1, 2)) * 0.5
    sim.diagonal(dim1=1, dim2=2).zero_()
    sim.masked_fill_(~(pv[:, None, :] & pv[:, :, None]), 0.0)  # padding (NaN in a padded view) scores nothing
    remaining = pv.clone()
    while True:
        rem = remaining.sum(dim=1)
        todo = rem - keep
        if int(todo.max()) <= 0:
            break
        step = torch.minimum(todo, torch.clamp(torch.div(rem, step_div, rounding_mode="floor"), min=1))
        score = (sim * remaining[:, None, :]).sum(-1)
        remaining &= ~drop_top_ranked(score, remaining, step)
    keep_mask = valid.clone()
    keep_mask[:, num_protected:] = remaining
    return keep_mask

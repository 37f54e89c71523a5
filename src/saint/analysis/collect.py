"""Collect per-block token statistics from an (unpatched) vision transformer.

Forward hooks read what the model computes anyway, at the capture points the model's
adapter names (:meth:`saint.adapters.base.Adapter.probe`): the queries/keys where
they are projected and each block's output. Every statistic is computed inside the block's hook and only one
value per image is kept, so memory does not grow with depth. The model is never
modified; all hooks are removed on exit, even after an error.

Supported: timm ``VisionTransformer`` (blocks with ``attn.qkv``), Hugging Face
CLIP / SigLIP vision towers (``encoder.layers[i].self_attn.{q,k}_proj``) and the
language model of a Hugging Face LLaVA, over the image tokens only (images are then
batches of processor outputs: dicts with ``input_ids``, ``pixel_values``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import find_adapter
from ..adapters.common import get_handle
from ..core import head_mean
from . import stats as S

STATS: tuple[str, ...] = (
    "key_cosine",
    "hidden_cosine",
    "redundant_fraction",
    "cls_entropy",
    "effective_rank",
)
"""The statistics, in the order of CSV columns and figure panels."""

LABELS: dict[str, str] = {
    "key_cosine": "mean pairwise cosine of keys (head-avg)",
    "hidden_cosine": "mean pairwise cosine of block outputs",
    "redundant_fraction": "redundant fraction (SAINT rule)",
    "cls_entropy": "class-token attention entropy (nats)",
    "effective_rank": "effective rank of block outputs",
}


@dataclass
class TokenEvolution:
    """Per-image statistics of every block: ``values[stat]`` is ``[num_images, num_blocks]``
    float64 (NaN where undefined, e.g. class-token entropy of a model without one)."""

    blocks: list[str]
    values: dict[str, torch.Tensor]
    tau: float
    k: int
    num_prefix: int
    num_tokens: int
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(next(iter(self.values.values())).shape[0])

    def mean(self, stat: str) -> torch.Tensor:
        """Mean over images, per block (NaN-aware)."""
        return self.values[stat].nanmean(dim=0)

    def std(self, stat: str) -> torch.Tensor:
        """Standard deviation over images, per block (0 for a single image)."""
        v = self.values[stat]
        if v.shape[0] < 2:
            return torch.zeros(v.shape[1], dtype=v.dtype)
        return v.std(dim=0)

    def subset(self, index: torch.Tensor | list[int] | slice) -> TokenEvolution:
        """The same statistics restricted to some images."""
        return TokenEvolution(
            self.blocks, {k: v[index] for k, v in self.values.items()}, self.tau, self.k,
            self.num_prefix, self.num_tokens, self.model, dict(self.meta),
        )  # fmt: skip

    def curves(self) -> dict[str, list[float]]:
        """Mean curve of every statistic across depth."""
        return {s: self.mean(s).tolist() for s in STATS}


# ----------------------------------------------------------------------------- collection


def _batches(adapter: Any, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[Any]:
    """``images`` in batches: a tensor checked and split by the model's adapter (images, or a
    video model's clips), or the batches as given (each checked before it runs)."""
    if isinstance(images, torch.Tensor):
        adapter.check_inputs(images)
        yield from adapter.split(images, batch_size)
    else:
        yield from images


def block_statistics(
    q: torch.Tensor, k: torch.Tensor, hidden: torch.Tensor, num_prefix: int, has_cls: bool,
    scale: float, tau: float, k_min: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """All statistics of one block for a batch: ``q, k [B, N, H, D]`` (per head, after
    q/k norm), ``hidden [B, N, C]`` the block output. Prefix tokens are excluded from
    everything but the class token's attention (which spans all keys). Returns ``[B]``
    float64 per statistic."""
    keys = head_mean(k)[:, num_prefix:]
    patches = hidden[:, num_prefix:]
    out = {
        "key_cosine": S.mean_pairwise_cosine(keys),
        "hidden_cosine": S.mean_pairwise_cosine(patches),
        "redundant_fraction": S.redundant_fraction(keys, tau, k_min),
        "effective_rank": S.effective_rank(patches),
    }
    if has_cls:
        out["cls_entropy"] = S.cls_attention_entropy(q[:, 0], k, scale)
    else:
        out["cls_entropy"] = torch.full((q.shape[0],), float("nan"), dtype=torch.float64)
    return {name: v.cpu() for name, v in out.items()}


def _check_analysis(model: nn.Module, tau: float, k: int, batch_size: int) -> None:
    """An unpatched model and settings in range."""
    if get_handle(model) is not None:
        raise ValueError("the model is patched by saint; analyse the unpatched model (saint.unpatch(model))")
    if not -1.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau={tau} is outside [-1, 1] (a cosine similarity threshold)")
    if int(k) < 1:
        raise ValueError(f"k={k} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")


@contextmanager
def _hooked(model: nn.Module, probe: Any, store: dict[str, torch.Tensor], block_hook: Any) -> Iterator[None]:
    """The probe's capture hooks and ``block_hook(i)`` on every site, with the model in
    eval mode; both undone on leaving, whatever happens."""
    was_training = model.training
    hooks: list[Any] = []
    try:
        model.eval()
        for i, site in enumerate(probe.sites):
            hooks += probe.hooks(i, store)
            hooks.append(site.block.register_forward_hook(block_hook(i)))
        yield
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def token_evolution(
    model: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    tau: float = 0.75,
    k: int = 5,
    batch_size: int = 16,
    progress: bool = False,
) -> TokenEvolution:
    """Per-block token statistics of ``model`` over ``images``.

    ``images``: a ``[N, 3, H, W]`` tensor (a video model's clips ``[N, T, 3, H, W]``; split
    into ``batch_size`` chunks) or an iterable of such batches (used as given), already
    preprocessed for the model. Per-image values do not depend on how images are batched. ``tau``/``k`` set
    SAINT's redundancy rule for ``redundant_fraction``. The model runs unpatched,
    in eval mode, with its own attention kernel.
    """
    _check_analysis(model, tau, k, batch_size)
    try:
        adapter = find_adapter(model)
    except TypeError as e:
        raise TypeError(f"token analysis cannot read {type(model).__name__}: {e}") from None
    probe = adapter.probe(model)
    depth = len(probe.sites)
    per_block: list[dict[str, list[torch.Tensor]]] = [{s: [] for s in STATS} for _ in range(depth)]
    store: dict[str, torch.Tensor] = {}
    num_tokens = 0

    def block_hook(i: int):
        site = probe.sites[i]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            nonlocal num_tokens
            hidden = probe.hidden(output)
            q, kk = probe.qk(i, store)
            num_tokens = hidden.shape[1]
            values = block_statistics(
                q, kk, hidden, probe.num_prefix, probe.has_cls, site.scale, tau, k
            )
            for name, v in values.items():
                per_block[i][name].append(v)

        return hook

    with _hooked(model, probe, store, block_hook):
        batches = _batches(adapter, images, batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="analyse", unit="batch")
        for x in batches:
            adapter.check_inputs(x)
            probe.begin(x)
            adapter.forward(model, x)
    if not per_block[0]["key_cosine"]:
        raise ValueError("no images given")
    values = {s: torch.stack([torch.cat(per_block[i][s]) for i in range(depth)], dim=1) for s in STATS}
    return TokenEvolution(
        probe.names, values, float(tau), int(k), probe.num_prefix, num_tokens, type(model).__name__
    )

"""Collect per-block token statistics from an (unpatched) vision transformer.

Forward hooks read what the model computes anyway: the queries/keys where they are
projected (timm ``attn.qkv``; Hugging Face ``self_attn.q_proj``/``k_proj``) and each
block's output. Every statistic is computed inside the block's hook and only one
value per image is kept, so memory does not grow with depth. The model is never
modified; all hooks are removed on exit, even after an error.

Supported: timm ``VisionTransformer`` (blocks with ``attn.qkv``), Hugging Face
CLIP / SigLIP vision towers (``encoder.layers[i].self_attn.{q,k}_proj``) and the
language model of a Hugging Face LLaVA, over the image tokens only (images are then
batches of processor outputs: dicts with ``input_ids``, ``pixel_values``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters.common import get_handle
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


# ----------------------------------------------------------------------------- probes


@dataclass
class _Layer:
    block: nn.Module  # its output is the hidden state after the block
    attn: nn.Module
    num_heads: int
    scale: float


class _Probe:
    """Where to hook one model family, and how to call it."""

    kind: str
    layers: list[_Layer]
    names: list[str]
    num_prefix: int
    has_cls: bool

    def qk_hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        raise NotImplementedError

    def qk(self, i: int, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``[B, N, H, D]`` (after any q/k norm) of layer ``i``."""
        raise NotImplementedError

    def forward(self, model: nn.Module, x: torch.Tensor) -> None:
        raise NotImplementedError


def _save(store: dict[str, torch.Tensor], key: str):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store[key] = output

    return hook


class _TimmProbe(_Probe):
    kind = "timm"

    def __init__(self, model: nn.Module) -> None:
        self.layers = []
        for i, blk in enumerate(model.blocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "num_heads"):
                raise TypeError(
                    f"block {i} ({type(blk).__name__}) has no fused attn.qkv projection; "
                    "token analysis supports timm ViT blocks with Attention(qkv)"
                )
            self.layers.append(_Layer(blk, attn, int(attn.num_heads), float(attn.scale)))
        self.names = [f"blocks.{i}" for i in range(len(self.layers))]
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.has_cls = getattr(model, "cls_token", None) is not None

    def qk_hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        return [self.layers[i].attn.qkv.register_forward_hook(_save(store, "qkv"))]

    def qk(self, i: int, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.layers[i].attn
        qkv = store.pop("qkv")
        b, n, c3 = qkv.shape
        h = self.layers[i].num_heads
        q, k, _ = qkv.reshape(b, n, 3, h, c3 // (3 * h)).unbind(2)
        return attn.q_norm(q), attn.k_norm(k)

    def forward(self, model: nn.Module, x: torch.Tensor) -> None:
        model.forward_features(x)


class _HFProbe(_Probe):
    kind = "hf"

    def __init__(self, model: nn.Module) -> None:
        tower = getattr(model, "vision_model", model)
        self.tower = tower
        encoder_layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if encoder_layers is None:
            raise TypeError(f"{type(model).__name__} has no encoder.layers")
        self.layers = []
        for i, layer in enumerate(encoder_layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads", "scale")):
                raise TypeError(f"layer {i} ({type(layer).__name__}) has no self_attn.q_proj/k_proj")
            self.layers.append(_Layer(layer, attn, int(attn.num_heads), float(attn.scale)))
        self.names = [f"encoder.layers.{i}" for i in range(len(self.layers))]
        self.has_cls = hasattr(getattr(tower, "embeddings", None), "class_embedding")
        self.num_prefix = 1 if self.has_cls else 0

    def qk_hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        attn = self.layers[i].attn
        return [
            attn.q_proj.register_forward_hook(_save(store, "q")),
            attn.k_proj.register_forward_hook(_save(store, "k")),
        ]

    def qk(self, i: int, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.layers[i].num_heads
        q, k = store.pop("q"), store.pop("k")
        b, n, c = q.shape
        return q.reshape(b, n, h, c // h), k.reshape(b, n, h, c // h)

    def forward(self, model: nn.Module, x: torch.Tensor) -> None:
        self.tower(pixel_values=x)


class _LlavaProbe(_Probe):
    """The decoder layers of a LLaVA's language model, restricted to the image tokens
    (found per sample from ``image_token_id``). Keys are read pre-RoPE at ``k_proj`` and
    averaged over KV heads; the "class-token" entropy is undefined here (NaN)."""

    kind = "llava-llm"

    def __init__(self, model: nn.Module) -> None:
        lm = model.model.language_model
        self.image_token_id = int(model.config.image_token_id)
        self.layers = []
        for i, layer in enumerate(lm.layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None or not hasattr(attn, "k_proj"):
                raise TypeError(f"decoder layer {i} ({type(layer).__name__}) has no self_attn.k_proj")
            cfg = attn.config
            self.layers.append(_Layer(layer, attn, int(cfg.num_key_value_heads), float(attn.scaling)))
        self.names = [f"language_model.layers.{i}" for i in range(len(self.layers))]
        self.num_prefix = 0
        self.has_cls = False
        self.image_mask: torch.Tensor | None = None

    def qk_hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        return [self.layers[i].attn.k_proj.register_forward_hook(_save(store, "k"))]

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
        h = self.layers[i].num_heads
        k = self.select(k).reshape(b, -1, h, c // h)
        return k, k  # queries are not used: no class token here

    def forward(self, model: nn.Module, x: Any) -> None:
        if not isinstance(x, dict) or "input_ids" not in x:
            raise ValueError("LLaVA analysis takes batches of processor outputs (dicts with input_ids, pixel_values)")
        self.image_mask = x["input_ids"] == self.image_token_id
        model(**x)


def _probe(model: nn.Module) -> _Probe:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        VisionTransformer = ()  # type: ignore[assignment,misc]
    if isinstance(model, VisionTransformer):
        return _TimmProbe(model)
    if hasattr(getattr(model, "model", None), "language_model") and hasattr(model.config, "image_token_id"):
        return _LlavaProbe(model)
    tower = getattr(model, "vision_model", model)
    if hasattr(getattr(tower, "encoder", None), "layers") and hasattr(tower, "embeddings"):
        return _HFProbe(model)
    raise TypeError(
        f"token analysis cannot read {type(model).__name__}; supported: timm VisionTransformer, "
        "Hugging Face CLIP/SigLIP vision models (CLIPVisionModel, SiglipVisionModel, ...), "
        "the language model of a Hugging Face LLaVA"
    )


# ----------------------------------------------------------------------------- collection


def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
    else:
        for batch in images:
            if isinstance(batch, dict):
                yield batch
                continue
            if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
                raise ValueError("each batch must be a [B, 3, H, W] tensor")
            yield batch


def block_statistics(
    q: torch.Tensor, k: torch.Tensor, hidden: torch.Tensor, num_prefix: int, has_cls: bool,
    scale: float, tau: float, k_min: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """All statistics of one block for a batch: ``q, k [B, N, H, D]`` (per head, after
    q/k norm), ``hidden [B, N, C]`` the block output. Prefix tokens are excluded from
    everything but the class token's attention (which spans all keys). Returns ``[B]``
    float64 per statistic."""
    keys = k.mean(dim=2)[:, num_prefix:]
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

    ``images``: a ``[N, 3, H, W]`` tensor (split into ``batch_size`` chunks) or an
    iterable of ``[B, 3, H, W]`` batches (used as given), already preprocessed for the
    model. Per-image values do not depend on how images are batched. ``tau``/``k`` set
    SAINT's redundancy rule for ``redundant_fraction``. The model runs unpatched,
    in eval mode, with its own attention kernel.
    """
    if get_handle(model) is not None:
        raise ValueError("the model is patched by saint; analyse the unpatched model (saint.unpatch(model))")
    if not -1.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau={tau} is outside [-1, 1] (a cosine similarity threshold)")
    if int(k) < 1:
        raise ValueError(f"k={k} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    probe = _probe(model)
    depth = len(probe.layers)
    per_block: list[dict[str, list[torch.Tensor]]] = [{s: [] for s in STATS} for _ in range(depth)]
    store: dict[str, torch.Tensor] = {}
    num_tokens = 0

    def block_hook(i: int):
        layer = probe.layers[i]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            nonlocal num_tokens
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(probe, _LlavaProbe):
                hidden = probe.select(hidden)
            q, kk = probe.qk(i, store)
            num_tokens = hidden.shape[1]
            values = block_statistics(
                q, kk, hidden, probe.num_prefix, probe.has_cls, layer.scale, tau, k
            )
            for name, v in values.items():
                per_block[i][name].append(v)

        return hook

    was_training = model.training
    hooks: list[Any] = []
    try:
        model.eval()
        for i, layer in enumerate(probe.layers):
            hooks += probe.qk_hooks(i, store)
            hooks.append(layer.block.register_forward_hook(block_hook(i)))
        batches = _batches(images, batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="analyse", unit="batch")
        for x in batches:
            probe.forward(model, x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not per_block[0]["key_cosine"]:
        raise ValueError("no images given")
    values = {s: torch.stack([torch.cat(per_block[i][s]) for i in range(depth)], dim=1) for s in STATS}
    return TokenEvolution(
        probe.names, values, float(tau), int(k), probe.num_prefix, num_tokens, type(model).__name__
    )

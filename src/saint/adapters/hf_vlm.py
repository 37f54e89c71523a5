"""The adapter protocol for Hugging Face VLMs pruned inside their language model
(LLaVA, LLaVA-OneVision, Qwen-VL): sites are the language model's decoder layers,
inputs are processor-output dicts, and the multimodal model is the
``*ForConditionalGeneration``'s ``model.model`` (or the ``*Model`` itself). Each family
subclasses :class:`HFVlm`, naming its adapter module (``family``), whose
``matches``/``patch``/``unpatch`` the class binds."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .base import FamilyAdapter, Grid, Probe, Site, batch_to
from .common import language_model
from .hf_llm import projection


def multimodal(model: torch.nn.Module) -> torch.nn.Module:
    """The multimodal model (``*Model``) of a ``*ForConditionalGeneration``, or the model itself."""
    return model.model if hasattr(model, "lm_head") else model


class ImageTokenProbe(Probe):
    """The decoder layers of a VLM's language model, restricted to the image tokens
    (found per sample from ``image_token_id``). Keys are read pre-RoPE where the layer
    makes them (``k_proj``, the key columns of a fused ``qkv_proj``, then a key norm if the
    layer has one, as the LLM-side selections read them) and averaged over KV heads;
    there is no class token."""

    num_prefix = 0
    has_cls = False

    def __init__(self, model: torch.nn.Module, sites: list[Site]) -> None:
        self.sites = sites
        self.image_token_id = int(model.config.image_token_id)
        self.image_mask: torch.Tensor | None = None

    def begin(self, inputs: Any) -> None:
        self.image_mask = inputs["input_ids"] == self.image_token_id

    def hooks(self, i: int, store: dict[str, torch.Tensor]) -> list[Any]:
        attn = self.sites[i].attn
        name, columns = projection(attn, "k")

        def keys(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            store["k"] = output if columns is None else output[..., columns]

        return [getattr(attn, name).register_forward_hook(keys)]

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
        norm = getattr(self.sites[i].attn, "k_norm", None)
        if norm is not None:
            k = norm(k)
        return k, k  # queries are not used: no class token here

    def hidden(self, output: Any) -> torch.Tensor:
        return self.select(super().hidden(output))


class HFVlm(FamilyAdapter):
    """Subclasses set ``name`` and ``family`` (the adapter module); ``grid`` is the
    square patch grid of the vision config's ``image_size`` (LLaVA, the base image of
    LLaVA-OneVision)."""

    tau_setting = "llm_tau"

    def sites(self, model: torch.nn.Module) -> list[Site]:
        lm = language_model(multimodal(model))
        out = []
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            heads = int(attn.config.num_key_value_heads)
            out.append(Site(i, f"language_model.layers.{i}", layer, attn, heads, float(attn.scaling)))
        return out

    def protected(self, model: torch.nn.Module) -> int:
        return 0

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        vc = multimodal(model).config.vision_config
        g, p = int(vc.image_size) // int(vc.patch_size), int(vc.patch_size)
        return Grid(g, g, (p, p))

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        """One decoder layer on ``n_in`` tokens (pruning follows the layer): q/o and the
        grouped k/v projections, attention, and the gated MLP (3 matmuls). ``select_at``
        can only be ``"mlp"`` (or None) here."""
        if select_at not in (None, "mlp"):
            raise ValueError(f"select_at={select_at!r}: a VLM's decoder layers are pruned after the layer only")
        cfg = language_model(multimodal(model)).config
        d, inter = int(cfg.hidden_size), int(cfg.intermediate_size)
        kv = int(cfg.num_key_value_heads) * int(getattr(cfg, "head_dim", None) or d // int(cfg.num_attention_heads))
        return 2 * n_in * (2 * d * d + 2 * d * kv) + 4 * n_in * n_in * d + 2 * n_in * 3 * d * inter

    def probe(self, model: torch.nn.Module) -> Probe:
        mm = multimodal(model)
        return ImageTokenProbe(mm, self.sites(mm))

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        return model(**inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next-token logits of every prompt (its last position is never dropped)."""
        out = self.forward(model, inputs)
        logits = getattr(out, "logits", None)
        return (out.last_hidden_state if logits is None else logits)[:, -1], None

    def check_inputs(self, inputs: Any) -> None:
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            raise ValueError("LLaVA takes batches of processor outputs (dicts with input_ids, pixel_values)")

    def batch_size(self, inputs: Any) -> int:
        return int(inputs["input_ids"].shape[0])

    def split(self, inputs: Any, size: int) -> Iterator[Any]:
        b = self.batch_size(inputs)
        px = inputs.get("pixel_values")
        if px is not None and px.shape[0] != b and size < b:
            raise ValueError(f"{px.shape[0]} images for {b} prompts: split batches need one image per prompt")
        for start in range(0, b, size):
            yield {k: (v[start : start + size] if isinstance(v, torch.Tensor) and v.shape[:1] == (b,) else v)
                   for k, v in inputs.items()}

    def to(self, inputs: Any, device: torch.device, dtype: torch.dtype) -> Any:
        return batch_to(inputs, device, dtype)

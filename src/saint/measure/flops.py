"""FLOPs (not MACs: one multiply-add counts 2) of one forward pass, from
``torch.utils.flop_counter.FlopCounterMode``.

The counter covers matmuls, convolutions and the fused attention kernels; element-wise
work (norms, activations, softmax, gathers) is not counted. PyTorch registers the CUDA
SDPA kernels but not the CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``),
so this module adds the same formula for it; otherwise attention would vanish from CPU
counts while an eager model (``bmm``) kept it. Nor does it count
``nn.MultiheadAttention``'s inference fast path (``_native_multi_head_attention``: its
projections and attention in one op), which this module counts as the products it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter


def _sdpa_cpu_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _native_mha_flop(query_shape: Any, key_shape: Any, value_shape: Any, embed_dim: int, num_heads: int,
                     *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``nn.MultiheadAttention``'s fast path on batch-first ``[B, L, E]`` queries and ``[B, S, E]``
    keys/values: the q, k, v and output projections and the attention products."""
    b, length, e = query_shape
    s = key_shape[1]
    heads = (b, num_heads, length, e // num_heads), (b, num_heads, s, e // num_heads)
    return 2 * b * e * e * (2 * length + 2 * s) + flop_counter.sdpa_flop_count(heads[0], heads[1], heads[1])


def _custom_mapping() -> dict[Any, Callable[..., int]]:
    mapping: dict[Any, Callable[..., int]] = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flop),
                          ("_native_multi_head_attention", _native_mha_flop)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            mapping[op] = formula
    return mapping


_CUSTOM = _custom_mapping()  # the formulas torch lacks, for the counter and for op_flops
_REGISTRY = {**flop_counter.flop_registry, **{k: flop_counter.shape_wrapper(v) for k, v in _CUSTOM.items()}}


def has_flop_formula(func: Any) -> bool:
    """Whether :func:`op_flops` has a formula for the aten op ``func``."""
    return func.overloadpacket in _REGISTRY


def op_flops(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """FLOPs of one dispatched aten op (``func`` an ``OpOverload``) as :func:`count_flops`
    counts them: torch's formula for the op, or this module's for the CPU attention
    kernel; 0 for an op without one (element-wise work, gathers, views)."""
    formula = _REGISTRY.get(func.overloadpacket)
    return 0 if formula is None else int(formula(*args, **kwargs, out_val=out))


def count_flops(fn: Callable[[], Any], model: torch.nn.Module | None = None) -> tuple[int, dict[str, int]]:
    """Run ``fn()`` once under the counter (no grad); return total FLOPs and FLOPs per op.
    ``model``: its parameters stop requiring gradients while counting (the counter's module
    tracker hooks the gradients of every input that requires them, and fails in inference mode
    when a model hands a parameter to a submodule, as Idefics2's resampler does its latents)."""
    frozen = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            with torch.no_grad():
                fn()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def model_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``model(x)`` for the whole batch (its parameters frozen while counting: see
    :func:`count_flops`)."""
    return count_flops(lambda: model(x), model)[0]

"""Measurement that times only the model: round-robin timing with device sync, FLOPs,
peak memory, side-by-side ratios (``saint bench``) and speed/fidelity sweeps
(``saint sweep``)."""

from .flops import count_flops, model_flops
from .harness import Harness, Measurement, Outputs, resolve_device, resolve_dtype, timing_batch
from .memory import peak_memory_mb
from .spec import BASELINE, Variant, parse_kwargs, parse_method_spec, variant_label
from .timing import Timing, synchronize, time_round_robin

__all__ = [
    "BASELINE",
    "Harness",
    "Measurement",
    "Outputs",
    "Timing",
    "Variant",
    "count_flops",
    "model_flops",
    "parse_kwargs",
    "parse_method_spec",
    "peak_memory_mb",
    "resolve_device",
    "resolve_dtype",
    "synchronize",
    "time_round_robin",
    "timing_batch",
    "variant_label",
]

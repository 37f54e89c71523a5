"""Measurement that times only the model, used by ``bench`` and ``eval`` alike (and
importing neither): a harness that switches one model between variants, round-robin
timing with device sync, FLOPs, peak memory, image sets, and report writing."""

from .flops import count_flops, model_flops
from .harness import Harness, Measurement, Outputs, resolve_device, resolve_dtype, timing_batch
from .images import ImageSet, resolve_images
from .memory import peak_memory_mb
from .timing import Timing, synchronize, time_round_robin

__all__ = [
    "Harness",
    "ImageSet",
    "Measurement",
    "Outputs",
    "Timing",
    "count_flops",
    "model_flops",
    "peak_memory_mb",
    "resolve_device",
    "resolve_dtype",
    "resolve_images",
    "synchronize",
    "time_round_robin",
    "timing_batch",
]

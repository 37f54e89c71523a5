"""One model, many variants: the measurement engine behind ``saint bench``, ``eval``,
``sweep`` and ``demo``.

A :class:`Harness` holds one model and switches it between variants by patching it in
place (``saint.patch`` / ``saint.unpatch`` are cheap and exact), so every variant runs
the very same weights and no copies are made. Switching happens outside the timed
region; the timed region is the model call only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import api
from ..adapters import find_adapter, handle_of
from ..assets import ImageRecord
from ..spec import Variant
from .flops import count_flops
from .images import iter_batches
from .memory import peak_memory_mb
from .op_time import OpTimes, op_times
from .timing import PAIRINGS, Timing, time_paired, time_round_robin

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` -> the torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def resolve_device(name: str | None) -> torch.device:
    """``None``/``"auto"`` -> cuda when available else cpu; otherwise checked to exist."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N (or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available in this torch build/machine")
    return dev


@dataclass
class Outputs:
    """What a variant produced on an image set: pooled embeddings ``[N, D]`` (float32,
    CPU), logits ``[N, C]`` for classifiers, tokens entering each block per image, and
    FLOPs per image (counted during those very forwards, at the collection batch size)."""

    embeddings: torch.Tensor
    logits: torch.Tensor | None
    tokens: list[list[int]] = field(default_factory=list)  # [block][image]
    flops_per_image: float | None = None

    def mean_tokens(self) -> list[float]:
        return [sum(t) / len(t) for t in self.tokens]


@dataclass
class Measurement:
    """Cost of a variant on the timing batch: time, FLOPs and tokens per image, memory."""

    variant: Variant
    timing: Timing | None
    flops_per_image: float
    tokens: list[float]
    peak_memory_mb: float | None
    layout: str | None = None  # how a ragged batch ran: "packed", "padded" or "rectangular"
    baseline_timing: Timing | None = None  # paired timing: the baseline's rounds beside this variant's
    op_time: OpTimes | None = None  # one forward's op time by category (CPU, on request)


class Harness:
    """A model on a device in a dtype, switchable between :class:`Variant` s."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, one_at_a_time: bool = False) -> None:
        """``one_at_a_time``: every forward runs the model on each image of the batch alone,
        one call after another (single-image latency; a tensor batch only)."""
        if api.is_patched(model):
            raise ValueError("give the harness an unpatched model; it patches it per variant")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.active: Variant | None = None
        self.adapter = find_adapter(model)
        self.one_at_a_time = one_at_a_time
        self._per_call_tokens: list[list[list[int]]] | None = None  # while run() records each call's tokens

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    def activate(self, variant: Variant) -> None:
        """Patch the model for ``variant`` (unpatch for the baseline)."""
        if self.active is variant and variant.is_baseline != api.is_patched(self.model):
            return
        if api.is_patched(self.model):
            api.unpatch(self.model)
        if not variant.is_baseline:
            api.patch(self.model, variant.method, **variant.kwargs)
        self.active = variant

    def release(self) -> torch.nn.Module:
        """Unpatch and return the model."""
        if api.is_patched(self.model):
            api.unpatch(self.model)
        self.active = None
        return self.model

    def prepare(self, x: Any) -> Any:
        """Move an input batch to the harness's device and dtype."""
        return self.adapter.to(x, self.device, self.dtype)

    def forward(self, x: Any) -> Any:
        """One forward of the active variant on a prepared batch (with ``one_at_a_time``,
        one call per image; their outputs as a list)."""
        if not self.one_at_a_time:
            return self.adapter.forward(self.model, x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"one_at_a_time splits a tensor batch; got {type(x).__name__}")
        outs = []
        for xi in x.split(1):
            outs.append(self.adapter.forward(self.model, xi))
            if self._per_call_tokens is not None and api.is_patched(self.model):
                self._per_call_tokens.append([t.tolist() for t in handle_of(self.model).site_tokens()])
        return outs

    # --- one forward -------------------------------------------------------------------
    def _block_tokens_hooked(self, fn: Callable[[], Any]) -> tuple[Any, list[list[int]]]:
        counts: list[list[int]] = []

        def pre(_m: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            counts.append([int(x.shape[1])] * int(x.shape[0]))

        hooks = [site.block.register_forward_pre_hook(pre) for site in self.adapter.sites(self.model)]
        try:
            out = fn()
        finally:
            for h in hooks:
                h.remove()
        return out, counts

    def run(self, fn: Callable[[], Any]) -> tuple[Any, list[list[int]]]:
        """Run ``fn`` (a forward of the active variant); also return the real tokens
        entering each block, per sample."""
        if self.one_at_a_time:
            return self._run_one_at_a_time(fn)
        if api.is_patched(self.model):
            out = fn()
            return out, [t.tolist() for t in handle_of(self.model).site_tokens()]
        return self._block_tokens_hooked(fn)

    def _run_one_at_a_time(self, fn: Callable[[], Any]) -> tuple[Any, list[list[int]]]:
        """:meth:`run` of a forward made of one call per image: each call's tokens per
        block, joined image after image."""
        if not api.is_patched(self.model):
            out, counts = self._block_tokens_hooked(fn)  # call after call, block after block
            depth = len(self.adapter.sites(self.model))
            return out, [sum(counts[j::depth], []) for j in range(depth)]
        self._per_call_tokens = []
        try:
            out = fn()
            calls = self._per_call_tokens
        finally:
            self._per_call_tokens = None
        return out, [sum(per_block, []) for per_block in zip(*calls, strict=True)]

    def embed(self, x: torch.Tensor, count: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None, list[list[int]], int | None]:
        """Pooled embedding (pre-logits), logits (classifiers only), tokens per block and,
        with ``count``, the FLOPs of this forward (one pass either way)."""
        def fwd() -> tuple[torch.Tensor, torch.Tensor | None]:
            return self.adapter.embed(self.model, x)

        flops = None
        with torch.inference_mode():
            if count:
                seen: list[tuple[Any, list[list[int]]]] = []
                flops, _ = count_flops(lambda: seen.append(self.run(fwd)), self.model)
                (emb, logits), tokens = seen[0]
            else:
                (emb, logits), tokens = self.run(fwd)
        return emb.float().cpu(), None if logits is None else logits.float().cpu(), tokens, flops

    # --- over variants -----------------------------------------------------------------
    def collect(
        self,
        variants: Sequence[Variant],
        records: Sequence[ImageRecord],
        transform: Callable[[Any], torch.Tensor],
        batch_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[list[Outputs], torch.Tensor]:
        """Outputs of every variant on ``records`` (images loaded once, batch by batch,
        every variant run on each batch). Returns the outputs and the labels ``[N]``.
        Padded per-sample sequences cost what they cost: FLOPs depend on ``batch_size``."""
        embs: list[list[torch.Tensor]] = [[] for _ in variants]
        logits: list[list[torch.Tensor]] = [[] for _ in variants]
        tokens: list[list[list[int]]] = [[] for _ in variants]
        flops = [0] * len(variants)
        labels = []
        for xb, yb in iter_batches(records, transform, batch_size):
            labels.append(yb)
            xb = self.prepare(xb)
            for i, v in enumerate(variants):
                self.activate(v)
                e, lg, tk, fl = self.embed(xb, count=True)
                flops[i] += fl
                embs[i].append(e)
                if lg is not None:
                    logits[i].append(lg)
                if not tokens[i]:
                    tokens[i] = [[] for _ in tk]
                for acc, t in zip(tokens[i], tk, strict=True):
                    acc.extend(t)
            if progress is not None:
                progress(xb.shape[0])
        outs = [
            Outputs(torch.cat(embs[i]), torch.cat(logits[i]) if logits[i] else None, tokens[i],
                    flops[i] / len(records))
            for i in range(len(variants))
        ]
        return outs, torch.cat(labels)

    def _flops_and_tokens(self, x: torch.Tensor) -> tuple[int, list[list[int]]]:
        """FLOPs of the active variant on ``x`` and its tokens per block, in one forward."""
        seen: list[list[list[int]]] = []
        flops, _ = count_flops(lambda: seen.append(self.run(lambda: self.forward(x))[1]), self.model)
        return flops, seen[0]

    def measure(
        self,
        variants: Sequence[Variant],
        x: torch.Tensor,
        *,
        warmup: int = 2,
        repeats: int = 10,
        memory: bool = True,
        progress: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        pairing: str = "round_robin",
        by_op: bool = False,
    ) -> list[Measurement]:
        """FLOPs, tokens and peak memory of each variant on batch ``x``, then timing:
        all variants in one round robin, or with ``pairing="paired"`` each after the
        first (the baseline) in a round robin of its own with it (see
        :data:`saint.timing.PAIRINGS`; ``repeats=0`` skips timing; ``clock``: see
        :func:`saint.timing.time_round_robin`). ``by_op`` (CPU only) also times one
        forward op by op, by category (:mod:`saint.measure.op_time`)."""
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing={pairing!r} is not one of {PAIRINGS}")
        if by_op and self.device.type != "cpu":
            raise ValueError(f"op-by-op timing runs on a CPU only (an accelerator queues its ops); device is {self.device}")
        x = self.prepare(x)
        b = self.adapter.batch_size(x)
        results = []
        for v in variants:
            self.activate(v)
            with torch.inference_mode():
                flops, tokens = self._flops_and_tokens(x)
                layout = getattr(api.stats(self.model), "layout", None) if api.is_patched(self.model) else None
                mem = peak_memory_mb(lambda: self.forward(x), self.device) if memory else None
                ops = op_times(lambda: self.forward(x)) if by_op else None
            mean = [sum(t) / len(t) for t in tokens]
            results.append(Measurement(v, None, flops / b, mean, mem, layout, op_time=ops))
        if repeats > 0:
            def setup(v: Variant) -> Callable[[], Callable[[], object]]:
                def prepare() -> Callable[[], object]:
                    self.activate(v)
                    return lambda: self.forward(x)

                return prepare

            setups = [setup(v) for v in variants]
            timing = {"batch_size": b, "device": self.device, "warmup": warmup, "repeats": repeats,
                      "progress": progress, "clock": clock}
            with torch.inference_mode():
                if pairing == "paired":
                    timings, baselines = time_paired(setups, **timing)
                else:
                    timings, baselines = time_round_robin(setups, **timing), [None] * len(setups)
            for r, t, base in zip(results, timings, baselines, strict=True):
                r.timing, r.baseline_timing = t, base
        return results


def timing_batch(
    records: Sequence[ImageRecord], transform: Callable[[Any], torch.Tensor], batch_size: int
) -> torch.Tensor:
    """The first ``batch_size`` photos (repeated cyclically when there are fewer)."""
    from .. import assets

    if not records:
        raise ValueError("no images to time on")
    chosen = [records[i % len(records)] for i in range(batch_size)]
    return assets.load_images(chosen, transform)[0]

"""LLaVA latency at equal visual-token budgets (``saint vlm-bench``): time to first
token, decode time per token, KV-cache size and peak memory of the unpruned model,
SAINT's three VLM modes and the FastV / random / pooling baselines.

What is measured, and how:

* **Model.** A ``LlavaForConditionalGeneration`` with random weights (so nothing is
  downloaded) and LLaVA-1.5's real vision side: CLIP ViT-L/14 at 336 px (576 patches),
  the 2-layer MLP projector, features from layer -2 without the class token. The
  language model is a Llama whose geometry is chosen by :data:`GEOMETRIES` (scaled down
  for a CPU; ``full`` is LLaVA-1.5-7B's). Cost does not depend on the weights' values,
  except that SAINT's dynamic token count does, hence the tau rule below.
* **Prompt.** ``prompt_len`` random text tokens, the first half before the image (the
  system prompt) and the rest after it (the question), around the processor's 576 image
  tokens; every row of the batch has its own text and image (random pixels) and the
  same length, so there is no padding. Inputs, masks and decode positions are built and
  moved to the device before any timing.
* **Time to first token** = one ``model(..., use_cache=True, logits_to_keep=1)`` over
  the prompt and its images (vision tower, projector, all pruning, language model, LM
  head on the last position), as ``generate`` does for its first step.
* **Decode ms/token** = ``new_tokens`` single-token forwards on that prefill's cache,
  greedy (argmax, the image token suppressed), divided by ``new_tokens``.
* **Timing**: every round runs every variant once, in an order that rotates per round
  (interleaved round-robin, as :func:`saint.measure.timing.time_round_robin`; one prefill
  per variant and round feeds both timed regions, so the loop is written out here);
  ``warmup`` untimed rounds first; device sync around each timed region; min and median.
* **Profile pass** (once per variant, after timing, untimed): visual tokens per layer
  (``saint.stats``), exact KV-cache bytes after prefill, peak memory of prefill +
  decode (:func:`saint.measure.memory.peak_memory_mb`: CUDA ``max_memory_allocated``;
  approximate RSS on Linux CPUs), the wall time of the language model and of SAINT's
  graph selection inside that one prefill, and prefill FLOPs (matmul/attention only).

Budgets (visual tokens per image after pruning, from the 576 the processor emits):

* ``vit``, ``random``, ``pool``: ``vit_keep`` / ``visual_keep`` = budget (pool uses the
  most square ``rows x cols`` grid with ``rows * cols = budget``; 192 = 16x12).
* ``fastv``: ``fastv_ratio = (576 - budget) / 576`` at ``fastv_layer`` (FastV's K,
  default 2), so exactly ``budget`` image tokens enter layers K and later.
* ``llm`` / ``hybrid``: SAINT's count is dynamic. ``tau`` is chosen by a bracketing search on this
  benchmark's own prompt and images (:func:`calibrate_tau`): the tau whose mean count
  after the last pruning layer is closest to the budget. The achieved mean is reported
  next to the budget; when the budget is below what the pruning layers can reach (each
  SAINT step removes at most half of the image tokens), the smallest count is used and
  flagged. Hybrid first keeps ``hybrid_vit_keep`` patches in the tower (the reference's
  375 of 576, scaled to the geometry), then SAINT in the LLM reaches the budget.

The **graph-only** variant runs SAINT's LLM step on the same layers with ``llm_k`` above
the number of anchors, so the graph is built and ranked but nothing is dropped: its
prefill minus the unpruned prefill is the overhead of the selection.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import api
from ..adapters.common import get_handle
from ..measure.flops import count_flops
from ..measure.memory import peak_memory_mb, peak_memory_method
from ..measure.report import environment, fmt, markdown_table, text_table, write_outputs
from ..measure.timing import synchronize, time_stages_round_robin

METHODS = ("vit", "llm", "hybrid", "fastv", "random", "pool")
REFERENCE_PATCHES = 576  # LLaVA-1.5: CLIP ViT-L/14 at 336 px
REFERENCE_HYBRID_VIT_KEEP = 375  # the reference hybrid setting (576 -> 375 in the tower)
REFERENCE_BUDGETS = (192, 128, 64)
LLM_K, LLM_GAMMA, REFERENCE_TAU = 5, 10.0, 0.83

# CLIP ViT-L/14-336 as in LLaVA-1.5 (openai/clip-vit-large-patch14-336).
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)


@dataclass(frozen=True)
class Geometry:
    """Shapes of a random-weight LLaVA and the layer choices that go with them."""

    name: str
    description: str
    vision: dict[str, int]
    text: dict[str, int]
    image_token_id: int
    llm_layers: tuple[int, int]  # SAINT's LLM pruning layers (inclusive)
    vit_layer: int  # tower layer of the fixed-budget drop (vit / hybrid)
    fastv_layer: int  # FastV's K

    @property
    def grid(self) -> int:
        return self.vision["image_size"] // self.vision["patch_size"]

    @property
    def n_patches(self) -> int:
        """Image tokens per image that the processor emits (``default`` strategy: no CLS)."""
        return self.grid**2

    @property
    def hybrid_vit_keep(self) -> int:
        """The reference's 375 of 576 patches, scaled to this tower."""
        return round(REFERENCE_HYBRID_VIT_KEEP * self.n_patches / REFERENCE_PATCHES)

    def default_budgets(self) -> list[int]:
        """192, 128, 64 of 576, scaled to this tower."""
        return [round(b * self.n_patches / REFERENCE_PATCHES) for b in REFERENCE_BUDGETS]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_patches"] = self.n_patches
        return d


GEOMETRIES: dict[str, Geometry] = {
    "cpu": Geometry(
        "cpu",
        "LLaVA-1.5 vision side (CLIP ViT-L/14-336, 576 patches, 2-layer MLP projector, feature layer -2) + "
        "Llama scaled for a CPU: hidden 1024, 8 layers, 16 heads, MLP 2816, vocab 32064; random weights",
        CLIP_L_336,
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096),
        image_token_id=32000,
        # the reference prunes after layers 7..16 of 32; here from ~1/4 of the depth, over 4
        # layers so 576 -> 64 is reachable (each step removes at most half: 576 / 2**3 > 64)
        llm_layers=(2, 5),
        vit_layer=19,
        fastv_layer=2,
    ),
    "full": Geometry(
        "full",
        "LLaVA-1.5-7B geometry (CLIP ViT-L/14-336 + Vicuna-7B: hidden 4096, 32 layers, 32 heads, MLP 11008, "
        "vocab 32064); random weights",
        CLIP_L_336,
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096),
        image_token_id=32000,
        llm_layers=(7, 16),  # the reference LLaVA-1.5-7B setting
        vit_layer=19,
        fastv_layer=2,
    ),
    "tiny": Geometry(
        "tiny",
        "tiny test LLaVA (CLIP 4 layers, 48 px / patch 4 = 144 patches; Llama hidden 64, 6 layers); random weights",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=48,
             patch_size=4, projection_dim=32),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=256, max_position_embeddings=1024),
        image_token_id=255,
        llm_layers=(1, 4),
        vit_layer=1,
        fastv_layer=2,
    ),
}


def build_llava(geometry: Geometry, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> torch.nn.Module:
    """A random-weight ``LlavaForConditionalGeneration`` of ``geometry`` (sdpa attention),
    created directly on ``device`` in ``dtype`` (no fp32 copy of a 7B model on the host)."""
    import transformers

    vision = transformers.CLIPVisionConfig(**geometry.vision)
    text = transformers.LlamaConfig(**geometry.text, pad_token_id=0)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=geometry.image_token_id,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default",
                                   attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model.eval()


# ---------------------------------------------------------------------------- inputs
@dataclass
class VlmInputs:
    """A batch of prompts with one image each, already on the device, plus what every
    decode step needs (2-D masks, positions), prepared beforehand."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    decode_masks: list[torch.Tensor]
    decode_positions: list[torch.Tensor]
    suppress: torch.Tensor  # [vocab] bool: tokens greedy decoding must not pick (the image token)
    text_tokens: int
    image_tokens: int

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def make_inputs(geometry: Geometry, batch_size: int, prompt_len: int, new_tokens: int,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> VlmInputs:
    """Random prompts: ``prompt_len // 2`` text tokens, the image's tokens, the rest of the
    text (the image tokens sit between a system prompt and a question, as in LLaVA-1.5)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if prompt_len < 1:
        raise ValueError(f"prompt length (text tokens) must be >= 1, got {prompt_len}")
    if new_tokens < 1:
        raise ValueError(f"new tokens must be >= 1, got {new_tokens}")
    n_img = geometry.n_patches
    total = prompt_len + n_img + new_tokens
    max_pos = geometry.text["max_position_embeddings"]
    if total > max_pos:
        raise ValueError(f"prompt ({prompt_len} text + {n_img} image tokens) + {new_tokens} new tokens = {total} "
                         f"exceeds the language model's {max_pos} positions")
    g = torch.Generator().manual_seed(seed)
    img_id = geometry.image_token_id
    text = torch.randint(2, img_id, (batch_size, prompt_len), generator=g)
    text[:, 0] = 1  # BOS
    pre = prompt_len // 2
    ids = torch.cat([text[:, :pre], torch.full((batch_size, n_img), img_id), text[:, pre:]], dim=1)
    size = geometry.vision["image_size"]
    pixels = torch.randn(batch_size, 3, size, size, generator=g)
    length = ids.shape[1]
    dev = torch.device(device)
    ones = torch.ones(batch_size, length + new_tokens, dtype=torch.long, device=dev)
    suppress = torch.zeros(geometry.text["vocab_size"], dtype=torch.bool)
    suppress[img_id] = True
    return VlmInputs(
        input_ids=ids.to(dev),
        attention_mask=ones[:, :length],
        pixel_values=pixels.to(device=dev, dtype=dtype),
        decode_masks=[ones[:, : length + t + 1] for t in range(new_tokens)],
        decode_positions=[torch.full((batch_size, 1), length + t, dtype=torch.long, device=dev)
                          for t in range(new_tokens)],
        suppress=suppress.to(dev),
        text_tokens=prompt_len,
        image_tokens=n_img,
    )


def prefill(model: torch.nn.Module, inputs: VlmInputs) -> Any:
    """The first forward of generation: prompt + image, cache on, logits of the last position."""
    return model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                 pixel_values=inputs.pixel_values, use_cache=True, logits_to_keep=1)


def decode(model: torch.nn.Module, inputs: VlmInputs, out: Any, steps: int | None = None) -> torch.Tensor:
    """``steps`` greedy single-token forwards on ``out``'s cache; returns the tokens fed."""
    cache, logits = out.cache, out.logits[:, -1]
    steps = len(inputs.decode_masks) if steps is None else steps
    fed = []
    for t in range(steps):
        tok = logits.masked_fill(inputs.suppress, float("-inf")).argmax(dim=-1, keepdim=True)
        fed.append(tok)
        o = model(input_ids=tok, attention_mask=inputs.decode_masks[t], position_ids=inputs.decode_positions[t],
                  cache=cache, use_cache=True, logits_to_keep=1)
        logits = o.logits[:, -1]
    return torch.cat(fed, dim=1)


def kv_cache_bytes(cache: Any) -> int | None:
    """Bytes held by a transformers cache's key/value tensors (None if unknown layout)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if not isinstance(t, torch.Tensor):
                return None
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------- variants
@dataclass
class VlmVariant:
    """One row of the benchmark: how the model is patched (``kwargs`` None: unpruned)."""

    name: str
    method: str  # unpruned | graph-only | vit | llm | hybrid | fastv | random | pool
    budget: int | None
    kwargs: dict[str, Any] | None
    calibration: dict[str, Any] | None = None

    @property
    def needs_tau(self) -> bool:
        return self.method in ("llm", "hybrid")


def pool_grid(budget: int, grid: int) -> tuple[int, int]:
    """The most square ``(rows, cols)``, ``rows >= cols``, with ``rows * cols == budget``
    inside a ``grid x grid`` patch grid."""
    best = None
    for cols in range(1, math.isqrt(budget) + 1):
        if budget % cols == 0 and budget // cols <= grid:
            best = (budget // cols, cols)
    if best is None:
        raise ValueError(f"pool cannot keep exactly {budget} tokens of a {grid}x{grid} grid "
                         f"(no rows x cols = {budget} with both <= {grid}); choose another budget or drop pool")
    return best


def fastv_ratio(n: int, budget: int) -> float:
    """FastV's drop ratio that leaves exactly ``budget`` of ``n`` image tokens (the adapter
    keeps ``floor(n * (1 - ratio) + 1e-9)``; checked here)."""
    if not 1 <= budget <= n:
        raise ValueError(f"fastv budget {budget} must be in 1..{n}")
    ratio = (n - budget) / n
    kept = math.floor(n * (1.0 - ratio) + 1e-9)
    if kept != budget:  # pragma: no cover - floating point safety net
        raise RuntimeError(f"fastv_ratio={ratio!r} keeps {kept} of {n}, not {budget}")
    return ratio


def budget_variants(geometry: Geometry, budgets: Sequence[int], methods: Sequence[str] = METHODS, *,
                    llm_layers: tuple[int, int] | None = None, vit_layer: int | None = None,
                    fastv_layer: int | None = None, hybrid_vit_keep: int | None = None,
                    llm_k: int = LLM_K, llm_gamma: float = LLM_GAMMA, graph_only: bool = True) -> list[VlmVariant]:
    """Unpruned, graph-only (when asked) and each method at each budget. ``llm``/``hybrid``
    come without ``llm_tau``: :func:`calibrate_tau` fills it in."""
    n = geometry.n_patches
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b < n:
            raise ValueError(f"budget {b!r} must be an integer in 1..{n - 1} (visual tokens per image of {n})")
    layers = tuple(llm_layers or geometry.llm_layers)
    vit_layer = geometry.vit_layer if vit_layer is None else vit_layer
    fastv_layer = geometry.fastv_layer if fastv_layer is None else fastv_layer
    keep_h = geometry.hybrid_vit_keep if hybrid_vit_keep is None else hybrid_vit_keep
    llm = dict(llm_layers=layers, llm_k=llm_k, llm_gamma=llm_gamma)
    out = [VlmVariant("unpruned", "unpruned", None, None)]
    if graph_only:
        out.append(VlmVariant("graph-only (SAINT llm step, drops nothing)", "graph-only", None,
                              dict(mode="llm", llm_layers=layers, llm_tau=REFERENCE_TAU, llm_k=n + 1,
                                   llm_gamma=llm_gamma)))
    for b in sorted(budgets, reverse=True):
        for m in methods:
            if m == "vit":
                kw: dict[str, Any] = dict(mode="vit", vit_keep=b, vit_layer=vit_layer)
            elif m == "llm":
                kw = dict(mode="llm", **llm)
            elif m == "hybrid":
                if b >= keep_h:
                    raise ValueError(f"hybrid keeps {keep_h} patches in the tower, so budget {b} leaves nothing "
                                     f"for the LLM step; use a budget < {keep_h} or a larger --hybrid-vit-keep")
                kw = dict(mode="hybrid", vit_keep=keep_h, vit_layer=vit_layer, **llm)
            elif m == "fastv":
                kw = dict(method="fastv", fastv_layer=fastv_layer, fastv_ratio=fastv_ratio(n, b))
            elif m == "random":
                kw = dict(method="random", visual_keep=b, seed=0)
            else:
                kw = dict(method="pool", visual_keep=pool_grid(b, geometry.grid))
            name = f"saint-{m}@{b}" if m in ("vit", "llm", "hybrid") else f"{m}@{b}"
            out.append(VlmVariant(name, m, b, kw))
    return out


def _activate(model: torch.nn.Module, variant: VlmVariant) -> None:
    if variant.kwargs is None:
        if api.is_patched(model):
            api.unpatch(model)
        return
    if variant.needs_tau and "llm_tau" not in variant.kwargs:
        raise ValueError(f"{variant.name}: calibrate llm_tau first (calibrate_tau)")
    api.patch(model, **variant.kwargs)


def visual_tokens(model: torch.nn.Module, inputs: VlmInputs) -> dict[str, Any]:
    """Visual tokens per image in the last forward: handed to the language model, entering
    each decoder layer, after the last layer (means over the batch)."""
    depth = len(model.model.language_model.layers)
    if not api.is_patched(model):
        n = float(inputs.image_tokens)
        to_llm, per_layer, after, per_sample = n, [n] * depth, n, [inputs.image_tokens] * inputs.batch_size
        vit = None
    else:
        st = api.stats(model)
        means = st.mean()
        to_llm, per_layer, after = means[0], means[1:-1], means[-1]
        per_sample = list(st.tokens[-1])
        vs = get_handle(model).vision_stats()
        vit = None if vs is None else vs.mean()
    return {
        "to_llm": to_llm,
        "after": after,
        "after_per_sample": per_sample,
        "per_layer": per_layer,
        "layer_mean": sum(per_layer) / len(per_layer),
        "vision_tower_per_layer": vit,
    }


# ---------------------------------------------------------------------------- tau
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


# ---------------------------------------------------------------------------- measuring
@dataclass
class VlmResult:
    """Timings (seconds) and the profile of one variant."""

    variant: VlmVariant
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)  # whole decode loop per repeat
    profile: dict[str, Any] = field(default_factory=dict)


def _ms(times: Sequence[float], per: int = 1) -> dict[str, Any]:
    """Minimum (the reported figure), median and spread (max - min) in ms."""
    if not times:
        return {"ms_min": None, "ms_median": None, "ms_spread": None, "times_ms": []}
    ms = [1e3 * t / per for t in times]
    return {"ms_min": min(ms), "ms_median": statistics.median(ms), "ms_spread": max(ms) - min(ms), "times_ms": ms}


def time_variants(model: torch.nn.Module, inputs: VlmInputs, variants: Sequence[VlmVariant], *,
                  device: torch.device | str, warmup: int = 1, repeats: int = 5,
                  progress: Callable[[int], None] | None = None) -> list[VlmResult]:
    """Interleaved round-robin (:func:`saint.measure.timing.time_stages_round_robin`):
    each round runs every variant once (the start rotates per round); per run, the
    prefill is timed, then the decode loop on its cache."""
    with torch.inference_mode():
        times = time_stages_round_robin(
            [lambda v=v: _activate(model, v) for v in variants],
            [[lambda _: prefill(model, inputs), lambda out: decode(model, inputs, out)] for _ in variants],
            device=device, warmup=warmup, repeats=repeats, progress=progress,
        )
    return [VlmResult(v, prefill_s=t[0], decode_s=t[1]) for v, t in zip(variants, times, strict=True)]


class _Stopwatch:
    """Wall time of wrapped calls (device-synchronised), summed per forward."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.total = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(self.device)
            self.total += time.perf_counter() - t0
            return out

        return timed


def profile_variant(model: torch.nn.Module, inputs: VlmInputs, variant: VlmVariant, *,
                    device: torch.device | str, memory: bool = True, flops: bool = True) -> dict[str, Any]:
    """One untimed prefill + decode of ``variant``: visual tokens, KV-cache size, peak
    memory, the language model's and the SAINT selection's wall time in that prefill, and
    (a separate prefill) its FLOPs."""
    _activate(model, variant)
    lm = model.model.language_model
    selection = _Stopwatch(device)
    handle = get_handle(model)
    pruner = getattr(handle, "pruner", None)
    saint_llm = variant.method in ("llm", "hybrid", "graph-only")
    if saint_llm and pruner is not None:  # time each selection call of the adapter's DecoderPruner
        pruner.schedule = {i: selection.wrap(fn) for i, fn in pruner.schedule.items()}
    lm_time: list[float] = []

    def lm_pre(*_: Any) -> None:
        synchronize(device)
        lm_time.append(-time.perf_counter())

    def lm_post(*_: Any) -> None:
        synchronize(device)
        lm_time[-1] += time.perf_counter()

    seen: dict[str, Any] = {}

    def run() -> None:
        out = prefill(model, inputs)
        seen["tokens"] = visual_tokens(model, inputs)
        seen["kv"] = kv_cache_bytes(out.cache)
        seen["lm_prefill_s"] = lm_time[0]
        seen["selection_s"] = selection.total
        decode(model, inputs, out)

    hooks = [lm.register_forward_pre_hook(lm_pre), lm.register_forward_hook(lm_post)]
    try:
        with torch.inference_mode():
            if memory:
                peak = peak_memory_mb(run, device)
            else:
                run()
                peak = None
    finally:
        for h in hooks:
            h.remove()
        _activate(model, variant)  # a fresh patch: drops the stopwatch wrappers
    total_flops = None
    if flops:
        total_flops, _ = count_flops(lambda: prefill(model, inputs))
    b = inputs.batch_size
    return {
        "visual_tokens": seen["tokens"],
        "kv_cache_mb": None if seen["kv"] is None else seen["kv"] / 2**20,
        "peak_memory_mb": peak,
        "lm_prefill_ms": 1e3 * seen["lm_prefill_s"],
        "selection_ms": 1e3 * seen["selection_s"] if saint_llm else None,
        "prefill_gflops_per_prompt": None if total_flops is None else total_flops / b / 1e9,
    }


def run_vlm_bench(model: torch.nn.Module, inputs: VlmInputs, variants: Sequence[VlmVariant], *,
                  device: torch.device | str, warmup: int = 1, repeats: int = 5, memory: bool = True,
                  flops: bool = True, tau_iters: int = 12,
                  progress: Callable[[str, int], Callable[[int], None] | None] | None = None) -> dict[str, Any]:
    """Calibrate tau for ``llm``/``hybrid``, time every variant round-robin, profile each
    once; returns the report's ``variants`` and ``graph_overhead`` sections."""
    if api.is_patched(model):
        raise ValueError("give run_vlm_bench an unpatched model; it patches it per variant")
    variants = list(variants)
    if not variants or variants[0].method != "unpruned":
        raise ValueError("the first variant must be the unpruned model (budget_variants puts it first)")
    t_start = time.perf_counter()
    histories: dict[tuple[str, Any], list[tuple[float, float]]] = {}
    to_cal = [v for v in variants if v.needs_tau]
    bar = progress("calibrating tau", len(to_cal)) if progress and to_cal else None
    for v in to_cal:
        assert v.kwargs is not None
        key = (v.method, v.kwargs.get("vit_keep"))
        calibrate_tau(model, inputs, v, iters=tau_iters, history=histories.setdefault(key, []))
        if bar:
            bar(1)
    t_cal = time.perf_counter()
    bar = progress("timing (round-robin)", warmup + repeats) if progress else None
    results = time_variants(model, inputs, variants, device=device, warmup=warmup, repeats=repeats, progress=bar)
    t_time = time.perf_counter()
    bar = progress("profile pass", len(variants)) if progress else None
    for r in results:
        r.profile = profile_variant(model, inputs, r.variant, device=device, memory=memory, flops=flops)
        if bar:
            bar(1)
    if api.is_patched(model):
        api.unpatch(model)
    t_end = time.perf_counter()
    steps = len(inputs.decode_masks)
    base = results[0]
    base_ttft = min(base.prefill_s)  # speed-ups from the minimum over rounds (spread reported)
    base_dec = min(base.decode_s)
    rows = []
    for r in results:
        v = r.variant
        ttft = min(r.prefill_s)
        dec = min(r.decode_s)
        rows.append({
            "name": v.name,
            "method": v.method,
            "budget": v.budget,
            "patch_kwargs": _jsonable(v.kwargs),
            "calibration": v.calibration,
            "ttft": _ms(r.prefill_s),
            "decode_per_token": _ms(r.decode_s, per=steps),
            "ttft_speedup": base_ttft / ttft,
            "decode_speedup": base_dec / dec,
            **r.profile,
        })
    graph = next((row for row in rows if row["method"] == "graph-only"), None)
    overhead = None
    if graph is not None:
        g_med = graph["ttft"]["ms_median"]
        b_med = rows[0]["ttft"]["ms_median"]
        overhead = {
            "selection_ms": graph["selection_ms"],
            "selection_fraction_of_ttft": graph["selection_ms"] / b_med,
            "selection_fraction_of_lm_prefill": graph["selection_ms"] / rows[0]["lm_prefill_ms"],
            "graph_only_ttft_ms_median": g_med,
            "unpruned_ttft_ms_median": b_med,
            "ttft_difference_ms": g_med - b_med,
            "ttft_ratio": g_med / b_med,
            "note": ("selection_ms: wall time of SAINT's selection (keys, RoPE, similarity graph, ranking) summed "
                     "over the pruning layers of one prefill with every image token present (profile pass, one "
                     "run); the TTFT columns compare medians of the timed rounds"),
        }
    return {
        "variants": rows,
        "graph_overhead": overhead,
        "seconds": {"calibration": round(t_cal - t_start, 1), "timing": round(t_time - t_cal, 1),
                    "profile": round(t_end - t_time, 1)},
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


# ---------------------------------------------------------------------------- full run
def vlm_report(geometry: Geometry, *, device: torch.device | str, dtype: torch.dtype, batch_size: int = 1,
               prompt_len: int = 64, new_tokens: int = 16, budgets: Sequence[int] | None = None,
               methods: Sequence[str] = METHODS, warmup: int = 1, repeats: int = 5, memory: bool = True,
               flops: bool = True, graph_only: bool = True, tau_iters: int = 12, seed: int = 0,
               llm_layers: tuple[int, int] | None = None, vit_layer: int | None = None,
               fastv_layer: int | None = None, hybrid_vit_keep: int | None = None,
               argv: Sequence[str] | None = None,
               progress: Callable[[str, int], Callable[[int], None] | None] | None = None) -> dict[str, Any]:
    """Build the model and inputs, run :func:`run_vlm_bench`, and return the whole report
    (environment, geometry, settings, variants, graph overhead)."""
    import transformers

    start = time.perf_counter()
    budgets = list(geometry.default_budgets() if budgets is None else budgets)
    variants = budget_variants(geometry, budgets, methods, llm_layers=llm_layers, vit_layer=vit_layer,
                               fastv_layer=fastv_layer, hybrid_vit_keep=hybrid_vit_keep, graph_only=graph_only)
    inputs = make_inputs(geometry, batch_size, prompt_len, new_tokens, device, dtype, seed)
    model = build_llava(geometry, device, dtype, seed)
    built = time.perf_counter()
    body = run_vlm_bench(model, inputs, variants, device=device, warmup=warmup, repeats=repeats, memory=memory,
                         flops=flops, tau_iters=tau_iters, progress=progress)
    env = environment(device, argv)
    env["versions"]["transformers"] = transformers.__version__
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    settings = {
        "device": str(device),
        "dtype": dt,
        "batch_size": batch_size,
        "text_tokens": prompt_len,
        "image_tokens": inputs.image_tokens,
        "prompt_tokens": inputs.length,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "seed": seed,
        "budgets": sorted(budgets, reverse=True),
        "methods": list(methods),
        "llm_layers": list(llm_layers or geometry.llm_layers),
        "vit_layer": geometry.vit_layer if vit_layer is None else vit_layer,
        "fastv_layer": geometry.fastv_layer if fastv_layer is None else fastv_layer,
        "hybrid_vit_keep": geometry.hybrid_vit_keep if hybrid_vit_keep is None else hybrid_vit_keep,
        "llm_k": LLM_K,
        "llm_gamma": LLM_GAMMA,
        "tau_iters": tau_iters,
        "memory_method": peak_memory_method(device) if memory else None,
    }
    body["seconds"]["build"] = round(built - start, 1)
    return {
        "environment": env,
        "geometry": geometry.as_dict(),
        "model": geometry.description,
        "settings": settings,
        **body,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


# ---------------------------------------------------------------------------- output
HEADERS = ["variant", "budget", "vis->LLM", "vis after", "vis/layer", "tau", "TTFT ms min", "TTFT spread",
           "TTFT x", "decode ms/tok min", "decode spread", "decode x", "KV MB", "peak MB", "GFLOPs"]


def _rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in report["variants"]:
        t = r["visual_tokens"]
        cal = r.get("calibration") or {}
        after = fmt(t["after"], 1) + ("" if cal.get("reachable", True) else " (floor)")
        rows.append([
            r["name"],
            fmt(r["budget"]) if r["budget"] is not None else "-",
            fmt(t["to_llm"], 1),
            after,
            fmt(t["layer_mean"], 1),
            fmt(r["patch_kwargs"]["llm_tau"], 4) if r["method"] in ("llm", "hybrid") else "-",
            fmt(r["ttft"]["ms_min"], 1),
            fmt(r["ttft"]["ms_spread"], 1),
            fmt(r["ttft_speedup"], 2),
            fmt(r["decode_per_token"]["ms_min"], 2),
            fmt(r["decode_per_token"]["ms_spread"], 2),
            fmt(r["decode_speedup"], 2),
            fmt(r["kv_cache_mb"], 1),
            fmt(r["peak_memory_mb"], 0),
            fmt(r["prefill_gflops_per_prompt"], 1),
        ])
    return rows


def _overhead_lines(report: dict[str, Any]) -> list[str]:
    o = report.get("graph_overhead")
    if not o:
        return []
    return [
        f"SAINT graph step (LLM, layers {report['settings']['llm_layers']}, nothing dropped): selection "
        f"{o['selection_ms']:.2f} ms per prefill = {100 * o['selection_fraction_of_ttft']:.2f}% of the unpruned "
        f"TTFT ({100 * o['selection_fraction_of_lm_prefill']:.2f}% of its language-model prefill); graph-only TTFT "
        f"median {o['graph_only_ttft_ms_median']:.1f} ms vs unpruned {o['unpruned_ttft_ms_median']:.1f} ms "
        f"({o['ttft_difference_ms']:+.1f} ms, x{o['ttft_ratio']:.3f})",
    ]


def _notes(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    mem = s["memory_method"] or "not measured"
    return [
        f"prompt: {s['text_tokens']} text + {s['image_tokens']} image tokens per row, batch {s['batch_size']}, "
        f"{s['dtype']} on {s['device']}; decode: {s['new_tokens']} greedy single-token steps on the prefill's cache",
        f"timing: {s['warmup']} warm-up + {s['repeats']} timed interleaved round-robin rounds"
        f"{'' if s['repeats'] >= 5 else ' (fewer than 5: indicative only)'}; minimum over rounds, spread = "
        "max - min; speed-ups from the minima; TTFT = one prefill "
        "forward (vision tower + projector + pruning + LLM + LM head on the last position)",
        "vis->LLM / vis after / vis/layer: mean visual tokens per image handed to the LLM, after its last layer, "
        "and averaged over its layers; budgets: vit/random/pool keep = budget, fastv ratio = (n - budget)/n at "
        f"layer {s['fastv_layer']}, llm/hybrid tau searched on this prompt (hybrid keeps "
        f"{s['hybrid_vit_keep']} in the tower first); '(floor)': budget below what SAINT's layers can reach",
        f"KV MB: exact cache size after prefill; peak MB: {mem}; GFLOPs: prefill per prompt (matmul/attention)",
        "random weights: costs are those of the geometry, not of a trained model's outputs",
    ]


def format_vlm_bench(report: dict[str, Any]) -> str:
    """The report as plain text for the terminal."""
    env = report["environment"]
    lines = [f"model: {report['model']}", f"device: {env['device']}", "",
             text_table(HEADERS, _rows(report)), ""]
    lines += _overhead_lines(report)
    lines += ["", *[f"- {n}" for n in _notes(report)]]
    return "\n".join(lines)


def markdown_vlm_bench(report: dict[str, Any], title: str = "LLaVA latency at equal visual-token budgets") -> str:
    """The report as a markdown page: environment, table, graph overhead, notes."""
    env = report["environment"]
    v = env["versions"]
    lines = [
        f"# {title}", "",
        f"- date: {env['date']}",
        f"- device: {env['device']}",
        f"- cpu: {env['cpu']}; torch threads: {env['torch_threads']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- platform: {env['platform']}",
        f"- command: `{env['command']}`",
        f"- model: {report['model']}",
        f"- wall time: {report['wall_seconds']} s", "",
        markdown_table(HEADERS, _rows(report)), "",
    ]
    lines += _overhead_lines(report)
    lines += ["", *[f"- {n}" for n in _notes(report)], ""]
    return "\n".join(lines)


def write_vlm_report(report: dict[str, Any], prefix: str | Path, formats: Sequence[str] = ("json", "md"),
                     title: str = "LLaVA latency at equal visual-token budgets") -> list[Path]:
    """Write ``prefix.json`` / ``prefix.md``; returns the paths written."""
    return write_outputs(report, prefix, formats,
                         {"md": lambda path: path.write_text(markdown_vlm_bench(report, title))})

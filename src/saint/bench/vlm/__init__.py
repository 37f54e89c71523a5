"""VLM latency at equal visual-token budgets (``saint vlm-bench``): time to first
token, decode time per token, KV-cache size and peak memory of the unpruned model,
SAINT's three VLM modes and the FastV / random / pooling baselines, for LLaVA-1.5,
Qwen2.5-VL and Qwen3-VL.

What is measured, and how:

* **Model.** Random weights (so nothing is downloaded), with the geometry chosen by
  :data:`GEOMETRIES`. LLaVA-1.5 (:mod:`.llava_geometry`): CLIP ViT-L/14 at 336 px (576
  patches), the 2-layer MLP projector, features from layer -2 without the class token,
  and a Llama (``full``: LLaVA-1.5-7B's; ``cpu``: a CPU-sized one). Qwen2.5-VL
  (:mod:`.qwen_geometry`): the window-attention tower and 2x2 merger and a Qwen2 with
  M-RoPE, one 448x448 image = 256 visual tokens (``qwen_full``: Qwen2.5-VL-7B's). Qwen3-VL
  (:mod:`.qwen3_geometry`): the full-attention tower with its deepstack mergers and a Qwen3
  with interleaved M-RoPE, one 512x512 image = 256 visual tokens (``qwen3_full``:
  Qwen3-VL-8B's). The ``scaled`` / ``qwen_scaled`` / ``qwen3_scaled`` geometries shrink the
  7B's (8B's) tower and LLM alike, keeping their prefill FLOPs ratio, so pruning on either
  side weighs as it does at full size; the analytic prefill-FLOPs speed-up at the real
  shapes is reported beside the measured one (:mod:`.analytic`). Cost does not depend on the weights' values, except
  that SAINT's dynamic token count does, hence the tau rule below.
* **Prompt.** ``prompt_len`` random text tokens, the first half before the image (the
  system prompt) and the rest after it (the question), around the image's tokens (and
  Qwen-VL's vision start/end markers); every row of the batch has its own text and image
  (random pixels) and the same length, so there is no padding. Inputs, masks and decode
  positions (Qwen-VL: M-RoPE's) are built and moved to the device before any timing.
* **Time to first token** = one ``model(..., use_cache=True, logits_to_keep=1)`` over
  the prompt and its images (vision tower, projector, all pruning, language model, LM
  head on the last position), as ``generate`` does for its first step.
* **Decode ms/token** = ``new_tokens`` single-token forwards on that prefill's cache,
  greedy (argmax, image/video tokens suppressed), divided by ``new_tokens``.
* **Timing**: every round runs every variant once, in an order that rotates per round
  (:func:`saint.measure.timing.time_stages_round_robin`, the timer ``saint bench`` uses
  too; the prefill and the decode loop on its cache are two timed stages of one run);
  ``warmup`` untimed rounds first; device sync around each timed region; the minimum
  over >= 5 rounds is reported, with the spread (max - min).
* **Profile pass** (once per variant, after timing, untimed): visual tokens per layer
  (``saint.stats``), exact KV-cache bytes after prefill, peak memory of prefill +
  decode (:func:`saint.measure.memory.peak_memory_mb`: CUDA ``max_memory_allocated``;
  approximate RSS on Linux CPUs), the wall time of the language model and of SAINT's
  graph selection inside that one prefill, and prefill FLOPs (matmul/attention only).

Budgets (visual tokens per image after pruning, of the ``n`` the processor emits;
default: 50% and 25% for the scaled geometries, 192/128/64 of 576 scaled otherwise):

* ``vit``, ``random``, ``pool``: exactly the budget (LLaVA: ``vit_keep`` /
  ``visual_keep``, pool on the most square ``rows x cols`` grid; Qwen-VL: ``vit_ratio`` /
  ``keep_ratio`` of the merge groups, pool on ``p x p`` windows, so only the budgets that
  grid gives; without ``methods`` the others are skipped and listed).
* ``fastv``: ``fastv_ratio = (n - budget) / n`` at ``fastv_layer`` (FastV's K), so
  exactly ``budget`` image tokens enter layers K and later.
* ``llm`` / ``hybrid``: SAINT's count is dynamic. The taus come from
  :func:`saint.calibrate` (per layer) on this benchmark's own prompt and images, with the
  ``keep`` target of the schedule that removes the same share in every pruning layer and
  ends at the budget (:func:`calibrate_variant`); the count reached after the last
  pruning layer is reported next to the budget, and flagged when the budget is below
  what the pruning layers can reach (each SAINT step removes at most half of the image
  tokens). Hybrid first keeps ``hybrid_vit_keep`` tokens in the tower (the reference's
  375 of 576, scaled to the geometry), then SAINT in the LLM reaches the budget.

The **graph-only** variant runs SAINT's LLM step on the same layers with ``llm_k`` above
the number of anchors, so the graph is built and ranked but nothing is dropped: its
prefill minus the unpruned prefill is the overhead of the selection.

Modules: ``geometry`` (the family interface and scaling), ``llava_geometry`` /
``qwen_geometry`` / ``qwen3_geometry`` (the families), ``analytic`` (prefill FLOPs at any geometry), ``inputs``
(prompts, prefill/decode), ``variants`` (budgets -> settings), ``tau`` (llm/hybrid taus for
a budget), ``run`` (timing, profile, the full run), ``report`` (text, markdown, files).
"""

from __future__ import annotations

from .analytic import (
    measured_schedule,
    prefill_flops,
    stretch,
    stretched_schedule,
    tower_llm_ratio,
    unpruned_schedule,
)
from .geometry import (
    LLM_GAMMA,
    LLM_K,
    METHODS,
    REFERENCE_BUDGETS,
    REFERENCE_HYBRID_VIT_KEEP,
    REFERENCE_PATCHES,
    REFERENCE_TAU,
    Geometry,
    scale_geometry,
)
from .inputs import VlmInputs, decode, kv_cache_bytes, make_inputs, prefill
from .llava_geometry import CLIP_L_336, LlavaGeometry, pool_grid
from .llava_geometry import GEOMETRIES as LLAVA_GEOMETRIES
from .qwen3_geometry import GEOMETRIES as QWEN3_GEOMETRIES
from .qwen3_geometry import Qwen3VLGeometry, interleaved_mrope_section
from .qwen_geometry import GEOMETRIES as QWEN_GEOMETRIES
from .qwen_geometry import QwenGeometry, mrope_section, pool_side
from .report import HEADERS, format_vlm_bench, markdown_vlm_bench, write_vlm_report
from .run import VlmResult, add_analytic, profile_variant, run_vlm_bench, time_variants, vlm_report
from .tau import calibrate_variant, floor_count, keep_target
from .variants import VlmVariant, budget_variants, fastv_ratio, unreachable, visual_tokens

GEOMETRIES: dict[str, Geometry] = {**LLAVA_GEOMETRIES, **QWEN_GEOMETRIES, **QWEN3_GEOMETRIES}

__all__ = [
    "CLIP_L_336",
    "GEOMETRIES",
    "HEADERS",
    "LLM_GAMMA",
    "LLM_K",
    "METHODS",
    "REFERENCE_BUDGETS",
    "REFERENCE_HYBRID_VIT_KEEP",
    "REFERENCE_PATCHES",
    "REFERENCE_TAU",
    "Geometry",
    "LlavaGeometry",
    "Qwen3VLGeometry",
    "QwenGeometry",
    "VlmInputs",
    "VlmResult",
    "VlmVariant",
    "add_analytic",
    "budget_variants",
    "calibrate_variant",
    "decode",
    "fastv_ratio",
    "interleaved_mrope_section",
    "floor_count",
    "format_vlm_bench",
    "keep_target",
    "kv_cache_bytes",
    "make_inputs",
    "markdown_vlm_bench",
    "measured_schedule",
    "mrope_section",
    "pool_grid",
    "pool_side",
    "prefill",
    "prefill_flops",
    "profile_variant",
    "run_vlm_bench",
    "scale_geometry",
    "stretch",
    "stretched_schedule",
    "time_variants",
    "tower_llm_ratio",
    "unpruned_schedule",
    "unreachable",
    "visual_tokens",
    "vlm_report",
    "write_vlm_report",
]

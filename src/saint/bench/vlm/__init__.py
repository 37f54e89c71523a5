"""LLaVA latency at equal visual-token budgets (``saint vlm-bench``): time to first
token, decode time per token, KV-cache size and peak memory of the unpruned model,
SAINT's three VLM modes and the FastV / random / pooling baselines.

What is measured, and how:

* **Model.** A ``LlavaForConditionalGeneration`` with random weights (so nothing is
  downloaded) and LLaVA-1.5's real vision side: CLIP ViT-L/14 at 336 px (576 patches),
  the 2-layer MLP projector, features from layer -2 without the class token. The
  language model is a Llama whose geometry is chosen by :data:`GEOMETRIES` (scaled down
  for a CPU; ``full`` is LLaVA-1.5-7B's; ``scaled`` shrinks the tower and the LLM of
  ``full`` alike, keeping their prefill FLOPs ratio, so pruning on either side weighs as
  it does at 7B). Cost does not depend on the weights' values,
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
  (:func:`saint.measure.timing.time_stages_round_robin`, the timer ``saint bench`` uses
  too; the prefill and the decode loop on its cache are two timed stages of one run);
  ``warmup`` untimed rounds first; device sync around each timed region; the minimum
  over >= 5 rounds is reported, with the spread (max - min).
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

Modules: ``geometry`` (the model), ``inputs`` (prompts, prefill/decode), ``variants``
(budgets -> settings), ``tau`` (llm/hybrid tau for a budget), ``run`` (timing, profile,
the full run), ``report`` (text, markdown, files).
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
    CLIP_L_336,
    GEOMETRIES,
    LLM_GAMMA,
    LLM_K,
    METHODS,
    REFERENCE_BUDGETS,
    REFERENCE_HYBRID_VIT_KEEP,
    REFERENCE_PATCHES,
    REFERENCE_TAU,
    Geometry,
    build_llava,
    scale_geometry,
)
from .inputs import VlmInputs, decode, kv_cache_bytes, make_inputs, prefill
from .report import HEADERS, format_vlm_bench, markdown_vlm_bench, write_vlm_report
from .run import VlmResult, add_analytic, profile_variant, run_vlm_bench, time_variants, vlm_report
from .tau import calibrate_tau
from .variants import VlmVariant, budget_variants, fastv_ratio, pool_grid, visual_tokens

__all__ = [
    "LLM_GAMMA",
    "LLM_K",
    "REFERENCE_TAU",
    "CLIP_L_336",
    "GEOMETRIES",
    "Geometry",
    "HEADERS",
    "METHODS",
    "REFERENCE_BUDGETS",
    "REFERENCE_HYBRID_VIT_KEEP",
    "REFERENCE_PATCHES",
    "VlmInputs",
    "VlmResult",
    "VlmVariant",
    "add_analytic",
    "budget_variants",
    "build_llava",
    "calibrate_tau",
    "decode",
    "fastv_ratio",
    "format_vlm_bench",
    "kv_cache_bytes",
    "make_inputs",
    "measured_schedule",
    "prefill_flops",
    "scale_geometry",
    "stretch",
    "stretched_schedule",
    "tower_llm_ratio",
    "unpruned_schedule",
    "markdown_vlm_bench",
    "pool_grid",
    "prefill",
    "profile_variant",
    "run_vlm_bench",
    "time_variants",
    "visual_tokens",
    "vlm_report",
    "write_vlm_report",
]

"""Dropping tokens between the decoder layers of a Hugging Face LLM (transformers 5:
``LlamaModel``, ``MistralModel``, ``Qwen2Model``, the Qwen-VL text models, Gemma, Cohere 2;
see :data:`DECODERS`) with per-instance PyTorch hooks only.

The decoder loop hands every layer the same ``attention_mask`` (4-D, or None when
sdpa can use ``is_causal``), rotary ``position_embeddings`` (cos, sin) and
``position_ids``, all sized for the sequence that entered layer 0. A forward hook on
a pruning layer shortens that layer's output; a pre-hook on every later layer
gathers those three arguments for the surviving tokens. So kept tokens keep their
original position ids, each layer's KV cache holds exactly the slots that entered
that layer, and the model's own attention kernel (sdpa or eager) runs unchanged.

Ragged per-sample results are right-aligned: the real tokens of a row sit at the end
in their original order, preceded by pad slots that are masked as keys (prefill and
every later decoding step). The last position of every row is never dropped.

While decoding, new tokens get their positions from the caller (``generate``
computes them from the 2-D attention mask; layer 0 is never pruned, so the model's
fallback "layer-0 cache length" is the original prompt length as well). The causal
mask is built for layer 0's cache; a pruned layer's columns are gathered through
``[its prompt slots, then every position after the prompt]``, and for a static cache
every slot beyond the layer's own filled length stays masked.

The per-layer maps of a pruned prompt (:class:`PrunedPrompt`) are stored on the
cache object itself, so several cached generations may interleave; the per-forward
state lives on the :class:`DecoderPruner` (one forward at a time per model).

Layers that rotate nothing (Cohere 2's global layers, NoPE) are read unrotated
(:func:`rotates`). Sliding-window layers (Mistral, Gemma 2, Gemma 3, Cohere 2) keep their window of *positions*: a prefill
that may prune gets a cache whose sliding layers keep every slot
(:func:`keep_every_slot`), so the model builds its sliding mask over the whole sequence
and each layer gathers it like any other. (A window of cache slots would cover other
positions in a pruned layer than in layer 0.) The price is a full-length cache on those
layers.

Gemma 4: each layer's per-layer input embeddings (its second argument) are gathered like the
rotary tables. On E2B / E4B the last layers reuse the keys and values (and the cache slots)
that an earlier layer of their type stores (:func:`kv_sources`), so tokens may be dropped
only after layers before the first storing one (:func:`check_kv_sharing`); when ``generate``
runs those layers on the last token only (``logits_to_keep``), their mask rows are that
token's, gathered to the stored slots.

Fragile points (tested): the hook kwarg names of transformers 5.24 (``cache``,
``attention_mask``, ``position_embeddings``, ``position_ids``); flex/flash attention
masks cannot be gathered (refused).
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..core import gather_tokens, keep_mask_to_indices, query_attention
from .common import MASKABLE_ATTENTION, Hooked, PatchedBlocks, transformers_classes

PRUNED_PROMPT_ATTR = "_saint_pruned_prompt"


DECODERS = (  # (transformers module, decoder class): the decoders saint prunes in
    ("llama", "LlamaModel"),  # Llama, Vicuna, Yi: LLaVA-1.5, LLaVA-NeXT
    ("mistral", "MistralModel"),  # LLaVA-NeXT-Mistral, Mistral 3 (a sliding window: see keep_every_slot)
    ("ministral3", "Ministral3Model"),  # Ministral 3 / Magistral VLMs (Mistral 3): position-scaled queries
    ("qwen2", "Qwen2Model"),  # LLaVA-OneVision, LLaVA-Interleave
    ("qwen3", "Qwen3Model"),  # q/k norms: the selections read the normed keys and queries
    ("gemma", "GemmaModel"),  # LLaVA-Gemma
    ("gemma2", "Gemma2Model"),  # PaliGemma 2: sliding-window layers, softcapped logits (FastV refused)
    ("gemma3", "Gemma3TextModel"),  # Gemma 3: q/k norms, five sliding-window layers to one global
    ("phi3", "Phi3Model"),  # LLaVA-Phi-3: one fused qkv_proj (the selections read its query and key columns)
    ("qwen2_vl", "Qwen2VLTextModel"),
    ("qwen2_5_vl", "Qwen2_5_VLTextModel"),
    ("qwen3_vl", "Qwen3VLTextModel"),
    ("qwen3_vl_moe", "Qwen3VLMoeTextModel"),  # Qwen3-VL-30B-A3B / 235B-A22B: experts are token-wise
    ("glm4v", "Glm4vTextModel"),  # GLM-4.1V: half-rotary M-RoPE (its module's apply_rotary_pos_emb)
    ("glm4v_moe", "Glm4vMoeTextModel"),  # GLM-4.5V: routed + shared experts, token-wise
    ("glm_ocr", "GlmOcrTextModel"),  # GLM-OCR: GLM-4.1V's text model
    ("qwen2_5_omni", "Qwen2_5OmniThinkerTextModel"),  # Qwen2.5-Omni's thinker (M-RoPE; audio tokens stay)
    ("qwen3_omni_moe", "Qwen3OmniMoeThinkerTextModel"),  # Qwen3-Omni's thinker: experts token-wise, deepstack
    ("granite", "GraniteModel"),  # Granite Vision 3.x (LLaVA-NeXT): attention scaled by its attention_multiplier
    ("cohere2", "Cohere2Model"),  # Aya Vision, Command A Vision: sliding-window layers rotary, global layers NoPE
    ("gemma4", "Gemma4TextModel"),  # Gemma 4: per-layer input embeddings, q/k norms, sliding-window layers
    ("paddleocr_vl", "PaddleOCRTextModel"),  # PaddleOCR-VL: ERNIE 4.5 with M-RoPE ids [3, B, L]
)
SUPPORTED_DECODERS = ", ".join(name for _, name in DECODERS)
# Hybrid decoders whose linear-attention (Gated DeltaNet) or short-convolution layers keep a recurrent state, not a
# cache of tokens: saint cannot drop tokens between their layers, but a prompt shortened before
# the language model (the vision-side methods) runs through them as any prompt does.
VISION_ONLY_DECODERS = (  # (module, class, the layers that keep a state, the vision-side methods of its VLMs)
    ("qwen3_5", "Qwen3_5TextModel", "linear-attention", "mode='vit', method='random' or 'pool'"),  # Qwen3.5
    ("qwen3_5_moe", "Qwen3_5MoeTextModel", "linear-attention", "mode='vit', method='random' or 'pool'"),
    ("lfm2", "Lfm2Model", "short-convolution", "mode='vit' or method='random'"),  # LFM2 (LFM2-VL)
)
LAYER_TYPES = ("full_attention", "sliding_attention")  # attention a gathered 4-D mask expresses


def _decoder_classes() -> tuple[type, ...]:
    """The decoder classes of :data:`DECODERS` this transformers has."""
    return tuple(cls for module, name in DECODERS for cls in transformers_classes(module, name))


def check_decoder(decoder: torch.nn.Module, prunes: bool = True) -> None:
    """Raise a clear error unless ``decoder`` is a decoder saint can prune in (``prunes``), or,
    for a schedule that drops nothing inside it, one that a shortened prompt can run through."""
    vision_only = {cls: (layers, methods) for module, name, layers, methods in VISION_ONLY_DECODERS
                   for cls in transformers_classes(module, name)}
    if type(decoder) in vision_only:
        if prunes:
            layers, methods = vision_only[type(decoder)]
            raise TypeError(
                f"saint cannot prune inside a {type(decoder).__name__} language model: its {layers} layers keep a "
                f"recurrent state, not a cache of tokens; the vision-side methods work ({methods})"
            )
        check_maskable_attention(decoder)
        return
    classes = _decoder_classes()
    if type(decoder) not in classes:
        raise TypeError(
            f"saint cannot prune inside a {type(decoder).__name__} language model; supported: {SUPPORTED_DECODERS}"
        )
    check_maskable_attention(decoder)
    bad = sorted({t for t in getattr(decoder.config, "layer_types", None) or []} - set(LAYER_TYPES))
    if bad:
        raise ValueError(f"layer types {bad} are not supported (only {', '.join(LAYER_TYPES)})")
    for i, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if getattr(attn, "is_kv_shared_layer", False):  # Gemma 4: reuses an earlier layer's keys and values
            continue
        projections = ("q_proj", "k_proj") if hasattr(attn, "k_proj") else ("qkv_proj",)
        if attn is None or not all(hasattr(attn, n) for n in (*projections, "head_dim", "scaling")):
            raise TypeError(f"decoder layer {i} has no standard self_attn (q_proj and k_proj or qkv_proj, head_dim, "
                            "scaling)")
    _rope_fn(decoder.layers[0].self_attn)


def check_kv_sharing(sources: dict[int, int], schedule: dict[int, Any]) -> None:
    """Gemma 4's last layers (E2B, E4B) reuse the keys and values that earlier layers store
    (``sources``: :func:`kv_sources`): those must see the tokens the reusing layers see, so
    tokens may only be dropped after layers before the first layer they read."""
    stores = sorted(set(sources.values()))
    late = sorted(p for p in schedule if stores and p >= stores[0])
    if late:
        shared = sorted(sources)
        raise ValueError(
            f"saint would drop tokens after decoder layer {late[0]}, but layers {shared[0]}..{shared[-1]} reuse the "
            f"keys and values of layers {stores}, which must see the same tokens: prune after layers "
            f"0..{stores[0] - 1} only (e.g. llm_layers=(start, {stores[0] - 1}), fastv_layer <= {stores[0] - 1})")


def kv_sources(decoder: torch.nn.Module) -> dict[int, int]:
    """Each KV-shared layer (Gemma 4) -> the storing layer of its type whose keys, values and
    cache slots it reads; empty for decoders that share none."""
    types = getattr(decoder.config, "layer_types", None) or []
    stores = {types[i]: i for i, layer in enumerate(decoder.layers)
              if getattr(getattr(layer, "self_attn", None), "store_full_length_kv", False)}
    return {i: stores[types[i]] for i, layer in enumerate(decoder.layers)
            if getattr(getattr(layer, "self_attn", None), "is_kv_shared_layer", False)}


def keep_every_slot(kwargs: dict[str, Any], decoder: torch.nn.Module) -> dict[str, Any]:
    """A prefill's arguments with a cache whose sliding-window layers keep every slot
    (a new one where the call would make its own): the model's sliding mask then spans
    the whole sequence, and a pruned layer gathers the window of positions from it.

    The cache must be empty (a prefill); sliding layers of a static cache are refused."""
    config = decoder.config
    if getattr(config, "sliding_window", None) is None:
        return kwargs
    name = "past_key_values" if kwargs.get("past_key_values") is not None else "cache"
    cache = kwargs.get(name)
    if cache is None:
        use = kwargs.get("use_cache")
        if not (config.use_cache if use is None else use):
            return kwargs
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        kwargs = dict(kwargs, **{name: cache})
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"saint cannot prune with a {type(cache).__name__} on a decoder with sliding-window layers; "
                        "use a DynamicCache")
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for j, layer in enumerate(layers):
        if not getattr(layer, "is_sliding", False):
            continue
        if type(layer) is not DynamicSlidingWindowLayer:
            raise ValueError(
                f"cache layer {j} is a {type(layer).__name__}: saint keeps every slot of a sliding-window layer "
                "(a pruned layer holds fewer slots than layer 0), which only a DynamicCache's layers can; "
                "generate without cache_implementation='static' (the default dynamic cache)")
        if layer.get_seq_length():
            raise ValueError(f"cache layer {j} already holds tokens; saint prunes a prompt on an empty cache")
        layers[j] = DynamicLayer()
    return kwargs


def check_maskable_attention(decoder: torch.nn.Module, when: str = "") -> str:
    """The decoder's attention implementation, if it takes the 4-D masks saint gathers
    between layers; else a clear error (also when it was switched after patching)."""
    impl = decoder.config._attn_implementation
    if impl not in MASKABLE_ATTENTION:
        raise ValueError(
            f"attn_implementation={impl!r}{when}: saint gathers the 4-D attention mask between layers, which only "
            f"{MASKABLE_ATTENTION} take; use attn_implementation='sdpa' (or 'eager'): from_pretrained(..., "
            "attn_implementation='sdpa') or model.set_attn_implementation('sdpa')"
        )
    return impl


def rotates(attn: torch.nn.Module) -> bool:
    """Whether this attention layer rotates its queries and keys: not Cohere 2's global
    (full-attention) layers, which use no position embedding (NoPE)."""
    if type(attn).__name__ == "Cohere2Attention":
        return attn.sliding_window is not None
    return True


def _rope_fn(attn: torch.nn.Module) -> Callable:
    """The modeling module's own ``apply_rotary_pos_emb`` (used to read post-RoPE keys), as
    ``(q, k, cos, sin) -> (q, k)``; Gemma 4's rotates one tensor at a time (``x, cos, sin``)."""
    return _module_rope(type(attn).__module__)


@functools.cache
def _module_rope(module: str) -> Callable:
    """:func:`_rope_fn` of one modeling module, its signature read once."""
    fn = getattr(sys.modules[module], "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(f"{module} has no apply_rotary_pos_emb; unsupported language model")
    if next(iter(inspect.signature(fn).parameters)) == "x":
        return lambda q, k, cos, sin: (fn(q, cos, sin), fn(k, cos, sin))
    return fn


@dataclass
class Stage:
    """The token slots entering a layer: ``idx [B, M]`` their positions in the
    sequence that entered layer 0, ``valid`` False for pad slots, ``image`` True for
    valid prunable (image) tokens. ``identity``: the layer-0 sequence itself."""

    idx: torch.Tensor
    valid: torch.Tensor
    image: torch.Tensor
    identity: bool = False

    @property
    def length(self) -> int:
        return self.idx.shape[1]

    def select_rows(self, rows: torch.Tensor) -> Stage:
        return replace(self, idx=self.idx[rows], valid=self.valid[rows], image=self.image[rows])

    def repeat_rows(self, repeats: int) -> Stage:
        r = lambda t: t.repeat_interleave(repeats, dim=0)  # noqa: E731
        return replace(self, idx=r(self.idx), valid=r(self.valid), image=r(self.image))

    def drop_last(self, n: int) -> Stage:
        """Without its last ``n`` slots (the prompt's last ``n`` tokens, text: never dropped)."""
        return replace(self, idx=self.idx[:, :-n], valid=self.valid[:, :-n], image=self.image[:, :-n])


@dataclass
class PrunedPrompt:
    """What a cache filled by a pruned prefill needs for every later step: the
    layer-0 prompt length and the stage entering each layer."""

    owner: int
    length: int
    stages: list[Stage]
    input_length: int = 0  # length of the caller's own prompt (before any reduction of its own)
    extra: dict[str, torch.Tensor | None] = field(default_factory=dict)  # the caller's per-row maps
    live: Callable[[], bool] | None = field(default=None, repr=False)  # whether the pruner is still installed

    def map_rows(self, fn: Callable[[Any], Any]) -> PrunedPrompt:
        stages = [fn(s) for s in self.stages]
        extra = {k: (fn(v) if v is not None else None) for k, v in self.extra.items()}
        return replace(self, stages=stages, extra=extra)

    def drop_last(self, n: int) -> PrunedPrompt:
        """The prompt without its last ``n`` tokens, which a cache crop removed: assisted
        generation runs its first candidates in the prompt's forward and crops the rejected
        ones from the end of every layer (text, so the last slots of every stage)."""
        extra = {k: (v if v is None or k == "removed" else v[:, :-n]) for k, v in self.extra.items()}
        return replace(self, length=self.length - n, stages=[st.drop_last(n) for st in self.stages],
                       input_length=self.input_length - n if self.input_length else 0, extra=extra)


@dataclass
class PruneContext:
    """What a selector sees at one pruning layer (prefill only)."""

    layer: int
    prunable: torch.Tensor  # [B, M] bool: image tokens that may go (never the last slot)
    valid: torch.Tensor  # [B, M] bool
    keys: Callable[[], torch.Tensor]  # -> [B, M, head_dim], averaged over KV heads
    last_query_attention: Callable[[], torch.Tensor]  # -> [B, M], averaged over heads


Selector = Callable[[PruneContext], torch.Tensor]  # -> keep [B, M] bool


def _kw_key(stage: Stage, kwargs: dict[str, Any]) -> tuple[int, ...]:
    """What a layer's gathered arguments depend on: its stage, and the mask and rotary
    tables the decoder hands it (Gemma 3: one of each per layer type)."""
    pos = kwargs.get("position_embeddings")
    return id(stage), id(kwargs.get("attention_mask")), id(pos[0]) if pos is not None else 0


def _rows(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.expand(b, *t.shape[1:]) if t.shape[0] != b else t


def _query_scale(attn: torch.nn.Module, position_ids: torch.Tensor | None, b: int, last: torch.Tensor
                 ) -> torch.Tensor | None:
    """The factor a layer multiplies the query at slot ``last [B]`` of each row by: Ministral
    3's (and Mistral 4's) position-dependent Llama 4 attention scale, ``[B, 1, 1, 1]``; None
    for other layers."""
    scale = getattr(sys.modules[type(attn).__module__], "get_llama_4_attn_scale", None)
    rope = getattr(attn.config, "rope_parameters", None) or {}
    if scale is None or position_ids is None or rope.get("llama_4_scaling_beta") is None:
        return None
    at = _rows(position_ids, b)[torch.arange(b, device=last.device), last][:, None].float()
    return scale(at, rope["llama_4_scaling_beta"], rope["original_max_position_embeddings"])


def _gather_per_layer_input(args: tuple, kwargs: dict[str, Any], stage: Stage, b: int) -> tuple:
    """Gemma 4's per-layer input embeddings (the layer's second argument, ``[B, L, D]`` over the
    sequence that entered layer 0), gathered for the layer's slots (the kwarg in place)."""
    if kwargs.get("per_layer_input") is not None:
        kwargs["per_layer_input"] = gather_tokens(_rows(kwargs["per_layer_input"], b), stage.idx)
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        args = (args[0], gather_tokens(_rows(args[1], b), stage.idx), *args[2:])
    return args


def _masked(mask: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Mask out the entries where ``ok`` is False, in the mask's own convention."""
    if mask.dtype == torch.bool:
        return mask & ok
    return mask.masked_fill(~ok, torch.finfo(mask.dtype).min)


def _as_mask(allowed: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


def _column_map(stage: Stage, width: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-0 column of each of a layer's ``width`` key slots: its prompt slots, then
    every position after the prompt; and whether the slot is a real token."""
    b, m = stage.idx.shape
    if width < m:
        raise RuntimeError(f"attention width {width} is smaller than the {m} prompt slots of this layer")
    tail = torch.arange(length, length + width - m, device=stage.idx.device).expand(b, -1)
    cols = torch.cat([stage.idx, tail], dim=1)
    ok = torch.cat([stage.valid, torch.ones_like(tail, dtype=torch.bool)], dim=1)
    return cols, ok


def _gather_columns(mask: torch.Tensor, cols: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    w0 = mask.shape[-1]
    ok = ok & (cols < w0)
    cols = cols.clamp(max=w0 - 1)
    b, h, q, _ = mask.shape
    out = torch.gather(mask, 3, cols[:, None, None, :].expand(b, h, q, cols.shape[1]))
    return _masked(out, ok[:, None, None, :])


def projection(attn: torch.nn.Module, kind: str) -> tuple[str, slice | None]:
    """Where an attention module makes its queries (``kind`` "q") or keys ("k"): the
    projection's name, and the columns of its output that hold them (a fused
    ``qkv_proj``: queries, then keys, then values, as Phi-3 splits it; else None)."""
    if hasattr(attn, f"{kind}_proj"):
        return f"{kind}_proj", None
    q = attn.config.num_attention_heads * attn.head_dim
    return "qkv_proj", slice(0, q) if kind == "q" else slice(q, q + attn.num_key_value_heads * attn.head_dim)


class DecoderPruner:
    """Hooks on one decoder that drop tokens after the layers in ``schedule``.

    Call :meth:`begin_prefill` (with the prunable-token flags of the layer-0
    sequence) or :meth:`begin_continuation` before the decoder runs, and
    :meth:`finish` after it; between calls the hooks do nothing.
    """

    def __init__(self, decoder: torch.nn.Module, schedule: dict[int, Selector], rope_keys: bool = True,
                 query_layers: tuple[int, ...] = ()) -> None:
        check_decoder(decoder, prunes=bool(schedule))
        self.kv_source = kv_sources(decoder)  # KV-shared layer -> the layer whose keys and values (and cache) it reads
        check_kv_sharing(self.kv_source, schedule)
        if query_layers and getattr(decoder.config, "attn_logit_softcapping", None) is not None:
            raise ValueError("FastV ranks image tokens by the last query's attention, and this decoder caps its "
                             "attention logits (attn_logit_softcapping), which saint's ranking does not apply")
        self.decoder = decoder
        self.layers = list(decoder.layers)
        self.patched_layers = PatchedBlocks(decoder, "layers", tuple(self.layers))  # hooked: refused if swapped
        self.schedule = dict(schedule)
        self.rope_keys = rope_keys
        self.query_layers = set(query_layers)
        self._sources = set(self.kv_source.values())
        self._source_width: dict[int, int] = {}
        self.hooks: list[Any] = []
        self.hooked: list[Hooked] = []  # the projections whose outputs the selections read
        self._reset()

    @property
    def impl(self) -> str:
        """The decoder's attention implementation now (``set_attn_implementation`` may
        switch it after patching; a prefill refuses one without 4-D masks)."""
        return self.decoder.config._attn_implementation

    # ------------------------------------------------------------------ lifecycle
    def install(self) -> None:
        for i, layer in enumerate(self.layers):
            self.hooks.append(layer.register_forward_pre_hook(self._make_pre_hook(i), with_kwargs=True))
            if i in self.schedule:
                attn = layer.self_attn
                for kind in ("k", "q") if i in self.query_layers else ("k",):
                    name, columns = projection(attn, kind)
                    proj = getattr(attn, name)
                    self.hooks.append(proj.register_forward_hook(self._make_capture(i, kind, columns)))
                    self.hooked.append(Hooked(layer, lambda m, name=name: getattr(m.self_attn, name), proj,
                                              f"language model layer {i}'s self_attn.{name}"))
                self.hooks.append(layer.register_forward_hook(self._make_post_hook(i)))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.hooked.clear()
        self._reset()

    def _reset(self) -> None:
        self.phase = "idle"
        self.stage: Stage | None = None
        self.stages: list[Stage] = []
        self.counts: list[torch.Tensor] = []
        self.captured: dict[tuple[int, str], torch.Tensor] = {}
        self.prompt: PrunedPrompt | None = None
        self.cache: Any = None
        self.length = 0
        self.last_real = torch.zeros(0, dtype=torch.long)  # each row's last real token at layer 0 (begin_prefill)
        self._kw_cache: dict[tuple[int, ...], Any] = {}
        self._layer_kwargs: dict[int, dict[str, Any]] = {}

    def check_installed(self) -> None:
        """Refuse a forward through decoder layers (or the projections the selections read)
        replaced since patching: a layer without saint's hooks would run on the pruned
        sequence's positions unmapped, or drop nothing where it should."""
        self.patched_layers.check()
        for hooked in self.hooked:
            hooked.check()

    def begin_prefill(self, image: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """A prompt enters layer 0 with ``image [B, L]`` flags (tokens that may be dropped)
        and ``real [B, L]``, its real tokens (None: every one), of which each row's last is
        never dropped and is the query that ranks for FastV (right padding may follow it)."""
        self.check_installed()
        check_maskable_attention(self.decoder, " (set since saint.patch)")
        self._reset()
        b, n = image.shape
        last = None if real is None else n - 1 - real.flip(1).long().argmax(dim=1)
        self.last_real = torch.full((b,), n - 1, device=image.device) if last is None else last
        idx = torch.arange(n, device=image.device).expand(b, n)
        self.stage = Stage(idx, torch.ones_like(image, dtype=torch.bool), image.clone(), identity=True)
        self.length = n
        self.phase = "prefill"

    def begin_continuation(self, prompt: PrunedPrompt) -> None:
        """New tokens follow a prompt that was pruned by this pruner."""
        self.check_installed()
        self._reset()
        self.prompt = prompt
        self.length = prompt.length
        self.phase = "continue"

    def finish(self) -> None:
        """Forget the per-forward state (call after the decoder ran)."""
        self.phase = "idle"
        self.captured.clear()
        self._kw_cache.clear()
        self._layer_kwargs.clear()

    def pruned_prompt(self) -> PrunedPrompt:
        """The per-layer maps of the prefill that just ran."""
        return PrunedPrompt(owner=id(self), length=self.length, stages=list(self.stages), live=lambda: bool(self.hooks))

    @property
    def dropped_any(self) -> bool:
        """Whether the prefill that just ran dropped a token in some layer."""
        return self.stage is not None and not self.stage.identity

    @property
    def final_stage(self) -> Stage | None:
        return self.stage

    # ------------------------------------------------------------------ hooks
    def _make_capture(self, i: int, kind: str, columns: slice | None):
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            if self.phase == "prefill":
                self.captured[(i, kind)] = output if columns is None else output[..., columns]

        return hook

    def _make_pre_hook(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            if self.phase == "prefill":
                out = self._prefill_pre(i, args, kwargs)
            elif self.phase == "continue":
                out = self._continue_pre(i, args, kwargs)
            else:
                return None
            if i in self._sources and self.cache is not None:  # the width its KV-shared layers will read
                hidden = args[0] if args else kwargs["hidden_states"]
                self._source_width[i] = int(self.cache.get_mask_sizes(hidden.shape[1], i)[0])
            return out

        return hook

    def _make_post_hook(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if self.phase != "prefill":
                return None
            return self._prune(i, module, output)

        return hook

    # ------------------------------------------------------------------ prefill
    def _prefill_pre(self, i: int, args: tuple, kwargs: dict[str, Any]):
        stage = self.stage
        assert stage is not None
        hidden = args[0] if args else kwargs["hidden_states"]
        tail = hidden.shape[1] < stage.length and i in self.kv_source
        if hidden.shape[1] != stage.length and not tail:
            raise RuntimeError(
                f"decoder layer {i} got {hidden.shape[1]} tokens, saint expected {stage.length}; "
                "was the decoder called outside the patched model?"
            )
        if i == 0:
            self.cache = kwargs.get("cache")
        self.stages.append(stage)
        self.counts.append(stage.image.sum(dim=1).cpu())
        if tail:
            return self._shared_tail_pre(i, stage, args, kwargs, hidden)
        if stage.identity:
            self._layer_kwargs[i] = kwargs
            return None
        mask, pos_emb, pos_ids = self._gathered(stage, kwargs, lambda: self._gather_prefill(i, stage, kwargs,
                                                                                            hidden.shape[0]))
        kwargs = dict(kwargs, attention_mask=mask, position_embeddings=pos_emb, position_ids=pos_ids)
        args = _gather_per_layer_input(args, kwargs, stage, hidden.shape[0])
        self._layer_kwargs[i] = kwargs
        return args, kwargs

    def _shared_tail_pre(self, i: int, stage: Stage, args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor):
        """A KV-shared layer that Gemma 4 runs on the last ``t`` tokens only (``logits_to_keep``):
        its hidden states, rotary tables and per-layer inputs are those of the last ``t``
        positions, kept ones as long as no row dropped any of them; its mask rows are those
        positions' over layer 0's columns, gathered to the stored keys' slots."""
        b, t = hidden.shape[:2]
        tail = torch.arange(self.length - t, self.length, device=stage.idx.device)
        if not (bool(stage.valid[:, -t:].all()) and torch.equal(stage.idx[:, -t:], tail.expand(b, t))):
            raise ValueError(f"logits_to_keep={t}: saint dropped some of the last {t} tokens of a row; "
                             "ask for the logits of the last token only (logits_to_keep=1)")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            cols, ok = _column_map(stage, self._width(i, t, stage.length), self.length)
            kwargs = dict(kwargs, attention_mask=_gather_columns(_rows(mask, b), cols, ok))
        self._layer_kwargs[i] = kwargs
        return args, kwargs

    def _gathered(self, stage: Stage, kwargs: dict[str, Any], gather: Callable[[], Any]) -> Any:
        """``gather()`` once per stage and per mask / rotary table the decoder hands its
        layers (Gemma 3: one per layer type); a new stage forgets the last one's."""
        key = _kw_key(stage, kwargs)
        if key not in self._kw_cache:
            self._kw_cache = {k: v for k, v in self._kw_cache.items() if k[0] == key[0]}
            self._kw_cache[key] = gather()
        return self._kw_cache[key]

    def _width(self, i: int, q: int, fallback: int) -> int:
        """The key width of layer ``i``'s mask: its cache's, before this call's tokens enter it
        (a KV-shared layer: its source layer's, recorded before the source ran)."""
        cache = self.cache
        if cache is None:
            return fallback
        if i in self.kv_source:
            return self._source_width[self.kv_source[i]]
        return int(cache.get_mask_sizes(q, i)[0])

    def _gather_prefill(self, i: int, stage: Stage, kwargs: dict[str, Any], b: int):
        idx, m = stage.idx, stage.length
        cos, sin = kwargs["position_embeddings"]
        pos_emb = (gather_tokens(_rows(cos, b), idx), gather_tokens(_rows(sin, b), idx))
        pos_ids = kwargs.get("position_ids")
        if pos_ids is not None and pos_ids.dim() == 3:  # M-RoPE ids [3, B, L] (GLM-4.5V's layers get these)
            pos_ids = torch.stack([torch.gather(_rows(p, b), 1, idx) for p in pos_ids])
        elif pos_ids is not None:
            pos_ids = torch.gather(_rows(pos_ids, b), 1, idx)
        mask = kwargs.get("attention_mask")
        width = self._width(i, m, m)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
                raise TypeError(f"saint needs a 4-D tensor attention mask, got {type(mask).__name__}")
            mask = _rows(mask, b)
            rows = torch.gather(mask, 2, idx[:, None, :, None].expand(b, mask.shape[1], m, mask.shape[3]))
            cols, ok = _column_map(stage, width, self.length)
            mask = _gather_columns(rows, cols, ok)
        elif not bool(stage.valid.all()):
            allowed = (idx[:, None, :] <= idx[:, :, None]) & stage.valid[:, None, :]  # [B, Mq, Mk]
            if width > m:
                allowed = torch.cat([allowed, allowed.new_zeros(b, m, width - m)], dim=2)
            mask = _as_mask(allowed[:, None], self.impl, cos.dtype)
        return mask, pos_emb, pos_ids

    def _keys(self, i: int, module: torch.nn.Module) -> torch.Tensor:
        """This layer's keys ``[B, KVH, M, head_dim]`` (k-norm, then RoPE unless disabled or the
        layer rotates nothing)."""
        attn = module.self_attn
        k = self.captured[(i, "k")]
        b, m, _ = k.shape
        k = k.view(b, m, -1, attn.head_dim)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        if self.rope_keys and rotates(attn):
            cos, sin = self._layer_kwargs[i]["position_embeddings"]
            k = _rope_fn(attn)(k, k, cos, sin)[1]
        return k

    def _last_query_attention(self, i: int, module: torch.nn.Module, last: torch.Tensor) -> torch.Tensor:
        """Attention of each row's last real token (slot ``last [B]``: the last column of a
        left-padded batch, earlier in a right-padded one) over the layer's tokens ``[B, M]``
        (heads averaged)."""
        attn = module.self_attn
        q = self.captured[(i, "q")]
        b, m, _ = q.shape
        rows = torch.arange(b, device=q.device)
        q = q[rows, last][:, None].view(b, 1, -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
        q = q.transpose(1, 2)  # [B, H, 1, D]
        k = self._keys(i, module)
        if rotates(attn):
            cos, sin = self._layer_kwargs[i]["position_embeddings"]
            q = _rope_fn(attn)(q, q, _rows(cos, b)[rows, last][:, None], _rows(sin, b)[rows, last][:, None])[0]
        scale = _query_scale(attn, self._layer_kwargs[i].get("position_ids"), b, last)
        if scale is not None:
            q = q * scale.to(q.dtype)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        mask = self._layer_kwargs[i].get("attention_mask")
        row = None if mask is None else _rows(mask, b)[rows, 0, last, :m]  # [B, M]
        return query_attention(q[:, :, 0], k.transpose(1, 2), attn.scaling, row)

    def _prune(self, i: int, module: torch.nn.Module, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        stage = self.stage
        assert stage is not None
        last = ((stage.idx == self.last_real[:, None]) & stage.valid).long().argmax(dim=1)  # each row's last real slot
        prunable = stage.image.clone()
        prunable[torch.arange(len(last), device=last.device), last] = False
        ctx = PruneContext(
            layer=i,
            prunable=prunable,
            valid=stage.valid,
            keys=lambda: self._keys(i, module).mean(dim=1),
            last_query_attention=lambda: self._last_query_attention(i, module, last),
        )
        keep = self.schedule[i](ctx)
        self.captured.pop((i, "k"), None)
        self.captured.pop((i, "q"), None)
        keep = stage.valid & (keep | ~prunable)
        if torch.equal(keep, stage.valid):
            return None
        local, valid = keep_mask_to_indices(keep, align="right")
        self.stage = Stage(
            idx=torch.gather(stage.idx, 1, local),
            valid=valid,
            image=torch.gather(stage.image, 1, local) & valid,
        )
        hidden = gather_tokens(hidden, local)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    # ------------------------------------------------------------------ decoding
    def _continue_pre(self, i: int, args: tuple, kwargs: dict[str, Any]):
        prompt = self.prompt
        assert prompt is not None
        if i == 0:
            self.cache = kwargs.get("cache")
            if self.cache is None:
                raise RuntimeError("continuing a pruned prompt needs its cache")
        stage = prompt.stages[i]
        if stage.identity:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = self._gathered(stage, kwargs, lambda: self._gather_continuation(i, stage, kwargs.get("attention_mask"),
                                                                                hidden))
        return args, dict(kwargs, attention_mask=mask)

    def _gather_continuation(self, i: int, stage: Stage, mask: Any, hidden: torch.Tensor):
        b, q = hidden.shape[:2]
        m = stage.length
        width = self._width(i, q, m + q)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
                raise TypeError(f"saint needs a 4-D tensor attention mask, got {type(mask).__name__}")
            cols, ok = _column_map(stage, width, self.length)
            return _gather_columns(_rows(mask, b), cols, ok)
        if bool(stage.valid.all()):
            return None
        t = int(self.cache.get_seq_length(i)) - m  # tokens appended after the prompt so far
        u = torch.arange(width - m, device=hidden.device)
        r = torch.arange(q, device=hidden.device)
        tail = (u[None, :] <= t + r[:, None]).expand(b, q, -1)
        allowed = torch.cat([stage.valid[:, None, :].expand(b, q, m), tail], dim=2)
        return _as_mask(allowed[:, None], self.impl, hidden.dtype)


def attach_prompt(cache: Any, prompt: PrunedPrompt | None) -> None:
    """Store ``prompt`` on ``cache`` (or clear it) and make beam-search reordering,
    batch selection and repetition of the cache carry the per-row maps along, a crop
    into the prompt shorten them, and an update refuse a prompt whose patch is gone. The
    methods are bound to the cache, so a deep copy's are the copy's own."""
    if cache is None:
        return
    d = cache.__dict__
    if prompt is None:
        d.pop(PRUNED_PROMPT_ATTR, None)
        return
    d[PRUNED_PROMPT_ATTR] = prompt
    if "_saint_wrapped" in d:
        return
    d["_saint_wrapped"] = True
    for name, method in CACHE_METHODS.items():
        d[name] = types.MethodType(method, cache)


def _carrying_rows(name: str, fn_rows: Callable[[Any], Callable[[Any], Any]]) -> Callable[..., Any]:
    """The cache class's method ``name`` that also maps the stored prompt's per-row maps."""

    def method(self: Any, arg: Any) -> Any:
        out = getattr(type(self), name)(self, arg)
        p = self.__dict__.get(PRUNED_PROMPT_ATTR)
        if p is not None:
            self.__dict__[PRUNED_PROMPT_ATTR] = p.map_rows(fn_rows(arg))
        return out

    return method


def _select(rows: torch.Tensor) -> Callable[[Any], Any]:
    return lambda s: s.select_rows(rows) if isinstance(s, Stage) else s[rows.to(s.device)]


def _repeat(n: int) -> Callable[[Any], Any]:
    return lambda s: s.repeat_rows(n) if isinstance(s, Stage) else s.repeat_interleave(n, dim=0)


def _crop(self: Any, tokens_to_remove: int) -> Any:
    out = type(self).crop(self, tokens_to_remove)
    p = self.__dict__.get(PRUNED_PROMPT_ATTR)
    cut = 0 if p is None else p.length - int(self.get_seq_length())
    if cut > 0:  # the crop reached into the prompt
        self.__dict__[PRUNED_PROMPT_ATTR] = p.drop_last(cut)
    return out


def _update(self: Any, *args: Any, **kwargs: Any) -> Any:
    p = self.__dict__.get(PRUNED_PROMPT_ATTR)
    if p is not None and p.live is not None and not p.live():
        raise ValueError(STALE_CACHE)
    tie = self.__dict__.get(TIE_ATTR)
    if tie is not None and not tie.live():
        raise ValueError(STALE_IMAGE_CACHE)
    return type(self).update(self, *args, **kwargs)


@dataclass(frozen=True)
class Tie:
    """A cache's tie to the patch whose pruned image tokens it holds: ``owner`` names the
    patch, ``live()`` says whether it is still installed."""

    owner: int
    live: Callable[[], bool]


TIE_ATTR = "_saint_tie"


def tie_to_patch(cache: Any, owner: int, live: Callable[[], bool]) -> None:
    """Tie ``cache`` (an encoder-decoder cache with its two parts) to the patch ``owner``
    whose pruned image tokens its cross-attention reads: its updates are refused once the
    patch is gone, and so is continuing it under another patch (refused here)."""
    parts = [cache, getattr(cache, "self_attention_cache", None), getattr(cache, "cross_attention_cache", None)]
    for part in parts:
        if part is None or not callable(getattr(type(part), "update", None)):
            continue
        d = part.__dict__
        tie = d.get(TIE_ATTR)
        if tie is not None:
            if tie.owner != owner:
                raise ValueError(STALE_IMAGE_CACHE)
            continue  # tied at an earlier step of this generation
        d[TIE_ATTR] = Tie(owner, live)
        d["update"] = types.MethodType(_update, part)


CACHE_METHODS = {
    "reorder_cache": _carrying_rows("reorder_cache", _select),
    "batch_select_indices": _carrying_rows("batch_select_indices", _select),
    "batch_repeat_interleave": _carrying_rows("batch_repeat_interleave", _repeat),
    "crop": _crop,
    "update": _update,
}


STALE_IMAGE_CACHE = (
    "past_key_values holds image tokens that saint pruned under a patch since removed (saint.unpatch, or "
    "saint.patch again): their cross-attention keys include padding and merged tokens that only that patch "
    "masks; generate again on an empty cache"
)


STALE_CACHE = (
    "past_key_values holds a prompt that saint pruned under a patch since removed (saint.unpatch, or "
    "saint.patch again): its layers' positions follow that patch, and continuing it would misplace every "
    "token; run the whole conversation with its images on an empty cache"
)


def pruned_prompt_of(cache: Any) -> PrunedPrompt | None:
    """The pruned-prompt maps stored on ``cache`` (None for an ordinary cache)."""
    if cache is None:
        return None
    return cache.__dict__.get(PRUNED_PROMPT_ATTR)

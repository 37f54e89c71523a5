"""The forward hooks of a Hugging Face VLM pruned inside its language model (LLaVA,
LLaVA-OneVision, Qwen-VL), installed per instance around one patched forward:

- on the top-level model, a guard that holds the handle's lock for the whole call
  (calls from several threads run one after another: the per-forward state is the
  handle's), and, for a ``*ForConditionalGeneration``, the labels/logits hooks
  (labels copied so that dropped predictions can be ignored; logits of dropped
  positions set to NaN);
- on the multimodal model, the pre-hook that tells a prefill with images from a
  decoding step (:func:`make_mm_pre`; the family supplies what each does);
- on the language model, the post-hook that records the statistics, stores the
  pruned prompt on the cache and scatters the hidden states back to the input's
  positions (:func:`make_lm_post`).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import hf_llm
from .common import RefusePickle, TokenStats, language_model
from .vlm_handle import Forward, VlmPatch


@dataclass(frozen=True)
class Media:
    """Where a family's visual inputs stand in a multimodal forward's arguments."""

    pixels: tuple[str, ...] = ("pixel_values",)  # keyword arguments with pixels
    features: tuple[str, ...] = ("image",)  # keys of mm_encoder_outputs
    token_ids: tuple[str, ...] = ("image_token_id",)  # config attributes of the placeholder tokens
    tokens: str = "image"  # how errors name the placeholder tokens

    def given(self, kwargs: dict[str, Any]) -> bool:
        """Whether the call carries pixels or precomputed features."""
        mm_out = kwargs.get("mm_encoder_outputs") or {}
        return any(kwargs.get(k) is not None for k in self.pixels) or any(
            mm_out.get(m) is not None for m in self.features)

    def ids(self, mm: torch.nn.Module, device: torch.device) -> torch.Tensor:
        """The placeholder token ids of multimodal model ``mm``."""
        return torch.tensor([int(getattr(mm.config, name)) for name in self.token_ids], device=device)


Prefill = Callable[[Any, torch.nn.Module, dict[str, Any], Forward], dict[str, Any]]
Continuation = Callable[[Any, torch.nn.Module, hf_llm.PrunedPrompt, dict[str, Any], int], dict[str, Any]]


def bind(fn: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments of a forward call, turned into keywords."""
    if not args:
        return dict(kwargs)
    names = [p for p in inspect.signature(fn).parameters if p != "self"]
    return {**dict(zip(names, args, strict=False)), **kwargs}


def flag(kwargs: dict[str, Any], mm: torch.nn.Module, name: str) -> bool:
    """A boolean forward option: the call's value, else the model config's."""
    v = kwargs.get(name)
    return bool(v if v is not None else getattr(mm.config, name, False))


def make_mm_pre(handle: VlmPatch, media: Media, prefill: Prefill, continuation: Continuation):
    """The multimodal model's pre-hook: a new forward's state; on a non-empty cache
    (decoding), ``continuation`` maps the step to the pruned prompt this pruner left
    there (media refused); with media on an empty cache, the checks every family needs,
    then ``prefill`` (which starts the decoder pruner); otherwise the call runs as is."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        kwargs = bind(type(module).forward, args, kwargs)
        fwd = handle.begin_forward()
        input_ids = kwargs.get("input_ids")
        cache = kwargs.get("cache")
        past = int(cache.get_seq_length()) if cache is not None else 0
        has_media = media.given(kwargs)
        prompt = hf_llm.pruned_prompt_of(cache)
        if prompt is not None and prompt.owner != id(handle.pruner):
            raise ValueError(hf_llm.STALE_CACHE)
        if past > 0:
            # placeholder ids without media are text to the model (as unpatched: a decoded
            # image token id embeds like any other token), so only media are refused here
            if has_media:
                raise ValueError(
                    f"saint cannot add {media.tokens} tokens to a non-empty cache (multi-turn with a new image, "
                    "chunked prefill); run the prompt with its images on an empty cache"
                )
            return (), (kwargs if prompt is None else continuation(handle, module, prompt, kwargs, past))
        if not has_media:  # a text-only prompt: no visual token in any row
            ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            if ref is not None:
                handle.last_stats = text_only_stats(int(ref.shape[0]), len(handle.pruner.layers))
            return (), kwargs
        if input_ids is None:
            raise ValueError(f"saint locates images by {'/'.join(media.token_ids)}: pass input_ids, not inputs_embeds")
        if flag(kwargs, module, "output_hidden_states") or flag(kwargs, module, "output_attentions"):
            raise ValueError(
                "output_hidden_states / output_attentions would be misaligned with the pruned sequence; "
                "unpatch the model (saint.unpatch) to read them"
            )
        kwargs = hf_llm.keep_every_slot(kwargs, handle.pruner.decoder)
        return (), prefill(handle, module, kwargs, fwd)

    return hook


ANY_MEDIA = Media(pixels=("pixel_values", "pixel_values_videos"), features=("image", "video"))  # every family's


def install_forward_hooks(handle: VlmPatch, model: torch.nn.Module, mm: torch.nn.Module, mm_pre: Any,
                          lm_post: tuple[Any, ...] = ()) -> None:
    """The hooks of one patched forward: the handle's lock around the whole call, the
    decoder pruner, ``mm_pre`` on the multimodal model, the language model's
    post-hook (outputs back in input coordinates, statistics) then ``lm_post``, and the
    labels/logits hooks of a ``*ForConditionalGeneration``."""
    lm = language_model(mm)
    hooks = handle.hooks
    hooks.append(model.register_forward_pre_hook(RefusePickle(make_guard(handle, enter=True)), prepend=True))
    handle.pruner.install()
    hooks.append(mm.register_forward_pre_hook(RefusePickle(mm_pre), with_kwargs=True))
    for hook in (make_lm_post(handle), *lm_post):
        hooks.append(lm.register_forward_hook(hook))
    if model is not mm:
        hooks.append(model.register_forward_pre_hook(RefusePickle(make_top_pre(handle)), with_kwargs=True))
        hooks.append(model.register_forward_hook(RefusePickle(make_top_post(handle)), with_kwargs=True))
    hooks.append(model.register_forward_hook(RefusePickle(make_guard(handle, enter=False)), always_call=True))
    if hasattr(model, PREFILL) and PREFILL not in model.__dict__:
        handle.wrap(model, PREFILL, make_unchunked_prefill(getattr(model, PREFILL)))
    if hasattr(model, "generate") and "generate" not in model.__dict__:
        handle.wrap(model, "generate", make_checked_generate(handle, model, model.generate))


PREFILL = "_prefill"  # generate's (private) prefill step, which splits the prompt by prefill_chunk_size


def make_checked_generate(handle: VlmPatch, model: torch.nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
    """``generate`` that refuses two calls saint cannot serve (both used to give other
    tokens than the unpatched model's way would, or crash):

    - FastV with assisted generation (``assistant_model``, ``prompt_lookup_num_tokens``, ...)
      of a prompt with images: the first candidates run in the prompt's forward, so FastV
      would rank by a candidate's attention (SAINT's choice reads image tokens alone, and
      :func:`~saint.adapters.hf_llm.attach_prompt` follows the crop of rejected candidates);
    - a new call on a cache whose prompt saint shortened before the language model (``vit``,
      ``hybrid``, ``random``, ``pool``): generate feeds the ids after the cache's length, and
      that cache holds fewer positions than the ids it came from."""
    from transformers.generation.configuration_utils import GenerationMode

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        prompt = hf_llm.pruned_prompt_of(kwargs.get("past_key_values"))
        if prompt is not None and prompt.owner == id(handle.pruner) and prompt.extra.get("src0") is not None:
            raise ValueError(
                "past_key_values holds a prompt whose image tokens saint removed before the language model "
                "(mode='vit'/'hybrid', random, pool), so generate cannot line the new input_ids up with it (it "
                "skips as many ids as the cache holds); run the whole conversation with its images on an empty "
                "cache, or prune with mode='llm', whose cache continues"
            )
        if handle.config.method == "fastv" and ANY_MEDIA.given(kwargs):
            config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
            config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
            if config.get_generation_mode(kwargs.get("assistant_model")) == GenerationMode.ASSISTED_GENERATION:
                raise ValueError(
                    "FastV ranks the image tokens by the attention of the prompt's last token, and assisted "
                    "generation (assistant_model, prompt_lookup_num_tokens, assistant_early_exit) runs its first "
                    "candidate tokens in the prompt's forward, so FastV would rank by a candidate's; generate "
                    "without it, or use SAINT (mode='llm'/'hybrid'/'vit'), whose choice reads the image tokens alone"
                )
        return original(*args, **kwargs)

    return generate


def make_unchunked_prefill(original: Callable[..., Any]) -> Callable[..., Any]:
    """``generate(prefill_chunk_size=n)`` on a prompt with images: saint shortens the image
    runs inside one forward, so a prompt that fits one chunk runs as one prefill (what
    the chunk is), and a longer one is refused (generate would slice the kept features
    by the unpruned placeholders, and each later chunk would add images to a filled cache)."""
    def prefill(input_ids: torch.Tensor, generation_config: Any, model_kwargs: dict[str, Any],
                *args: Any, **kwargs: Any) -> Any:
        chunk = getattr(generation_config, "prefill_chunk_size", None)
        if chunk is not None and ANY_MEDIA.given(model_kwargs):
            if input_ids.shape[-1] > chunk:
                raise ValueError(
                    f"saint prunes a prompt's image tokens within one forward, and prefill_chunk_size={chunk} "
                    f"splits this {input_ids.shape[-1]}-token prompt into several; generate without "
                    "prefill_chunk_size (or with one at least as long as the prompt)"
                )
            generation_config = copy.copy(generation_config)
            generation_config.prefill_chunk_size = None
        return original(input_ids, generation_config, model_kwargs, *args, **kwargs)

    return prefill


def make_guard(handle: VlmPatch, enter: bool):
    """Hooks around the whole forward that hold the handle's lock (returning None, so
    they leave the call's arguments and output alone)."""
    def take(module: torch.nn.Module, args: tuple) -> None:
        handle.lock.acquire()

    def give(module: torch.nn.Module, args: tuple, output: Any) -> None:
        handle.lock.release()

    return take if enter else give


def make_top_pre(handle: VlmPatch):
    """Keep a copy of the call's labels, which the language model's post-hook edits."""
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        kwargs = bind(type(module).forward, args, kwargs)
        labels = kwargs.get("labels")
        handle.pending_labels = None
        if labels is not None:
            labels = labels.clone()
            handle.pending_labels = labels
            kwargs["labels"] = labels
        return (), kwargs

    return hook


def make_top_post(handle: VlmPatch):
    """NaN logits at the input positions whose token was dropped; the forward's state ends."""
    from transformers.modeling_utils import slice_logits_to_keep

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        dropped = handle.fwd.dropped
        handle.fwd = Forward()
        handle.pending_labels = None
        logits = getattr(output, "logits", None)
        if dropped is None or logits is None:
            return None
        d = slice_logits_to_keep(dropped[..., None], kwargs.get("logits_to_keep", 0))
        if d.shape[:-1] == logits.shape[:-1]:
            output.logits = logits.masked_fill(d.to(logits.device), float("nan"))
        return output

    return hook


def text_only_stats(batch: int, layers: int) -> TokenStats:
    """A prompt batch without media: no visual token handed to the language model, nor
    entering any of its ``layers`` (what a text-only row of a mixed batch reports)."""
    names = stats_names(layers)
    return TokenStats(names, [[0] * batch for _ in names])


def stats_names(layers: int) -> list[str]:
    """The sites a VLM's statistics name: the tokens handed over by the tower, entering
    each of the language model's ``layers``, and after its final norm."""
    return ["vision_tower", *(f"language_model.layers.{i}" for i in range(layers)), "language_model.norm"]


def make_lm_post(handle: VlmPatch):
    """After the language model's prefill: the statistics, the pruned prompt stored on
    the cache, the hidden states scattered back to the input's positions (NaN where
    a token was dropped; 0 under autograd) and the labels of dropped predictions ignored."""
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        pruner = handle.pruner
        if pruner.phase != "prefill":
            pruner.finish()
            return None
        fwd = handle.fwd
        final = pruner.final_stage
        assert final is not None
        counts = [*pruner.counts, final.image.sum(dim=1).cpu()]
        tower = fwd.tower_counts if fwd.tower_counts is not None else counts[0]
        handle.last_stats = TokenStats(stats_names(len(pruner.counts)), [tower.tolist(), *[c.tolist() for c in counts]])
        reduced = fwd.src0 is not None
        prompt = pruner.pruned_prompt()
        prompt.input_length = fwd.input_length
        prompt.extra = {"src0": fwd.src0, "valid0": fwd.valid0, "removed": fwd.removed}
        hf_llm.attach_prompt(pruner.cache, prompt if (reduced or pruner.dropped_any) else None)
        pruner.finish()
        handle.kept_input = None
        if not (reduced or pruner.dropped_any):
            return None
        output.last_hidden_state, kept = _to_input_positions(output.last_hidden_state, fwd, final)
        fwd.dropped = ~kept
        handle.kept_input = kept
        if fwd.labels is not None:
            fwd.labels[:, 1:].masked_fill_(fwd.dropped[:, :-1].to(fwd.labels.device), -100)
        return output

    return hook


def _to_input_positions(hidden: torch.Tensor, fwd: Forward, final: hf_llm.Stage) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states ``[B, L0, C]`` at the positions of the input as passed
    (NaN where a token was dropped by either step, as a vision tower's padding; 0 while
    autograd records, where NaN would reach the gradients), and which positions have one. Hidden
    states of the last ``t`` slots only (Gemma 4's KV-shared layers on ``logits_to_keep``
    tokens) go to those slots' positions."""
    length0 = fwd.input_length
    in_pos, real = final.idx, final.valid
    if fwd.src0 is not None:
        in_pos = torch.gather(fwd.src0, 1, final.idx)
        real = real & torch.gather(fwd.valid0, 1, final.idx)
    target = torch.where(real, in_pos, length0)
    b, t, c = hidden.shape
    fill = 0.0 if torch.is_grad_enabled() else float("nan")
    out = hidden.new_full((b, length0 + 1, c), fill).scatter_(1, target[:, -t:, None].expand(-1, -1, c), hidden)
    kept = torch.zeros(b, length0 + 1, dtype=torch.bool, device=hidden.device).scatter_(1, target, True)
    return out[:, :length0], kept[:, :length0]

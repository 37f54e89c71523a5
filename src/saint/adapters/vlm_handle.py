"""The patch handle of a Hugging Face VLM pruned inside its language model (LLaVA,
LLaVA-OneVision, Qwen-VL): its config, decoder pruner, hooks and per-instance
wrappers, the state of the forward in flight, and what the last forward with images
left (statistics, kept positions, token origins)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from . import hf_llm
from .base import Handle
from .common import PICKLE_HINT, SAINT_ATTR, Hooked, TokenStats, get_handle


@dataclass
class Forward:
    """State of one forward call (reset by every call)."""

    labels: torch.Tensor | None = None
    input_length: int = 0
    src0: torch.Tensor | None = None  # [B, L'] input position of each layer-0 slot
    valid0: torch.Tensor | None = None
    removed: torch.Tensor | None = None  # [B] tokens removed from each row before layer 0
    tower_counts: torch.Tensor | None = None
    dropped: torch.Tensor | None = None  # [B, L0] input positions without an output


@dataclass
class VlmPatch(Handle):
    """A patched VLM: config, the decoder pruner, the hooks and wrappers, and the
    statistics of the last forward that carried images. Its sites are the language
    model's decoder layers; ``site_tokens``/``origins`` describe the last forward,
    when that was a prefill (a decoding step replaces them)."""

    config: Any
    model: torch.nn.Module
    mm: torch.nn.Module
    image_token_id: int
    pruner: hf_llm.DecoderPruner
    hooks: list[Any] = field(default_factory=list)
    wrapped: dict[str, Any] = field(default_factory=dict)  # name -> (module, its per-instance wrapper)
    fwd: Forward = field(default_factory=Forward)
    pending_labels: torch.Tensor | None = None
    last_stats: TokenStats | None = None
    kept_input: torch.Tensor | None = None  # [B, L] input positions with an output (last forward)
    trace: bool = False
    lock: Any = field(default_factory=threading.RLock)  # one forward at a time (the state above is per forward)
    hooked: list[Hooked] = field(default_factory=list)  # hooked modules outside the decoder pruner's
    num_protected = 0  # image tokens have no protected prefix (text is never pruned)
    position_offset = 0  # the model's first position when it numbers a prompt itself (PaliGemma: 1)

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(
            "copy.deepcopy of a patched LLaVA is not supported (its hooks belong to this instance); "
            "unpatch first: saint.unpatch(model), copy it, and patch the original and the copy"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(PICKLE_HINT)

    def wrap(self, owner: torch.nn.Module, name: str, wrapper: Any) -> None:
        """Replace ``owner.<name>`` by ``wrapper`` on this instance only (undone by :meth:`remove`)."""
        owner.__dict__[name] = wrapper
        self.wrapped[name] = (owner, wrapper)

    def remove(self) -> None:
        """Remove every wrapper and hook: the model computes exactly what it did before."""
        for name, (owner, wrapper) in self.wrapped.items():
            if owner.__dict__.get(name) is wrapper:
                del owner.__dict__[name]
        self.wrapped.clear()
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.hooked.clear()
        self.pruner.remove()

    def check_installed(self) -> None:
        """Refuse a forward through modules that changed since patching (see
        :class:`~saint.adapters.common.Hooked`), and through an inner model patched on its
        own since (both patches would prune the same prompt)."""
        for hooked in self.hooked:
            hooked.check()
        if self.mm is not self.model and get_handle(self.mm) is not None:
            raise ValueError(
                f"the {type(self.mm).__name__} inside this {type(self.model).__name__} was patched by saint on its "
                f"own after it; unpatch one of the two (saint.unpatch(model.model) or saint.unpatch(model))"
            )

    def begin_forward(self) -> Forward:
        """A new forward's state, holding the labels the top-level pre-hook kept."""
        self.check_installed()
        self.fwd = Forward(labels=self.pending_labels)
        self.pending_labels = None
        self.pruner.finish()
        return self.fwd

    @property
    def settings(self) -> dict[int, dict[str, Any]]:  # type: ignore[override]
        """The decoder layers that prune (after which the image tokens shrink)."""
        return {i: {} for i in sorted(self.pruner.schedule)}

    @property
    def block_names(self) -> list[str]:  # type: ignore[override]
        return [f"language_model.layers.{i}" for i in range(len(self.pruner.layers))]

    def site_tokens(self) -> list[torch.Tensor]:
        return [s.valid.sum(dim=1) for s in self.pruner.stages]

    def tokens_after(self, output: Any) -> torch.Tensor:
        stage = self.pruner.final_stage
        if stage is None:
            raise RuntimeError("no prefill has run since patching; call the model first")
        return stage.valid.sum(dim=1)

    def origins(self) -> list[torch.Tensor]:
        """Per pruning layer, the sequence slot of every image token of the last
        prefill (``[B, image tokens]``, -1 = dropped), in prompt order."""
        if not self.trace:
            raise ValueError("token origins are recorded only with saint.patch(..., trace=True)")
        if self.config.reduces_vision:
            raise ValueError("token origins follow the language model's drop of image tokens (mode='llm'); a "
                             "vision-side reduction (mode='vit'/'hybrid', random, pool) hands the language model a "
                             "subset of the patches, which the trace does not record: trace with mode='llm'")
        stages = self.pruner.stages
        if not stages:
            raise RuntimeError("no prefill has run since patching; call the model first")
        image = stages[0].image
        counts = image.sum(dim=1)
        if int(counts.min()) != int(counts.max()):
            raise ValueError(f"tracing needs the same number of image tokens in every prompt, got {counts.tolist()}")
        b, length = image.shape
        positions = image.nonzero()[:, 1].reshape(b, int(counts[0]))
        out = []
        for i in self.pruning_sites:
            stage = stages[i + 1] if i + 1 < len(stages) else self.pruner.final_stage
            slots = torch.arange(stage.length, device=image.device).expand(b, -1)
            where = torch.full((b, length + 1), -1, dtype=torch.long, device=image.device)
            where.scatter_(1, torch.where(stage.valid, stage.idx, length), torch.where(stage.valid, slots, -1))
            out.append(torch.gather(where, 1, positions))
        return out

    def output_mask(self) -> torch.Tensor | None:
        """Which positions of the last prompt forward's input have an output (``[B, L]``
        bool; None when none was dropped): its hidden states and logits are NaN at the
        others (hidden states 0 under autograd)."""
        if self.last_stats is None:
            raise RuntimeError("no prompt has run through the patched model since patching; call the model first")
        return self.kept_input

    def stats(self) -> TokenStats:
        """Visual tokens per sample in the last prompt forward (decoding steps leave it as
        their prompt's): handed to the language model (``vision_tower``), entering each
        decoder layer, and after the last one (``language_model.norm``); all 0 for a
        prompt without media."""
        if self.last_stats is None:
            raise RuntimeError("no prompt has run through the patched model since patching; call the model first")
        return self.last_stats

    def vision_stats(self) -> TokenStats | None:
        """Tokens entering each vision-tower layer, per image (None: no tower patch)."""
        return None


H = TypeVar("H", bound=VlmPatch)


@contextmanager
def installing(handle: H) -> Iterator[H]:
    """Install a patch's hooks and wrappers inside the ``with`` block: if any step
    fails, everything installed so far is removed; else the model is marked patched."""
    try:
        yield handle
    except Exception:
        handle.remove()
        raise
    handle.model.__dict__[SAINT_ATTR] = handle


def unpatch(model: torch.nn.Module) -> None:
    """Remove every hook and wrapper: the model computes exactly what it did before."""
    model.__dict__.pop(SAINT_ATTR).remove()

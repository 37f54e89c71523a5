"""The plugin's settings, read from the model's HF config (set with vLLM's ``--hf-overrides``)
and the per-image budget rule. No vLLM import: the main test environment checks these.

vLLM sizes an image's placeholder run before the vision tower runs, so the number of kept
tokens must follow from the image's grid alone: ``max(1, round(keep_ratio * N))`` of the
``N`` merged tokens, chosen by SAINT's fixed-budget drop (``saint.core.fixed_budget_keep_mask``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...core import fixed_budget_keep_mask

PREFIX = "saint_"
KEYS = ("saint_keep_ratio", "saint_step_div")


class SaintSettingsError(RuntimeError):
    """A bad ``saint_*`` setting. Not a ValueError on purpose: vLLM 0.32 reads a ValueError
    from a model's processing info as "no multimodal processor" and silently serves the
    model text-only (``ModelConfig._supports_multimodal_inputs``)."""


@dataclass(frozen=True)
class SaintVllmSettings:
    """``keep_ratio``: share of each image's merged tokens kept, in (0, 1];
    ``step_div``: the fixed-budget drop removes ``remaining // step_div`` tokens per round."""

    keep_ratio: float
    step_div: int = 16

    def __post_init__(self) -> None:
        r = self.keep_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise SaintSettingsError(
                f"saint_keep_ratio={r!r}: give the share of each image's tokens to keep, a number "
                'in (0, 1], e.g. --hf-overrides \'{"saint_keep_ratio": 0.25}\''
            )
        s = self.step_div
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise SaintSettingsError(f"saint_step_div={s!r}: give an integer >= 1 (default 16)")

    def kept_tokens(self, num_tokens: int) -> int:
        """Tokens one image keeps out of its ``num_tokens`` merged tokens."""
        if num_tokens < 1:
            raise ValueError(f"an image has {num_tokens} tokens; expected at least 1")
        return min(num_tokens, max(1, math.floor(self.keep_ratio * num_tokens + 0.5)))

    def keep_mask(self, embeds: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: SAINT's fixed-budget choice among one image's ``[N, D]`` embeddings."""
        keep = self.kept_tokens(embeds.shape[0])
        return fixed_budget_keep_mask(embeds[None], keep, step_div=self.step_div)[0]


def nested_settings(attrs: dict, path: str = "") -> list[str]:
    """The ``saint_*`` keys inside the sub-configs of a config's ``to_dict()`` (e.g.
    ``thinker_config.saint_keep_ratio``), which no override reads."""
    out = []
    for key, value in attrs.items():
        if isinstance(value, dict):
            where = f"{path}{key}."
            out += [f"{where}{k}" for k in value if str(k).startswith(PREFIX)] + nested_settings(value, where)
    return sorted(out)


def refuse_unsupported_model(config: Any, architectures: Sequence[str], supported: Iterable[str],
                             model_impl: str = "auto") -> None:
    """Refuse ``saint_*`` settings on a model the plugin does not override, inside a
    sub-config (a nested ``--hf-overrides``, which vLLM applies), or with a model
    implementation other than vLLM's own (``--model-impl transformers``: the plugin overrides
    vLLM's classes): vLLM would serve the model unpruned, with the settings silently ignored."""
    attrs = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    nested = nested_settings(attrs)
    if nested:
        raise SaintSettingsError(
            f"{nested} set inside a sub-config: SAINT reads its settings from the model's top-level config only; "
            'give them there, e.g. --hf-overrides \'{"saint_keep_ratio": 0.25}\'')
    given = sorted(k for k in attrs if k.startswith(PREFIX))
    supported = sorted(supported)
    impl = str(getattr(model_impl, "value", model_impl))
    if given and impl not in ("auto", "vllm"):
        raise SaintSettingsError(
            f"{given} set in --hf-overrides, but the model runs on vLLM's {impl!r} implementation (model_impl), "
            "which SAINT does not override: it would run unpruned; serve it with model_impl='auto' or 'vllm'")
    if given and not set(architectures) & set(supported):
        raise SaintSettingsError(
            f"{given} set in --hf-overrides, but SAINT prunes only {supported} in vLLM and this model is "
            f"{list(architectures)}: it would run unpruned; remove the saint_* settings or serve a supported model"
        )


def settings_from_config(config: Any) -> SaintVllmSettings | None:
    """The settings in an HF config's ``saint_*`` attributes, or None when pruning is off
    (no ``saint_keep_ratio``). Unknown ``saint_*`` names are errors, not silently ignored."""
    attrs = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    given = {k: v for k, v in attrs.items() if k.startswith(PREFIX)}
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise SaintSettingsError(f"unknown SAINT setting(s) {unknown} in --hf-overrides; known: {list(KEYS)}")
    if given.get("saint_keep_ratio") is None:
        if given.get("saint_step_div") is not None:
            raise SaintSettingsError("saint_step_div is set but saint_keep_ratio is not: set both or neither")
        return None
    step_div = given.get("saint_step_div")
    return SaintVllmSettings(given["saint_keep_ratio"], 16 if step_div is None else step_div)


def images_only_settings(info: Any, ctx: Any, family: str) -> SaintVllmSettings | None:
    """The SAINT settings of a processing info's model, read (and so validated) in the
    front end; with pruning on, a configuration that allows videos is refused (the
    overrides that prune only images: for Qwen, their videos would reach the runner
    without the position channels it then expects; for InternVL, its frames' pruning is
    untested). A model that takes no videos (an InternVL chat checkpoint whose tokenizer
    has no video token) needs no video limit. The settings are read from the model's
    top-level config (``ctx.get_hf_config()``), where ``--hf-overrides`` writes: for the Omni
    models not the thinker's that ``info.get_hf_config`` returns."""
    saint = settings_from_config(ctx.get_hf_config())
    takes_videos = "video" in info.get_supported_mm_limits()
    if saint is not None and takes_videos and ctx.get_mm_config().get_limit_per_prompt("video") > 0:
        raise SaintSettingsError(
            f"saint_keep_ratio: SAINT pruning of {family} serves images only; set "
            "--limit-mm-per-prompt '{\"video\": 0}' (LLM(limit_mm_per_prompt={\"video\": 0}))"
        )
    return saint


class ImagesOnlyInfo:
    """For a processing info: reads (and so validates) the SAINT settings in the front end,
    before the engine starts (``self.saint``); with pruning on, a configuration that allows
    videos is refused (:func:`images_only_settings`; ``saint_family`` names the model)."""

    saint_family = ""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)  # type: ignore[call-arg]
        self.saint = images_only_settings(self, ctx, self.saint_family)

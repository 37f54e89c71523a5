"""Evaluation-harness integrations (plugins that live in saint, not in a fork of the
harness), plus the harness-agnostic parsing they share.

- :mod:`saint.integrations.lmms_eval`: the ``saint_llava`` and ``saint_qwen_vl``
  models of lmms-eval (``pip install 'saint[lmms]'``), and
  :mod:`saint.integrations.lmms_anyres`: ``saint_llava_next``,
  ``saint_llava_next_video`` and ``saint_llava_onevision``, and :mod:`saint.integrations.lmms_llm_side`:
  ``saint_internvl``, ``saint_mistral3``, ``saint_gemma3``, ``saint_idefics3``, ``saint_paligemma``,
  ``saint_fast_vlm``, ``saint_aya_vision``, ``saint_cohere2_vision``, ``saint_ovis2``,
  ``saint_lighton_ocr``, ``saint_deepseek_vl``, ``saint_deepseek_vl_hybrid``, ``saint_janus``, ``saint_lfm2_vl``, ``saint_gemma4``,
  ``saint_paddleocr_vl``, ``saint_idefics2``, ``saint_vipllava`` and ``saint_video_llava``, and
  :mod:`saint.integrations.lmms_glm`: ``saint_glm4v``; :mod:`saint.integrations.lmms_omni`: ``saint_qwen_omni``; all registered through the ``lmms_eval.models``
  entry-point group by :func:`lmms_eval_models`.

Settings arrive from a harness as ``key=value`` strings; :func:`parse_prune_settings`
turns them into the keyword arguments of :func:`saint.patch` with the syntax of the
``saint`` command line (``/`` separates per-layer values, ``layer#value`` pairs give a
``{layer: value}`` dict), plus ``llm_layers=7-16`` and ``visual_keep=12x12``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["UNPRUNED", "lmms_eval_models", "parse_prune_settings"]

from ..spec import BASELINE_NAMES as UNPRUNED  # method names meaning "do not patch"

_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-|:|\.\.)\s*(-?\d+)\s*$")
_GRID = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def _layers(value: Any) -> Any:
    """``"7-16"`` / ``"7:16"`` / ``"7..16"`` / ``"7/16"`` / ``(7, 16)`` -> ``(7, 16)``."""
    from ..spec import parse_value

    if isinstance(value, str):
        m = _RANGE.match(value)
        if m:
            return int(m.group(1)), int(m.group(2))
        value = parse_value(value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return tuple(value)
    raise ValueError(
        f"llm_layers={value!r}: give the first and last decoder layer that prune, inclusive, e.g. llm_layers=7-16"
    )


def _visual_keep(value: Any) -> Any:
    """``"144"`` -> 144, ``"12x12"`` / ``"12/12"`` -> ``(12, 12)`` (rows, cols)."""
    from ..spec import parse_value

    if isinstance(value, str):
        m = _GRID.match(value)
        value = (int(m.group(1)), int(m.group(2))) if m else parse_value(value)
    return tuple(value) if isinstance(value, list) else value


def parse_prune_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Turn harness settings (strings, or the ints/floats/bools a harness already
    converted) into keyword arguments for ``saint.patch`` on a LLaVA model.

    Strings are parsed with the ``saint`` CLI syntax (:func:`saint.spec.parse_value`):
    ``llm_tau=0.8/0.8/0.7`` is a per-layer list, ``llm_tau=7#0.8/8#0.75`` a
    ``{layer: value}`` dict; ``llm_layers=7-16`` is ``(7, 16)`` and ``visual_keep=12x12``
    is ``(12, 12)``. Names and values are validated later by the LLaVA adapter
    (unknown names and settings the chosen method does not use are refused there).
    """
    from ..spec import parse_value

    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key == "llm_layers":
            out[key] = _layers(value)
        elif key == "visual_keep":
            out[key] = _visual_keep(value)
        elif isinstance(value, str):
            try:
                out[key] = parse_value(value)
            except ValueError as e:
                raise ValueError(f"bad value for {key}={value!r}: {e}") from None
        elif key == "seed" and isinstance(value, float) and value.is_integer():
            out[key] = int(value)  # lmms-eval's argument parser reads a negative integer ("-1") as a float
        else:
            out[key] = value
    return out


LMMS_MODELS = {  # lmms-eval's --model name -> the class, imported only when that name is asked for
    "saint_llava": "lmms_eval.SaintLlava",
    "saint_qwen_vl": "lmms_eval.SaintQwenVL",
    "saint_glm4v": "lmms_glm.SaintGlm4v",
    "saint_qwen_omni": "lmms_omni.SaintQwenOmni",
    "saint_llava_next": "lmms_anyres.SaintLlavaNext",
    "saint_llava_next_video": "lmms_anyres.SaintLlavaNextVideo",
    "saint_llava_onevision": "lmms_anyres.SaintLlavaOneVision",
    "saint_internvl": "lmms_llm_side.SaintInternVL",
    "saint_mistral3": "lmms_llm_side.SaintMistral3",
    "saint_gemma3": "lmms_llm_side.SaintGemma3",
    "saint_gemma4": "lmms_llm_side.SaintGemma4",
    "saint_paddleocr_vl": "lmms_llm_side.SaintPaddleOCRVL",
    "saint_idefics2": "lmms_llm_side.SaintIdefics2",
    "saint_vipllava": "lmms_llm_side.SaintVipLlava",
    "saint_video_llava": "lmms_llm_side.SaintVideoLlava",
    "saint_idefics3": "lmms_llm_side.SaintIdefics3",
    "saint_paligemma": "lmms_llm_side.SaintPaliGemma",
    "saint_fast_vlm": "lmms_llm_side.SaintFastVlm",
    "saint_aya_vision": "lmms_llm_side.SaintAyaVision",
    "saint_cohere2_vision": "lmms_llm_side.SaintCohere2Vision",
    "saint_ovis2": "lmms_llm_side.SaintOvis2",
    "saint_lighton_ocr": "lmms_llm_side.SaintLightOnOcr",
    "saint_deepseek_vl": "lmms_llm_side.SaintDeepseekVL",
    "saint_deepseek_vl_hybrid": "lmms_llm_side.SaintDeepseekVLHybrid",
    "saint_janus": "lmms_llm_side.SaintJanus",
    "saint_lfm2_vl": "lmms_llm_side.SaintLfm2Vl",
}


def lmms_eval_models() -> list[Any]:
    """Entry point of the ``lmms_eval.models`` group: lmms-eval (>= 0.7) calls it while
    building its model registry and imports a class only when its name (a key of
    :data:`LMMS_MODELS`, e.g. ``--model saint_llava``) is asked for."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=f"saint.integrations.{path}")
            for name, path in LMMS_MODELS.items()]

"""Method specs on the command line: ``NAME[:key=value,key=value,...]``.

Examples: ``saint:tau=0.9,k=5``, ``tome:r=8``, ``random:r=16,layers=0/1/2``,
``saint:tau=0.95/0.95/0.9/0.9/0.85/0.85`` (a per-layer list), ``saint:tau=0#0.9/3#0.8``
(a ``{block: value}`` dict). Values are parsed as ``int``, then ``float``, then
``true``/``false``/``none``, else kept as strings (``rate=batch``). ``/`` separates list
items and ``#`` separates a block index from its value; ``layers=3`` is the one block 3.
``none``/``unpruned`` alone is the unpatched model; ``@PATH`` is the variant a
``saint calibrate --json PATH`` file describes. A spec's values are checked when it is
parsed, before a command loads its model. The same syntax serves ``--model-args`` (``img_size=32,depth=4``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .methods import PATCH_OPTIONS, get_method, make_config, method_settings

BASELINE_NAMES = ("none", "unpruned", "baseline")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Variant:
    """One model variant to measure: the unpatched model (``method=None``) or a method
    with its keyword settings. ``label`` names it in tables and JSON."""

    label: str
    method: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.method is None

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "settings": dict(self.kwargs)}


BASELINE = Variant("unpruned")


def parse_scalar(text: str) -> Any:
    """``"8"`` -> 8, ``"0.9"`` -> 0.9, ``"true"`` -> True, ``"none"`` -> None, else the string."""
    t = text.strip()
    if not t:
        raise ValueError("empty value")
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_value(text: str) -> Any:
    """A scalar, a ``/``-separated list, or a ``/``-separated list of ``block#value`` pairs."""
    items = [s for s in text.split("/")]
    if any(not s.strip() for s in items):
        raise ValueError(f"empty item in {text!r} (lists are written a/b/c)")
    if any("#" in s for s in items):
        out: dict[int, Any] = {}
        for s in items:
            block, sep, value = s.partition("#")
            if not sep:
                raise ValueError(f"{text!r} mixes block#value pairs with plain values")
            try:
                index = int(block)
            except ValueError:
                raise ValueError(f"block index {block!r} in {text!r} is not an integer") from None
            if index in out:
                raise ValueError(f"block {index} is given twice in {text!r}")
            out[index] = parse_scalar(value)
        return out
    if len(items) == 1:
        return parse_scalar(items[0])
    return [parse_scalar(s) for s in items]


def parse_kwargs(text: str) -> dict[str, Any]:
    """``"a=1,b=0.5/0.4"`` -> ``{"a": 1, "b": [0.5, 0.4]}``; an empty string gives ``{}``."""
    out: dict[str, Any] = {}
    if not text.strip():
        return out
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise ValueError(f"expected key=value, got {part!r} in {text!r}")
        if key in out:
            raise ValueError(f"{key!r} is given twice in {text!r}")
        try:
            out[key] = parse_value(value)
        except ValueError as e:
            raise ValueError(f"bad value for {key!r} in {text!r}: {e}") from None
    return out


def parse_method_kwargs(text: str) -> dict[str, Any]:
    """A method's settings (:func:`parse_kwargs`), with ``layers=3`` read as the one block
    ``[3]`` (a list is written ``0/1/2``), as in every command's method options."""
    kwargs = parse_kwargs(text)
    layers = kwargs.get("layers")
    if isinstance(layers, int) and not isinstance(layers, bool):
        kwargs["layers"] = [layers]
    return kwargs


def parse_method_spec(text: str, validate: bool = True) -> Variant:
    """Parse ``NAME[:key=value,...]`` into a :class:`Variant` (label = the text itself).

    With ``validate`` the method name and argument names are checked against the registry
    (per-layer values are checked later, against the model's depth).
    """
    if text.strip().startswith("@"):
        return calibrated_variant(text.strip()[1:])
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise ValueError(f"empty method name in {text!r}; write e.g. saint:tau=0.9 or tome:r=8")
    if name in BASELINE_NAMES:
        if rest.strip():
            raise ValueError(f"{name!r} (the unpruned model) takes no settings, got {rest!r}")
        return BASELINE
    kwargs = parse_method_kwargs(rest)
    if validate:
        get_method(name)
        check_spec_settings(name, kwargs)
    return Variant(text.strip(), name, kwargs)


def check_spec_settings(method: str, kwargs: dict[str, Any]) -> None:
    """Check a spec's settings before a model loads: the method's own (per-block values
    against the blocks the spec names) and ``saint.patch``'s options (``layout``,
    ``kernel``, ``trace``), which a spec may carry too."""
    check_patch_options(kwargs)
    settings = method_settings(kwargs)
    make_config(method, **settings)[1].resolve(_spec_depth(settings))


def check_patch_options(kwargs: dict[str, Any]) -> None:
    """Check the values of ``saint.patch``'s options (:data:`saint.methods.PATCH_OPTIONS`) among ``kwargs``."""
    from .adapters.common import check_layout

    options = {k: kwargs[k] for k in PATCH_OPTIONS if k in kwargs}
    if not isinstance(options.get("trace", False), bool):
        raise TypeError(f"trace must be true or false, got {options['trace']!r}")
    if "layout" in options or "kernel" in options:
        check_layout(options.get("layout", "packed"), options.get("kernel", "auto"))


def calibrated_variant(path: str) -> Variant:
    """The variant a calibration file describes (``saint calibrate --json PATH``; on the
    command line ``--method @PATH``), labelled by the spec string it stands for."""
    from pathlib import Path

    from .calibration import Calibration

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"calibration file not found: {path} (write one with saint calibrate --json)")
    cal = Calibration.from_json(file.read_text())
    if cal.tau_setting != "tau":
        raise ValueError(f"{path} calibrates a VLM's {cal.tau_setting}; the vision commands take vision calibrations")
    kwargs = cal.patch_kwargs()
    check_spec_settings(cal.method, kwargs)
    return Variant(variant_label(cal.method, kwargs), cal.method, kwargs)


def _spec_depth(kwargs: dict[str, Any]) -> int:
    """A depth deep enough for every block a spec names (its ``layers`` and per-layer
    lists), so its values are checked before a model loads; the model's own depth is
    checked when it is patched."""
    need = 1
    for key, v in kwargs.items():
        if isinstance(v, list):
            need = max(need, len(v))
        named = v if isinstance(v, dict) or (key == "layers" and isinstance(v, list)) else ()
        need = max([need, *(i + 1 for i in named if type(i) is int)])  # block indices (not bools)
    return need


def parse_calibrated_spec(text: str) -> Variant:
    """Parse a SAINT-family spec for calibration: like :func:`parse_method_spec` but
    without ``tau`` (calibration picks it), with an optional ``mode=global|per_layer`` and
    ``target=flops|measured`` (calibrate to the real-token FLOPs speed-up, the default, or
    to the speed-up measured at the timing batch) and ``at=S`` (calibrate to S only,
    instead of every speed-up of the grid); ``saint_match`` also takes ``inflection=F``
    (the merge schedule's slope, see :func:`saint.calibration.merge_ramp`)."""
    from .calibration import check_calibratable, merge_ramp

    v = parse_method_spec(text, validate=False)
    kwargs = dict(v.kwargs)
    mode = kwargs.pop("mode", "per_layer")
    try:
        check_calibratable(v.method, mode)
    except ValueError as e:
        raise ValueError(f"{e} in {text!r}") from None
    target = kwargs.pop("target", "flops")
    if target not in ("flops", "measured"):
        raise ValueError(f"target must be 'flops' or 'measured', got {target!r} in {text!r}")
    at = kwargs.pop("at", None)
    if at is not None and (isinstance(at, bool) or not isinstance(at, (int, float)) or not 1 < at < math.inf):
        raise ValueError(f"at={at!r} must be one speed-up > 1 (this variant's only target) in {text!r}")
    if "tau" in kwargs:
        raise ValueError(f"calibrated variants choose tau themselves; remove it from {text!r}")
    inflection = kwargs.pop("inflection", None)
    if inflection is not None:
        if v.method != "saint_match":
            raise ValueError(f"inflection shapes saint_match's calibrated merge schedule; not {v.method!r} in {text!r}")
        merge_ramp([0], inflection)
    try:
        check_patch_options(kwargs)
        make_config(v.method, **method_settings(kwargs))[1].check_given()
    except (TypeError, ValueError) as e:
        raise type(e)(f"{e} in {text!r}") from None
    extra = {**({"target": target} if target != "flops" else {}), **({"at": float(at)} if at is not None else {}),
             **({"inflection": float(inflection)} if inflection is not None else {})}
    return Variant(v.label, v.method, {**kwargs, "mode": mode, **extra})


def variant_label(method: str, kwargs: dict[str, Any]) -> str:
    """A spec string that :func:`parse_method_spec` reads back into the same variant."""
    parts = [f"{k}={format_value(v)}" for k, v in kwargs.items()]
    return method + (":" + ",".join(parts) if parts else "")


def format_value(v: Any, exact: bool = False) -> str:
    """Inverse of :func:`parse_value` for the values it produces: floats to 6 significant
    digits (labels), or with ``exact`` as many as read back the same float."""
    if isinstance(v, dict):
        return "/".join(f"{k}#{format_value(x, exact)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "/".join(format_value(x, exact) for x in v)
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v) if exact else f"{v:g}"
    return str(v)


def with_baseline(variants: Sequence[Variant]) -> list[Variant]:
    """``variants`` with the unpruned model first (exactly once)."""
    rest = [v for v in variants if not v.is_baseline]
    labels = [v.label for v in rest]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"method spec(s) given more than once: {dup}")
    return [BASELINE, *rest]

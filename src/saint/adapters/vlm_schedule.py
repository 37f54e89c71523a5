"""Which selection runs after which decoder layer of a VLM's language model: SAINT's
``llm``/``hybrid`` schedule (or a SAINT-family calibration probe) and FastV's, built
from a :class:`~saint.adapters.vlm_config.VlmPruneConfig` into the
:class:`~saint.adapters.hf_llm.DecoderPruner` every HF VLM family installs."""

from __future__ import annotations

from typing import Any

import torch

from ..core import gather_tokens, keep_mask_to_indices
from ..methods import LayerContext, MethodSpec, SaintConfig, get_method
from ..methods import make_config as registry_config
from . import hf_llm


def split_method(method: str | MethodSpec, family: str) -> tuple[str, MethodSpec | None]:
    """``(method name, llm_spec)``: a SAINT-family :class:`~saint.methods.MethodSpec`
    (e.g. a calibration probe) selects the image tokens of SAINT's ``llm``/``hybrid``
    modes; any other spec is refused with the family's name."""
    if isinstance(method, MethodSpec):
        if not issubclass(method.config_cls, SaintConfig):
            raise TypeError(f"{family}'s language-model pruning takes a SAINT-family method, not {method.public_name!r}")
        if method.merges:
            raise TypeError(
                f"{family}'s language-model pruning drops image tokens (SAINT's method='saint'); "
                f"{method.public_name!r} merges "
                "tokens, which a decoder layer's cache cannot hold: calibrate with method='saint'"
            )
        return "saint", method
    return method, None


def decoder_pruner(cfg: Any, lm: torch.nn.Module, llm_spec: MethodSpec | None = None) -> hf_llm.DecoderPruner:
    """The (not yet installed) pruner of language model ``lm`` for ``cfg``'s schedule."""
    schedule, query_layers = llm_schedule(cfg, len(lm.layers), llm_spec)
    # DecoderPruner checks the decoder (one it can prune in, or a hybrid one the schedule leaves whole)
    return hf_llm.DecoderPruner(lm, schedule, rope_keys=cfg.llm_rope_keys, query_layers=query_layers)


def llm_schedule(cfg: Any, n_layers: int, llm_spec: MethodSpec | None = None
                 ) -> tuple[dict[int, hf_llm.Selector], tuple[int, ...]]:
    """The decoder pruner's schedule for SAINT's llm/hybrid modes (``llm_spec``: a
    SAINT-family method other than "saint", e.g. a calibration probe) or FastV, shared
    by every adapter that prunes inside a language model: ``{layer: selector}`` and
    the layers whose last-token query FastV reads."""
    schedule: dict[int, hf_llm.Selector] = {}
    query_layers: tuple[int, ...] = ()
    if cfg.method == "saint" and cfg.mode in ("llm", "hybrid"):
        start, end = cfg.llm_range()
        if end > n_layers - 2:
            raise ValueError(
                f"llm_layers=({start}, {end}): the language model has {n_layers} layers (0..{n_layers - 1}) and "
                f"pruning after the last one saves nothing; end must be <= {n_layers - 2}"
            )
        saint_cfg = SaintConfig(layers=list(range(start, end + 1)), tau=cfg.llm_tau, k=cfg.llm_k,
                                gamma=cfg.llm_gamma, rate=cfg.llm_rate)
        try:
            settings = saint_cfg.resolve(n_layers)
        except (TypeError, ValueError) as e:
            raise type(e)(f"llm settings: {e} (llm_tau/llm_k/llm_gamma)") from None
        saint_spec = llm_spec or get_method("saint")
        schedule = {i: selector(saint_spec, s, saint_cfg) for i, s in settings.items()}
    elif cfg.method == "fastv":
        if cfg.fastv_layer > n_layers - 1:
            raise ValueError(
                f"fastv_layer={cfg.fastv_layer}: the language model has {n_layers} layers; the first layer that "
                f"sees the pruned sequence must be in 1..{n_layers - 1}"
            )
        fastv_spec, fastv_cfg = registry_config("fastv", layers=[cfg.fastv_layer - 1], ratio=cfg.fastv_ratio)
        schedule = {i: selector(fastv_spec, s, fastv_cfg) for i, s in fastv_cfg.resolve(n_layers).items()}
        query_layers = (cfg.fastv_layer - 1,)
    return schedule, query_layers


def selector(spec: MethodSpec, settings: dict[str, Any], config: Any) -> hf_llm.Selector:
    """A registered method's selection over the image tokens of one decoder layer: the
    prunable tokens are packed (keys, last-query attention gathered to them), selected
    like any block's tokens, and the answer is scattered back to the layer's slots."""

    def select(ctx: hf_llm.PruneContext) -> torch.Tensor:
        idx, valid = keep_mask_to_indices(ctx.prunable)
        if idx.shape[1] == 0:
            return ctx.valid
        b, m = idx.shape
        keys = gather_tokens(ctx.keys(), idx) if spec.needs_keys else torch.zeros(b, m, 0, device=idx.device)
        query = (lambda: torch.gather(ctx.last_query_attention(), 1, idx)) if spec.needs_query_attention else None
        layer_ctx = LayerContext(keys=keys, num_protected=0, valid=valid, layer=ctx.layer, query_attention=query)
        keep = spec.select(layer_ctx, settings, config).keep
        dropped = torch.zeros_like(ctx.prunable).scatter(1, idx, valid & ~keep)
        return ~dropped

    return select

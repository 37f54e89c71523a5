"""VLMs whose projector folds square groups of patches into one token: InternVL
(transformers 5 ``InternVLForConditionalGeneration`` / ``InternVLModel``, the ``-hf``
checkpoints; a pixel shuffle of 2x2 groups per tile), Gemma 3
(``Gemma3ForConditionalGeneration`` / ``Gemma3Model``; an average pool of the SigLIP
tower's grid, 4x4 groups at 896 px), Idefics3 and SmolVLM
(``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration`` and their
``*Model``; a pixel shuffle of ``scale_factor`` x ``scale_factor`` groups per tile, e.g.
SmolVLM's 4x4 groups, 64 tokens per 512 px tile; a tile with padded patches is refused
by the vit mode), and PaliGemma / PaliGemma 2 (``PaliGemmaForConditionalGeneration`` /
``PaliGemmaModel`` on a Gemma or Gemma 2 decoder; its projector maps every SigLIP patch to
one token: groups of one patch; it numbers a prompt from 1, and its whole prompt attends
both ways; Gemma 2's softcapped attention logits rule out FastV), and Aya Vision and Command A
Vision (``AyaVisionForConditionalGeneration``, ``Cohere2VisionForConditionalGeneration`` and
their ``*Model``; SigLIP tiles, a pixel shuffle of 2x2 groups, a Cohere 2 decoder whose global
layers use no position embedding; Aya Vision reads the tower's last layer, not its final norm),
and Ovis2 (``Ovis2ForConditionalGeneration`` / ``Ovis2Model``: its visual tokenizer maps every
``hidden_stride`` x ``hidden_stride`` group of a tile's patches to one token, a distribution over
its visual vocabulary embedded by its table; its visual indicator tokens are text and stay),
and DeepSeek-VL and Janus (``DeepseekVLForConditionalGeneration``, ``JanusForConditionalGeneration``
and their ``*Model``; the aligner maps every patch of a SigLIP(-like) tower to one token, as
PaliGemma's projector does; a Llama language model), and LFM2-VL (``Lfm2VlForConditionalGeneration`` /
``Lfm2VlModel``: a NaFlex SigLIP 2 tower whose tiles each have their own patch grid, a pixel
unshuffle of 2x2 groups, an LFM2 language model whose short-convolution layers keep a state, so
only the vit mode and ``random``).
SAINT's vit / llm / hybrid modes, FastV and a random baseline, with per-instance hooks
only; each family is one :class:`Family` below.

Methods (``saint.patch(model, method=..., **settings)``; see :class:`PooledPruneConfig`):

- ``"saint"`` with ``mode=``
  - ``"llm"`` (the default here): SAINT's graph drop of the image tokens after every
    decoder layer ``llm_layers = (start, end)`` (:mod:`saint.adapters.hf_llm`);
  - ``"vit"``: after vision layer ``vit_layer`` every unit (InternVL's tile, Gemma 3's
    image) keeps ``vit_ratio`` of its patch groups (:mod:`saint.adapters.group_tower`),
    the blocks the projector folds into one token, so later vision layers run on fewer
    patches and each unit hands the language model fewer tokens;
  - ``"hybrid"``: both.
- ``"fastv"``: FastV (``fastv_layer`` K, ``fastv_ratio`` R).
- ``"random"``: a seeded random ``keep_ratio`` of every unit's tokens, after the projector
  (the same positions in every unit; no tower compute saved: the reference point for
  ``vit`` at the same token count).

With a vision-side reduction each image's run of placeholder tokens shrinks to its
units' kept tokens before the language model runs, exactly as if the processor had
emitted that many (rows right-aligned, contiguous positions, Gemma 3's
``token_type_ids`` alike), as LLaVA's ``vit`` mode does; ``get_image_features`` is
wrapped per instance to return the kept tokens only. Outputs, labels, caches and the
refusals are those of :mod:`saint.adapters.llava`. Gemma 3's image tokens attend to each
other both ways in the prefill, and its sliding-window layers keep a window of positions
(:func:`saint.adapters.hf_llm.keep_every_slot`); both come with the masks the model
builds, which the decoder pruner gathers for the kept tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..methods import MethodSpec
from .base import Grid
from .common import Hooked, TokenStats, language_model, transformers_classes, transformers_loaded
from .group_tower import (
    IDEFICS3_TOWER,
    INTERNVL_TOWER,
    OVIS2_TOWER,
    SIGLIP_LAST_LAYER,
    SIGLIP_TOWER,
    GroupPruner,
    NaflexGroupPruner,
    TowerLayout,
    check_vit_layer,
)
from .hf_vlm import HFVlm, multimodal
from .llava_vision import image_features, make_expand, shrink_plan, start_prefill
from .qwen_vl_features import random_keep
from .vlm_config import (
    RATIO_FIELDS,
    VlmPruneConfig,
    check_random,
    check_vit_ratio,
)
from .vlm_handle import Forward, VlmPatch, installing, unpatch
from .vlm_hooks import Media, install_forward_hooks, make_mm_pre
from .vlm_prompt import continue_prompt, run_index
from .vlm_schedule import decoder_pruner, split_method

__all__ = ["ADAPTERS", "AYA_VISION", "COHERE2_VISION", "DEEPSEEK_VL", "FIELDS", "GEMMA3", "IDEFICS3", "INTERNVL",
           "JANUS", "OVIS2", "PALIGEMMA", "SMOLVLM", "AyaVisionPruneConfig", "Cohere2VisionPruneConfig",
           "DeepseekVLPruneConfig", "Family", "Gemma3PruneConfig", "Idefics3PruneConfig", "InternVLPruneConfig",
           "JanusPruneConfig", "Ovis2PruneConfig", "PaliGemmaPruneConfig", "PooledPatch", "PooledPruneConfig",
           "PooledVlm", "SmolVLMPruneConfig"]

EXPAND = "_expand_multimodal_outputs"  # generate's (private) helper for num_beams / num_return_sequences > 1
FIELDS = RATIO_FIELDS
MEDIA = Media()  # images only: pixel_values / mm_encoder_outputs["image"], image_token_id


@dataclass
class PooledPruneConfig(VlmPruneConfig):
    """Settings of one pruning method. ``vit_ratio``: fraction of each unit's patch
    groups kept after vision layer ``vit_layer`` (at least one group); the
    language-model settings are those of :class:`~saint.adapters.vlm_config.VlmPruneConfig`
    (SAINT after decoder layers 7..16, tau 0.83, K 5, gamma 10, as for LLaVA-1.5-7B)."""

    METHODS: ClassVar[tuple[str, ...]] = ("saint", "fastv", "random")
    FIELDS: ClassVar[dict[str, tuple[str, ...]]] = FIELDS
    UNIT: ClassVar[str] = "unit"  # what keeps a share of its groups, as errors name it

    mode: str = "llm"
    vit_ratio: float = 0.5
    vit_layer: int = 12
    vit_step_div: int = 16
    keep_ratio: float | None = None

    def _check_vision(self) -> None:
        check_vit_ratio(self)

    def _check_baselines(self) -> None:
        if self.method == "random":
            check_random(self.keep_ratio, self.seed, f"each {self.UNIT}'s tokens")


@dataclass
class InternVLPruneConfig(PooledPruneConfig):
    FAMILY: ClassVar[str] = "InternVL"
    UNIT: ClassVar[str] = "tile"


@dataclass
class Gemma3PruneConfig(PooledPruneConfig):
    FAMILY: ClassVar[str] = "Gemma 3"
    UNIT: ClassVar[str] = "image"


@dataclass
class Idefics3PruneConfig(PooledPruneConfig):
    FAMILY: ClassVar[str] = "Idefics3"
    UNIT: ClassVar[str] = "tile"


@dataclass
class SmolVLMPruneConfig(PooledPruneConfig):
    FAMILY: ClassVar[str] = "SmolVLM"
    UNIT: ClassVar[str] = "tile"


@dataclass
class PaliGemmaPruneConfig(PooledPruneConfig):
    FAMILY: ClassVar[str] = "PaliGemma"
    UNIT: ClassVar[str] = "image"


@dataclass
class AyaVisionPruneConfig(PooledPruneConfig):
    FAMILY: ClassVar[str] = "Aya Vision"
    UNIT: ClassVar[str] = "tile"


@dataclass
class Cohere2VisionPruneConfig(PooledPruneConfig):
    FAMILY: ClassVar[str] = "Command A Vision"
    UNIT: ClassVar[str] = "tile"


@dataclass
class Ovis2PruneConfig(PooledPruneConfig):
    FAMILY: ClassVar[str] = "Ovis2"
    UNIT: ClassVar[str] = "tile"


@dataclass
class DeepseekVLPruneConfig(PooledPruneConfig):
    FAMILY: ClassVar[str] = "DeepSeek-VL"
    UNIT: ClassVar[str] = "image"


@dataclass
class JanusPruneConfig(PooledPruneConfig):
    FAMILY: ClassVar[str] = "Janus"
    UNIT: ClassVar[str] = "image"


@dataclass
class Lfm2VlPruneConfig(PooledPruneConfig):
    """LFM2-VL: vision side only (its language model's short-convolution layers keep a
    state of the last tokens), so SAINT's mode defaults to ``vit``."""

    FAMILY: ClassVar[str] = "LFM2-VL"
    UNIT: ClassVar[str] = "tile"
    METHODS: ClassVar[tuple[str, ...]] = ("saint", "random")

    mode: str = "vit"

    def validate(self) -> None:
        if self.method == "saint" and self.mode in ("llm", "hybrid"):
            raise ValueError(f"mode={self.mode!r}: saint prunes {self.FAMILY} on the vision side only (its language "
                             "model's short-convolution layers keep a state of the last tokens); use mode='vit' or "
                             "method='random'")
        super().validate()


@dataclass
class PooledPatch(VlmPatch):
    """A patched model of a family here: the VLM handle and the group pruner of
    ``vit``/``hybrid``."""

    tower: GroupPruner | None = None
    unit_tokens: int = 0  # image tokens the processor emits per unit (0 for a NaFlex tower's: each its own)
    kept_per_unit: int = 0  # of the last vision-side reduction

    def remove(self) -> None:
        super().remove()
        if self.tower is not None:
            self.tower.remove()
            self.tower = None

    def vision_stats(self) -> TokenStats | None:
        """Tokens entering each vision layer in the last forward with images, per unit
        (``vit``/``hybrid`` only)."""
        return None if self.tower is None else self.tower.stats()


def _internvl_unit(mm: torch.nn.Module) -> tuple[int, int]:
    """InternVL's tile: patches per side, and the pixel shuffle's group side (0.5: 2x2)."""
    vc = mm.config.vision_config
    size, patch = (int(v[0]) if isinstance(v, (list, tuple)) else int(v) for v in (vc.image_size, vc.patch_size))
    return size // patch, round(1 / float(mm.config.downsample_ratio))


def _side(mm: torch.nn.Module) -> int:
    """Patches per side of one unit of the tower (an image or a tile)."""
    vc = mm.config.vision_config
    return int(vc.image_size) // int(vc.patch_size)


def _gemma3_unit(mm: torch.nn.Module) -> tuple[int, int]:
    """Gemma 3's image: patches per side, and the average pool's kernel."""
    return _side(mm), _side(mm) // round(int(mm.config.mm_tokens_per_image) ** 0.5)


def _patch_unit(mm: torch.nn.Module) -> tuple[int, int]:
    """An image whose every patch is one token (PaliGemma's projector, DeepSeek-VL's and
    Janus's aligner): patches per side, groups of one patch."""
    return _side(mm), 1


def _idefics3_unit(mm: torch.nn.Module) -> tuple[int, int]:
    """Idefics3 / SmolVLM's tile: patches per side, and the pixel shuffle's ``scale_factor``."""
    return _side(mm), int(mm.config.scale_factor)


def _shuffled_unit(mm: torch.nn.Module) -> tuple[int, int]:
    """Aya Vision's / Command A Vision's tile: patches per side, and the pixel shuffle's ``downsample_factor``."""
    return _side(mm), int(mm.config.downsample_factor)


def _ovis2_unit(mm: torch.nn.Module) -> tuple[int, int]:
    """Ovis2's tile: patches per side, and the visual tokenizer's ``hidden_stride``."""
    return _side(mm), int(mm.config.vision_config.hidden_stride)


def _naflex_unit(mm: torch.nn.Module) -> tuple[int, int]:
    """LFM2-VL's tiles have their own patch grids (NaFlex): no fixed side; the pixel
    unshuffle's ``downsample_factor``."""
    return 0, int(mm.config.downsample_factor)


def _check_last_layer(mm: torch.nn.Module, cfg: PooledPruneConfig) -> None:
    """The vit mode scatters the tower's last output back to the grid: the model must read it."""
    if mm.config.vision_feature_layer not in (-1, None):
        raise ValueError(f"vision_feature_layer={mm.config.vision_feature_layer}: saint's vit mode reads the "
                         "tower's last layer (-1), whose output it scatters back to the full grid")


def _check_internvl(mm: torch.nn.Module, cfg: PooledPruneConfig) -> None:
    _check_last_layer(mm, cfg)
    if float(mm.config.downsample_ratio) != 0.5:
        raise ValueError(f"downsample_ratio={mm.config.downsample_ratio}: saint's vit mode keeps the 2x2 groups "
                         "a 0.5 pixel shuffle folds into one token")


@dataclass(frozen=True)
class Family:
    """One VLM whose projector pools patch groups: the adapter's name, the model classes
    (``module`` and ``classes`` inside ``transformers.models``), its settings class, the
    tower's layout, ``unit(mm)`` (patches per side of one unit, and the group side), the
    family's own checks of the vit mode and where the multimodal model keeps its tower.
    Its ``make_config``/``matches``/``patch``/``unpatch`` are the family functions of its
    adapter."""

    key: str
    module: str
    classes: tuple[str, ...]
    config: type[PooledPruneConfig]
    layout: TowerLayout
    unit: Callable[[torch.nn.Module], tuple[int, int]]
    check: Callable[[torch.nn.Module, PooledPruneConfig], None] = lambda mm, cfg: None
    tower_name: str = "vision_tower"  # the multimodal model's attribute holding the tower
    position_offset: int = 0  # the first position the model gives a prompt it numbers itself
    naflex: bool = False  # units patchified at their own sizes (a NaFlex tower): each its own token count

    def tower(self, mm: torch.nn.Module) -> torch.nn.Module:
        return getattr(mm, self.tower_name)

    @property
    def name(self) -> str:
        return self.config.FAMILY

    def unit_tokens(self, mm: torch.nn.Module) -> int:
        """Image tokens the processor emits per unit (InternVL: ``image_seq_length``)."""
        side, group = self.unit(mm)
        return (side // group) ** 2

    def matches(self, model: torch.nn.Module) -> bool:
        return transformers_loaded() and type(model) in transformers_classes(self.module, *self.classes)

    def make_config(self, method: str = "saint", **kwargs: Any) -> PooledPruneConfig:
        """Build and validate the settings, rejecting those the chosen method/mode does
        not use (so a typo never silently does nothing)."""
        return self.config.build(method, **kwargs)

    def patch(self, model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
              **kwargs: Any) -> PooledPatch:
        return patch(self, model, method, trace=trace, **kwargs)

    def unpatch(self, model: torch.nn.Module) -> None:
        unpatch(model)


INTERNVL = Family("internvl", "internvl", ("InternVLForConditionalGeneration", "InternVLModel"), InternVLPruneConfig,
                  INTERNVL_TOWER, _internvl_unit, _check_internvl)
GEMMA3 = Family("gemma3", "gemma3", ("Gemma3ForConditionalGeneration", "Gemma3Model"), Gemma3PruneConfig,
                SIGLIP_TOWER, _gemma3_unit)
IDEFICS3 = Family("idefics3", "idefics3", ("Idefics3ForConditionalGeneration", "Idefics3Model"), Idefics3PruneConfig,
                  IDEFICS3_TOWER, _idefics3_unit, tower_name="vision_model")
PALIGEMMA = Family("paligemma", "paligemma", ("PaliGemmaForConditionalGeneration", "PaliGemmaModel"),
                   PaliGemmaPruneConfig, SIGLIP_TOWER, _patch_unit, position_offset=1)
AYA_VISION = Family("aya_vision", "aya_vision", ("AyaVisionForConditionalGeneration", "AyaVisionModel"),
                    AyaVisionPruneConfig, SIGLIP_LAST_LAYER, _shuffled_unit, _check_last_layer)
COHERE2_VISION = Family("cohere2_vision", "cohere2_vision", ("Cohere2VisionForConditionalGeneration",
                                                             "Cohere2VisionModel"),
                        Cohere2VisionPruneConfig, SIGLIP_TOWER, _shuffled_unit)
OVIS2 = Family("ovis2", "ovis2", ("Ovis2ForConditionalGeneration", "Ovis2Model"), Ovis2PruneConfig, OVIS2_TOWER,
               _ovis2_unit)
DEEPSEEK_VL = Family("deepseek_vl", "deepseek_vl", ("DeepseekVLForConditionalGeneration", "DeepseekVLModel"),
                     DeepseekVLPruneConfig, IDEFICS3_TOWER, _patch_unit, tower_name="vision_model")
JANUS = Family("janus", "janus", ("JanusForConditionalGeneration", "JanusModel"), JanusPruneConfig,
               IDEFICS3_TOWER, _patch_unit, tower_name="vision_model")
SMOLVLM = Family("smolvlm", "smolvlm", ("SmolVLMForConditionalGeneration", "SmolVLMModel"), SmolVLMPruneConfig,
                 IDEFICS3_TOWER, _idefics3_unit, tower_name="vision_model")
LFM2_VL = Family("lfm2_vl", "lfm2_vl", ("Lfm2VlForConditionalGeneration", "Lfm2VlModel"), Lfm2VlPruneConfig,
                 SIGLIP_TOWER, _naflex_unit, naflex=True)


def make_features(handle: PooledPatch, original: Any, own_units: bool = False) -> Any:
    """``get_image_features`` that returns each unit's kept tokens only, from the
    projector's output in raster order: the tower's keep mask (``vit``/``hybrid``), or
    ``random``'s seeded subset (the same in every unit)."""
    cfg = handle.config

    @functools.wraps(original)  # generate reads the signature to pre-encode the pixels
    def features(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        feats = out.pooler_output
        if own_units:  # a NaFlex tower's units (LFM2-VL): one tensor per unit, each of its own length
            return _keep_own_units(handle, out)
        per_prompt = isinstance(feats, (list, tuple))  # Idefics3: each prompt's units, flattened
        units = torch.cat(list(feats)).unflatten(0, (-1, handle.unit_tokens)) if per_prompt else feats
        keep = None if handle.tower is None else handle.tower.keep
        if cfg.method == "random":
            n = units.shape[1]
            keep = random_keep(n, cfg.keep_ratio, cfg.seed, units.device).expand(units.shape[0], n)
        if keep is not None:
            kept = units[keep].view(keep.shape[0], -1, units.shape[-1])
            handle.kept_per_unit = kept.shape[1]
            if per_prompt:
                sizes = [f.shape[0] // handle.unit_tokens for f in feats]
                out.pooler_output = [k.flatten(0, 1) for k in kept.split(sizes)]
            else:
                out.pooler_output = kept
        return out

    return features


def _keep_own_units(handle: PooledPatch, out: Any) -> Any:
    """:func:`make_features` of units with their own token counts (``pooler_output`` one
    ``[tokens, C]`` tensor per unit, raster order): each unit's kept groups, by the tower's
    per-unit keep masks or ``random``'s seeded subset of each unit's tokens."""
    feats = list(out.pooler_output)
    cfg = handle.config
    if cfg.method == "random":
        keep = [random_keep(int(f.shape[0]), cfg.keep_ratio, cfg.seed, f.device) for f in feats]
    else:
        keep = None if handle.tower is None else handle.tower.keep
    if keep is not None:
        if len(keep) != len(feats) or any(k.shape[0] != f.shape[0] for k, f in zip(keep, feats, strict=False)):
            raise RuntimeError(f"the tower kept groups of {[k.shape[0] for k in keep]} but the projector gave "
                               f"{[int(f.shape[0]) for f in feats]} tokens per unit")
        out.pooler_output = [f[k] for f, k in zip(feats, keep, strict=True)]
    return out


def _plan(family: Family, handle: PooledPatch):
    def plan(input_ids: torch.Tensor, feats: Any) -> torch.Tensor | None:
        if family.naflex:  # units of their own sizes: each shrinks from its own count
            # each unit's count is its run of tokens in the prompt (the processor separates them), which
            # also holds for the features generate repeats per beam or returned sequence after making them
            image = input_ids == handle.image_token_id
            runs = torch.bincount(run_index(image)[image]).tolist() if bool(image.any()) else []
            return shrink_plan(input_ids, [int(f.shape[0]) for f in feats], handle.image_token_id, runs)
        if isinstance(feats, (list, tuple)):  # each prompt's kept tokens, flattened
            k = handle.kept_per_unit
            counts = [k] * (sum(int(f.shape[0]) for f in feats) // k)
        else:
            counts = [int(feats.shape[1])] * int(feats.shape[0])
        return shrink_plan(input_ids, counts, handle.image_token_id, handle.unit_tokens)

    return plan


def _prefill(family: Family, handle: PooledPatch, module: torch.nn.Module, kwargs: dict[str, Any],
             fwd: Forward) -> dict[str, Any]:
    """A prompt with images on an empty cache: with a vision-side reduction the tower runs
    now and every unit's tokens shrink to its kept groups; the decoder pruner then starts
    on the image tokens."""
    input_ids = kwargs["input_ids"]
    fwd.input_length = input_ids.shape[1]
    if handle.config.reduces_vision:
        if handle.config.prunes_vit and kwargs.get("vision_feature_layer") not in (None, -1):
            raise ValueError(f"vision_feature_layer={kwargs['vision_feature_layer']}: saint's vit mode reads the "
                             "tower's last layer (-1)")
        kwargs = image_features(module, kwargs)
        feats = kwargs["mm_encoder_outputs"]["image"].pooler_output
        return start_prefill(handle, kwargs, _plan(family, handle)(input_ids, feats), fwd)
    return start_prefill(handle, kwargs, None, fwd)


def patch(family: Family, model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False,
          **kwargs: Any) -> PooledPatch:
    """Patch a model of ``family`` in place (see the module docstring and
    :func:`saint.patch`). ``method`` may be a SAINT-family :class:`~saint.methods.MethodSpec`
    (e.g. a calibration probe): it then selects the image tokens of ``mode="llm"/"hybrid"``."""
    method, llm_spec = split_method(method, family.name)
    cfg = family.make_config(method, **kwargs)
    mm = multimodal(model)
    pruner = decoder_pruner(cfg, language_model(mm), llm_spec)
    tower = family.tower(mm)
    if cfg.prunes_vit:
        check_vit_layer(tower, family.layout, cfg.vit_layer)
        family.check(mm, cfg)
    handle = PooledPatch(cfg, model, mm, int(mm.config.image_token_id), pruner, trace=trace,
                         unit_tokens=family.unit_tokens(mm))
    handle.position_offset = family.position_offset
    with installing(handle):
        if cfg.prunes_vit:
            pruner = NaflexGroupPruner if family.naflex else GroupPruner
            handle.tower = pruner(tower, family.layout, family.unit(mm)[1], cfg.vit_layer, cfg.vit_ratio,
                                  cfg.vit_step_div)
            handle.tower.install()
            handle.hooked.append(Hooked(mm, family.tower, tower, "the vision tower"))
        if cfg.reduces_vision:
            handle.wrap(mm, "get_image_features", make_features(handle, mm.get_image_features, family.naflex))
            if model is not mm and hasattr(model, EXPAND) and EXPAND not in model.__dict__:
                handle.wrap(model, EXPAND, make_expand(handle, getattr(model, EXPAND), _plan(family, handle)))
        prefill = functools.partial(_prefill, family)
        install_forward_hooks(handle, model, mm, make_mm_pre(handle, MEDIA, prefill, continue_prompt))
    return handle


class PooledVlm(HFVlm):
    """A VLM whose projector pools patch groups: sites are the language model's decoder
    layers; inputs are processor-output dicts (``input_ids``, ``pixel_values`` of every
    unit, ``attention_mask``, Gemma 3's ``token_type_ids``)."""

    def __init__(self, family: Family) -> None:
        self.family = family  # type: ignore[assignment]  # matches/patch/unpatch, as a family module's
        self.name = family.key

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        """The token grid of one unit: its groups per side (a clear error where each unit
        has its own grid: LFM2-VL)."""
        mm = multimodal(model)
        if self.family.naflex:
            raise ValueError(f"{type(model).__name__} patchifies every tile at its own size: there is no one patch grid "
                             "to map kept tokens to")
        vc = mm.config.vision_config
        size = int(vc.image_size[0]) if isinstance(vc.image_size, (list, tuple)) else int(vc.image_size)
        side = round(self.family.unit_tokens(mm) ** 0.5)
        return Grid(side, side, (size // side, size // side))


ADAPTERS = tuple(PooledVlm(f) for f in (INTERNVL, GEMMA3, IDEFICS3, SMOLVLM, PALIGEMMA, AYA_VISION, COHERE2_VISION,
                                         OVIS2, DEEPSEEK_VL, JANUS, LFM2_VL))

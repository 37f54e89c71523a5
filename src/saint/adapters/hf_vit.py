"""Hugging Face ViT-style encoders (transformers 5): ``ViTModel``, ``ViTMSNModel`` (MSN's
self-supervised ViT, ViT's architecture under its own class names), ``DeiTModel``,
``Dinov2Model``, ``Dinov2WithRegistersModel`` and ``DINOv3ViTModel`` (rotary: each token
keeps its own rows of the grid's cos/sin table, a merged token its destination's),
``IJepaModel`` (I-JEPA: ViT's layers, no class token, so every token is prunable and its
embedding is the mean of its tokens, merged ones weighted by size), ``ViTMAEModel`` (MAE's
encoder: ViT's layers over the class token and the patches its random masking leaves
visible, in the shuffled order it returns; pruning selects among those, and its ``mask`` /
``ids_restore`` still describe the masking), the classifiers that read only their
prefix tokens (``ViTForImageClassification``, ``DeiTForImageClassification``,
``DeiTForImageClassificationWithTeacher``), and those that average their tokens
(``Dinov2ForImageClassification``, ``Dinov2WithRegistersForImageClassification``,
``IJepaForImageClassification``: their classifier reads each image's size-weighted mean
over its real tokens, :mod:`saint.adapters.hf_mean_head`). The backbones ``Dinov2Backbone``,
``Dinov2WithRegistersBackbone`` and ``DINOv3ViTBackbone``, and the dense heads that hold one
as ``.backbone`` (``DepthAnythingForDepthEstimation``, ``DPTForDepthEstimation``,
``UperNetForSemanticSegmentation``, ``ZoeDepthForDepthEstimation`` ...), take the
merging methods only: every layer's output leaves as one row per patch, the row of the token
it became (ToMe's unmerge), so the feature maps lie on the input's grid and the heads run
unchanged (:func:`saint.adapters.hf_encoder.backbone_forward`). So do the OWL-ViT and OWLv2
detectors (``OwlViTForObjectDetection``, ``Owlv2ForObjectDetection``: CLIP's layers, whose
class and box heads read every patch; the protocol runs their image side alone,
``Family.image_side``), CLIPSeg (``CLIPSegForImageSegmentation``, whose decoder reads
three of its tower's hidden states whole), and DPT's own ViT
(``DPTModel``, ViT or hybrid, alone or in ``DPTForDepthEstimation`` /
``DPTForSemanticSegmentation``: dpt-large, dpt-hybrid-midas): its layers keep transformers'
older layout (``query``/``key``/``value``, an output module that adds the residual) and its
attention passes no mask, so saint runs their q/k/v/out itself wherever a layer needs a
mask or selects (``LayerParts.own_attention``; ``output_attentions`` is refused). VideoMAE
(``VideoMAEModel``, ``VideoMAEForVideoClassification``, whose ``fc_norm`` reads the mean) has
the same layers over a clip's tubelets, no class token; ViViT (``VivitModel``,
``VivitForVideoClassification``, which reads the class token) ViT's layers over tubelets.
Video batches are ``[N, T, 3, H, W]``. BEiT (``BeitModel``, ``BeitForImageClassification``;
DiT's checkpoints are BEiT) adds a relative position bias per pair of tokens, which every
remaining token reads at its original index (``LayerParts.pair_bias``,
:mod:`saint.adapters.pair_bias`), and a pooler that averages the patch tokens inside itself
(``Family.pool``); ``BeitBackbone`` and ``BeitForSemanticSegmentation`` are dense.
Data2Vec-vision (``Data2VecVisionModel``, ``Data2VecVisionForImageClassification``, and
``Data2VecVisionForSemanticSegmentation``, dense) is BEiT's
layer in the older layout, its bias inside the self-attention.

Each encoder layer's ``forward`` is wrapped per instance and runs the layer's own modules
in the order transformers runs them (pre-norm attention, residual, [selection], pre-norm
MLP, residual; DINOv2's layer scales and drop path, ViT's hidden dropout), through
:mod:`saint.adapters.hf_encoder`, shared with CLIP/SigLIP: attention through the model's
own kernel (sdpa or eager), keys read by a forward hook on ``k_proj``, ragged batches
packed with attention per image through the layer's own q/k/v/o projections
(``layout="padded"`` masks instead). A family here only says where its layers and their
parts are (:class:`Family`).

Protected tokens: the class token, DeiT's distillation token, DINOv2's and DINOv3's registers.
Every classifier's logits are per image; the encoder's
``last_hidden_state`` / ``hidden_states`` are NaN-padded after a ragged step
(:func:`saint.token_mask`, :func:`saint.per_image`).

Refused (``REFUSED``, with what to do instead): an ``IJepaModel`` with its pooler (it reads
position 0, a patch that pruning merges, drops or pads), the masked-image-modeling heads (they
reconstruct every patch), a backbone with a method that drops tokens. A ``Dinov2Model``
patched on its own inside ``Dinov2ForImageClassification`` is not detected: the
classifier's own mean would average the padding (patch the classifier).
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..methods import MethodSpec
from . import hf_mean_head
from .base import FamilyAdapter, Grid, Probe, Site, select_at_of, vit_block_flops
from .common import SITE_ATTR
from .hf_encoder import (
    HFEncoderPatch,
    LayerParts,
    ProjectionProbe,
    attach_head,
    encoder_sites,
    patch_encoder,
    patched_through,
    unpatch_tower_of,
)
from .hf_vision import layer_parts as clip_layer_parts

# models that wrap a supported one but read its tokens in a way a pruned output cannot serve
REFUSED = {
    name: reason for names, reason in [
        (("ViTForMaskedImageModeling", "DeiTForMaskedImageModeling"),
         "masked image modeling reconstructs every patch; prune a ViTModel / DeiTModel instead"),
        (("BeitForMaskedImageModeling",),
         "masked image modeling reconstructs every patch; prune a BeitModel / BeitForImageClassification instead"),
        (("VideoMAEForPreTraining",),
         "its decoder reconstructs every masked tubelet; prune a VideoMAEModel or VideoMAEForVideoClassification"),
        (("ViTMAEForPreTraining",),
         "its decoder puts every visible patch's token back at its place (ids_restore) to reconstruct the masked "
         "ones; prune a ViTMAEModel (config.mask_ratio=0.0 keeps every patch, for features)"),
    ] for name in names
}


@dataclass(frozen=True)
class Family:
    """One HF ViT-style family: its encoder model and the classifiers that hold it
    (class -> attribute), its layer and attention classes, where the layers are, where a
    layer keeps its parts, how many prefix tokens are protected and the MLP's width."""

    name: str
    model: type
    wrappers: dict[type, str]
    layer: type
    attention: type
    layers: str
    parts: Callable[[torch.nn.Module], LayerParts]
    protected: Callable[[Any], int]
    mlp_hidden: Callable[[Any], float]
    dense: bool = False  # a backbone: its feature maps lie on the input's grid (merging methods, unmerged outputs)
    pool: Callable[..., torch.Tensor] | None = None  # a per-instance forward for the encoder's pooler (BEiT's mean)
    # the image side of a model whose forward needs more than images (OWL-ViT's detector: its text
    # queries): ``image_side(model, pixel_values)``, what the protocol runs and embeds
    image_side: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None


def _vit_parts(layer: torch.nn.Module) -> LayerParts:
    """ViT / DeiT: ``layernorm_before``, ``attention``, ``layernorm_after``, ``mlp``, and
    one hidden dropout on both residual branches."""
    a = layer.attention
    return LayerParts(layer.layernorm_before, a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, int(a.num_attention_heads),
                      int(a.head_dim), float(a.scaling), float(a.attention_dropout), layer.layernorm_after, layer.mlp,
                      drop_path=layer.dropout)


def _dinov2_parts(layer: torch.nn.Module) -> LayerParts:
    """DINOv2: ``norm1``, ``attention``, ``norm2``, ``mlp``, layer scales and drop path."""
    a = layer.attention
    return LayerParts(layer.norm1, a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, int(a.num_attention_heads),
                      int(a.head_dim), float(a.scaling), float(a.attention_dropout), layer.norm2, layer.mlp,
                      ls1=layer.layer_scale1, ls2=layer.layer_scale2, drop_path=layer.drop_path)


def _dinov3_parts(layer: torch.nn.Module) -> LayerParts:
    """DINOv3: DINOv2's layout plus rotary position embedding (its own ``rotate_half``)."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import rotate_half

    a = layer.attention
    return LayerParts(layer.norm1, a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, int(a.num_heads), int(a.head_dim),
                      float(a.scaling), float(a.dropout), layer.norm2, layer.mlp, ls1=layer.layer_scale1,
                      ls2=layer.layer_scale2, drop_path=layer.drop_path, rotate_half=rotate_half)


def _legacy_vit_parts(layer: torch.nn.Module) -> LayerParts:
    """ViT layers in transformers' older layout (DPT, VideoMAE, Data2Vec-vision): the
    attention's ``query``/``key``/``value``, its output's dense layer and dropout; the MLP is the
    intermediate layer, then the output's dense layer and dropout (the residual that module
    adds, saint adds). Its attention passes no mask, so saint runs the attention where a
    layer needs one."""
    a, out = layer.attention, layer.output
    s = a.attention
    dropout = s.dropout_prob if hasattr(s, "dropout_prob") else s.dropout.p  # Data2Vec-vision keeps a module
    return LayerParts(layer.layernorm_before, a, s.query, s.key, s.value,
                      lambda x: a.output.dropout(a.output.dense(x)), int(s.num_attention_heads),
                      int(s.attention_head_size), float(s.attention_head_size) ** -0.5, float(dropout),
                      layer.layernorm_after, lambda x: out.dropout(out.dense(layer.intermediate(x))),
                      own_attention=True, branch_first=True)


def _vitpose_parts(layer: torch.nn.Module) -> LayerParts:
    """ViTPose's backbone: the older layout's attention (``query``/``key``/``value``, its
    output's dense layer and dropout) with a plain MLP (``fc1``, activation, ``fc2``). Its
    ViTPose++ form picks an MLP expert per image (``dataset_index``), which a packed stream of
    several images cannot: refused."""
    if getattr(layer, "num_experts", 1) > 1:
        raise TypeError(f"this ViTPose backbone's MLP picks one of {layer.num_experts} experts per image "
                        "(ViTPose++, dataset_index); saint supports the single-expert ViTPose backbones")
    a = layer.attention
    s = a.attention
    return LayerParts(layer.layernorm_before, a, s.query, s.key, s.value,
                      lambda x: a.output.dropout(a.output.dense(x)), int(s.num_attention_heads),
                      int(s.attention_head_size), float(s.scaling), float(s.dropout_prob), layer.layernorm_after,
                      layer.mlp, own_attention=True, branch_first=True, second_argument_unused=True)


def _beit_parts(layer: torch.nn.Module) -> LayerParts:
    """BEiT (and DiT): ViT's layout with layer scales (``lambda_1`` / ``lambda_2`` after the
    hidden dropout), drop path, and a relative position bias per pair of tokens
    (:func:`_beit_pair_bias`); its attention takes the bias as its mask, so saint runs the
    attention wherever tokens were removed."""
    a = layer.attention
    return LayerParts(layer.layernorm_before, a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, int(a.num_attention_heads),
                      int(a.head_dim), float(a.scaling), float(a.attention_dropout), layer.layernorm_after, layer.mlp,
                      ls1=lambda x: layer.lambda_1 * layer.dropout(x), ls2=lambda x: layer.lambda_2 * layer.dropout(x),
                      drop_path=layer.drop_path, pair_bias=functools.partial(_beit_pair_bias, layer),
                      own_attention=True, branch_first=True)


def _beit_pair_bias(layer: torch.nn.Module, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]
                    ) -> torch.Tensor | None:
    """The bias BEiT's layer adds to its attention over the full grid: the model's shared
    relative position bias (its ``attention_mask``), plus the layer's own table if it has one."""
    return _grid_bias(layer.relative_position_bias, layer.patch_size, attention_mask, kwargs)


def _grid_bias(table: torch.nn.Module | None, patch_size: int, shared: torch.Tensor | None,
               kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A BEiT-style relative position ``table`` over the full grid of the layer's input
    (``resolution`` and ``interpolate_pos_encoding`` from its keyword arguments), plus the
    model's ``shared`` bias."""
    if table is None:
        return shared
    height, width = kwargs["resolution"]
    window = (height // patch_size, width // patch_size)
    bias = table(window, kwargs.get("interpolate_pos_encoding", False), dim_size=window[0] * window[1] + 1)
    return bias if shared is None else bias + shared


def _data2vec_parts(layer: torch.nn.Module) -> LayerParts:
    """Data2Vec-vision: BEiT's layer in transformers' older layout (:func:`_legacy_vit_parts`)
    with optional layer scales ``lambda_1`` / ``lambda_2``, drop path, its relative position bias
    inside the self-attention (:func:`_data2vec_pair_bias`), and layers that return tuples."""
    return replace(_legacy_vit_parts(layer), ls1=functools.partial(_scaled, layer, "lambda_1"),
                   ls2=functools.partial(_scaled, layer, "lambda_2"), drop_path=layer.drop_path,
                   pair_bias=functools.partial(_data2vec_pair_bias, layer), returns_tuple=True)


def _scaled(layer: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` times the layer's scale ``name`` where it has one (Data2Vec-vision's are optional)."""
    gamma = getattr(layer, name)
    return x if gamma is None else gamma * x


def _data2vec_pair_bias(layer: torch.nn.Module, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]
                        ) -> torch.Tensor | None:
    """The bias Data2Vec-vision's layer adds over the full grid: its self-attention's own table
    (if it has one) plus the model's shared one (``relative_position_bias``)."""
    attn = layer.attention.attention
    table = attn.relative_position_bias if attn.has_relative_position_bias else None
    return _grid_bias(table, attn.config.patch_size, kwargs.get("relative_position_bias"), kwargs)


def _beit_pool(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """BEiT's pooler: with mean pooling, each image's mean over its real patch tokens, a merged
    one weighted by how many it stands for (the model's own where every token is real and whole)."""
    weights = self.__dict__[SITE_ATTR][0].output_weights()
    if self.layernorm is None or weights is None:
        return type(self).forward(self, hidden_states)
    return self.layernorm(hf_mean_head.mean_of_real_tokens(hidden_states, weights, 1))


def _owl_image_embeds(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """An OWL-ViT / OWLv2 detector's image side: its image embeddings on the patch grid
    ``[B, H, W, C]`` (``image_embedder``, what the class and box heads read)."""
    return model.image_embedder(pixel_values=pixel_values)[0]


def _clipseg_activations(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """A CLIPSeg segmenter's image side: the tower's hidden states its decoder reads
    (``extract_layers``), ``[B, layers, N, C]``."""
    out = model.clip.get_image_features(pixel_values=pixel_values, output_hidden_states=True)
    return torch.stack([out.hidden_states[i + 1] for i in model.extract_layers], dim=1)


def _dinov3_mlp_hidden(cfg: Any) -> float:
    """The gated MLP's three matmuls count as 1.5x its width's two."""
    return (1.5 if cfg.use_gated_mlp else 1.0) * int(cfg.intermediate_size)


def _dinov2_mlp_hidden(cfg: Any) -> float:
    hidden = int(cfg.hidden_size * cfg.mlp_ratio)
    if cfg.use_swiglu_ffn:  # three matmuls of 2/3 the width (rounded up to 8): 1.5x that width's two
        return 1.5 * ((int(hidden * 2 / 3) + 7) // 8 * 8)
    return hidden


@functools.cache
def _families() -> list[Family]:
    """The supported families (transformers imported here, on first use)."""
    from transformers.models.beit import modeling_beit as beit
    from transformers.models.clipseg import modeling_clipseg as clipseg
    from transformers.models.data2vec import modeling_data2vec_vision as d2v
    from transformers.models.deit import modeling_deit as deit
    from transformers.models.dinov2 import modeling_dinov2 as d
    from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as r
    from transformers.models.dinov3_vit import modeling_dinov3_vit as d3
    from transformers.models.dpt import modeling_dpt as dpt
    from transformers.models.ijepa import modeling_ijepa as ijepa
    from transformers.models.owlv2 import modeling_owlv2 as owlv2
    from transformers.models.owlvit import modeling_owlvit as owlvit
    from transformers.models.videomae import modeling_videomae as vm
    from transformers.models.vit import modeling_vit as vit
    from transformers.models.vit_mae import modeling_vit_mae as mae
    from transformers.models.vit_msn import modeling_vit_msn as msn
    from transformers.models.vitpose_backbone import modeling_vitpose_backbone as vitpose
    from transformers.models.vivit import modeling_vivit as vivit

    return [
        Family("vit", vit.ViTModel, {vit.ViTForImageClassification: "vit"}, vit.ViTLayer, vit.ViTAttention,
               "layers", _vit_parts, lambda cfg: 1, lambda cfg: cfg.intermediate_size),
        Family("vit_mae", mae.ViTMAEModel, {}, mae.ViTMAELayer, mae.ViTMAEAttention, "layers", _vit_parts,
               lambda cfg: 1, lambda cfg: cfg.intermediate_size),
        Family("vit_msn", msn.ViTMSNModel, {msn.ViTMSNForImageClassification: "vit"}, msn.ViTMSNLayer,
               msn.ViTMSNAttention, "layers", _vit_parts, lambda cfg: 1, lambda cfg: cfg.intermediate_size),
        Family("deit", deit.DeiTModel, {deit.DeiTForImageClassification: "deit",
                                         deit.DeiTForImageClassificationWithTeacher: "deit"},
               deit.DeiTLayer, deit.DeiTAttention, "layers", _vit_parts, lambda cfg: 2,
               lambda cfg: cfg.intermediate_size),
        Family("dinov2", d.Dinov2Model, {d.Dinov2ForImageClassification: "dinov2"}, d.Dinov2Layer,
               d.Dinov2Attention, "encoder.layer", _dinov2_parts, lambda cfg: 1, _dinov2_mlp_hidden),
        Family("dinov2_registers", r.Dinov2WithRegistersModel,
               {r.Dinov2WithRegistersForImageClassification: "dinov2_with_registers"}, r.Dinov2WithRegistersLayer,
               r.Dinov2WithRegistersAttention, "encoder.layer", _dinov2_parts,
               lambda cfg: 1 + int(cfg.num_register_tokens), _dinov2_mlp_hidden),
        Family("dinov3", d3.DINOv3ViTModel, {}, d3.DINOv3ViTLayer, d3.DINOv3ViTAttention, "model.layer",
               _dinov3_parts, lambda cfg: 1 + int(cfg.num_register_tokens), _dinov3_mlp_hidden),
        Family("ijepa", ijepa.IJepaModel, {ijepa.IJepaForImageClassification: "ijepa"}, ijepa.IJepaLayer,
               ijepa.IJepaAttention, "layers", _vit_parts, lambda cfg: 0, lambda cfg: cfg.intermediate_size),
        Family("dinov2_backbone", d.Dinov2Backbone, {}, d.Dinov2Layer, d.Dinov2Attention, "encoder.layer",
               _dinov2_parts, lambda cfg: 1, _dinov2_mlp_hidden, dense=True),
        Family("dinov2_registers_backbone", r.Dinov2WithRegistersBackbone, {}, r.Dinov2WithRegistersLayer,
               r.Dinov2WithRegistersAttention, "encoder.layer", _dinov2_parts,
               lambda cfg: 1 + int(cfg.num_register_tokens), _dinov2_mlp_hidden, dense=True),
        Family("dinov3_backbone", d3.DINOv3ViTBackbone, {}, d3.DINOv3ViTLayer, d3.DINOv3ViTAttention,
               "model.layer", _dinov3_parts, lambda cfg: 1 + int(cfg.num_register_tokens), _dinov3_mlp_hidden,
               dense=True),
        Family("dpt", dpt.DPTModel, {dpt.DPTForDepthEstimation: "dpt", dpt.DPTForSemanticSegmentation: "dpt"},
               dpt.DPTViTLayer, dpt.DPTViTAttention, "encoder.layer", _legacy_vit_parts, lambda cfg: 1,
               lambda cfg: cfg.intermediate_size, dense=True),
        Family("beit", beit.BeitModel, {beit.BeitForImageClassification: "beit"}, beit.BeitLayer, beit.BeitAttention,
               "layers", _beit_parts, lambda cfg: 1, lambda cfg: cfg.intermediate_size, pool=_beit_pool),
        Family("beit_segmentation", beit.BeitModel, {beit.BeitForSemanticSegmentation: "beit"}, beit.BeitLayer,
               beit.BeitAttention, "layers", _beit_parts, lambda cfg: 1, lambda cfg: cfg.intermediate_size, dense=True),
        Family("beit_backbone", beit.BeitBackbone, {}, beit.BeitLayer, beit.BeitAttention, "beit.layers", _beit_parts,
               lambda cfg: 1, lambda cfg: cfg.intermediate_size, dense=True),
        Family("data2vec_vision", d2v.Data2VecVisionModel,
               {d2v.Data2VecVisionForImageClassification: "data2vec_vision"}, d2v.Data2VecVisionLayer,
               d2v.Data2VecVisionAttention, "encoder.layer", _data2vec_parts, lambda cfg: 1,
               lambda cfg: cfg.intermediate_size, pool=_beit_pool),
        Family("data2vec_vision_segmentation", d2v.Data2VecVisionModel,
               {d2v.Data2VecVisionForSemanticSegmentation: "data2vec_vision"}, d2v.Data2VecVisionLayer,
               d2v.Data2VecVisionAttention, "encoder.layer", _data2vec_parts, lambda cfg: 1,
               lambda cfg: cfg.intermediate_size, dense=True),
        Family("vitpose_backbone", vitpose.VitPoseBackbone, {}, vitpose.VitPoseBackboneLayer,
               vitpose.VitPoseBackboneAttention, "encoder.layer", _vitpose_parts, lambda cfg: 0,
               lambda cfg: int(cfg.hidden_size * cfg.mlp_ratio), dense=True),
        Family("owlvit_detection", owlvit.OwlViTVisionTransformer, {owlvit.OwlViTForObjectDetection: "owlvit.vision_model"},
               owlvit.OwlViTEncoderLayer, owlvit.OwlViTAttention, "encoder.layers", clip_layer_parts, lambda cfg: 1,
               lambda cfg: cfg.intermediate_size, dense=True, image_side=_owl_image_embeds),
        Family("owlv2_detection", owlv2.Owlv2VisionTransformer, {owlv2.Owlv2ForObjectDetection: "owlv2.vision_model"},
               owlv2.Owlv2EncoderLayer, owlv2.Owlv2Attention, "encoder.layers", clip_layer_parts, lambda cfg: 1,
               lambda cfg: cfg.intermediate_size, dense=True, image_side=_owl_image_embeds),
        Family("clipseg_segmentation", clipseg.CLIPSegVisionModel,
               {clipseg.CLIPSegForImageSegmentation: "clip.vision_model"}, clipseg.CLIPSegEncoderLayer,
               clipseg.CLIPSegAttention, "encoder.layers", clip_layer_parts, lambda cfg: 1,
               lambda cfg: cfg.intermediate_size, dense=True, image_side=_clipseg_activations),
        Family("vivit", vivit.VivitModel, {vivit.VivitForVideoClassification: "vivit"}, vivit.VivitLayer,
               vivit.VivitAttention, "layers", _vit_parts, lambda cfg: 1, lambda cfg: cfg.intermediate_size),
        Family("videomae", vm.VideoMAEModel, {vm.VideoMAEForVideoClassification: "videomae"}, vm.VideoMAELayer,
               vm.VideoMAEAttention, "encoder.layer", _legacy_vit_parts, lambda cfg: 0,
               lambda cfg: cfg.intermediate_size),
    ]


def _find(model: torch.nn.Module) -> tuple[Family, torch.nn.Module] | None:
    """The family of ``model`` and its encoder (itself, the one a classifier holds, or the
    backbone a dense head holds as ``.backbone``: Depth Anything, DPT, UperNet, ZoeDepth ...)."""
    for family in _families():
        if isinstance(model, family.model):
            return family, model
        if family.dense and isinstance(getattr(model, "backbone", None), family.model):
            return family, model.backbone
        for wrapper, attr in family.wrappers.items():
            held = _held(model, attr) if isinstance(model, wrapper) else None
            if isinstance(held, family.model):
                return family, held
    return None


def _held(model: torch.nn.Module, path: str) -> Any:
    """The attribute at dotted ``path`` of ``model`` (None where there is none)."""
    for name in path.split("."):
        model = getattr(model, name, None)
    return model


def _found(model: torch.nn.Module) -> tuple[Family, torch.nn.Module]:
    found = _find(model)
    if found is None:
        raise TypeError(f"expected a Hugging Face ViT, ViT-MAE, ViT-MSN, DeiT, DINOv2, DINOv3, I-JEPA, BEiT, Data2Vec-vision, DPT, ViTPose, "
                        "OWL-ViT / OWLv2 detector, CLIPSeg, VideoMAE or ViViT model, "
                        f"got {type(model).__name__}")
    return found


def matches(model: torch.nn.Module) -> bool:
    """True for the supported models (never imports transformers itself)."""
    return sys.modules.get("transformers") is not None and _find(model) is not None


def _layers(family: Family, tower: torch.nn.Module) -> list[torch.nn.Module]:
    return list(tower.get_submodule(family.layers))


def patch(
    model: torch.nn.Module, method: str | MethodSpec = "saint", trace: bool = False, layout: str = "packed",
    kernel: str = "auto", **kwargs: Any,
) -> HFEncoderPatch:
    """Patch a supported model in place (see :func:`saint.patch`); a classifier's encoder
    is patched and the handle stored on both (a classifier that averages its tokens reads
    each image's real ones, :mod:`saint.adapters.hf_mean_head`)."""
    family, tower = _found(model)
    if family.protected(tower.config) == 0 and getattr(tower, "pooler", None) is not None:
        raise TypeError(f"{type(tower).__name__}'s pooler reads position 0, a patch that pruning merges, drops or "
                        "pads; load it without the pooler (add_pooling_layer=False, the default) and pool the real "
                        "tokens with saint.per_image(out, saint.token_mask(m)), weighted by saint.token_sizes(m) "
                        "after merging")
    hf_mean_head.check(model)
    handle = patch_encoder(tower, _layers(family, tower), family.layers, family.layer, family.attention, family.parts,
                           family.protected(tower.config), patch_grid(tower).num_patches, method, kwargs, trace, layout,
                           kernel, dense=family.dense)
    if family.pool is not None:
        attach_head(handle, getattr(tower, "pooler", None), family.pool, _pooler, "pooler")
    return patched_through(model, tower, handle)


def _pooler(tower: torch.nn.Module) -> torch.nn.Module:
    return tower.pooler


def unpatch(model: torch.nn.Module) -> None:
    """Remove every wrapper and hook: the model is the original object again."""
    _found(model)
    unpatch_tower_of(model)


def patch_grid(tower: torch.nn.Module, inputs: Any = None) -> Grid:
    """The patch grid of ``inputs`` (DINOv2 interpolates its positions, ViT/DeiT with
    ``interpolate_pos_encoding=True``), else of the configured image size. A video's
    (``[N, T, 3, H, W]``: VideoMAE's tubelets of ``tubelet_size`` frames, ViViT's of
    ``tubelet_size = (frames, height, width)``) stacks its tubelet frames' grids row-wise,
    as its tokens lie."""
    cfg = tower.config
    tubelet = getattr(cfg, "tubelet_size", None)
    if isinstance(tubelet, (list, tuple)):  # ViViT: (frames, height, width)
        tubelet, ph, pw = (int(t) for t in tubelet)
    else:
        ph, pw = _pair(cfg.patch_size)
    if inputs is None:
        frames = 1 if tubelet is None else int(cfg.num_frames) // int(tubelet)
        h, w = _pair(cfg.image_size)
        return Grid(frames * (h // ph), w // pw, (ph, pw))
    frames = 1 if tubelet is None else int(inputs.shape[1]) // int(tubelet)
    return Grid(frames * (int(inputs.shape[-2]) // ph), int(inputs.shape[-1]) // pw, (ph, pw))


def _pair(v: Any) -> tuple[int, int]:
    """A size given as one int or as (height, width) (ViTPose's 256 x 192 images)."""
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


class HFViT(FamilyAdapter):
    """Hugging Face ViT, ViT-MSN, DeiT, DINOv2 and I-JEPA encoders and the classifiers that hold them."""

    name = "hf_vit"
    family = sys.modules[__name__]

    def sites(self, model: torch.nn.Module) -> list[Site]:
        family, tower = _found(model)
        return encoder_sites(_layers(family, tower), family.layers, family.parts)

    def protected(self, model: torch.nn.Module) -> int:
        family, tower = _found(model)
        return family.protected(tower.config)

    def grid(self, model: torch.nn.Module, inputs: Any = None) -> Grid:
        return patch_grid(_found(model)[1], inputs)

    def block_flops(self, model: torch.nn.Module, n_in: float, n_out: float, select_at: str | None = None) -> float:
        family, tower = _found(model)
        cfg = tower.config
        return vit_block_flops(n_in, n_out, int(cfg.hidden_size), family.mlp_hidden(cfg), select_at_of(model, select_at))

    def probe(self, model: torch.nn.Module) -> Probe:
        protected = self.protected(model)
        return ProjectionProbe(self.sites(model), _found(model)[0].parts, num_prefix=protected, has_cls=protected > 0)

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        family, tower = _found(model)
        if family.image_side is not None and tower is not model:
            return family.image_side(model, inputs)
        return model(pixel_values=inputs)

    def check_inputs(self, inputs: Any) -> None:
        """Image batches ``[N, 3, H, W]``, or video batches ``[N, T, 3, H, W]`` (VideoMAE, ViViT)."""
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 5 and inputs.shape[0] >= 1:
            return super().check_inputs(inputs.flatten(0, 1))
        return super().check_inputs(inputs)

    def embed(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder's final normed class token (without one, I-JEPA: the mean of its real
        tokens, each weighted by how many it stands for), and a classifier's logits (one
        forward); a classifier that averages its tokens: the features its classifier reads."""
        family, tower = _found(model)
        if hf_mean_head.averages_tokens(model):  # the features its classifier reads
            return hf_mean_head.embed(model, lambda: self.forward(model, inputs))
        if family.image_side is not None and tower is not model:  # the image side's maps, flattened
            return self.forward(model, inputs).flatten(1), None
        if family.dense:  # a dense output: the head's prediction (depth, or logits per pixel), else the last map
            out = self.forward(model, inputs)
            maps = getattr(out, "feature_maps", None)  # a backbone; DPTModel: its last hidden state
            dense = ((out.last_hidden_state if maps is None else maps[-1]) if tower is model
                     else getattr(out, "predicted_depth", None))
            return (out.logits if dense is None else dense).flatten(1), None
        seen: dict[str, Any] = {}
        caller = threading.get_ident()  # another thread's call on the same model fires this hook too

        def keep(module: torch.nn.Module, args: Any, out: Any) -> None:
            if threading.get_ident() == caller:
                seen.setdefault("out", out)

        hook = tower.register_forward_hook(keep)
        try:
            out = self.forward(model, inputs)
        finally:
            hook.remove()
        hidden = seen["out"].last_hidden_state
        pooled = getattr(seen["out"], "pooler_output", None) if family.pool is not None else None
        if pooled is not None:  # BEiT's mean over its patches (the classifier reads it)
            return pooled, getattr(out, "logits", None) if tower is not model else None
        emb = hidden[:, 0] if family.protected(tower.config) else hf_mean_head.token_mean(model, hidden)
        return emb, getattr(out, "logits", None) if tower is not model else None


ADAPTER = HFViT()

"""Patched models under ``torch.autocast`` and ``torch.compile``: selections keep their
similarities float32, so a model run in bf16 autocast prunes exactly as its keys say and
every vision method runs there; a compiled patched ViT gives the patched answer; VLMs
in bf16/fp16 weights prune and generate."""

from __future__ import annotations

import pytest
import torch

import saint
from saint.core import (
    anchor_similarity,
    fixed_budget_keep_mask,
    match_plan,
    query_attention,
    saint_keep_mask,
    saint_select,
    tome_plan,
)
from saint.core.gather import without_autocast

from .conftest import make_tiny, refuses_class_attention


def _keys(b: int = 3, n: int = 41, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Keys whose cosines sit close to thresholds (a bf16 product would round them)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, d, generator=g)
    return base + 0.35 * torch.randn(b, n, d, generator=g)


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_similarity_is_float32_and_equal_under_autocast():
    m = torch.nn.functional.normalize(_keys(), dim=-1)
    a, anc = m[:, 0::2], m[:, 1::2]
    plain = anchor_similarity(a, anc, None)
    with _bf16_autocast():
        assert (a @ anc.transpose(1, 2)).dtype == torch.bfloat16  # what autocast would do
        inside = anchor_similarity(a, anc, None)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, plain)


@pytest.mark.parametrize("rate", ["sample", "batch"])
def test_saint_selections_equal_under_autocast(rate):
    keys = _keys()
    tau = float(torch.nn.functional.cosine_similarity(keys[:, :1], keys, dim=-1).median())
    plain_keep, plain_graph = saint_select(keys, tau, 2, 10.0, rate, 1)
    plain_mask = saint_keep_mask(keys, tau, 1, 10.0, rate, 1)
    with _bf16_autocast():
        keep, graph = saint_select(keys, tau, 2, 10.0, rate, 1)
        mask = saint_keep_mask(keys, tau, 1, 10.0, rate, 1)
    assert not bool(plain_mask.all())  # something is pruned, so the check has teeth
    assert torch.equal(keep, plain_keep) and torch.equal(mask, plain_mask)
    assert torch.equal(graph.degree, plain_graph.degree)
    assert torch.equal(graph.rank_key, plain_graph.rank_key) and torch.equal(graph.best_anchor, plain_graph.best_anchor)
    assert (graph.score is None) == (rate == "sample")  # per sample the score is never read
    assert graph.score is None or torch.equal(graph.score, plain_graph.score)


def test_budget_match_tome_and_query_attention_equal_under_autocast():
    keys = _keys()
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 2, 8, generator=g), torch.randn(3, 41, 2, 8, generator=g)
    plain = (fixed_budget_keep_mask(keys, 12, 4, 1), match_plan(keys, 0.5, 0.5, 1).keep, tome_plan(keys, 6, 1).keep,
             query_attention(q, k, 0.3))
    with _bf16_autocast():
        inside = (fixed_budget_keep_mask(keys, 12, 4, 1), match_plan(keys, 0.5, 0.5, 1).keep,
                  tome_plan(keys, 6, 1).keep, query_attention(q, k, 0.3))
    assert inside[3].dtype == torch.float32
    for got, want in zip(inside, plain, strict=True):
        assert torch.equal(got, want)


def test_without_autocast_is_a_no_op_where_there_is_none():
    with without_autocast(torch.device("meta")):
        out = torch.ones(2, 3, device="meta") @ torch.ones(3, 4, device="meta")
    assert out.shape == (2, 4)


METHODS = {
    "saint": dict(tau=0.5, k=1, layers=[0, 1]),
    "saint_fold": dict(tau=0.5, k=1, layers=[0, 1]),
    "saint_match": dict(tau=0.5, fraction=0.5, layers=[0, 1], guard=0.1),
    "tome": dict(r=3),
    "random": dict(r=3),
    "attn": dict(r=3),
    "budget": dict(keep=8, layers=[1]),
}


@pytest.mark.parametrize("arch", ["vit", "dinov3", "beit", "cait"])
@pytest.mark.parametrize("select_at", ["mlp", "attention"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_vision_method_runs_in_bf16_autocast(method, select_at, arch, images):
    model = make_tiny(arch)
    if refuses_class_attention(model, method, METHODS[method]):
        return
    with torch.no_grad(), _bf16_autocast():
        dtype = model(images).dtype  # bf16 from a classifier head, fp32 from a final norm (DINOv3 has no head)
    saint.patch(model, method, select_at=select_at, **METHODS[method])
    with torch.no_grad(), _bf16_autocast():
        out = model(images)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    tokens = saint.stats(model).mean()
    assert tokens[-1] < tokens[0]  # it pruned under autocast


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_vision_tower_graph_methods_run_in_bf16_autocast(kind, images):
    from .test_hf_vision import make, run

    model = make(kind)
    saint.patch(model, "saint", tau=0.5, k=1, layers=[0, 1])
    with torch.no_grad(), _bf16_autocast():
        out = run(model, images)
    assert bool(torch.isfinite(out.pooler_output).all())
    tokens = saint.stats(model).mean()
    assert tokens[-1] < tokens[0]


@pytest.mark.parametrize("name", ["llm", "hybrid"])
def test_llava_graph_pruning_generates_in_bf16_autocast(name, images):
    from .conftest import left_pad
    from .test_llava import CONFIGS, ROWS, gen
    from .test_llava import make as make_llava

    model = make_llava()
    saint.patch(model, **CONFIGS[name])
    ids, mask = left_pad(ROWS)
    with _bf16_autocast():
        out = gen(model, ids, images, mask)
    assert out.shape[0] == len(ROWS)
    tokens = saint.stats(model).tokens
    assert sum(tokens[-1]) < sum(tokens[0])  # the language model pruned image tokens


@pytest.mark.parametrize("arch", ["vit", "dinov3", "beit", "cait"])
@pytest.mark.parametrize("method,kw", [("tome", dict(r=2)), ("saint_match", dict(tau=0.5, fraction=0.5, layers=[0, 1]))])
def test_compiled_patched_vit_equals_the_patched_one(method, kw, arch, images):
    """Dynamo traces the patched blocks (breaking the graph where a selection reads its
    counts) and gives the eager patched answer, also on a packed ragged batch; the
    ``eager`` backend keeps this a test of tracing, not of a compiler's rounding."""
    model = make_tiny(arch)
    saint.patch(model, method, **kw)
    with torch.no_grad():
        want = model(images)
        layout = saint.stats(model).layout
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager")(images)
    torch._dynamo.reset()
    assert torch.equal(got, want)
    assert saint.stats(model).layout == layout == ("rectangular" if method == "tome" else "packed")


@pytest.mark.parametrize("tower", ["timm", "hf"])
def test_export_and_tracing_are_refused_with_what_to_do(tower, images):
    """torch.jit.trace (and so ONNX's TorchScript export) and torch.export cannot record
    per-image token counts; each says so up front instead of failing deep inside torch
    (a trace also used to stop on an internal assert). The unpatched model exports."""
    if tower == "timm":
        model = make_tiny("vit")
    else:
        transformers = pytest.importorskip("transformers")
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8)).eval()
    saint.patch(model, "tome", r=2)
    hint = "cannot record as a graph; export the unpatched model"
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=hint):
            torch.jit.trace(model, images, strict=False)
        with pytest.raises(RuntimeError, match=hint):
            torch.export.export(model, (images,))
        torch._dynamo.reset()
        with pytest.raises(Exception, match=hint):  # dynamo reports the model's own error as Unsupported
            torch.export.export(model, (images,), strict=True)
        torch._dynamo.reset()
        saint.unpatch(model)
        exported = torch.export.export(model, (images,))
        torch._dynamo.reset()
        out = exported.module()(images)
        assert torch.equal(out if tower == "timm" else out.last_hidden_state,
                           model(images) if tower == "timm" else model(images).last_hidden_state)


def test_vmap_is_refused_with_what_to_do(images):
    """torch.func.vmap runs one image as one program: a patched model's per-image token
    counts cannot be batched that way (a shape error deep inside saint before); the
    unpatched model vmaps, and torch.func.grad still runs through the patched one."""
    model = make_tiny("vit")
    want = torch.func.vmap(lambda x: model(x[None])[0])(images)
    saint.patch(model, "saint", tau=0.3, k=2)
    with pytest.raises(RuntimeError, match="torch.func.vmap runs the model on one image at a time"):
        torch.func.vmap(lambda x: model(x[None])[0])(images)
    grad = torch.func.grad(lambda x: model(x).square().sum())(images)
    assert grad.shape == images.shape and bool(torch.isfinite(grad).all())
    saint.unpatch(model)
    torch.testing.assert_close(torch.func.vmap(lambda x: model(x[None])[0])(images), want)


def test_meta_tensors_are_refused_and_the_flop_counter_runs(images):
    """A forward on meta tensors (shape inference) cannot pick data-dependent token counts:
    refused with what works (before: "Cannot copy out of meta tensor" deep inside saint).
    torch's FlopCounterMode counts a patched model on a real batch: fewer FLOPs than unpatched."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta = make_tiny("vit")
    saint.patch(meta, "tome", r=2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="meta tensors do not carry; run it on real tensors"):
        meta(torch.empty(2, 3, 32, 32, device="meta"))
    saint.unpatch(meta)
    assert meta(torch.empty(2, 3, 32, 32, device="meta")).shape[0] == 2  # the unpatched model infers shapes

    def flops(model: torch.nn.Module) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images)
        return counter.get_total_flops()

    model = make_tiny("vit")
    unpatched = flops(model)
    saint.patch(model, "tome", r=2)
    assert 0 < flops(model) < unpatched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_half_precision_vlms_prune_and_generate(family, dtype, images):
    """VLMs usually run in bf16/fp16 weights: SAINT's hybrid mode (tower drop, then graph
    pruning in the language model) generates with finite logits and prunes there too."""
    if family == "llava":
        from .conftest import left_pad
        from .test_llava import CONFIGS, ROWS, gen, logits
        from .test_llava import make as make_vlm

        model = saint.patch(make_vlm().to(dtype), **CONFIGS["hybrid"])
        ids, mask = left_pad(ROWS)
        out, last = gen(model, ids, images.to(dtype), mask), logits(model, ids, images.to(dtype), mask)[:, -1]
    else:
        from .test_qwen_vl import CONFIGS, batch, gen, logits
        from .test_qwen_vl import make as make_vlm

        model = saint.patch(make_vlm(family).to(dtype), **CONFIGS["hybrid"])
        x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch(family).items()}
        out, last = gen(model, x), logits(model, x)[:, -1]
    assert out.shape[0] == 3 and bool(torch.isfinite(last).all())
    tokens = saint.stats(model).tokens
    assert sum(tokens[-1]) < sum(tokens[0])


def test_siglip2_naflex_batch_runs_packed_in_bf16_autocast():
    """A padded NaFlex batch starts packed; graph pruning runs under bf16 autocast."""
    from .test_hf_siglip2 import images as siglip2_images
    from .test_hf_siglip2 import make as make_siglip2
    from .test_hf_siglip2 import naflex

    model = saint.patch(make_siglip2(), "saint_match", tau=0.2, fraction=0.5)
    with torch.no_grad(), _bf16_autocast():
        out = model(**naflex(siglip2_images()))
    assert bool(torch.isfinite(out.pooler_output).all()) and saint.stats(model).layout == "packed"
    tokens = saint.stats(model).tokens
    assert tokens[0] == [16, 15, 6] and sum(tokens[-1]) < sum(tokens[0])

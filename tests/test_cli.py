"""``saint bench | eval | sweep | demo`` from the command line, on a tiny random timm ViT
(``--model vit_tiny_patch16_224 --model-args ...``) and a few generated images."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from saint.cli import main
from saint.commands.options import add_model_options, build_model

TINY = ["--model", "vit_tiny_patch16_224", "--model-args",
        "img_size=32,patch_size=8,depth=4,embed_dim=32,num_heads=2,num_classes=10"]
COMMON = ["--device", "cpu", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def images(tmp_path):
    """An ImageFolder with two classes of three random photos."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    return str(tmp_path / "imgs")


@pytest.mark.parametrize("command", ["bench", "eval", "sweep", "demo", "calibrate"])
def test_help(command, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: saint " + command in capsys.readouterr().out


def test_bench_tiny_json(images, tmp_path, capsys) -> None:
    out = tmp_path / "b.json"
    rc = main(["bench", *TINY, *COMMON, "--images", images, "--method", "saint:tau=0.5,k=2",
               "--method", "tome:r=2", "--batch-size", "2", "--warmup", "0", "--repeats", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "tome:r=2" in text
    report = json.loads(out.read_text())
    assert {"environment", "model", "images", "settings", "results"} <= set(report)
    assert {"date", "device", "versions", "command", "torch_threads"} <= set(report["environment"])
    assert report["environment"]["torch_threads"] == 1
    assert [r["label"] for r in report["results"]] == ["unpruned", "saint:tau=0.5,k=2", "tome:r=2"]
    assert report["settings"]["batch_size"] == 2 and report["settings"]["dtype"] == "float32"
    assert report["results"][2]["tokens_per_block"] == [17, 15, 13, 11]


def test_bench_by_op_splits_one_forward_by_category(images, tmp_path, capsys) -> None:
    out = tmp_path / "b.json"
    assert main(["bench", *TINY, *COMMON, "--images", images, "--method", "tome:r=2", "--batch-size", "2",
                 "--warmup", "0", "--repeats", "1", "--no-memory", "--by-op", "--json", str(out)]) == 0
    assert "op time of one forward by category" in capsys.readouterr().out
    unpruned, tome = (r["op_time"] for r in json.loads(out.read_text())["results"])
    assert unpruned["selection"]["ops"] == unpruned["packing and merging"]["ops"] == 0
    assert tome["selection"]["ops"] > 0 and unpruned["products"]["gflops"] > tome["products"]["gflops"] > 0
    assert sum(c["share"] for c in tome.values()) == pytest.approx(1.0)


def test_bench_by_op_refuses_an_accelerator() -> None:
    from saint.measure.harness import Harness

    p = argparse.ArgumentParser()
    add_model_options(p)
    harness = Harness(build_model(p.parse_args(TINY))[0])
    harness.device = torch.device("meta")  # as if on an accelerator: refused before anything runs
    with pytest.raises(ValueError, match="CPU only"):
        harness.measure([], torch.zeros(1, 2), by_op=True)


def test_bench_clock_process_times_with_the_process_clock(images, tmp_path, monkeypatch) -> None:
    """``--clock process`` reads time.process_time: a fake one advancing 1 s per read
    makes every timed call last exactly 1000 ms."""
    import itertools

    import saint.commands.options as options

    ticks = itertools.count()
    monkeypatch.setattr(options.time, "process_time", lambda: float(next(ticks)))
    out = tmp_path / "b.json"
    assert main(["bench", *TINY, *COMMON, "--images", images, "--method", "tome:r=2", "--batch-size", "2",
                 "--warmup", "0", "--repeats", "2", "--no-memory", "--clock", "process", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["times_ms"] for r in rows] == [[1000.0, 1000.0]] * 2


def test_bench_bf16(images, capsys) -> None:
    rc = main(["bench", *TINY, *COMMON, "--images", images, "--method", "tome:r=2", "--dtype", "bf16",
               "--batch-size", "2", "--warmup", "0", "--repeats", "1", "--no-memory"])
    assert rc == 0
    assert "bfloat16 on cpu" in capsys.readouterr().out


def test_eval_tiny(images, tmp_path, capsys) -> None:
    out = tmp_path / "e.json"
    rc = main(["eval", *TINY, *COMMON, "--images", images, "--method", "tome:r=2", "--method", "random:r=2",
               "--method", "tome:r=2,order=reference", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert rows[3]["settings"] == {"r": 2, "order": "reference"}
    assert rows[0]["method"] is None and "centered_cosine" not in rows[0]
    assert rows[0]["top1"] is not None and rows[0]["labelled_images"] == 6
    for r in rows[1:]:
        assert 0 <= r["retrieval_at_1"] <= 1 and -1 <= r["centered_cosine"] <= 1 and "top1_agreement" in r
    assert "sub-folder indices" in capsys.readouterr().out


def test_sweep_tiny_writes_files(images, tmp_path) -> None:
    prefix = tmp_path / "res" / "tiny"
    rc = main(["sweep", *TINY, *COMMON, "--images", images, "--taus=-1,0.9", "--saint-args", "k=1",
               "--tome-r", "1,2", "--timing-batch", "2", "--warmup", "0", "--repeats", "1", "--out", str(prefix)])
    assert rc == 0
    for ext in ("json", "csv", "md", "png"):
        assert (prefix.parent / f"tiny.{ext}").stat().st_size > 0
    rows = json.loads((prefix.parent / "tiny.json").read_text())["results"]
    methods = [r["method"] for r in rows]
    assert methods == ["unpruned", "saint", "saint", "tome", "tome", "random", "attn", "random", "attn"]


def test_sweep_with_calibrated_variants(images, tmp_path) -> None:
    prefix = tmp_path / "cal"
    rc = main(["sweep", *TINY, *COMMON, "--images", images, "--taus", "0.9", "--tome-r", "1", "--matched", "none",
               "--calibrated", "saint:k=1", "--calibrated", "saint_plus:mode=global", "--speedups", "1.2,1.4",
               "--calib-images", images, "--timing-batch", "2", "--warmup", "0", "--repeats", "1",
               "--out", str(prefix)])
    assert rc == 0
    rows = json.loads((tmp_path / "cal.json").read_text())["results"]
    cal = [r for r in rows if "target_speedup" in r["setting"]]
    assert [(r["method"], r["setting"]["target_speedup"]) for r in cal] == [
        ("saint:k=1", 1.2), ("saint:k=1", 1.4), ("saint_plus:mode=global", 1.2), ("saint_plus:mode=global", 1.4)]
    for r in cal:
        assert r["setting"]["calibrated_speedup"] == pytest.approx(r["setting"]["target_speedup"], rel=0.1)
        assert isinstance(r["settings"]["tau"], dict) and "mode" not in r["settings"]


def test_calibrate_command(images, tmp_path, capsys) -> None:
    out = tmp_path / "cal.json"
    rc = main(["calibrate", *TINY, *COMMON, "--images", images, "--keep", "0.8", "--args", "k=1",
               "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["target"] == "keep" and result["achieved"] == pytest.approx(0.8, rel=0.1)
    assert "saint.patch(model, 'saint'" in capsys.readouterr().out
    assert main(["calibrate", *TINY, *COMMON, "--images", images, "--keep", "0.8", "--method", "tome"]) == 2
    capsys.readouterr()
    rc = main(["calibrate", *TINY, *COMMON, "--images", images, "--flops-speedup", "1.2", "--method", "saint_match",
               "--args", "inflection=-0.5", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())["inflection"] == -0.5
    assert "saint.patch(model, 'saint_match'" in capsys.readouterr().out


def test_one_block_is_written_layers_equals_index_in_every_command(images, tmp_path, capsys) -> None:
    """``layers=2`` is the one block 2 in ``--method`` specs, ``calibrate --args`` and
    ``sweep --saint-args`` alike (it used to be refused as "not a list" in the latter two)."""
    from saint.spec import parse_method_kwargs, parse_method_spec

    assert parse_method_kwargs("layers=2,k=1") == {"layers": [2], "k": 1}
    assert parse_method_spec("saint:layers=2").kwargs == {"layers": [2]}
    out = tmp_path / "cal.json"
    assert main(["calibrate", *TINY, *COMMON, "--images", images, "--keep", "0.9", "--args", "layers=2,k=1",
                 "--json", str(out)]) == 0
    cal = json.loads(out.read_text())
    assert list(cal["tau"]) == ["2"] and cal["settings"]["layers"] == [2]
    assert main(["sweep", *TINY, *COMMON, "--images", images, "--saint-args", "layers=2", "--taus", "0.5",
                 "--tome-r", "1", "--matched", "none", "--speedups", "", "--repeats", "1", "--warmup", "0",
                 "--out", str(tmp_path / "sweep")]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["results"]
    saint_rows = [r for r in rows if r["method"] == "saint"]
    assert saint_rows and all(r["settings"]["layers"] == [2] for r in saint_rows)


@pytest.mark.parametrize(("spec", "error"), [("saint:layout=diagonal", "layout='diagonal' is not one of"),
                                             ("saint:kernel=fast", "kernel='fast' is not one of"),
                                             ("saint:layout=padded,kernel=loop", "does nothing with layout='padded'"),
                                             ("saint:trace=1", "trace must be true or false")])
def test_a_method_spec_checks_the_patch_options_it_carries(spec, error) -> None:
    from saint.spec import parse_method_spec

    assert parse_method_spec("saint:tau=0.9,layout=padded,trace=true").kwargs == {
        "tau": 0.9, "layout": "padded", "trace": True}
    with pytest.raises((ValueError, TypeError), match=error):
        parse_method_spec(spec)


@pytest.mark.parametrize("args", ["guard=0.1", "guard=0.1,layout=padded"])
def test_a_calibration_file_is_a_method_spec(args, images, tmp_path, capsys) -> None:
    """``saint calibrate --json cal.json`` then ``--method @cal.json`` runs the calibrated
    variant: the same settings, and the same tokens as the calibration's printed spec (with
    saint.patch's options too: a file with ``layout`` could not be read back)."""
    from saint.calibration import Calibration
    from saint.spec import parse_method_spec

    cal_file = tmp_path / "cal.json"
    assert main(["calibrate", *TINY, *COMMON, "--images", images, "--keep", "0.8", "--method", "saint_match",
                 "--args", args, "--json", str(cal_file)]) == 0
    cal = Calibration.from_json(cal_file.read_text())
    variant = parse_method_spec(f"@{cal_file}")
    assert variant.method == "saint_match" and variant.kwargs == cal.patch_kwargs()
    printed = capsys.readouterr().out.split("--method ")[-1].splitlines()[0]
    assert parse_method_spec(printed).kwargs == variant.kwargs  # the printed spec is exact, as the file
    tokens = []
    for spec in (f"@{cal_file}", printed):
        out = tmp_path / "b.json"
        assert main(["bench", *TINY, *COMMON, "--images", images, "--method", spec, "--warmup", "0",
                     "--repeats", "1", "--json", str(out)]) == 0
        row = json.loads(out.read_text())["results"][1]
        tokens.append(row["tokens_per_block"])
        assert row["layout"] == ("padded" if "padded" in args else "packed")
    assert tokens[0] == tokens[1] and tokens[0][-1] < 17
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        parse_method_spec(f"@{tmp_path / 'missing.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    assert main(["eval", *TINY, *COMMON, "--images", images, "--method", f"@{bad}"]) == 2
    assert "not a saint calibration" in capsys.readouterr().err


def test_calibrate_command_fails_on_an_unreachable_target(images, tmp_path, capsys) -> None:
    out = tmp_path / "cal.json"
    rc = main(["calibrate", *TINY, *COMMON, "--images", images, "--speedup", "100", "--json", str(out)])
    assert rc == 1
    assert "out of reach" in capsys.readouterr().err
    assert json.loads(out.read_text())["reached"] is False


def test_bad_input_is_a_clear_error(images, capsys) -> None:
    assert main(["bench", *TINY, *COMMON, "--images", images, "--method", "tome:tau=1"]) == 2
    assert "does not take ['tau']" in capsys.readouterr().err
    assert main(["bench", *TINY, *COMMON, "--images", images, "--method", "tome:r=2,order=sorted"]) == 2
    assert "ToMe order must be one of ('keep', 'reference'), got 'sorted'" in capsys.readouterr().err
    assert main(["eval", *TINY, *COMMON, "--images", images + "/missing"]) == 2
    assert "neither" in capsys.readouterr().err
    assert main(["bench", *COMMON, "--pretrained", "--method", "tome:r=1"]) == 2
    assert "need a timm --model name" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="at least one --method"):
        main(["bench", *TINY, *COMMON, "--images", images])


def test_checkpoint_option_loads_weights(tmp_path) -> None:
    from safetensors.torch import save_file

    p = argparse.ArgumentParser()
    add_model_options(p)
    args = p.parse_args(TINY)
    model, _ = build_model(args)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded, desc = build_model(p.parse_args([*TINY, "--checkpoint", str(tmp_path / "w.safetensors")]))
    assert "checkpoint" in desc
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_demo_pieces_matched_tome_r_and_kept_patches(tmp_path) -> None:
    from saint.commands.demo import kept_patches, matched_tome_r, plot_kept

    # DINOv2-S at 224: 256 patches + 1 class token, 12 blocks; mean tokens = 257 - 5.5 r
    assert matched_tome_r(257 - 5.5 * 8, 256, 1, 12) == 8
    assert matched_tome_r(100.0, 256, 1, 12) == 19  # r=20 would ask for too many merges in block 11
    torch.manual_seed(0)
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=32,
                              num_heads=2, num_classes=0).eval()
    layers, kept = kept_patches(model, torch.randn(1, 3, 32, 32), {"tau": -1.0, "k": 1})
    # every candidate (even prunable position) is linked at tau=-1, so each step drops all of them
    assert layers == [0, 1] and kept.shape == (2, 4, 4)
    assert kept[0].flatten().tolist() == [False, True] * 8
    assert kept[1].flatten().nonzero().flatten().tolist() == [3, 7, 11, 15]
    from saint import is_patched

    assert not is_patched(model)
    plot_kept(torch.rand(32, 32, 3), layers, kept, tmp_path / "k.png", "test")
    assert (tmp_path / "k.png").stat().st_size > 0


def test_demo_tour_calibrates_saint_plus_and_the_recommended_saint_match(images, capsys) -> None:
    """The tour's rows: unpruned, SAINT, ToMe at SAINT's mean count, then SAINT+ and
    ``saint_match`` (guard 0.1, keep_norm) calibrated to the FLOPs-ideal speed-ups asked."""
    import timm

    from saint import assets
    from saint.commands.demo import MATCH_SETTINGS, _Tour
    from saint.measure.harness import Harness
    from saint.measure.images import from_folder

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=32,
                              num_heads=2, num_classes=0).eval()
    args = argparse.Namespace(tau=0.5, k=1, gamma=10.0, tome_r=1, plus_speedup=1.3, match_speedup=1.5)
    tour = _Tour(args, model, from_folder(images), assets.eval_transform(model), Harness(model, "cpu", torch.float32),
                 lambda *a: None)
    variants, outs = tour.collect()
    assert [v.method for v in variants] == [None, "saint", "tome", "saint_plus", "saint_match"]  # None: unpruned
    match = variants[-1]
    assert match.label.startswith("saint_match (calibrated 1.5x, guard=0.1, keep_norm=True)")
    assert {k: match.kwargs[k] for k in MATCH_SETTINGS} == MATCH_SETTINGS and "tau" in match.kwargs
    assert all(len(o.embeddings) == 6 for o in outs)
    assert "calibrating saint_match to 1.5x" in capsys.readouterr().out
    args.plus_speedup = args.match_speedup = 0  # 0 skips both
    assert [v.method for v in tour.collect()[0]] == [None, "saint", "tome"]


@pytest.fixture
def bad_images(images):
    """The ImageFolder above plus one file that is not an image."""
    from pathlib import Path

    bad = Path(images) / "a" / "broken.png"
    bad.write_bytes(b"not a png at all")
    return images, str(bad)


@pytest.mark.parametrize("command", [
    ["bench", "--method", "tome:r=2", "--repeats", "1", "--warmup", "0"],
    ["eval", "--method", "tome:r=2"],
    ["calibrate", "--keep", "0.8"],
    ["sweep", "--taus", "0.9", "--matched", "none", "--repeats", "1", "--warmup", "0"],
])
def test_a_corrupt_image_is_named_with_exit_code_2(command, bad_images, tmp_path, capsys) -> None:
    folder, bad = bad_images
    extra = ["--out", str(tmp_path / "sweep")] if command[0] == "sweep" else []
    assert main([*command, *TINY, *COMMON, "--images", folder, *extra]) == 2
    err = capsys.readouterr().err
    assert f"cannot read image {bad}" in err and "--skip-bad-images" in err


def test_skip_bad_images_leaves_the_file_out(bad_images, capsys) -> None:
    folder, bad = bad_images
    assert main(["eval", *TINY, *COMMON, "--images", folder, "--method", "tome:r=2", "--skip-bad-images"]) == 0
    assert f"1 unreadable left out: {bad}" in capsys.readouterr().out


def test_analyze_and_viz_name_a_corrupt_image(bad_images, tmp_path, capsys) -> None:
    folder, bad = bad_images
    model = [*TINY, "--img-size", "32"]
    assert main(["viz", bad, *model, "--out", str(tmp_path / "v.png")]) == 2
    assert f"cannot read image {bad}" in capsys.readouterr().err
    assert main(["analyze", folder, *model, "--out-dir", str(tmp_path / "a")]) == 2
    assert f"cannot read image {bad}" in capsys.readouterr().err
    assert main(["viz", folder, *model]) == 2
    assert "is a folder; saint viz draws one image" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "phrase"), [
    (["bench", *TINY, *COMMON, "--method", "tome:r=2", "--json", "{file}/x.json"], "is a file, not a folder"),
    (["eval", *TINY, *COMMON, "--method", "tome:r=2", "--json", "{tmp}"], "is a folder"),
    (["calibrate", *TINY, *COMMON, "--keep", "0.8", "--json", "{file}/c.json"], "is a file, not a folder"),
    (["sweep", *TINY, *COMMON, "--out", "{file}/sweep"], "is a file, not a folder"),
    (["demo", "--out", "{file}/d.png"], "is a file, not a folder"),
    (["analyze", "{images}", *TINY, "--out-dir", "{file}/sub"], "cannot be created or written"),
    (["analyze", "{images}", *TINY, "--out-dir", "{file}"], "is a file, not a folder"),
    (["bench", "--model", "not_a_model", *COMMON, "--method", "tome:r=2"], "is not a timm model name"),
    (["bench", *TINY, "--device", "tpu", "--method", "tome:r=2"], "unknown device 'tpu'"),
    (["bench", *TINY, *COMMON, "--method", "tome:r=2", "--repeats", "-1"], "--repeats must be >= 1"),
    (["sweep", *TINY, *COMMON, "--warmup", "-2"], "--warmup must be >= 0"),
    (["bench", "--model", "vit_tiny_patch16_224", "--model-args", "depth=a", *COMMON, "--method", "tome:r=2"],
     "timm.create_model('vit_tiny_patch16_224', depth='a') failed"),
    (["calibrate", "--model", "vit_tiny_patch16_224", "--model-args", "depth=1,embed_dim=32,num_heads=2",
      "--img-size", "7", *COMMON, "--keep", "0.8"], "input size (7, 7) is smaller than the model's (16, 16) patches"),
    (["calibrate", *TINY, "--img-size", "-14", *COMMON, "--keep", "0.8"],
     "--img-size must be a positive number of pixels, got -14"),
    (["calibrate", "--img-size", "0", *COMMON, "--keep", "0.8"], "--img-size must be a positive number of pixels"),
    (["calibrate", *TINY, *COMMON, "--keep", "0.8", "--args", "mode=global,batch_size=2"],
     "--args cannot set mode (give --mode), batch_size (give --batch-size)"),
    (["sweep", *TINY, *COMMON, "--calibrated", "saint:at=1"], "at=1 must be one speed-up > 1"),
    (["sweep", *TINY, *COMMON, "--calibrated", "saint:at=inf"], "at=inf must be one speed-up > 1"),
    (["sweep", *TINY, *COMMON, "--calibrated", "tome:r=1"], "calibration picks tau; method 'tome' has none"),
    (["sweep", *TINY, *COMMON, "--calibrated", "saint_match:mode=global"],
     "saint_match calibrates tau and fraction per layer (mode='per_layer'), not mode='global'"),
    (["sweep", *TINY, *COMMON, "--calibrated", "saint", "--speedups", "0.5"], "speed-up targets must be > 1"),
    (["sweep", *TINY, *COMMON, "--calibrated", "saint:gamma=-5"], "gamma=-5.0 must be >= 0 in 'saint:gamma=-5'"),
    (["analyze", "{images}", *TINY, "--splits", "-3", "--out-dir", "{tmp}/a"], "--splits must be >= 1"),
    (["sweep", *TINY, *COMMON, "--tome-inflection", "0"], "ToMe inflection 0 is its constant schedule"),
    (["bench", *TINY, *COMMON, "--method", "saint:tau=0#0.9/0#0.8"], "block 0 is given twice"),
    (["demo", "--tau", "5", "--out", "{file}"], "tau=5.0 is outside [-1, 1]"),
    (["demo", "--plus-speedup", "0.5", "--out", "{file}"], "--plus-speedup 0.5 must be > 1"),
    (["demo", "--match-speedup", "1", "--out", "{file}"], "--match-speedup 1.0 must be > 1"),
    (["demo", "--tome-r", "-2", "--out", "{file}"], "r=-2 must be >= 0"),
])
def test_ordinary_mistakes_are_clear_errors_before_the_run(argv, phrase, images, tmp_path, capsys) -> None:
    file = tmp_path / "a-file"
    file.write_text("x")
    argv = [a.format(file=file, tmp=tmp_path, images=images) for a in argv]
    if argv[0] in ("bench", "eval", "calibrate", "sweep"):
        argv += ["--images", images]
    assert main(argv) == 2
    assert phrase in capsys.readouterr().err
    assert file.read_text() == "x"


def test_rejecting_an_unsupported_model_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = ("import sys, torch, saint\n"
            "try:\n    saint.patch(torch.nn.Linear(2, 2))\nexcept TypeError:\n    pass\n"
            "sys.exit(1 if 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_viz_and_demo_share_one_documented_default_tau() -> None:
    from saint.commands import demo, options

    assert demo.DEMO_TAU == options.default_tau(options.DEFAULT_MODEL) == 0.97
    assert options.default_tau("vit_tiny_patch16_224") == 0.75
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    from saint.commands import viz

    viz.register(sub)
    assert parser.parse_args(["viz", "x.png"]).tau is None  # resolved per model by default_tau


def test_sweep_calibrates_saint_match_and_measured_targets(images, tmp_path, capsys) -> None:
    prefix = tmp_path / "m"
    rc = main(["sweep", *TINY, *COMMON, "--images", images, "--taus", "0.9", "--matched", "none",
               "--calibrated", "saint_match", "--calibrated", "saint_match:inflection=-0.5",
               "--calibrated", "saint_plus:target=measured,at=1.3", "--speedups", "1.2",
               "--calib-images", images, "--timing-batch", "2", "--warmup", "0", "--repeats", "1",
               "--out", str(prefix)])
    assert rc == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "m.json").read_text())["results"]}
    match, measured = rows["saint_match"], rows["saint_plus:target=measured,at=1.3"]
    assert measured["setting"]["target_speedup"] == 1.3
    assert match["setting"]["target"] == "flops" and set(match["settings"]) >= {"tau", "fraction"}
    assert match["setting"]["calibrated_speedup"] == pytest.approx(1.2, rel=0.1)
    assert measured["setting"]["target"] == "measured" and "target" not in measured["settings"]
    decreasing = rows["saint_match:inflection=-0.5"]  # the schedule shapes the fitted fractions, not a patch setting
    assert "inflection" not in decreasing["settings"] and decreasing["settings"]["fraction"] != match["settings"]["fraction"]
    assert main(["sweep", *TINY, *COMMON, "--images", images, "--taus", "0.9", "--calibrated",
                 "saint_plus:target=wall", "--speedups", "1.2", "--calib-images", images, "--out", str(prefix)]) == 2
    assert "target must be 'flops' or 'measured'" in capsys.readouterr().err


def test_random_weights_are_the_same_in_every_run():
    """A timm model without --pretrained / --checkpoint gets its random weights from seed 0,
    whatever ran before, and leaves the caller's random state alone."""
    from saint.commands.options import build_model

    args = argparse.Namespace(model="vit_tiny_patch16_224", model_args=TINY[-1], img_size=None, pretrained=False,
                              checkpoint=None)
    torch.manual_seed(1)
    first, desc = build_model(args)
    after = torch.rand(1)
    torch.manual_seed(1)
    torch.rand(5)
    second, _ = build_model(args)
    assert "seed 0" in desc
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True))
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after), "the caller's random state is untouched"


def test_an_open_clip_model_by_name(images, capsys) -> None:
    """``--model open_clip:<name>`` builds that open_clip model (random weights, seed 0) and
    its own eval transform (open_clip's size and normalisation); the CLI benches its image
    side. An unknown name and ``--pretrained`` (open_clip's weights are named by tag) are
    clear errors."""
    pytest.importorskip("open_clip")
    from saint import assets

    argv = ["--model", "open_clip:ViT-B-32"]
    p = argparse.ArgumentParser()
    add_model_options(p)
    model, desc = build_model(p.parse_args(argv))
    assert desc == "open_clip ViT-B-32 (RANDOM weights, seed 0) at 224px"
    x, _ = assets.load_images([assets.ImageRecord(f"{images}/a/0.png", None, "t")], assets.eval_transform(model))
    assert x.shape == (1, 3, 224, 224)
    assert main(["bench", *argv, *COMMON, "--images", images, "--method", "tome:r=8", "--batch-size", "3",
                 "--warmup", "0", "--repeats", "1", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "open_clip ViT-B-32" in out and "tome:r=8" in out
    assert main(["bench", "--model", "open_clip:ViT-Nope", *COMMON, "--method", "tome:r=1"]) == 2
    assert "is not an open_clip model name" in capsys.readouterr().err
    assert main(["bench", *argv, "--pretrained", *COMMON, "--method", "tome:r=1"]) == 2
    assert "--model-args pretrained=<tag>" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--calibrated", "saint:at=1"], ["--calibrated", "tome:r=1"],
                                 ["--calibrated", "saint_match:mode=global"], ["--calibrated", "saint_plus:k=0"],
                                 ["--calibrated", "saint:center=maybe"],
                                 ["--calibrated", "saint", "--speedups", "1.5,0.5"], ["--tome-inflection", "0"]])
def test_sweep_checks_its_targets_before_it_loads_the_model(bad, images, monkeypatch, capsys, tmp_path) -> None:
    """A sweep's calibration targets and schedules are refused before any model loads (they
    were checked after the baseline and the whole tau grid had run)."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("saint.commands.options.build_model", loaded)
    assert main(["sweep", *TINY, *COMMON, "--images", images, "--out", str(tmp_path / "sw"), *bad]) == 2
    assert "saint sweep: error" in capsys.readouterr().err


def test_sweep_says_which_tome_schedules_it_leaves_out(images, tmp_path) -> None:
    """A decreasing ToMe schedule that cannot merge that much in every block is left out
    with a warning and listed in the report (it was dropped without a word)."""
    out = tmp_path / "sw"
    with pytest.warns(UserWarning, match=r"ToMe schedules left out .*tome:r=3,inflection=1"):
        assert main(["sweep", *TINY, *COMMON, "--images", images, "--limit", "2", "--taus", "0.9",
                     "--tome-r", "3", "--tome-inflection", "1", "--matched", "none", "--batch-size", "2",
                     "--timing-batch", "2", "--warmup", "0", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads((tmp_path / "sw.json").read_text())
    assert report["settings"]["tome_schedules_left_out"] == [{"r": 3, "inflection": 1.0}]
    assert not any(r["setting"].get("inflection") for r in report["results"] if r["method"] == "tome")


def test_analyze_runs_a_model_at_its_own_size(images, tmp_path) -> None:
    """Without --img-size, analyze (and viz) build the model at its own input size (they
    built every timm model at 224px, resizing its position table without a word)."""
    out = tmp_path / "an"
    assert main(["analyze", images, "--model", "vit_tiny_patch16_384", "--model-args", "depth=3,embed_dim=32,num_heads=2",
                 "--limit", "2", "--splits", "1", "--min-blocks", "1", "--out-dir", str(out)]) == 0
    assert (out / "vit_tiny_patch16_384_384.csv").exists()
    assert "- image size: 384 px" in (out / "vit_tiny_patch16_384_384.md").read_text()


def test_viz_asks_the_patch_whether_a_model_has_a_class_token() -> None:
    """``saint viz`` drew no class-attention row for HF DINOv2 and open_clip towers (their
    class token is not a ``cls_token`` attribute): the method's own patch decides."""
    pytest.importorskip("transformers")
    import saint
    from saint.commands.viz import _has_class_attention

    from .test_hf_vision import make as make_hf_vision
    from .test_hf_vit import make as make_hf_vit

    hf_dinov2, siglip = make_hf_vit("dinov2"), make_hf_vision("siglip")
    assert _has_class_attention(hf_dinov2) and not hasattr(hf_dinov2, "cls_token")
    assert not _has_class_attention(siglip)
    assert not saint.is_patched(hf_dinov2) and not saint.is_patched(siglip)

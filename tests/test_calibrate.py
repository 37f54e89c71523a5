"""Calibration hits its target deterministically and stores reproducible taus."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

import saint
from saint.calibration import block_flops, flops_fraction
from saint.timing import ALLOCATOR_VARIABLES

from .conftest import make_tiny


@pytest.fixture(scope="module")
def calib_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=g)
    x[:3] = x[:3] * 0.2 + torch.linspace(-1, 1, 32)  # smooth images: many redundant tokens
    return x


def test_flops_fraction_known_answer():
    model = make_tiny("vit")  # dim 32, mlp 128
    assert flops_fraction(model, [17, 17, 17, 17]) == 1.0
    full = block_flops(17, 17, 32, 128)
    half = block_flops(17, 9, 32, 128) + 3 * block_flops(9, 9, 32, 128)
    assert flops_fraction(model, [17, 9, 9, 9]) == pytest.approx(half / (4 * full))


@pytest.mark.parametrize("mode", ["global", "per_layer"])
@pytest.mark.parametrize("target", [dict(flops_speedup=1.3), dict(keep=0.8), dict(flops=0.75)])
def test_calibration_hits_target_and_reproduces(mode, target, calib_images):
    model = make_tiny("vit", depth=6)
    cal = saint.calibrate(model, calib_images, mode=mode, k=1, tol=0.02, **target)
    (name, value), = target.items()
    assert cal.target == name and cal.value == value
    assert cal.achieved == pytest.approx(value, rel=0.08)
    assert set(cal.tau) == {0, 1, 2}
    assert all(-1.0 <= t <= 1.0 for t in cal.tau.values())
    # the model is left patched with the explicit taus; re-patching from them reproduces it
    with torch.no_grad():
        out = model(calib_images)
        tokens = saint.stats(model).tokens
        saint.patch(model, "saint", **cal.patch_kwargs())
        assert torch.equal(model(calib_images), out)
        assert saint.stats(model).tokens == tokens
    again = saint.calibrate(saint.unpatch(model), calib_images, mode=mode, k=1, tol=0.02, **target)
    assert again.tau == cal.tau, "deterministic"


def test_per_layer_calibration_survives_layers_with_nothing_left_to_pair():
    # flat images: every token is redundant, so the early layers prune down to one
    # prunable token and the later layers' probes have no anchors left
    model = make_tiny("vit", depth=18)
    with pytest.warns(saint.CalibrationWarning, match="cannot reach keep=0.1"):
        cal = saint.calibrate(model, torch.zeros(4, 3, 32, 32), mode="per_layer", k=1, keep=0.1, apply=False)
    assert cal.tau[8] == 1.0 and cal.achieved < 0.25


def test_calibration_without_apply_leaves_model_unpatched(calib_images):
    model = make_tiny("vit")
    saint.calibrate(model, calib_images, keep=0.9, k=1, apply=False)
    assert not saint.is_patched(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one target"),
        (dict(speedup=2.0, keep=0.5), "exactly one target"),
        (dict(speedup=0.5), "flops_speedup"),
        (dict(measured_speedup=0.9), "measured_speedup=0.9 must be > 1"),
        (dict(flops_speedup=1.0), "flops_speedup=1.0 must be > 1"),
        (dict(keep=1.5), "keep"),
        (dict(flops=0.0), "flops"),
        (dict(keep=0.5, mode="nope"), "mode"),
        (dict(keep=0.5, method="tome"), "has none"),
        (dict(keep=0.5, tau=0.9), "do not pass tau"),
    ],
)
def test_calibration_errors(kwargs, match, calib_images):
    with pytest.raises(ValueError, match=match):
        saint.calibrate(make_tiny("vit"), calib_images, **kwargs)


def test_saint_plus_defaults_and_calibration(calib_images):
    model = make_tiny("vit")
    cal = saint.calibrate(model, calib_images, speedup=1.3, method="saint_plus", tol=0.02)
    assert set(cal.tau) == {0, 1, 2, 3}, "saint_plus prunes in every block"
    assert cal.achieved == pytest.approx(1.3, rel=0.08)
    handle = saint.adapters.common.get_handle(model)
    assert handle.spec.name == "saint_plus" and handle.config.k == 1 and handle.calibration is cal


def state_of(model: torch.nn.Module) -> dict:
    """Everything that patching changes: per-instance attributes of every module and hooks."""
    return {name: (sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks), m.training)
            for name, m in model.named_modules()}


@pytest.mark.parametrize("failure", ["image size", "forward"])
def test_failed_calibration_leaves_the_model_as_it_was(failure, calib_images):
    model = make_tiny("vit").train()
    before = state_of(model)
    images = calib_images[:, :, :16] if failure == "image size" else calib_images
    hook = None
    if failure == "forward":
        def fail(module, args):
            raise RuntimeError("boom")

        hook = model.blocks[1].register_forward_pre_hook(fail)
        before = state_of(model)
    with pytest.raises((RuntimeError, AssertionError, ValueError)):
        saint.calibrate(model, images, keep=0.8, k=1)
    assert not saint.is_patched(model)
    assert state_of(model) == before
    if hook is not None:
        hook.remove()
    torch.testing.assert_close(model.eval()(calib_images), make_tiny("vit")(calib_images), rtol=0, atol=0)


def test_calibrating_a_patched_model_is_refused(calib_images):
    model = saint.patch(make_tiny("vit"), "tome", r=2)
    with pytest.raises(ValueError, match="unpatch it before calibrating"):
        saint.calibrate(model, calib_images, keep=0.8)


@pytest.mark.parametrize("target", [dict(speedup=100.0), dict(keep=1e-6)])
def test_unreachable_target_warns_with_the_closest_value(target, calib_images):
    model = make_tiny("vit")
    with pytest.warns(saint.CalibrationWarning, match="cannot reach .* closest it gets is"):
        cal = saint.calibrate(model, calib_images, k=1, **target)
    assert not cal.reached
    assert saint.is_patched(model)  # with the closest taus found
    assert (cal.achieved < 100.0) if "speedup" in target else (cal.achieved > 1e-6)


def test_reached_target_does_not_warn(calib_images, recwarn):
    cal = saint.calibrate(make_tiny("vit"), calib_images, keep=0.8, k=1, tol=0.02)
    assert cal.reached
    assert not [w for w in recwarn if issubclass(w.category, saint.CalibrationWarning)]


def test_speedup_is_the_old_name_of_flops_speedup(calib_images):
    a = saint.calibrate(make_tiny("vit"), calib_images, speedup=1.3, k=1, tol=0.02)
    b = saint.calibrate(make_tiny("vit"), calib_images, flops_speedup=1.3, k=1, tol=0.02)
    assert a.target == b.target == "flops_speedup" and a.tau == b.tau


def test_measured_speedup_times_the_model_it_calibrates(calib_images, monkeypatch):
    """The mechanism (timing itself belongs in benchmarks): each step calibrates a
    real-token FLOPs target, times it at the batch size asked for, and the model ends
    patched with the step whose measured speed-up came closest; it records the allocator
    variables it timed under."""
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    model = make_tiny("vit", depth=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", saint.CalibrationWarning)  # a tiny model may not get there
        cal = saint.calibrate(model, calib_images, measured_speedup=1.3, batch_size=4, k=1, tol=0.02)
    assert cal.target == "measured_speedup" and cal.value == 1.3
    m = cal.measured
    assert m["batch_size"] == 4 and m["device"] == "cpu" and 1 <= len(m["steps"]) <= 5
    assert m["repeats"] == 5 and m["statistic"].startswith("median of per-round")
    assert m["allocator"] == {"MALLOC_MMAP_MAX_": "0"}
    assert cal.achieved in [step["measured_speedup"] for step in m["steps"]]
    assert m["flops_speedup"] in [step["flops_speedup"] for step in m["steps"]]
    assert saint.is_patched(model) and saint.adapters.handle_of(model).calibration is cal


def test_band_distance_is_zero_inside_the_band_above_the_target():
    from saint.calibration import band_distance

    assert band_distance(2.0, 2.0) == band_distance(2.1, 2.0) == band_distance(2.05, 2.0) == 0.0
    assert band_distance(1.9, 2.0) == pytest.approx(0.1)
    assert band_distance(2.2, 2.0) == pytest.approx(0.1)  # above 2.0 * 1.05
    assert band_distance(1.99, 2.0, tol=0.0) == pytest.approx(0.01)


def test_measured_search_aims_into_the_band_at_or_above_the_target():
    from saint.calibration import search_measured

    def scripted(readings):
        it = iter(readings)
        return lambda s: (next(it), True)

    # a model that runs at 0.9 of every FLOPs target: aim 2.05, then 2.05 * 2.05 / 1.845
    best, tried = search_measured(2.0, lambda s: (0.9 * s, True))
    assert [round(t[0], 4) for t in tried] == [2.05, round(2.05 * 2.05 / 1.845, 4)] and best == 1
    assert tried[1][1] == pytest.approx(2.05)
    # 3% short of the target is not the end of the search (it was within 5% either side before)
    best, tried = search_measured(2.0, scripted([1.94, 2.03]))
    assert len(tried) == 2 and best == 1
    # never in the band: the closest to it after five targets, the first on ties
    best, tried = search_measured(2.0, scripted([1.9, 1.95, 2.2, 1.97, 2.3]))
    assert len(tried) == 5 and best == 3
    best, _ = search_measured(2.0, scripted([1.9, 2.2, 1.8, 1.8, 1.8]))
    assert best == 0
    # a FLOPs target out of reach that still runs too slow ends it
    best, tried = search_measured(3.0, lambda s: (2.0, False))
    assert len(tried) == 1 and best == 0
    # too fast: the next target asks for fewer FLOPs saved
    _, tried = search_measured(2.0, scripted([2.5, 2.06]))
    assert tried[1][0] < tried[0][0] and len(tried) == 2


def test_time_calibration_times_both_and_leaves_the_model_as_it_was(calib_images):
    """The unpatched model and the calibrated settings, ``repeats`` rounds each; the model
    comes back unpatched and in the mode it was in."""
    from saint.calibration import time_calibration

    model = make_tiny("vit", depth=4)
    cal = saint.calibrate(model, calib_images, keep=0.8, k=1, tol=0.02, apply=False)
    model.train()
    plain, pruned = time_calibration(model, calib_images, cal, repeats=3)
    assert len(plain.times) == len(pruned.times) == 3 and plain.batch_size == calib_images.shape[0]
    assert not saint.is_patched(model) and model.training


def test_a_calibration_reads_back_from_its_json(calib_images):
    """``Calibration.from_json`` undoes ``to_json`` (block keys are strings in JSON): the same
    object, the same patch settings and so the same pruned model; other JSON is refused."""
    model = make_tiny("vit", depth=6)
    cal = saint.calibrate(model, calib_images, keep=0.8, method="saint_match", inflection=-0.5, guard=0.1,
                          layers=[0, 2, 3], apply=False)
    again = saint.Calibration.from_json(cal.to_json())
    assert again == cal
    assert all(type(b) is int for b in again.tau) and all(type(b) is int for b in again.per_layer["fraction"])
    with torch.no_grad():
        saint.patch(model, "saint_match", **cal.patch_kwargs())
        expected = model(calib_images)
        saint.patch(model, "saint_match", **again.patch_kwargs())
        assert torch.equal(model(calib_images), expected)
    with pytest.raises(ValueError, match="not a saint calibration"):
        saint.Calibration.from_json('{"tau": {"0": 0.5}, "rows": []}')
    with pytest.raises(ValueError, match="expected a JSON object"):
        saint.Calibration.from_json("[1, 2]")


def test_a_calibration_with_a_per_block_setting_reads_back(calib_images):
    """A per-block setting given as a dict (``k={0: 1, 1: 2}``) comes back from JSON with its
    block keys as integers, so the read-back calibration patches the same model."""
    model = make_tiny("vit", depth=4)
    cal = saint.calibrate(model, calib_images, keep=0.8, k={0: 1, 1: 2}, layers=[0, 1], apply=False, tol=0.05)
    again = saint.Calibration.from_json(cal.to_json())
    assert again == cal and again.settings["k"] == {0: 1, 1: 2}
    with torch.no_grad():
        saint.patch(model, "saint", **cal.patch_kwargs())
        expected = model(calib_images)
        saint.patch(model, "saint", **again.patch_kwargs())
        assert torch.equal(model(calib_images), expected)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_reached_is_judged_on_what_runs_at_the_batch_size(batch_size, calib_images):
    """A batch vote's counts depend on the batch: ``reached`` says whether ``achieved`` (the
    fixed taus at ``batch_size``) is within ``tol`` of the target, whatever the search saw."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=6,
                              embed_dim=64, num_heads=2, num_classes=10).eval()
    images = torch.randn(8, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", saint.CalibrationWarning)
        cal = saint.calibrate(model, images, keep=0.6, rate="batch", batch_size=batch_size, apply=False, tol=0.01)
    assert cal.reached == (abs(cal.achieved - 0.6) <= 0.01 * 0.6)


def test_calibration_leaves_no_forward_behind(calib_images):
    """Calibration's counting forwards stop after the last pruning block: ``token_mask``
    described such a stopped call (its last pruning block as block -1); like ``stats`` it now
    knows only the caller's complete forwards."""
    model = make_tiny("vit")
    saint.calibrate(model, calib_images, keep=0.7, k=1, layers=[0, 1])
    with pytest.raises(RuntimeError, match="no forward has run"):
        saint.stats(model)
    with pytest.raises(IndexError, match="0 blocks ran"):
        saint.token_mask(model)
    with torch.no_grad():
        model(calib_images)
    assert len(saint.stats(model).tokens) == len(model.blocks)
    saint.token_mask(model, len(model.blocks) - 1)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 33])
@pytest.mark.parametrize("q", [0.5, 0.3, 0.9, 1.0])
def test_calibrated_thresholds_never_sit_on_a_calibration_value(n, q):
    """A quantile that lands on a value (the median of an odd count) put one calibration
    photo's cosine exactly on tau, where rounding decided between its batch and its lone run
    (a random open_clip ViT-B/32: 0.013 apart). The threshold moves just below it: the same
    values are flagged, none sits on it."""
    from saint.calibration import quantile_between

    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    tau = quantile_between(values, q)
    ref = float(torch.quantile(values.double(), q))
    assert int((values.double() >= tau).sum()) == int((values.double() >= ref).sum())
    if n > 1:
        assert not bool((values.double() == tau).any())
    assert quantile_between(values[:0], q) == 1.0


def test_a_drop_in_the_last_block_counts_towards_the_target(calib_images):
    # the last block's MLP runs on the tokens it keeps: with only block 3 of 4 pruning, the
    # FLOPs model counted nothing saved (achieved 1.000, reached False)
    model = make_tiny("vit", depth=4)
    cal = saint.calibrate(model, calib_images, flops_speedup=1.03, method="saint_plus", layers=[3], tol=0.02,
                          apply=False)
    assert cal.reached and cal.achieved == pytest.approx(1.03, rel=0.02)
    with torch.no_grad():
        saint.patch(model, "saint_plus", **cal.patch_kwargs())
        model(calib_images)
        entering = saint.stats(model).mean()
        mask = saint.token_mask(model)
        leaving = entering[-1] if mask is None else float(mask.sum(1).double().mean())
    assert leaving < entering[-1]
    assert cal.achieved == pytest.approx(1 / flops_fraction(model, entering, leaving=leaving), rel=1e-9)


def test_flops_fraction_counts_the_tokens_leaving_the_last_block():
    model = make_tiny("vit")  # dim 32, mlp 128
    expected = 3 * block_flops(17, 17, 32, 128) + block_flops(17, 9, 32, 128)
    assert flops_fraction(model, [17] * 4, leaving=9) == pytest.approx(expected / (4 * block_flops(17, 17, 32, 128)))


@pytest.mark.parametrize("name", ["aimv2_large_patch14_224", "vit_giant_patch14_dinov2"])
def test_swiglu_mlps_are_counted_at_their_own_width(name, calib_images):
    # aimv2's SwiGLU has no fc1 (calibration crashed); SwiGLUPacked's fc1 is twice the
    # hidden width (its MLP was counted at 4 d h instead of 3 d h)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=48,
                              num_heads=2, num_classes=0).eval()
    blk = model.blocks[0]
    mlp = sum(m.weight.numel() for m in blk.mlp.modules() if isinstance(m, torch.nn.Linear))
    adapter = saint.adapters.find_adapter(model)
    n = 17 + getattr(model, "num_reg_tokens", 0)
    attn_only = block_flops(n, n, 48, 0)
    assert adapter.block_flops(model, n, n) == pytest.approx(attn_only + 2 * n * mlp)
    cal = saint.calibrate(model, calib_images, flops_speedup=1.2, method="saint_plus", tol=0.05, apply=False)
    assert cal.achieved > 1


@pytest.mark.parametrize("target", ["flops_speedup", "measured_speedup"])
def test_an_infinite_target_is_refused(target, calib_images):
    # measured_speedup=inf was "reached" at any speed (|m - inf| <= 0.05 inf)
    with pytest.raises(ValueError, match="finite"):
        saint.calibrate(make_tiny("vit"), calib_images, **{target: float("inf")})


@pytest.mark.parametrize("tol", [1.0, 2.0, float("inf"), float("nan"), 0.0])
def test_a_tolerance_outside_zero_to_one_is_refused(tol, calib_images):
    # tol=2 counted the first bisection point as reached
    with pytest.raises(ValueError, match=r"tol=.* must be a number in \(0, 1\)"):
        saint.calibrate(make_tiny("vit"), calib_images, keep=0.5, tol=tol)


@pytest.mark.parametrize("options", [dict(layout="padded"), dict(kernel="loop"), dict(trace=True)])
def test_saint_match_calibrates_with_patch_options(options, calib_images):
    # saint_match's schedule was read from a config built with saint.patch's options too
    model = make_tiny("vit", depth=4)
    cal = saint.calibrate(model, calib_images, flops_speedup=1.2, method="saint_match", tol=0.05, **options)
    assert cal.settings == options
    if "layout" in options:
        assert saint.stats(model).layout in ("padded", "rectangular")


def test_numpy_targets_and_settings_calibrate_to_plain_json(calib_images):
    np = pytest.importorskip("numpy")
    model = make_tiny("vit", depth=4)
    cal = saint.calibrate(model, calib_images, flops_speedup=np.float64(1.2), layers=np.arange(3), k=np.int64(1),
                          tol=0.05, apply=False)
    assert type(cal.reached) is bool
    assert cal.settings == {"layers": [0, 1, 2], "k": 1}
    back = saint.Calibration.from_json(cal.to_json())
    assert back.patch_kwargs() == cal.patch_kwargs()

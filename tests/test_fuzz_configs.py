"""Hypothesis over method configs on a tiny timm ViT: any valid setting runs and keeps
the invariants (output shape, token counts never grow, exact unpatch); any invalid
setting raises ValueError or TypeError at patch time, before a forward."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import saint

from .conftest import make_tiny

DEPTH, PATCHES = 4, 16
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model_and_reference():
    model = make_tiny("vit")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[0] = x[0].mean(dim=(1, 2), keepdim=True)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


layers = st.lists(st.integers(0, DEPTH - 1), min_size=1, max_size=DEPTH, unique=True).map(sorted)
unit = st.floats(-1.0, 1.0, allow_nan=False)


@st.composite
def valid_configs(draw) -> tuple[str, dict]:
    method = draw(st.sampled_from(["saint", "saint_fold", "saint_plus", "saint_match", "tome", "random", "attn",
                                   "budget"]))
    if method in ("saint", "saint_fold", "saint_plus"):
        kw = dict(tau=draw(unit), k=draw(st.integers(1, 8)), gamma=draw(st.floats(0.0, 50.0)),
                  center=draw(st.booleans()), metric=draw(st.sampled_from(["keys", "hidden"])))
        if method == "saint":
            kw["rate"] = draw(st.sampled_from(["sample", "batch"]))
        chosen = draw(layers)
        kw["layers"] = chosen
        if draw(st.booleans()):  # per-layer taus
            kw["tau"] = {i: draw(unit) for i in chosen}
        return method, kw
    if method == "saint_match":
        chosen = draw(layers)
        return method, dict(layers=chosen, tau={i: draw(unit) for i in chosen},
                            fraction=draw(st.floats(0.0, 2.0)), prop_attn=draw(st.booleans()))
    if method == "budget":
        chosen = draw(layers)
        keeps = sorted(draw(st.lists(st.integers(1, PATCHES), min_size=len(chosen), max_size=len(chosen))),
                       reverse=True)
        return method, dict(layers=chosen, keep=keeps)
    chosen = draw(layers)
    limit = 2 if method == "tome" else 3  # fits the 16 patches over 4 blocks
    return method, dict(layers=chosen, r=draw(st.integers(0, limit)))


@FUZZ
@given(valid_configs())
def test_valid_configs_run_and_keep_the_invariants(model_and_reference, config):
    model, x, ref = model_and_reference
    method, kw = config
    saint.patch(model, method, **kw)
    try:
        with torch.no_grad():
            out = model(x)
        tokens = saint.stats(model).tokens
    finally:
        saint.unpatch(model)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    for before, after in zip(tokens, tokens[1:], strict=False):
        assert all(a <= b for a, b in zip(after, before, strict=True)), "token counts never grow"
    assert all(1 + PATCHES >= n >= 2 for row in tokens for n in row)  # class token + >= 1 patch
    with torch.no_grad():
        assert torch.equal(model(x), ref), "unpatch restores the exact model"


# one bad field on top of a valid base; every case must fail in saint.patch
BAD = st.one_of(
    st.tuples(st.just("saint"), st.sampled_from(["tau"]),
              st.one_of(st.floats(1.0001, 1e6), st.floats(-1e6, -1.0001), st.just(math.nan), st.just("0.5"))),
    st.tuples(st.just("saint"), st.just("k"), st.one_of(st.integers(-5, 0), st.floats(1.1, 1.9), st.just(True))),
    st.tuples(st.just("saint"), st.just("gamma"),
              st.one_of(st.floats(-1e6, -1e-6), st.just(math.inf), st.just(math.nan), st.none())),
    st.tuples(st.just("saint"), st.just("rate"), st.text(max_size=6).filter(lambda s: s not in ("sample", "batch"))),
    st.tuples(st.just("saint"), st.just("center"), st.one_of(st.integers(), st.text(max_size=3))),
    st.tuples(st.sampled_from(["tome", "random", "attn"]), st.just("r"),
              st.one_of(st.integers(-9, -1), st.floats(0.1, 0.9), st.just(math.inf), st.integers(17, 99))),
    st.tuples(st.just("random"), st.just("seed"), st.one_of(st.floats(0.1, 0.9), st.just(None), st.text(max_size=2))),
    st.tuples(st.sampled_from(["saint", "tome"]), st.just("layers"), st.one_of(
        st.lists(st.integers(DEPTH, 99), min_size=1, max_size=3),
        st.lists(st.integers(-99, -1), min_size=1, max_size=3),
        st.lists(st.floats(0.1, 2.9), min_size=1, max_size=3),
        st.just([]), st.just([1, 1]), st.integers(0, 3), st.text(min_size=1, max_size=3),
    )),
    st.tuples(st.just("budget"), st.just("keep"), st.one_of(st.integers(-5, 0), st.integers(PATCHES + 1, 99))),
    st.tuples(st.sampled_from(["saint", "tome", "random"]), st.text(min_size=1, max_size=8).filter(
        lambda s: s.isidentifier() and s not in ("tau", "k", "gamma", "rate", "metric", "center", "layers", "r", "seed",
                                                 "prop_attn", "keep", "step_div", "layout", "kernel", "trace")
    ), st.integers()),
)
BASE = {"saint": {}, "tome": {"r": 1}, "random": {"r": 1}, "attn": {"r": 1}, "budget": {"keep": 4, "layers": [1]}}


@FUZZ
@given(BAD)
def test_invalid_configs_raise_at_patch_time(model_and_reference, bad):
    model, _, _ = model_and_reference
    method, name, value = bad
    kw = {**BASE[method], name: value}
    with pytest.raises((ValueError, TypeError)):
        saint.patch(model, method, **kw)
    assert not saint.is_patched(model)

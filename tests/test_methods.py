"""One registry for every method: sites and capability flags, and the VLM baselines'
pure functions on hand-built inputs."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import saint
from saint.core import fastv_keep_mask, grid_subset, keep_mask_to_indices, pool_grid
from saint.core.paths import accelerator_paths_everywhere
from saint.methods import METHODS, SITES, make_config

from .conftest import make_tiny


def _paths(accelerator: bool) -> contextlib.AbstractContextManager:
    """The accelerators' implementations (on this CPU) or the CPU's own."""
    return accelerator_paths_everywhere() if accelerator else contextlib.nullcontext()


def test_fastv_drops_the_least_attended_eligible_tokens():
    att = torch.tensor([[0.1, 0.5, 0.2, 0.05, 0.15], [0.9, 0.01, 0.02, 0.03, 0.04]])
    eligible = torch.tensor([[False, True, True, True, True], [False, True, True, True, False]])
    # row 0: 4 eligible, keep floor(4 * 0.5) = 2 -> drop 0.05 (3) and 0.15 (4)
    # row 1: 3 eligible, keep floor(1.5) = 1 -> drop 0.01 (1) and 0.02 (2); token 0 is not eligible
    keep = fastv_keep_mask(att, eligible, 0.5)
    assert keep.tolist() == [[True, True, True, False, False], [True, False, False, True, True]]


def test_pool_grid_known_answer():
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid, row-major
    assert pool_grid(tokens, 4, 2, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_grid(tokens, 4, 1, 1).flatten().tolist() == [7.5]


def test_grid_subset_is_sorted_unique_and_seeded():
    a = grid_subset(64, 10, seed=0)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 10
    assert torch.equal(a, grid_subset(64, 10, seed=0))
    assert not torch.equal(a, grid_subset(64, 10, seed=1))


def test_every_method_declares_a_site_and_the_adapters_respect_it():
    assert {s.site for s in METHODS.values()} <= set(SITES)
    assert {n for n, s in METHODS.items() if s.site != "vision"} == {"fastv", "subset", "pool"}
    assert all((s.reduce is not None) == (s.site == "projector") for s in METHODS.values())
    with pytest.raises(ValueError, match="acts on a VLM's llm"):
        saint.patch(make_tiny("vit"), "fastv", layers=[0], ratio=0.5)


def test_config_flags_replace_setting_probes():
    assert make_config("saint", rate="sample")[1].pads
    assert not make_config("saint", rate="batch")[1].pads
    assert not make_config("tome", r=2)[1].pads
    assert make_config("tome", r=2)[1].size_bias and not make_config("tome", r=2, prop_attn=False)[1].size_bias
    assert make_config("saint_fold")[1].size_bias and not make_config("saint")[1].size_bias
    with pytest.raises(ValueError, match="fastv_ratio"):
        make_config("fastv", layers=[1], ratio=1.0)[1].resolve(4)


def test_keep_mask_to_indices_left_and_right_aligned():
    keep = torch.tensor([[True, False, True, False], [False, False, True, False]])
    idx, valid = keep_mask_to_indices(keep)
    assert idx[valid].tolist() == [0, 2, 2] and valid.tolist() == [[True, True], [True, False]]
    idx, valid = keep_mask_to_indices(keep, align="right")
    assert valid.tolist() == [[True, True], [False, True]]
    assert idx.tolist()[0] == [0, 2] and idx[1, 1] == 2
    assert not bool(keep[1, idx[1, 0]]), "a pad slot points at a dropped position"


def test_query_attention_known_answer():
    from saint.core import query_attention

    q = torch.tensor([[[1.0, 0.0]]])  # [B=1, H=1, D=2]
    k = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]]]])  # [1, N=3, 1, 2]
    e = math.e
    expect = torch.tensor([[e, 1.0, 1 / e]]) / (e + 1 + 1 / e)
    torch.testing.assert_close(query_attention(q, k, 1.0), expect)
    masked = query_attention(q, k, 1.0, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(masked, torch.tensor([[e / (e + 1), 1 / (e + 1), 0.0]]))
    additive = query_attention(q, k, 1.0, torch.tensor([[0.0, 1.0, 0.0]]))  # log-size bias on key 1
    torch.testing.assert_close(additive, torch.tensor([[e, e, 1 / e]]) / (2 * e + 1 / e))


def test_query_attention_per_head_on_keys_sliced_from_a_fused_qkv():
    """Several heads, keys as a strided view of a fused qkv output: each head's softmax
    of its own query against its own keys (the block-diagonal product mixes no heads)."""
    from saint.core import query_attention

    g = torch.Generator().manual_seed(0)
    b, n, h, d = 2, 5, 3, 4
    qkv = torch.randn(b, n, 3, h, d, generator=g)
    q, k = torch.randn(b, h, d, generator=g), qkv[:, :, 1]
    expect = (torch.einsum("bhd,bnhd->bhn", q, k) * 0.5).softmax(-1)
    torch.testing.assert_close(query_attention(q, k, 0.5, mean_heads=False), expect)
    torch.testing.assert_close(query_attention(q, k, 0.5), expect.mean(1))


@pytest.mark.parametrize("accelerator", [False, True])
def test_packed_query_attention_known_answer(accelerator):
    """Two images packed back to back: each query reads only its own image's keys, the
    size bias moves weight, the padded view holds 0 after a short image's last key; the
    CPU's per-image loop and the accelerators' batched form alike."""
    from saint.core import packed_query_attention

    e = math.e
    q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [B=2, H=1, D=2]
    k = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]], [[0.0, 1.0]], [[0.0, -1.0]]])  # [T=5, 1, 2]
    bias = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0])  # log-size bias on keys 1 and 4
    with _paths(accelerator):
        out = packed_query_attention(q, k, [3, 2], 1.0)
        biased = packed_query_attention(q, k, [3, 2], 1.0, bias)
        with pytest.raises(ValueError, match="do not describe"):
            packed_query_attention(q, k, [3, 3], 1.0)
    torch.testing.assert_close(out, torch.tensor([[e, 1.0, 1 / e], [e, 1 / e, 0.0]]) / torch.tensor([[e + 1 + 1 / e], [e + 1 / e]]))
    torch.testing.assert_close(biased, torch.tensor([[e, e, 1 / e], [e, e, 0.0]]) / torch.tensor([[2 * e + 1 / e], [2 * e]]))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=5), st.integers(1, 3), st.booleans(), st.integers(0, 2**16),
       st.booleans())
def test_packed_query_attention_equals_query_attention_on_the_padded_view(lengths, heads, biased, seed, accelerator):
    """Keys never padded, same answer: ``packed_query_attention`` on a packed stream (a
    strided key slice of a fused qkv) equals ``query_attention`` on the padded view with
    the padding masked and the same per-key bias, on either path."""
    from saint.core import packed_query_attention, query_attention
    from saint.core.packing import lengths_to_valid, unpack

    g = torch.Generator().manual_seed(seed)
    t, d = sum(lengths), 4
    k = torch.randn(1, t, 3, heads, d, generator=g)[:, :, 1]  # [1, T, H, D], strided
    q = torch.randn(len(lengths), heads, d, generator=g)
    bias = torch.rand(t, generator=g).mul(3).log1p() if biased else None
    valid = lengths_to_valid(torch.tensor(lengths))
    padded = unpack(k.flatten(2), valid, fill=0.0).unflatten(2, (heads, d))
    mask = torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))
    if bias is not None:
        mask[valid] += bias
    expect = query_attention(q, padded, 0.7, mask)
    with _paths(accelerator):
        got = packed_query_attention(q, k[0], lengths, 0.7, bias)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("accelerator", [False, True])
def test_head_mean_equals_the_mean_over_heads_on_a_strided_key_slice(accelerator):
    from saint.core import head_mean

    g = torch.Generator().manual_seed(1)
    for heads in (1, 2, 6):
        qkv = torch.randn(2, 7, 3, heads, 5, generator=g)
        before = qkv.clone()
        k = qkv[:, :, 1]
        with _paths(accelerator):
            got = head_mean(k)
        torch.testing.assert_close(got, k.mean(dim=2))
        assert torch.equal(qkv, before)  # accumulated into its own output, never into the keys


def test_numpy_and_tensor_settings_mean_what_python_numbers_mean(images):
    """Settings from NumPy (scalars of any width, 1-d arrays) or torch (0-d / 1-d tensors)
    prune as the same Python numbers do; a NumPy bool is no number."""
    np = pytest.importorskip("numpy")

    def tokens(method: str, **kw) -> list[list[int]]:
        model = saint.patch(make_tiny("vit"), method, **kw)
        with torch.no_grad():
            model(images)
        return saint.stats(model).tokens

    tau = float(np.float32(0.4))
    want = tokens("saint", tau=[tau, 0.6], k=1, gamma=10.0, layers=[0, 1])
    assert want != tokens("saint", tau=[tau, tau], k=1, gamma=10.0, layers=[0, 1])  # the values matter
    for kw in (dict(tau=np.array([np.float32(0.4), 0.6]), k=np.int64(1), gamma=np.float16(10), layers=np.arange(2)),
               dict(tau=[np.float32(0.4), np.float64(0.6)], k=torch.tensor(1), gamma=10, layers=torch.arange(2)),
               dict(tau={np.int64(0): np.float32(0.4), 1: 0.6}, k=1, gamma=10.0)):
        assert tokens("saint", **kw) == want
    assert tokens("tome", r=np.int32(2)) == tokens("tome", r=2)
    with pytest.raises(TypeError, match="r must be a number"):
        saint.patch(make_tiny("vit"), "tome", r=np.bool_(True))


def test_numpy_settings_on_a_vlm_mean_what_python_numbers_mean():
    """The VLM settings take NumPy numbers too (FastV's ratio, the layers, counts)."""
    np = pytest.importorskip("numpy")
    from saint.adapters import llava

    from .test_llava import make

    model = make("llama", "sdpa")
    for method, kw in (("fastv", dict(fastv_layer=np.int64(1), fastv_ratio=np.float32(0.5))),
                       ("saint", dict(mode="hybrid", vit_keep=np.int64(5), vit_layer=np.int32(0),
                                      llm_layers=(np.int64(0), 1), llm_tau=np.float32(0.25), llm_k=np.int64(1)))):
        saint.patch(model, method=method, **kw)
        python = {k: tuple(int(x) for x in v) if isinstance(v, tuple) else getattr(v, "item", lambda v=v: v)()
                  for k, v in kw.items()}
        assert saint.api.get_handle(model).config == llava.make_config(method, **python)
        saint.unpatch(model)

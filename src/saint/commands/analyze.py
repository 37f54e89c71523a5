"""``saint analyze``: per-block token statistics of a ViT over a set of photos, the
three-stage rule applied to them, and a CSV + figure + markdown summary."""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..measure.report import command_line
from .options import DEFAULT_MODEL, add_model_options, check_output_dir, user_errors
from .options import build_model as load_model


def image_records(paths: Sequence[str], limit: int | None = None, skip_bad: bool = False) -> list[Any]:
    """Records for the given files/folders (folders: every image inside, sorted), or the
    shared 200-photo sample (else every offline photo) when no path is given;
    ``skip_bad`` leaves out files PIL cannot read."""
    from .. import assets
    from ..measure.images import from_folder, skip_unreadable

    if paths:
        records = []
        for p in map(Path, paths):
            if p.is_dir():
                records += from_folder(p).records  # the image discovery every command uses
            elif p.is_file():
                records.append(assets.ImageRecord(p, None, "cli"))
            else:
                raise FileNotFoundError(f"image path not found: {p}")
    else:
        records = assets.shared_sample_images() or assets.offline_images()
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
    if skip_bad:
        records, bad = skip_unreadable(records)
        for r in bad:
            print(f"note: left out unreadable image {r.path}")
    if limit is not None:
        records = records[:limit]
    return records


def _batches(records: Sequence[Any], transform: Any, batch_size: int) -> Iterator[torch.Tensor]:
    from ..measure.images import iter_batches

    return (x for x, _ in iter_batches(records, transform, batch_size))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="per-block token statistics and the three-stage rule",
        description=(
            "Per-block token statistics (key / hidden cosine, SAINT redundant fraction, "
            "class-token attention entropy, effective rank) of a timm ViT over photos; writes "
            "<name>.csv, <name>.png and <name>.md with the aligner/explorer/aggregator stages."
        ),
    )
    p.add_argument("images", nargs="*", help="image files or folders (default: the shared 200-photo sample)")
    add_model_options(p)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--tau", type=float, default=0.75, help="SAINT similarity threshold for redundancy")
    p.add_argument("--k", type=int, default=5, help="SAINT degree vote for redundancy")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--min-blocks", type=int, default=2, help="smallest stage length for the stage rule")
    p.add_argument("--splits", type=int, default=4, help="disjoint image subsets for the stability check")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out image files that cannot be read (default: stop with an error naming the file)")
    p.add_argument("--out-dir", default="saint-analysis", help="output folder (default ./saint-analysis)")
    p.add_argument("--name", default=None, help="file stem (default <model>_<img-size>)")
    p.set_defaults(func=user_errors("analyze", run))


def _command(args: argparse.Namespace) -> str:
    """The command as typed (every option, so that it reruns alike)."""
    return command_line(getattr(args, "argv", None))


def run(args: argparse.Namespace) -> int:
    """Collect, apply the stage rule, write CSV/PNG/markdown; print the stages."""
    import timm

    from .. import assets
    from ..analysis import (
        find_stages,
        plot_curves,
        stage_stability,
        summary_markdown,
        token_evolution,
        write_csv,
    )

    check_output_dir(args.out_dir, "--out-dir")
    if args.splits < 1:
        raise ValueError(f"--splits must be >= 1 (1: no stability check), got {args.splits}")
    model, model_name = load_model(args)
    records = image_records(args.images, args.limit, args.skip_bad_images)
    transform = assets.eval_transform(model)
    t0 = time.perf_counter()
    evo = token_evolution(
        model, _batches(records, transform, args.batch_size), tau=args.tau, k=args.k,
        batch_size=args.batch_size, progress=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    evo.model = model_name
    fit = find_stages(evo.curves(), min_blocks=args.min_blocks)
    splits = min(args.splits, evo.num_images)
    stability = stage_stability(evo, splits, args.min_blocks) if splits > 1 else []

    model_id = assets.DEFAULT_MODEL_NAME if args.model == DEFAULT_MODEL else args.model
    h, w = assets.input_size(model)
    size = str(h) if h == w else f"{h}x{w}"
    stem = args.name or f"{model_id.replace('/', '_')}_{size}"
    out = Path(args.out_dir)
    csv_path = write_csv(evo, out / f"{stem}.csv", fit)
    png_path = plot_curves(evo, out / f"{stem}.png", fit, title=f"{model_name}, {evo.num_images} images")
    sources = sorted({r.source for r in records})
    extra = {
        "image source": ", ".join(sources),
        "image size": f"{size} px",
        "versions": f"torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}",
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "collection time": f"{seconds:.1f} s",
    }
    md = summary_markdown(evo, fit, _command(args), stability, extra, args.min_blocks)
    md_path = out / f"{stem}.md"
    md_path.write_text(md)
    for name, (a, b) in fit.stages.items():
        print(f"{name:>10}: blocks {a}-{b}")
    print("variance explained by 0/1/2 kinks: " + " / ".join(f"{fit.r2[n]:.3f}" for n in (0, 1, 2)))
    if stability:
        print("boundaries on disjoint image subsets: " + ", ".join(map(str, stability)))
    print(f"wrote {csv_path}, {png_path}, {md_path}")
    return 0

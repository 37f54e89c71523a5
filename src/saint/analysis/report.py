"""Write a :class:`TokenEvolution` out: a CSV per block, a figure with one panel per
statistic across depth (stage boundaries marked), and a short markdown summary."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .collect import LABELS, STATS, TokenEvolution
from .stages import STAGE_NAMES, StageFit, find_stages

STAGE_COLOURS = {"aligner": "#4C72B0", "explorer": "#DD8452", "aggregator": "#55A868"}


def write_csv(evo: TokenEvolution, path: str | Path, fit: StageFit | None = None) -> Path:
    """One row per block: index, name, stage, mean and std of every statistic over
    images, plus the run's settings (``num_images``, ``tau``, ``k``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["block", "name", "stage"]
    for s in STATS:
        header += [s, f"{s}_std"]
    header += ["num_images", "num_tokens", "tau", "k"]
    means = {s: evo.mean(s).tolist() for s in STATS}
    stds = {s: evo.std(s).tolist() for s in STATS}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, name in enumerate(evo.blocks):
            row: list[object] = [i, name, fit.stage_of(i) if fit else ""]
            for s in STATS:
                row += [_fmt(means[s][i]), _fmt(stds[s][i])]
            row += [evo.num_images, evo.num_tokens, evo.tau, evo.k]
            w.writerow(row)
    return path


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.6g}"


def read_csv_curves(path: str | Path) -> dict[str, list[float]]:
    """Mean curves back from a CSV written by :func:`write_csv`."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {s: [float(r[s]) for r in rows] for s in STATS}


def plot_curves(evo: TokenEvolution, path: str | Path, fit: StageFit | None = None, title: str = "") -> Path:
    """Figure: one panel per statistic, mean over images +- one std across depth,
    stages shaded when ``fit`` is given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = list(range(len(evo.blocks)))
    fig, axes = plt.subplots(1, len(STATS), figsize=(3.3 * len(STATS), 3.2), squeeze=False)
    for ax, s in zip(axes[0], STATS, strict=True):
        mean, std = evo.mean(s), evo.std(s)
        if fit is not None:
            for name, (a, b) in fit.stages.items():
                ax.axvspan(a - 0.5, b + 0.5, color=STAGE_COLOURS[name], alpha=0.12, lw=0)
        if torch.isnan(mean).all():
            ax.text(0.5, 0.5, "undefined\n(no class token)", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.fill_between(x, (mean - std).tolist(), (mean + std).tolist(), color="k", alpha=0.12, lw=0)
            ax.plot(x, mean.tolist(), "o-", color="k", ms=3, lw=1.5)
        ax.set_title(LABELS[s], fontsize=8.5)
        ax.set_xlabel("block")
        ax.set_xticks(x if len(x) <= 16 else x[:: max(1, len(x) // 8)])
        ax.grid(alpha=0.3)
    if fit is not None:
        handles = [
            plt.Rectangle((0, 0), 1, 1, color=STAGE_COLOURS[n], alpha=0.3) for n in STAGE_NAMES
        ]
        labels = [f"{n} {a}-{b}" for n, (a, b) in fit.stages.items()]
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07 if fit is not None else 0, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def stage_stability(evo: TokenEvolution, splits: int = 4, min_blocks: int = 2) -> list[tuple[int, int]]:
    """Boundaries found on ``splits`` disjoint, consecutive chunks of the images:
    a quick check that the rule's answer does not hinge on a few photos."""
    n = evo.num_images
    if splits < 1 or n < splits:
        raise ValueError(f"cannot split {n} images into {splits} groups")
    edges = [round(i * n / splits) for i in range(splits + 1)]
    out = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        out.append(find_stages(evo.subset(slice(a, b)).curves(), min_blocks=min_blocks).boundaries)
    return out


def summary_markdown(
    evo: TokenEvolution,
    fit: StageFit,
    command: str = "",
    stability: Sequence[tuple[int, int]] = (),
    extra: dict[str, str] | None = None,
    min_blocks: int = 2,
) -> str:
    """Markdown: settings, the stages found, how well 0/1/2 kinks fit (jointly and per
    curve), the boundaries on image subsets, the mean curves."""
    lines = [f"# Token evolution: {evo.model or 'model'}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    info = {
        "images": str(evo.num_images),
        "tokens per image": f"{evo.num_tokens} ({evo.num_prefix} prefix)",
        "redundancy rule": f"tau={evo.tau}, k={evo.k}",
        **(extra or {}),
    }
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "## Stages (rule: saint.analysis.stages, joint 2-kink continuous piecewise-linear fit)", ""]
    lines += ["| stage | blocks |", "|---|---|"]
    lines += [f"| {name} | {a}-{b} |" for name, (a, b) in fit.stages.items()]
    lines += [
        "",
        f"Curves fitted (z-scored): {', '.join(fit.used)}.",
        "",
        "| kinks | boundaries | variance explained |",
        "|---|---|---|",
    ]
    for n in sorted(fit.r2):
        lines.append(f"| {n} | {list(fit.kinks[n]) or '-'} | {fit.r2[n]:.3f} |")
    lines += ["", "Each curve alone (same rule, one curve):", "",
              "| curve | boundaries | variance explained (0/1/2 kinks) |", "|---|---|---|"]  # fmt: skip
    curves = evo.curves()
    for name in fit.used:
        one = find_stages({name: curves[name]}, names=(name,), min_blocks=min_blocks)
        r2 = " / ".join(f"{one.r2[n]:.3f}" for n in (0, 1, 2))
        lines.append(f"| {name} | {one.boundaries} | {r2} |")
    if stability:
        lines += ["", f"Boundaries on {len(stability)} disjoint image subsets: "
                  + ", ".join(f"({a}, {b})" for a, b in stability)]  # fmt: skip
    lines += ["", "## Mean curves", ""]
    lines += ["| block | stage | " + " | ".join(STATS) + " |", "|---" * (len(STATS) + 2) + "|"]
    for i in range(len(evo.blocks)):
        vals = " | ".join(_fmt(curves[s][i]) for s in STATS)
        lines.append(f"| {i} | {fit.stage_of(i)} | {vals} |")
    return "\n".join(lines) + "\n"

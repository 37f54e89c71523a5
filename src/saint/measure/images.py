"""Image sets for evaluation: an ImageFolder directory, a labels CSV, a flat folder, or
the offline photos of :mod:`saint.assets`. Everything is a list of
:class:`saint.assets.ImageRecord` (path, label or None, source), loaded batch by batch
with the model's own timm preprocessing."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import assets
from ..assets import ImageRecord

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
OFFLINE = "offline"
SHARED = "shared"


@dataclass
class ImageSet:
    """Records plus where their labels come from: ``"imagenet-1k"`` (class indices of
    ImageNet-1k), ``"folder"`` (sorted sub-folder index), ``"csv"`` or ``None``."""

    records: list[ImageRecord]
    label_space: str | None
    description: str

    @property
    def has_labels(self) -> bool:
        return any(r.label is not None for r in self.records)

    def __len__(self) -> int:
        return len(self.records)


def shared_photos_or_say_why() -> list[ImageRecord]:
    """The shared ``imagenet-sample-200`` photos for a benchmark; when they are absent,
    ``[]`` after printing that it skips (the benchmark then exits 0)."""
    records = assets.shared_sample_images()
    if not records:
        print("skipping: the shared imagenet-sample-200 folder was not found (set SAINT_SHARED_DATA)")
    return records


def holdout_split(records: Sequence[ImageRecord], every: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """``(held out, the rest)``: every ``every``-th record (the 8th, 16th, ...) is held out,
    e.g. to calibrate on photos that the evaluation never sees; the order is kept."""
    if every < 2:
        raise ValueError(f"every={every} must be >= 2 (1 would hold out every photo)")
    return list(records[every - 1 :: every]), [r for i, r in enumerate(records) if (i + 1) % every]


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def _imagenet_synsets() -> dict[str, int]:
    try:
        from timm.data import ImageNetInfo
    except ImportError:  # pragma: no cover - old timm
        return {}
    return {s: i for i, s in enumerate(ImageNetInfo().label_names())}


def from_csv(path: str | Path) -> ImageSet:
    """A labels CSV with a header holding ``file`` and ``class_index`` (other columns
    ignored; empty ``class_index`` = unlabelled). Files are relative to the CSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if "file" not in cols:
            raise ValueError(f"{path} needs a 'file' column (and 'class_index'); it has {cols}")
        records = []
        for n, row in enumerate(reader, start=2):
            file = path.parent / row["file"]
            if not file.is_file():
                raise FileNotFoundError(f"{path}:{n}: image {file} does not exist")
            label = (row.get("class_index") or "").strip()
            try:
                lab = int(label) if label else None
            except ValueError:
                raise ValueError(f"{path}:{n}: class_index {label!r} is not an integer") from None
            records.append(ImageRecord(path=file, label=lab, source=str(path)))
    if not records:
        raise ValueError(f"{path} lists no images")
    space = "csv" if any(r.label is not None for r in records) else None
    return ImageSet(records, space, f"{len(records)} images from {path}")


def from_folder(path: str | Path) -> ImageSet:
    """A folder: ``labels.csv`` inside it wins; else sub-folders are classes (ImageFolder;
    names that are all ImageNet-1k synsets map to ImageNet-1k indices, otherwise the
    sorted sub-folder index is the label); else its images, unlabelled."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    if (path / "labels.csv").is_file():
        return from_csv(path / "labels.csv")
    classes = sorted(d for d in path.iterdir() if d.is_dir() and any(_is_image(f) for f in d.iterdir()))
    if classes:
        synsets = _imagenet_synsets()
        if synsets and all(d.name in synsets for d in classes):
            index = {d.name: synsets[d.name] for d in classes}
            space = "imagenet-1k"
        else:
            index = {d.name: i for i, d in enumerate(classes)}
            space = "folder"
        records = [
            ImageRecord(path=f, label=index[d.name], source=str(path))
            for d in classes
            for f in sorted(d.iterdir())
            if _is_image(f)
        ]
        return ImageSet(records, space, f"{len(records)} images in {len(classes)} class folders of {path}")
    files = sorted(f for f in path.iterdir() if _is_image(f))
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no class sub-folders")
    return ImageSet([ImageRecord(f, None, str(path)) for f in files], None, f"{len(files)} images in {path}")


def offline_set() -> ImageSet:
    """The photos every user can get offline: foolbox's 20 labelled ImageNet photos and
    scikit-image's samples when installed (see :func:`saint.assets.offline_images`)."""
    records = assets.offline_images(shared=False)
    space = "imagenet-1k" if any(r.label is not None for r in records) else None
    names = {"foolbox": "foolbox's ImageNet samples", "skimage": "scikit-image samples"}
    sources = " + ".join(names.get(s, s) for s in dict.fromkeys(r.source for r in records))
    return ImageSet(records, space, f"{len(records)} offline photos ({sources})")


def shared_set() -> ImageSet:
    """The 200 ImageNet photos of the shared ``imagenet-sample-200`` folder, if present."""
    records = assets.shared_sample_images()
    if not records:
        raise FileNotFoundError(
            "the shared imagenet-sample-200 folder was not found (set SAINT_SHARED_DATA to it)"
        )
    return ImageSet(records, "imagenet-1k", f"{len(records)} photos of imagenet-sample-200")


def skip_unreadable(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """``(readable, unreadable)``: every record decoded once with PIL."""
    good, bad = [], []
    for r in records:
        try:
            assets.open_rgb(r.path)
        except assets.BadImageError:
            bad.append(r)
        else:
            good.append(r)
    return good, bad


def resolve_images(source: str | None = None, limit: int | None = None, skip_bad: bool = False) -> ImageSet:
    """``None``/``"offline"`` -> offline photos; ``"shared"`` -> imagenet-sample-200; a
    ``.csv`` file -> :func:`from_csv`; a folder -> :func:`from_folder`. ``limit`` keeps
    the first ``limit`` images (in the set's sorted order); ``skip_bad`` first leaves out
    files PIL cannot read (named in the description) instead of failing on them."""
    if source is None or source == OFFLINE:
        image_set = offline_set()
    elif source == SHARED:
        image_set = shared_set()
    else:
        p = Path(source)
        if p.is_file():
            if p.suffix.lower() != ".csv":
                raise ValueError(f"{p} is a file but not a labels .csv; give a folder or a CSV")
            image_set = from_csv(p)
        elif p.is_dir():
            image_set = from_folder(p)
        else:
            raise FileNotFoundError(f"images: {source!r} is neither '{OFFLINE}', '{SHARED}', a folder nor a CSV")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if skip_bad:
        image_set.records, bad = skip_unreadable(image_set.records)
        if bad:
            image_set.description += f" ({len(bad)} unreadable left out: {', '.join(str(r.path) for r in bad)})"
        if not image_set.records:
            raise ValueError(f"no readable images in {source}")
    if limit is not None:
        image_set.records = image_set.records[:limit]
        image_set.description += f" (first {len(image_set.records)})"
    return image_set


def iter_batches(
    records: Sequence[ImageRecord], transform, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Load ``records`` ``batch_size`` at a time: ``(images [b,3,H,W], labels [b])``,
    label -1 where unknown."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(records), batch_size):
        yield assets.load_images(records[i : i + batch_size], transform)


def load_all(records: Sequence[ImageRecord], transform) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``records`` at once (small sets only)."""
    return assets.load_images(records, transform)

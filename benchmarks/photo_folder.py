"""An ImageFolder of "photos" of assorted sizes, made from the shared CIFAR-10 JPEG copy.

Each image is resized (bicubic) to its own random width and height in [--min-px, --max-px], so the tree
looks like a folder of photos: no two of the same shape, some smaller and some larger than the size a
run crops them to. The streaming path (`data.mode: stream`) reads it as is; the in-memory path refuses it.
Used by `configs/folder_kd_torchvision_timm.yaml` (the CPU example) and `benchmarks/streaming.py`.

    .venv/bin/python benchmarks/photo_folder.py --out data/cifar10-photos [--train-per-class 200]
        [--test-per-class 100] [--min-px 24] [--max-px 96] [--source ARCHIVE_OR_FOLDER]

`--source` is any ImageFolder tree (`train/<class>/*`, `test/<class>/*`) or a .tar.gz of one; by default the
CIFAR-10 JPEG archive beside this repository. Without it the script says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def make_photo_folder(out: Path, train_per_class: int, test_per_class: int, min_px: int = 24, max_px: int = 96,
                      seed: int = 0, source: Path = ARCHIVE) -> Path:
    """`out`/{train,test}/<class>/*.jpg: the first images of each class of `source`, each at its own random
    size. Built once: a finished tree (marked by `.complete`) is returned as it is."""
    import numpy as np
    from PIL import Image

    from ray_kd.config import DataConfig
    from ray_kd.data import imagefolder_root

    if (out / ".complete").exists():
        return out
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="ray-kd-photos-") as unpacked:
        tree = imagefolder_root(DataConfig(dataset="imagefolder", root=str(source), cache_dir=unpacked))
        for file, folder in first_of_each_class(tree, out, {"train": train_per_class, "test": test_per_class}):
            w, h = rng.integers(min_px, max_px + 1, size=2)
            with Image.open(file) as img:
                img.convert("RGB").resize((int(w), int(h)), Image.BICUBIC).save(folder / file.name, quality=90)
    (out / ".complete").touch()
    return out


def linked_subset(out: Path, train_per_class: int, test_per_class: int, source: Path) -> Path:
    """`out`/{train,test}/<class>/*.jpg: the first images of each class of the unpacked tree `source`, as stored
    (hard links, nothing decoded or re-encoded). Built once, like `make_photo_folder`."""
    import os

    if (out / ".complete").exists():
        return out
    for file, folder in first_of_each_class(source, out, {"train": train_per_class, "test": test_per_class}):
        if not (folder / file.name).exists():
            os.link(file, folder / file.name)
    (out / ".complete").touch()
    return out


def first_of_each_class(tree: Path, out: Path, counts: dict[str, int]):
    """(image file, its class folder under `out`, made) for the first `counts[split]` images of each class of `tree`."""
    from ray_kd.data import list_image_folder

    for split, per_class in counts.items():
        classes, files, labels = list_image_folder(tree / split)
        for c, name in enumerate(classes):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for file in [f for f, label in zip(files, labels) if label == c][:per_class]:
                yield file, folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--min-px", type=int, default=24)
    parser.add_argument("--max-px", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=ARCHIVE,
                        help="an ImageFolder tree or a .tar.gz of one (default: the shared CIFAR-10 JPEG archive)")
    args = parser.parse_args()
    if not args.source.exists():
        parser.exit(2, f"photo_folder.py: error: {args.source} not found (the CIFAR-10 JPEG archive this script "
                       "samples); pass --source with any ImageFolder tree or a .tar.gz of one\n")
    out = make_photo_folder(args.out, args.train_per_class, args.test_per_class, args.min_px, args.max_px, args.seed,
                            source=args.source)
    print(f"{out}: {sum(1 for _ in out.rglob('*.jpg'))} images, {args.min_px}-{args.max_px} px a side")


if __name__ == "__main__":
    main()

"""What teacher.cache stores for ImageNet shapes (issue 33): bytes on disk per step and per epoch, full vs top-k.

Writes one chunk (ray_kd.teacher_cache.CHUNK steps) of random logits of a batch of 256 x 1,000 classes through
TeacherCache, as full float16, full float32 and top-k (k = 5, 20) float16, and reads the file sizes back: what a
step and an ImageNet-1k epoch (1,281,167 images, 5,005 steps of 256) cost on disk, torch.save's framing included.
Sizes only (they do not depend on the machine); the KD quality of top-k is measured by quality.py's kd@top3/top5.

    .venv/bin/python benchmarks/teacher_cache_size.py
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from common import machine, save

IMAGES, CLASSES, BATCH = 1_281_167, 1000, 256
STORES = [("float16", None), ("float32", None), ("float16", 5), ("float16", 20)]


def chunk_bytes(dtype: str, topk: int | None) -> tuple[int, int]:
    """(bytes of one written chunk, steps in it)."""
    from ray_kd.teacher_cache import CHUNK, TeacherCache

    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        cache = TeacherCache(root, {"bench": dtype, "topk": topk}, steps_per_epoch=CHUNK, topk=topk, dtype=dtype)
        for step in range(CHUNK):
            cache.put(0, step, {"logits": torch.randn(BATCH, CLASSES, generator=generator)})
        (written,) = Path(root).glob("*/e0000/*.pt")
        return written.stat().st_size, CHUNK


def main() -> None:
    info = machine()
    steps_per_epoch = math.ceil(IMAGES / BATCH)
    rows = []
    for dtype, topk in STORES:
        size, steps = chunk_bytes(dtype, topk)
        per_step = size / steps
        rows.append({"stored": f"top-{topk} {dtype}" if topk else f"all {CLASSES} {dtype}", "bytes_per_step": per_step,
                     "bytes_per_image": per_step / BATCH, "GB_per_epoch": per_step * steps_per_epoch / 1e9,
                     "GB_per_100_epochs": per_step * steps_per_epoch * 100 / 1e9})
    full = rows[0]["bytes_per_step"]
    for r in rows:
        r["vs_full_fp16"] = r["bytes_per_step"] / full
    notes = (f"ImageNet-1k shapes: {IMAGES:,} training images, {CLASSES:,} classes, batch {BATCH} "
             f"({steps_per_epoch:,} steps an epoch); one chunk of random logits written through "
             "ray_kd.teacher_cache.TeacherCache and its file size read back (torch.save's framing included). "
             "Top-k stores k values and k int16 class indices per image.")
    save("teacher_cache_size", "teacher.cache on disk for ImageNet shapes: full logits vs top-k", rows,
         ["stored", "bytes_per_step", "bytes_per_image", "GB_per_epoch", "GB_per_100_epochs", "vs_full_fp16"], info,
         notes)


if __name__ == "__main__":
    main()

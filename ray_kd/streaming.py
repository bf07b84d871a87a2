"""ImageFolder trees read from disk batch by batch (`data.mode=stream`): any size of set, any image sizes.

A torch DataLoader (`data.workers` processes, kept across epochs) reads the file list, so a process
holds a file name per image and a few batches, never the decoded set. On Ray one loader per replica
runs it and hands every role the same decoded batch (`ray_kd.loader`, `data.decode=once`); with
`data.decode=per_role`, and in one process, the roles' own process runs it. Whoever decodes, every
role draws the same pixels at each step, as the in-memory path guarantees: the batch
sampler walks the training set in the in-memory path's permutation for (seed, epoch)
(`data.epoch_order`), and each sample's augmentation is drawn from a generator seeded by
(seed, epoch, index), never from a DataLoader process's own RNG state, so which process decodes
which image changes nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from ray_kd.checkpoint import atomic_write_json
from ray_kd.config import DataConfig
from ray_kd.data import (DataError, digest, epoch_order, epoch_steps, imagefolder_root, list_image_folder,
                         normalization, normalize, train_val_indices)

DEFAULT_IMAGE_SIZE = 224
CROP_FRACTION = 0.875
"""Evaluation resizes the shorter side to image_size / CROP_FRACTION, then crops the centre image_size square."""
STATS_SAMPLE = 1000
"""Training images (a fixed sample) that `data.normalize=dataset` measures its mean/std on."""

Key = tuple[str, int, int, int, bool]
"""What the batch sampler hands a DataLoader process per sample: (split, index, seed, epoch, augment)."""


@dataclass
class StreamSplit:
    name: str
    files: np.ndarray  # fixed-width bytes: no per-file Python object for forked processes to copy on touch
    labels: torch.Tensor


@dataclass
class DecodeCount:
    """Training images decoded and augmented, and the CPU-seconds the processes that did it spent on them."""

    images: int = 0
    cpu_s: float = 0.0

    def add(self, images: int, cpu_s: float) -> None:
        self.images += images
        self.cpu_s += cpu_s


@dataclass
class Unreadable:
    """A sample that failed to decode, carried to the role's process as data (a DataLoader process's
    exception would arrive there as a many-line traceback)."""

    path: str
    reason: str

    def error(self) -> DataError:
        return DataError(f"{self.path}: unreadable image ({self.reason}); remove or replace the file")


class _Plan:
    """The batch sampler of the one persistent DataLoader: it yields whatever batches of keys the
    current pass (a training epoch, an evaluation) set."""

    def __init__(self):
        self.batches: Iterable[list[Key]] = ()

    def __iter__(self):
        return iter(self.batches)


class StreamDataset(torch.utils.data.Dataset):
    """What `seeded_batches` and `eval_batches` read in stream mode: one training pass and one scoring pass at a
    time, each through its own loader, since they interleave: on the Ray executor a frozen teacher scores ahead
    between its training steps, and a persistent DataLoader serves one pass only (a second one restarts it, so the
    suspended training pass would be handed scoring batches)."""

    in_channels = 3  # every image is read as RGB

    def __init__(self, train: StreamSplit, val: StreamSplit, test: StreamSplit, num_classes: int,
                 image_size: int, augment: bool, workers: int, batch_size: int):
        from torchvision.transforms import v2

        self.train, self.val, self.test, self.num_classes = train, val, test, num_classes
        self.splits = {s.name: s for s in (train, val, test)}
        self.workers, self.batch_size = workers, batch_size
        self.mean = self.std = None  # set by load_stream; None while measuring them
        self.augmenting = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(image_size, antialias=True),
                                      v2.RandomHorizontalFlip()])
        self.evaluating = eval_transform(image_size)
        if not augment:
            self.augmenting = self.evaluating
        self._plans = {"train": _Plan(), "eval": _Plan()}
        self._loaders: dict[str, DataLoader] = {}
        self.raw_training = False  # training batches uint8, not normalised (a loader's: each role normalises)
        self.decoded = DecodeCount()  # training images decoded here since `take_decoded`
        self.skip_bad = False  # data.bad_images=skip (set by load_stream): a batch drops its unreadable images

    # --- inside a DataLoader process ----------------------------------------
    def __len__(self) -> int:
        return sum(len(s.labels) for s in self.splits.values())

    def __getitem__(self, key: Key):
        """(image, label, CPU-seconds this thread spent decoding and transforming it)."""
        from PIL import Image

        split, index, seed, epoch, augment = key
        part = self.splits[split]
        path = os.fsdecode(part.files[index])
        started = time.thread_time()
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return Unreadable(path, str(err) or type(err).__name__)
        if not augment:
            image = self.evaluating(img)
        else:
            with torch.random.fork_rng(devices=[]):  # only this sample's draws see the seed
                torch.default_generator.manual_seed(sample_seed(seed, epoch, index))
                image = self.augmenting(img)
        return image, int(part.labels[index]), time.thread_time() - started

    def _collate(self, samples: list, normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor, float] | Unreadable:
        bad = [s for s in samples if isinstance(s, Unreadable)]
        if bad and (not self.skip_bad or len(bad) == len(samples)):
            return bad[0]
        samples = [s for s in samples if not isinstance(s, Unreadable)]
        _say_skipped(bad)
        images = torch.stack([image for image, *_ in samples])
        labels = torch.tensor([label for _, label, _ in samples], dtype=torch.int64)
        cpu_s = sum(cpu for *_, cpu in samples)
        return (images if self.mean is None or not normalized else normalize(images, self.mean, self.std)), labels, cpu_s

    # --- in the role's process ----------------------------------------------
    def train_batches(self, batch_size: int, seed: int, epoch: int, max_steps: int | None = None,
                      part: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches in the in-memory path's order for (seed, epoch), augmented per sample; of each,
        only shard `part` = (r, R) (a data-parallel replica reads its own)."""
        _, order = epoch_order(len(self.train.labels), seed, epoch)
        steps = epoch_steps(self, batch_size, max_steps)
        shards = [torch.tensor_split(order[s * batch_size:(s + 1) * batch_size], part[1])[part[0]]
                  for s in range(steps)]
        return self._run("train", [[("train", int(i), seed, epoch, True) for i in shard] for shard in shards])

    def eval_batches(self, split: StreamSplit) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = len(split.labels), self.batch_size
        return self._run("eval", [[(split.name, i, 0, 0, False) for i in range(start, min(start + b, n))]
                                  for start in range(0, n, b)])

    def raw_eval_batches(self, split: StreamSplit, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`split` as the eval transform crops it, uint8 and not normalised (what a shipped model takes), decoded
        in this process."""
        n = len(split.labels)
        for start in range(0, n, batch_size):
            batch = self._collate([self[(split.name, i, 0, 0, False)] for i in range(start, min(start + batch_size, n))],
                                  normalized=False)
            if isinstance(batch, Unreadable):
                raise batch.error()
            yield batch[:2]

    def _run(self, kind: str, batches: list[list[Key]], loader: DataLoader | None = None):
        self._plans[kind].batches = batches
        for batch in (passing := iter(loader if loader is not None else self._persistent_loader(kind))):
            if isinstance(batch, Unreadable):
                if loader is None:
                    del self._loaders[kind]  # the next pass starts a fresh one
                _stop(passing)
                raise batch.error()
            images, labels, cpu_s = batch
            if kind == "train":
                self.decoded.add(len(labels), cpu_s)
            yield images, labels

    def take_decoded(self) -> DecodeCount:
        """The training images decoded since the last call, and their CPU-seconds."""
        decoded, self.decoded = self.decoded, DecodeCount()
        return decoded

    def _persistent_loader(self, kind: str) -> DataLoader:
        """Made on first use, after the mean/std are set: its processes keep the dataset as it was then."""
        if kind not in self._loaders:
            self._loaders[kind] = self._make_loader(kind, persistent=self.workers > 0)
        return self._loaders[kind]

    def _make_loader(self, kind: str, persistent: bool) -> DataLoader:
        # The loader gets a copy of this dataset without the loaders: holding this one, dataset -> loader -> dataset
        # would be a reference cycle, freed only by the garbage collector, and a persistent loader shut down from
        # there waits out a 5 s join per process.
        decoding = copy.copy(self)
        decoding._loaders = {}
        collate = partial(decoding._collate, normalized=not (kind == "train" and self.raw_training))
        return DataLoader(decoding, batch_sampler=self._plans[kind], num_workers=self.workers, collate_fn=collate,
                          persistent_workers=persistent, pin_memory=torch.cuda.is_available())

    def stats_sample(self) -> torch.Tensor:
        """A fixed sample of training images as evaluation crops them, uint8 (read by short-lived processes)."""
        n = len(self.train.labels)
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:STATS_SAMPLE].sort().values
        batches = [[("train", int(i), 0, 0, False) for i in sample[s:s + self.batch_size]]
                   for s in range(0, len(sample), self.batch_size)]
        return torch.cat([x for x, _ in self._run("eval", batches, self._make_loader("eval", persistent=False))])


_SKIPPED: set[str] = set()
"""The unreadable images this process has skipped and said so (each said once, not each epoch)."""


def _say_skipped(bad: list[Unreadable]) -> None:
    """One warning line per unreadable image skipped (`data.bad_images=skip`), from the process that decoded it."""
    for sample in bad:
        if sample.path not in _SKIPPED:
            _SKIPPED.add(sample.path)
            print(f"ray-kd: warning: skipped an unreadable image (data.bad_images=skip): {sample.path} "
                  f"({sample.reason})", file=sys.stderr, flush=True)


def _stop(passing) -> None:
    """Stop the processes of a pass left half-way by an error now, not later and slowly from the garbage collector."""
    if hasattr(passing, "_shutdown_workers"):  # torch's own way out of a multi-process pass; it has no public one
        passing._shutdown_workers()


def eval_resize(image_size: int) -> int:
    """The shorter side evaluation resizes an image to before its centre crop of `image_size`."""
    return int(image_size / CROP_FRACTION)


def eval_transform(image_size: int):
    """PIL image -> uint8 C x H x W tensor as evaluation reads it: resize, centre crop (no normalisation)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.Resize(eval_resize(image_size), antialias=True),
                       v2.CenterCrop(image_size)])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training sample's augmentation in one epoch."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def load_stream(cfg: DataConfig) -> StreamDataset:
    """List the tree (train/<class>/, test/<class>/), split val off train as the in-memory path does."""
    root = imagefolder_root(cfg)
    classes, train_files, train_labels = list_image_folder(root / "train")
    test_classes, test_files, test_labels = list_image_folder(root / "test")
    if classes != test_classes:
        raise DataError(f"{root}: train/ and test/ hold different class folders")
    files = np.array([os.fsencode(f) for f in train_files])
    labels = torch.tensor(train_labels, dtype=torch.int64)
    keep, held = train_val_indices(labels, cfg)
    image_size = cfg.image_size or DEFAULT_IMAGE_SIZE
    data = StreamDataset(
        StreamSplit("train", files[keep.numpy()], labels[keep]), StreamSplit("val", files[held.numpy()], labels[held]),
        StreamSplit("test", np.array([os.fsencode(f) for f in test_files]), torch.tensor(test_labels)),
        len(classes), image_size, cfg.augment != "none", cfg.workers, cfg.batch_size)
    data.skip_bad = cfg.bad_images == "skip"
    data.mean, data.std = _mean_std(cfg, data, root, image_size)
    return data


def _mean_std(cfg: DataConfig, data: StreamDataset, root: Path, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`data.normalize`; the dataset's own is measured once per tree and size, then read from the cache."""
    if cfg.normalize != "dataset":
        return normalization(cfg, data.in_channels, lambda: torch.empty(0))
    key = f"{root.resolve()}|{image_size}|{len(data.train.labels)}|{cfg.val_fraction}|{cfg.train_subset}"
    cache = Path(cfg.cache_dir) / f"stream-stats-{digest(key)}.json"
    if cache.is_file():
        stats = json.loads(cache.read_text())
        return torch.tensor(stats["mean"]), torch.tensor(stats["std"])
    mean, std = normalization(cfg, data.in_channels, data.stats_sample)
    atomic_write_json({"mean": mean.tolist(), "std": std.tolist()}, cache)
    return mean, std

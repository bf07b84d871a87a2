"""Where a run's data comes from: a registry of data sources (`data.dataset`), as methods and models have.

A source owns what differs between kinds of data: how its splits load, its normalisation, what
`data.augment=auto` means for it, its identity (what the run's fingerprint and MLflow's dataset input name),
and which settings fit it. What every source shares (the validation split, the object store, batching) is done
once by `load_in_memory` and the executors.

- Built-in sources register with `@register_dataset` below.
- An installed package adds sources through the entry-point group `ray_kd.datasets` (each entry names a
  `DataSource` subclass); they are loaded the first time a name is not found, in the driver and in every Ray
  worker alike (a worker validates the config it is sent).
- A config may also name a class directly: `data.dataset: mypkg.sources:MySource`.

`cfg` below is always a run's `data:` section (`ray_kd.config.DataConfig`), which validates its `dataset`
here: this module does not import the config module back.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ray_kd import synthetic
from ray_kd.data import (Dataset, DataError, Split, imagefolder_splits, normalization, stratified_split,
                         train_val_indices)
from ray_kd.errors import first_line
from ray_kd.plugins import PluginError, import_class, load_entry_points

ENTRY_POINT_GROUP = "ray_kd.datasets"


class DataSource:
    """One kind of data. Subclass it, set `name`, implement `load`; override the rest where the defaults do not
    fit (see docs/adding-a-data-source.md)."""

    name: str
    plain: bool = False
    """Flips and crops would change what an image means (digits, glyphs): `data.augment=auto` is `none`."""
    gray: bool = False
    """One channel: pretrained weights' per-RGB normalisation does not apply (`data.normalize` keeps its default)."""
    streams: bool = False
    """`data.mode=stream` reads it from disk batch by batch (ImageFolder trees, through `ray_kd.streaming`)."""

    def load(self, cfg) -> tuple[Split, Split, int]:
        """The training and test splits in memory (uint8 N x C x H x W images, int64 labels) and the class count.
        Bad or missing input raises `DataError` with one line naming the setting and the fix."""
        raise NotImplementedError

    def check(self, cfg) -> None:
        """Refuse settings that do not fit this source (a `ValueError`, shown as a config error at `data`)."""
        if cfg.mode == "stream" and not self.streams:
            raise ValueError(f"data.mode=stream reads ImageFolder trees only; {cfg.dataset} fits in memory: "
                             "set data.mode=memory")

    def normalization(self, cfg, train: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean/std as `data.normalize` asks: of the training split, ImageNet's, or given."""
        return normalization(cfg, train.images.shape[1], lambda: train.images)

    def augment(self, cfg) -> str:
        """`none` or `crop_flip`: `data.augment`, with `auto` resolved for this source."""
        return cfg.augment if cfg.augment != "auto" else ("none" if self.plain else "crop_flip")

    def identity(self, cfg) -> tuple[str, str]:
        """(name, source) the run records: by default the source's name and its root's absolute path."""
        return (self.name, str(Path(cfg.root).resolve())) if cfg.root else (self.name, f"{self.name}:{cfg.root}")


SOURCES: dict[str, DataSource] = {}
ORIGINS: dict[str, str] = {}
"""Source name -> where it came from: 'built-in', 'plugin <distribution>', 'module <name>' or 'import <module>'."""


def register_dataset(cls: type[DataSource], origin: str | None = None) -> type[DataSource]:
    """Class decorator: make the `DataSource` subclass `cls` findable as `data.dataset=<cls.name>`."""
    if not (isinstance(cls, type) and issubclass(cls, DataSource) and isinstance(cls.__dict__.get("name"), str)):
        raise TypeError(f"{cls!r} is not a DataSource subclass with a `name`")
    known = SOURCES.get(cls.name)
    if known is not None and type(known) is not cls:
        raise ValueError(f"data source {cls.name!r} is registered twice ({type(known).__module__} and "
                         f"{cls.__module__})")
    SOURCES[cls.name] = known or cls()
    ORIGINS.setdefault(cls.name, origin or ("built-in" if cls.__module__.startswith("ray_kd.")
                                            else f"module {cls.__module__}"))
    return cls


def load_plugins() -> None:
    """Import every `ray_kd.datasets` entry point (again each call, as for methods); a broken one is one line."""
    for _, loaded, origin in load_entry_points(ENTRY_POINT_GROUP, "data source"):
        if isinstance(loaded, type) and issubclass(loaded, DataSource):
            register_dataset(loaded, origin)


def source_for(name: str) -> DataSource:
    """The source `data.dataset` names: registered, from a plugin, or `package.module:Class`."""
    if ":" in name:
        return _imported(name)
    if name not in SOURCES:
        load_plugins()
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; choose one of: {', '.join(sorted(SOURCES))} "
                         "(or name a class as package.module:Class)")
    return SOURCES[name]


def _imported(path: str) -> DataSource:
    if path not in SOURCES:
        cls = import_class(path, "data source", DataSource, "ray_kd.data_sources.DataSource subclass with a `name`")
        if not isinstance(getattr(cls, "name", None), str):
            raise PluginError(f"data source {path!r} is not a ray_kd.data_sources.DataSource subclass with a `name`")
        SOURCES[path], ORIGINS[path] = cls(), f"import {path.partition(':')[0]}"
    return SOURCES[path]


def list_datasets() -> list[tuple[str, str, str]]:
    """(name, origin, first docstring line) of every source, plugins included."""
    load_plugins()
    return [(name, ORIGINS[name], (type(source).__doc__ or "").strip().split("\n")[0])
            for name, source in sorted(SOURCES.items())]


def load_in_memory(cfg) -> Dataset:
    """Train/val/test of `cfg.dataset` in memory; val is a fixed stratified share of train (seed 0, not the run
    seed). `ray_kd.datasets.load_dataset` picks this or streaming."""
    source = source_for(cfg.dataset)
    train, test, num_classes = source.load(cfg)
    keep, held = train_val_indices(train.labels, cfg)
    train, val = Split(train.images[keep], train.labels[keep]), Split(train.images[held], train.labels[held])
    mean, std = source.normalization(cfg, train)
    return Dataset(train, val, test, num_classes, mean, std, source.augment(cfg))


def dataset_identity(cfg, data) -> tuple[str, str, dict[str, int], str]:
    """(name, source, split sizes, digest) of the data a run reads: the digest covers the source, the split
    settings and every split's labels, so images added to a class, or a class added, change it (a resume on
    changed data is refused by the run's fingerprint; MLflow records it as the run's dataset input)."""
    import hashlib
    import json

    splits = {"train": data.train, "val": data.val, "test": data.test}
    sizes = {k: len(s.labels) for k, s in splits.items()}
    name, source = source_for(cfg.dataset).identity(cfg)
    h = hashlib.sha256(json.dumps([name, source, cfg.val_fraction, cfg.train_subset, sizes]).encode())
    for split in splits.values():
        h.update(split.labels.numpy().tobytes())
    return name, source, sizes, h.hexdigest()[:12]


@register_dataset
class Digits(DataSource):
    """scikit-learn's 1,797 8x8 digits (inside its wheel: nothing to download), a 20% stratified test split."""

    name = "digits"
    plain = True
    gray = True

    def load(self, cfg) -> tuple[Split, Split, int]:
        import numpy as np
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy((bunch.images * (255 / 16)).round().astype(np.uint8)).unsqueeze(1)
        train, test = stratified_split(Split(images, torch.from_numpy(bunch.target.astype(np.int64))), 0.2)
        return train, test, 10

    def identity(self, cfg) -> tuple[str, str]:
        return "digits", "sklearn digits"


class _Cifar(DataSource):
    """CIFAR in torchvision's layout under `data.root` (`data.download=true` lets torchvision fetch it)."""

    classes: int

    def load(self, cfg) -> tuple[Split, Split, int]:
        import torchvision

        if cfg.root is None:
            raise DataError(f"data.root is not set: point it at a {self.name} root (torchvision layout)")
        cls = torchvision.datasets.CIFAR10 if self.classes == 10 else torchvision.datasets.CIFAR100
        splits = []
        for train in (True, False):
            try:
                ds = cls(cfg.root, train=train, download=cfg.download)
            except RuntimeError as err:
                raise DataError(f"{self.name} not found under data.root={cfg.root!r} ({err}); "
                                "fix the path or set data.download=true") from None
            except OSError as err:  # the download's: no network, no name resolution, a refused or failed transfer
                reason = getattr(err, "reason", None) or err.strerror or first_line(err)
                raise DataError(f"{self.name} could not be downloaded into data.root={cfg.root!r} ({reason}); check "
                                "the network, or download it elsewhere and point data.root at it") from None
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            splits.append(Split(images, torch.tensor(ds.targets, dtype=torch.int64)))
        return splits[0], splits[1], self.classes


@register_dataset
class Cifar10(_Cifar):
    """CIFAR-10: 50,000 + 10,000 32x32 colour images of 10 classes (torchvision layout under data.root)."""

    name, classes = "cifar10", 10


@register_dataset
class Cifar100(_Cifar):
    """CIFAR-100: 50,000 + 10,000 32x32 colour images of 100 classes (torchvision layout under data.root)."""

    name, classes = "cifar100", 100


@register_dataset
class ImageFolder(DataSource):
    """Your own images: data.root/train/<class>/* and test/<class>/* (or a .tar.gz of that tree)."""

    name = "imagefolder"
    streams = True

    def load(self, cfg) -> tuple[Split, Split, int]:
        return imagefolder_splits(cfg)

    def identity(self, cfg) -> tuple[str, str]:
        if not cfg.root:
            return super().identity(cfg)
        root = Path(cfg.root).resolve()
        return root.name.removesuffix(".tar.gz"), str(root)


@register_dataset
class Synthetic(DataSource):
    """LW-KD's synthesized digit-glyph classes, rendered in memory as data.synthetic describes them."""

    name = "synthetic"
    plain = True

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.root is not None:
            raise ValueError("the synthetic dataset has no root: set data.synthetic.classes / size / per_class "
                             "(e.g. data.synthetic.size=8) and remove data.root")

    def load(self, cfg) -> tuple[Split, Split, int]:
        spec = cfg.synthetic
        (train_x, train_y), (test_x, test_y) = synthetic.make_splits(spec.classes, spec.size, spec.per_class,
                                                                     spec.seed)
        return Split(train_x, train_y), Split(test_x, test_y), spec.classes

    def normalization(self, cfg, train: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed, so LW-KD scales its fresh draws exactly as the teacher was trained."""
        return (torch.full((synthetic.CHANNELS,), synthetic.MEAN),
                torch.full((synthetic.CHANNELS,), synthetic.STD))

    def identity(self, cfg) -> tuple[str, str]:
        return "synthetic", f"synthetic:{cfg.root}"

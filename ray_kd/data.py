"""Datasets as uint8 tensors in memory, and the seeded batches every worker draws alike.

Every worker loads the dataset itself and draws the *same* batch at each step
from a permutation seeded by (seed, epoch), with augmentation drawn from the
same generator, so no image ever travels between workers. Small datasets are
decoded once and cached as one tensor file. Sets larger than memory, or of mixed
image sizes, stream from disk instead (`data.mode=stream`, `ray_kd.streaming`),
behind the same `load_dataset` (ray_kd.datasets) / `seeded_batches` / `eval_batches`.

Which data a run reads, and how each kind loads, is `ray_kd.data_sources`' (the registry of `data.dataset`);
this module holds what they share. `cfg` here is a run's `data:` section (`ray_kd.config.DataConfig`), not
imported: the config validates `data.dataset` through `ray_kd.data_sources`, which builds on this module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ray_kd.checkpoint import atomic_save
from ray_kd.errors import UserError, first_line


class DataError(UserError, ValueError):
    """The data root is missing, empty or not in a layout we read."""


@dataclass
class Split:
    images: torch.Tensor  # N x C x H x W, uint8
    labels: torch.Tensor  # N, int64


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: torch.Tensor  # C, of the training images in [0, 1]
    std: torch.Tensor
    augment: str  # "none" | "crop_flip"

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)


def as_arrays(data: Dataset) -> Dataset:
    """The dataset with numpy arrays in place of its tensors: Ray's object store keeps numpy arrays once per
    node and every worker there maps them without a copy (a tensor would be copied into each worker)."""
    return _converted(data, lambda t: t.numpy())


def from_arrays(data: Dataset) -> Dataset:
    """`as_arrays` undone, sharing the arrays' memory (read-only: nothing writes a dataset in place)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return _converted(data, torch.from_numpy)


def _converted(data: Dataset, convert: Callable) -> Dataset:
    """`data` with `convert` applied to every array it holds (images, labels, mean, std)."""
    split = lambda s: Split(convert(s.images), convert(s.labels))  # noqa: E731
    return replace(data, train=split(data.train), val=split(data.val), test=split(data.test),
                   mean=convert(data.mean), std=convert(data.std))


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W -> float, per-channel standardised."""
    x = images.float().div_(255)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def train_val_indices(labels: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the training set's items train and which validate (`val_fraction`, then `train_subset`):
    the same indices for the in-memory and the streaming path, since both list a folder alike.

    Kept in `data.cache_dir` under the labels' content and the two settings: scikit-learn's import alone
    takes seconds of every run's start, and the split it gives for them never changes."""
    key = (hashlib.sha256(labels.numpy().tobytes()).hexdigest(), cfg.val_fraction, cfg.train_subset)
    cache = Path(cfg.cache_dir) / f"split-{digest(repr(key))}.pt"
    try:
        kept = torch.load(cache, weights_only=True)
        return kept["keep"], kept["held"]
    except Exception:  # none yet, or unreadable (torch.load has many ways to fail): compute it again
        pass
    keep, held = _stratified_indices(labels, cfg.val_fraction, f"data.val_fraction={cfg.val_fraction}")
    if cfg.train_subset is not None and cfg.train_subset < len(keep):
        kept, _ = _stratified_indices(labels[keep], 1 - cfg.train_subset / len(keep),
                                      f"data.train_subset={cfg.train_subset}")
        keep = keep[kept]
    atomic_save({"keep": keep, "held": held}, cache)
    return keep, held


def normalization(cfg, channels: int,
                  training_images: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean/std `data.normalize` asks for; `training_images()` (uint8, N x C x H x W) gives
    the images to measure when it asks for the dataset's own."""
    if cfg.normalize == "dataset":
        x = training_images().float().div(255)
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.normalize == "imagenet" else cfg.normalize
    if len(mean) != channels:
        raise DataError(f"data.normalize gives {len(mean)} channels but the images have {channels}; "
                        "give one mean and std per channel, or use data.normalize=dataset")
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _stratified_indices(labels: torch.Tensor, fraction: float,
                        setting: str = "the split") -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out `fraction` of each class, always with the same seed, so val never moves.

    Both parts need an image of every class; if not, one line names the `setting` that asked for it."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    try:
        keep, held = train_test_split(idx, test_size=fraction, stratify=labels.numpy(), random_state=0)
    except ValueError as err:
        raise DataError(f"{setting} cannot split {len(idx)} training images so both parts hold every class "
                        f"({err}); change {setting.split('=')[0]}") from None
    return torch.from_numpy(np.sort(keep)), torch.from_numpy(np.sort(held))


def stratified_split(split: Split, fraction: float) -> tuple[Split, Split]:
    keep, held = _stratified_indices(split.labels, fraction)
    return Split(split.images[keep], split.labels[keep]), Split(split.images[held], split.labels[held])


CACHE_VERSION = 2
"""Bump when the decoded form changes: old cache files are then never read."""


def imagefolder_splits(cfg) -> tuple[Split, Split, int]:
    """`root/train/<class>/*` and `root/test/<class>/*` (a .tar.gz of that tree is unpacked first).

    The decoded tensors are cached under a key made of the class folders and every file's `files_identity`
    (and the cache version and `bad_images`), so adding, removing, replacing or moving an image decodes again;
    for an archive, of the archive's path, size and mtime (listing 60,000 files costs seconds)."""
    root = imagefolder_root(cfg)
    if Path(cfg.root).is_file():  # an unpacked archive changes only with the archive: no walk of its files
        files, manifest = None, [CACHE_VERSION, cfg.bad_images, archive_identity(Path(cfg.root))]
    else:
        files = _split_files(root)
        paths = [f for split in files.values() for names in split.values() for f in names]
        manifest = [CACHE_VERSION, cfg.bad_images, list(files["train"]), files_identity(paths, root)]
    cache = Path(cfg.cache_dir) / f"imagefolder-{digest(repr(manifest))}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
    else:
        files = files or _split_files(root)
        blob = {name: _decode_folder(root / name, files[name], cfg.bad_images) for name in ("train", "test")}
        atomic_save(blob, cache)
    for name in ("train", "test"):
        _warn_skipped(root / name, "unreadable images", blob[name]["unreadable"])
    num_classes = len(blob["train"]["classes"])
    return (Split(blob["train"]["images"], blob["train"]["labels"]),
            Split(blob["test"]["images"], blob["test"]["labels"]), num_classes)


SAMPLE_BYTES = 4096
"""Of each file's start and of its end, what `files_identity` digests (the whole of a smaller file)."""


def files_identity(paths: list[Path], root: Path) -> str:
    """A digest of every file's path under `root`, size, mtime_ns and a sample of its content (its first and last
    `SAMPLE_BYTES`): what the decoded ImageFolder cache and a streamed set's `content_digest` are keyed by.

    Why that is enough: writing a file in place sets its mtime (only a deliberate reset such as `touch -d` or
    `cp -p` keeps it), and a file moved to another path (two class folders swapped) brings its own size, mtime and
    bytes to that path; the content sample catches what a reset mtime and an equal size would hide, unless two
    compressed images also share their first and last 4 KB. Reading every byte of a large set at each start would
    cost minutes; this costs a stat and two small reads per file, done by a few threads."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path: Path) -> bytes:
        with open(path, "rb") as f:
            size, mtime = os.fstat(f.fileno()).st_size, os.fstat(f.fileno()).st_mtime_ns
            head = f.read(SAMPLE_BYTES)
            if size > 2 * SAMPLE_BYTES:
                f.seek(-SAMPLE_BYTES, os.SEEK_END)
            tail = f.read(SAMPLE_BYTES)
        sample = hashlib.blake2b(head + tail, digest_size=16).hexdigest()
        return f"{os.path.relpath(path, root)}|{size}|{mtime}|{sample}\n".encode()

    h = hashlib.sha256()
    with ThreadPoolExecutor(8) as pool:
        for line in pool.map(one, paths):
            h.update(line)
    return h.hexdigest()[:20]


def content_digest(data) -> str:
    """A digest of the content a run's batches are made of: of every split's decoded images and labels for a set
    in memory (exact), of every listed file's `files_identity` and its label for a streamed one."""
    h = hashlib.sha256()
    for split in (data.train, data.val, data.test):
        if hasattr(split, "images"):
            h.update(np.ascontiguousarray(np.asarray(split.images)))
        else:
            paths = [Path(os.fsdecode(f)) for f in split.files]
            h.update(files_identity(paths, Path("/")).encode())
        h.update(np.ascontiguousarray(np.asarray(split.labels)))
    return h.hexdigest()[:20]


def _split_files(root: Path) -> dict[str, dict[str, list[Path]]]:
    """train/ and test/'s image files by class folder; both must hold the same classes."""
    files = {name: _class_files(root / name) for name in ("train", "test")}
    if list(files["train"]) != list(files["test"]):
        raise DataError(f"{root}: train/ and test/ hold different class folders")
    return files


def imagefolder_root(cfg) -> Path:
    """The folder holding train/ and test/ for `data.root` (a .tar.gz is unpacked once into the cache)."""
    if cfg.root is None:
        raise DataError("data.root is not set: point it at a folder with train/<class>/ and test/<class>/")
    root = Path(cfg.root)
    if not root.exists():
        raise DataError(f"data.root {root} does not exist")
    if root.is_file():
        root = _unpack(root, Path(cfg.cache_dir))
    return _find_split_parent(root)


def list_image_folder(folder: Path) -> tuple[list[str], list[Path], list[int]]:
    """Class names (sorted), image files (sorted within each class) and their labels."""
    files = _class_files(folder)
    paths = [f for name in files for f in files[name]]
    labels = [label for label, name in enumerate(files) for _ in files[name]]
    return list(files), paths, labels


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """{class: its image files}, sorted. Hidden entries (.DS_Store) are not data; files PIL names no format
    for (README.txt) are skipped with a count; a class folder without images is refused."""
    from PIL import Image

    extensions = Image.registered_extensions()
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} holds no class folders")
    files, skipped = {}, []
    for name in classes:
        entries = sorted(f for f in (folder / name).iterdir() if f.is_file() and not f.name.startswith("."))
        files[name] = [f for f in entries if f.suffix.lower() in extensions]
        skipped += [f.name for f in entries if f.suffix.lower() not in extensions]
        if not files[name]:
            raise DataError(f"class folder {folder / name} holds no images; add images or remove it")
    _warn_skipped(folder, "files that are not images", skipped)
    return files


def _warn_skipped(folder: Path, what: str, names: list[str]) -> None:
    if names:
        print(f"ray-kd: warning: {folder}: skipped {len(names)} {what} (e.g. {names[0]})", file=sys.stderr, flush=True)


def _find_split_parent(root: Path) -> Path:
    """The folder holding train/ and test/: the root itself or its single subfolder (as tarballs often have)."""
    for candidate in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise DataError(f"{root} has no train/ and test/ folders of class subfolders (ImageFolder layout)")


def _decode_folder(folder: Path, files: dict[str, list[Path]], bad_images: str) -> dict:
    """Decode every image of every class; an image that does not decode stops the load naming it (or is
    skipped and counted, with `bad_images=skip`)."""
    from PIL import Image, UnidentifiedImageError

    images, labels, unreadable = [], [], []
    for label, name in enumerate(files):
        count = 0
        for file in files[name]:
            try:
                with Image.open(file) as img:
                    images.append(np.asarray(img.convert("RGB")))
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                if bad_images == "error":
                    raise DataError(f"{file} is not a readable image ({type(err).__name__}: {err}); remove it, "
                                    "or set data.bad_images=skip to train without it") from None
                unreadable.append(str(file.relative_to(folder)))
                continue
            labels.append(label)
            count += 1
        if count == 0:
            raise DataError(f"class folder {folder / name} holds no readable images; add images or remove it")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"{folder}: images differ in size ({sorted(shapes)[:3]}...); resize them to one size "
                        "first, or read them with data.mode=stream")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return {"images": stacked, "labels": torch.tensor(labels, dtype=torch.int64), "classes": list(files),
            "unreadable": unreadable}


def _unpack(archive: Path, cache_dir: Path) -> Path:
    """Unpack once into the cache (keyed by the archive's path, size and mtime); the partial folder of a
    failed or interrupted unpack is removed on every exit path."""
    target = cache_dir / f"unpacked-{digest(repr(archive_identity(archive)))}"
    if (target / ".complete").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise DataError(f"{archive} is not a readable .tar.gz ({type(err).__name__}: {first_line(err).rstrip(':')}); "
                            "copy it again or point data.root at the unpacked folder") from None
        (tmp / ".complete").touch()
        if not target.exists():
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def archive_identity(archive: Path) -> tuple[str, int, int]:
    """What an archive's unpacked copy and its decoded cache are keyed by: its path, size and mtime."""
    st = archive.stat()
    return str(archive.resolve()), st.st_size, st.st_mtime_ns


def digest(text: str) -> str:
    """A short stable name for a cache file keyed by `text`."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def epoch_order(n: int, seed: int, epoch: int) -> tuple[torch.Generator, torch.Tensor]:
    """The epoch's permutation of the training set, and the generator that drew it (memory mode draws
    its augmentation from it next); both paths visit the training images in this order."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return gen, torch.randperm(n, generator=gen)


def epoch_steps(dataset, batch_size: int, max_steps: int | None = None) -> int:
    """How many batches `seeded_batches` yields per epoch (the last one may be short)."""
    steps = (len(dataset.train.labels) + batch_size - 1) // batch_size
    return steps if max_steps is None else min(steps, max_steps)


def seeded_batches(dataset, batch_size: int, seed: int, epoch: int, max_steps: int | None = None,
                   part: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's batches, normalised and augmented, identical on every worker with the same (seed, epoch).

    `part` = (r, R): a stream dataset reads only shard r of R of each batch (`torch.tensor_split`'s, with the
    same pixels: each sample's augmentation is seeded by its index); in memory the whole batch is drawn (its
    augmentation is one draw per batch) and the caller takes its shard."""
    if not isinstance(dataset, Dataset):  # a StreamDataset reads them from disk
        yield from dataset.train_batches(batch_size, seed, epoch, max_steps, part)
        return
    gen, order = epoch_order(len(dataset.train.labels), seed, epoch)
    for step in range(epoch_steps(dataset, batch_size, max_steps)):
        idx = order[step * batch_size:(step + 1) * batch_size]
        images = dataset.train.images[idx]
        if dataset.augment == "crop_flip":
            images = _crop_flip(images, gen)
        yield dataset.normalize(images), dataset.train.labels[idx]


def _crop_flip(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding, and a random horizontal flip: the standard CIFAR augmentation."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h))  # b x h
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w))  # b x w
    cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
    out = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(images.shape[1]).view(1, -1, 1, 1),
                 rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
    return out


def eval_batches(split, dataset, batch_size: int = 512) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if not isinstance(dataset, Dataset):  # a StreamDataset reads them from disk
        yield from dataset.eval_batches(split)
        return
    for start in range(0, len(split.labels), batch_size):
        yield dataset.normalize(split.images[start:start + batch_size]), split.labels[start:start + batch_size]


def raw_eval_batches(split, dataset, batch_size: int = 512) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`eval_batches` before normalisation: uint8 images as the data source yields them, what the shipped model
    (`ray_kd.deliverable`) takes."""
    if not isinstance(dataset, Dataset):
        yield from dataset.raw_eval_batches(split, batch_size)
        return
    for start in range(0, len(split.labels), batch_size):
        yield split.images[start:start + batch_size], split.labels[start:start + batch_size]


class BatchChecksum:
    """A running crc32 of the batches a role drew (`data.checksum`): equal on every role only if every role
    saw the same pixels and labels in the same order. Costs one pass over each batch's bytes."""

    def __init__(self):
        self.value = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for t in (x, y):
            self.value = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), self.value)

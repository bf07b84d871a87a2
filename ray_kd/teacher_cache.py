"""A frozen teacher's outputs kept in a folder or an object store (`teacher.cache`), so a later run, seed or
sweep trial reads them.

A frozen teacher's output for a step depends only on its weights and that step's batch, and the batch is fixed by
the data, its augmentation, the batch size, the seed, the epoch and the step. The cache's key hashes all of
those that the step's address (epoch, step, replica) does not name, so a changed teacher file, dataset, split,
augmentation, batch size, seed, precision or replica count finds a folder of its own and never stale entries.
The data is keyed by its content (`ray_kd.data.content_digest`): images overwritten in place under the same names,
or two class folders swapped, are other data.
What the key leaves out: the method's params (a frozen teacher's forward does not read them), so every trial
of a sweep over temperatures and weights, and KD and KD+SKD, share one teacher's outputs.

Entries are chunks of `CHUNK` steps, each written whole (through a temporary file and a rename in a folder; an
object appears whole in a store), so concurrent trials with one key never read half a file. Each chunk carries the
sha256 of its bytes (`seal`): torch.load does not check a zip's CRCs, so a flipped byte would otherwise load. A
chunk whose digest does not match, that does not load, or that holds an inf or NaN is corrupt: it is computed
again, and the epoch's line on the driver's console counts it (`teacher/cache_corrupt`).
With the cache on, the students always train on the stored values (`cache_dtype`, and the top-k), on the run
that writes them as on every run that reads them, so those runs compute the same numbers; with float32 and no
top-k those are the numbers of a run without the cache.

`cache_topk: k` keeps the k largest logits of each image (values and class indices) and gives every other
class a logit 1e6 below the row's largest: its probability is 0 at any temperature up to 1000, so the soft
target is the teacher's distribution renormalised over its top k.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings

import torch

from ray_kd.methods import Outputs
from ray_kd.storage import folder

CHUNK = 64
"""Steps per file: ImageNet's 5,005 steps of 256 make 79 files an epoch instead of 5,005."""
FILL_BELOW = 1e6
"""How far below a row's largest logit a class outside the top k is put."""
CACHE_NEEDS_FROZEN = ("config error: teacher.cache keeps a frozen teacher's outputs, but {method}'s teacher trains "
                      "(a bridge, heads, or BN in train mode): remove teacher.cache")
SEAL = b"ray-kd teacher.cache chunk sha256\n"
"""What a chunk file starts with, before the sha256 of the rest."""


def seal(payload: bytes) -> bytes:
    """A chunk file: `SEAL`, the sha256 of `payload`, then `payload`."""
    return SEAL + hashlib.sha256(payload).digest() + payload


def unseal(data: bytes) -> bytes | None:
    """The payload of a chunk file, or None when it is not one or its digest does not match (a changed byte)."""
    head, digest, payload = data[:len(SEAL)], data[len(SEAL):len(SEAL) + 32], data[len(SEAL) + 32:]
    return payload if head == SEAL and hashlib.sha256(payload).digest() == digest else None


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A digest of a module's weights and buffers (the loaded teacher, whatever file or factory it came from)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if isinstance(tensor, torch.nn.parameter.UninitializedParameter):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


DTYPES = {"float16": torch.float16, "float32": torch.float32}


def bytes_per_image(classes: int, topk: int | None, dtype: str = "float16") -> int:
    """The logits, or the top-k values and their int16 (int32 past 32,767 classes) indices."""
    size = DTYPES[dtype].itemsize
    if topk is None:
        return size * classes
    return topk * (size + (2 if classes <= 32767 else 4))


def describe_size(images: int, classes: int, topk: int | None, epochs: int, dtype: str = "float16") -> str:
    """What the cache holds per epoch and per run, for the line printed before the first epoch."""
    per_epoch = images * bytes_per_image(classes, topk, dtype)
    short = dtype.replace("float", "fp")
    what = f"top-{topk} logits ({short} values, int indices)" if topk else f"{short} logits"
    return (f"{_size(per_epoch)} per epoch of {what} for {images:,} images x {classes:,} classes, "
            f"{_size(per_epoch * epochs)} for {epochs} epochs")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


def cache_key(cfg, runner, dataset, replicas: int) -> dict:
    """Everything a frozen teacher's output for (epoch, step, replica) depends on, besides those three (as JSON
    holds it: what the folder's key.json shows is what its name digests)."""
    from ray_kd.data import content_digest
    from ray_kd.data_sources import dataset_identity

    spec = cfg.teacher
    data = cfg.data.model_dump(exclude={"workers", "cache_dir", "checksum", "download", "root"})
    return json.loads(json.dumps({"format": 2,
            "teacher": {"model": spec.model, "model_kwargs": spec.model_kwargs, "stages": spec.stages,
                        "replace_head": spec.replace_head, "module": type(runner.net).__qualname__,
                        "weights": weights_digest(runner.state_dict()["net"])},
            "data": {"identity": dataset_identity(cfg.data, dataset)[3], "content": content_digest(dataset), **data},
            "seed": cfg.seed, "steps_per_epoch": cfg.optim.steps_per_epoch, "replicas": replicas,
            "precision": {"amp": cfg.optim.amp, "channels_last": cfg.runtime.channels_last,
                          "fold_frozen_batchnorm": cfg.runtime.fold_frozen_batchnorm},
            "dtype": cfg.teacher.cache_dtype, "topk": cfg.teacher.cache_topk}, default=str))


def _finite(entries: dict[int, dict]) -> bool:
    """Every stored value finite: an inf or NaN read back is a corrupt chunk (a teacher that computes one is
    not stored)."""
    def values(stored) -> torch.Tensor:
        return stored["values"] if isinstance(stored, dict) else stored

    return all(torch.isfinite(values(stored)).all() for entry in entries.values() for stored in entry.values())


class TeacherCache:
    """One teacher's stored outputs under one key; `get` and `put` per training step, `flush` at an epoch's end."""

    def __init__(self, root: str, key: dict, steps_per_epoch: int, replica: tuple[int, int] = (0, 1),
                 topk: int | None = None, dtype: str = "float16"):
        self.store = folder(str(root), key_digest(key))
        if self.store.read_bytes("key.json") is None:  # what the entries were made from, for a person reading them
            self.store.write_bytes("key.json", json.dumps(key, indent=1).encode())
        self.steps_per_epoch, self.topk, self.dtype = steps_per_epoch, topk, DTYPES[dtype]
        self.shard = f"r{replica[0]}of{replica[1]}"
        self.hits = self.misses = 0
        self.corrupt = 0  # chunks found corrupt and computed again, since the count was last taken
        self.writable = True
        self._scores: dict[str, dict[str, float]] | None = None  # the teacher's, as stored (read once)
        self._loaded: tuple[int, int] | None = None
        self._entries: dict[int, dict] = {}  # the loaded chunk's steps
        self._pending: dict[int, dict] = {}  # steps computed this epoch, not written yet
        self._pending_chunk: tuple[int, int] | None = None

    def _name(self, epoch: int, chunk: int) -> str:
        return f"e{epoch:04d}/{self.shard}-c{chunk:05d}.pt"

    def _steps(self, chunk: int) -> range:
        """The steps a chunk holds (the epoch's last one may hold fewer)."""
        return range(chunk * CHUNK, min((chunk + 1) * CHUNK, self.steps_per_epoch))

    def get(self, epoch: int, step: int, device: torch.device) -> Outputs | None:
        """The stored outputs of (epoch, step) as the students see them, or None (a miss: `put` them)."""
        chunk = (epoch, step // CHUNK)
        if self._loaded != chunk:
            self._loaded, self._entries = chunk, self._read(*chunk)
        entry = self._entries.get(step)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return self._decode(entry, device)

    def put(self, epoch: int, step: int, published: Outputs) -> Outputs:
        """Keep a computed step; returns it as stored, which is what the students get on this run as on a
        later one that reads it."""
        chunk = (epoch, step // CHUNK)
        if self._pending_chunk != chunk:
            self.flush()
            self._pending_chunk = chunk
        entry = self._encode(published)
        self._pending[step] = entry
        if len(self._pending) == len(self._steps(chunk[1])):
            self.flush()
        return self._decode(entry, next(iter(published.values())).device)

    def flush(self) -> None:
        """Write the pending chunk if it is whole (a run stopped mid-chunk leaves it to be computed again)."""
        if self._pending_chunk is not None:
            epoch, chunk = self._pending_chunk
            if self.writable and sorted(self._pending) == list(self._steps(chunk)) and _finite(self._pending):
                self._write(self._name(epoch, chunk))
        self._pending, self._pending_chunk = {}, None

    def _write(self, name: str) -> None:
        """One chunk, whole or not at all; a cache that cannot be written (a full disk) is not worth a run: one
        warning, and the run goes on computing what it does not find."""
        try:
            buffer = io.BytesIO()
            torch.save(self._pending, buffer)
            self.store.write_bytes(name, seal(buffer.getvalue()))
        except OSError as err:
            self.writable = False
            warnings.warn(f"teacher.cache: cannot write {self.store.show(name)} ({err.strerror or err}); this run "
                          "stores nothing more there and goes on", stacklevel=3)

    def _read(self, epoch: int, chunk: int) -> dict[int, dict]:
        """The chunk's steps; {} when it is not there, or when it is corrupt (then deleted, and counted)."""
        name = self._name(epoch, chunk)
        data = self.store.read_bytes(name)
        if data is None:
            return {}
        payload = unseal(data)
        try:
            entries = None if payload is None else torch.load(io.BytesIO(payload), weights_only=True)
        except Exception:  # noqa: BLE001 - a payload whose digest matched yet does not load (another writer's)
            entries = None
        if not isinstance(entries, dict) or not _finite(entries):
            self.corrupt += 1
            self.store.delete(name)
            return {}
        return entries

    def _encode(self, published: Outputs) -> dict:
        entry = {}
        for name, tensor in published.items():
            tensor = tensor.detach()
            if self.topk is not None and name == "logits":
                values, indices = tensor.topk(self.topk, dim=1)
                index_dtype = torch.int16 if tensor.shape[1] <= 32767 else torch.int32
                entry[name] = {"values": values.to(self.dtype).cpu(), "indices": indices.to(index_dtype).cpu(),
                               "classes": tensor.shape[1]}
            else:
                entry[name] = tensor.to(self.dtype).cpu()
        return entry

    @staticmethod
    def _decode(entry: dict, device: torch.device) -> Outputs:
        out = {}
        for name, stored in entry.items():
            if isinstance(stored, dict):  # top-k: the rest of the classes far below
                values = stored["values"].float()
                dense = (values[:, :1] - FILL_BELOW).expand(-1, stored["classes"]).clone()
                out[name] = dense.scatter_(1, stored["indices"].long(), values).to(device)
            else:
                out[name] = stored.float().to(device)
        return out

    # --- a frozen teacher's scores (val/test top-1), which every run with this key scores alike -----------
    def scores(self) -> dict[str, dict[str, float]]:
        """The stored scores ({} when none are), read once."""
        if self._scores is None:
            try:
                self._scores = json.loads(self.store.read_bytes("scores.json") or b"{}")
            except (OSError, ValueError):
                self._scores = {}
        return self._scores

    def keep_scores(self, done: dict[str, dict[str, float]]) -> None:
        self.store.write_bytes("scores.json", json.dumps(done).encode())
        self._scores = json.loads(json.dumps(done))

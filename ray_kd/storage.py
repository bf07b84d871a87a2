"""Files on an object store (s3://, gs://, abfs://, hdfs://: what pyarrow.fs opens): a run folder, a teacher cache.

A run folder (`output_dir: s3://bucket/prefix`): every process works on a local mirror of it
(`RunConfig.run_dir`, plain files as for a local output_dir), and the store holds the truth:
- Checkpoints: each rank uploads its own roles' files of an epoch straight to the store; once every rank has
  (the group's barrier), rank 0 uploads the epoch's `history.json`, which publishes it (an object store has no
  folder rename). A process reads checkpoints through its mirror, downloaded when first asked for, so a run
  resumes on whichever node or machine its ranks land on.
- The driver's own files (fingerprint, MLflow run marker, wall time, summary, best student, plot) are pulled
  when a run starts and pushed as they change.
The run lock stays local: it stops one machine from running a name twice, not two machines sharing a store.

`folder(location)` gives a local folder or a store's the same few whole-file operations, for what reads and
writes files by name (`teacher.cache`).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from pyarrow import fs

from ray_kd.checkpoint import FolderStore, atomic_write, atomic_write_json, read_history
from ray_kd.config import RunConfig, shown_uri, uri_scheme
from ray_kd.errors import UserError, first_line

PUBLISHED = "history.json"
"""Uploaded last, once every rank's files of the epoch are in: an epoch folder without it is not a checkpoint."""
MIRROR_STATE = ".remote.json"
"""In each mirrored epoch folder: the store's size and mtime of every file when it was downloaded."""


class StorageError(UserError, RuntimeError):
    """The object store behind output_dir cannot be opened, read or written."""


class LocalFolder:
    """A local folder with RemoteFolder's whole-file operations: a file is written through a temporary name and a
    rename, so a reader never sees half of it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.shown = str(self.root)

    def show(self, rel: str) -> str:
        return str(self.root / rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write(self.root / rel, lambda tmp: tmp.write_bytes(data))

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None when there is no such file."""
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)


class RemoteFolder:
    """One folder of an object store: `uri` (credentials and options included) and `sub` below it."""

    def __init__(self, uri: str, sub: str = ""):
        self.shown = shown_uri(uri).rstrip("/") + (f"/{sub}" if sub else "")
        try:
            self.fs, base = fs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as err:
            raise StorageError(f"{shown_uri(uri)} cannot be opened ({first_line(err)}); check the URI, its "
                               "credentials and that the store is reachable") from None
        self.base = f"{base.rstrip('/')}/{sub}" if sub else base.rstrip("/")

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def show(self, rel: str) -> str:
        return f"{self.shown}/{rel}"

    def read_bytes(self, rel: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as src:
                return src.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self.path(rel)) as out:  # an object appears whole when the stream closes
            out.write(data)

    def download(self, rel: str, local: Path) -> None:
        """Copy one file to `local` through a temporary name, so a local file is always whole."""
        def copy(tmp: Path) -> None:
            with self.fs.open_input_stream(self.path(rel)) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)

        atomic_write(local, copy)

    def files(self, rel: str = "", recursive: bool = False) -> dict[str, tuple[int, float]]:
        """{path relative to `rel`: (size, mtime)} of the files under `rel` ({} when it does not exist)."""
        root = self.path(rel)
        infos = self.fs.get_file_info(fs.FileSelector(root, allow_not_found=True, recursive=recursive))
        return {i.path[len(root) + 1:]: (i.size, i.mtime.timestamp() if i.mtime else 0.0)
                for i in infos if i.type == fs.FileType.File}

    def folders(self, rel: str = "") -> list[str]:
        infos = self.fs.get_file_info(fs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == fs.FileType.Directory)

    def delete(self, rel: str) -> None:
        if self.fs.get_file_info(self.path(rel)).type == fs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def delete_folder(self, rel: str) -> None:
        if self.fs.get_file_info(self.path(rel)).type == fs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))


def folder(location: str, sub: str = "") -> LocalFolder | RemoteFolder:
    """`sub` under `location`: a local path or file:// URI's folder (as `local_storage_path` resolved it), or an
    object store's."""
    if uri_scheme(location) in (None, "file"):
        return LocalFolder(Path(location) / sub)
    return RemoteFolder(location, sub)


def check_writable(location: str, field: str) -> None:
    """The preflight's check of a store: write and delete one object there; one line naming `field` if that fails."""
    store = folder(location)
    try:
        store.write_bytes(".ray-kd-write-test", b"")
        store.delete(".ray-kd-write-test")
    except OSError as err:
        raise StorageError(f"{field}={store.shown} cannot be written ({first_line(err)}); check the bucket, its "
                           "credentials (the store's usual environment variables or the URI) and its "
                           "permissions") from None


def run_folder_remote(cfg: RunConfig) -> RemoteFolder:
    return RemoteFolder(cfg.output_dir, cfg.name)


class RemoteCheckpoints(FolderStore):
    """FolderStore's `epoch_NNNN/` checkpoints kept in an object store, read through the local mirror `root`."""

    def __init__(self, remote: RemoteFolder, root: Path, role_names: list[str], keep: int = 2, rank: int = 0,
                 barrier: Callable[[], None] = lambda: None):
        super().__init__(root, role_names, keep, rank, barrier)
        self.remote = remote

    def folders(self) -> list[Path]:
        """The published epochs, oldest first, each mirrored locally (a file the store changed is fetched again);
        mirrored epochs the store no longer has are dropped."""
        published = self._published()
        for name, listed in published.items():
            self._mirror(name, listed)
        for stale in {p.name for p in super().folders()} - set(published):
            shutil.rmtree(self.root / stale, ignore_errors=True)
        return [self.root / name for name in published]

    def latest_history(self) -> list:
        """The newest published epoch's history, fetching only that file (the driver polls it for progress)."""
        published = self._published()
        if not published:
            return []
        name, listed = list(published.items())[-1]
        self._mirror(name, {PUBLISHED: listed[PUBLISHED]}, whole=False)
        return read_history(self.root / name)

    def _published(self) -> dict[str, dict[str, tuple[int, float]]]:
        """{epoch folder: {file: (size, mtime)}} of the published epochs, oldest first: one listing."""
        epochs: dict[str, dict[str, tuple[int, float]]] = {}
        for rel, info in self.remote.files(recursive=True).items():
            epoch, _, file = rel.partition("/")
            if epoch.startswith("epoch_") and file:
                epochs.setdefault(epoch, {})[file] = info
        return {name: epochs[name] for name in sorted(epochs) if PUBLISHED in epochs[name]}

    def _mirror(self, name: str, listed: dict[str, tuple[int, float]], whole: bool = True) -> None:
        """Fetch the files of `listed` the mirror lacks or holds in another version; `whole`: it is every file
        of the epoch, so a mirrored file the store no longer has goes."""
        local = self.root / name
        try:
            have = json.loads((local / MIRROR_STATE).read_text())
        except (OSError, ValueError):
            have = {}
        for rel, info in listed.items():
            if have.get(rel) != list(info) or not (local / rel).is_file():
                self.remote.download(f"{name}/{rel}", local / rel)
                have[rel] = list(info)
        for extra in set(have) - set(listed) if whole else ():
            (local / extra).unlink(missing_ok=True)
            del have[extra]
        atomic_write_json(have, local / MIRROR_STATE)

    def save(self, session, history: list) -> None:
        name = f"epoch_{len(history):04d}"
        if self.rank == 0:  # the same epoch again, after a resume from the one before: unpublish it first
            self.remote.delete(f"{name}/{PUBLISHED}")
        self.barrier()
        for role, state in session.role_states().items():
            buffer = io.BytesIO()
            torch.save(state, buffer)
            self.remote.write_bytes(f"{name}/{role}.pt", buffer.getvalue())
        self.barrier()
        if self.rank != 0:
            return
        self.remote.write_bytes(f"{name}/{PUBLISHED}", json.dumps(history).encode())
        done = [n for n in self.remote.folders() if n.startswith("epoch_") and n <= name]
        for old in done[:-self.keep]:
            self.remote.delete_folder(old)


DRIVER_FILES_SKIPPED = ("run.lock",)


def pull(cfg: RunConfig) -> None:
    """Make the mirror's own files (not its checkpoints or lock) those of the store, before a run starts."""
    remote, local = run_folder_remote(cfg), cfg.run_dir
    local.mkdir(parents=True, exist_ok=True)
    listed = remote.files()
    for item in local.iterdir():
        if item.is_file() and item.name not in listed and item.name not in DRIVER_FILES_SKIPPED:
            item.unlink()
    for rel in listed:
        if not rel.startswith("."):
            remote.download(rel, local / rel)


def push(cfg: RunConfig) -> None:
    """Make the store's run-folder files those of the mirror (checkpoints are uploaded by the ranks)."""
    remote, local = run_folder_remote(cfg), cfg.run_dir
    present = {p.name for p in local.iterdir() if p.is_file() and not p.name.startswith(".")
               and p.name not in DRIVER_FILES_SKIPPED}
    for rel in set(remote.files()) - present:
        if not rel.startswith("."):
            remote.delete(rel)
    for rel in sorted(present):
        remote.write_bytes(rel, (local / rel).read_bytes())


def clear(cfg: RunConfig) -> None:
    """`--restart`: the store's run folder goes too."""
    remote = run_folder_remote(cfg)
    for name in remote.folders():
        remote.delete_folder(name)
    for rel in remote.files():
        remote.delete(rel)

"""Where one run lives: its folder's every file by name, its checkpoint store, its lock and records.

A `RunStorage` is built once by the driver from the config (`RunStorage.of`) and handed to whatever reads or
writes the run folder, Ray workers included: it holds plain fields (the run's name, output_dir, role names and
how many checkpoints to keep) and opens an object store lazily in the process that uses it, keeping it open
there. No other module spells a run-folder file name.

The run folder `<output_dir>/<name>/` (for an object-store output_dir, its local mirror; the store holds the
truth, see `ray_kd.storage`):
- `run.lock`: held by the one process running the name (an OS file lock, released by the kernel when the holder
  dies); it names the holder. Local only: it stops one machine running a name twice.
- `fingerprint.json`, `mlflow_run.json`, `wall.json`: what keeps the folder to one run (see `ray_kd.run_folder`).
- `summary.json`, `best_student.pt`, `accuracy.png`: what a finished run leaves.
- `checkpoints/epoch_NNNN/`: one `<role>.pt` per role, the epoch history `history.json` (entry i is epoch i + 1)
  and `manifest.json` (every other file's size and sha256). A checkpoint is used only if its manifest matches
  and its history holds exactly NNNN epochs; otherwise the one before is (one printed line).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ray_kd.checkpoint import CheckpointError, atomic_write, atomic_write_json, safe_load
from ray_kd.config import run_folder_path, shown_uri, uri_scheme
from ray_kd.errors import UserError

if TYPE_CHECKING:
    from ray_kd.config import RunConfig
    from ray_kd.storage import RemoteFolder

LOCK = "run.lock"
FINGERPRINT = "fingerprint.json"
MLFLOW_RUN = "mlflow_run.json"
WALL = "wall.json"
SUMMARY = "summary.json"
BEST_STUDENT = "best_student.pt"
ACCURACY_PLOT = "accuracy.png"
CHECKPOINTS = "checkpoints"
EPOCH_PREFIX = "epoch_"
HISTORY = "history.json"
"""In an epoch folder; in an object store it is uploaded last, once every rank's files are in: it publishes the epoch."""
MANIFEST = "manifest.json"
"""In an epoch folder: {file: [size, sha256]} of its role files and history, written with the history."""
MIRROR_STATE = ".remote.json"
"""In each mirrored epoch folder: the store's size and mtime of every file when it was downloaded."""
DRIVER_FILES_SKIPPED = (LOCK,)
"""Run-folder files that stay local: never pushed to, pulled from or removed by the object store."""


def epoch_folder(epoch: int) -> str:
    """The name of the checkpoint folder holding epochs 1..`epoch`."""
    return f"{EPOCH_PREFIX}{epoch:04d}"


def role_file(role: str) -> str:
    return f"{role}.pt"


class RunFolderError(UserError, RuntimeError):
    """The run folder is in use, or holds a run made with another config or MLflow store."""


def read_history(folder: str | Path) -> list[dict[str, float]]:
    """A checkpoint folder's epoch history, or one line saying it is unreadable."""
    path = Path(folder) / HISTORY
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__})") from None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise CheckpointError(f"{path} is not an epoch history")
    return history


def _digest(data: bytes) -> list:
    return [len(data), hashlib.sha256(data).hexdigest()]


def _file_digest(path: Path) -> list:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return [size, digest.hexdigest()]


def verified(folder: Path, role_names: list[str]) -> tuple[dict, list]:
    """({role: state}, history) of a checkpoint folder, each file checked against the folder's manifest first (a
    file that loads can still be damaged: torch.load does not check its zip's CRCs) and the history's length
    against the folder's epoch; CheckpointError, in one line, when anything does not hold."""
    history = read_history(folder)
    epoch = int(folder.name.removeprefix(EPOCH_PREFIX))
    if len(history) != epoch or any(entry.get("epoch") != i + 1 for i, entry in enumerate(history)):
        raise CheckpointError(f"{folder / HISTORY} holds {len(history)} epochs, not the {epoch} of its folder")
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():  # a checkpoint of an earlier ray-kd has none: its history was checked above
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{manifest_path} is unreadable ({type(err).__name__})") from None
        if not isinstance(manifest, dict):
            raise CheckpointError(f"{manifest_path} is not a manifest")
        for name in [HISTORY, *map(role_file, role_names)]:
            if name not in manifest:
                raise CheckpointError(f"{folder / name} is not in its manifest")
            if not (folder / name).is_file():
                raise CheckpointError(f"checkpoint {folder / name} does not exist")
            if _file_digest(folder / name) != manifest[name]:
                raise CheckpointError(f"{folder / name} does not match its manifest (size and sha256): damaged")
    states = {name: safe_load(folder / role_file(name)) for name in role_names}
    return states, history


class EpochFolders:
    """A local run's `checkpoints/epoch_NNNN/` folders. An epoch is written into `.epoch_NNNN.tmp/` and renamed
    into place once complete, so a folder under its final name is always whole."""

    def __init__(self, root: Path):
        self.root = root

    def names(self) -> list[str]:
        """The published epochs' folder names, oldest first, without fetching anything."""
        return self.published()

    def published(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.glob(f"{EPOCH_PREFIX}*") if p.is_dir())

    def newest_history(self) -> list:
        done = self.published()
        return read_history(self.root / done[-1]) if done else []

    def unpublish(self, name: str) -> None:
        """Nothing to do: the temporary folder's files of a failed attempt are overwritten."""

    def put(self, name: str, file: str, data: bytes) -> None:
        atomic_write(self.root / f".{name}.tmp" / file, lambda tmp: tmp.write_bytes(data))

    def publish(self, name: str, files: dict[str, bytes]) -> None:
        tmp, final = self.root / f".{name}.tmp", self.root / name
        for file, data in files.items():
            self.put(name, file, data)
        if final.exists():  # the same epoch again, after a resume from the checkpoint before it
            shutil.rmtree(final)
        tmp.rename(final)

    def prune(self, newest: str, keep: int) -> None:
        for old in [n for n in self.published() if n <= newest][:-keep]:
            shutil.rmtree(self.root / old, ignore_errors=True)


class StoredEpochs(EpochFolders):
    """The epoch folders kept in an object store: each rank uploads its own files straight to the store, rank 0
    publishes the epoch with its history (an object store has no rename). Read through the local mirror `root`,
    a file fetched when first asked for or when the store's copy changed."""

    def __init__(self, remote: "RemoteFolder", root: Path):
        super().__init__(root)
        self.remote = remote

    def published(self) -> list[str]:
        """The published epochs, oldest first, each mirrored; mirrored epochs the store no longer has are dropped."""
        published = self._published()
        for name, listed in published.items():
            self._mirror(name, listed)
        for stale in set(super().published()) - set(published):
            shutil.rmtree(self.root / stale, ignore_errors=True)
        return list(published)

    def names(self) -> list[str]:
        return list(self._published())

    def newest_history(self) -> list:
        """The newest published epoch's history, fetching only that file (the driver polls it for progress)."""
        published = self._published()
        if not published:
            return []
        name, listed = list(published.items())[-1]
        self._mirror(name, {HISTORY: listed[HISTORY]}, whole=False)
        return read_history(self.root / name)

    def _published(self) -> dict[str, dict[str, tuple[int, float]]]:
        """{epoch folder: {file: (size, mtime)}} of the published epochs, oldest first: one listing."""
        epochs: dict[str, dict[str, tuple[int, float]]] = {}
        for rel, info in self.remote.files(recursive=True).items():
            epoch, _, file = rel.partition("/")
            if epoch.startswith(EPOCH_PREFIX) and file:
                epochs.setdefault(epoch, {})[file] = info
        return {name: epochs[name] for name in sorted(epochs) if HISTORY in epochs[name]}

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

    def unpublish(self, name: str) -> None:
        self.remote.delete(f"{name}/{HISTORY}")

    def put(self, name: str, file: str, data: bytes) -> None:
        self.remote.write_bytes(f"{name}/{file}", data)

    def publish(self, name: str, files: dict[str, bytes]) -> None:
        for file, data in files.items():  # the history last: it publishes the epoch
            self.put(name, file, data)

    def prune(self, newest: str, keep: int) -> None:
        done = [n for n in self.remote.folders() if n.startswith(EPOCH_PREFIX) and n <= newest]
        for old in done[:-keep]:
            self.remote.delete_folder(old)


class CheckpointStore:
    """A run's checkpoints: save (each rank its own roles' files, then rank 0 publishes the epoch with its
    manifest and history), list, the newest good one, prune to `keep`; the same on both executors, in a local
    folder or an object store (`folders`), so a run resumes on either.

    `gather(obj)` is every rank's `obj` (the group's all_gather; one rank: `[obj]`): it is the barrier between
    the ranks' files and the publication, and brings rank 0 every file's digest for the manifest."""

    def __init__(self, folders: EpochFolders, role_names: list[str], keep: int = 2, rank: int = 0,
                 gather: Callable[[object], list] = lambda obj: [obj]):
        self.epochs, self.role_names, self.keep, self.rank, self.gather = folders, role_names, keep, rank, gather

    def folders(self) -> list[Path]:
        """The published checkpoint folders (mirrored locally), oldest first."""
        return [self.epochs.root / name for name in self.epochs.published()]

    def latest(self) -> Path | None:
        done = self.folders()
        return done[-1] if done else None

    def latest_history(self) -> list:
        """The newest checkpoint's epoch history ([] before the first), unverified: for progress, not resumes."""
        return self.epochs.newest_history()

    def newest_good(self, say: Callable[[str], None] | None = None) -> tuple[Path, dict, list] | None:
        """(folder, {role: state}, history) of the newest checkpoint that verifies (see `verified`).

        A damaged newest checkpoint (a disk error, a killed copy, an edited file) falls back to the one before;
        `say` gets a line for each one passed over. Every worker checks every role's file, so all choose the
        same folder."""
        folders = self.folders()
        for folder in reversed(folders):
            try:
                return folder, *verified(folder, self.role_names)
            except CheckpointError as err:
                if say is not None:
                    say(f"checkpoint {folder} is unreadable: {err}; falling back to the one before")
        if folders:
            raise CheckpointError(f"no readable checkpoint left in {folders[0].parent}; add --restart to start the "
                                  "run over, or pick another name=")
        return None

    def restore(self, session) -> list:
        """Load the session's roles from the newest good checkpoint; returns its history ([] for none)."""
        found = self.newest_good()
        if found is None:
            return []
        _, states, history = found
        session.load_role_states(states)
        return history

    def save(self, session, history: list) -> None:
        name = epoch_folder(len(history))
        if self.rank == 0:  # the same epoch again, after a resume from the one before: unpublish it first
            self.epochs.unpublish(name)
        self.gather(None)
        digests = {}
        for role, state in session.role_states().items():
            buffer = io.BytesIO()
            torch.save(state, buffer)
            digests[role_file(role)] = _digest(buffer.getvalue())
            self.epochs.put(name, role_file(role), buffer.getvalue())
        manifest = {file: digest for part in self.gather(digests) for file, digest in part.items()}
        if self.rank != 0:
            return
        history_bytes = json.dumps(history, indent=2, sort_keys=True).encode()
        manifest[HISTORY] = _digest(history_bytes)
        self.epochs.publish(name, {MANIFEST: json.dumps(manifest, indent=2, sort_keys=True).encode(),
                                   HISTORY: history_bytes})
        self.epochs.prune(name, self.keep)


class RunStorage:
    """One run's folder and everything in it, built once by the driver (`RunStorage.of(cfg)`) and handed on:
    plain fields, so it pickles to a Ray worker, where an object store is opened when first used."""

    def __init__(self, name: str, output_dir: str, role_names: list[str], keep: int = 2):
        self.name, self.output_dir, self.role_names, self.keep = name, output_dir, list(role_names), keep
        self._remote: RemoteFolder | None = None
        self._epochs: EpochFolders | None = None

    @classmethod
    def of(cls, cfg: "RunConfig") -> "RunStorage":
        from ray_kd.roles import all_roles

        output_dir = cfg.with_absolute_paths().output_dir  # the same folder from a worker's working directory
        return cls(cfg.name, output_dir, [r.name for r in all_roles(cfg)], cfg.runtime.keep_checkpoints)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_remote": None, "_epochs": None}  # an open filesystem stays in its process

    @property
    def remote(self) -> bool:
        """output_dir is an object store: the run folder is its local mirror."""
        return uri_scheme(self.output_dir) is not None

    @property
    def run_dir(self) -> Path:
        """The run's folder on this machine: under output_dir, or the local mirror of a remote one."""
        return run_folder_path(self.output_dir, self.name)

    def where(self) -> str:
        """The run folder as messages name it: its path, or the object store it mirrors."""
        if self.remote:
            return f"{shown_uri(self.output_dir).rstrip('/')}/{self.name} (mirrored in {self.run_dir})"
        return str(self.run_dir)

    def _store(self) -> "RemoteFolder":
        if self._remote is None:
            from ray_kd.storage import RemoteFolder

            self._remote = RemoteFolder(self.output_dir, self.name)
        return self._remote

    # --- checkpoints ------------------------------------------------------------------------------------------

    def checkpoints(self, rank: int = 0, gather: Callable[[object], list] = lambda obj: [obj]) -> CheckpointStore:
        """The run's checkpoint store (a Ray rank passes its rank and the group's all_gather); the folders it
        reads, and an object store it opened, are kept for the next call."""
        if self._epochs is None:
            root = self.run_dir / CHECKPOINTS
            self._epochs = (StoredEpochs(self._store().sub(CHECKPOINTS), root) if self.remote
                            else EpochFolders(root))
        return CheckpointStore(self._epochs, self.role_names, self.keep, rank, gather)

    def newest_good(self, say: Callable[[str], None] | None = None) -> tuple[Path, list] | None:
        """(folder, history) of the checkpoint a resume starts from, or None; `say` gets a line for each damaged
        one passed over (the executors' stores make the same choice)."""
        found = self.checkpoints().newest_good(say)
        return None if found is None else (found[0], found[2])

    def role_state(self, folder: Path, role: str) -> dict:
        """A role's saved state in a checkpoint folder (its `net`, `best` student weights, ...)."""
        return safe_load(folder / role_file(role))

    # --- files of the run folder ------------------------------------------------------------------------------

    @property
    def summary_file(self) -> Path:
        return self.run_dir / SUMMARY

    @property
    def best_student_file(self) -> Path:
        return self.run_dir / BEST_STUDENT

    @property
    def plot_file(self) -> Path:
        return self.run_dir / ACCURACY_PLOT

    def write_summary(self, summary: dict) -> Path:
        atomic_write_json(summary, self.summary_file)
        return self.summary_file

    def read_summary(self) -> dict | None:
        """The finished run's summary; None when there is none or it is unreadable (the run is finished again)."""
        return _read_json(self.summary_file, dict)

    def read_fingerprint(self, who: str) -> dict | None:
        """The recorded fingerprint (None: none yet); `who` ("run x", "sweep x") is named if it is corrupt."""
        path = self.run_dir / FINGERPRINT
        if not path.is_file():
            return None
        found = _read_json(path, dict)
        if found is None:
            raise RunFolderError(f"{path} is corrupt; add --restart to start {who} over, or pick another name=")
        return found

    def stored_fingerprint(self) -> dict | None:
        """The fingerprint the run folder holds, from the object store for a remote one; None: none, or unreadable
        (a start under this name then says so)."""
        if not self.remote:
            return _read_json(self.run_dir / FINGERPRINT, dict)
        data = self._store().read_bytes(FINGERPRINT)
        try:
            found = json.loads(data) if data is not None else None
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    def has_checkpoints(self) -> bool:
        """Whether any checkpoint is published (in the object store for a remote run: nothing is fetched)."""
        return bool(self.checkpoints().epochs.names())

    def write_fingerprint(self, fingerprint: dict) -> None:
        atomic_write_json(fingerprint, self.run_dir / FINGERPRINT)

    def mlflow_run(self, who: str) -> dict | None:
        """{'run_id', 'tracking_uri'} of the MLflow run the folder records; None when it records none."""
        marker = self.run_dir / MLFLOW_RUN
        if not marker.is_file():
            return None
        found = _read_json(marker, dict)
        if found is None or not isinstance(found.get("run_id"), str) or not isinstance(found.get("tracking_uri"), str):
            raise RunFolderError(f"{marker} is corrupt; add --restart to start {who} over, or pick another name=")
        return found

    def record_mlflow_run(self, run_id: str, uri: str) -> None:
        """The store is recorded as shown (no credentials in the folder): a resume compares it with the shown form
        of the store it connects to."""
        atomic_write_json({"run_id": run_id, "tracking_uri": shown_uri(uri)}, self.run_dir / MLFLOW_RUN)

    def forget_mlflow_run(self) -> bool:
        """Drop the MLflow run marker (the next start makes a new MLflow run); whether there was one."""
        marker = self.run_dir / MLFLOW_RUN
        there = marker.is_file()
        marker.unlink(missing_ok=True)
        return there

    def wall_before(self) -> float:
        """Seconds spent by the run's earlier starts (0 for a new run, or an unreadable record)."""
        found = _read_json(self.run_dir / WALL, dict) or {}
        seconds = found.get("seconds", 0.0)
        return float(seconds) if isinstance(seconds, (int, float)) else 0.0

    def record_wall(self, seconds: float) -> None:
        atomic_write_json({"seconds": round(seconds, 3)}, self.run_dir / WALL)

    # --- the lock, restart, and the object store's copy -------------------------------------------------------

    @contextmanager
    def hold_lock(self) -> Iterator[None]:
        """Hold the run's lock while the body runs; a second start of the same name is refused in one line."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never unlinked: a waiter must lock the same inode
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunFolderError(f"run {self.name} is already running ({_read_holder(path)}; lock {path}); wait "
                                     "for it to finish or stop it, or start this one under another name=") from None
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the lock

    def discard_partial(self) -> None:
        """Remove the temporary folders of epoch saves a failure cut short (`.epoch_NNNN.tmp/`, a full disk's): once
        the workers are gone a failed run leaves only whole checkpoints."""
        for partial in (self.run_dir / CHECKPOINTS).glob(f".{EPOCH_PREFIX}*.tmp"):
            shutil.rmtree(partial, ignore_errors=True)

    def clear(self) -> None:
        """`--restart`: everything in the run folder but its lock (held by the caller) goes, in the store too."""
        for item in self.run_dir.iterdir():
            if item.name == LOCK:
                continue
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        if self.remote:
            remote = self._store()
            for name in remote.folders():
                remote.delete_folder(name)
            for rel in remote.files():
                remote.delete(rel)
        self._epochs = None
        print(f"run {self.name}: --restart cleared {self.where()}", flush=True)

    def pull(self) -> None:
        """Make the mirror's own files (not its checkpoints or lock) those of the store, before a run starts."""
        if not self.remote:
            return
        remote, local = self._store(), self.run_dir
        local.mkdir(parents=True, exist_ok=True)
        listed = remote.files()
        for item in local.iterdir():
            if item.is_file() and item.name not in listed and item.name not in DRIVER_FILES_SKIPPED:
                item.unlink()
        for rel in listed:
            if not rel.startswith("."):
                remote.download(rel, local / rel)

    def push(self) -> None:
        """Make the store's run-folder files those of the mirror (checkpoints are uploaded by the ranks)."""
        if not self.remote:
            return
        remote, local = self._store(), self.run_dir
        present = {p.name for p in local.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name not in DRIVER_FILES_SKIPPED}
        for rel in set(remote.files()) - present:
            if not rel.startswith("."):
                remote.delete(rel)
        for rel in sorted(present):
            remote.write_bytes(rel, (local / rel).read_bytes())


def _read_holder(path: Path) -> str:
    holder = _read_json(path, dict)
    try:
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (KeyError, TypeError):
        return "holder unknown"


def _read_json(path: Path, kind: type):
    """The JSON record at `path` if it is one of `kind`; None when it is missing, unreadable or of another kind."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, kind) else None

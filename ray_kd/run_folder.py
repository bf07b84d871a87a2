"""What keeps one run's folder to one run: a lock, a config fingerprint, and the MLflow store it records to.

A run folder (`<output_dir>/<name>/`) holds checkpoints that a later start with the
same name resumes. Three things stop two computations from mixing there:
- `run.lock`: held (an OS file lock, released by the kernel when the holder dies, so a
  stale lock from a dead process never blocks) by the one process running the name;
  it names the holder's host, pid and start time.
- `fingerprint.json`: every field that changes what the run computes (the teacher and
  other weight files by content, the data by its split sizes and labels); a resume that
  differs is refused, naming the fields. A start with another config before the first
  checkpoint is a new run: it gets a new MLflow run, so nothing of the earlier config
  (params, description, method) is reported as this one's.
- `mlflow_run.json`: the run's MLflow store and run id; a resume against another store is refused.
- `wall.json`: the seconds every start of the run has spent, so a resumed run reports its whole time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, get_args

from pydantic import BaseModel

from ray_kd.checkpoint import FolderStore, atomic_write_json
from ray_kd.config import RunConfig, flatten, shown_config
from ray_kd.errors import UserError
from ray_kd.session import all_roles

LOCK = "run.lock"
FINGERPRINT = "fingerprint.json"
MLFLOW_RUN = "mlflow_run.json"
WALL = "wall.json"
MAY_CHANGE_ON_RESUME = ("name", "output_dir", "optim.epochs", "data.cache_dir", "data.download", "runtime.*",
                        "tracking.*", "teacher.ahead")
"""Fields a resume may change: where things go, how long to train, and how it runs; not what it computes."""


class RunFolderError(UserError, RuntimeError):
    """The run folder is in use, or holds a run made with another config or MLflow store."""


@contextmanager
def run_lock(cfg: RunConfig) -> Iterator[None]:
    """Hold the run's lock while the body runs; a second start of the same name is refused in one line."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never unlinked: a waiter must lock the same inode
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(path)
            raise RunFolderError(f"run {cfg.name} is already running ({holder}; lock {path}); wait for it to "
                                 "finish or stop it, or start this one under another name=") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _read_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def fingerprint(cfg: RunConfig, data=None) -> dict[str, Any]:
    """The fields that change what the run computes, flat; weight files by the sha256 of their content; the
    loaded dataset `data` (when given) by its split sizes and a digest of its labels."""
    flat = flatten(shown_config(cfg))  # credentials in a URI are not what the run computes, nor for a file
    if data is not None:
        from ray_kd.data import dataset_identity

        _, _, sizes, digest = dataset_identity(cfg.data, data)
        flat.update({"data.split_sizes": sizes, "data.labels_digest": digest})
    free = tuple(f.removesuffix("*") for f in MAY_CHANGE_ON_RESUME)
    out = {}
    for key, value in flat.items():
        if key in free or any(f.endswith(".") and key.startswith(f) for f in free):
            continue
        if key.endswith(".checkpoint") and value is not None:
            value = f"sha256:{_sha256(Path(value))}"
        out[key] = value
    return json.loads(json.dumps(out))  # the form it has when read back (tuples -> lists)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def checkpoint_store(cfg: RunConfig, rank: int = 0, barrier: Callable[[], None] = lambda: None) -> FolderStore:
    """The run's checkpoints, `checkpoints/epoch_NNNN/`: the same store on both executors (a Ray rank passes its
    rank and the group's barrier); in the object store, read through the local mirror, for a remote output_dir."""
    args = (cfg.run_dir / "checkpoints", [r.name for r in all_roles(cfg)], cfg.runtime.keep_checkpoints, rank, barrier)
    if cfg.remote_output:
        from ray_kd import storage

        return storage.RemoteCheckpoints(storage.RemoteFolder(cfg.output_dir, f"{cfg.name}/checkpoints"), *args)
    return FolderStore(*args)


def saved_checkpoints(cfg: RunConfig) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    return checkpoint_store(cfg).folders()


def check_fingerprint(cfg: RunConfig, data=None) -> None:
    """Refuse a resume whose fingerprint differs; record the fingerprint of a run with no checkpoint yet. A run
    with no checkpoint whose config changed starts over as a new MLflow run (its earlier run is left as it
    ended), so params and description always belong to what runs."""
    path = cfg.run_dir / FINGERPRINT
    now = fingerprint(cfg, data)
    before = read_fingerprint(path, f"run {cfg.name}")
    differ = [] if before is None else changed_fields(before, now)
    if before is not None and saved_checkpoints(cfg):
        if differ:
            raise RunFolderError(f"run {cfg.name} in {cfg.run_dir} was made with another config or data: "
                                 f"{describe_changes(before, now)}; to keep it, start this one under another "
                                 "name=; to discard its checkpoints and start over, add --restart")
        return
    marker = cfg.run_dir / MLFLOW_RUN
    if marker.is_file() and (before is None or differ):
        marker.unlink()
        print(f"run {cfg.name}: no checkpoint of the earlier start, made with another config "
              f"({', '.join(differ[:4]) or 'unknown'}): starting over as a new MLflow run", flush=True)
    atomic_write_json(now, path)


def read_fingerprint(path: Path, who: str) -> dict | None:
    """The fingerprint recorded at `path` (None: none yet); `who` ("run x", "sweep x") is named if it is corrupt."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise RunFolderError(f"{path} is corrupt; add --restart to start {who} over, or pick another name=") from None


def changed_fields(before: dict, now: dict) -> list[str]:
    """The fields whose values differ, changed values before added or removed ones. A field missing from `before`
    that holds its default now was added to the config since (an upgrade of ray-kd): not a change."""
    differ = (k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return sorted((k for k in differ if k in before or now[k] != field_default(k)),
                  key=lambda k: (k not in before or k not in now, k))


_NO_DEFAULT = object()


def field_default(dotted: str) -> Any:
    """The default of a run-config field named flat (`teacher.cache_dtype`, `students.0.model`), as the
    fingerprint holds it; a sentinel for a key that is not a field with a default."""
    def models(annotation) -> list[type]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in get_args(annotation) for m in models(arg)]

    model, field = RunConfig, None
    for part in dotted.split("."):
        if part.isdigit():  # an item of a list field
            continue
        if model is None or part not in model.model_fields:
            return _NO_DEFAULT
        field = model.model_fields[part]
        inner = models(field.annotation)
        model = inner[0] if inner else None
    if field is None or field.is_required():
        return _NO_DEFAULT
    return json.loads(json.dumps(field.get_default(call_default_factory=True), default=str))


def describe_changes(before: dict, now: dict) -> str:
    """The first four changes, `field old -> new`, for a one-line refusal."""
    differ = changed_fields(before, now)
    shown = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:4])
    return shown + (f" (and {len(differ) - 4} more)" if len(differ) > 4 else "")


def wall_before(cfg: RunConfig) -> float:
    """Seconds spent by the run's earlier starts (0 for a new run)."""
    try:
        return float(json.loads((cfg.run_dir / WALL).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def record_wall(cfg: RunConfig, seconds: float) -> None:
    atomic_write_json({"seconds": round(seconds, 3)}, cfg.run_dir / WALL)


def check_store(cfg: RunConfig, uri: str) -> None:
    """A resumed run continues its MLflow run, which lives in the store it was started in."""
    marker = cfg.run_dir / MLFLOW_RUN
    if not marker.is_file():
        return
    try:
        recorded = json.loads(marker.read_text())["tracking_uri"]
    except (ValueError, KeyError, TypeError):
        raise RunFolderError(f"{marker} is corrupt; add --restart to start run {cfg.name} over, "
                             "or pick another name=") from None
    if recorded != uri:
        raise RunFolderError(f"run {cfg.name} is recorded in the MLflow store {recorded}, not {uri}; resume it with "
                             f"MLFLOW_TRACKING_URI={recorded}, or add --restart to start it over in {uri}")


def clear(cfg: RunConfig) -> None:
    """`--restart`: everything in the run folder but its lock (held by the caller) goes."""
    for item in cfg.run_dir.iterdir():
        if item.name == LOCK:
            continue
        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    if cfg.remote_output:
        from ray_kd import storage

        storage.clear(cfg)
    print(f"run {cfg.name}: --restart cleared {where(cfg)}", flush=True)


def where(cfg: RunConfig) -> str:
    """The run folder as messages name it: its path, or the object store it mirrors."""
    if cfg.remote_output:
        from ray_kd.config import shown_uri

        return f"{shown_uri(cfg.output_dir).rstrip('/')}/{cfg.name} (mirrored in {cfg.run_dir})"
    return str(cfg.run_dir)

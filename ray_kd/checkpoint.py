"""Atomic, pickle-free checkpoint files.

Everything is written to a temporary name and renamed into place, so a crash
mid-write never leaves a truncated file that a resume would trust; everything
is read back with `weights_only=True`, so no user-supplied file is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from ray_kd.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, corrupt, or made for another model or class count."""


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(temporary path)`, then a rename onto `path`: `path` is whole or absent, and a failed write (a full
    disk) leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj, path: str | Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True)))


def require_file(path: Path) -> None:
    """A weights file's path must name a regular file: not a missing one, a folder or a device (/dev/null)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "a device or pipe"
        raise CheckpointError(f"checkpoint {path} is not a file ({kind}); give the path of the weights file")


def safe_load(path: str | Path) -> dict:
    path = Path(path)
    require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged or hostile file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a ray-kd checkpoint "
                              f"({type(err).__name__}); re-create it") from None


def save_model_file(path: str | Path, model_name: str, num_classes: int, in_channels: int, state_dict: dict,
                    **meta) -> None:
    """A model file a teacher role can load: the weights plus what they were built for (and `meta`: plain
    values such as the epoch they come from, readable with `weights_only=True`)."""
    atomic_save({"model": model_name, "num_classes": num_classes, "in_channels": in_channels,
                 "state_dict": state_dict, **meta}, path)


def load_model_file(path: str | Path, model_name: str, num_classes: int, in_channels: int) -> dict:
    blob = safe_load(path)
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise CheckpointError(f"checkpoint {path} has no state_dict; re-create it with `ray-kd train-teacher`")
    for key, want in (("model", model_name), ("num_classes", num_classes), ("in_channels", in_channels)):
        if blob.get(key) != want:
            raise CheckpointError(f"checkpoint {path} was trained for {key}={blob.get(key)!r} but this run "
                                  f"needs {key}={want!r}; train a matching teacher or fix the config")
    return blob["state_dict"]


def read_history(folder: str | Path) -> list[dict[str, float]]:
    """A checkpoint folder's epoch history (`history.json`), or one line saying it is unreadable."""
    path = Path(folder) / "history.json"
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__})") from None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise CheckpointError(f"{path} is not an epoch history")
    return history


def checkpoint_folders(root: Path, pattern: str = "checkpoint_*") -> list[Path]:
    """The checkpoint folders under `root`, oldest first (both stores name them in time order)."""
    return sorted(p for p in root.glob(pattern) if p.is_dir()) if root.is_dir() else []


def newest_good(folders: list[Path], role_names: list[str], say=None) -> tuple[Path, dict, list] | None:
    """(folder, {role: state}, history) of the newest folder in which every role's file and the history load.

    A corrupt newest checkpoint (a disk error, a killed copy) falls back to the one before; `say` gets a
    line for each one passed over. Every worker checks every role's file, so all choose the same folder."""
    for folder in reversed(folders):
        try:
            states = {name: safe_load(folder / f"{name}.pt") for name in role_names}
            return folder, states, read_history(folder)
        except CheckpointError as err:
            if say is not None:
                say(f"checkpoint {folder} is unreadable: {err}; falling back to the one before")
    if folders:
        raise CheckpointError(f"no readable checkpoint left in {folders[0].parent}; add --restart to start the run "
                              "over, or pick another name=")
    return None


class FolderStore:
    """A run's checkpoints as `checkpoints/epoch_NNNN/` folders (one `<role>.pt` per role and the epoch
    history), the same on both executors, so a run can resume on either.

    Each rank writes its own roles' files into the epoch's temporary folder; once every rank has (the
    `barrier`), rank 0 writes the history and renames the folder into place, so a folder under its final
    name is always complete. On a cluster the folder must be on storage every node sees."""

    def __init__(self, root: Path, role_names: list[str], keep: int = 2, rank: int = 0,
                 barrier: Callable[[], None] = lambda: None):
        self.root, self.role_names, self.keep, self.rank, self.barrier = Path(root), role_names, keep, rank, barrier

    def folders(self) -> list[Path]:
        return checkpoint_folders(self.root, "epoch_*")

    def latest(self) -> Path | None:
        done = self.folders()
        return done[-1] if done else None

    def latest_history(self) -> list:
        """The newest checkpoint's epoch history ([] before the first)."""
        latest = self.latest()
        return read_history(latest) if latest is not None else []

    def restore(self, session) -> list:
        """Load the session's roles from the newest readable checkpoint; returns its history ([] for none)."""
        found = newest_good(self.folders(), self.role_names)
        if found is None:
            return []
        _, states, history = found
        session.load_role_states(states)
        return history

    def save(self, session, history: list) -> None:
        final = self.root / f"epoch_{len(history):04d}"
        tmp = self.root / f".{final.name}.tmp"
        for name, state in session.role_states().items():  # a failed attempt's files are overwritten
            atomic_save(state, tmp / f"{name}.pt")
        self.barrier()
        if self.rank != 0:
            return
        atomic_write_json(history, tmp / "history.json")
        if final.exists():  # the same epoch again, after a resume from the checkpoint before it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in self.folders()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

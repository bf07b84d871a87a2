"""Atomic, pickle-free checkpoint files.

Everything is written to a temporary name and renamed into place, so a crash
mid-write never leaves a truncated file that a resume would trust; everything
is read back with `weights_only=True`, so no user-supplied file is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ray_kd.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, corrupt, or made for another model or class count."""


def atomic_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def safe_load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
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

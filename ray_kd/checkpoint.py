"""Atomic, pickle-free checkpoint files.

Everything is written to a temporary name and renamed into place, so a crash
mid-write never leaves a truncated file that a resume would trust; everything
is read back with `weights_only=True`, so no user-supplied file is unpickled.
"""

from __future__ import annotations

import json
import os
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

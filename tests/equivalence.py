"""Run one config under both executors and check they agree (shared by every method's equivalence test); a run on
one executor without MLflow, its folder built here as the driver builds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ray_kd.checkpoint import safe_load
from ray_kd.config import load_config
from ray_kd.local_executor import LocalExecutor
from ray_kd.ray_executor import RayExecutor
from ray_kd.run_storage import RunStorage


def run_local(cfg, **options) -> Path:
    """`cfg`'s run on the single-process executor (`options`: `execute`'s); returns its last checkpoint's folder."""
    return LocalExecutor(cfg).execute(RunStorage.of(cfg), None, **options)


def run_on_ray(cfg, **options) -> Path:
    """`cfg`'s run on the Ray executor (`options`: `execute`'s); returns its last checkpoint's folder."""
    return RayExecutor(cfg).execute(RunStorage.of(cfg), None, **options)


def run_both(tmp_path: Path, overrides: list[str], epochs: int = 2, steps: int = 6) -> tuple[Path, Path]:
    """The last checkpoint folders of the same seeded run on the local and on the Ray executor."""
    common = [f"optim.epochs={epochs}", f"optim.steps_per_epoch={steps}", "optim.milestones=[1]",
              f"output_dir={tmp_path}"]
    local = run_local(load_config(None, common + overrides + ["name=local", "runtime.executor=local"]),
                      show_progress=False)
    remote = run_on_ray(load_config(None, common + overrides + ["name=ray"]))
    return local, remote


def assert_same_run(local: Path, remote: Path, roles: list[str]) -> None:
    """Same losses and accuracies every epoch, same weights at the end (to float tolerance)."""
    h_local = json.loads((local / "history.json").read_text())
    h_remote = json.loads((remote / "history.json").read_text())
    assert len(h_local) == len(h_remote) > 0
    keys = [k for k in h_local[-1] if "/loss_" in k or k.endswith("_acc")]
    assert keys
    for a, b in zip(h_local, h_remote):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for role in roles:
        w_local, w_remote = safe_load(local / f"{role}.pt")["net"], safe_load(remote / f"{role}.pt")["net"]
        assert w_local.keys() == w_remote.keys()
        for name, tensor in w_local.items():
            torch.testing.assert_close(tensor, w_remote[name], rtol=1e-5, atol=1e-6, msg=f"{role} {name}")

"""One real local Ray cluster and one real MLflow store per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> str:
    """A real (briefly) trained digits teacher file, made once per session."""
    from ray_kd.config import load_config
    from ray_kd.run import train_teacher

    root = tmp_path_factory.mktemp("teacher")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    cfg = load_config("configs/digits_teacher.yaml", ["runtime.executor=local", "optim.epochs=8",
                                                      "optim.milestones=[6]", f"output_dir={root}"])
    return train_teacher(cfg, root / "teacher.pt")["teacher_file"]

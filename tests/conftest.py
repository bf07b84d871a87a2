"""One real local Ray cluster and one real MLflow store per test session."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # address="local": a cluster of its own, even beside one that `ray start` left on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made, once per session: making them takes ~2 s of schema migrations
    in every new store, copying the file 0.1 s."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def new_mlflow_store(empty_mlflow_db):
    """`new_mlflow_store(path)`: a new, empty MLflow store at `path` (a copy of the session's empty one); its URI."""

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(empty_mlflow_db, path)
        return f"sqlite:///{path}"

    return make


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch, new_mlflow_store):
    uri = new_mlflow_store(tmp_path / "mlflow.db")
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


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 server (moto's) on loopback for the test session: host:port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@dataclass(frozen=True)
class S3Bucket:
    name: str
    endpoint: str

    def uri(self, path: str) -> str:
        """`path` in the bucket as ray-kd takes it: credentials and the endpoint inline."""
        return f"s3://key:secret@{self.name}/{path}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"


@pytest.fixture()
def s3_bucket(s3_endpoint) -> S3Bucket:
    """A new, empty bucket on the session's S3 server."""
    from pyarrow import fs

    bucket = S3Bucket(f"b-{uuid.uuid4().hex[:10]}", s3_endpoint)
    store, _ = fs.FileSystem.from_uri(bucket.uri("") + "&allow_bucket_creation=true")
    store.create_dir(bucket.name)
    return bucket

"""MLflow: where runs go, one run per distillation run, and metric logging that survives restarts.

Metrics are logged from the epoch history kept in the checkpoint, and only for
epochs MLflow does not have yet: a worker group restarted from a checkpoint
logs each epoch exactly once, never a duplicate and never a gap.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from ray_kd.checkpoint import atomic_write_json
from ray_kd.config import RunConfig, flatten
from ray_kd.errors import UserError


class TrackingError(UserError, RuntimeError):
    """The MLflow store cannot be reached or written: raised before any training starts."""


def tracking_uri(cfg: RunConfig) -> str:
    """MLFLOW_TRACKING_URI wins, then tracking.uri, then sqlite:///mlflow.db in the working directory.

    A relative sqlite path is made absolute, since Ray workers run in other directories.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str) -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise TrackingError(f"MLflow store {uri} is not reachable ({first}); start the tracking server "
                            "or set MLFLOW_TRACKING_URI / tracking.uri to a reachable store") from None


def start_or_resume(cfg: RunConfig, uri: str, parent_run_id: str | None = None) -> str:
    """The run id kept in the run folder (a resumed run continues it), or a new run with the config as params."""
    marker = cfg.run_dir / "mlflow_run.json"
    if marker.is_file():
        import json

        return json.loads(marker.read_text())["run_id"]
    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = (experiment.experiment_id if experiment
              else mlflow.create_experiment(cfg.tracking.experiment, artifact_location=_artifact_root(uri)))
    tags = {"mlflow.runName": cfg.name, "ray_kd.method": cfg.method.name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = mlflow.create_run(exp_id, run_name=cfg.name, tags=tags).info.run_id
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg.model_dump()).items()]
    for i in range(0, len(params), 100):
        mlflow.log_batch(run_id, params=params[i:i + 100])
    mlflow.log_text(run_id, yaml.safe_dump(cfg.model_dump(), sort_keys=False), "config.yaml")
    atomic_write_json({"run_id": run_id, "tracking_uri": uri}, marker)
    return run_id


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database file, not into whatever directory the process
    runs in (under `ray job submit` that is a temporary copy of the working dir)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix):]).parent / "mlruns").as_uri()
    return None  # a tracking server decides


class MetricSync:
    """Logs the epochs of a history that this MLflow run has not seen yet (step = epoch)."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = client(uri), run_id
        self.logged = {int(m.step) for m in self.client.get_metric_history(run_id, "epoch")}

    def sync(self, history: list[dict[str, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for entry in history:
            step = int(entry["epoch"])
            if step in self.logged:
                continue
            metrics = [Metric(k.replace("@", "_"), float(v), now, step) for k, v in entry.items()]
            for i in range(0, len(metrics), 200):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 200])
            self.logged.add(step)

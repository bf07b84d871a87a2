"""The single-process executor: every role in this process, the same method code as on Ray.

It is the reference the Ray executor is tested against (same seeds, same
numbers) and the baseline the benchmarks measure it against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ray_kd.config import RunConfig
from ray_kd.data import Dataset
from ray_kd.exchange import LocalExchange
from ray_kd.progress import ProgressDisplay, StepMetricLogger, StepMonitor
from ray_kd.replicas import Mesh
from ray_kd.roles import all_roles
from ray_kd.run_storage import RunStorage
from ray_kd.session import Session, corrupt_chunks, fit, progress_line
from ray_kd.tracking import MetricSync, system_metrics


def _device(cfg: RunConfig) -> torch.device:
    torch.set_num_threads(cfg.runtime.threads_per_worker)
    return torch.device("cuda" if cfg.runtime.use_gpu != "no" and torch.cuda.is_available() else "cpu")


class LocalExecutor:
    """Runs a run's roles in this process (see the module's docstring); `ray_kd.run.executor_for` builds it."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def start(self, checks: Callable[[], Dataset]) -> Dataset:
        """Nothing to start: the driver's checks, and the dataset they load."""
        return checks()

    def execute(self, run: RunStorage, dataset: Dataset | None, mlflow_run: tuple[str, str] | None = None,
                on_epoch: Callable[[dict], None] | None = None, show_progress: bool = True) -> Path:
        """Train every role in this process (logging to the MLflow run `(uri, run_id)` when given); returns the
        folder of the last checkpoint. `on_epoch(record)` gets each epoch's metrics as its checkpoint lands."""
        if mlflow_run is None:
            return train_here(self.cfg, run, None, show_progress, dataset, on_epoch)
        uri, run_id = mlflow_run
        with system_metrics(uri, run_id, "local", self.cfg.tracking.system_metrics_interval):
            return train_here(self.cfg, run, MetricSync(uri, run_id), show_progress, dataset, on_epoch)

    def shutdown(self) -> None:
        """Nothing started, nothing to stop."""


def train_here(cfg: RunConfig, run: RunStorage, sync=None, show_progress: bool = True,
               dataset: Dataset | None = None, on_epoch: Callable[[dict], None] | None = None) -> Path:
    device = _device(cfg)
    roles = all_roles(cfg)
    exchange = LocalExchange()
    log_every = cfg.tracking.log_every_steps if sync is not None else 0
    monitor = StepMonitor(cfg.optim.epochs, exchange, log_every,
                          StepMetricLogger(sync.client, sync.run_id) if log_every else None,
                          ProgressDisplay(cfg.runtime.progress_every_s) if show_progress else None)
    session = Session(cfg, list(range(len(roles))), exchange, device, dataset, monitor=monitor)
    store = run.checkpoints()
    line = progress_line(cfg.optim.epochs) if show_progress else None

    def each_epoch(record: dict) -> None:
        if line is not None:
            line(record)
        if on_epoch is not None:
            on_epoch(record)

    fit(session, store, sync, each_epoch)
    return store.latest()


def fill_teacher_cache(cfg: RunConfig, dataset: Dataset | None = None, show_progress: bool = True) -> dict[str, int]:
    """The frozen teacher alone, every step of every epoch (each replica's shard), through `teacher.cache`: a step
    stored already is read, any other computed and stored; then its val/test scores. Every run, seed or sweep
    trial with the cache's key then reads them all, however many start at once. Returns the steps read and
    computed."""
    device = _device(cfg)
    replicas = cfg.runtime.replicas
    # alone, its BatchNorm reads its running statistics (frozen): nothing to synchronise across replicas
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"sync_bn": False})})
    totals = {"read": 0, "computed": 0}
    for replica in range(replicas):
        exchange = LocalExchange()
        monitor = StepMonitor(cfg.optim.epochs, exchange, 0, None,
                              ProgressDisplay(cfg.runtime.progress_every_s) if show_progress else None)
        session = Session(cfg, [0], exchange, device, dataset, monitor=monitor, mesh=Mesh(replicas, replica, 1, [0]))
        dataset = session.dataset
        for epoch in range(cfg.optim.epochs):
            metrics = session.train_epoch(epoch)
            read, computed = int(metrics["teacher/cache_hits"]), int(metrics["teacher/cache_misses"])
            totals["read"] += read
            totals["computed"] += computed
            shard = f" (replica {replica + 1}/{replicas})" if replicas > 1 else ""
            corrupt = f" ({corrupt_chunks(metrics['teacher/cache_corrupt'])} computed again)" \
                if metrics["teacher/cache_corrupt"] else ""
            print(f"teacher.cache epoch {epoch + 1}/{cfg.optim.epochs}{shard}: {computed} steps computed, {read} read"
                  f"{corrupt}", flush=True)
        if replica == 0:
            session.evaluate(cfg.optim.epochs)  # the teacher's scores, kept beside its outputs
    return totals

"""The Ray executor: one Ray Train worker per role, all in lockstep, exchanging through a collective.

Rank r runs role r. Every worker builds its own role and dataset, draws the same
batches, and calls the same `Session` code as the single-process executor; only
the exchange (an all_gather in the worker group's process group) differs.
Checkpoints: each rank reports its own `<role>.pt`, Ray merges them into one
checkpoint folder; re-running with the same run name resumes from the latest.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from ray_kd.checkpoint import checkpoint_folders, newest_good
from ray_kd.config import RunConfig
from ray_kd.errors import UserError
from ray_kd.exchange import CollectiveExchange
from ray_kd.local_executor import write_role_files
from ray_kd.progress import ProgressDisplay, StepMetricLogger, StepMonitor, StepStatus
from ray_kd.session import History, Session, all_roles, fit, progress_line


class ClusterError(UserError, RuntimeError):
    """The cluster cannot ever hold this run (too few CPUs/GPUs), or cannot be reached."""


class RayTrainStore:
    """Checkpoints through `ray.train.report`: every rank adds its role file, rank 0 the history."""

    def __init__(self, rank: int):
        self.rank = rank

    def restore(self, session: Session) -> History:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return []
        with checkpoint.as_directory() as folder:
            folder = Path(folder)
            # On storage this node sees, a corrupt latest falls back to the folder before it (as the driver said).
            siblings = [p for p in checkpoint_folders(folder.parent) if p.name <= folder.name]
            _, states, history = newest_good(siblings if folder in siblings else [folder],
                                             [r.name for r in all_roles(session.cfg)])
            session.load_role_states({r.role.name: states[r.role.name] for r in session.runners})
            return history

    def save(self, session: Session, history: History) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            write_role_files(Path(tmp), session, history if self.rank == 0 else None)
            ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_worker(config: dict) -> None:
    """What every Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    from ray_kd.tracking import MetricSync, system_metrics

    cfg = RunConfig.model_validate(config["run"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(cfg.runtime.threads_per_worker)
    roles = all_roles(cfg)
    exchange = CollectiveExchange([r.name for r in roles], rank)
    lead = rank == 0
    sync = MetricSync(config["tracking_uri"], config["run_id"]) if lead and config.get("run_id") else None
    log_every = cfg.tracking.log_every_steps if config.get("run_id") else 0  # the same on every rank
    monitor = StepMonitor(cfg.optim.epochs, exchange, log_every,
                          StepMetricLogger(sync.client, sync.run_id) if sync and log_every else None)
    session = Session(cfg, [rank], exchange, ray.train.torch.get_device(), monitor=monitor)
    node = sync.names.get(roles[rank].name, roles[rank].name) if sync else roles[rank].name
    with system_metrics(config["tracking_uri"], config.get("run_id"), node, cfg.tracking.system_metrics_interval):
        fit(session, RayTrainStore(rank), sync)


def use_gpu(cfg: RunConfig) -> bool:
    if cfg.runtime.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.runtime.use_gpu == "yes"


def connect(cfg: RunConfig, state_api: bool = False) -> None:
    """Join the cluster in runtime.address / RAY_ADDRESS (as under `ray job submit`), or start a local one.

    A local cluster starts the dashboard only when `state_api` is asked for (sweeps: Ray Train's
    placement-group cleaner needs its State API, else a finished trial leaks its workers' resources),
    and no metrics collection, and binds every port it opens to 127.0.0.1 (see README, What listens where)."""
    if ray.is_initialized():
        return
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    # Worker logs stay in Ray's log files unless asked for: the driver prints progress itself.
    kwargs = dict(log_to_driver=cfg.runtime.worker_logs, logging_level="ERROR")
    if address:
        ray.init(address=address, **kwargs)
    else:
        loopback_only()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=state_api, dashboard_host="127.0.0.1",
                 _system_config={"enable_metrics_collection": False}, **kwargs)


def loopback_only() -> None:
    """Make the local cluster this process starts listen on 127.0.0.1 only.

    On Linux Ray gives a node the host's routable address (a 127.0.0.1 asked for is rewritten to it) and
    binds its servers there or on every interface. Where Ray does not build multi-node clusters (its
    macOS/Windows default, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) the node's address is 127.0.0.1 and
    every server binds loopback. A local cluster is one node, so nothing is lost; the variable is set in
    the environment the cluster's processes inherit, and in the constant this process already read.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def check_fits(cfg: RunConfig, gpu: bool) -> None:
    """Fail now, not hang forever, when the cluster can never place one worker per role."""
    n = len(all_roles(cfg))
    have = ray.cluster_resources()
    need_cpu = n * cfg.runtime.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        raise ClusterError(f"{n} role workers x runtime.cpus_per_worker={cfg.runtime.cpus_per_worker} need "
                           f"{need_cpu:g} CPUs but the cluster has {have.get('CPU', 0):g}; lower "
                           "runtime.cpus_per_worker or add nodes")
    if gpu and n > have.get("GPU", 0):
        raise ClusterError(f"{n} role workers need {n} GPUs but the cluster has {have.get('GPU', 0):g}; "
                           "set runtime.use_gpu=no or add GPUs")


class Trainer(TorchTrainer):
    """TorchTrainer whose Ctrl-C ends the run the way every other stop does.

    Ray's own SIGINT handler aborts the controller and then exits the driver with status 0 or 1 and no
    message, so nothing marks the MLflow run KILLED or says where the run stopped. This one aborts the
    controller the same way (the workers stop, saved checkpoints stay) and then raises KeyboardInterrupt in
    the driver, which `ray_kd.run` turns into the stop line and exit 130.
    """

    def _register_sigint_handler(self, controller) -> None:
        def on_sigint(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C skips the abort
            try:
                ray.get(controller.abort.remote(), timeout=30)
            except Exception:  # the controller is gone or slow: the driver's exit ends it anyway
                pass
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)


def make_trainer(cfg: RunConfig, tracking_uri: str, run_id: str | None, callbacks=(), name: str = "ray",
                 worker_loop: Callable[[dict], None] = train_worker):
    """The TorchTrainer of one distillation run (the Tune driver wraps this too; benchmarks pass their own
    `worker_loop`, which may wrap `train_worker`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    gpu = use_gpu(cfg)
    check_fits(cfg, gpu)
    backend = cfg.runtime.backend if cfg.runtime.backend != "auto" else ("nccl" if gpu else "gloo")
    resources = {"CPU": cfg.runtime.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    return Trainer(
        worker_loop,
        train_loop_config={"run": cfg.model_dump(), "tracking_uri": tracking_uri, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=len(all_roles(cfg)), use_gpu=gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=backend),
        run_config=TrainRunConfig(
            name=name, storage_path=str(cfg.run_dir), callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.runtime.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.runtime.keep_checkpoints),
        ),
    )


def run_on_ray(cfg: RunConfig, tracking_uri: str | None = None, run_id: str | None = None) -> Path:
    """Train on the cluster (logging to MLflow when given a run); returns the folder of the last checkpoint."""
    connect(cfg)
    trainer = make_trainer(cfg, tracking_uri, run_id)
    stop = threading.Event()
    display = ProgressDisplay(cfg.runtime.progress_every_s)
    watcher = threading.Thread(target=watch_progress, args=(tracking_uri, run_id, cfg.optim.epochs, stop, display),
                               daemon=True)
    if run_id:
        watcher.start()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise explain_failure(err, cfg) from None
    finally:
        stop.set()
        if run_id:
            watcher.join()
    return Path(result.checkpoint.path)


class WorkerFailedError(UserError, RuntimeError):
    """A role's worker kept failing after every restart the run allows."""


def explain_failure(err: Exception, cfg: RunConfig) -> UserError:
    """The one-line error a user can act on: the worker's own UserError (a NaN loss, a bad checkpoint)
    if it raised one, else which role failed, after how many restarts, and how to resume."""
    roles = all_roles(cfg)
    for rank, failure in sorted(getattr(err, "worker_failures", {}).items()):
        cause = failure
        while cause is not None:
            if isinstance(cause, UserError):
                return cause
            cause = getattr(cause, "cause", None) or cause.__cause__
        first = str(failure).strip().splitlines()[-1][:300] if str(failure).strip() else type(failure).__name__
        return WorkerFailedError(f"role {roles[rank].name} (rank {rank}) failed after runtime.max_failures="
                                 f"{cfg.runtime.max_failures} restarts: {first}; checkpoints are kept in "
                                 f"{cfg.run_dir / 'ray'}: run the same command to resume")
    return WorkerFailedError(f"the run failed ({str(err).strip().splitlines()[0][:300]}); checkpoints are kept in "
                             f"{cfg.run_dir / 'ray'}: run the same command to resume")


def watch_progress(uri: str, run_id: str, epochs: int, stop: threading.Event, display: ProgressDisplay,
                   every: float = 0.5) -> None:
    """Print the progress line of each epoch as rank 0 logs it to MLflow (workers print nothing), and
    within an epoch the step metrics rank 0 logs every tracking.log_every_steps steps."""
    from ray_kd.tracking import client, latest_epoch

    mlflow, show, shown, last_step = client(uri), progress_line(epochs), 0, None
    while True:
        finished = stop.wait(every)
        epoch, metrics = latest_epoch(mlflow, run_id)
        if epoch > shown:
            display.close()
            show({**metrics, "epoch": epoch})
            shown = epoch
        status = StepStatus.from_metrics(metrics, epochs)
        if status and status.epoch > shown and (status.epoch, status.step) != last_step:
            display.show(status)  # the epoch in progress only, never a finished one's last log
            last_step = (status.epoch, status.step)
        if finished:
            display.close()
            return

"""The single-process executor: every role in this process, the same method code as on Ray.

It is the reference the Ray executor is tested against (same seeds, same
numbers) and the baseline the benchmarks measure it against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ray_kd.config import RunConfig
from ray_kd.data import Dataset
from ray_kd.exchange import LocalExchange
from ray_kd.progress import ProgressDisplay, StepMetricLogger, StepMonitor
from ray_kd.run_folder import checkpoint_store
from ray_kd.session import Session, all_roles, fit, progress_line


def run_local(cfg: RunConfig, sync=None, show_progress: bool = True, dataset: Dataset | None = None) -> Path:
    """Train every role in this process; returns the folder of the last checkpoint."""
    torch.set_num_threads(cfg.runtime.threads_per_worker)
    device = torch.device("cuda" if cfg.runtime.use_gpu != "no" and torch.cuda.is_available() else "cpu")
    roles = all_roles(cfg)
    exchange = LocalExchange()
    log_every = cfg.tracking.log_every_steps if sync is not None else 0
    monitor = StepMonitor(cfg.optim.epochs, exchange, log_every,
                          StepMetricLogger(sync.client, sync.run_id) if log_every else None,
                          ProgressDisplay(cfg.runtime.progress_every_s) if show_progress else None)
    session = Session(cfg, list(range(len(roles))), exchange, device, dataset, monitor=monitor)
    store = checkpoint_store(cfg)
    fit(session, store, sync, progress_line(cfg.optim.epochs) if show_progress else None)
    return store.latest()

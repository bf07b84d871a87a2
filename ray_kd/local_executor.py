"""The single-process executor: every role in this process, the same method code as on Ray.

It is the reference the Ray executor is tested against (same seeds, same
numbers) and the baseline the benchmarks measure it against.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ray_kd.checkpoint import atomic_save, atomic_write_json, checkpoint_folders, newest_good
from ray_kd.config import RunConfig
from ray_kd.data import Dataset
from ray_kd.exchange import LocalExchange
from ray_kd.progress import ProgressDisplay, StepMetricLogger, StepMonitor
from ray_kd.session import History, Session, all_roles, fit, progress_line


class DirectoryStore:
    """Checkpoints as `checkpoints/epoch_NNNN/` folders, each renamed into place only when complete."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = root, keep

    def latest(self) -> Path | None:
        done = checkpoint_folders(self.root, "epoch_*")
        return done[-1] if done else None

    def restore(self, session: Session) -> History:
        found = newest_good(checkpoint_folders(self.root, "epoch_*"), [r.role.name for r in session.runners])
        if found is None:
            return []
        folder, states, history = found
        session.load_role_states(states)
        return history

    def save(self, session: Session, history: History) -> None:
        final = self.root / f"epoch_{len(history):04d}"
        tmp = self.root / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_role_files(tmp, session, history)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(p for p in self.root.glob("epoch_*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def write_role_files(folder: Path, session: Session, history: History | None) -> None:
    """One `<role>.pt` per local role; `history.json` too when given (the rank that owns it)."""
    for name, state in session.role_states().items():
        atomic_save(state, folder / f"{name}.pt")
    if history is not None:
        atomic_write_json(history, folder / "history.json")


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
    store = DirectoryStore(cfg.run_dir / "checkpoints", keep=cfg.runtime.keep_checkpoints)
    fit(session, store, sync, progress_line(cfg.optim.epochs) if show_progress else None)
    return store.latest()

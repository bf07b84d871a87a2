"""Progress within an epoch: a bar or plain lines on the console, and step-level metrics in MLflow.

An ImageNet epoch takes an hour, so one line per epoch is not enough. Every rank
calls its `StepMonitor` after every step (the same steps on every rank), and while
it scores its roles after an epoch:

- every `tracking.log_every_steps` global steps it gathers each role's loss terms
  and lr (one small collective on the Ray executor) and the lead rank logs them to
  MLflow at step = global step, as `<role>/steps/loss_<term>` and `<role>/steps/lr`:
  a chart section of their own, after the role's per-epoch curves (logged at
  step = epoch). Where the run is (epoch, step, ETA, images/s) is for the
  console only: in MLflow it would only be charts of counters;
- it hands each step's `StepStatus` and each scoring batch's `ScoringStatus` to its
  display: where this process owns the console (the single-process executor) a
  `ProgressDisplay` (a tqdm bar on a terminal, else a plain line every
  `runtime.progress_every_s` seconds: log files, `ray job submit`); on a Ray worker,
  whose output does not reach the driver, `this_process`, which keeps the latest
  for the driver to ask for (`RoleWorker.status`) and show with the same
  `ProgressDisplay` (`group_status` makes one status of every rank's).
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from ray_kd.stopping import held

_STEPS = "/steps/"


@dataclass
class StepStatus:
    """Where a run is within an epoch, and the last step's losses and lr of every role that trains."""

    epoch: int  # 1-based, like the per-epoch `epoch` metric
    epochs: int
    step: int  # 1-based within the epoch
    steps: int
    samples_per_s: float
    eta_s: float  # to the end of this epoch
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> loss term -> value
    lrs: dict[str, float] = field(default_factory=dict)  # role -> lr of this step

    def metrics(self) -> dict[str, float]:
        """The MLflow form (logged at step = global step): each role's loss terms and lr."""
        out = {}
        for role, terms in self.losses.items():
            out.update({f"{role}{_STEPS}loss_{term}": v for term, v in terms.items()})
        out.update({f"{role}{_STEPS}lr": lr for role, lr in self.lrs.items()})
        return {k: float(v) for k, v in out.items()}

    def details(self) -> str:
        """Throughput, each training role's total loss, the lr: what the bar shows beside its counts."""
        losses = " ".join(f"{role} {terms['total']:.4f}" for role, terms in sorted(self.losses.items())
                          if "total" in terms)
        lr = f"  lr {next(iter(self.lrs.values())):.3g}" if self.lrs else ""
        return f"{self.samples_per_s:.0f} img/s  loss {losses or '-'}{lr}"

    def line(self) -> str:
        eta = datetime.timedelta(seconds=round(self.eta_s))
        return (f"epoch {self.epoch}/{self.epochs}  step {self.step}/{self.steps} "
                f"({100 * self.step / self.steps:.0f}%)  {self.details()}  ETA {eta}")

    def bar(self) -> tuple[str, int, int, str, str]:
        """(description, position, total, unit, postfix) of its tqdm bar."""
        return f"epoch {self.epoch}/{self.epochs}", self.step, self.steps, "step", self.details()


@dataclass
class ScoringStatus:
    """A role being scored after an epoch: how many images of which split are done."""

    epoch: int  # 1-based: the epoch just trained
    epochs: int
    role: str
    split: str
    done: int
    total: int

    def line(self) -> str:
        return (f"epoch {self.epoch}/{self.epochs}  scoring {self.role} on {self.split}: "
                f"{self.done:,}/{self.total:,} images ({100 * self.done / self.total:.0f}%)")

    def bar(self) -> tuple[str, int, int, str, str]:
        return f"epoch {self.epoch}/{self.epochs} scoring {self.role} on {self.split}", self.done, self.total, "img", ""


Status = StepStatus | ScoringStatus


def group_status(statuses: list[Status | None]) -> Status | None:
    """One status for a Ray group, from each rank's latest (in rank order; None: between statuses): the first
    scoring rank's, while one scores (the epoch waits for it), else the first rank's step with the losses and lr
    of every rank's roles (the lowest rank's where ranks share a role: replica 0's)."""
    scoring = next((s for s in statuses if isinstance(s, ScoringStatus)), None)
    if scoring is not None:
        return scoring
    steps = [s for s in statuses if isinstance(s, StepStatus)]
    if not steps:
        return None
    losses, lrs = {}, {}
    for status in reversed(steps):
        losses.update(status.losses)
        lrs.update(status.lrs)
    return dataclasses.replace(steps[0], losses=losses, lrs=lrs)


class ProgressDisplay:
    """A tqdm bar per epoch (and per role and split scored) on a terminal; otherwise a plain line at most every
    `every_s` seconds."""

    def __init__(self, every_s: float, stream: TextIO | None = None, tty: bool | None = None):
        self.every_s, self.stream = every_s, stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._bar, self._bar_desc, self._last_line = None, "", float("-inf")

    def show(self, status: Status) -> None:
        """Off a terminal, a line when `every_s` has passed (and at an epoch's last step); on one, the bar moves."""
        if not self.tty:
            now = time.monotonic()
            last_step = isinstance(status, StepStatus) and status.step == status.steps
            if now - self._last_line >= self.every_s or last_step:
                print(status.line(), file=self.stream, flush=True)
                self._last_line = now
            return
        desc, position, total, unit, postfix = status.bar()
        if self._bar is None or self._bar_desc != desc:
            from tqdm import tqdm

            self.close()
            self._bar = tqdm(total=total, initial=position, desc=desc, unit=unit, leave=False, file=self.stream,
                             dynamic_ncols=True)  # `initial`: a Ray driver first sees an epoch partway through
            self._bar_desc = desc
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(position - self._bar.n)

    def close(self) -> None:
        """Before the epoch's own line: the bar goes (it is not left on screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LatestStatus:
    """What this process is doing now, for a Ray driver that asks: the last status shown, None once closed (between
    training and scoring, after scoring, before the first step)."""

    def __init__(self):
        self.status: Status | None = None

    def show(self, status: Status) -> None:
        self.status = status

    def close(self) -> None:
        self.status = None


this_process = LatestStatus()
"""A Ray worker's: its monitor shows to it, and `RoleWorker.status` reads it from another thread."""


class StepMetricLogger:
    """Logs step metrics to one MLflow run, skipping global steps it already has: a worker group restarted
    from a checkpoint re-runs those steps with the same numbers, and they are not logged twice."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.logged_up_to: int | None = None  # read from the run's first step curve, once there is one

    def log(self, global_step: int, status: StepStatus) -> None:
        from mlflow.entities import Metric

        values = status.metrics()
        if not values:
            return
        if self.logged_up_to is None:  # every logged step holds every training role's curves: one tells
            history = self.client.get_metric_history(self.run_id, min(values))
            self.logged_up_to = max((int(m.step) for m in history), default=0)
        if global_step <= self.logged_up_to:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, global_step) for k, v in values.items()]
        with held():
            for i in range(0, len(metrics), 200):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 200])
        self.logged_up_to = global_step


class StepMonitor:
    """Called by the epoch loop on every rank; see the module docstring.

    `log_every` must be the same on every rank (the gather is a collective): 0 turns step logging off.
    """

    def __init__(self, epochs: int, exchange, log_every: int = 0, logger: StepMetricLogger | None = None,
                 display: ProgressDisplay | LatestStatus | None = None):
        self.epochs, self.exchange, self.log_every = epochs, exchange, log_every
        self.logger, self.display = logger, display

    def start_epoch(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps = epoch, steps
        self.start = self.last_log = time.perf_counter()
        self.samples = self.samples_at_log = 0
        self.step_at_log = 0

    def after_step(self, step: int, batch: int, losses: dict[str, dict[str, float]], lrs: dict[str, float]) -> None:
        """`step` is 1-based within the epoch; `losses`/`lrs` hold this process's roles (those that train)."""
        now = time.perf_counter()
        self.samples += batch
        if self.display is not None:
            self.display.show(self._status(step, losses, lrs, now - self.start, step, self.samples))
        global_step = self.epoch * self.steps + step
        if self.log_every and global_step % self.log_every == 0:
            parts = self.exchange.gather_objects((losses, lrs))
            losses, lrs = {}, {}
            for part_losses, part_lrs in parts:
                losses.update(part_losses)
                lrs.update(part_lrs)
            status = self._status(step, losses, lrs, now - self.last_log, step - self.step_at_log,
                                  self.samples - self.samples_at_log)
            if self.logger is not None:
                self.logger.log(global_step, status)
            self.last_log, self.step_at_log, self.samples_at_log = now, step, self.samples

    def scoring(self, role: str, split: str, done: int, total: int) -> None:
        """After the epoch's steps: `done` of the `total` images of `split` are scored for `role`."""
        if self.display is not None:
            self.display.show(ScoringStatus(self.epoch + 1, self.epochs, role, split, done, total))

    def idle(self) -> None:
        """Nothing to show until the next status (after the steps, after the scoring)."""
        if self.display is not None:
            self.display.close()

    def _status(self, step: int, losses, lrs, seconds: float, steps_done: int, samples: int) -> StepStatus:
        """Throughput and ETA over the last `steps_done` steps, which took `seconds`."""
        seconds = max(seconds, 1e-9)
        return StepStatus(self.epoch + 1, self.epochs, step, self.steps, samples / seconds,
                          (self.steps - step) * seconds / max(steps_done, 1), losses, lrs)

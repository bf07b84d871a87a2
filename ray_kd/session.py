"""The epoch loop both executors share.

A `Session` holds the roles one process runs: all of them in the single-process
executor, exactly one on each Ray worker. Each step every local role does its
forward pass, the published outputs are exchanged, and every local role updates.
Because only the exchange differs, the two executors compute the same numbers.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from functools import partial
from typing import Callable

import torch

from ray_kd.config import ConfigError, RunConfig
from ray_kd.data import BatchChecksum, Dataset, epoch_steps, seeded_batches
from ray_kd.datasets import load_dataset
from ray_kd.evaluation import OBJECTIVE, SPLITS, Evaluator
from ray_kd.progress import StepMonitor
from ray_kd.replicas import Mesh, synchronise_batchnorm
from ray_kd.roles import RoleRunner, all_roles
from ray_kd.stopping import held
from ray_kd.teacher_cache import CACHE_NEEDS_FROZEN, TeacherCache, cache_key

History = list[dict[str, float]]
"""One dict of merged metrics (every role's) per completed epoch; entry i has 'epoch' == i + 1."""


class Session:
    def __init__(self, cfg: RunConfig, role_indices: list[int], exchange, device: torch.device,
                 dataset: Dataset | None = None, monitor: StepMonitor | None = None, mesh: Mesh | None = None):
        """`mesh`: this process's place among data-parallel replicas (`runtime.replicas`; None: one replica)."""
        self.cfg, self.exchange, self.device = cfg, exchange, device
        self.mesh = mesh or Mesh(1, 0, 1, role_indices)
        self.monitor = monitor or StepMonitor(cfg.optim.epochs, exchange)
        self.dataset = dataset or load_dataset(cfg.data)
        self.method = cfg.method.build()
        roles = all_roles(cfg)
        self.steps_per_epoch = epoch_steps(self.dataset, cfg.data.batch_size, cfg.optim.steps_per_epoch)
        self.runners = [RoleRunner(roles[i], i, self.method, self.dataset, cfg.optim, cfg.seed, device,
                                   self.steps_per_epoch, cfg.runtime.channels_last, cfg.runtime.fold_frozen_batchnorm)
                        for i in role_indices]
        for index, runner in zip(role_indices, self.runners):
            if self.mesh.replicas > 1:
                runner.recipe.sync_gradients = partial(self.mesh.reduce_gradients, index)
                if cfg.runtime.sync_bn:
                    synchronise_batchnorm(runner.net, self.mesh.role_groups[index])
        self.best: dict[str, dict] = {}  # student role -> {'val_acc', 'epoch', 'state_dict'}
        self.evaluator = Evaluator(cfg, self.runners, self.dataset)
        # A process of frozen roles only (a KD teacher's Ray worker) posts its outputs `teacher.ahead` steps
        # ahead of the others: the students then find them there instead of waiting for its forward.
        self.ahead = cfg.teacher.ahead if cfg.teacher and self.evaluator.only_frozen and hasattr(exchange, "post") \
            else 0
        if self.ahead:
            exchange.depth = self.ahead + 1
        self.others_eval_s = 0.0  # the longest scoring of another process's role, last epoch
        self.caches = self._open_caches() if cfg.teacher and cfg.teacher.cache else {}

    def _open_caches(self) -> dict[str, TeacherCache]:
        """The local frozen teacher's `teacher.cache`, its scores read from there when a run with its key left them."""
        caches = {}
        for runner in self.runners:
            if not runner.role.is_teacher:
                continue
            frozen = self.evaluator.frozen.get(runner.role.name)
            if frozen is None:
                raise ConfigError(CACHE_NEEDS_FROZEN.format(method=self.cfg.method.name))
            cache = TeacherCache(self.cfg.teacher.cache, cache_key(self.cfg, runner, self.dataset, self.mesh.replicas),
                                 self.steps_per_epoch, (self.mesh.replica, self.mesh.replicas),
                                 self.cfg.teacher.cache_topk, self.cfg.teacher.cache_dtype)
            frozen.done.update(cache.scores())
            caches[runner.role.name] = cache
        return caches

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch (0-based), evaluate the roles when `eval` says so; returns every role's metrics merged."""
        scored_before = self.evaluator.images_while_waiting
        metrics = self.train_epoch(epoch)
        for index, runner in zip(self.mesh.roles, self.runners):  # every replica ends the epoch the same
            self.mesh.average_buffers(index, runner.net)
        if not self.mesh.lead:  # replica 0 scores and reports for every replica; the others add their losses
            self.exchange.gather_objects({k: v for k, v in metrics.items() if "/loss_" in k})
            return {}
        metrics.update(self.evaluate(epoch + 1))
        if self.evaluator.only_frozen:
            for runner in self.runners:
                metrics[f"{runner.role.name}/images_scored_waiting"] = self.evaluator.images_while_waiting - scored_before
        merged = {"epoch": float(epoch + 1)}
        for rank, part in enumerate(self.exchange.gather_objects(metrics)):
            if rank < self.mesh.processes:
                merged.update(part)
            else:  # another replica's share of the losses
                for key, value in part.items():
                    merged[key] += value
        mine = {r.role.name for r in self.runners}
        self.others_eval_s = max((v for k, v in merged.items() if k.endswith("/eval_s") and k.split("/")[0] not in mine),
                                 default=0.0)
        students = [k.split("/")[0] for k in merged if k.startswith("student_") and k.endswith("/val_acc")]
        if students:  # an epoch without val scores has no objective
            top = max(students, key=lambda s: merged[f"{s}/val_acc"])
            merged[OBJECTIVE] = merged[f"{top}/val_acc"]  # what sweeps maximise: validation only
            if f"{top}/test_acc" in merged:  # reported beside it, never searched on
                merged["best_student_test_acc"] = merged[f"{top}/test_acc"]
        return merged

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Score the local roles after `epoch` (1-based), and keep the best students. A process of frozen roles
        only then waits at the gather for the others' scoring, about as long as it took them last epoch: it
        scores ahead meanwhile."""
        metrics, started = {}, time.perf_counter()
        for runner in self.runners:
            start = time.perf_counter()
            scores = self.evaluator.scores(runner, epoch, partial(self.monitor.scoring, runner.role.name))
            metrics.update(scores)
            metrics[f"{runner.role.name}/eval_s"] = time.perf_counter() - start
            self._keep_best(runner, scores, epoch)
        self.monitor.idle()
        self.evaluator.fill(0.8 * (self.others_eval_s - (time.perf_counter() - started)))
        for name, cache in self.caches.items():  # a frozen teacher's scores, for every later run with its key
            done = self.evaluator.frozen[name].done
            if len(done) == len(SPLITS) and done != cache.scores():
                cache.keep_scores(done)
        return metrics

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch (0-based) of the local roles' steps, without scoring; their metrics."""
        sums: dict[str, dict[str, float]] = {r.role.name: {} for r in self.runners}
        compute = {r.role.name: 0.0 for r in self.runners}
        steps, samples = 0, 0
        self.exchange.seconds = self.exchange.waited = 0.0
        self.mesh.reduce_s.clear()
        start = time.perf_counter()
        self.monitor.start_epoch(epoch, self.steps_per_epoch)
        checksum = BatchChecksum() if self.cfg.data.checksum else None
        size, n = self.cfg.data.batch_size, len(self.dataset.train.labels)
        in_flight: deque = deque()  # steps posted ahead, oldest first
        most_ahead = 0
        for step, (x, y) in enumerate(seeded_batches(self.dataset, size, self.cfg.seed, epoch,
                                                     self.cfg.optim.steps_per_epoch,
                                                     (self.mesh.replica, self.mesh.replicas))):
            if checksum:
                checksum.add(x, y)
            batch = min(size, n - step * size)  # the global batch: what every replica together trains on
            samples += batch
            x, y = self.mesh.shard(x, y, batch)
            x, y = x.to(self.device), y.to(self.device)
            outputs, published = {}, {}
            for r in self.runners:
                t = time.perf_counter()
                outputs[r.role.name], published[r.role.name] = self._forward(r, x, y, epoch, step)
                compute[r.role.name] += time.perf_counter() - t
            if self.ahead:  # nothing comes back that a frozen role needs: wait only when too far ahead
                while in_flight and in_flight[0].done():  # steps the others have taken
                    in_flight.popleft().wait()
                in_flight.append(self.exchange.post(published))
                most_ahead = max(most_ahead, len(in_flight) - 1)
                if len(in_flight) > self.ahead:
                    self._await(in_flight.popleft())
                everyone = {}
            else:
                if self.mesh.lead:
                    self.evaluator.use_wait(self.exchange.slack_s)
                everyone = self.exchange.all_gather(published)
            losses, lrs = {}, {}
            for r in self.runners:
                t = time.perf_counter()
                if r.optimizer:
                    lrs[r.role.name] = r.optimizer.param_groups[0]["lr"]  # this step's, before the update
                losses[r.role.name] = r.update(outputs[r.role.name], everyone, y, epoch)
                for term, value in losses[r.role.name].items():  # a shard's loss, weighted to the global batch
                    sums[r.role.name][term] = sums[r.role.name].get(term, 0.0) + value * self.mesh.share
                compute[r.role.name] += time.perf_counter() - t
            steps += 1
            self.monitor.after_step(steps, batch, {k: v for k, v in losses.items() if v}, lrs)
        while in_flight:
            self._await(in_flight.popleft())
        for cache in self.caches.values():
            cache.flush()
        self.monitor.idle()
        wall = time.perf_counter() - start
        metrics: dict[str, float] = {}
        for index, r in zip(self.mesh.roles, self.runners):
            name = r.role.name
            metrics.update({f"{name}/loss_{term}": total / steps for term, total in sums[name].items()})
            metrics[f"{name}/samples_per_s"] = samples / wall
            metrics[f"{name}/compute_ms"] = 1000 * compute[name] / steps
            metrics[f"{name}/exchange_ms"] = 1000 * self.exchange.seconds / steps
            metrics[f"{name}/wait_ms"] = 1000 * self.exchange.waited / steps
            if name in self.caches:  # steps read from teacher.cache, and computed (then stored)
                cache = self.caches[name]
                metrics[f"{name}/cache_hits"], metrics[f"{name}/cache_misses"] = float(cache.hits), float(cache.misses)
                metrics[f"{name}/cache_corrupt"] = float(cache.corrupt)
                cache.hits = cache.misses = cache.corrupt = 0
            if self.ahead:  # how far ahead of the others this frozen role got (its queue was full at teacher.ahead)
                metrics[f"{name}/steps_ahead"] = float(most_ahead)
            if self.mesh.replicas > 1 and r.trains:  # the gradient all-reduce across the replicas
                metrics[f"{name}/allreduce_ms"] = 1000 * self.mesh.reduce_s.get(index, 0.0) / steps
            if r.scheduler:
                metrics[f"{name}/lr"] = r.optimizer.param_groups[0]["lr"]
            if checksum:
                metrics[f"{name}/data_checksum"] = float(checksum.value)
        return metrics

    def _forward(self, runner: RoleRunner, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int):
        """The role's (outputs, published) this step: a cached teacher's from its `teacher.cache` when there,
        else computed (and, cached, stored: the students get the stored values either way)."""
        cache = self.caches.get(runner.role.name)
        if cache is None:
            return runner.forward(x, y)
        stored = cache.get(epoch, step, self.device)
        if stored is None:
            _, published = runner.forward(x, y)
            stored = cache.put(epoch, step, published)
        return stored, stored

    def _await(self, posted) -> None:
        """Wait for the others to take a step posted ahead, scoring the frozen roles meanwhile (replica 0)."""
        while self.mesh.lead and not posted.done():
            if self.evaluator.fill(0.02) < 1e-3:  # nothing left to score: just wait
                break
        posted.wait()

    def _keep_best(self, runner: RoleRunner, scores: dict[str, float], epoch: int) -> None:
        name = runner.role.name
        if runner.role.is_teacher or f"{name}/val_acc" not in scores:
            return
        val = scores[f"{name}/val_acc"]
        if name not in self.best or val > self.best[name]["val_acc"]:
            self.best[name] = {"val_acc": val, "epoch": epoch,
                               "state_dict": copy.deepcopy(runner.net.backbone.state_dict())}

    # --- checkpoints -------------------------------------------------------
    def role_states(self) -> dict[str, dict]:
        """What each local role saves: its training state, plus a student's best weights so far (replica 0's:
        every replica holds the same)."""
        if not self.mesh.lead:
            return {}
        return {r.role.name: {**r.state_dict(), "best": self.best.get(r.role.name)} for r in self.runners}

    def load_role_states(self, states: dict[str, dict]) -> None:
        for r in self.runners:
            state = states[r.role.name]
            r.load_state_dict(state)
            if state.get("best") is not None:
                self.best[r.role.name] = state["best"]


ProgressFn = Callable[[dict[str, float]], None]


def progress_line(total_epochs: int) -> ProgressFn:
    """One line per epoch, from its history record: every head's val/test top-1 (`-` for a split `eval` left
    unscored), the epoch's training throughput (the slowest role's: what the run trains at)."""

    def show(m: dict[str, float]) -> None:
        heads = sorted({k.split("/")[0] for k in m if k.endswith(("/val_acc", "/test_acc"))})
        acc = lambda key: f"{m[key]:.1f}" if key in m else "-"  # noqa: E731
        accs = "  ".join(f"{h} {acc(f'{h}/val_acc')}/{acc(f'{h}/test_acc')}" for h in heads)
        speed = min(v for k, v in m.items() if k.endswith("/samples_per_s"))
        scored = f"val/test top-1: {accs}" if heads else "not scored (eval.every)"
        print(f"epoch {int(m['epoch'])}/{total_epochs}  {scored}  ({speed:.0f} samples/s{teacher_note(m)})", flush=True)

    return show


def teacher_note(m: dict[str, float]) -> str:
    """How a frozen teacher served its students this epoch: how far ahead it ran, what it read from
    `teacher.cache`, and how long the students waited at the exchange per step ('' without those)."""
    notes = []
    if "teacher/steps_ahead" in m:
        notes.append(f"teacher {m['teacher/steps_ahead']:.0f} steps ahead")
    if "teacher/cache_hits" in m:
        hits, misses = m["teacher/cache_hits"], m["teacher/cache_misses"]
        notes.append(f"cache {hits:.0f}/{hits + misses:.0f} steps read")
        if m.get("teacher/cache_corrupt"):
            notes.append(f"{corrupt_chunks(m['teacher/cache_corrupt'])} of teacher.cache computed again")
    waits = [v for k, v in m.items() if k.startswith("student_") and k.endswith("/wait_ms")]
    if notes and waits:
        notes.append(f"students waited {max(waits):.1f} ms/step")
    return "".join(f", {n}" for n in notes)


def corrupt_chunks(count: float) -> str:
    return f"{count:.0f} corrupt chunk{'s' if count != 1 else ''}"


def fit(session: Session, store, sync=None, progress: ProgressFn | None = None) -> History:
    """Run the remaining epochs: restore, then per epoch train+evaluate, checkpoint, log, show.

    `store` restores and saves checkpoints (`restore(session) -> History`,
    `save(session, history)`); `sync` logs new epochs to MLflow once the
    checkpoint holding them is safe, so a restart never logs an epoch twice.
    """
    history = store.restore(session)
    if sync is not None:
        sync.sync(history)
    for epoch in range(len(history), session.cfg.optim.epochs):
        history.append(session.run_epoch(epoch))
        with held():  # a stop signal waits for the checkpoint and its metrics (see ray_kd.stopping)
            store.save(session, history)
            if sync is not None:
                sync.sync(history)
        if progress is not None:
            progress(history[-1])
    return history

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
from contextlib import contextmanager
from functools import partial
from typing import Callable

import torch

from ray_kd.config import ConfigError, RunConfig
from ray_kd.data import Dataset, epoch_steps
from ray_kd.datasets import load_dataset
from ray_kd.evaluation import OBJECTIVE, SPLITS, Evaluator
from ray_kd.progress import StepMonitor
from ray_kd.replicas import Mesh, synchronise_batchnorm
from ray_kd.roles import RoleRunner, all_roles
from ray_kd.stopping import held
from ray_kd.teacher_cache import CACHE_NEEDS_FROZEN, TeacherCache, cache_key
from ray_kd.train_input import DECODE_SUMS, Feed, SeededFeed, TrainInput, decode_summary

History = list[dict[str, float]]
"""One dict of merged metrics (every role's) per completed epoch; entry i has 'epoch' == i + 1."""


class Session:
    def __init__(self, cfg: RunConfig, role_indices: list[int], exchange, device: torch.device,
                 dataset: Dataset | None = None, monitor: StepMonitor | None = None, mesh: Mesh | None = None,
                 feed: Feed | None = None):
        """`mesh`: this process's place among data-parallel replicas (`runtime.replicas`; None: one replica).
        `feed`: where the training batches come from (None: drawn here, `SeededFeed`)."""
        self.cfg, self.exchange, self.device = cfg, exchange, device
        self.mesh = mesh or Mesh(1, 0, 1, role_indices)
        self.monitor = monitor or StepMonitor(cfg.optim.epochs, exchange)
        self.dataset = dataset or load_dataset(cfg.data)
        self.input = TrainInput(feed or SeededFeed(self.dataset, cfg.data.batch_size, cfg.seed,
                                                   cfg.optim.steps_per_epoch, (self.mesh.replica, self.mesh.replicas)),
                                cfg.data.checksum)
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
            self.exchange.gather_objects({k: v for k, v in metrics.items() if "/loss_" in k or k in DECODE_SUMS})
            return {}
        metrics.update(self.evaluate(epoch + 1))
        if self.evaluator.only_frozen:
            for runner in self.runners:
                metrics[f"{runner.role.name}/images_scored_waiting"] = self.evaluator.images_while_waiting - scored_before
        merged = {"epoch": float(epoch + 1)}
        for rank, part in enumerate(self.exchange.gather_objects(metrics)):
            for key, value in part.items():
                if key in DECODE_SUMS:  # each decoding process's own
                    merged[key] = merged.get(key, 0.0) + value
                elif rank < self.mesh.processes:
                    merged[key] = value
                else:  # another replica's share of the losses
                    merged[key] += value
        merged.update(decode_summary(merged))
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
        tally = EpochTally([r.role.name for r in self.runners])
        self.exchange.seconds = self.exchange.waited = 0.0
        self.mesh.reduce_s.clear()
        self.monitor.start_epoch(epoch, self.steps_per_epoch)
        posting = PostedAhead(self.exchange, self.ahead, self._await) if self.ahead else None
        for step, (x, y) in enumerate(self.input.epoch(epoch)):
            batch = self._global_batch(step)
            x, y = self.mesh.shard(x, y, batch)
            x, y = x.to(self.device), y.to(self.device)
            outputs, published = self._forward_all(x, y, epoch, step, tally)
            everyone = self._share(published, posting)
            losses, lrs = self._update_all(outputs, everyone, y, epoch, tally)
            tally.steps += 1
            tally.samples += batch
            self.monitor.after_step(tally.steps, batch, {k: v for k, v in losses.items() if v}, lrs)
        if posting:
            posting.drain()
        for cache in self.caches.values():
            cache.flush()
        self.monitor.idle()
        return self._epoch_metrics(tally, posting)

    def _global_batch(self, step: int) -> int:
        """The size of step `step`'s global batch: what every replica together trains on (the last may be short)."""
        size = self.cfg.data.batch_size
        return min(size, len(self.dataset.train.labels) - step * size)

    def _forward_all(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int, tally: EpochTally):
        """Every local role's (outputs, published) this step."""
        outputs, published = {}, {}
        for r in self.runners:
            with tally.computing(r.role.name):
                outputs[r.role.name], published[r.role.name] = self._forward(r, x, y, epoch, step)
        return outputs, published

    def _share(self, published: dict, posting: PostedAhead | None) -> dict:
        """Every role's published outputs this step; a frozen-only process posts its own ahead and needs none."""
        if posting:
            posting.post(published)
            return {}
        if self.mesh.lead:
            self.evaluator.use_wait(self.exchange.slack_s)
        return self.exchange.all_gather(published)

    def _update_all(self, outputs: dict, everyone: dict, y: torch.Tensor, epoch: int, tally: EpochTally):
        """Every local role's update; (losses, learning rates used) by role."""
        losses, lrs = {}, {}
        for r in self.runners:
            with tally.computing(r.role.name):
                if r.optimizer:
                    lrs[r.role.name] = r.optimizer.param_groups[0]["lr"]  # this step's, before the update
                losses[r.role.name] = r.update(outputs[r.role.name], everyone, y, epoch)
                tally.add_losses(r.role.name, losses[r.role.name], self.mesh.share)
        return losses, lrs

    def _epoch_metrics(self, tally: EpochTally, posting: PostedAhead | None) -> dict[str, float]:
        wall, steps = tally.wall_s(), max(tally.steps, 1)
        metrics = self.input.decode_metrics(wall)
        if not isinstance(self.dataset, Dataset):  # streamed: what its decodes are counted against
            metrics["data/images_trained"] = float(tally.samples)
        for index, r in zip(self.mesh.roles, self.runners):
            name = r.role.name
            metrics.update({f"{name}/loss_{term}": total / steps for term, total in tally.losses[name].items()})
            metrics[f"{name}/samples_per_s"] = tally.samples / wall
            metrics[f"{name}/compute_ms"] = 1000 * tally.compute[name] / steps
            metrics[f"{name}/exchange_ms"] = 1000 * self.exchange.seconds / steps
            metrics[f"{name}/wait_ms"] = 1000 * self.exchange.waited / steps
            metrics.update(self.input.role_metrics(name, steps))
            if name in self.caches:
                metrics.update(self._cache_metrics(name))
            if posting:  # how far ahead of the others this frozen role got (its queue was full at teacher.ahead)
                metrics[f"{name}/steps_ahead"] = float(posting.most_ahead)
            if self.mesh.replicas > 1 and r.trains:  # the gradient all-reduce across the replicas
                metrics[f"{name}/allreduce_ms"] = 1000 * self.mesh.reduce_s.get(index, 0.0) / steps
            if r.scheduler:
                metrics[f"{name}/lr"] = r.optimizer.param_groups[0]["lr"]
        return metrics

    def _cache_metrics(self, name: str) -> dict[str, float]:
        """Steps read from teacher.cache, computed (then stored), and found corrupt this epoch."""
        cache = self.caches[name]
        metrics = {f"{name}/cache_hits": float(cache.hits), f"{name}/cache_misses": float(cache.misses),
                   f"{name}/cache_corrupt": float(cache.corrupt)}
        cache.hits = cache.misses = cache.corrupt = 0
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


class EpochTally:
    """What an epoch's steps add up: each role's loss terms and compute time, the steps and samples, since it began."""

    def __init__(self, roles: list[str]):
        self.losses: dict[str, dict[str, float]] = {name: {} for name in roles}
        self.compute = {name: 0.0 for name in roles}
        self.steps, self.samples, self.started = 0, 0, time.perf_counter()

    @contextmanager
    def computing(self, role: str):
        started = time.perf_counter()
        yield
        self.compute[role] += time.perf_counter() - started

    def add_losses(self, role: str, losses: dict[str, float], share: float) -> None:
        """A shard's loss terms, weighted to the global batch."""
        for term, value in losses.items():
            self.losses[role][term] = self.losses[role].get(term, 0.0) + value * share

    def wall_s(self) -> float:
        return time.perf_counter() - self.started


class PostedAhead:
    """A frozen-only process's steps posted to the others ahead of time (`teacher.ahead`), oldest first: nothing
    comes back that its roles need, so it waits (`wait(posted)`) only when more than `ahead` are still untaken."""

    def __init__(self, exchange, ahead: int, wait: Callable):
        self.exchange, self.ahead, self.wait = exchange, ahead, wait
        self.queue: deque = deque()
        self.most_ahead = 0

    def post(self, published: dict) -> None:
        while self.queue and self.queue[0].done():  # steps the others have taken
            self.queue.popleft().wait()
        self.queue.append(self.exchange.post(published))
        self.most_ahead = max(self.most_ahead, len(self.queue) - 1)
        if len(self.queue) > self.ahead:
            self.wait(self.queue.popleft())

    def drain(self) -> None:
        while self.queue:
            self.wait(self.queue.popleft())


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
        print(f"epoch {int(m['epoch'])}/{total_epochs}  {scored}  ({speed:.0f} samples/s{teacher_note(m)}"
              f"{input_note(m)})", flush=True)

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


def input_note(m: dict[str, float]) -> str:
    """How the streamed input kept up this epoch: images decoded per second and their CPU cost, and the longest any
    role waited for its batch per step ('' in memory mode)."""
    if "data/images_decoded_per_s" not in m:
        return ""
    waits = [v for k, v in m.items() if k.endswith("/input_wait_ms")]
    note = (f", decoded {m['data/images_decoded_per_s']:.0f} images/s "
            f"at {m.get('data/decode_cpu_ms_per_image', 0.0):.1f} CPU-ms each")
    return note + (f", input waited {max(waits):.1f} ms/step" if waits else "")


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

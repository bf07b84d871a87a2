"""Which epochs score which splits, and a frozen role scored once, in the time it would wait.

Scoring every role on val and test after every epoch can cost more than the
epoch's training; the `eval` section thins it out (the last epoch always
scores val and test), and a role whose outputs can never change (a frozen
teacher) is scored once and its top-1 reused. On a Ray worker that holds only
frozen roles, that scoring runs a few images at a time while the worker waits
for slower roles at the exchange, so by the end of training it is usually done.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterator

from torch import nn

from ray_kd.config import ConfigError, RunConfig
from ray_kd.data import Dataset, eval_batches

SPLITS = ("val", "test")
OBJECTIVE = "best_student_val_acc"
"""Per epoch: the val top-1 of the best student that epoch (what sweeps maximise: validation only)."""

Progress = Callable[[str, int, int], None]
"""Told after each batch scored: the split, its images done, its images."""


def splits_at(cfg: RunConfig, epoch: int) -> tuple[str, ...]:
    """The splits scored after `epoch` (1-based): none, some, or at the last epoch all of them."""
    if epoch >= cfg.optim.epochs:
        return SPLITS
    if epoch % cfg.eval.every:
        return ()
    return tuple(s for s in SPLITS if s in cfg.eval.splits)


def require_val_every_epoch(cfg: RunConfig) -> None:
    """Tune's searcher and scheduler read the val objective from every epoch's report."""
    if cfg.eval.every != 1 or "val" not in cfg.eval.splits:
        raise ConfigError(f"a sweep reads val top-1 after every epoch, but eval.every={cfg.eval.every} and "
                          f"eval.splits={cfg.eval.splits}: set eval.every=1 and keep val in eval.splits")


def is_frozen(runner) -> bool:
    """Nothing of the role trains and nothing of it runs in training mode: its outputs for an image
    never change (a frozen KD teacher). A teacher with a trained bridge or heads (SOKD, MTKD-SSR), with
    BN in train mode, or with a stateful input sampler (LW-KD's draws, a leaf left in train mode) is not."""
    return not runner.trains and frozen_module(runner.net)


def frozen_module(net: nn.Module) -> bool:
    """`is_frozen` of a role's module, before a runner (and its optimiser) is built for it (the preflight)."""
    if any(p.requires_grad for p in net.parameters()):
        return False
    net.train()  # as every training step does: a frozen backbone stays in eval mode
    containers = (nn.ModuleDict, nn.ModuleList, nn.Sequential)
    leaves = [m for m in net.modules() if not list(m.children()) and not isinstance(m, containers)]
    return not any(m.training for m in leaves)


FROZEN_CHUNK = 32
"""Images per forward when a frozen role is scored, ahead of need or not (so both give the same numbers):
few enough to fit in one step's wait for a slower role."""


class FrozenScore:
    """A frozen role's top-1 on every split, computed a chunk at a time in the order the run asks for them."""

    def __init__(self, runner, dataset: Dataset, order: tuple[str, ...]):
        self.runner = runner
        self.done: dict[str, dict[str, float]] = {}  # split -> the role's scores on it
        self.chunk_s = 0.0  # running estimate of one chunk's seconds
        self.position = ("", 0, 0)  # the split being scored, its images done, its images
        self._chunks = self._score(dataset, order)

    def _score(self, dataset: Dataset, order: tuple[str, ...]) -> Iterator[int]:
        """Yields each chunk's size once it is counted; a split's scores land in `done` after its last chunk."""
        for split_name in order:
            if split_name in self.done:  # read from teacher.cache
                continue
            split, correct, scored = getattr(dataset, split_name), {}, 0
            for x, y in eval_batches(split, dataset):
                for start in range(0, len(y), FROZEN_CHUNK):
                    labels = y[start:start + FROZEN_CHUNK]
                    for head, n in self.runner.correct(x[start:start + FROZEN_CHUNK], labels).items():
                        correct[head] = correct.get(head, 0) + n
                    scored += len(labels)
                    self.position = (split_name, scored, len(split.labels))
                    yield len(labels)
            self.done[split_name] = {f"{head}/{split_name}_acc": 100.0 * n / len(split.labels)
                                     for head, n in correct.items()}

    def advance(self, budget_s: float) -> int:
        """Score chunks for at most about `budget_s` seconds; returns how many images were scored."""
        images, spent = 0, 0.0
        while spent + self.chunk_s < budget_s:
            start = time.perf_counter()
            scored = next(self._chunks, 0)
            if not scored:  # every split is done
                break
            took = time.perf_counter() - start
            self.chunk_s = took if not self.chunk_s else 0.8 * self.chunk_s + 0.2 * took
            spent += took
            images += scored
        return images

    def scores(self, split: str, progress: Progress | None = None) -> dict[str, float]:
        """The split's scores, once whatever was not scored ahead is (`progress` told after each chunk)."""
        while split not in self.done:
            if next(self._chunks, 0) and progress is not None:  # the resume after a split's last chunk records it
                progress(*self.position)
        return self.done[split]


class Evaluator:
    """Scores the local roles at the epochs `splits_at` names; a frozen role once per split per process."""

    def __init__(self, cfg: RunConfig, runners: list, dataset: Dataset):
        self.cfg, self.dataset = cfg, dataset
        order = tuple(sorted(SPLITS, key=lambda s: s not in cfg.eval.splits))  # the first one needed first
        self.frozen = {r.role.name: FrozenScore(r, dataset, order) for r in runners if is_frozen(r)}
        self.only_frozen = len(self.frozen) == len(runners)
        self.wait_s = 0.0  # running estimate of one step's wait for the other ranks, before any scoring in it
        self._spent = deque([0.0, 0.0], maxlen=2)  # scoring seconds in the last two steps' waits
        self.images_while_waiting = 0

    def scores(self, runner, epoch: int, progress: Progress | None = None) -> dict[str, float]:
        splits = splits_at(self.cfg, epoch)
        if runner.role.name not in self.frozen:
            return runner.evaluate(self.dataset, splits, progress) if splits else {}
        frozen = self.frozen[runner.role.name]
        return {k: v for split in splits for k, v in frozen.scores(split, progress).items()}

    def use_wait(self, slack_s: float) -> None:
        """Just before a step's exchange, score frozen roles for about the time this process will wait there
        for the others. `slack_s` is what the exchange measured two steps ago (`CollectiveExchange.slack_s`), the
        wait left after what was scored then; 80% of the running estimate is used, so that the others do not
        wait for this one."""
        if not self.only_frozen:
            return
        self.wait_s = 0.7 * self.wait_s + 0.3 * (self._spent[0] + slack_s)
        self._spent.append(self.fill(0.8 * self.wait_s))

    def fill(self, budget_s: float) -> float:
        """Score frozen roles for at most about `budget_s` seconds of a wait for the others; returns the seconds
        spent. Only where every local role is frozen: a process with a role that trains (every role of the
        single-process executor) does not wait for nothing."""
        start = time.perf_counter()
        if self.only_frozen:
            for frozen in self.frozen.values():
                self.images_while_waiting += frozen.advance(budget_s - (time.perf_counter() - start))
        return time.perf_counter() - start

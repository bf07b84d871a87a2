"""Which epochs score which splits, and a frozen role scored once.

Scoring every role on val and test after every epoch can cost more than the
epoch's training; the `eval` section thins it out (the last epoch always
scores val and test), and a role whose outputs can never change (a frozen
teacher) is scored once and its top-1 reused.
"""

from __future__ import annotations

from torch import nn

from ray_kd.config import ConfigError, RunConfig
from ray_kd.data import Dataset

SPLITS = ("val", "test")


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
    if runner.trains:
        return False
    runner.net.train()  # as every training step does: a frozen backbone stays in eval mode
    containers = (nn.ModuleDict, nn.ModuleList, nn.Sequential)
    leaves = [m for m in runner.net.modules() if not list(m.children()) and not isinstance(m, containers)]
    return not any(m.training for m in leaves)


class Evaluator:
    """Scores the local roles at the epochs `splits_at` names; a frozen role once per split per process."""

    def __init__(self, cfg: RunConfig, runners: list):
        self.cfg = cfg
        self.frozen = {r.role.name for r in runners if is_frozen(r)}
        self._kept: dict[str, dict[str, dict[str, float]]] = {}  # frozen role -> split -> its scores

    def scores(self, runner, dataset: Dataset, epoch: int) -> dict[str, float]:
        splits = splits_at(self.cfg, epoch)
        if runner.role.name not in self.frozen:
            return runner.evaluate(dataset, splits) if splits else {}
        kept = self._kept.setdefault(runner.role.name, {})
        for split in splits:
            if split not in kept:
                kept[split] = runner.evaluate(dataset, (split,))
        return {k: v for split in splits for k, v in kept[split].items()}

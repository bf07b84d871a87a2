"""What a trial and a sweep came to, in one definition that the console, results.csv and best_config.yaml share.

A trial's figures are those of its best-validation epoch (the first, on a tie; an epoch a resumed trial
reported again counts once); the sweep's best trial is the one with the highest of them among the trials
that ended (ran every epoch, or were stopped early by the scheduler), the first by trial id on a tie. Tune's
own "current best" (the last reported epoch of each trial) is a different figure: its table is off unless
`RAY_KD_TUNE_VERBOSE` asks for it.
"""

from __future__ import annotations

import os

from ray_kd.config import ConfigError
from ray_kd.session import OBJECTIVE

TEST_METRIC = "best_student_test_acc"
SCORED = ("ok", "stopped early")
"""Trial statuses that are final: what the best config is chosen from. The others: error, unfinished."""


def trial_figures(reported: list[dict]) -> dict:
    """epochs, best_epoch, best_val_acc, test_acc_at_best_val from a trial's reported epochs (none: {})."""
    by_epoch = {int(r["epoch"]): r for r in reported if r.get(OBJECTIVE) is not None}
    if not by_epoch:
        return {}
    best_epoch = max(sorted(by_epoch), key=lambda e: by_epoch[e][OBJECTIVE])  # max keeps the first of a tie
    best = by_epoch[best_epoch]
    return {"epochs": len(by_epoch), "best_epoch": best_epoch, "best_val_acc": float(best[OBJECTIVE]),
            "test_acc_at_best_val": float(best[TEST_METRIC])}


def finished_status(epochs_done: int, epochs: int) -> str:
    return "ok" if epochs_done >= epochs else "stopped early"


def best_trial(rows: list[dict]) -> dict | None:
    """The best of the trials that ended (None: none did)."""
    scored = [r for r in sorted(rows, key=lambda r: r["trial_id"]) if r["status"] in SCORED and "best_val_acc" in r]
    return max(scored, key=lambda r: r["best_val_acc"]) if scored else None


def figures(row: dict) -> str:
    return (f"val {row['best_val_acc']:.2f} at epoch {row['best_epoch']} "
            f"(test {row['test_acc_at_best_val']:.2f})")


def trial_line(row: dict, params: list[str], epochs: int) -> str:
    """A trial that ended, in one line: status, its figures, its values."""
    values = " ".join(f"{k}={row.get(k)!r}" for k in params)
    if row["status"] == "error":
        return f"trial {row['trial_id']} failed: {row.get('reason', '')}; {values}"
    done = f"{row.get('epochs', 0)} of {epochs} epochs"
    result = figures(row) if "best_val_acc" in row else "nothing reported"
    return f"trial {row['trial_id']} {row['status']} ({done}): {result}; {values}"


def reason(error: BaseException | None) -> str:
    """A failed trial's error in one line: the trial's own exception, not Ray's wrapping and traceback."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:500]


def tune_verbosity() -> int:
    """Tune's own console output: off (0) unless RAY_KD_TUNE_VERBOSE is 1 (its tables) or 2 (and every result)."""
    value = os.environ.get("RAY_KD_TUNE_VERBOSE", "0")
    if value not in ("0", "1", "2"):
        raise ConfigError(f"config error: RAY_KD_TUNE_VERBOSE={value!r}: use 0 (ray-kd's lines only), 1 (Tune's "
                          "tables as well) or 2 (and every reported result)")
    return int(value)

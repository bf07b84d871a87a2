"""The sweep's console while Tune runs: one line per trial as it ends (Tune's own tables are off by default).

Its own module because it subclasses Tune's Callback (importing Ray), and Tune keeps it in the sweep's saved
state, so a resumed sweep finds it here."""

from __future__ import annotations

from ray import tune

from ray_kd.session import OBJECTIVE
from tuning.outcome import TEST_METRIC, finished_status, reason, trial_figures, trial_line


class TrialLines(tune.Callback):
    """A console line for every trial as it ends (finished, stopped early by the scheduler, or failed), with the
    figures results.csv will hold for it."""

    def __init__(self, params: list[str], epochs: int):
        self.params, self.epochs = params, epochs
        self.reported: dict[str, list[dict]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.reported.setdefault(trial.trial_id, []).append(
            {k: result.get(k) for k in ("epoch", OBJECTIVE, TEST_METRIC)})

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = {"trial_id": trial.trial_id, **trial.config, **trial_figures(self.reported.pop(trial.trial_id, []))}
        row["status"] = finished_status(row.get("epochs", 0), self.epochs)
        print(trial_line(row, self.params, self.epochs), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        row = {"trial_id": trial.trial_id, **trial.config, "status": "error", "reason": reason(trial.get_error())}
        self.reported.pop(trial.trial_id, None)
        print(trial_line(row, self.params, self.epochs), flush=True)

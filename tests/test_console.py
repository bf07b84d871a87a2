"""What a Ray run prints: exactly one line per epoch with that epoch's own numbers (from its checkpoint's record),
progress within an epoch before it, the result at the end; a resumed run's earlier epochs are not repeated, and a
sweep trial prints nothing."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from equivalence import run_on_ray

from ray_kd.run_storage import read_history
from ray_kd.config import load_config

REPO = Path(__file__).resolve().parents[1]


def epoch_line(record: dict, epochs: int) -> str:
    """The line an epoch's history record must print as (two decimals' rounding aside, its own numbers)."""
    heads = sorted(k.split("/")[0] for k in record if k.endswith("/val_acc"))
    accs = "  ".join(f"{h} {record[f'{h}/val_acc']:.1f}/{record[f'{h}/test_acc']:.1f}" for h in heads)
    speed = min(v for k, v in record.items() if k.endswith("/samples_per_s"))
    return f"epoch {int(record['epoch'])}/{epochs}  val/test top-1: {accs}  ({speed:.0f} samples/s)"


def test_a_ray_run_prints_each_epoch_once_with_its_own_numbers(tmp_path, mlflow_uri):
    """The CLI on the default Ray executor, its output a pipe (a log file): 647 steps of 2 images per epoch, so
    that the driver, which asks the workers every 0.5 s, sees each epoch partway."""
    args = ["train", "-c", "configs/digits_dml.yaml", f"output_dir={tmp_path}", "optim.epochs=2",
            "data.batch_size=2", "runtime.progress_every_s=0.01"]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "MLFLOW_TRACKING_URI": mlflow_uri}
    proc = subprocess.run([sys.executable, "-m", "ray_kd.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    run_dir = tmp_path / "digits-dml"
    history = read_history(sorted((run_dir / "checkpoints").glob("epoch_*"))[-1])
    assert [line for line in lines if " top-1: " in line] == [epoch_line(m, 2) for m in history], proc.stdout

    first_epoch = lines.index(epoch_line(history[0], 2))
    step = re.compile(r"epoch (\d)/2  step \d+/647 \(\d+%\)  \d+ img/s  loss student_0 [\d.]+ student_1 [\d.]+  "
                      r"lr 0\.05  ETA \d:\d\d:\d\d")
    steps = [(i, int(m[1])) for i, m in enumerate(map(step.fullmatch, lines)) if m]
    assert any(i < first_epoch for i, _ in steps), proc.stdout  # progress within epoch 1, before its line
    for i, epoch in steps:  # never an epoch's progress after its own line
        assert i < lines.index(epoch_line(history[epoch - 1], 2)), proc.stdout

    summary = json.loads((run_dir / "summary.json").read_text())
    h = summary["headline"]
    best = next(i for i, line in enumerate(lines) if line.startswith("best: "))
    assert lines[best] == (
        f"best: {summary['best_student']} at epoch {h['best_epoch']} of 2, val top-1 {h['val_acc_at_best']:.2f}, test "
        f"top-1 {h['test_acc_at_best_val']:.2f} (last epoch: {h['last_val_acc']:.2f} / {h['last_test_acc']:.2f})"), proc.stdout
    assert lines[best + 1:best + 3] == [summary["card"]["line"], f"summary: {run_dir / 'summary.json'}"], proc.stdout
    assert lines[best + 3].startswith("the run in MLflow: http://127.0.0.1:5000/#/experiments/"), proc.stdout


def test_a_resumed_ray_run_prints_only_its_new_epochs_and_a_trial_nothing(ray_cluster, tmp_path, capsys):
    overrides = [f"output_dir={tmp_path}", "name=resumed", "optim.steps_per_epoch=3", "optim.milestones=[5]"]
    records = []
    run_on_ray(load_config(None, [*overrides, "optim.epochs=1"]), on_epoch=records.append, show_progress=False)
    assert capsys.readouterr().out == ""  # a sweep trial: every record to Tune, nothing on the console
    assert records == read_history(sorted((tmp_path / "resumed" / "checkpoints").glob("epoch_*"))[-1])

    last = run_on_ray(load_config(None, [*overrides, "optim.epochs=2"]))  # raised: epoch 2 runs
    history = read_history(last)
    assert len(history) == 2 and history[0] == records[0]
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if " top-1: " in line] == [epoch_line(history[1], 2)], out

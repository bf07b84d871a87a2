"""Progress within an epoch: step metrics in MLflow at the chosen interval, plain lines off a terminal (steps and
scoring), a bar on one, and the Ray driver's view of its workers' statuses."""

import dataclasses
import io
import time

import pytest

from ray_kd.config import load_config
from ray_kd.progress import ProgressDisplay, ScoringStatus, StepMetricLogger, StepStatus, group_status
from ray_kd.ray_executor import Console
from ray_kd.local_executor import train_here
from ray_kd.run_storage import RunStorage
from ray_kd.tracking import MetricSync, client, start_or_resume

STATUS = StepStatus(epoch=2, epochs=3, step=5, steps=10, samples_per_s=321.0, eta_s=75.0,
                    losses={"student_0": {"ce": 1.0, "total": 1.25}}, lrs={"student_0": 0.05})


def test_step_metrics_at_the_interval_and_plain_lines_off_a_terminal(tmp_path, mlflow_uri, capsys):
    overrides = [f"output_dir={tmp_path}", "name=steps", "runtime.executor=local", "optim.epochs=2",
                 "optim.milestones=[1]", "optim.steps_per_epoch=4", "tracking.log_every_steps=3",
                 "runtime.progress_every_s=0.001"]
    cfg = load_config(None, overrides)
    run = RunStorage.of(cfg)
    run_id = start_or_resume(cfg, run, mlflow_uri)
    train_here(cfg, run, MetricSync(mlflow_uri, run_id))  # what `ray-kd train` runs on the local executor
    mlflow = client(mlflow_uri)

    def steps(name):
        return [(int(m.step), m.value) for m in mlflow.get_metric_history(run_id, name)]

    assert [s for s, _ in steps("student_1/steps/loss_total")] == [3, 6]  # global steps, every 3rd
    assert [s for s, _ in steps("student_0/val_acc")] == [1, 2]  # the epoch metrics keep their own axis
    # Where the run is (epoch, step, ETA, images/s) is the console's, not charts of counters in MLflow.
    logged = set(mlflow.get_run(run_id).data.metrics)
    assert not [k for k in logged if k.startswith("progress/") or k.endswith(("eta_s", "/step", "/steps"))], logged
    assert {k.split("/steps/")[1] for k in logged if "/steps/" in k} == {"loss_ce", "loss_kd", "loss_total", "lr"}
    lr = dict(steps("student_0/steps/lr"))
    assert lr == pytest.approx({3: 0.05, 6: 0.005})  # milestone at epoch 1 = global step 4

    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if " step " in line]
    assert any(line.startswith("epoch 1/2  step 4/4 (100%)") for line in lines), out
    assert all("img/s  loss student_0 " in line and " student_1 " in line and "ETA" in line for line in lines), out
    scoring = [line for line in out.splitlines() if " scoring " in line]  # after the steps, before the epoch line
    assert scoring[:2] == ["epoch 1/2  scoring student_0 on val: 144/144 images (100%)",
                           "epoch 1/2  scoring student_0 on test: 360/360 images (100%)"], out
    assert out.index("epoch 1/2  step 4/4") < out.index(scoring[0]) < out.index("epoch 1/2  val/test top-1: "), out

    # A worker group restarted from the epoch-1 checkpoint re-runs epoch 2: its steps are not logged twice.
    StepMetricLogger(mlflow, run_id).log(6, STATUS)
    assert [s for s, _ in steps("student_1/steps/loss_total")] == [3, 6]


def test_bar_on_a_terminal():
    stream = io.StringIO()
    display = ProgressDisplay(30.0, stream=stream, tty=True)
    display.show(STATUS)
    time.sleep(0.2)  # tqdm redraws at most every 0.1 s
    display.show(dataclasses.replace(STATUS, step=6))
    display.show(ScoringStatus(2, 3, "student_0", "val", 512, 1000))  # the step bar goes, a scoring bar comes
    display.close()
    shown = stream.getvalue()
    assert "epoch 2/3" in shown and "6/10" in shown and "321 img/s  loss student_0 1.2500  lr 0.05" in shown
    assert "epoch 2/3 scoring student_0 on val:  51%" in shown and "512/1000" in shown


def test_the_ray_group_shows_as_one_status():
    """Every rank's roles' losses on rank 0's step (replica 0's where replicas share a role); a scoring rank's
    status while one scores; nothing while every rank is between statuses."""
    rank0 = StepStatus(2, 3, 5, 10, 300.0, 10.0, {"student_0": {"total": 1.0}}, {"student_0": 0.05})
    rank1 = StepStatus(2, 3, 6, 10, 290.0, 9.0, {"student_1": {"total": 2.0}}, {"student_1": 0.04})
    replica1 = dataclasses.replace(rank0, losses={"student_0": {"total": 9.0}}, lrs={"student_0": 0.5})
    merged = group_status([rank0, rank1, replica1, None])
    assert (merged.step, merged.samples_per_s) == (5, 300.0)
    assert merged.losses == {"student_0": {"total": 1.0}, "student_1": {"total": 2.0}}
    assert merged.lrs == {"student_0": 0.05, "student_1": 0.04}
    scoring = ScoringStatus(2, 3, "student_1", "test", 2048, 10000)
    assert group_status([rank0, scoring, None]) is scoring
    assert scoring.line() == "epoch 2/3  scoring student_1 on test: 2,048/10,000 images (20%)"
    assert group_status([None, None]) is None and group_status([]) is None


def test_the_ray_console_shows_each_epoch_once_and_no_stale_status(tmp_path, capsys):
    cfg = load_config(None, [f"output_dir={tmp_path}", "optim.epochs=3", "runtime.progress_every_s=0.001"])
    console = Console(cfg, RunStorage.of(cfg))
    record = {"epoch": 1.0, "student_0/val_acc": 91.25, "student_0/test_acc": 90.0, "student_0/samples_per_s": 812.4,
              "student_1/val_acc": 88.0, "student_1/test_acc": 87.75, "student_1/samples_per_s": 790.6}
    step = dataclasses.replace(STATUS, epoch=1)
    console.workers([step, None])
    console.workers([step, None])  # the same status again: no second line
    console.epoch(record)
    console.epoch(record)  # seen again (a second look at the same checkpoint): no second line
    console.workers([ScoringStatus(1, 3, "student_1", "val", 10, 100)])  # epoch 1 has its line: stale
    console.epoch({"epoch": 2.0, "student_0/samples_per_s": 800.0, "student_1/samples_per_s": 799.0})  # eval.every
    assert capsys.readouterr().out.splitlines() == [
        "epoch 1/3  step 5/10 (50%)  321 img/s  loss student_0 1.2500  lr 0.05  ETA 0:01:15",
        "epoch 1/3  val/test top-1: student_0 91.2/90.0  student_1 88.0/87.8  (791 samples/s)",
        "epoch 2/3  not scored (eval.every)  (799 samples/s)"]

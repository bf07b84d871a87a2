"""Progress within an epoch: step metrics in MLflow at the chosen interval, plain lines off a terminal,
a bar on one, and the Ray driver's view read back from MLflow."""

import dataclasses
import io
import threading
import time

import pytest

from ray_kd.config import load_config
from ray_kd.progress import ProgressDisplay, StepMetricLogger, StepStatus
from ray_kd.ray_executor import watch_progress
from ray_kd.local_executor import run_local
from ray_kd.tracking import MetricSync, client, start_or_resume

STATUS = StepStatus(epoch=2, epochs=3, step=5, steps=10, samples_per_s=321.0, eta_s=75.0,
                    losses={"student_0": {"ce": 1.0, "total": 1.25}}, lrs={"student_0": 0.05})


def test_step_metrics_at_the_interval_and_plain_lines_off_a_terminal(tmp_path, mlflow_uri, capsys):
    overrides = [f"output_dir={tmp_path}", "name=steps", "runtime.executor=local", "optim.epochs=2",
                 "optim.milestones=[1]", "optim.steps_per_epoch=4", "tracking.log_every_steps=3",
                 "runtime.progress_every_s=0.001"]
    cfg = load_config(None, overrides)
    run_id = start_or_resume(cfg, mlflow_uri)
    run_local(cfg, MetricSync(mlflow_uri, run_id))  # what `ray-kd train` runs on the local executor
    mlflow = client(mlflow_uri)

    def steps(name):
        return [(int(m.step), m.value) for m in mlflow.get_metric_history(run_id, name)]

    assert [s for s, _ in steps("student_1/step_loss_total")] == [3, 6]  # global steps, every 3rd
    assert [v for _, v in steps("progress/step")] == [3, 2]  # step 3 of epoch 1, step 2 of epoch 2
    assert [v for _, v in steps("progress/epoch")] == [1, 2]
    assert [s for s, _ in steps("student_0/val_acc")] == [1, 2]  # the epoch metrics keep their own axis
    lr = dict(steps("student_0/step_lr"))
    assert lr == pytest.approx({3: 0.05, 6: 0.005})  # milestone at epoch 1 = global step 4

    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if " step " in line]
    assert any(line.startswith("epoch 1/2  step 4/4 (100%)") for line in lines), out
    assert all("img/s  loss student_0 " in line and " student_1 " in line and "ETA" in line for line in lines), out

    # A worker group restarted from the epoch-1 checkpoint re-runs epoch 2: its steps are not logged twice.
    StepMetricLogger(mlflow, run_id).log(6, STATUS)
    assert [s for s, _ in steps("student_1/step_loss_total")] == [3, 6]


def test_bar_on_a_terminal():
    stream = io.StringIO()
    display = ProgressDisplay(30.0, stream=stream, tty=True)
    display.show(STATUS)
    time.sleep(0.2)  # tqdm redraws at most every 0.1 s
    display.show(dataclasses.replace(STATUS, step=6))
    display.close()
    shown = stream.getvalue()
    assert "epoch 2/3" in shown and "6/10" in shown and "321 img/s  loss student_0 1.2500  lr 0.05" in shown


def test_ray_driver_shows_the_step_metrics_rank_0_logs(mlflow_uri):
    mlflow = client(mlflow_uri)
    run_id = mlflow.create_run(mlflow.create_experiment("progress")).info.run_id
    StepMetricLogger(mlflow, run_id).log(15, STATUS)
    stream, stop = io.StringIO(), threading.Event()
    watcher = threading.Thread(target=watch_progress, args=(mlflow_uri, run_id, 3, stop,
                                                            ProgressDisplay(0.001, stream=stream, tty=False), 0.05))
    watcher.start()
    stop.wait(1.0)
    stop.set()
    watcher.join()
    assert stream.getvalue().splitlines() == [
        "epoch 2/3  step 5/10 (50%)  321 img/s  loss student_0 1.2500  lr 0.05  ETA 0:01:15"]

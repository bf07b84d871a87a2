"""A real digits run on the real local Ray cluster, recorded in a real MLflow store, then resumed."""

import json
import subprocess
import sys

import torch

from ray_kd.config import load_config
from ray_kd.run import train
from ray_kd.tracking import client


def test_dml_run_lands_in_mlflow_and_resumes(ray_cluster, mlflow_uri, tmp_path):
    overrides = [f"output_dir={tmp_path}", "name=e2e", "optim.epochs=2", "optim.milestones=[1]"]
    summary = train(load_config("configs/digits_dml.yaml", overrides))

    run_dir = tmp_path / "e2e"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["epochs"] == 2 and set(on_disk["roles"]) == {"student_0", "student_1"}
    assert on_disk["best_student"] in ("student_0", "student_1")
    assert 10.0 < on_disk["roles"]["student_0"]["val_acc_at_best"] <= 100.0
    best = torch.load(run_dir / "best_student.pt", weights_only=True)
    assert best["model"] == "digits_cnn_s" and best["num_classes"] == 10

    mlflow = client(mlflow_uri)
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "dml" and run.data.params["optim.epochs"] == "2"
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "student_1/val_acc")] == [1, 2]
    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {"accuracy.png", "best_student.pt", "summary.json", "config.yaml"} <= artifacts

    # The same name again, with more epochs: continues from epoch 2 in the same MLflow run.
    resumed = train(load_config("configs/digits_dml.yaml", overrides[:-2] + ["optim.epochs=3", "optim.milestones=[1]"]))
    assert resumed["mlflow_run_id"] == summary["mlflow_run_id"] and resumed["epochs"] == 3
    steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "student_0/val_acc")]
    assert steps == [1, 2, 3]
    # Step metrics (every tracking.log_every_steps=50 of the 21 steps per epoch): rank 0 logs every role's.
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "student_1/steps/loss_total")] == [50]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    cases = {
        ("method.name=nope",): "unknown method 'nope'",
        ("method.temperature=0",): "method.temperature",
        ("students.0.model=resnet9000",): "unknown model 'resnet9000'",
        ("optim.bogus=1",): "optim.bogus: unknown key",
        ("data.dataset=cifar10", "data.root=/nonexistent"): "cifar10 not found under data.root",
    }
    for overrides, expected in cases.items():
        proc = subprocess.run([sys.executable, "-m", "ray_kd.cli", "train", f"output_dir={tmp_path}", *overrides],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (overrides, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (overrides, proc.stderr)

"""A sweep is a run like any other: one start at a time, a resume only of the same sweep, a clean stop that the
same command resumes, and `max_concurrent_trials` honoured by every searcher."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ray_kd.cli import main
from ray_kd.config import load_config
from ray_kd.run_folder import RunFolderError
from ray_kd.run_storage import RunStorage
from ray_kd.tracking import client
from tuning.space import SweepSpace
from tuning.sweep import sweep

SHORT = ["optim.epochs=2", "optim.steps_per_epoch=3"]


def _rows(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "results.csv").open()))


def _runs(uri: str, name: str):
    """The runs named `name` (a sweep's parent) or `name-*` (its trials), newest first."""
    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name("ray-kd")
    if experiment is None:
        return []
    return mlflow.search_runs([experiment.experiment_id], f"tags.mlflow.runName LIKE '{name}%'",
                              order_by=["attributes.start_time DESC"])


def test_a_second_start_of_a_sweep_is_refused(tmp_path, mlflow_uri, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"searcher": "grid", "params": {"optim.lr": {"type": "grid", "values": [0.05]}}}))
    held = load_config("configs/digits_dml.yaml", ["name=t6-sweep", f"output_dir={tmp_path}"])
    with RunStorage.of(held).hold_lock():  # another `ray-kd tune ... name=t6` is running
        code = main(["tune", "-c", "configs/digits_dml.yaml", "--space", str(space), "name=t6",
                     f"output_dir={tmp_path}"])
    err = [line for line in capsys.readouterr().err.splitlines() if "mlflow" not in line.lower()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("ray-kd: error: run t6-sweep is already running (host "), err
    assert not _runs(mlflow_uri, "t6")  # refused before any MLflow run


def test_a_sweep_resumes_only_with_its_own_space_unless_restarted(ray_cluster, mlflow_uri, tmp_path):
    def grid(lr):
        return SweepSpace.model_validate({"searcher": "grid", "scheduler": {"type": "none"},
                                          "params": {"optim.lr": {"type": "grid", "values": [lr]}}})

    def config(*more):
        return load_config("configs/digits_dml.yaml", [f"output_dir={tmp_path}", "name=fp", *SHORT, *more])

    sweep(config(), grid(0.05))
    folder = tmp_path / "fp-sweep"
    first = _runs(mlflow_uri, "fp-sweep")[0].info.run_id

    with pytest.raises(RunFolderError) as refused:  # another space, seed and epochs under the same name
        sweep(config("seed=3", "optim.epochs=3"), grid(0.02))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"sweep fp-sweep in {folder} was made with another config")
    for change in ("optim.epochs 2 -> 3", "seed 0 -> 3", "space.params.optim.lr.values [0.05] -> [0.02]"):
        assert change in message, message
    assert "another name=" in message and "--restart" in message
    assert [r["optim.lr"] for r in _rows(folder)] == ["0.05"]  # nothing of the first sweep rewritten
    assert [r.info.run_id for r in _runs(mlflow_uri, "fp-sweep")] == [first]  # no parent run made or reused

    best = sweep(config("seed=3", "optim.epochs=3"), grid(0.02), restart=True)
    assert best["optim.lr"] == 0.02 and best["epochs"] == 3
    assert [(r["optim.lr"], r["status"]) for r in _rows(folder)] == [("0.02", "ok")]
    parents = _runs(mlflow_uri, "fp-sweep")
    assert len(parents) == 2 and parents[0].info.run_id != first and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["best.optim.lr"] == "0.02"


def test_a_stopped_sweep_says_so_and_the_same_command_resumes_it(ray_cluster, mlflow_uri, tmp_path):
    """Ctrl-C once the second trial has started: one stop line, exit 130, the parent KILLED, the unfinished
    trial marked so and never the best; the same command then runs what is left. `max_concurrent_trials: 1`
    holds with the random searcher: no two trials' runs overlap."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"searcher": "random", "num_samples": 3, "max_concurrent_trials": 1,
                                     "scheduler": {"type": "none"},
                                     "params": {"optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.1}}}))
    args = ["tune", "-c", "configs/digits_dml.yaml", "--space", str(space), "name=t11", f"output_dir={tmp_path}",
            *SHORT]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen([sys.executable, "-m", "ray_kd.cli", *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "t11-sweep"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(folder.glob("trials/*/mlflow_run.json"))) < 2 and driver.poll() is None:
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err
    lines = [line for line in err.strip().splitlines() if "mlflow" not in line.lower()]  # MLflow's own INFO logs
    assert lines == [f"ray-kd: sweep t11-sweep stopped with 1 of 3 trials done (table {folder / 'results.csv'}); "
                     f"resume with: ray-kd {' '.join(args)}"], err

    assert [r["status"] for r in _rows(folder)] == ["ok", "unfinished"]
    assert not (folder / "best_config.yaml").exists()
    parent = _runs(mlflow_uri, "t11-sweep")[0]
    assert parent.info.status == "KILLED"
    assert "stopped with 1 of 3 trials done" in parent.data.tags["mlflow.note.content"]
    cut = [r for r in _runs(mlflow_uri, "t11-") if r.info.status != "FINISHED" and r.info.run_id != parent.info.run_id]
    assert len(cut) == 1 and cut[0].info.status == "KILLED", [(r.info.run_name, r.info.status) for r in cut]
    assert cut[0].data.tags["ray_kd.stopped"].startswith("the sweep was stopped before this trial finished")

    assert main(args[:]) == 0  # the same command again
    rows = _rows(folder)
    assert [r["status"] for r in rows] == ["ok"] * 3 and all(r["epochs"] == "2" for r in rows)
    assert (folder / "best_config.yaml").is_file()
    parent = _runs(mlflow_uri, "t11-sweep")[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] in {r["trial_id"] for r in rows}
    trials = sorted((r for r in _runs(mlflow_uri, "t11-") if r.info.run_id != parent.info.run_id),
                    key=lambda r: r.info.start_time)
    assert len(trials) == 3
    for run in trials:  # closed by the trial itself: summary, final metrics, description
        assert run.info.status == "FINISHED" and "ray_kd.stopped" not in run.data.tags
        assert "test_acc_at_best_val" in run.data.metrics and "running" not in run.data.tags["mlflow.note.content"]
        assert json.loads((folder / "trials" / run.info.run_name / "summary.json").read_text())["epochs"] == 2
    for earlier, later in zip(trials, trials[1:]):
        assert earlier.info.end_time <= later.info.start_time, "two trials ran at once"

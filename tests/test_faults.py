"""Real faults: a role worker killed mid-run; the driver interrupted with Ctrl-C, then resumed past a corrupt newest checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

from worker_kill import kill_a_role_worker_when

from ray_kd.config import load_config
from ray_kd.run import train
from ray_kd.run_storage import RunStorage
from ray_kd.tracking import client

EPOCHS = 12  # enough that the kill and the interrupt land mid-run (each waits for a checkpoint)


def _checkpoints(run_dir):
    return sorted(p for p in (run_dir / "checkpoints").glob("epoch_*") if p.is_dir())


def _epoch_steps(uri, run_id):
    return [int(m.step) for m in client(uri).get_metric_history(run_id, "student_1/val_acc")]


def test_killed_worker_restarts_from_last_checkpoint(ray_cluster, mlflow_uri, tmp_path):
    cfg = load_config("configs/digits_dml.yaml", [f"output_dir={tmp_path}", "name=killed", f"optim.epochs={EPOCHS}",
                                                  "runtime.max_failures=2"])
    killed = []

    def one_checkpoint_and_a_second_more():
        if len(_checkpoints(RunStorage.of(cfg).run_dir)) < 1:
            return False
        time.sleep(1.0)  # well inside the run: an epoch here takes ~0.5 s
        return True

    killer = kill_a_role_worker_when(one_checkpoint_and_a_second_more, ray_cluster, killed)
    summary = train(cfg)
    killer.join()

    assert killed, "no worker was killed"
    assert summary["epochs"] == EPOCHS
    assert _epoch_steps(mlflow_uri, summary["mlflow_run_id"]) == list(range(1, EPOCHS + 1))  # no gap, no duplicate
    assert client(mlflow_uri).get_run(summary["mlflow_run_id"]).info.status == "FINISHED"


def test_interrupted_driver_resumes_without_losing_epochs(ray_cluster, mlflow_uri, tmp_path, capsys):
    import ray

    overrides = [f"output_dir={tmp_path}", "name=interrupted", f"optim.epochs={EPOCHS}"]
    args = [sys.executable, "-m", "ray_kd.cli", "train", "--config", "configs/digits_dml.yaml", *overrides,
            f"runtime.address={ray.get_runtime_context().gcs_address}"]  # a second driver on the same cluster
    run_dir = tmp_path / "interrupted"
    driver = subprocess.Popen(args, env={**os.environ, "RAY_AUTH_MODE": "token"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_checkpoints(run_dir)) < 2:
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)  # Ctrl-C
    output, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, output
    assert "ray-kd: run interrupted stopped at epoch " in output and "; resume with: ray-kd train" in output, output

    saved = _checkpoints(run_dir)
    assert len(saved) >= 2, saved  # runtime.keep_checkpoints (one more if the interrupt came between a save and its pruning)
    before = json.loads((saved[-2] / "history.json").read_text())
    assert 1 <= len(before) < EPOCHS - 1, "the interrupt came too late to test a resume"
    (saved[-1] / "student_1.pt").write_bytes(b"cut short")  # and the newest checkpoint is corrupt
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert client(mlflow_uri).get_run(run_id).info.status == "KILLED"

    summary = train(load_config("configs/digits_dml.yaml", overrides))  # the same command again
    assert f"checkpoint {saved[-1]} is unreadable" in capsys.readouterr().out  # it fell back to the one before
    assert summary["mlflow_run_id"] == run_id and summary["epochs"] == EPOCHS
    after = json.loads((_checkpoints(run_dir)[-1] / "history.json").read_text())
    # What was trained before the interrupt is kept: the same accuracies and losses for those epochs (an epoch
    # whose checkpoint Ray had not yet registered is re-run from the one before, to the same numbers).
    for old, new in zip(before, after):
        assert {k: v for k, v in old.items() if "acc" in k or "loss" in k} == \
               {k: v for k, v in new.items() if "acc" in k or "loss" in k}
    assert _epoch_steps(mlflow_uri, run_id) == list(range(1, EPOCHS + 1))
    assert client(mlflow_uri).get_run(run_id).info.status == "FINISHED"


BOMB = '''import os
from torch import nn


class Bomb(nn.Module):
    """Aborts its process at its first training forward (as a native crash would)."""

    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        if self.training:
            os.abort()
        return self.fc(x.flatten(1))


def make(num_classes):
    return Bomb(num_classes)
'''


def test_a_worker_that_dies_the_same_way_each_time_is_explained(tmp_path, new_mlflow_store):
    """The worker's own last words (from its log) in one line, and no advice to resume into the same death."""
    (tmp_path / "bomb_factory.py").write_text(BOMB)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "ray_kd.cli", "train", "-c", "configs/digits_dml.yaml",
                           f"output_dir={tmp_path}", "name=bomb", "optim.epochs=1", "runtime.max_failures=1",
                           f"tracking.uri={new_mlflow_store(tmp_path / 'mlflow.db')}",
                           "students=[{model: 'bomb_factory:make'}, {model: digits_cnn_s}]"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ray-kd: error: role student_0 (rank 0) died 2 times at the same point (before the "
                           "first checkpoint): Fatal Python error: Aborted (worker pid "), last
    assert "resuming would die the same way" in last and "run the same command" not in last, last


def test_the_most_telling_line_of_a_worker_log(tmp_path):
    from ray_kd.worker_deaths import death_cause

    log = tmp_path / "worker-abc-01000000-4242.err"
    log.write_text("warming up\n[2026 E 4242] logging.cc:118: Unhandled exception: N4gloo13EnforceNotMetE. what(): "
                   "[enforce fail at pair.cc:464] Received data size doesn't match expected size.\n"
                   "*** SIGABRT received at time=1 on cpu 1 ***\nFatal Python error: Aborted\n\nExtension modules: x\n")
    said = death_cause("The actor died unexpectedly.\n\tpid: 4242\n\tip: 127.0.0.1", tmp_path)
    assert said.startswith("[enforce fail at pair.cc:464] Received data size doesn't match expected size. "
                           "(worker pid 4242; its log: "), said
    (tmp_path / "worker-abc-01000000-4343.err").write_text(":job_id:01000000\n:actor_name:RoleWorker\n")
    assert "ended without a word (killed by a signal" in death_cause("pid: 4343", tmp_path)
    assert "memory monitor" in death_cause("Task was killed due to the node running low on memory. pid: 1", None)

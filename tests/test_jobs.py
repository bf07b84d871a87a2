"""`ray job submit` against a real local Ray head: the job succeeds and its run lands in MLflow; a driver joins it too."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from ray_kd.tracking import client
from test_hardening import is_loopback

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head():
    """`ray start --head` as the README writes it (listening on loopback only), on ports and in a temp dir of
    its own; afterwards exactly its processes are killed (`ray stop` would also kill the test session's own
    cluster)."""
    temp_dir = tempfile.mkdtemp(prefix="rkhead", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}  # the CLI then sends ~/.ray/auth_token
    head_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the README's prefix: every server on 127.0.0.1
    # Every port of its own, so it never collides with the test session's cluster (the job agent's above all).
    ports = {flag: _free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                             "metrics-export-port", "ray-client-server-port")}
    try:
        subprocess.run([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                        "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
                        "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in ports.items())],
                       check=True, env=head_env, capture_output=True, timeout=180)
        yield env, f"http://127.0.0.1:{ports['dashboard-port']}", f"127.0.0.1:{ports['port']}"
        head = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        listening = {(p.name(), c.laddr.ip, c.laddr.port) for p in head for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN}
        assert {"gcs_server", "raylet"} <= {name for name, _, _ in listening}, listening
        assert [s for s in listening if not is_loopback(s[1])] == [], listening
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submitted_job_succeeds_and_lands_in_mlflow(ray_head, tmp_path, mlflow_uri):
    env, address, gcs = ray_head
    uri = mlflow_uri
    runtime_env = '{"env_vars": {"MLFLOW_TRACKING_URI": "%s"}}' % uri
    for _ in range(40):  # the job agent takes a few seconds to come up after `ray start`
        # Without --no-wait, as a user runs it: it tails the job's logs and exits 1 if the job fails (polling
        # `ray job status` instead costs seconds of CPU a call, taken from the job on a small machine).
        submit = subprocess.run(
            [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
             "--submission-id", "distil-test", "--runtime-env-json", runtime_env, "--",
             "python", "-m", "jobs.distil", "--config", "configs/digits_dml.yaml", "optim.epochs=2",
             "optim.milestones=[1]", f"output_dir={tmp_path / 'runs'}", "name=job-run"],
            env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        if "No available agent" not in submit.stderr:
            break
        time.sleep(3)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-3000:]
    assert "job 'distil-test' succeeded" in output.lower() and "epoch 2/2" in output, output[-3000:]

    mlflow = client(uri)
    runs = mlflow.search_runs(mlflow.get_experiment_by_name("ray-kd").experiment_id, "tags.mlflow.runName = 'job-run'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in mlflow.get_metric_history(runs[0].info.run_id, "student_0/val_acc")] == [1, 2]
    assert (tmp_path / "runs" / "job-run" / "summary.json").is_file()
    artifacts = {a.path for a in mlflow.list_artifacts(runs[0].info.run_id)}
    assert {"summary.json", "best_student.pt", "accuracy.png"} <= artifacts
    assert list((tmp_path / "mlruns").rglob("best_student.pt"))  # beside the store, not in the job's temp copy

    # A driver of one's own joins the same loopback-only head by its address (no job): Ray would rewrite
    # 127.0.0.1 to the host's routable address, where nothing listens, and hang.
    joined = subprocess.run([sys.executable, "-m", "ray_kd.cli", "train", "-c", "configs/digits_dml.yaml",
                             "optim.epochs=1", f"runtime.address={gcs}", f"output_dir={tmp_path / 'runs'}",
                             "name=joined"], env={**env, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                            timeout=180, cwd=REPO)
    assert joined.returncode == 0 and "epoch 1/1" in joined.stdout, (joined.stdout + joined.stderr)[-3000:]

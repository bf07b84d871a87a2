"""A run without runtime.address on a machine where a `ray start` cluster runs (or ran, its head killed): every
command starts a local cluster of its own; a head that refuses our token, or an address where no head answers, is
one line at once; and SIGTERM on the Ray executor's driver."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from test_hardening import _epochs
from test_jobs import _free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHORT = ["optim.epochs=1", "optim.steps_per_epoch=2", "optim.milestones=[]"]


def _ray_processes(root: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if root in " ".join(p.info["cmdline"] or [])]


def _kill(processes: list[psutil.Process]) -> None:
    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)


@contextmanager
def started_head(head_env: dict[str, str] | None = None):
    """`ray start --head` on loopback as the README's walkthrough starts it (without its dashboard), on ports of its
    own, with `head_env` added to its environment (e.g. token authentication). Ray's temp folder (where `ray start`
    writes the address file a plain `ray.init()` joins) is under this head's own RAY_TMPDIR, so only the commands run
    with `env` see the head, not the rest of the machine. Yields `(env, root, head address, head session folder)`;
    afterwards every process under `root` (the head's, and any a run left) is killed."""
    root = tempfile.mkdtemp(prefix="rkc", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")},
           "RAY_TMPDIR": root, "PATH": f"{BIN}:{os.environ['PATH']}"}
    ports = {flag: _free_port() for flag in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "metrics-export-port")}
    try:
        subprocess.run([BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                        "--include-dashboard=false", "--disable-usage-stats",
                        *(f"--{flag}={port}" for flag, port in ports.items())],
                       check=True, env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(head_env or {})},
                       capture_output=True,
                       timeout=180)
        address = (Path(root) / "ray" / "ray_current_cluster").read_text().strip()
        assert address == f"127.0.0.1:{ports['port']}", address
        yield env, root, address, (Path(root) / "ray" / "session_latest").resolve()
    finally:
        _kill(_ray_processes(root))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def live_head():
    with started_head() as head:
        yield head


@pytest.fixture(scope="module")
def dead_head():
    """A head killed without `ray stop` (`kill -9`, a crash): Ray's address file still names it."""
    with started_head() as (env, root, address, _):
        _kill(_ray_processes(root))
        assert (Path(root) / "ray" / "ray_current_cluster").read_text().strip() == address
        yield env, address


def _command(kind: str, tmp_path: Path) -> list[str]:
    out = [f"output_dir={tmp_path / 'runs'}", *SHORT]
    if kind == "train":
        return ["train", "-c", "configs/digits_dml.yaml", *out]
    if kind == "train-teacher":
        return ["train-teacher", "-c", "configs/digits_teacher.yaml", "--out", str(tmp_path / "teacher.pt"), *out]
    space = tmp_path / "space.yaml"
    space.write_text("searcher: grid\nscheduler: {type: none}\nparams:\n  optim.lr: {type: grid, values: [0.05]}\n")
    return ["tune", "-c", "configs/digits_dml.yaml", "--space", str(space), *out]


def _run(command: list[str], env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_kd.cli", *command], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})


def _finished(kind: str, tmp_path: Path) -> bool:
    runs = tmp_path / "runs"
    if kind == "train":
        return (runs / "digits-dml" / "summary.json").is_file()
    if kind == "train-teacher":
        return (tmp_path / "teacher.pt").is_file()
    return (runs / "digits-dml-sweep" / "results.csv").is_file()


KINDS = ["train", "train-teacher", "tune"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_beside_a_running_cluster_starts_its_own(live_head, tmp_path, kind):
    """With a `ray start` head up and no runtime.address, the command runs on a local cluster of its own (no driver
    of it joins the head), saying once how to run on the head instead."""
    env, root, address, session = live_head
    proc = _run(_command(kind, tmp_path), env, tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    note = (f"note: a Ray cluster is running at {address}; this run starts a local cluster of its own (set "
            f"runtime.address={address} or RAY_ADDRESS to run on that one)")
    assert proc.stdout.count(note) == 1, proc.stdout[-3000:]
    assert _finished(kind, tmp_path)
    assert not list((session / "logs").glob("python-core-driver-*")), "a driver joined the head"
    assert any(p.name() == "gcs_server" for p in _ray_processes(root)), "the head is gone"


@pytest.mark.parametrize("kind", ["train"])
def test_a_run_after_a_killed_cluster_starts_its_own(dead_head, tmp_path, kind):
    """A head killed without `ray stop` leaves its address file; the command starts its own cluster, saying nothing
    of the dead one. (The three commands join a cluster through one `connect`; the live head's cases show that
    each goes through it, so one command stands for them here.)"""
    env, address = dead_head
    proc = _run(_command(kind, tmp_path), env, tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and address not in output, output[-3000:]
    assert _finished(kind, tmp_path)


TOKEN = "ray-kd-test-token-0123456789abcdef"


def test_a_head_that_refuses_our_token_is_one_line_at_once(tmp_path):
    """A token-auth head joined without its token, or with another, is named as such in one line within seconds
    (Ray itself warns for 20 s, then says only that it found no cluster); with its token the run trains."""
    with started_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}) as (env, _, address, _):
        command = _command("train", tmp_path) + [f"runtime.address={address}"]
        for token, says in [({}, "refused this process, which sends no token"),
                            ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "another"}, "refused this process's token")]:
            start = time.monotonic()
            result = _run(command, {**env, **token}, tmp_path)
            assert result.returncode == 2 and time.monotonic() - start < 30, result.stderr
            assert result.stderr == (f"ray-kd: error: the Ray cluster at runtime.address={address} uses token "
                                     f"authentication and {says}; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the "
                                     "cluster's token (`ray get-auth-token` on its head prints it), or point "
                                     "RAY_AUTH_TOKEN_PATH at a file holding it\n")
            assert not (tmp_path / "runs").exists()  # refused before anything was written
        result = _run(command, {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}, tmp_path)
        assert result.returncode == 0 and _finished("train", tmp_path), result.stderr


def test_an_address_where_no_head_answers_is_one_line_at_once(tmp_path):
    """An unroutable address: the connection times out (5 s), or, behind a proxy that answers every address, what
    answers is not a Ray head; either way one line, within seconds."""
    start = time.monotonic()
    result = _run(_command("train", tmp_path) + ["runtime.address=10.255.255.1:6379"], dict(os.environ), tmp_path)
    assert result.returncode == 2 and time.monotonic() - start < 30, result.stderr
    assert result.stderr.startswith("ray-kd: error: no Ray cluster answers at runtime.address=10.255.255.1:6379 (")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_sigterm_on_the_ray_executor_is_143_and_one_line(tmp_path, mlflow_uri):
    """SIGTERM reaches the driver while it waits on its role workers in `ray.wait`: Ray re-raises the handler's
    Terminated there as a plain KeyboardInterrupt, which must still exit 143 (128 + SIGTERM), not Ctrl-C's 130."""
    from ray_kd.tracking import client

    args = ["train", f"output_dir={tmp_path}", "name=stopped", "optim.epochs=200"]
    driver = subprocess.Popen([sys.executable, "-m", "ray_kd.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    deadline = time.time() + 300
    while time.time() < deadline and not _epochs(tmp_path / "stopped") and driver.poll() is None:
        time.sleep(0.1)
    assert _epochs(tmp_path / "stopped"), "no epoch finished in time"
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 143, err
    lines = [line for line in err.strip().splitlines() if "mlflow" not in line.lower()]  # MLflow's own INFO logs
    assert len(lines) == 1, err
    assert lines[0].startswith("ray-kd: run stopped stopped at epoch "), err
    assert lines[0].endswith("; resume with: ray-kd " + " ".join(args)), err
    run_id = json.loads((tmp_path / "stopped" / "mlflow_run.json").read_text())["run_id"]
    assert client(mlflow_uri).get_run(run_id).info.status == "KILLED"


def test_a_joined_cluster_lost_mid_run_is_one_line_and_the_run_failed(tmp_path, mlflow_uri):
    """The `ray start` cluster a run joined, killed mid-run (every process of it, as a crash or a lost machine
    would): one line naming the lost cluster and how to resume, MLflow FAILED, at once. Not Ray's minute of
    waiting for the head and its C++ "Failed to connect to GCS", nor restarts on a cluster that is gone."""
    from ray_kd.tracking import client

    with started_head() as (env, root, address, _):
        args = ["train", "-c", "configs/digits_dml.yaml", f"output_dir={tmp_path}", "name=lost",
                f"runtime.address={address}", "optim.epochs=50", "optim.milestones=[]", "runtime.max_failures=2"]
        driver = subprocess.Popen([sys.executable, "-m", "ray_kd.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**env, "MLFLOW_TRACKING_URI": mlflow_uri, "RAY_AUTH_MODE": "token"})
        deadline = time.time() + 300
        while time.time() < deadline and not _epochs(tmp_path / "lost") and driver.poll() is None:
            time.sleep(0.1)
        assert _epochs(tmp_path / "lost"), driver.poll() is None or driver.communicate()
        _kill(_ray_processes(root))
        killed = time.monotonic()
        out, err = driver.communicate(timeout=120)
        took = time.monotonic() - killed
    assert driver.returncode == 2, out + err
    lines = [line for line in err.strip().splitlines() if "mlflow" not in line.lower()]  # MLflow's own INFO logs
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ray-kd: error: the Ray cluster at {address} was lost mid-run: its head "), err
    assert lines[0].endswith("run the same command to resume"), err
    assert "restarting" not in out, out
    assert took < 30, f"{took:.0f} s from the kill to the exit"  # Ray alone waits 60 s for a lost head
    run_id = json.loads((tmp_path / "lost" / "mlflow_run.json").read_text())["run_id"]
    assert client(mlflow_uri).get_run(run_id).info.status == "FAILED"
    assert _epochs(tmp_path / "lost"), "the checkpoints made before the loss are kept"

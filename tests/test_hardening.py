"""Issue 15's hostile probe, as tests: runs that cannot cross-wire, clean stops, data that cannot go stale,
and one clean line (exit 2) for every bad input, with nothing already saved lost."""

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from ray_kd.cli import main
from ray_kd.config import DataConfig, load_config
from ray_kd.data import DataError
from ray_kd.datasets import load_dataset
from ray_kd.run_storage import RunStorage
from ray_kd.tracking import check_reachable, client
from test_bad_input import image_folder

REPO = Path(__file__).resolve().parents[1]
QUICK = ["runtime.executor=local", "optim.steps_per_epoch=2", "optim.milestones=[]"]


def _train(tmp_path, *overrides):
    return main(["train", f"output_dir={tmp_path / 'runs'}", "name=r", *QUICK, *overrides])


def _epochs(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*"))


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --- 1. the README's KD flow, relative paths, on the Ray executor ------------------------------------------

def test_readme_kd_flow_on_ray_from_another_directory(ray_cluster, tmp_path, mlflow_uri):
    """`ray-kd train-teacher ... --out runs/digits_teacher.pt` then `ray-kd train --config configs/digits_kd.yaml`,
    exactly as the README writes them (shortened by overrides), run from a directory of their own: the relative
    teacher path and output folder must mean the caller's directory, not the Ray workers'."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    # The KD run joins the session's cluster (a cold Ray start would double the test's time); its workers run in
    # Ray's own directories, as a local cluster's do, so a path read there relative to them would not be found.
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "MLFLOW_TRACKING_URI": mlflow_uri}
    short = ["optim.epochs=1", "optim.steps_per_epoch=4", "optim.milestones=[]"]
    # The teacher in one process (its relative paths are the driver's alone); the KD run on Ray, where workers
    # read the teacher file and write checkpoints under the relative output folder.
    for command in (["train-teacher", "--config", "configs/digits_teacher.yaml", "--out", "runs/digits_teacher.pt",
                     "runtime.executor=local"],
                    ["train", "--config", "configs/digits_kd.yaml"]):
        proc = subprocess.run([sys.executable, "-m", "ray_kd.cli", *command, *short], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "digits_teacher.pt").is_file()
    summary = json.loads((tmp_path / "runs" / "digits-kd" / "summary.json").read_text())
    assert summary["epochs"] == 1 and "teacher" in summary["roles"]


# --- 2. run lock --------------------------------------------------------------------------------------------

def test_second_start_of_a_running_name_is_refused(tmp_path, mlflow_uri, capsys):
    cfg = load_config(None, [f"output_dir={tmp_path / 'runs'}", "name=r"])
    check_reachable(mlflow_uri)  # the store exists already, as after any earlier run (MLflow logs its creation)
    capsys.readouterr()
    with RunStorage.of(cfg).hold_lock():  # the first start, still running
        assert _train(tmp_path, "optim.epochs=1") == 2
        err = _one_line(capsys)
        assert f"run r is already running (host {os.uname().nodename}, pid {os.getpid()}, started " in err, err
        assert "another name=" in err
    assert _epochs(RunStorage.of(cfg).run_dir) == []  # the refused start wrote nothing

    # A lock file left by a process that died (the kernel dropped its lock) does not block the next start.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (RunStorage.of(cfg).run_dir / "run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid,
                                                      "started": "earlier"}))
    assert _train(tmp_path, "optim.epochs=1") == 0
    assert _epochs(RunStorage.of(cfg).run_dir) == ["epoch_0001"]


# --- 3. config fingerprint ----------------------------------------------------------------------------------

def test_resume_with_another_config_is_refused_until_restart(tmp_path, mlflow_uri, capsys):
    run_dir = tmp_path / "runs" / "r"
    assert _train(tmp_path, "optim.epochs=1") == 0
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    saved = (run_dir / "checkpoints" / "epoch_0001" / "student_0.pt").read_bytes()
    capsys.readouterr()

    assert _train(tmp_path, "optim.epochs=2", "method.name=ce", "optim.lr=0.1") == 2
    err = _one_line(capsys)
    assert "run r in" in err, err
    assert "was made with another config or data: method.name 'dml' -> 'ce', optim.lr 0.05 -> 0.1, method.ce_weight" in err, err
    assert "another name=" in err and "--restart" in err, err
    assert _epochs(run_dir) == ["epoch_0001"]
    assert (run_dir / "checkpoints" / "epoch_0001" / "student_0.pt").read_bytes() == saved

    assert _train(tmp_path, "optim.epochs=2", "runtime.threads_per_worker=2") == 0  # may change on resume
    assert json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"] == run_id
    assert _epochs(run_dir) == ["epoch_0001", "epoch_0002"]

    assert main(["train", "--restart", f"output_dir={tmp_path / 'runs'}", "name=r", *QUICK, "optim.epochs=1",
                 "method.name=ce"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["mlflow_run_id"] != run_id
    assert client(mlflow_uri).get_run(summary["mlflow_run_id"]).data.params["method.name"] == "ce"


def test_resume_against_another_mlflow_store_is_refused(tmp_path, mlflow_uri, monkeypatch, capsys):
    assert _train(tmp_path, "optim.epochs=1") == 0
    other = f"sqlite:///{tmp_path / 'other.db'}"
    check_reachable(other)  # a working store (MLflow logs its creation)
    capsys.readouterr()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert _train(tmp_path, "optim.epochs=2") == 2
    err = _one_line(capsys)
    assert f"run r is recorded in the MLflow store {mlflow_uri}" in err and "--restart" in err, err


# --- 6. checkpoints -----------------------------------------------------------------------------------------

def test_corrupt_latest_checkpoint_falls_back_and_finished_stays_finished(tmp_path, mlflow_uri, capsys):
    run_dir = tmp_path / "runs" / "r"
    assert _train(tmp_path, "optim.epochs=2") == 0
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    first = json.loads((run_dir / "checkpoints" / "epoch_0001" / "history.json").read_text())

    (run_dir / "checkpoints" / "epoch_0002" / "student_1.pt").write_bytes(b"garbage" * 10)
    assert _train(tmp_path, "optim.epochs=3") == 0
    out = capsys.readouterr().out
    assert "epoch_0002 is unreadable" in out and "falling back to the one before" in out, out
    history = json.loads((run_dir / "checkpoints" / "epoch_0003" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[0] == first[0]
    assert _epochs(run_dir) == ["epoch_0002", "epoch_0003"]  # runtime.keep_checkpoints=2

    (run_dir / "checkpoints" / "epoch_0003" / "history.json").write_text("{not json")
    assert _train(tmp_path, "optim.epochs=3", "runtime.keep_checkpoints=1") == 0
    assert "epoch_0003/history.json is unreadable (JSONDecodeError)" in capsys.readouterr().out
    assert _epochs(run_dir) == ["epoch_0003"]
    assert client(mlflow_uri).get_run(run_id).info.status == "FINISHED"

    # Every checkpoint unreadable: one line, and the finished MLflow run is not flipped to FAILED.
    (run_dir / "checkpoints" / "epoch_0003" / "history.json").write_text("[1")
    assert _train(tmp_path, "optim.epochs=3") == 2
    err = _one_line(capsys)
    assert "no readable checkpoint left in" in err and "--restart" in err, err
    assert client(mlflow_uri).get_run(run_id).info.status == "FINISHED"


# --- 7. Ctrl-C and SIGTERM ----------------------------------------------------------------------------------

def test_a_stop_signal_waits_for_a_held_write_and_a_second_one_does_not():
    from ray_kd.stopping import Terminated, held, install_handlers

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    install_handlers()
    try:
        finished = []
        with pytest.raises(Terminated):
            with held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs between bytecodes: well before this returns
                finished.append("checkpoint")
                with held():  # nested: still held until the outer block ends
                    finished.append("metrics")
                finished.append("after")
        assert finished == ["checkpoint", "metrics", "after"]

        with pytest.raises(KeyboardInterrupt):
            with held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGINT)  # pressed again: a stuck write is interrupted
                time.sleep(0.05)
                finished.append("unreached")
        assert "unreached" not in finished
        with held():  # nothing left pending from the forced stop
            pass
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_is_one_line_with_the_resume_command(tmp_path, mlflow_uri, signum):
    args = ["train", f"output_dir={tmp_path}", "name=stopped", "runtime.executor=local", "optim.epochs=200"]
    driver = subprocess.Popen([sys.executable, "-m", "ray_kd.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not _epochs(tmp_path / "stopped"):
        time.sleep(0.1)
    assert _epochs(tmp_path / "stopped"), "no epoch finished in time"
    driver.send_signal(signum)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 128 + signum, err
    lines = [line for line in err.strip().splitlines() if "mlflow" not in line.lower()]  # MLflow's own INFO logs
    assert len(lines) == 1, err
    assert lines[0].startswith("ray-kd: run stopped stopped at epoch "), err
    assert lines[0].endswith("; resume with: ray-kd " + " ".join(args)), err
    epoch = int(lines[0].split("stopped at epoch ")[1].split(";")[0])
    assert epoch >= 1 and f"epoch_{epoch:04d}" in _epochs(tmp_path / "stopped")
    run_id = json.loads((tmp_path / "stopped" / "mlflow_run.json").read_text())["run_id"]
    assert client(mlflow_uri).get_run(run_id).info.status == "KILLED"


# --- 5. ImageFolder data ------------------------------------------------------------------------------------

def _folder_cfg(root, tmp_path, **kw):
    return DataConfig(dataset="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.25, **kw)


def test_imagefolder_cache_follows_the_files(tmp_path):
    root = image_folder(tmp_path / "tree")
    assert load_dataset(_folder_cfg(root, tmp_path)).num_classes == 2
    image_folder(root, classes=("c",))  # a class added after the first (cached) load
    data = load_dataset(_folder_cfg(root, tmp_path))
    assert data.num_classes == 3 and len(data.test.labels) == 12
    (root / "test" / "c" / "0.png").unlink()
    assert len(load_dataset(_folder_cfg(root, tmp_path)).test.labels) == 11


def test_imagefolder_skips_non_images_and_names_bad_ones(tmp_path, capsys):
    root = image_folder(tmp_path / "tree")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0\1\2")
    (root / "train" / "b" / "README.txt").write_text("notes")
    data = load_dataset(_folder_cfg(root, tmp_path))
    assert len(data.train.labels) + len(data.val.labels) == 8
    assert f"{root / 'train'}: skipped 1 files that are not images (e.g. README.txt)" in capsys.readouterr().err

    (root / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"tree/train/a/broken\.jpg is not a readable image .*data\.bad_images=skip"):
        load_dataset(_folder_cfg(root, tmp_path))
    data = load_dataset(_folder_cfg(root, tmp_path, bad_images="skip"))
    assert len(data.train.labels) + len(data.val.labels) == 8
    assert "skipped 1 unreadable images (e.g. a/broken.jpg)" in capsys.readouterr().err

    (root / "train" / "empty").mkdir()
    (root / "test" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/empty holds no images; add images or remove it"):
        load_dataset(_folder_cfg(root, tmp_path, bad_images="skip"))


def test_truncated_archive_is_one_line_and_leaves_no_temp_folder(tmp_path):
    root = image_folder(tmp_path / "tree", per_class=30, size=32)
    with tarfile.open(tmp_path / "full.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="tree")
    whole = (tmp_path / "full.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.tar\.gz is not a readable \.tar\.gz"):
        load_dataset(_folder_cfg(tmp_path / "cut.tar.gz", tmp_path))
    assert list((tmp_path / "cache").iterdir()) == []


# --- 4. preflight: train-teacher --out, tune's search space, the MLflow folder ------------------------------

def test_train_teacher_out_naming_a_folder(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    assert main(["train-teacher", "--config", "configs/digits_teacher.yaml", "--out", str(tmp_path / "adir"),
                 f"output_dir={tmp_path}"]) == 2
    assert f"--out {tmp_path / 'adir'} is a folder; give a file path" in _one_line(capsys)


def test_sqlite_store_in_an_unwritable_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}")
    assert _train(tmp_path, "optim.epochs=1") == 2
    assert "cannot be written" in _one_line(capsys)


@pytest.mark.parametrize("param, expected", [
    ("optim.lrr: {type: choice, values: [0.1]}", "param optim.lrr=0.1 does not make a valid run: config error at "
                                                  "optim.lrr: unknown key"),
    ("optim.lr: {type: uniform, low: -1, high: 1}", "param optim.lr=-1.0 does not make a valid run"),
    ("method.temperature: {type: choice, values: [2, 0]}", "param method.temperature=0 does not make a valid run"),
])
def test_tune_space_fields_checked_before_the_sweep(tmp_path, mlflow_uri, capsys, param, expected):
    space = tmp_path / "space.yaml"
    space.write_text(f"searcher: random\nnum_samples: 1\nparams:\n  {param}\n")
    assert main(["tune", "--config", "configs/digits_kd.yaml", "--space", str(space), f"output_dir={tmp_path}"]) == 2
    assert expected in _one_line(capsys)
    assert not (tmp_path / "digits-kd-sweep").exists()  # no parent run, nothing started


def test_duplicate_key_in_a_search_space(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  optim.lr: {type: choice, values: [0.1]}\n  optim.lr: {type: choice, values: [1]}\n")
    assert main(["tune", "--space", str(space)]) == 2
    assert "line 3: duplicate key 'optim.lr'" in _one_line(capsys)


# --- 8. what a local cluster listens on ---------------------------------------------------------------------

def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def _listeners(pid: int) -> set[tuple[str, str, int]]:
    """(kind, ip, port) of every listening TCP socket of process `pid` and its descendants, `kind` naming the
    process: driver, monitor, dashboard, a Ray worker's title (`ray::RoleWorker`), else its name."""
    import psutil

    top, found = psutil.Process(pid), set()
    for proc in [top, *top.children(recursive=True)]:
        try:
            command = " ".join(proc.cmdline())
            kind = ("driver" if proc.pid == pid else "monitor" if "monitor.py" in command
                    else "dashboard" if "dashboard.py" in command
                    else command.split()[0] if command.startswith("ray::") else proc.name())
            found |= {(kind, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_local_cluster_listens_on_loopback_only(tmp_path, mlflow_uri, replicas):
    """Every listening socket of the processes of the local Ray cluster `ray-kd train` starts (GCS, raylet,
    workers, agents, the driver), the role workers' included while they train (rank 0's torch.distributed store,
    gloo's connections, and with 2 replicas every sub-group's), is on 127.0.0.1 (or its IPv4-mapped form), and
    there is no dashboard."""
    args = ["train", f"output_dir={tmp_path}", "name=listening", "optim.epochs=200", f"runtime.replicas={replicas}"]
    driver = subprocess.Popen([sys.executable, "-m", "ray_kd.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    started, listening = time.time(), set()
    try:
        while time.time() < started + 300 and not _epochs(tmp_path / "listening") and driver.poll() is None:
            time.sleep(0.2)
        assert _epochs(tmp_path / "listening"), "no epoch finished in time"
        # Sampled while the workers train, and for 10 s at least since the start: the dashboard head and the
        # agents open their ports a while after ray.init returns.
        while time.time() < started + 10 or not listening:
            listening |= _listeners(driver.pid)
            time.sleep(1)
        assert driver.poll() is None, "the run ended while its listeners were sampled"
    finally:
        driver.send_signal(signal.SIGTERM)
        err = driver.communicate(timeout=60)[1]
    assert driver.returncode == 128 + signal.SIGTERM, err
    kinds = {kind.split(".")[0] for kind, _, _ in listening}  # a threaded actor's title may lack its method
    assert {"gcs_server", "raylet", "driver", "ray::RoleWorker"} <= kinds, listening
    assert 8265 not in {port for _, _, port in listening}  # no dashboard for a single run
    exposed = [(kind, ip, port) for kind, ip, port in listening if not is_loopback(ip)]
    assert exposed == [], exposed


def test_runtime_address_auto_without_a_cluster(tmp_path, monkeypatch, capsys):
    import ray._private.services as services

    # No `ray start` on this machine: Ray's own lookup (the address file, then running GCS processes) finds none.
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _train(tmp_path, "runtime.executor=ray", "runtime.address=auto") == 2
    assert "runtime.address=auto found no Ray cluster on this machine" in _one_line(capsys)

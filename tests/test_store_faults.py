"""A store the run writes that stops answering mid-run: the MLflow sqlite file locked by another process, the object
store of output_dir gone. One line naming the store, the MLflow run's true state, and that the same command
resumes."""

import sqlite3
import threading
import time

import pytest

from ray_kd.cli import main
from ray_kd.tracking import client

QUICK = ["-c", "configs/digits_dml.yaml", "optim.steps_per_epoch=2", "optim.milestones=[]"]


def hold_when(path, seconds: float, db, done: threading.Event):
    """Once `path` exists, hold an exclusive lock on the sqlite file `db` for `seconds` (another process's
    transaction, as a second tool writing the store would hold it)."""
    while not path.exists() and not done.is_set():
        time.sleep(0.05)
    if done.is_set():
        return
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    done.wait(seconds)
    con.execute("ROLLBACK")
    con.close()


def test_a_locked_mlflow_store_mid_run_is_named_and_the_run_failed(ray_cluster, tmp_path, mlflow_uri, capsys):
    """The store locked from epoch 1 on, for longer than MLflow's 20 s busy timeout: the worker that logs the
    epochs fails; the run is marked FAILED once the lock goes (before MLflow's wait for the mark runs out), and the
    one line names the locked store and the resume, not SQLAlchemy's "Background on this error" link."""
    db = tmp_path / "mlflow.db"
    run_dir = tmp_path / "runs" / "l"
    done = threading.Event()
    locker = threading.Thread(target=hold_when, args=(run_dir / "checkpoints" / "epoch_0001", 30, db, done))
    locker.start()
    try:
        code = main(["train", *QUICK, f"output_dir={tmp_path / 'runs'}", "name=l", "optim.epochs=30",
                     "runtime.executor=ray", "runtime.cpus_per_worker=0.5"])
    finally:
        done.set()
        locker.join()
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if " INFO mlflow." not in line)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "sqlalche.me" not in err, err
    (run,) = client(mlflow_uri).search_runs([client(mlflow_uri).get_experiment_by_name("ray-kd").experiment_id])
    assert run.info.status == "FAILED"
    assert (f"the MLflow store {mlflow_uri} is locked by another process (database is locked, for longer than MLflow "
            f"waits); MLflow run {run.info.run_id} is FAILED, checkpoints are kept in {run_dir}: once the other "
            "process lets go of the store, the same command resumes it") in err, err


def test_a_store_locked_before_the_run_starts_is_one_line(tmp_path, mlflow_uri, capsys):
    """Another process's transaction holds the store from before the command to past MLflow's busy timeout: one line
    naming the lock (not "not reachable ... start the tracking server"), and no run made."""
    con = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        code = main(["train", *QUICK, f"output_dir={tmp_path / 'runs'}", "name=early", "runtime.executor=local"])
    finally:
        con.execute("ROLLBACK")
        con.close()
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if " INFO mlflow." not in line)
    assert code == 2, err
    assert err == (f"ray-kd: error: the MLflow store {mlflow_uri} is locked by another process (database is locked, "
                   "for longer than MLflow waits); nothing has started: once the other process lets go of the store, "
                   "run the same command"), err
    store = client(mlflow_uri)
    assert store.search_runs([e.experiment_id for e in store.search_experiments()]) == []
    assert not (tmp_path / "runs" / "early" / "checkpoints").exists()


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_an_object_store_that_stops_answering_mid_run_is_named_and_the_same_command_resumes(executor, request, tmp_path,
                                                                                            mlflow_uri, monkeypatch,
                                                                                            capsys):
    """output_dir on an S3 server of this test's own, stopped once epoch 1 is published there: one line naming
    the store and its endpoint (no credentials), the MLflow run FAILED; the server back on the same port (moto keeps
    its buckets in this process), the same command resumes from what it published and finishes."""
    import logging

    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("RAY_KD_STORAGE_CACHE", str(tmp_path / "mirror"))
    bucket = f"down-{port}"
    output_dir = f"s3://AKIADOWNKEY:D0wnSecret@{bucket}/runs?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    store, _ = fs.FileSystem.from_uri(output_dir + "&allow_bucket_creation=true")
    store.create_dir(bucket)
    published = f"{bucket}/runs/s/checkpoints/epoch_0001/history.json"
    done = threading.Event()

    def stop_when_published():
        while not done.is_set():
            if store.get_file_info(published).type == fs.FileType.File:
                server.stop()
                return
            time.sleep(0.05)

    stopper = threading.Thread(target=stop_when_published)
    stopper.start()
    args = ["train", *QUICK, f"output_dir={output_dir}", "name=s", f"runtime.executor={executor}",
            "runtime.cpus_per_worker=0.5"]
    try:
        code = main([*args, "optim.epochs=30"])
    finally:
        done.set()
        stopper.join()
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if " INFO mlflow." not in line).strip()
    assert code == 2, err
    mlflow = client(mlflow_uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("ray-kd").experiment_id])
    assert run.info.status == "FAILED"
    assert len(err.splitlines()) == 1 and "D0wnSecret" not in err and "AKIADOWNKEY" not in err, err
    assert err.startswith(f"ray-kd: error: the object store s3://{bucket}/runs at {host}:{port} stopped answering (AWS "
                          "Error NETWORK_CONNECTION during "), err
    assert err.endswith(f"; MLflow run {run.info.run_id} is FAILED, the checkpoints it published are kept there: the "
                        "same command resumes once the store answers"), err

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        assert main([*args, "optim.epochs=3"]) == 0
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert "resuming after epoch 1" in out or "resuming after epoch 2" in out, out  # one more may land first
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"

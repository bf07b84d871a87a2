"""A store the run writes that stops answering mid-run: the MLflow sqlite file locked by another process, the object
store of output_dir gone. One line naming the store, the MLflow run's true state, and that the same command
resumes."""

import sqlite3
import threading
import time

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

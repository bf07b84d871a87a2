"""`output_dir` on an object store (here S3, served by moto's S3 server on loopback): checkpoints are published in
the store, a corrupt one there is passed over, and a run resumes from the store on a machine whose mirror is empty;
a bad store is one line."""

import shutil
from pathlib import Path

import pytest
from pyarrow import fs
from worker_kill import kill_a_role_worker_when

from ray_kd import api
from ray_kd.config import ConfigError, load_config
from ray_kd.storage import StorageError

COMMON = ["optim.epochs=2", "optim.steps_per_epoch=3", "optim.milestones=[1]", "data.batch_size=32",
          "runtime.executor=local"]


@pytest.fixture()
def bucket_uri(s3_bucket, tmp_path, monkeypatch):
    """A new bucket's URI, credentials and endpoint inline; this test's own local mirror."""
    monkeypatch.setenv("RAY_KD_STORAGE_CACHE", str(tmp_path / "mirror"))  # the Ray workers keep the default
    yield s3_bucket.uri("team/runs")
    shutil.rmtree(Path.home() / ".cache" / "ray-kd" / "storage" / "s3" / s3_bucket.name, ignore_errors=True)


def stored(uri: str, sub: str) -> dict[str, int]:
    store, base = fs.FileSystem.from_uri(uri)
    infos = store.get_file_info(fs.FileSelector(f"{base}/{sub}", recursive=True, allow_not_found=True))
    return {i.path[len(base) + len(sub) + 2:]: i.size for i in infos if i.type == fs.FileType.File}


def test_a_run_resumes_from_the_store_on_a_machine_with_an_empty_mirror(bucket_uri, tmp_path, mlflow_uri,
                                                                         monkeypatch, capsys):
    first = api.train(None, COMMON + [f"output_dir={bucket_uri}", "name=dml"])
    files = stored(bucket_uri, "dml")
    assert {"fingerprint.json", "mlflow_run.json", "wall.json", "summary.json", "best_student.pt",
            "accuracy.png"} <= set(files)
    for epoch in ("epoch_0001", "epoch_0002"):
        assert {f"checkpoints/{epoch}/{f}" for f in ("history.json", "student_0.pt", "student_1.pt")} <= set(files)
    assert "run.lock" not in files
    out = capsys.readouterr().out
    assert "run dml: folder s3://b-" in out and "/team/runs/dml (mirrored in " in out and "secret" not in out

    # the store's newest checkpoint corrupted (the mirror holds the good copy): fetched again, passed over, redone
    store, base = fs.FileSystem.from_uri(bucket_uri)
    with store.open_output_stream(f"{base}/dml/checkpoints/epoch_0002/student_0.pt") as f:
        f.write(b"not a checkpoint")
    redone = api.train(None, COMMON + [f"output_dir={bucket_uri}", "name=dml", "optim.epochs=3"])
    out = capsys.readouterr().out
    assert "epoch_0002 is unreadable" in out and "resuming after epoch 1" in out and redone["epochs"] == 3

    # another machine: nothing mirrored; one more epoch resumes after the store's epoch 3, in the same MLflow run
    monkeypatch.setenv("RAY_KD_STORAGE_CACHE", str(tmp_path / "other-machine"))
    more = api.train(None, COMMON + [f"output_dir={bucket_uri}", "name=dml", "optim.epochs=4"])
    assert "resuming after epoch 3" in capsys.readouterr().out
    assert more["mlflow_run_id"] == first["mlflow_run_id"] and more["epochs"] == 4
    checkpoints = {f.split("/")[1] for f in stored(bucket_uri, "dml") if f.startswith("checkpoints/")}
    assert checkpoints == {"epoch_0003", "epoch_0004"}  # runtime.keep_checkpoints=2 in the store too

    from mlflow import MlflowClient

    params = MlflowClient(mlflow_uri).get_run(first["mlflow_run_id"]).data.params
    assert params["output_dir"].startswith("s3://b-") and "secret" not in params["output_dir"]

    # --restart empties the store's run folder first
    api.train(None, COMMON + [f"output_dir={bucket_uri}", "name=dml", "optim.epochs=1"], restart=True)
    assert {f.split("/")[1] for f in stored(bucket_uri, "dml") if f.startswith("checkpoints/")} == {"epoch_0001"}


def test_replicas_on_ray_publish_through_the_store_and_a_killed_worker_restarts_from_it(ray_cluster, bucket_uri,
                                                                                         tmp_path, mlflow_uri, capsys):
    """Two replicas of each role placed apart: four ranks upload their own files, rank 0 publishes. A worker
    killed mid-run restarts the group from the store's last checkpoint (no epoch logged twice); a resume from a
    new mirror continues the run."""
    from mlflow import MlflowClient
    epochs = 6
    overrides = COMMON + [f"output_dir={bucket_uri}", "name=dml-r2", "runtime.executor=ray", "runtime.replicas=2",
                          "runtime.placement=apart", "runtime.cpus_per_worker=0.25", f"optim.epochs={epochs}",
                          "runtime.max_failures=1"]
    killed = []
    killer = kill_a_role_worker_when(lambda: "epoch_0001/history.json" in stored(bucket_uri, "dml-r2/checkpoints"),
                                     ray_cluster, killed)
    summary = api.train(None, overrides)
    killer.join()
    assert killed and summary["epochs"] == epochs
    assert "restarting the workers from the last checkpoint" in capsys.readouterr().out
    logged = MlflowClient(mlflow_uri).get_metric_history(summary["mlflow_run_id"], "student_1/val_acc")
    assert sorted(int(m.step) for m in logged) == list(range(1, epochs + 1))  # no gap, no duplicate
    files = stored(bucket_uri, "dml-r2/checkpoints")
    assert set(files) == {f"epoch_000{e}/{f}" for e in (epochs - 1, epochs)
                          for f in ("history.json", "manifest.json", "student_0.pt", "student_1.pt")}
    shutil.rmtree(tmp_path / "mirror")
    assert api.train(None, overrides + [f"optim.epochs={epochs + 1}"])["epochs"] == epochs + 1


def test_a_store_that_cannot_be_written_or_a_sweep_on_one_is_one_line(bucket_uri, s3_endpoint, tmp_path, mlflow_uri):
    missing = bucket_uri.replace("s3://key:secret@b-", "s3://key:secret@nobucket-")
    with pytest.raises(StorageError, match=r"^output_dir=s3://nobucket-\w+/team/runs cannot be written \(.*"
                                           r"NO_SUCH_BUCKET.*\); check the bucket, its credentials"):
        api.train(None, COMMON + [f"output_dir={missing}", "name=dml"])
    from tuning.sweep import sweep
    from tuning.space import load_space

    cfg = load_config(None, COMMON + [f"output_dir={bucket_uri}", "runtime.executor=ray"])
    with pytest.raises(ConfigError, match=r"a sweep keeps its trials .* not s3://b-\w+/team/runs; object stores "
                                          r"are for `ray-kd train`"):
        sweep(cfg, load_space({"params": {"method.temperature": {"type": "choice", "values": [2.0]}}}))

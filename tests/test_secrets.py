"""Credentials in a URI never reach an output: not the console, not MLflow (params, tags, description, the logged
config), not a file of the run folder, its mirror or the store; a URI where only a local path is taken is one line
naming the field, without the secret."""

import shutil
from pathlib import Path

import pytest
from pyarrow import fs

from ray_kd import cli
from ray_kd.config import ConfigError, load_config, shown_config, shown_uri

KEY, SECRET = "AKIAPLANTEDKEY", "Pl4ntedSecretValue"


def secret_uri(bucket, path: str) -> str:
    return (f"s3://{KEY}:{SECRET}@{bucket.name}/{path}?endpoint_override={bucket.endpoint}&scheme=http"
            f"&region=us-east-1")


def leaks(data: bytes) -> bool:
    return SECRET.encode() in data or KEY.encode() in data


def test_shown_uri_strips_credentials_and_options_and_keeps_paths():
    assert shown_uri("s3://k:s@bucket/a/b?secret_key=s&region=x#f") == "s3://bucket/a/b"
    assert shown_uri("http://user:pw@host:5000/p") == "http://host:5000/p"
    assert shown_uri("s3://k:s@bucket:notaport/p") == "s3://bucket/p"
    for path in ("/tmp/a b/x.pt", "relative/k:s@x", "sqlite:////tmp/mlflow.db", "digits_cnn_s", "torchvision:resnet18"):
        assert shown_uri(path) == path


def test_no_secret_in_the_console_mlflow_or_any_file(tmp_path, monkeypatch, mlflow_uri, digits_teacher, s3_bucket,
                                                     capfd):
    monkeypatch.setenv("RAY_KD_STORAGE_CACHE", str(tmp_path / "mirror"))
    output_dir, cache = secret_uri(s3_bucket, "runs"), secret_uri(s3_bucket, "tc")
    args = ["-c", "configs/digits_kd.yaml", "name=leak", f"output_dir={output_dir}", f"teacher.cache={cache}",
            f"teacher.checkpoint={digits_teacher}", "runtime.executor=local", "optim.epochs=2",
            "optim.milestones=[1]", "optim.steps_per_epoch=2", "data.batch_size=32",
            f"data.cache_dir={tmp_path / 'data-cache'}"]
    try:
        assert cli.main(["train", *args]) == 0
        out, err = capfd.readouterr()
        assert "teacher.cache s3://" in out and "run leak: folder s3://" in out  # they are shown, without it
        assert not leaks((out + err).encode()), out + err

        from mlflow.tracking import MlflowClient

        client = MlflowClient(mlflow_uri)
        (run,) = client.search_runs([client.get_experiment_by_name("ray-kd").experiment_id])
        assert run.data.params["teacher.cache"] == f"s3://{s3_bucket.name}/tc"
        assert run.data.params["output_dir"] == f"s3://{s3_bucket.name}/runs"
        shown = [*run.data.params.values(), *run.data.tags.values(), run.info.run_name]
        assert not any(leaks(str(v).encode()) for v in shown)
        files = [p for p in tmp_path.rglob("*") if p.is_file()]  # the MLflow db and artifacts, the mirror
        assert any(p.name == "fingerprint.json" for p in files) and any(p.name == "config.yaml" for p in files)
        assert [p for p in files if leaks(p.read_bytes())] == []
        store, base = fs.FileSystem.from_uri(output_dir)
        objects = [i.path for i in store.get_file_info(fs.FileSelector(s3_bucket.name, recursive=True))
                   if i.type == fs.FileType.File]
        assert any(o.endswith("summary.json") for o in objects) and any(o.endswith("key.json") for o in objects)
        for path in objects:
            with store.open_input_stream(path) as src:
                assert not leaks(src.read()), path
    finally:
        shutil.rmtree(Path.home() / ".cache" / "ray-kd" / "storage" / "s3" / s3_bucket.name, ignore_errors=True)


@pytest.mark.parametrize("field", ["teacher.checkpoint", "students.0.checkpoint", "data.root", "data.cache_dir"])
def test_a_uri_where_only_local_paths_go_is_one_line_naming_the_field(field, s3_bucket):
    overrides = ["data.dataset=imagefolder"] if field == "data.root" else []
    with pytest.raises(ConfigError) as err:
        load_config("configs/digits_kd.yaml", [*overrides, f"{field}={secret_uri(s3_bucket, 'x.pt')}"])
    message = str(err.value)
    assert field in message and "s3:// is not supported" in message and len(message.splitlines()) == 1
    assert not leaks(message.encode()), message


def test_shown_config_covers_every_uri_field():
    cfg = load_config("configs/digits_kd.yaml", ["teacher.cache=gs://k:s@b/tc?access_key=k", "tracking.uri=http://u:p@h/"])
    assert "s@b" not in str(shown_config(cfg)) and "access_key" not in str(shown_config(cfg))


def test_the_mlflow_marker_holds_the_store_without_credentials_and_a_resume_still_matches(tmp_path):
    """A credentialed tracking URI (`https://user:pass@host/?token=...`) is recorded in the run folder's
    mlflow_run.json as shown; the same store, credentials and all, resumes it, and another store is refused."""
    from ray_kd.run_folder import check_store
    from ray_kd.run_storage import MLFLOW_RUN, RunFolderError, RunStorage

    run = RunStorage.of(load_config("configs/digits_dml.yaml", [f"output_dir={tmp_path}", "name=m"]))
    run.run_dir.mkdir(parents=True)
    uri = f"https://{KEY}:{SECRET}@mlflow.example:5000/api?token={SECRET}"
    run.record_mlflow_run("abc123", uri)
    marker = (run.run_dir / MLFLOW_RUN).read_bytes()
    assert not leaks(marker), marker
    assert run.mlflow_run("run m") == {"run_id": "abc123", "tracking_uri": "https://mlflow.example:5000/api"}
    check_store(run, uri)  # the same store: resumed
    with pytest.raises(RunFolderError) as err:
        check_store(run, f"https://{KEY}:{SECRET}@other.example/")
    assert "https://mlflow.example:5000/api, not https://other.example/" in str(err.value)
    assert not leaks(str(err.value).encode())

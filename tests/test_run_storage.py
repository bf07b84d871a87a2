"""A run's stored checkpoints are verified before a resume trusts them, and a run started without `name=` whose
config changed takes a new folder."""

import json
import zipfile

import pytest

from ray_kd.checkpoint import safe_load
from ray_kd.cli import main
from ray_kd.tracking import client

QUICK = ["optim.steps_per_epoch=2", "optim.milestones=[]"]
EXECUTORS = {"local": ["runtime.executor=local"], "ray": ["runtime.executor=ray", "runtime.cpus_per_worker=0.5"]}


def _train(tmp_path, executor, *overrides):
    return main(["train", "-c", "configs/digits_dml.yaml", f"output_dir={tmp_path / 'runs'}", *QUICK,
                 *EXECUTORS[executor], *overrides])


def _history(folder):
    return json.loads((folder / "history.json").read_text())


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_history_shorter_than_its_epoch_is_corrupt_and_the_run_falls_back(executor, request, tmp_path,
                                                                           mlflow_uri, capsys):
    """A history.json that parses but holds fewer epochs than its folder says (`[]` in epoch_0003) is never resumed
    from: the run falls back to epoch 2 and trains epochs 3 and 4."""
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    checkpoints = tmp_path / "runs" / "h" / "checkpoints"
    assert _train(tmp_path, executor, "name=h", "optim.epochs=3") == 0
    (checkpoints / "epoch_0003" / "history.json").write_text("[]\n")
    capsys.readouterr()

    assert _train(tmp_path, executor, "name=h", "optim.epochs=4") == 0
    out = capsys.readouterr().out
    assert "resuming after epoch 0" not in out and "resuming after epoch 2" in out, out
    fallback = [line for line in out.splitlines() if "falling back to the one before" in line]
    assert len(fallback) == 1 and "epoch_0003" in fallback[0] and "holds 0 epochs, not the 3" in fallback[0], out
    assert [line.split()[1] for line in out.splitlines() if "val/test top-1" in line] == ["3/4", "4/4"], out
    assert [h["epoch"] for h in _history(checkpoints / "epoch_0004")] == [1, 2, 3, 4]
    assert sorted(p.name for p in checkpoints.glob("epoch_*")) == ["epoch_0003", "epoch_0004"]
    summary = json.loads((tmp_path / "runs" / "h" / "summary.json").read_text())
    steps = client(mlflow_uri).get_metric_history(summary["mlflow_run_id"], "student_0/val_acc")
    assert summary["epochs"] == 4 and sorted(int(m.step) for m in steps) == [1, 2, 3, 4]


def test_a_damaged_role_file_that_still_loads_is_caught_by_its_manifest(tmp_path, mlflow_uri, capsys):
    """Bytes flipped inside a tensor record of a role's file: torch.load reads it (it does not check the zip's
    CRCs), the manifest's sha256 does not match, and the run resumes from the checkpoint before."""
    checkpoints = tmp_path / "runs" / "f" / "checkpoints"
    assert _train(tmp_path, "local", "name=f", "optim.epochs=3") == 0
    damaged = checkpoints / "epoch_0003" / "student_0.pt"
    with zipfile.ZipFile(damaged) as archive:  # the largest tensor record: a layer's weights
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        header = 30 + len(record.filename.encode()) + len(record.extra)
    blob = bytearray(damaged.read_bytes())
    start = record.header_offset + header + record.file_size // 2
    blob[start:start + 40] = bytes(b ^ 0xFF for b in blob[start:start + 40])
    damaged.write_bytes(bytes(blob))
    assert safe_load(damaged)["net"]  # still loads
    capsys.readouterr()

    assert _train(tmp_path, "local", "name=f", "optim.epochs=4") == 0
    out = capsys.readouterr().out
    assert "student_0.pt does not match its manifest" in out and "resuming after epoch 2" in out, out
    assert [h["epoch"] for h in _history(checkpoints / "epoch_0004")] == [1, 2, 3, 4]


def test_without_name_a_changed_config_takes_a_new_folder_and_with_name_it_is_refused(tmp_path, mlflow_uri,
                                                                                      capsys):
    runs = tmp_path / "runs"
    assert _train(tmp_path, "local", "optim.epochs=1") == 0
    capsys.readouterr()

    assert _train(tmp_path, "local", "optim.epochs=1", "seed=3") == 0  # the config file's name, another config
    out = capsys.readouterr().out
    assert "run digits-dml was made with another config or data: this one runs as digits-dml-2" in out, out
    assert json.loads((runs / "digits-dml-2" / "summary.json").read_text())["epochs"] == 1
    first = json.loads((runs / "digits-dml" / "fingerprint.json").read_text())
    assert first["seed"] == 0  # the first run's folder is left as it was

    assert _train(tmp_path, "local", "optim.epochs=2", "seed=3") == 0  # the same again: it resumes digits-dml-2
    out = capsys.readouterr().out
    assert "run digits-dml-2: folder" in out and "resuming after epoch 1" in out, out
    assert _train(tmp_path, "local", "optim.epochs=1", "seed=4") == 0
    assert "this one runs as digits-dml-3" in capsys.readouterr().out
    mlflow = client(mlflow_uri)
    third = json.loads((runs / "digits-dml-3" / "summary.json").read_text())["mlflow_run_id"]
    assert mlflow.get_run(third).data.tags["mlflow.runName"] == "digits-dml-3"

    assert _train(tmp_path, "local", "name=digits-dml", "optim.epochs=1", "seed=5") == 2  # a name given: refused
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run digits-dml in" in err and "was made with another config" in err, err
    assert not (runs / "digits-dml-4").exists()


def test_corrupt_run_folder_records_are_a_safe_default_or_one_line(tmp_path, mlflow_uri, capsys):
    """A damaged summary or wall-time record is rewritten by the next start; a damaged MLflow marker or
    fingerprint is one line naming the file and --restart."""
    folder = tmp_path / "runs" / "c"
    assert _train(tmp_path, "local", "name=c", "optim.epochs=1") == 0
    (folder / "summary.json").write_text("{")
    (folder / "wall.json").write_text("[1")
    assert _train(tmp_path, "local", "name=c", "optim.epochs=1") == 0
    assert json.loads((folder / "summary.json").read_text())["epochs"] == 1
    assert json.loads((folder / "wall.json").read_text())["seconds"] > 0
    capsys.readouterr()

    for record in ("mlflow_run.json", "fingerprint.json"):
        kept = (folder / record).read_text()
        (folder / record).write_text('{"run_id": 5}' if record == "mlflow_run.json" else "{")
        assert _train(tmp_path, "local", "name=c", "optim.epochs=2") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{folder / record} is corrupt" in err and "--restart" in err, err
        (folder / record).write_text(kept)

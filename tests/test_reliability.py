"""Issue 32's probe of run names and reruns, as tests: a reused name never mixes MLflow runs, changed data is
never resumed, a rerun of a finished run changes nothing, and the remaining tracebacks are one line."""

import json

import pytest

from ray_kd import api
from ray_kd.cli import main
from ray_kd.config import ConfigError, load_config
from ray_kd.errors import UserError
from ray_kd.reporting import report
from ray_kd.run import preflight
from ray_kd.tracking import client
from test_bad_input import image_folder

QUICK = ["runtime.executor=local", "optim.steps_per_epoch=2", "optim.milestones=[]"]


def _train(tmp_path, *overrides, config="configs/digits_dml.yaml"):
    return main(["train", "-c", config, f"output_dir={tmp_path / 'runs'}", "name=r", *QUICK, *overrides])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _run_id(tmp_path) -> str:
    return json.loads((tmp_path / "runs" / "r" / "mlflow_run.json").read_text())["run_id"]


def test_a_name_reused_before_its_first_checkpoint_is_a_new_mlflow_run(tmp_path, mlflow_uri, capsys):
    """A DML start that died before its first checkpoint (a NaN loss at lr 1e30), then the student alone under the
    same name: the second is its own MLflow run, with its own params; the first stays FAILED."""
    assert _train(tmp_path, "optim.lr=1e30", "optim.epochs=1") == 2
    assert "loss term 'ce' is nan" in capsys.readouterr().err
    first = _run_id(tmp_path)
    assert not list((tmp_path / "runs" / "r").glob("checkpoints/epoch_*"))
    assert _train(tmp_path, "optim.epochs=1", config="configs/digits_alone.yaml") == 0
    assert "starting over as a new MLflow run" in capsys.readouterr().out
    second = _run_id(tmp_path)
    mlflow = client(mlflow_uri)
    assert second != first
    assert mlflow.get_run(first).info.status == "FAILED"
    run = mlflow.get_run(second)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "ce" and float(run.data.params["optim.lr"]) == 0.05
    assert run.data.tags["ray_kd.run_kind"] == "baseline"


def test_a_resume_on_changed_data_is_refused(tmp_path, mlflow_uri, capsys):
    root = image_folder(tmp_path / "folder", classes=("a", "b"), per_class=6)
    data = [f"data.root={root}", "data.dataset=imagefolder", "data.val_fraction=0.5",
            "students=[{model: resnet8}, {model: resnet8}]", f"data.cache_dir={tmp_path / 'cache'}"]
    assert _train(tmp_path, *data, "optim.epochs=1") == 0
    capsys.readouterr()
    image_folder(tmp_path / "more", classes=("a",), per_class=2)  # two more images of class a
    for i, png in enumerate(sorted((tmp_path / "more" / "train" / "a").glob("*.png"))):
        png.rename(root / "train" / "a" / f"extra{i}.png")
    assert _train(tmp_path, *data, "optim.epochs=2") == 2
    err = _one_line(capsys)
    assert "was made with another config or data: data.labels_digest" in err, err
    assert "data.split_sizes {" in err and "-> {'train': 7, 'val': 7, 'test': 12}" in err, err
    image_folder(root, classes=("c",), per_class=6)  # a new class
    assert _train(tmp_path, *data, "optim.epochs=2") == 2
    assert "data.labels_digest" in _one_line(capsys)
    assert sorted(p.name for p in (tmp_path / "runs" / "r" / "checkpoints").glob("epoch_*")) == ["epoch_0001"]


def test_a_run_started_before_an_upgrade_added_a_field_resumes(tmp_path, mlflow_uri, capsys):
    """A field added to the config since a run started (its fingerprint lacks it) is no change while it holds its
    default; set to another value, it is one."""
    assert _train(tmp_path, "optim.epochs=1") == 0
    path = tmp_path / "runs" / "r" / "fingerprint.json"
    before = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in before.items() if k != "optim.label_smoothing"}))  # as an older ray-kd wrote it
    assert _train(tmp_path, "optim.epochs=2") == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "r" / "checkpoints").glob("epoch_*"))[-1] == "epoch_0002"
    capsys.readouterr()
    assert _train(tmp_path, "optim.epochs=3", "optim.label_smoothing=0.1") == 2
    assert "optim.label_smoothing None -> 0.1" in _one_line(capsys)


def test_a_rerun_of_a_finished_run_changes_nothing_and_a_resume_counts_all_its_time(tmp_path, mlflow_uri, capsys):
    import threading

    assert _train(tmp_path, "optim.epochs=1") == 0
    run_dir = tmp_path / "runs" / "r"
    summary = json.loads((run_dir / "summary.json").read_text())
    mlflow = client(mlflow_uri)
    run = mlflow.get_run(summary["mlflow_run_id"])
    models = mlflow.search_logged_models([run.info.experiment_id])
    capsys.readouterr()

    assert _train(tmp_path, "optim.epochs=1") == 0
    assert "already finished all 1 epochs, nothing to do" in capsys.readouterr().out
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert len(mlflow.search_logged_models([run.info.experiment_id])) == len(models)
    assert len(mlflow.get_metric_history(run.info.run_id, "test_acc_at_best_val")) == 1
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"

    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(mlflow.get_run(run.info.run_id).info.status)
            stop.wait(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert _train(tmp_path, "optim.epochs=4") == 0  # extend it
    finally:
        stop.set()
        watcher.join()
    assert "RUNNING" in seen, seen  # not FINISHED (or KILLED) while it trains again
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["epochs"] == 4 and resumed["wall_seconds"] > summary["wall_seconds"]
    assert json.loads((run_dir / "wall.json").read_text())["seconds"] >= resumed["wall_seconds"] - 0.1


def test_report_with_two_student_models_in_a_group(tmp_path, mlflow_uri, capsys):
    """A metric key like `dml/digits_cnn_l+digits_cnn_s...` is sanitised, not a crash."""
    assert _train(tmp_path, "optim.epochs=1", "students=[{model: digits_cnn_l}, {model: digits_cnn_s}]") == 0
    result = report("ray-kd", tmp_path / "report", mlflow_uri)
    run = client(mlflow_uri).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert any("+" not in k and "digits_cnn_l_digits_cnn_s" in k for k in run.data.metrics), run.data.metrics


def test_batch_larger_than_the_training_set_says_so(capsys):
    preflight(load_config("configs/digits_dml.yaml", ["data.batch_size=100000", "runtime.executor=local"]))
    assert "data.batch_size=100000 is larger than the 1,293 training images: every epoch is one step" in \
        capsys.readouterr().out


def test_cache_dir_that_is_a_file_on_digits_is_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert _train(tmp_path, f"data.cache_dir={tmp_path / 'a_file'}") == 2
    assert f"data.cache_dir={tmp_path / 'a_file'} is not a writable folder" in _one_line(capsys)


def test_a_factory_that_raises_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_factory.py").write_text("def make(num_classes):\n    raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _train(tmp_path, "students.0.model=broken_factory:make") == 2
    err = _one_line(capsys)
    assert "model 'broken_factory:make': its factory raised RuntimeError: no GPU here" in err, err


def test_config_naming_a_folder_is_one_line(tmp_path, capsys):
    assert main(["train", "-c", str(tmp_path)]) == 2
    assert f"config file {tmp_path} is a folder" in _one_line(capsys)


@pytest.mark.parametrize("call, expected", [
    (lambda: api.train(123), "config must be a YAML path, a dict or a RunConfig, not int 123"),
    (lambda: api.train("configs/digits_dml.yaml", 5), "overrides must be a list of 'key=value' strings"),
    (lambda: api.train("configs/digits_dml.yaml", "optim.epochs=2"), "not str 'optim.epochs=2'"),
    (lambda: api.tune("configs/digits_dml.yaml", 5), "a search space is a YAML path, a dict or a SweepSpace, not int"),
    (lambda: api.tune("configs/digits_dml.yaml", {"params": {"optim.lr": {"type": "nope"}}}), "search space: params"),
])
def test_python_api_type_errors_are_one_line(call, expected):
    with pytest.raises(UserError) as err:
        call()
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_factories_are_imported_when_the_run_is_built_and_an_allow_list_limits_them(tmp_path, monkeypatch, capsys):
    (tmp_path / "noisy_factory.py").write_text("raise SystemExit('imported during validation')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["students.0.model=noisy_factory:make", "students.1.model=os:system"])  # no import
    assert cfg.students[0].model == "noisy_factory:make"
    with pytest.raises(ConfigError, match="name torchvision:<name>, timm:<name> or package.module:factory"):
        load_config(None, ["students.0.model=os:system; rm -rf /"])
    monkeypatch.setenv("RAY_KD_ALLOWED_MODULES", "tiny_factory,mypkg")
    with pytest.raises(UserError, match="module 'os' is not in RAY_KD_ALLOWED_MODULES=tiny_factory,mypkg"):
        load_config(None, ["students.0.model=os:system"])
    with pytest.raises(UserError, match="module 'os.path' is not in RAY_KD_ALLOWED_MODULES"):
        load_config(None, ["method.name=os.path:join"])
    load_config(None, ["students.0.model=mypkg.models:make"])  # a submodule of an allowed one

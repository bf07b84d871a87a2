"""Inputs that used to pass the config and fail later, or fail naming the wrong cause: each is one line at the
start, naming the field, with exit code 2 and no MLflow run made."""

import pytest

from ray_kd.cli import main
from ray_kd.config import ConfigError, load_config

KD = ["-c", "configs/digits_kd.yaml", "students=[{{model: digits_cnn_s}}]"]

CASES = {
    "temperature inf": ([*KD, "teacher.checkpoint={teacher}", "method.temperature=.inf"],
                        "config error: method.temperature: Input should be a finite number"),
    "a folder as a checkpoint": ([*KD, "teacher.checkpoint={tmp}"], "checkpoint {tmp} is not a file (a folder)"),
    "/dev/null as a checkpoint": ([*KD, "teacher.checkpoint=/dev/null"],
                                  "checkpoint /dev/null is not a file (a device or pipe)"),
    "teacher.cache with sokd": (["-c", "configs/sokd_digits.yaml", "teacher.checkpoint={teacher}",
                                 "teacher.cache={tmp}/tc"],
                                "teacher.cache keeps a frozen teacher's outputs, but sokd's teacher trains"),
    "builtins:exit as a model": (["students.0.model=builtins:exit"],
                                 "builtins holds Python's own functions, not a model factory"),
    "a name of 256 characters": ([f"name={'n' * 256}"], "config error at name: name is 256 characters long; keep it "
                                 "to 200"),
    "cache_topk above the classes": ([*KD, "teacher.checkpoint={teacher}", "teacher.cache={tmp}/tc",
                                      "teacher.cache_topk=100"],
                                     "teacher.cache_topk: 100 is more than the data's 10 classes"),
    "register_model a/b:c": (["tracking.register_model=a/b:c"],
                             "config error at tracking.register_model: Invalid model name 'a/b:c'"),
    "output_dir s3:// with no bucket": (["output_dir=s3://"], "config error at output_dir: s3:// names no bucket"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_before_any_run(case, tmp_path, mlflow_uri, digits_teacher, capsys):
    args, expected = CASES[case]
    fill = {"teacher": digits_teacher, "tmp": tmp_path}
    out = [] if "output_dir" in " ".join(args) else [f"output_dir={tmp_path / 'runs'}"]
    argv = ["train", *[a.format(**fill) for a in args], *out, "runtime.executor=local"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.format(**fill) in err, err
    from mlflow.tracking import MlflowClient

    assert MlflowClient(mlflow_uri).search_runs(["0"]) == []
    experiment = MlflowClient(mlflow_uri).get_experiment_by_name("ray-kd")
    assert experiment is None or MlflowClient(mlflow_uri).search_runs([experiment.experiment_id]) == []


def test_nccl_without_gpus_is_one_line_at_the_preflight(ray_cluster, tmp_path, mlflow_uri, capsys):
    argv = ["train", f"output_dir={tmp_path}", "runtime.executor=ray", "runtime.backend=nccl", "optim.epochs=1"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "mlflow.store.db" not in line]  # a new store
    assert len(err) == 1 and "runtime.backend=nccl runs on GPUs, but this run's workers get none" in err[0], err
    assert not (tmp_path / "digits-dml").exists()


@pytest.mark.parametrize("value, means", [("yes", "yes"), ("no", "no"), ("true", "yes"), ("auto", "auto")])
def test_use_gpu_takes_yaml_booleans(value, means):
    assert load_config(None, [f"runtime.use_gpu={value}"]).runtime.use_gpu == means


def test_a_uniform_search_over_an_integer_field_is_refused_before_any_trial():
    from tuning.space import check_space, load_space

    base = load_config().model_dump()
    space = load_space({"params": {"data.batch_size": {"type": "uniform", "low": 16, "high": 64}}})
    with pytest.raises(ConfigError, match="data.batch_size: uniform draws fractions, but data.batch_size takes whole "
                                          "numbers; search it with randint"):
        check_space(space, base)
    check_space(load_space({"params": {"data.batch_size": {"type": "randint", "low": 16, "high": 64},
                                       "optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.1}}}), base)


def test_a_signal_while_finishing_leaves_a_run_the_same_command_finishes(tmp_path, mlflow_uri, monkeypatch, capsys):
    """SIGTERM after the last epoch, while the run writes its summary and logs its model: exit 143, a line that
    says so, the MLflow run KILLED; the same command then finishes it without training again."""
    import json
    import os
    import signal

    from mlflow.tracking import MlflowClient

    from ray_kd import run

    argv = ["train", f"output_dir={tmp_path}", "name=fin", "runtime.executor=local", "optim.epochs=2",
            "optim.milestones=[1]", "optim.steps_per_epoch=2"]
    plot = run.plot_curves

    def plot_then_terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return plot(*args, **kwargs)

    monkeypatch.setattr(run, "plot_curves", plot_then_terminated)
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert "ray-kd: run fin stopped while finishing after its last epoch (2): the same command finishes it; resume " \
           "with: ray-kd train" in err, err
    run_id = json.loads((tmp_path / "fin" / "mlflow_run.json").read_text())["run_id"]
    mlflow = MlflowClient(mlflow_uri)
    assert mlflow.get_run(run_id).info.status == "KILLED" and not (tmp_path / "fin" / "summary.json").exists()
    monkeypatch.setattr(run, "plot_curves", plot)
    assert main(argv) == 0
    assert json.loads((tmp_path / "fin" / "summary.json").read_text())["epochs"] == 2
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    assert [int(m.step) for m in mlflow.get_metric_history(run_id, "student_0/val_acc")] == [1, 2]

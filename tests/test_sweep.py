"""A real small sweep on the digits: parent and child runs, the best config, early stopping by ASHA."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from ray_kd.config import ConfigError, load_config
from ray_kd.run_storage import RunStorage
from ray_kd.tracking import client
from tuning.space import SweepSpace, load_space
from tuning.sweep import sweep


def test_random_sweep_with_asha(ray_cluster, mlflow_uri, tmp_path):
    space = SweepSpace.model_validate({
        "searcher": "random", "num_samples": 5, "max_concurrent_trials": 1,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "params": {"optim.lr": {"type": "loguniform", "low": 0.0005, "high": 0.2},
                   "method.temperature": {"type": "uniform", "low": 1.0, "high": 4.0}},
    })
    cfg = load_config("configs/digits_dml.yaml", [f"output_dir={tmp_path}", "name=sw", "optim.epochs=3",
                                                  "optim.milestones=[2]", "seed=1",
                                                  "tracking.system_metrics_interval=0.05"])  # samples a short trial
    best = sweep(cfg, space)

    folder = tmp_path / "sw-sweep"
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert len(rows) == 5
    assert any(r["status"] == "stopped early" for r in rows), rows  # ASHA cut at least one trial short
    assert best["best_val_acc"] == max(float(r["best_val_acc"]) for r in rows if r["best_val_acc"])

    best_cfg = load_config(folder / "best_config.yaml")  # a ready-to-run, valid run spec
    assert best_cfg.optim.lr == float(best["optim.lr"]) and best_cfg.name == "sw-best"

    mlflow = client(mlflow_uri)
    parent = mlflow.search_runs(mlflow.get_experiment_by_name("ray-kd").experiment_id,
                                "tags.mlflow.runName = 'sw-sweep'")[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_acc"] == best["best_val_acc"]
    children = mlflow.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 5 and all(c.info.status in ("FINISHED", "KILLED") for c in children)
    # Trials are tagged as such, nested under the parent; each Ray worker logs system metrics as its role.
    assert parent.data.tags["ray_kd.run_kind"] == "sweep"
    assert {c.data.tags["ray_kd.run_kind"] for c in children} == {"sweep_trial"}
    per_role = {f"system/{role}/cpu_utilization_percentage" for role in ("student_0", "student_1")}
    assert any(per_role <= set(c.data.metrics) for c in children), [sorted(c.data.metrics) for c in children]
    # A trial that ran every epoch closed its run (summary, final metrics, description) before ASHA stopped it at
    # max_t; one ASHA stopped sooner is KILLED, tagged so; each matches its row.
    status = {f"sw-{r['trial_id']}": r["status"] for r in rows}
    for c in children:
        note = c.data.tags["mlflow.note.content"]
        if status[c.info.run_name] == "ok":
            assert c.info.status == "FINISHED" and "test_acc_at_best_val" in c.data.metrics and "running" not in note
            assert (folder / "trials" / c.info.run_name / "summary.json").is_file()
        else:
            assert c.info.status == "KILLED" and c.data.tags["ray_kd.stopped"].startswith(
                "stopped early by the scheduler after epoch ") and note.endswith(c.data.tags["ray_kd.stopped"])
    artifacts = {a.path for a in mlflow.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "best_config.yaml", "objective.png", "space.yaml"} <= artifacts


def test_trials_find_files_given_as_relative_paths(ray_cluster, mlflow_uri, tmp_path, monkeypatch):
    """Tune runs each trial in its own directory; the teacher file and output folder named relative to the
    command's directory must still be found there. The teacher's logged model (in this store) is an input of
    each trial, not of the sweep's parent run, whose result is its trials'."""
    from ray_kd.run import train_teacher

    config = Path("configs/digits_kd.yaml").resolve()
    train_teacher(load_config("configs/digits_teacher.yaml", ["runtime.executor=local", "optim.epochs=1",
                                                              f"output_dir={tmp_path / 'teacher'}"]),
                  tmp_path / "teacher.pt")
    monkeypatch.chdir(tmp_path)
    space = SweepSpace.model_validate({"searcher": "grid", "scheduler": {"type": "none"},
                                       "params": {"method.temperature": {"type": "grid", "values": [2.0]}}})
    cfg = load_config(config, ["teacher.checkpoint=teacher.pt", "output_dir=out", "name=rel", "teacher.cache=cache",
                               "optim.epochs=1", "optim.steps_per_epoch=3"])
    best = sweep(cfg, space)
    assert best["status"] == "ok", best
    assert (tmp_path / "out" / "rel-sweep" / "results.csv").is_file()
    # teacher.cache: the teacher's outputs computed once before the trials, which read every step of them
    (history,) = (tmp_path / "out" / "rel-sweep" / "trials").glob("*/checkpoints/epoch_0001/history.json")
    (epoch,) = json.loads(history.read_text())
    assert (epoch["teacher/cache_hits"], epoch["teacher/cache_misses"]) == (3, 0)
    assert (tmp_path / "cache").is_dir()
    mlflow = client(mlflow_uri)
    experiment = mlflow.get_experiment_by_name("ray-kd").experiment_id
    (parent,) = mlflow.search_runs([experiment], "tags.mlflow.runName = 'rel-sweep'")
    (trial,) = mlflow.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    parent, trial = mlflow.get_run(parent.info.run_id), mlflow.get_run(trial.info.run_id)  # with their inputs
    assert not parent.inputs.model_inputs and len(trial.inputs.model_inputs) == 1


def test_a_grid_runs_each_point_once_unless_asked_for_repeats():
    params = {"method.temperature": {"type": "grid", "values": [2.0, 4.0]}}
    assert SweepSpace.model_validate({"searcher": "grid", "params": params}).num_samples == 1
    assert SweepSpace.model_validate({"searcher": "grid", "num_samples": 3, "params": params}).num_samples == 3
    uniform = {"optim.lr": {"type": "uniform", "low": 0.01, "high": 0.1}}
    assert SweepSpace.model_validate({"searcher": "random", "params": uniform}).num_samples == 8


@pytest.mark.parametrize("runtime, cluster, gpu, fits", [
    ([], {"CPU": 8}, False, 3),  # 2 roles apart: 2.01 CPUs a trial
    (["runtime.placement=together"], {"CPU": 8}, False, 7),  # the teacher in its student's worker: 1.01
    (["runtime.replicas=2"], {"CPU": 8}, False, 1),  # 2 roles x 2 replicas apart: 4.01
    (["runtime.replicas=2", "runtime.placement=together"], {"CPU": 8}, False, 3),
    (["runtime.cpus_per_worker=2"], {"CPU": 8}, False, 1),
    ([], {"CPU": 64, "GPU": 4}, True, 2),  # the GPUs, a worker each, bound it
    ([], {"CPU": 1}, False, 1),  # always one, which then says it does not fit
])
def test_a_sweep_runs_as_many_trials_at_once_as_the_cluster_holds(runtime, cluster, gpu, fits):
    from tuning.sweep import trials_that_fit

    cfg = load_config("configs/digits_kd.yaml", ["runtime.cpus_per_worker=1", *runtime])
    assert trials_that_fit(cfg, cluster, gpu) == fits


def test_bad_space_is_one_line(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"params": {"optim.lr": {"type": "loguniform", "low": 0, "high": 1}}}))
    with pytest.raises(ConfigError, match=r"params\.optim\.lr: .*loguniform parameter needs low > 0$"):
        load_space(path)


SPACE_CONFIGS = {"ce": "digits_alone", "kd": "digits_kd", "dml": "digits_dml", "dml_digits_demo": "digits_dml",
                 "sokd": "sokd_digits", "kd_skd": "skd_kd_digits", "mtkd_ssr": "mtkd_digits",
                 "lwkd": "lwkd_digits", "tfkd": "tfkd_digits"}


@pytest.mark.parametrize("space", sorted(SPACE_CONFIGS))
def test_every_shipped_space_searches_real_fields_of_its_method(space):
    """Both ends of every range must make a valid run spec for the method's own digits config."""
    spec = load_space(f"tuning/spaces/{space}.yaml")
    for end in ("low", "high"):
        overrides = [f"{name}={getattr(p, end) if p.values is None else p.values[0]}" for name, p in spec.params.items()]
        cfg = load_config(f"configs/{SPACE_CONFIGS[space]}.yaml", overrides)
        for name in spec.params:
            section, field = name.split(".")
            assert hasattr(getattr(cfg, section), field) or field in (getattr(cfg, section).model_extra or {}), name


def test_there_is_a_space_for_every_method():
    from pathlib import Path

    from ray_kd.methods import list_methods

    built_in = {name for name, origin, _ in list_methods() if origin == "built-in" and not name.startswith("+")}
    shipped = {p.stem for p in Path("tuning/spaces").glob("*.yaml")}
    assert built_in and built_in | {"kd_skd"} <= shipped  # plugins loaded by other tests bring their own


def test_a_sweep_speaks_once_and_its_best_config_repeats_its_trial(ray_cluster, mlflow_uri, tmp_path, capfd):
    """Tune's tables are off: a line per trial as it ends and a closing line, all with the best that results.csv
    marks and best_config.yaml holds; `train` of that file gives the trial's per-epoch validation numbers."""
    from ray_kd.run_storage import read_history
    from ray_kd.run import train

    space = SweepSpace.model_validate({"searcher": "grid", "scheduler": {"type": "none"},
                                       "params": {"optim.lr": {"type": "grid", "values": [0.01, 0.05, 0.2]}}})
    cfg = load_config("configs/digits_dml.yaml", [f"output_dir={tmp_path}", "name=once", "optim.epochs=2",
                                                  "optim.milestones=[1]", "optim.steps_per_epoch=5",
                                                  "runtime.executor=local"])  # trials run on Ray all the same
    capfd.readouterr()
    best = sweep(cfg, space)
    out = capfd.readouterr().out
    lines = out.strip().splitlines()
    assert not [t for t in ("Trial status", "Current best trial", "╭", "+---") if t in out], out
    folder = tmp_path / "once-sweep"
    rows = {r["trial_id"]: r for r in csv.DictReader((folder / "results.csv").open())}
    said = {line.split()[1]: line for line in lines if line.startswith("trial ")}
    assert said.keys() == rows.keys() and len(lines) <= len(rows) + 5, out  # + opening, closing and link lines
    for trial_id, row in rows.items():
        assert said[trial_id].startswith(f"trial {trial_id} ok (2 of 2 epochs): val {float(row['best_val_acc']):.2f} "
                                         f"at epoch {row['best_epoch']} (test "), said[trial_id]
    (marked,) = [r for r in rows.values() if r["best"] == "yes"]
    assert marked["trial_id"] == best["trial_id"]
    assert float(marked["best_val_acc"]) == max(float(r["best_val_acc"]) for r in rows.values())
    (closing,) = [line for line in lines if line.startswith("best trial ")]
    assert closing.startswith(f"best trial {best['trial_id']} of 3: val {best['best_val_acc']:.2f} at epoch "), closing
    assert "?workflowType=machine_learning" in lines[lines.index(closing) + 1]  # the parent run's link

    best_file = folder / "best_config.yaml"
    assert best_file.read_text().startswith(f"# The best trial of sweep once-sweep (results.csv marks it): "
                                            f"{best['trial_id']}, ok, 2 of 2 epochs")
    best_cfg = load_config(best_file)
    assert best_cfg.runtime.executor == "ray" and best_cfg.optim.lr == float(marked["optim.lr"])
    again = train(best_cfg)
    trial_run = folder / "trials" / f"once-{best['trial_id']}" / "checkpoints" / "epoch_0002"
    keys = ("student_0/val_acc", "student_1/val_acc")
    trial = [[e[k] for k in keys] for e in read_history(trial_run)]
    repeat = [[e[k] for k in keys] for e in read_history(RunStorage.of(best_cfg).run_dir / "checkpoints" / "epoch_0002")]
    assert repeat == trial and again["headline"]["val_acc_at_best"] == best["best_val_acc"]


def test_a_bad_tune_verbosity_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_KD_TUNE_VERBOSE", "loud")
    space = SweepSpace.model_validate({"searcher": "grid", "params": {"optim.lr": {"type": "grid", "values": [0.1]}}})
    with pytest.raises(ConfigError, match=r"^config error: RAY_KD_TUNE_VERBOSE='loud': use 0"):
        sweep(load_config("configs/digits_dml.yaml", [f"output_dir={tmp_path}"]), space)

"""What a reviewer sees in MLflow, read back through MlflowClient as the UI reads it: final metrics that
match the saved weights, tags, description, dataset input, teacher lineage, system metrics, and the report.

One real store for the module: a teacher from `train-teacher`, then KD from it and the student alone, two
seeds each, all tiny and on the single-process executor."""

import json
import math
import shutil
import statistics

import pytest
import torch

from ray_kd.cli import main
from ray_kd.config import load_config
from ray_kd.reporting import report
from ray_kd.run import train, train_teacher
from ray_kd.run_storage import RunStorage
from ray_kd.tracking import FINAL_METRICS, client, teacher_origin

TINY = ["runtime.executor=local", "optim.epochs=3", "optim.steps_per_epoch=4", "optim.milestones=[2]",
        "tracking.system_metrics_interval=0.05"]  # samples even while a 12-step run trains on a quiet machine


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The teacher run, KD at seeds 0 and 1 and the student alone at seeds 0 and 1, in one real store."""
    root = tmp_path_factory.mktemp("review")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        out = [f"output_dir={root / 'runs'}"]
        teacher = train_teacher(load_config("configs/digits_teacher.yaml", TINY + out), root / "teacher.pt")["teacher_file"]
        summaries = {}
        for seed in (0, 1):
            summaries["kd", seed] = train(load_config("configs/digits_kd.yaml", TINY + out + [
                f"teacher.checkpoint={teacher}", f"name=kd-s{seed}", f"seed={seed}"]))
            summaries["ce", seed] = train(load_config("configs/digits_alone.yaml", TINY + out + [
                f"name=alone-s{seed}", f"seed={seed}"]))
        yield {"uri": uri, "root": root, "teacher": teacher, "summaries": summaries}


def _logged_model(mlflow, run):
    (output,) = run.outputs.model_outputs
    return mlflow.get_logged_model(output.model_id)


def test_final_metrics_match_the_saved_model_and_summary(store):
    mlflow, root = client(store["uri"]), store["root"]
    summary = json.loads((root / "runs" / "kd-s0" / "summary.json").read_text())
    run = mlflow.get_run(summary["mlflow_run_id"])
    metrics = run.data.metrics
    headline = summary["headline"]
    saved = torch.load(root / "runs" / "kd-s0" / "best_student.pt", weights_only=True)
    assert saved["best_epoch"] == headline["best_epoch"] == metrics["best_epoch"]
    for name in FINAL_METRICS:  # once each (step 0: a bar in the UI, not a one-dot line), after the curves
        assert metrics[name] == pytest.approx(headline[name]), name
        assert [m.step for m in mlflow.get_metric_history(run.info.run_id, name)] == [0], name
        for role, scores in summary["roles"].items():
            assert metrics[f"{role}/final/{name}"] == pytest.approx(scores[name]), (role, name)
    # The chosen epoch's curve values are the headline: the saved weights come from that epoch.
    test_curve = {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, "student_0/test_acc")}
    assert test_curve[headline["best_epoch"]] == pytest.approx(headline["test_acc_at_best_val"])
    assert test_curve[summary["epochs"]] == pytest.approx(headline["last_test_acc"])

    model = _logged_model(mlflow, run)
    assert model.name == "student_0-digits_cnn_s" and model.source_run_id == run.info.run_id
    on_model = {m.key: m.value for m in model.metrics}
    assert on_model == pytest.approx({k: headline[k] for k in FINAL_METRICS})  # its metrics, nothing else
    assert model.params["architecture"] == "digits_cnn_s"
    assert mlflow.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    # What a user loads is the student as an nn.Module taking raw images: eval() works, logits out, its network
    # holds best_student.pt's weights and the run's normalisation is inside.
    import mlflow as mlflow_module
    from mlflow import pytorch as mlflow_pytorch

    from ray_kd.data import normalize
    from ray_kd.models import create_model

    mlflow_module.set_tracking_uri(store["uri"])
    loaded = mlflow_pytorch.load_model(f"models:/{model.model_id}").eval()
    assert isinstance(loaded, torch.nn.Module) and set(loaded.net.state_dict()) == set(saved["state_dict"])
    reference = create_model("digits_cnn_s", 10, 1)
    reference.load_state_dict(saved["state_dict"])
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    prep = saved["preprocessing"]
    with torch.no_grad():
        expected = reference.eval()(normalize(images, torch.tensor(prep["mean"]), torch.tensor(prep["std"])))[0]
        assert torch.allclose(loaded(images), expected, atol=1e-6)

    # Curves: clear names, no epoch metric, the frozen teacher's accuracy once (final), throughput apart.
    assert "epoch" not in metrics and "best_student_test_acc" not in metrics
    assert "teacher/val_acc" not in metrics and "teacher/final/test_acc_at_best_val" in metrics
    # The description states the final figures: the best student's, then the teacher's.
    teacher_test = summary["roles"]["teacher"]["test_acc_at_best_val"]
    note = run.data.tags["mlflow.note.content"]
    assert f"; teacher test {teacher_test:.2f}; card: student " in note and note.endswith(summary["card"]["line"])
    assert {"throughput/student_0/samples_per_s", "student_0/loss_kd", "student_0/val_acc"} <= set(metrics)
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "student_0/val_acc")] == [1, 2, 3]


def test_tags_description_dataset_and_lineage(store, capsys):
    mlflow = client(store["uri"])
    kd = mlflow.get_run(store["summaries"]["kd", 1]["mlflow_run_id"])
    tags = kd.data.tags
    assert {k: tags[k] for k in ("ray_kd.run_kind", "ray_kd.method", "ray_kd.teacher", "ray_kd.student",
                                 "ray_kd.dataset", "ray_kd.seed")} == {
        "ray_kd.run_kind": "distillation", "ray_kd.method": "kd", "ray_kd.teacher": "digits_cnn_l",
        "ray_kd.student": "digits_cnn_s", "ray_kd.dataset": "digits", "ray_kd.seed": "1"}
    assert tags["mlflow.user"] and tags["mlflow.source.name"]
    if shutil.which("git"):
        assert len(tags["mlflow.source.git.commit"]) == 40 and tags["ray_kd.git_dirty"] in ("true", "false")
    headline = store["summaries"]["kd", 1]["headline"]
    note = tags["mlflow.note.content"]
    assert "\n" not in note and f"**{headline['test_acc_at_best_val']:.2f}**" in note, note

    (dataset,) = kd.inputs.dataset_inputs
    assert dataset.dataset.name == "digits" and json.loads(dataset.dataset.source)["uri"] == "sklearn digits"
    assert json.loads(dataset.dataset.profile)["splits"] == {"train": 1293, "val": 144, "test": 360}
    alone = mlflow.get_run(store["summaries"]["ce", 1]["mlflow_run_id"])
    assert alone.inputs.dataset_inputs[0].dataset.digest == dataset.dataset.digest  # the same data, the same digest
    assert alone.data.tags["ray_kd.run_kind"] == "baseline" and alone.data.tags["ray_kd.teacher"] == "none"

    # The teacher run is the teacher, and the KD run links it: tag, and its model as an input.
    origin = torch.load(store["teacher"], weights_only=True)["mlflow"]
    teacher_run = mlflow.get_run(origin["run_id"])
    assert teacher_run.data.tags["ray_kd.run_kind"] == "teacher"
    assert "teacher/val_acc" in teacher_run.data.metrics and not any(k.startswith("student_0") for k in
                                                                     teacher_run.data.metrics)
    assert _logged_model(mlflow, teacher_run).name == "teacher-digits_cnn_l"
    assert origin["kept"] == "best" and origin["test_acc"] == teacher_run.data.metrics["test_acc_at_best_val"]
    assert tags["ray_kd.teacher_run_id"] == origin["run_id"] and tags["ray_kd.teacher_model_id"] == origin["model_id"]
    assert tags["ray_kd.teacher_kept"] == "best" and tags["ray_kd.teacher_epoch"] == str(origin["epoch"])
    assert [m.model_id for m in kd.inputs.model_inputs] == [origin["model_id"]]

    # A teacher file from before (no MLflow origin in it) still loads, and links nothing.
    old = store["root"] / "old_teacher.pt"
    torch.save({k: v for k, v in torch.load(store["teacher"], weights_only=True).items() if k != "mlflow"}, old)
    assert teacher_origin(str(old)) == {}


def test_a_teacher_kept_at_its_last_epoch(store, monkeypatch):
    """`train-teacher --keep last`: the file holds the last epoch's weights and says so; a KD run tags it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    root = store["root"]
    out = [f"output_dir={root / 'runs'}", "tracking.experiment=kept-last"]  # apart from the report's experiment
    cfg = load_config("configs/digits_teacher.yaml", TINY + out + ["name=teacher-last"])
    summary = train_teacher(cfg, root / "last.pt", keep="last")
    blob = torch.load(root / "last.pt", weights_only=True)
    scores = summary["roles"]["teacher"]
    assert (blob["kept"], blob["epoch"], blob["test_acc"]) == ("last", 3, scores["last_test_acc"])
    assert blob["mlflow"]["model_id"] is None  # the logged model is the best epoch's, not these weights
    net = torch.load(RunStorage.of(cfg).run_dir / "checkpoints" / "epoch_0003" / "student_0.pt", weights_only=True)["net"]
    assert blob["state_dict"].keys() == {k.removeprefix("backbone.") for k in net if k.startswith("backbone.")}
    assert all(torch.equal(v, net[f"backbone.{k}"]) for k, v in blob["state_dict"].items())
    kd = train(load_config("configs/digits_kd.yaml", TINY + out + [f"teacher.checkpoint={root / 'last.pt'}",
                                                                    "name=kd-last"]))
    tags = client(store["uri"]).get_run(kd["mlflow_run_id"]).data.tags
    assert (tags["ray_kd.teacher_kept"], tags["ray_kd.teacher_epoch"]) == ("last", "3")
    assert kd["roles"]["teacher"]["last_test_acc"] == pytest.approx(scores["last_test_acc"])  # the same weights


def test_system_metrics_of_the_local_process(store):
    """(Per Ray worker, node = role: tests/test_sweep.py, whose trials run on Ray.)"""
    mlflow = client(store["uri"])
    for summary in store["summaries"].values():
        metrics = mlflow.get_run(summary["mlflow_run_id"]).data.metrics
        assert "system/local/cpu_utilization_percentage" in metrics and \
               "system/local/system_memory_usage_megabytes" in metrics, sorted(metrics)


def test_report_over_two_methods_and_two_seeds(store, tmp_path, capsys):
    out = tmp_path / "report"
    result = report("ray-kd", out, store["uri"])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"kd", "ce"} and rows["kd"]["n"] == rows["ce"]["n"] == 2  # the teacher run is not a group
    s = store["summaries"]
    kd = [s["kd", seed]["headline"]["test_acc_at_best_val"] for seed in (0, 1)]
    ce = [s["ce", seed]["headline"]["test_acc_at_best_val"] for seed in (0, 1)]
    assert rows["kd"]["test_acc_at_best_val_mean"] == pytest.approx(statistics.mean(kd))
    assert rows["kd"]["test_acc_at_best_val_std"] == pytest.approx(statistics.stdev(kd))
    last = [s["ce", seed]["headline"]["last_test_acc"] for seed in (0, 1)]
    assert rows["ce"]["last_test_acc_mean"] == pytest.approx(statistics.mean(last))
    gains = [k - c for k, c in zip(kd, ce)]
    assert rows["kd"]["gain_vs_alone_mean"] == pytest.approx(statistics.mean(gains))
    assert rows["kd"]["gain_vs_alone_std"] == pytest.approx(statistics.stdev(gains))
    assert rows["kd"]["gain_vs_alone_n"] == 2 and rows["ce"]["gain_vs_alone_n"] == 0
    assert math.isnan(rows["ce"]["gain_vs_alone_mean"])
    for name in ("report.md", "report.csv", "report.png"):
        assert (out / name).stat().st_size > 0
    # report.png's accuracy axis spans the data (points ± std), not 0 to 100.
    import pandas as pd

    from ray_kd.reporting import figure

    low, high = figure(pd.DataFrame(result["rows"])).axes[0].get_xlim()
    ends = [r["test_acc_at_best_val_mean"] + sign * r["test_acc_at_best_val_std"] for r in result["rows"]
            for sign in (-1, 1)]
    assert min(ends) - 0.1 * (max(ends) - min(ends)) <= low <= min(ends) and max(ends) <= high, (low, high, ends)
    assert f"{statistics.mean(gains):+.2f}" in (out / "report.md").read_text()

    mlflow = client(store["uri"])
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.data.tags["ray_kd.run_kind"] == "report" and "| kd |" in run.data.tags["mlflow.note.content"]
    assert {a.path for a in mlflow.list_artifacts(run.info.run_id)} == {"report.md", "report.csv", "report.png"}
    gain_key = [k for k in run.data.metrics if k.startswith("kd/digits_cnn_l-to-digits_cnn_s.digits.")
                and k.endswith("/gain_vs_alone_mean")]
    assert len(gain_key) == 1 and run.data.metrics[gain_key[0]] == pytest.approx(statistics.mean(gains))

    # The command prints the table and the direct link to its run (MLFLOW_TRACKING_URI names the store).
    capsys.readouterr()
    assert main(["report", "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    newest = mlflow.search_runs([run.info.experiment_id], "tags.ray_kd.run_kind = 'report'",
                                order_by=["attributes.start_time DESC"])[0]
    assert "| kd | digits_cnn_l | digits_cnn_s |" in printed
    link = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{newest.info.run_id}"
    assert f"{link}?workflowType=machine_learning\n" in printed  # MLflow 3.17's Model training view
    assert f"mlflow ui --backend-store-uri {store['uri']} --host 127.0.0.1 --port 5000" in printed


def test_report_on_a_missing_experiment_is_one_line(store, capsys):
    assert main(["report", "--experiment", "nope", "--tracking-uri", store["uri"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLflow experiment 'nope'" in err[0], err

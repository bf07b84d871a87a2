"""The student as shipped: the logged model and `load_student` take raw images and score the run's test top-1;
its card against the teacher; export to ONNX / TorchScript / pt2; the registered version's alias and tags.

One real KD run on the digits (local executor, real MLflow sqlite store), shared by the module."""

import json

import numpy as np
import pytest
import torch

from ray_kd import load_student
from ray_kd.card import THROUGHPUT_BATCH, make_card
from ray_kd.checkpoint import CheckpointError, save_model_file
from ray_kd.cli import main
from ray_kd.config import load_config
from ray_kd.datasets import load_dataset
from ray_kd.models import create_model
from ray_kd.run import train
from ray_kd.run_storage import RunStorage
from ray_kd.tracking import client

FAST = ["runtime.executor=local", "optim.epochs=3", "optim.milestones=[2]", "tracking.system_metrics_interval=0"]


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, digits_teacher):
    root = tmp_path_factory.mktemp("deliver")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = load_config("configs/digits_kd.yaml", FAST + [
            f"output_dir={root / 'runs'}", f"teacher.checkpoint={digits_teacher}",
            "tracking.register_model=digits-student"])
        summary = train(cfg)
    data = load_dataset(cfg.data)
    return {"uri": uri, "cfg": cfg, "summary": summary, "run_dir": RunStorage.of(cfg).run_dir, "data": data, "root": root}


def top1(logits, labels) -> float:
    return 100.0 * int((torch.as_tensor(np.asarray(logits)).argmax(1) == labels).sum()) / len(labels)


def test_the_logged_model_takes_the_raw_test_split(kd_run):
    import mlflow
    from mlflow import pyfunc, pytorch

    summary, data = kd_run["summary"], kd_run["data"]
    expected = summary["headline"]["test_acc_at_best_val"]
    assert expected > 50 and data.test.images.dtype == torch.uint8  # a trained student, fed what the set holds
    mlflow.set_tracking_uri(kd_run["uri"])
    uri = f"models:/{summary['mlflow_model_id']}"
    module = pytorch.load_model(uri)
    with torch.no_grad():
        assert top1(module(data.test.images), data.test.labels) == pytest.approx(expected, abs=1e-6)
        as_floats = module(data.test.images.float() / 255)  # float in [0, 1]: the same model
        assert torch.allclose(as_floats, module(data.test.images), atol=1e-5)
    served = pyfunc.load_model(uri)
    assert top1(served.predict(data.test.images.numpy()), data.test.labels) == pytest.approx(expected, abs=1e-6)
    (spec,) = served.metadata.get_input_schema().inputs
    assert spec.type == np.dtype("uint8") and spec.shape == (-1, 1, 8, 8)
    assert served.input_example.dtype == np.uint8 and served.input_example.max() > 1  # raw pixels, not normalised


def test_load_student_takes_raw_images_and_refuses_files_without_preprocessing(kd_run, tmp_path):
    summary, data = kd_run["summary"], kd_run["data"]
    for source in (kd_run["run_dir"], summary["best_student_file"]):
        model = load_student(source)
        with torch.no_grad():
            assert top1(model(data.test.images), data.test.labels) == pytest.approx(
                summary["headline"]["test_acc_at_best_val"], abs=1e-6)
    blob = torch.load(summary["best_student_file"], weights_only=True)
    assert blob["preprocessing"]["mean"] == pytest.approx(data.mean.tolist())
    assert blob["preprocessing"]["image_size"] == [8, 8] and blob["preprocessing"]["resize"] is None
    old = tmp_path / "old.pt"
    save_model_file(old, "digits_cnn_s", 10, 1, create_model("digits_cnn_s", 10, 1).state_dict())
    with pytest.raises(CheckpointError, match="records no preprocessing"):
        load_student(old)


def test_the_card_against_the_teacher(kd_run):
    summary = kd_run["summary"]
    card = json.loads((kd_run["run_dir"] / "summary.json").read_text())["card"]
    student, teacher, ratios = card["student"], card["teacher"], card["ratios"]
    assert (student["model"], teacher["model"]) == ("digits_cnn_s", "digits_cnn_l")
    for who, arch in ((student, "digits_cnn_s"), (teacher, "digits_cnn_l")):
        assert who["params"] == sum(p.numel() for p in create_model(arch, 10, 1).parameters())
        assert who["flops_per_image"] > 2 * who["params"] > 0  # a conv reuses each weight at every position
        assert 0 < who["cpu_latency_ms_b1"]["median"] <= who["cpu_latency_ms_b1"]["p95"]
        assert who["cpu_images_per_s_b64"] > 0 and who["weights_bytes"] > 4 * who["params"]
    assert ratios["params"] == pytest.approx(teacher["params"] / student["params"]) and ratios["params"] > 1
    assert ratios["flops"] == pytest.approx(teacher["flops_per_image"] / student["flops_per_image"])
    assert ratios["flops"] > 1
    assert ratios["weights_bytes"] == pytest.approx(teacher["weights_bytes"] / student["weights_bytes"])
    assert ratios["cpu_latency_b1"] == pytest.approx(teacher["cpu_latency_ms_b1"]["median"]
                                                     / student["cpu_latency_ms_b1"]["median"])
    assert ratios["cpu_throughput_b64"] == pytest.approx(student["cpu_images_per_s_b64"]
                                                         / teacher["cpu_images_per_s_b64"])
    assert student["test_acc"] == summary["headline"]["test_acc_at_best_val"]
    assert teacher["test_acc"] == summary["roles"]["teacher"]["test_acc_at_best_val"]
    assert card["acc_gap"] == pytest.approx(student["test_acc"] - teacher["test_acc"])
    assert f"{ratios['flops']:.1f}x fewer FLOPs" in card["line"] and f"{card['acc_gap']:+.1f} top-1" in card["line"]
    assert card["cpu_threads"] == torch.get_num_threads()  # the local executor finishes in this process
    run = client(kd_run["uri"]).get_run(summary["mlflow_run_id"])
    metrics = run.data.metrics
    assert metrics["student_vs_teacher/ratio/flops"] == pytest.approx(ratios["flops"])
    assert metrics["student_vs_teacher/teacher/params"] == teacher["params"]
    assert metrics["student_vs_teacher/acc_gap"] == pytest.approx(card["acc_gap"])
    history = client(kd_run["uri"]).get_metric_history(run.info.run_id, "student_vs_teacher/ratio/flops")
    assert [m.step for m in history] == [0]  # logged once, drawn as a bar
    assert card["line"] in run.data.tags["mlflow.note.content"] and run.data.tags["ray_kd.card"] == card["line"]


def test_a_card_without_a_teacher_covers_the_student_alone():
    from ray_kd.deliverable import RawImageModel

    student = RawImageModel(create_model("digits_cnn_s", 10, 1), [0.5], [0.25], (8, 8))
    card = make_card(student, "digits_cnn_s", 91.0)
    assert card["teacher"] is None and "ratios" not in card
    assert card["line"].startswith("card: digits_cnn_s: 6.27k params") and f"batch {THROUGHPUT_BATCH}" in card["line"]


def test_the_registered_version_has_its_alias_and_tags(kd_run):
    summary = kd_run["summary"]
    mlflow = client(kd_run["uri"])
    version = mlflow.get_model_version_by_alias("digits-student", "candidate")
    assert version.run_id == summary["mlflow_run_id"]
    card = summary["card"]
    assert version.tags["ray_kd.method"] == "kd" and version.tags["ray_kd.teacher"] == "digits_cnn_l"
    assert version.tags["ray_kd.test_acc"] == f"{summary['headline']['test_acc_at_best_val']:.2f}"
    assert float(version.tags["ray_kd.card.flops_ratio"]) == pytest.approx(card["ratios"]["flops"], rel=1e-2)
    assert float(version.tags["ray_kd.card.acc_gap"]) == pytest.approx(card["acc_gap"], abs=0.01)


def test_a_bad_registry_name_or_alias_is_one_line_before_training(tmp_path, capsys):
    for override in ("tracking.register_model=a/b", "tracking.register_alias=latest"):
        assert main(["train", "-c", "configs/digits_alone.yaml", f"output_dir={tmp_path}", override]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and override.split("=")[0] in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_export_runs_on_raw_images_and_agrees(kd_run, fmt, tmp_path, capsys):
    summary, data = kd_run["summary"], kd_run["data"]
    out = tmp_path / f"student.{fmt}"
    assert main(["export", str(kd_run["run_dir"]), "--format", fmt, "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith(f"top-1 equal to PyTorch's on 100.00% of {len(data.test.labels)} test images"), line
    images = data.test.images
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == "tensor(uint8)"
        logits = session.run(None, {"images": images.numpy()})[0]
        one = session.run(None, {"images": images[:1].numpy()})[0]  # the batch axis is dynamic
    else:
        model = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
        with torch.no_grad():
            logits, one = model(images), model(images[:1])
    assert top1(logits, data.test.labels) == pytest.approx(summary["headline"]["test_acc_at_best_val"], abs=1e-6)
    assert np.allclose(np.asarray(one), np.asarray(logits[:1]), atol=1e-4)


def test_a_model_that_cannot_export_is_one_line(kd_run, tmp_path, capsys):
    from ray_kd.deliverable import shipped_meta

    cfg = kd_run["cfg"].model_copy(update={"students": [kd_run["cfg"].students[0].model_copy(
        update={"model": "tiny_factory:tiny_branching"})]})
    path = tmp_path / "best_student.pt"
    save_model_file(path, "tiny_factory:tiny_branching", 10, 1,
                    create_model("tiny_factory:tiny_branching", 10, 1).state_dict(),
                    **shipped_meta(cfg, kd_run["data"], 0))
    assert main(["export", str(path), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tiny_factory:tiny_branching cannot be exported to onnx" in err, err
    assert not (tmp_path / "best_student.onnx").exists()

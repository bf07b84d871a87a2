"""docs/shipping.md's walk, end to end, on a tiny folder of photos: a torchvision teacher fine-tuned from its
pretrained weights, KD into a pretrained timm student in stream mode, the card, the run in MLflow, the ONNX export,
and a raw image file classified through onnxruntime. The pretrained weights come from library caches laid out
here (no network); the runs use the local executor, so the caches set here reach the roles.

Also: in stream mode, each run's logged MLflow model (a torchvision student, the teacher's run; a timm student,
the KD run), through mlflow.pytorch and mlflow.pyfunc, fed the test files as raw uint8 at the run's size through
the run's evaluation transform, scores the run's test top-1."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_hub_weights import caches, lay_out_timm, lay_out_torchvision  # noqa: F401 (a fixture)
from test_streaming import make_tree

import ray_kd
from ray_kd.config import load_config
from ray_kd.data import eval_batches
from ray_kd.datasets import load_dataset
from ray_kd.export import export
from ray_kd.preflight import check_roles
from ray_kd.run import train, train_teacher
from ray_kd.tracking import client

CONFIG = "configs/folder_kd_pretrained.yaml"


def test_the_shipping_walk_from_photos_to_an_onnx_answer(caches, capsys, tmp_path, mlflow_uri):  # noqa: F811
    import mlflow
    import onnxruntime

    lay_out_torchvision("resnet18")
    lay_out_timm("mobilenetv3_small_050")
    photos = make_tree(tmp_path / "photos", sizes=(20, 48), per_class=(10, 3), classes=3)
    quick = [f"output_dir={tmp_path / 'runs'}", f"data.root={photos}", "data.image_size=32", "data.batch_size=8",
             "data.workers=0", f"data.cache_dir={tmp_path / 'cache'}", "optim.epochs=1", "optim.warmup_epochs=0",
             "optim.steps_per_epoch=2", "runtime.executor=local", "tracking.system_metrics_interval=0"]

    # 1. the teacher, fine-tuned from torchvision's pretrained weights
    teacher_file = tmp_path / "folder_resnet18_pretrained.pt"
    teacher_run = train_teacher(load_config(CONFIG, quick + [
        "name=folder-resnet18-pretrained", "method={name: ce}", "teacher=null",
        "students=[{model: 'torchvision:resnet18', pretrained: true, replace_head: true}]"]), teacher_file)
    # 2. KD into the pretrained timm student
    cfg = load_config(CONFIG, quick + [f"teacher.checkpoint={teacher_file}"])
    assert cfg.data.normalize == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # the pretrained weights'
    summary = train(cfg)
    run_dir = Path(summary["best_student_file"]).parent
    out = capsys.readouterr().out
    assert "learnt on images normalised with" not in out  # the teacher is fed as it was fine-tuned

    # 3. the card: its line on the console, its fields in summary.json
    card = summary["card"]
    assert card["teacher"]["model"] == "torchvision:resnet18" and card["student"]["model"] == "timm:mobilenetv3_small_050"
    assert card["ratios"]["params"] > 10 and "card: student " in out  # resnet18 / mobilenetv3_small_050
    # 4. MLflow: the printed link opens the run in the training view; the run finished with its model
    run = client(mlflow_uri).get_run(summary["mlflow_run_id"])
    assert f"/runs/{run.info.run_id}?workflowType=machine_learning" in out and run.info.status == "FINISHED"

    # 5. export to ONNX, and 6. a raw image file classified through onnxruntime
    onnx_file = export(run_dir, "onnx")["file"]
    transform = ray_kd.load_student(run_dir).transform()  # the run's eval resize + centre crop, to uint8
    session = onnxruntime.InferenceSession(onnx_file)
    image = transform(Image.open(photos / "test" / "class1" / "000.jpg"))
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 32, 32)
    logits = session.run(None, {session.get_inputs()[0].name: image.numpy()[None]})[0]
    with torch.no_grad():
        assert int(logits.argmax()) == int(ray_kd.load_student(run_dir)(image[None]).argmax())

    # The logged models of both runs take the test files as raw uint8 and score their run's test top-1.
    classes = sorted(p.name for p in (photos / "test").iterdir())
    files = [(f, classes.index(f.parent.name)) for f in sorted((photos / "test").glob("*/*"))]
    raw = torch.stack([transform(Image.open(f)) for f, _ in files])
    labels = torch.tensor([label for _, label in files])
    data = load_dataset(cfg.data)  # what the run scored: the test split through its loader, normalised
    normalised = torch.cat([x for x, _ in eval_batches(data.test, data)])
    mlflow.set_tracking_uri(mlflow_uri)
    for done in (teacher_run, summary):
        uri = f"models:/{done['mlflow_model_id']}"
        expected = done["headline"]["test_acc_at_best_val"]
        module = mlflow.pytorch.load_model(uri)
        with torch.no_grad():
            assert top1(module(raw), labels) == pytest.approx(expected, abs=1e-6)
            # image by image, the raw files in give the logits the run's own pipeline gives its network
            assert torch.allclose(module(raw), module.net(normalised), atol=1e-4)
        served = mlflow.pyfunc.load_model(uri)
        assert top1(served.predict(raw.numpy()), labels) == pytest.approx(expected, abs=1e-6)
        (spec,) = served.metadata.get_input_schema().inputs
        assert spec.type == np.dtype("uint8") and spec.shape == (-1, 3, 32, 32)


    # A run normalising otherwise than the teacher learnt is told so before it trains, with the setting that fits.
    check_roles(load_config(CONFIG, quick + [f"teacher.checkpoint={teacher_file}", "data.normalize=dataset"]),
                load_dataset(load_config(CONFIG, quick + ["data.normalize=dataset"]).data))
    assert ("teacher: folder_resnet18_pretrained.pt learnt on images normalised with mean [0.485, 0.456, 0.406] "
            "std [0.229, 0.224, 0.225], this run normalises with mean [") in capsys.readouterr().out


def top1(logits, labels) -> float:
    return 100.0 * int((torch.as_tensor(np.asarray(logits)).argmax(1) == labels).sum()) / len(labels)

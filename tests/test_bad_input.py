"""Bad input: one line naming the problem and the fix, exit code 2, and nothing trained or lost."""

import hashlib
import json

import pytest
import torch

from ray_kd.checkpoint import save_model_file
from ray_kd.cli import main
from ray_kd.models import create_model

DIGITS_TEACHER = "teacher={{model: digits_cnn_l, checkpoint: %s}}"


@pytest.fixture()
def files(tmp_path):
    """Checkpoint files of every bad kind, and an empty data root."""
    def teacher(name, num_classes):
        path = tmp_path / name
        save_model_file(path, "digits_cnn_l", num_classes, 1, create_model("digits_cnn_l", num_classes, 1).state_dict())
        return path

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 10)
    empty = tmp_path / "empty_root"
    empty.mkdir()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\noptim:\n  epochs: many\n")
    a_file = tmp_path / "a_file"  # a path under a regular file cannot be created, even by root
    a_file.write_text("x")
    return {"five_classes": teacher("five.pt", 5), "ten_classes": teacher("ten.pt", 10), "corrupt": corrupt,
            "empty": empty, "bad_yaml": bad_yaml, "out": tmp_path / "runs", "a_file": a_file,
            "tmp": tmp_path}


CASES = {
    "unknown method": (["method.name=nope"], "unknown method 'nope'; choose one of"),
    "unknown wrapper": (["method.name=kd+nope"], "unknown wrapper 'nope'"),
    "unknown model": (["students.0.model=resnet9000"], "unknown model 'resnet9000'"),
    "unknown dataset": (["data.dataset=mnist"], "config error at data.dataset: unknown data source 'mnist'; choose"),
    "unknown role section": (["tutor={{model: resnet8}}"], "config error at tutor: unknown key"),
    "temperature <= 0": (["method.temperature=0"], "method.temperature: Input should be greater than 0"),
    "negative weight": (["method.kd_weight=-1"], "method.kd_weight: Input should be greater than or equal to 0"),
    "yaml unknown key": (["optim.epoch=3"], "config error at optim.epoch: unknown key"),
    "wrong type": (["optim.epochs=many"], "config error at optim.epochs: Input should be a valid integer"),
    "missing data root": (["data.dataset=cifar10", "data.root=/no/such/dir"], "cifar10 not found under data.root"),
    "empty data root": (["data.dataset=imagefolder", "data.root={empty}"], "has no train/ and test/ folders"),
    "teacher class count": (["method.name=kd", DIGITS_TEACHER % "{five_classes}", "students=[{{model: digits_cnn_s}}]"],
                            "was trained for num_classes=5 but this run needs num_classes=10"),
    "corrupt checkpoint": (["method.name=kd", DIGITS_TEACHER % "{corrupt}", "students=[{{model: digits_cnn_s}}]"],
                           "is corrupt or not a ray-kd checkpoint"),
    "mismatched checkpoint": (["method.name=kd", "teacher={{model: resnet8, checkpoint: {ten_classes}}}",
                               "students=[{{model: digits_cnn_s}}]"],
                              "was trained for model='digits_cnn_l' but this run needs model='resnet8'"),
    "pair a feature method cannot map": (["method.name=mtkd_ssr", "teacher={{model: vgg8, checkpoint: {ten_classes}}}",
                                          "students=[{{model: resnet8}}]"], "vgg8"),
    "missing teacher": (["method.name=kd", "students=[{{model: digits_cnn_s}}]"], "method 'kd' needs a teacher"),
    "name ..": (["name=.."], "name '..' is not a folder of its own"),
    "name with a slash": (["name=../x"], "config error at name: String should match pattern"),
    "lr inf": (["optim.lr=.inf"], "config error at optim.lr: Input should be a finite number"),
    "seed above 2**32-1": ([f"seed={2**32}"], "config error at seed: Input should be less than or equal to 4294967295"),
    "negative seed": (["seed=-1"], "config error at seed: Input should be greater than or equal to 0"),
    "val_fraction 0.001": (["data.val_fraction=0.001"],
                           "data.val_fraction=0.001 cannot split 1437 training images so both parts hold every class"),
    "val_fraction 0.999": (["data.val_fraction=0.999"], "data.val_fraction=0.999 cannot split"),
    "train_subset below the class count": (["data.train_subset=5"], "data.train_subset=5 cannot split"),
    "unwritable output_dir": (["output_dir={a_file}/runs"], "output_dir={a_file}/runs is not a writable folder"),
    "unwritable cache_dir": (["data.dataset=imagefolder", "data.root={tmp}/folder", "data.cache_dir={a_file}/c",
                              "students=[{{model: resnet8}}, {{model: resnet8}}]"],
                             "data.cache_dir={a_file}/c is not a writable folder"),
    "dead runtime.address": (["runtime.executor=ray", "runtime.address=127.0.0.1:1"],
                             "no Ray cluster answers at runtime.address=127.0.0.1:1"),
    "runtime.address not host:port": (["runtime.executor=ray", "runtime.address=nowhere"],
                                      "runtime.address='nowhere' is not host:port"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_table(case, files, capsys):
    overrides, expected = CASES[case]
    if "data.root={tmp}/folder" in overrides:
        image_folder(files["tmp"] / "folder")
    argv = ["train", f"output_dir={files['out']}", "runtime.executor=local"] + [o.format(**files) for o in overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.format(**files) in err, err
    assert not (files["out"] / "digits-dml" / "checkpoints").exists()  # nothing started


def image_folder(root, classes=("a", "b"), per_class=4, size=8):
    """A real ImageFolder tree of PNGs: root/{train,test}/<class>/<i>.png."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_bad_yaml_file(files, capsys):
    assert main(["train", "--config", str(files["bad_yaml"])]) == 2
    assert "config error at optim.epochs: Input should be a valid integer" in capsys.readouterr().err


def test_duplicate_yaml_key(files, capsys):
    path = files["tmp"] / "dup.yaml"
    path.write_text("name: a\noptim:\n  epochs: 1\n  lr: 0.1\n  epochs: 3\n")
    assert main(["train", "--config", str(path), f"output_dir={files['out']}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 5: duplicate key 'epochs'" in err, err


def test_more_workers_than_the_cluster_holds(ray_cluster, files, capsys, mlflow_uri):
    assert main(["train", f"output_dir={files['out']}", "runtime.cpus_per_worker=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "need 8 CPUs but the cluster has 2" in err and "lower runtime.cpus_per_worker" in err


def test_mlflow_unreachable_fails_before_training(files, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert main(["train", f"output_dir={files['out']}", "runtime.executor=local"]) == 2
    err = capsys.readouterr().err.strip()
    assert "MLflow store http://127.0.0.1:9 is not reachable" in err
    assert not (files["out"] / "digits-dml").exists()


def test_nan_loss_names_role_step_and_term(files, capsys, mlflow_uri):
    out = files["out"]
    assert main(["train", f"output_dir={out}", "runtime.executor=local", "optim.epochs=2"]) == 0
    kept = sorted((out / "digits-dml" / "checkpoints").glob("epoch_*"))[-1]
    # Weights that overflow: a resume (same config, one more epoch) turns the loss to inf/nan in epoch 3.
    state = torch.load(kept / "student_0.pt", weights_only=True)
    state["net"] = {k: v * 1e30 if v.is_floating_point() else v for k, v in state["net"].items()}
    torch.save(state, kept / "student_0.pt")
    written = (kept / "student_0.pt").read_bytes()
    manifest = json.loads((kept / "manifest.json").read_text())  # sealed again: weights a run could have saved
    manifest["student_0.pt"] = [len(written), hashlib.sha256(written).hexdigest()]
    (kept / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", f"output_dir={out}", "runtime.executor=local", "optim.epochs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "loss term" in err and ("is nan at step" in err or "is inf at step" in err), err
    # Nothing past the last checkpoint was saved, and that checkpoint is as it was.
    assert [p.name for p in sorted((out / "digits-dml" / "checkpoints").glob("epoch_*"))][-1] == "epoch_0002"
    assert (kept / "student_0.pt").read_bytes() == written

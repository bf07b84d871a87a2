"""Bad input: one line naming the problem and the fix, exit code 2, and nothing trained or lost."""

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
    return {"five_classes": teacher("five.pt", 5), "ten_classes": teacher("ten.pt", 10), "corrupt": corrupt,
            "empty": empty, "bad_yaml": bad_yaml, "out": tmp_path / "runs"}


CASES = {
    "unknown method": (["method.name=nope"], "unknown method 'nope'; choose one of"),
    "unknown wrapper": (["method.name=kd+nope"], "unknown wrapper 'nope'"),
    "unknown model": (["students.0.model=resnet9000"], "unknown model 'resnet9000'"),
    "unknown dataset": (["data.dataset=mnist"], "config error at data.dataset: Input should be"),
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
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_table(case, files, capsys):
    overrides, expected = CASES[case]
    argv = ["train", f"output_dir={files['out']}", "runtime.executor=local"] + [o.format(**files) for o in overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (files["out"] / "digits-dml" / "checkpoints").exists()  # nothing started


def test_bad_yaml_file(files, capsys):
    assert main(["train", "--config", str(files["bad_yaml"])]) == 2
    assert "config error at optim.epochs: Input should be a valid integer" in capsys.readouterr().err


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
    first = torch.load(sorted((out / "digits-dml" / "checkpoints").glob("epoch_*"))[-1] / "student_0.pt",
                       weights_only=True)["net"]
    # Continue the same run with an absurd loss weight: the weights overflow in epoch 3.
    assert main(["train", f"output_dir={out}", "runtime.executor=local", "optim.epochs=3",
                 "method.kd_weight=1e38"]) == 2
    err = capsys.readouterr().err.strip()
    assert "loss term" in err and ("is nan at step" in err or "is inf at step" in err), err
    kept = sorted((out / "digits-dml" / "checkpoints").glob("epoch_*"))[-1]
    assert kept.name == "epoch_0002"  # the last good checkpoint is intact
    for name, tensor in torch.load(kept / "student_0.pt", weights_only=True)["net"].items():
        torch.testing.assert_close(tensor, first[name])

"""The README's "Your own models and data" flow as written, on the Ray executor in stream mode: a folder of photos
of assorted sizes, a torchvision teacher trained by `train-teacher`, then KD into a timm student (issue 35: the
frozen teacher's scoring between its training steps restarted the shared stream loader, and its worker died)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CIFAR_ARCHIVE

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "folder_kd_torchvision_timm.yaml")
RAY_KD = str(Path(sys.executable).with_name("ray-kd"))
SHORT = ["optim.epochs=1"]  # the README runs 5 epochs; one proves the path


def _run(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason="the shared CIFAR-10 copy is not beside this checkout")
def test_readme_own_folder_flow_on_ray_in_stream_mode(tmp_path):
    _run([sys.executable, str(REPO / "benchmarks" / "photo_folder.py"), "--out", "runs/cifar10-photos",
          "--train-per-class", "24", "--test-per-class", "8"], tmp_path)
    _run([RAY_KD, "train-teacher", "-c", CONFIG, "--out", "runs/folder_resnet18.pt", "name=folder-resnet18-teacher",
          "method={name: ce}", "teacher=null", "students=[{model: 'torchvision:resnet18'}]", *SHORT], tmp_path)
    out = _run([RAY_KD, "train", "-c", CONFIG, *SHORT], tmp_path)
    assert "died" not in out, out
    summary = json.loads((tmp_path / "runs" / "folder-kd-torchvision-timm" / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["best_student_model"] == "timm:mobilenetv3_small_050"
    assert set(summary["roles"]) == {"teacher", "student_0"}


def test_photo_folder_without_its_archive_says_so_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "photo_folder.py"), "--out", "photos",
                           "--source", str(tmp_path / "cifar10-jpeg.tar.gz")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"photo_folder.py: error: {tmp_path / 'cifar10-jpeg.tar.gz'} not found (the "
                                        "CIFAR-10 JPEG archive this script samples); pass --source with any "
                                        "ImageFolder tree or a .tar.gz of one"]
    assert not (tmp_path / "photos").exists()


def test_photo_folder_from_any_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / "src" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (100 * i, 50, 0)).save(tmp_path / "src" / split / c / f"{i}.jpg")
    _run([sys.executable, str(REPO / "benchmarks" / "photo_folder.py"), "--out", "photos", "--source", "src",
          "--train-per-class", "2", "--test-per-class", "1", "--min-px", "24", "--max-px", "48"], tmp_path)
    made = sorted(p.relative_to(tmp_path / "photos").as_posix() for p in (tmp_path / "photos").rglob("*.jpg"))
    assert made == ["test/cat/0.jpg", "test/dog/0.jpg", "train/cat/0.jpg", "train/cat/1.jpg", "train/dog/0.jpg",
                    "train/dog/1.jpg"]
    with Image.open(tmp_path / "photos" / "train" / "cat" / "1.jpg") as img:
        assert all(24 <= side <= 48 for side in img.size)

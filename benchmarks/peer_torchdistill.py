"""Against the peer: torchdistill vs ray-kd (local and Ray executors), same data, models, batch, schedule, threads.

torchdistill is never a project requirement: it runs in a virtual environment of its own, made once with
    python3 -m venv /tmp/td-venv && /tmp/td-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 torchdistill==1.1.5
Then, from the repository root:
    .venv/bin/python benchmarks/peer_torchdistill.py [--td-python /tmp/td-venv/bin/python] [--epochs 3] [--repeats 2]

The protocol: KD resnet20 -> resnet8 (ray-kd's own model classes on both sides: torchdistill gets them as
`nn.Module`s), the same trained teacher file (by default the quality protocol's pinned resnet20,
results/teachers/cifar10_15/teacher.pt, 76.5% test, trained on these 10,000 images), the same CIFAR-10 subset
(ray-kd's `load_dataset` of configs/bench_cifar10_kd.yaml with data.train_subset and data.val_fraction=0.02, the
quality protocol's split, exported once as uint8 tensors), the same train / val / test splits, normalisation
and augmentation (random crop with 4 px zero padding, horizontal flip), batch 128, SGD lr 0.05 momentum 0.9
wd 5e-4, the same loss (0.1 CE + 0.9 T^2 KL, T=4), 2 threads in all. Each epoch scores the student on val;
the end scores student and teacher on val and test (ray-kd: `eval.splits=[val]`; its frozen teacher is scored
once). torchdistill saves the student when val improves (as its example script does); ray-kd
writes its per-epoch checkpoints. Wall: from the command to its exit, start-up and evaluation included. Training
img/s: images trained / seconds in the training loops (ray-kd: from its history's `student_0/samples_per_s`).
The systems run in turn, the order rotated each repeat, the load average recorded with every run.
ray-kd runs at its defaults (`runtime.channels_last` on: NHWC convolutions); a system named `... nchw`
turns that off, to show what the layout buys. `ray-kd ray together x2` runs two data-parallel replicas of the
pair, each worker running teacher and student on half of every batch (`runtime.replicas=2
runtime.placement=together`, a core and one thread each, BatchNorm per shard); `ray-kd ray apart x2` the same
with a worker per role per replica (four workers on two cores). Where the wall goes, for each system's fastest run:
train_s (the training loops), eval_s (scoring: per epoch, and at the end; ray-kd: from its history's
`<role>/eval_s`, per epoch the slowest role on Ray, the roles' sum in one process), other_s (the rest:
start-up, checkpoints, MLflow, exit). student_test_top1: the mean over a system's runs of its student's test
top-1 at the end (the same teacher and recipe on every side: a time is only worth comparing at the same result).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = "configs/bench_cifar10_kd.yaml"
VAL_FRACTION = 0.02  # the quality protocol's split, so the pinned teacher never saw val or test
REPLICAS = {  # `ray-kd ray <layout>` systems: data-parallel replicas, a core (one thread) per worker
    "together x2": ["runtime.replicas=2", "runtime.placement=together", "runtime.cpus_per_worker=1"],
    "apart x2": ["runtime.replicas=2", "runtime.placement=apart", "runtime.cpus_per_worker=0.5"],
}


# --- the torchdistill side (runs under the other venv: torch, torchvision, torchdistill, ray_kd.models only) ---

def td_child(data_file: str, teacher_file: str, out: str, epochs: int, threads: int) -> None:
    import torch
    from torch import nn
    from torch.utils.data import Dataset, RandomSampler, SequentialSampler
    from torchvision.transforms import v2

    from torchdistill.core.distillation import get_distillation_box
    from ray_kd.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = torch.load(data_file, weights_only=True)
    mean, std = data["mean"].view(-1, 1, 1), data["std"].view(-1, 1, 1)

    class Split(Dataset):
        def __init__(self, name: str, augment: bool):
            self.images, self.labels = data[f"{name}_images"], data[f"{name}_labels"]
            self.augment = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]) if augment else None

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            x = self.images[i]
            if self.augment is not None:
                x = self.augment(x)
            return (x.float().div(255) - mean) / std, int(self.labels[i])

    class Logits(nn.Module):  # ray-kd's StagedNet returns (logits, stage features)
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[0]

    teacher_net = create_model("resnet20", 10, 3)
    teacher_net.load_state_dict(torch.load(teacher_file, weights_only=True)["state_dict"])
    teacher, student = Logits(teacher_net).eval(), Logits(create_model("resnet8", 10, 3))
    datasets = {"train": Split("train", True), "val": Split("val", False), "test": Split("test", False)}
    loader = lambda split, sampler, batch: {"dataset_id": split, "sampler": {"class_or_func": sampler, "kwargs": {}},  # noqa: E731
                                           "kwargs": {"batch_size": batch, "num_workers": 0}}
    train_config = {
        "num_epochs": epochs,
        "train_data_loader": loader("train", RandomSampler, 128),
        "val_data_loader": loader("val", SequentialSampler, 512),
        "teacher": {"sequential": [], "requires_grad": False, "frozen_modules": [], "forward_proc": "forward_batch_only"},
        "student": {"sequential": [], "requires_grad": True, "frozen_modules": [], "forward_proc": "forward_batch_only"},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
        "scheduler": {"key": "MultiStepLR", "kwargs": {"milestones": [epochs], "gamma": 0.1}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": {
            "key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                        "teacher_module_path": ".", "teacher_module_io": "output",
                                        "temperature": 4.0, "alpha": 0.1, "beta": 0.9, "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    device = torch.device("cpu")
    box = get_distillation_box(teacher, student, datasets, train_config, device, None, False, 1)

    @torch.no_grad()
    def top1(model, split):
        model.eval()
        correct = 0
        for x, y in torch.utils.data.DataLoader(datasets[split], batch_size=512):
            correct += int((model(x).argmax(1) == y).sum())
        return 100.0 * correct / len(datasets[split])

    log = {"train_seconds": [], "samples": [], "val": [], "eval_seconds": []}
    best = -1.0
    for epoch in range(epochs):
        box.pre_epoch_process(epoch=epoch)
        start, n = time.perf_counter(), 0
        for x, y, supp in box.train_data_loader:
            loss = box.forward_process(x, y, supp)
            box.post_forward_process(loss)
            n += len(y)
        log["train_seconds"].append(time.perf_counter() - start)
        log["samples"].append(n)
        start = time.perf_counter()
        val = top1(student, "val")
        if val > best:
            best = val
            torch.save(student.state_dict(), Path(out).with_suffix(".student.pt"))
        log["eval_seconds"].append(time.perf_counter() - start)
        log["val"].append(val)
        box.post_epoch_process()
    start = time.perf_counter()
    log["student_test"] = top1(student, "test")
    log["teacher_val"], log["teacher_test"] = top1(teacher, "val"), top1(teacher, "test")
    log["eval_seconds"].append(time.perf_counter() - start)
    Path(out).write_text(json.dumps(log))


# --- the driver (project venv) ---------------------------------------------------------------------------------

def export_data(overrides: list[str], path: Path) -> None:
    import torch

    from ray_kd.config import load_config
    from ray_kd.datasets import load_dataset

    data = load_dataset(load_config(CONFIG, overrides).data)
    blob = {"mean": data.mean, "std": data.std}
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        blob[f"{name}_images"], blob[f"{name}_labels"] = split.images.clone(), split.labels.clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)


def ray_kd_history(run_dir: Path) -> list[dict]:
    histories = [json.loads(p.read_text()) for p in run_dir.rglob("history.json")]
    return max(histories, key=len)


def main() -> None:
    sys.path.insert(0, str(HERE))
    from common import RUNS, absolute_paths, machine, save

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--td-python", default="/tmp/td-venv/bin/python")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--teacher", default=str(HERE / "results" / "teachers" / "cifar10_15" / "teacher.pt"),
                        help="a resnet20 teacher file for 10 classes (default: the quality protocol's pinned one)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--systems", nargs="+", default=["torchdistill", "ray-kd local", "ray-kd ray"])
    parser.add_argument("--ray-set", nargs="*", default=[], help="extra overrides for the Ray runs")
    parser.add_argument("--out", default="peer_torchdistill", help="results/<out>.md (.csv, .json)")
    args = parser.parse_args()
    info = machine()
    teacher = str(Path(args.teacher).resolve())
    overrides = [*absolute_paths(CONFIG), f"teacher.checkpoint={teacher}", f"data.train_subset={args.train_subset}",
                 f"data.val_fraction={VAL_FRACTION}",
                 f"optim.epochs={args.epochs}", f"optim.milestones=[{args.epochs}]", "eval.splits=[val]"]
    data_file = RUNS / "peer" / f"cifar10_subset{args.train_subset}_val{VAL_FRACTION}.pt"
    if not data_file.is_file():
        export_data(overrides, data_file)
    mlflow = f"sqlite:///{tempfile.mkdtemp(prefix='ray-kd-peer-mlflow-')}/mlflow.db"
    runs = []
    for repeat in range(args.repeats):
        order = args.systems[repeat % len(args.systems):] + args.systems[:repeat % len(args.systems)]
        for system in order:
            with tempfile.TemporaryDirectory(prefix="ray-kd-peer-") as tmp:
                env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow}
                if system == "torchdistill":
                    out = Path(tmp) / "td.json"
                    cmd = [args.td_python, __file__, "--td-child", str(data_file), teacher, str(out), str(args.epochs)]
                else:
                    executor = system.split()[1]
                    cmd = [sys.executable, "-m", "ray_kd.cli", "train", "-c", CONFIG, *overrides,
                           f"output_dir={tmp}", f"name=peer-{executor}-{repeat}"]
                    cmd += (["runtime.executor=local", "runtime.threads_per_worker=2"] if executor == "local"
                            else args.ray_set)
                    cmd += ["runtime.channels_last=false"] if system.endswith(" nchw") else []
                    cmd += REPLICAS.get(system.split(" ", 2)[-1], []) if executor == "ray" else []
                load = os.getloadavg()[0]
                start = time.time()
                subprocess.run(cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
                wall = time.time() - start
                if system == "torchdistill":
                    log = json.loads(out.read_text())
                    train_s, eval_s = sum(log["train_seconds"]), sum(log["eval_seconds"])
                    img_s = sum(log["samples"]) / train_s
                    student_test = log["student_test"]
                else:
                    history = ray_kd_history(Path(tmp) / f"peer-{executor}-{repeat}")
                    train_s = sum(args.train_subset / h["student_0/samples_per_s"] for h in history)
                    in_turn = executor != "ray" or "together" in system  # one process runs the roles one by one
                    roles_at_once = sum if in_turn else max
                    eval_s = sum(roles_at_once(v for k, v in h.items() if k.endswith("/eval_s")) for h in history)
                    img_s = len(history) * args.train_subset / train_s
                    student_test = history[-1]["student_0/test_acc"]
            row = {"repeat": repeat, "system": system, "wall_s": round(wall, 1), "train_img_s": round(img_s, 1),
                   "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "other_s": round(wall - train_s - eval_s, 1),
                   "student_test_top1": round(student_test, 2), "load_1min_at_start": round(load, 2)}
            runs.append(row)
            print(row, flush=True)
    summary = []
    for system in args.systems:
        mine = [r for r in runs if r["system"] == system]
        fastest = min(mine, key=lambda r: r["wall_s"])
        summary.append({"system": system, "best_wall_s": fastest["wall_s"],
                        "best_train_img_s": max(r["train_img_s"] for r in mine),
                        **{k: fastest[k] for k in ("train_s", "eval_s", "other_s")},
                        "walls": [r["wall_s"] for r in mine], "img_s": [r["train_img_s"] for r in mine],
                        "student_test_top1": round(sum(r["student_test_top1"] for r in mine) / len(mine), 2)})
    td = next((s for s in summary if s["system"] == "torchdistill"), None)
    for s in summary:
        if td:
            s["img_s_vs_torchdistill"] = round(s["best_train_img_s"] / td["best_train_img_s"], 3)
            s["wall_vs_torchdistill"] = round(s["best_wall_s"] / td["best_wall_s"], 3)
    notes = (__doc__.split("\n\n", 2)[2].strip() + f"\n\n{args.epochs} epochs of {args.train_subset} images; best of "
             f"{args.repeats} alternating runs per system (interference only slows a run). Ray overrides: "
             f"{args.ray_set or 'none (defaults)'}. Every run: {json.dumps(runs)}")
    save(args.out, "Against the peer: torchdistill vs ray-kd, KD resnet20 -> resnet8 on a CIFAR-10 subset",
         summary, ["system", "best_wall_s", "best_train_img_s", "img_s_vs_torchdistill", "wall_vs_torchdistill",
                   "train_s", "eval_s", "other_s", "student_test_top1", "walls", "img_s"], info, notes,
         {"runs": runs, "teacher": teacher})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--td-child":
        td_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), threads=2)
    else:
        main()

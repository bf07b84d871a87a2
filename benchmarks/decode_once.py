"""Decoding once per replica (`data.decode=once`, a loader actor per replica) against once per role (`per_role`), on
the Ray executor with the roles placed apart, stream mode.

cost: KD resnet20 -> resnet8 and DML with 3 resnet8 peers on a subset of the CIFAR-10 JPEG copy (the stored 32x32
  JPEGs, hard-linked), 32 px crops. Per run: decodes per trained image (`data/decodes_per_image`), and CPU-seconds
  per 1,000 trained images two ways: `data/decode_cpu_s` (the CPU time of decoding and augmenting each sample, in
  the process that did it) and the whole CPU time of the processes that decode (sampled with psutil: the loader
  actors and their DataLoader processes for `once`, the role workers' DataLoader processes for `per_role`; so the
  loader's collating, `ray.put` and hand-off count against `once`, while `per_role` roles' unpickling of their
  batches does not).
throughput: the same KD pair on "photos" made at 160-256 px a side (`--px`) and cropped to 64, 2 epochs:
  training images/s (the slower role's `samples_per_s`, each epoch) with either path.

Every configuration alternates once/per_role within one run of this script; a random-init teacher (speed does not
depend on its quality).

    .venv/bin/python benchmarks/decode_once.py cost [--train-per-class 120] [--steps N] [--repeats 1]
    .venv/bin/python benchmarks/decode_once.py throughput [--train-per-class 100] [--repeats 1] [--px 160 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import RUNS, machine, save

BATCH = 64
PEERS3 = ["method={name: dml}", "students=[{model: resnet8}, {model: resnet8}, {model: resnet8}]"]


def decoding_cpu() -> dict[int, float]:
    """CPU-seconds so far of each process that decodes: the loader actors (ray::BatchLoader) with their children,
    and the role workers' (ray::RoleWorker) children, their DataLoader processes."""
    import psutil

    seen = {}
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        try:
            if title.startswith("ray::BatchLoader"):
                tree = [proc, *proc.children(recursive=True)]
            elif title.startswith("ray::RoleWorker"):
                tree = proc.children(recursive=True)
            else:
                continue
            for p in tree:
                times = p.cpu_times()
                seen[p.pid] = times.user + times.system
        except psutil.Error:  # exited meanwhile
            continue
    return seen


def kd(teacher: str) -> list[str]:
    return ["method={name: kd}", f"teacher={{model: resnet20, checkpoint: {teacher}}}", "students=[{model: resnet8}]"]


def run(tree: Path, cache: Path, out: Path, name: str, decode: str, image_size: int, epochs: int,
        steps: int | None, extra: list[str]) -> tuple[list[dict], float]:
    """(history, process CPU-seconds of decoding in epoch 2) of one Ray run: measured between the moments epoch 1's
    and epoch 2's records land (processes started, nothing scored in between with eval.every > 2)."""
    from ray_kd.config import load_config
    from ray_kd.ray_executor import RayExecutor
    from ray_kd.run_storage import RunStorage

    overrides = ["data.dataset=imagefolder", f"data.root={tree}", "data.mode=stream", f"data.image_size={image_size}",
                 f"data.batch_size={BATCH}", "data.workers=1", f"data.decode={decode}", f"data.cache_dir={cache}",
                 f"optim.epochs={epochs}", "optim.milestones=[]", "runtime.cpus_per_worker=0.5", f"eval.every={epochs}",
                 f"output_dir={out}", f"name={name}-{decode}-{time.time_ns()}", *extra]
    if steps:
        overrides.append(f"optim.steps_per_epoch={steps}")
    snapshots = {}
    cfg = load_config(None, overrides)
    last = RayExecutor(cfg).execute(RunStorage.of(cfg), None, show_progress=False,
                                    on_epoch=lambda record: snapshots.setdefault(int(record["epoch"]), decoding_cpu()))
    history = json.loads((last / "history.json").read_text())
    if 2 not in snapshots:
        return history, float("nan")
    return history, sum(cpu - snapshots[1].get(pid, 0.0) for pid, cpu in snapshots[2].items())


def cost(args, source: Path, teacher: str) -> None:
    from photo_folder import linked_subset

    tree = linked_subset(args.cache / f"cifar-{args.train_per_class}", args.train_per_class, 10, source)
    rows, info = [], machine()
    for case, extra in (("kd resnet20->resnet8", kd(teacher)), ("dml 3 x resnet8", PEERS3)):
        for repeat in range(args.repeats):
            for decode in ("per_role", "once"):
                history, proc_cpu = run(tree, args.cache, RUNS / "decode_once", "cost", decode, 32, 3, args.steps,
                                        extra)
                epoch = history[1]  # steady state: processes started, nothing scored
                trained = epoch["data/images_trained"]
                rows.append({"case": case, "decode": decode, "repeat": repeat, "images_trained": int(trained),
                             "decodes_per_image": round(epoch["data/decodes_per_image"], 3),
                             "decode_cpu_s_per_1000": round(1000 * epoch["data/decode_cpu_s"] / trained, 3),
                             "process_cpu_s_per_1000": round(1000 * proc_cpu / trained, 3),
                             "input_wait_ms": round(max(v for k, v in epoch.items() if k.endswith("/input_wait_ms")), 1),
                             "img_s": round(min(v for k, v in epoch.items() if k.endswith("/samples_per_s")), 1)})
                print(rows[-1], flush=True)
    ratios = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        for key in ("decode_cpu_s_per_1000", "process_cpu_s_per_1000"):
            mean = {d: statistics.mean(r[key] for r in rows if r["case"] == case and r["decode"] == d)
                    for d in ("once", "per_role")}
            ratios[f"{case}: {key} once/per_role"] = round(mean["once"] / mean["per_role"], 3)
    notes = ("Figures of epoch 2 of 3 (processes started; eval.every=3: nothing scored before the last epoch), batch "
             f"{BATCH}, 32 px crops, data.workers=1, runtime.cpus_per_worker=0.5. decodes_per_image: images decoded "
             "(all processes) / images trained. decode_cpu_s_per_1000: CPU time of each sample's decode + augmentation "
             "(`data/decode_cpu_s`, thread time in the process that did it) per 1,000 trained images. "
             "process_cpu_s_per_1000: all CPU time of the decoding processes over epoch 2 (psutil, between the "
             "moments epoch 1's and 2's records landed): the loader actor and its DataLoader process (once: its "
             "collating, ray.put and hand-off included) or the roles' DataLoader processes (per_role: the roles' "
             "unpickling of their batches not included). input_wait_ms: the longest per-step wait of any role for "
             "its batch. img_s: the slower role's training images/s. "
             f"Ratios once/per_role (means over repeats): {json.dumps(ratios)}. Targets: decodes per image 1.0; "
             "CPU per 1,000 images <= 0.55x (KD), <= 0.4x (3-peer DML).")
    save("decode_cost", "Decode cost per trained image: once per replica vs once per role (Ray, roles apart)",
         rows, ["case", "decode", "repeat", "images_trained", "decodes_per_image", "decode_cpu_s_per_1000",
                "process_cpu_s_per_1000", "input_wait_ms", "img_s"], info, notes, {"ratios": ratios})


def throughput(args, source: Path, teacher: str) -> None:
    from photo_folder import make_photo_folder

    low, high = args.px
    tree = make_photo_folder(args.cache / f"photos-{low}-{high}-{args.train_per_class}", args.train_per_class, 10,
                             low, high, source=source)
    rows, info = [], machine()
    for repeat in range(args.repeats):
        for decode in ("per_role", "once"):
            started = time.perf_counter()
            history, _ = run(tree, args.cache, RUNS / "decode_once", "throughput", decode, 64, 2, None, kd(teacher))
            wall = time.perf_counter() - started
            speeds = [min(v for k, v in h.items() if k.endswith("/samples_per_s")) for h in history]
            rows.append({"decode": decode, "repeat": repeat, "images_per_epoch": int(history[0]["data/images_trained"]),
                         "img_s_epoch1": round(speeds[0], 1), "img_s_epoch2": round(speeds[1], 1),
                         "decodes_per_image": round(history[-1]["data/decodes_per_image"], 3),
                         "decode_cpu_ms_per_image": round(history[-1]["data/decode_cpu_ms_per_image"], 2),
                         "input_wait_ms": round(max(v for k, v in history[-1].items()
                                                    if k.endswith("/input_wait_ms")), 1),
                         "teacher_compute_ms": round(history[-1]["teacher/compute_ms"], 1),
                         "student_compute_ms": round(history[-1]["student_0/compute_ms"], 1),
                         "wall_s": round(wall, 1)})
            print(rows[-1], flush=True)
    mean = {d: statistics.mean((r["img_s_epoch1"] + r["img_s_epoch2"]) / 2 for r in rows if r["decode"] == d)
            for d in ("once", "per_role")}
    ratio = round(mean["once"] / mean["per_role"], 3)
    notes = (f"KD resnet20 -> resnet8, photos of {low}-{high} px a side (JPEG, quality 90) cropped to 64 px, batch {BATCH}, "
             "data.workers=1, 2 epochs, Ray with the roles apart (runtime.cpus_per_worker=0.5). img_s: the slower "
             "role's training images/s per epoch (scoring excluded). Training img/s once / per_role (mean of both "
             f"epochs over repeats): {ratio}x (target >= 1.5x). Where a step's time goes (epoch 2): each role's "
             "compute_ms (forward + update per step, in its own process) against decode_cpu_ms_per_image x batch.")
    save("decode_throughput" if args.px == [160, 256] else f"decode_throughput_{low}_{high}px", "KD training throughput on photos cropped to 64 px: decoding once per replica vs once per role (Ray, roles apart)",
         rows, ["decode", "repeat", "images_per_epoch", "img_s_epoch1", "img_s_epoch2", "decodes_per_image",
                "decode_cpu_ms_per_image", "input_wait_ms", "teacher_compute_ms", "student_compute_ms", "wall_s"], info,
         notes, {"ratio": ratio})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["cost", "throughput"])
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="cost: at most this many steps per run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--px", type=int, nargs=2, default=[160, 256], help="throughput: the photos' side, min max")
    parser.add_argument("--cache", type=Path, default=RUNS / "decode_once_data")
    args = parser.parse_args()
    args.cache = args.cache.resolve()
    args.train_per_class = args.train_per_class or (120 if args.part == "cost" else 100)

    from common import random_teacher
    from photo_folder import ARCHIVE, linked_subset

    from ray_kd.config import DataConfig
    from ray_kd.data import imagefolder_root

    source = imagefolder_root(DataConfig(dataset="imagefolder", root=str(ARCHIVE), cache_dir=str(args.cache)))
    tree = linked_subset(args.cache / "teacher-shape", 2, 1, source)  # a teacher file needs the class count
    teacher = random_teacher(None, ["data.dataset=imagefolder", f"data.root={tree}", f"data.cache_dir={args.cache}",
                                    "data.val_fraction=0.5"], "resnet20")
    (cost if args.part == "cost" else throughput)(args, source, teacher)


if __name__ == "__main__":
    main()

"""A KD sweep shares its teacher (issue 33): the same 8-trial sweep with `teacher.cache` and without, in CPU-seconds.

Both sweeps run the same 8 trials, a grid of temperature x ce_weight x kd_weight (2 values each), on the 15-epoch
CIFAR-10 protocol's data (quality.PROTOCOL['cifar10_15']: 10,000 training images, 1,000 for validation, the
10,000 test images, batch 128) for --epochs epochs: KD resnet20 -> resnet8 with the committed cifar10_15
teacher, on Ray (a worker per role, a core each, so one trial at a time on 2 cores), no early stopping.
With the cache (float32, so every trial computes exactly what it computes without it) the sweep first computes the
teacher's outputs for every step and its val/test scores once (`ray-kd tune` fills teacher.cache on one worker
before the trials), and every trial reads them.

Measured per sweep: the machine's CPU-seconds (/proc/stat: the busy time of every core, so nothing else may run
meanwhile), its wall time, and each trial's best validation top-1 (the two sweeps must agree trial by trial); and,
from the trials' own records, where the seconds went: each role's training compute (compute_ms x steps) and scoring
(eval_s), the rest being worker start-up, the driver, Tune and MLflow.

    .venv/bin/python benchmarks/teacher_sweep.py [--epochs 2] [--report]  (--report: rewrite the table from the
                                                                           last measurement, measuring nothing)

Results: results/teacher_sweep.* for 2 epochs a trial, results/teacher_sweep_<N>ep.* for N.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

from common import RESULTS, RUNS, machine, save
from quality import PROTOCOL, teacher_path

GRID = {"method.temperature": [2.0, 4.0], "method.ce_weight": [0.1, 0.5], "method.kd_weight": [0.5, 0.9]}


def busy_cpu_seconds() -> float:
    """Seconds every core of the machine spent busy since boot (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def result_name(epochs: int) -> str:
    """The results' name, and the run folders' under runs/: one per trial length."""
    return "teacher_sweep" if epochs == 2 else f"teacher_sweep_{epochs}ep"


def seconds_by_role(arm: str, epochs: int) -> dict[str, float]:
    """Summed over the sweep's trials and epochs, from each trial's last checkpoint: every role's training compute
    and scoring seconds (e.g. 'teacher compute', 'student_0 eval')."""
    subset, batch = (int(o.split("=")[1]) for o in PROTOCOL["cifar10_15"] if o.split("=")[0] in
                     ("data.train_subset", "data.batch_size"))
    steps = math.ceil(subset / batch)
    totals: dict[str, float] = {}
    for trial in sorted((RUNS / result_name(epochs) / f"teacher-sweep-{arm}-sweep" / "trials").iterdir()):
        last = sorted((trial / "checkpoints").glob("epoch_*"))[-1]
        for epoch in json.loads((last / "history.json").read_text()):
            for key, value in epoch.items():
                role, _, what = key.partition("/")
                if what == "compute_ms":
                    totals[f"{role} compute"] = totals.get(f"{role} compute", 0.0) + value * steps / 1000
                elif what == "eval_s":
                    totals[f"{role} eval"] = totals.get(f"{role} eval", 0.0) + value
    return totals


def run_sweep(arm: str, epochs: int, cache: Path | None) -> dict:
    from ray_kd.config import load_config
    from tuning.space import load_space
    from tuning.sweep import sweep

    overrides = [*PROTOCOL["cifar10_15"], f"optim.epochs={epochs}", f"teacher.checkpoint={teacher_path('cifar10_15', 'teacher')}",
                 f"name=teacher-sweep-{arm}", f"output_dir={RUNS / result_name(epochs)}"]
    if cache is not None:
        overrides += [f"teacher.cache={cache}", "teacher.cache_dtype=float32"]
    cfg = load_config("configs/bench_cifar10_kd.yaml", overrides)
    space = load_space({"searcher": "grid", "scheduler": {"type": "none"}, "max_concurrent_trials": 1,
                        "params": {k: {"type": "grid", "values": v} for k, v in GRID.items()}})
    print(f"== {arm}", flush=True)
    cpu, start = busy_cpu_seconds(), time.perf_counter()
    best = sweep(cfg, space, restart=True)
    cpu, wall = busy_cpu_seconds() - cpu, time.perf_counter() - start
    with open(RUNS / result_name(epochs) / f"teacher-sweep-{arm}-sweep" / "results.csv") as f:
        trials = {tuple(float(r[k]) for k in GRID): float(r["best_val_acc"]) for r in csv.DictReader(f)}
    return {"arm": arm, "cpu_s": cpu, "wall_s": wall, "trials": len(trials),
            "best": {k: best[k] for k in GRID}, "best_val_acc": float(best["best_val_acc"]), "per_trial": trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="rewrite the table from the last measurement")
    args = parser.parse_args()
    name = result_name(args.epochs)
    if args.report:
        last = json.loads((RESULTS / f"{name}.json").read_text())
        info, measured, measured_by = last["machine"], last["measured"], last["command"]
    else:
        os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:////tmp/ray-kd-bench/mlflow.db")
        Path("/tmp/ray-kd-bench").mkdir(exist_ok=True)
        info, measured_by = machine(), None
        cache = RUNS / name / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        measured = {"epochs": args.epochs, "sweeps": [run_sweep("without_cache", args.epochs, None),
                                                      run_sweep("with_cache", args.epochs, cache)]}
        for r in measured["sweeps"]:
            r["per_trial"] = [[list(k), v] for k, v in r["per_trial"].items()]
    report(name, info, measured, measured_by)


def report(name: str, info: dict, measured: dict, measured_by: str | None) -> None:
    plain, cached = measured["sweeps"]
    rows = []
    for r in (plain, cached):
        rows.append({"sweep": r["arm"], "trials": r["trials"], "cpu_seconds": r["cpu_s"], "wall_s": r["wall_s"],
                     "cpu_ratio": r["cpu_s"] / plain["cpu_s"], "wall_ratio": r["wall_s"] / plain["wall_s"],
                     **{f"{k} s": v for k, v in sorted(seconds_by_role(r["arm"], measured["epochs"]).items())},
                     "best_trial": " ".join(f"{k.split('.')[-1]}={v:g}" for k, v in r["best"].items()),
                     "best_val_acc": r["best_val_acc"]})
    same = plain["per_trial"] == cached["per_trial"]
    ratio = cached["cpu_s"] / plain["cpu_s"]
    roles = [k for k in rows[0] if k.endswith(" s") and k != "wall_s"]
    rest = [r["cpu_seconds"] - sum(r.get(k, 0.0) for k in roles) for r in rows]
    saved = rows[0]["cpu_seconds"] - rows[1]["cpu_seconds"]
    student_rise = sum(rows[1].get(k, 0.0) - rows[0].get(k, 0.0) for k in roles if k.startswith("student"))
    teacher_saved = sum(rows[0].get(k, 0.0) - rows[1].get(k, 0.0) for k in roles if k.startswith("teacher"))
    notes = (f"The same {len(plain['per_trial'])} trials ({' x '.join(f'{k} {v}' for k, v in GRID.items())}), "
             f"{measured['epochs']} epochs each, on the 15-epoch CIFAR-10 protocol's data "
             f"({' '.join(PROTOCOL['cifar10_15'][:3])}); KD resnet20 -> resnet8 (configs/bench_cifar10_kd.yaml) with "
             "the committed cifar10_15 teacher, on Ray, one trial at a time. cpu_seconds: the busy time of both cores "
             "over the sweep (/proc/stat), Ray's start and every trial's set-up included. With the cache "
             "(teacher.cache_dtype=float32) the sweep first fills it, the teacher's outputs for every step and its "
             "scores computed once on one worker, and all 8 trials read them. The `<role> compute s` / `<role> eval s` columns sum the trials' own records "
             "(compute_ms x steps, eval_s): the rest of the CPU-seconds (worker start-up and data, the driver, Tune, "
             f"MLflow, the exchange; with the cache, the fill too) was {rest[0]:.0f} s without the cache and "
             f"{rest[1]:.0f} s with it. "
             f"Every trial's best validation top-1 {'is identical in both sweeps' if same else 'differs between the sweeps'}"
             f"{'' if same else ': ' + str(plain['per_trial']) + ' vs ' + str(cached['per_trial'])}. "
             f"Target: <= 0.65x the CPU-seconds -> {'met' if ratio <= 0.65 else f'missed by {ratio - 0.65:.3f}'} "
             f"({ratio:.3f}x). The cache saved {saved:.0f} CPU-seconds: the trials' teacher records fell by "
             f"{teacher_saved:.0f} s, the students' moved by {student_rise:+.0f} s and the rest by "
             f"{rest[1] - rest[0]:+.0f} s (the fill's one pass of the teacher among it). Even with the teacher "
             f"free the ratio would be {(plain['cpu_s'] - teacher_saved) / plain['cpu_s']:.3f}: "
             "what every trial still pays is the student's training and scoring (the resnet8 student's forward and "
             "backward cost more than the resnet20 teacher's forward on a CPU) and the fixed cost of a trial (worker "
             "start-up, data, Tune, MLflow), so the ratio approaches the ideal only as trials get longer and more "
             "numerous and the teacher heavier.")
    save(name, f"A KD sweep with and without teacher.cache: CPU-seconds for the same 8 trials of "
         f"{measured['epochs']} epochs", rows,
         ["sweep", "trials", "cpu_seconds", "wall_s", "cpu_ratio", "wall_ratio", *roles, "best_trial", "best_val_acc"],
         info, notes, {"measured": measured}, measured_by)


if __name__ == "__main__":
    main()

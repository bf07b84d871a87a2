"""Every method's digits and CIFAR-10 config with two replicas of every role, placed together and apart (issue 31).

Each run is the config the quality benchmark runs (quality.run_args: the digits protocol, and the 15-epoch
CIFAR-10 protocol with its committed teachers) on the Ray executor with runtime.replicas=2, runtime.sync_bn=true
and runtime.placement together or apart, cut to --epochs epochs of --steps steps (a run that trains, exchanges,
reduces, scores and checkpoints end to end; not a quality figure, nor a timing). Records whether it finished and
the best student's val top-1.

    .venv/bin/python benchmarks/replicas_methods.py [--epochs 1] [--steps 4] [--datasets digits cifar10_15]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import RUNS, machine, save
from quality import CONFIGS, METHODS, run_args, teacher, teacher_kind

PLACEMENTS = ("together", "apart")


def row_name(method: str, placement: str) -> str:
    return f"{method.replace('+', '_')}-{placement}"


def run_one(dataset: str, method: str, placement: str, epochs: int, steps: int) -> dict:
    from ray_kd import api
    from ray_kd.errors import UserError

    runtime = ["runtime.executor=ray", "runtime.replicas=2", f"runtime.placement={placement}", "runtime.sync_bn=true",
               "runtime.cpus_per_worker=0.25"]
    config, overrides = run_args(dataset, method, 0, runtime=runtime, name=row_name(method, placement),
                                 output_dir=RUNS / "replicas_methods" / dataset)
    if any(o.startswith("teacher.checkpoint=") for o in overrides):
        teacher(dataset, teacher_kind(dataset, method))
    overrides += [f"optim.epochs={epochs}", f"optim.steps_per_epoch={steps}", "optim.milestones=[]"]
    row = {"dataset": dataset, "method": method, "placement": placement}
    try:
        summary = api.train(config, overrides, restart=True)
    except (UserError, RuntimeError) as err:
        return {**row, "status": f"failed: {str(err).splitlines()[0][:200]}"}
    headline = summary.get("headline") or {}
    return {**row, "status": "ok", "best_val_acc": headline.get("val_acc_at_best")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--datasets", nargs="+", default=["digits", "cifar10_15"], choices=list(CONFIGS))
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:////tmp/ray-kd-bench/mlflow.db")
    Path("/tmp/ray-kd-bench").mkdir(exist_ok=True)
    info = machine()
    rows = [run_one(dataset, method, placement, args.epochs, args.steps)
            for dataset in args.datasets for method in METHODS if method in CONFIGS[dataset]
            for placement in PLACEMENTS]
    failed = [r for r in rows if r["status"] != "ok"]
    pairs = {}
    for r in rows:
        pairs.setdefault((r["dataset"], r["method"]), []).append(r.get("best_val_acc"))
    differ = [f"{d} {m}" for (d, m), accs in pairs.items() if len(set(accs)) > 1]
    notes = (f"{len(rows)} runs: every method's config on {', '.join(args.datasets)}, runtime.replicas=2 "
             f"runtime.sync_bn=true, placed together and apart, {args.epochs} epoch(s) of {args.steps} steps, on a "
             f"local Ray cluster; {len(rows) - len(failed)} finished" + (f", {len(failed)} failed. " if failed else ". ")
             + ("Together and apart reach the same best val top-1 for every config (BatchNorm synchronised). "
                if not differ else f"Together and apart differ in best val top-1 for: {', '.join(differ)}. ")
             + "So few steps leave the students near chance: the figures show that the runs train and agree, "
               "not how well they distil.")
    save("replicas_methods", "Every method with two replicas of every role, placed together and apart", rows,
         ["dataset", "method", "placement", "status", "best_val_acc"], info, notes)


if __name__ == "__main__":
    main()

"""Hyper-parameters for the quality benchmark, chosen on validation only: one Tune sweep per method.

Each sweep is what `ray-kd tune` runs (tuning.sweep.sweep): the method's quality config with the quality
protocol (quality.PROTOCOL), seed 0, its shipped space tuning/spaces/<method>.yaml (Optuna TPE + ASHA),
searched on the best student's validation top-1. Test top-1 is recorded beside it, never used.
Writes results/sweeps_<dataset>.md (every trial) and results/tuned_<dataset>.json (each method's best
values), which quality.py then runs on every seed as `<method>@tuned`. Re-running resumes an unfinished
sweep and re-reads a finished one.

    MLFLOW_TRACKING_URI=sqlite:////tmp/ray-kd-bench/mlflow.db .venv/bin/python benchmarks/sweeps.py \
        --dataset cifar10|cifar10_15 [--methods kd lwkd ...]  (default: the dataset's TUNED list)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

from common import RESULTS, RUNS, machine, save
from quality import CONFIGS, EXACT, METHODS, PROTOCOL, run_args, teacher, teacher_kind

# What each dataset sweeps by default: on cifar10 the seed methods that missed their targets at their defaults;
# on cifar10_15 (issue 17) KD first (the reference every method is paired against), then the methods that lose
# to the student alone at their defaults, then (issue 34) the seed methods, each with the same budget as KD.
TUNED = {"digits": ["kd+skd", "mtkd_ssr", "lwkd"], "cifar10": ["kd+skd", "mtkd_ssr", "lwkd"],
         "cifar10_15": ["kd", "lwkd", "tfkd", "dml", "kd+skd", "sokd", "mtkd_ssr", "sokd+skd"]}
# The sweep's trials run on Ray (one worker per role, a core each: two threads per worker would oversubscribe
# 2 cores), computing as the protocol's runs do
SWEEP_RUNTIME = EXACT


def space_file(method: str) -> str:
    return f"tuning/spaces/{method.replace('+', '_')}.yaml"


def sweep_name(dataset: str, method: str) -> str:
    return f"{method.replace('+', '_')}-{dataset}"


def sweep_method(dataset: str, method: str) -> dict:
    """The best values of one method's sweep (run, resumed or re-read)."""
    from ray_kd.config import load_config
    from tuning.space import load_space
    from tuning.sweep import sweep

    space = load_space(space_file(method))
    config, overrides = run_args(dataset, method, 0, runtime=SWEEP_RUNTIME, name=sweep_name(dataset, method),
                                 output_dir=RUNS / "tune")
    if any(o.startswith("teacher.checkpoint=") for o in overrides):
        teacher(dataset, teacher_kind(dataset, method))
    cfg = load_config(config, overrides)
    print(f"== sweep: {dataset} {method} over {space_file(method)}", flush=True)
    best = sweep(cfg, space)
    return {k: best[k] for k in space.params}


def committed_trials(dataset: str) -> dict[str, list[dict]]:
    """The committed table's trials (results/sweeps_<dataset>.json) by method: sweeps run on other machines,
    whose run folders this one does not have."""
    path = RESULTS / f"sweeps_{dataset}.json"
    committed: dict[str, list[dict]] = {}
    for row in json.loads(path.read_text())["rows"] if path.is_file() else []:
        committed.setdefault(row["method"], []).append(row)
    return committed


def trials(dataset: str, method: str, committed: dict[str, list[dict]]) -> list[dict]:
    """Every trial of the method's finished sweep, best validation first: this machine's, else the committed
    table's; [] if it has run nowhere."""
    table = RUNS / "tune" / f"{sweep_name(dataset, method)}-sweep" / "results.csv"
    if not table.is_file():
        return committed.get(method, [])
    with table.open() as f:
        rows = [{"method": method, **r} for r in csv.DictReader(f)]
    return sorted(rows, key=lambda r: -float(r["best_val_acc"] or 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(CONFIGS), default="cifar10")
    parser.add_argument("--methods", nargs="+", choices=[m for m in METHODS if Path(space_file(m)).is_file()],
                        help="default: the dataset's TUNED list")
    args = parser.parse_args()
    methods = args.methods or TUNED[args.dataset]
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:////tmp/ray-kd-bench/mlflow.db")
    Path("/tmp/ray-kd-bench").mkdir(exist_ok=True)
    info = machine()
    tuned_file = RESULTS / f"tuned_{args.dataset}.json"
    tuned = json.loads(tuned_file.read_text()) if tuned_file.is_file() else {}
    committed = committed_trials(args.dataset)
    for method in methods:
        tuned[method] = sweep_method(args.dataset, method)
        tuned_file.write_text(json.dumps(tuned, indent=2) + "\n")  # each sweep's choice kept as it lands
    derived_kd = "kd+skd" in tuned and not trials(args.dataset, "kd", committed)
    if derived_kd:  # the ablation: KD with kd+skd's chosen temperature and weights, no simplifier
        tuned["kd"] = {k: v for k, v in tuned["kd+skd"].items() if not k.startswith("method.simplifier")}
    tuned_file.write_text(json.dumps(tuned, indent=2) + "\n")
    swept = [m for m in METHODS if trials(args.dataset, m, committed)]
    rows = [row for method in swept for row in trials(args.dataset, method, committed)]
    params = sorted({k for r in rows for k in r} - {"method", "trial_id", "status", "epochs", "best_val_acc",
                                                     "test_acc_at_best_val"})
    for r in rows:  # floats for the table's formatting
        r.update({k: float(v) for k, v in r.items() if k in params or k.endswith("_acc") if v not in ("", None)})
    notes = ("One sweep per method, seed 0, the quality protocol (" + " ".join(PROTOCOL[args.dataset]) + "); "
             "spaces: " + ", ".join(f"{m}: {space_file(m)}" for m in swept) + ". Rows sorted by best "
             "validation top-1 within each method; the first row of each method is the one chosen (written to "
             f"{tuned_file.name} and run on every seed by quality.py as `<method>@tuned`). "
             + ("`kd@tuned` is not swept: it is KD with kd+skd's chosen temperature and KD weight, the simplifier "
                "removed, which tells what share of kd+skd@tuned's gain the simplifier brings. " if derived_kd else "")
             + "test_acc_at_best_val is only recorded: nothing is chosen on it. A blank cell: that parameter is not "
             "in the method's space.")
    save(f"sweeps_{args.dataset}", f"Validation sweeps behind the tuned rows of quality_{args.dataset}", rows,
         ["method", "trial_id", *params, "status", "epochs", "best_val_acc", "test_acc_at_best_val"], info, notes,
         {"tuned": tuned})


if __name__ == "__main__":
    main()

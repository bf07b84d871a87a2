"""Where a distillation run's wall time goes, phase by phase, from the command to the summary.

Each measured run is a fresh Python process doing exactly what `ray-kd train` does (`ray_kd.run.train`:
preflight, MLflow run, executor, summary), with timers wrapped around the project's own functions:
the driver's phases, and inside every role (a Ray worker, or the single process) its training epochs,
its evaluation, the wait for the other roles' metrics and its checkpoint save. `--trees` runs the
same protocol on other checkouts (e.g. main before a change), alternating, so the ratios are side by side.

    .venv/bin/python benchmarks/time_to_result.py [--runs ray local] [--trees .:after /work/main:before
        '.:after-val-only:eval.splits=[val]']
        [--epochs 3] [--train-subset 10000] [--set eval.splits=[val] ...]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, absolute_paths, machine, random_teacher, save

CONFIG = "configs/bench_cifar10_kd.yaml"


def _timed(owner, attr: str, log: list, label):
    """Replace owner.attr with a wrapper appending (label(args), start, end) to `log`."""
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            log.append((label(*args), start, time.time()))

    setattr(owner, attr, wrapper)


def instrument(log: list) -> None:
    """Timers on the role-side functions both executors share (present in every checkout measured)."""
    from ray_kd import exchange, roles, session

    _timed(session.Session, "train_epoch", log, lambda self, epoch: "train")
    _timed(roles.RoleRunner, "evaluate", log, lambda self, *a: f"evaluate {self.role.name}")
    _timed(exchange.CollectiveExchange, "gather_objects", log, lambda *a: "wait: metrics of the other roles")
    _timed(session, "load_dataset", log, lambda *a: "dataset load")
    _timed(session.Session, "__init__", log, lambda *a: "models + optimisers (incl. dataset load)")


def timed_worker(out: str):
    """ray_executor.train_worker with the role-side timers; each rank writes its log when done. It takes the
    rank as the role group passes it, or (a checkout from the Ray Train days) asks Ray Train for it."""

    def run(config: dict, rank: int | None = None) -> None:
        import json
        import time

        entered = time.time()
        from ray_kd import checkpoint, ray_executor

        log: list = []
        instrument(log)
        store_save(checkpoint, ray_executor, log=log)
        args = (config,) if rank is None else (config, rank)
        if rank is None:
            import ray.train

            rank = ray.train.get_context().get_world_rank()
        try:
            ray_executor.train_worker(*args)
        finally:
            with open(f"{out}/rank{rank}.json", "w") as f:
                json.dump({"entered": entered, "log": log}, f)

    return run


def store_save(*modules, log: list) -> None:
    """Time the checkpoint store's save, whichever class a checkout has (CheckpointStore, or the older ones)."""
    for module in modules:
        for name in ("CheckpointStore", "FolderStore", "RayTrainStore", "DirectoryStore"):
            if hasattr(module, name):
                _timed(getattr(module, name), "save", log, lambda *a: "checkpoint save")


def child(executor: str, out: Path, overrides: list[str]) -> None:
    """One measured `ray-kd train`, in this fresh process."""
    import psutil

    t = {"process_created": psutil.Process().create_time()}
    from ray_kd import checkpoint, local_executor, ray_executor, run
    from ray_kd.config import load_config

    t["imports"] = time.time()
    log: list = []
    _timed(run, "preflight", log, lambda *a: "preflight")
    _timed(run, "finish", log, lambda *a: "summary, plot, best student, MLflow model")
    if executor == "local":
        instrument(log)
        store_save(*(m for m in (checkpoint, local_executor, sys.modules.get("ray_kd.run_storage")) if m), log=log)
    else:
        workers = out.parent / "workers"
        workers.mkdir()
        _timed(ray_executor, "connect", log, lambda *a: "ray.init")
        worker = timed_worker(str(workers))
        if hasattr(ray_executor, "make_trainer") and \
                "worker_loop" in inspect.signature(ray_executor.make_trainer).parameters:
            make_trainer = ray_executor.make_trainer
            ray_executor.make_trainer = lambda *a, **k: make_trainer(*a, **k, worker_loop=worker)
        else:  # the role group (it calls the module's train_worker), or a checkout before make_trainer took a loop
            ray_executor.train_worker = worker
    cfg = load_config(CONFIG, overrides)
    summary = run.train(cfg)
    t["end"] = time.time()
    ranks = [json.loads(p.read_text()) for p in sorted((out.parent / "workers").glob("rank*.json"))] \
        if executor == "ray" else []
    out.write_text(json.dumps({"driver": t, "log": log, "ranks": ranks, "epochs": summary["epochs"]}))


def phases(m: dict, roles: list[str]) -> dict[str, float]:
    """Seconds per phase: driver phases, then the role-side phases (Ray: the slowest rank's, since
    every rank waits for it), then the rest (MLflow run, worker group start, shutdown...)."""
    d = m["driver"]
    total = d["end"] - d["process_created"]
    p = {"python + imports": d["imports"] - d["process_created"]}
    for label, start, end in m["log"]:
        p[label] = p.get(label, 0.0) + end - start
    accounted = sum(v for k, v in p.items() if k != "dataset load")  # dataset load is inside models + optimisers
    if m["ranks"]:
        first_entered = min(r["entered"] for r in m["ranks"])
        p["worker group start (placement group, workers, gloo; Ray Train: + controller)"] = first_entered - min(
            end for label, _, end in m["log"] if label == "ray.init")
        per_rank = []
        for r in m["ranks"]:
            q: dict[str, float] = {}
            for label, start, end in r["log"]:
                q[label] = q.get(label, 0.0) + end - start
            per_rank.append(q)
        for label in dict.fromkeys(k for q in per_rank for k in q):
            if label.startswith("evaluate "):
                p[label] = sum(q.get(label, 0.0) for q in per_rank)  # only its own rank evaluates it
            else:
                p[label] = max(q.get(label, 0.0) for q in per_rank)
        # the ranks run side by side: the slowest rank's role-side total is on the critical path
        accounted += p["worker group start (placement group, workers, gloo; Ray Train: + controller)"] + max(
            sum(v for k, v in q.items() if k != "dataset load") for q in per_rank)
    p["other (MLflow run, shutdown; Ray Train: its controller)"] = total - accounted
    p["total wall"] = total
    return p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["ray", "local"], choices=["ray", "local"])
    parser.add_argument("--trees", nargs="+", default=[f"{REPO}:this"], metavar="PATH:LABEL[:OVERRIDES]",
                        help="checkouts to measure alternately (PYTHONPATH of the child), each with its own "
                             "space-separated overrides, e.g. '.:val-only:eval.splits=[val]'")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (after the protocol's)")
    parser.add_argument("--name", default="time_to_result")
    parser.add_argument("--child", nargs=2, metavar=("EXECUTOR", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), args.overrides)
    info = machine()
    teacher = random_teacher(CONFIG, absolute_paths(CONFIG), "resnet20")
    mlflow_dir = tempfile.mkdtemp(prefix="ray-kd-ttr-mlflow-")
    results, walls = {}, {}
    for repeat in range(args.repeats):
        for executor in args.runs:
            for tree in args.trees:
                path, label, *own = tree.split(":", 2)
                overrides = [*absolute_paths(CONFIG), f"teacher.checkpoint={teacher}",
                             f"data.train_subset={args.train_subset}", f"optim.epochs={args.epochs}",
                             f"optim.milestones=[{args.epochs}]"]
                overrides += (["runtime.executor=local", "runtime.threads_per_worker=2"] if executor == "local"
                              else ["runtime.cpus_per_worker=1"])
                overrides += args.set + (own[0].split() if own else [])
                column = f"{label} {executor}"
                with tempfile.TemporaryDirectory(prefix="ray-kd-ttr-") as tmp:
                    out = Path(tmp) / "timings.json"
                    env = {**os.environ, "PYTHONPATH": path,
                           "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_dir}/mlflow.db"}
                    load = os.getloadavg()[0]
                    subprocess.run([sys.executable, sys.argv[0], "--child", executor, str(out), "--overrides",
                                    *overrides, f"output_dir={tmp}/runs", f"name={label}-{executor}-{repeat}"],
                                   env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
                    m = json.loads(out.read_text())
                p = phases(m, [])
                p["load average (1 min) at start"] = load
                results.setdefault(column, []).append(p)
                walls.setdefault(column, []).append(p["total wall"])
                print(column, {k: round(v, 2) for k, v in p.items()}, flush=True)
                report(args, info, results, walls)  # after every run: an interrupted sweep keeps what it measured


def report(args, info: dict, results: dict, walls: dict) -> None:
    # per column: the run with the shortest wall (interference only ever slows a run down)
    best = {c: min(ps, key=lambda p: p["total wall"]) for c, ps in results.items()}
    names = list(dict.fromkeys(k for p in best.values() for k in p))
    for last in ("other (MLflow run, shutdown; Ray Train: its controller)", "total wall", "load average (1 min) at start"):
        names.append(names.pop(names.index(last)))
    rows = [{"phase": n, **{c: round(p[n], 2) if n in p else "" for c, p in best.items()}} for n in names]
    notes = (f"Seconds per phase of one `ray-kd train` of {CONFIG} (KD resnet20 -> resnet8, random teacher), "
             f"data.train_subset={args.train_subset}, {args.epochs} epochs, batch 128; extra overrides: "
             f"{args.set or 'none'}. Ray: one worker per role, 1 CPU and runtime.threads_per_worker threads each; "
             "role-side phases are the slowest rank's (every rank waits for it), except `evaluate <role>`, which "
             "only its own rank runs (the ranks run side by side, so the role-side rows of a Ray column add up to "
             "more than its wall; `other` counts the slowest rank's role-side total once). Local: every role in one process with 2 threads. `dataset load` is part of "
             "`models + optimisers`. The column with the shortest wall of "
             f"{args.repeats} alternating run(s) each; all walls: {json.dumps({c: [round(w, 1) for w in v] for c, v in walls.items()})}.")
    save(args.name, "Time to result: where a run's wall time goes", rows, ["phase", *best], info, notes,
         {"all_runs": results})


if __name__ == "__main__":
    main()

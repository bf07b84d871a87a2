"""Seconds from the command to the first training step, phase by phase, on both executors.

Each measurement is a fresh Python process that does what `ray-kd train` does (imports, preflight and
MLflow checks while ray.init starts or joins the cluster, MLflow run, the project's role group), with the
worker function timed at each stage (dataset load, Session = models + optimisers, first step = forward +
all_gather + update). Ray runs twice: starting its own local cluster, and joining one already running
(`ray start --head` beforehand: a warm machine).

    .venv/bin/python benchmarks/startup.py [--cases digits-dml cifar-kd cifar-kd-cold] [--repeats 1]

With --repeats N each column is measured N times, the columns alternating, and the run with the shortest
total is the one shown (interference from other work only slows a start); every total is listed in the notes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from common import RUNS, absolute_paths, machine, random_teacher, save

CASES = {  # name -> (config, overrides, random teacher model)
    "digits-dml": ("configs/digits_dml.yaml", [], None),
    "cifar-kd": ("configs/bench_cifar10_kd.yaml", [], "resnet20"),
    # the first run on a machine: the archive unpacked and 60,000 JPEGs decoded into the cache
    "cifar-kd-cold": ("configs/bench_cifar10_kd.yaml", ["data.cache_dir={tmp}/cache"], "resnet20"),
}


def timed_worker(out: str):
    """ray_executor.train_worker's set-up, with a timestamp after each stage and one step instead of fit()."""

    def run(config: dict, rank: int) -> None:
        import time

        entered = time.time()
        import json

        import psutil
        import ray
        import torch

        from ray_kd.config import RunConfig
        from ray_kd.data import from_arrays
        from ray_kd.datasets import load_dataset
        from ray_kd.exchange import CollectiveExchange
        from ray_kd.ray_executor import worker_device
        from ray_kd.roles import all_roles
        from ray_kd.session import Session

        cfg = RunConfig.model_validate(config["run"])
        torch.set_num_threads(cfg.runtime.threads_per_worker)
        t = {"process_created": psutil.Process().create_time(), "entered": entered, "imports": time.time()}
        shared = config.get("dataset")  # as train_worker: the driver's dataset from the object store
        data = from_arrays(ray.get(shared[0])) if shared else load_dataset(cfg.data)
        t["dataset"] = time.time()
        session = Session(cfg, [rank], CollectiveExchange([r.name for r in all_roles(cfg)], rank),
                          worker_device(config), dataset=data)
        t["models"] = time.time()
        session.train_epoch(0)  # steps_per_epoch=1: exactly the first step
        t["first_step"] = time.time()
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(t, f)

    return run


def child(case: str, executor: str, out: Path, teacher_file: str) -> None:
    """One measured start, in this fresh process (the parent made the random teacher file beforehand)."""
    import psutil

    t = {"process_created": psutil.Process().create_time()}
    import torch

    from ray_kd import tracking
    from ray_kd.config import load_config
    from ray_kd.exchange import LocalExchange
    from ray_kd.ray_executor import run_roles
    from ray_kd.run import checked_and_connected
    from ray_kd.run_storage import RunStorage
    from ray_kd.roles import all_roles
    from ray_kd.session import Session

    t["imports"] = time.time()
    config, overrides = case_overrides(case, out.parent)
    overrides += [f"name={case}-{executor}", "optim.steps_per_epoch=1", "optim.epochs=1"]
    if teacher_file:
        overrides.append(f"teacher.checkpoint={teacher_file}")
    n = len(all_roles(load_config(config, overrides)))
    overrides += (["runtime.executor=local", f"runtime.threads_per_worker={n}"] if executor == "local"
                  else ["runtime.threads_per_worker=1", f"runtime.cpus_per_worker={2 / n}"])
    cfg = load_config(config, overrides)
    t["config"] = time.time()
    uri = tracking.tracking_uri(cfg)
    data, started = checked_and_connected(cfg, uri)  # as ray_kd.run.train does: the workers start meanwhile
    t["checks"] = time.time()
    run = RunStorage.of(cfg)
    tracking.start_or_resume(cfg, run, uri)
    t["mlflow"] = time.time()
    if executor == "local":
        torch.set_num_threads(n)  # the executor takes the dataset the checks loaded (as LocalExecutor does)
        t["dataset"] = time.time()
        session = Session(cfg, list(range(n)), LocalExchange(), torch.device("cpu"), dataset=data)
        t["models"] = time.time()
        session.train_epoch(0)
        t["first_step"] = time.time()
        ranks = []
    else:
        workers = out.parent / "workers"
        workers.mkdir()
        run_roles(cfg, run, timed_worker(str(workers)), dataset=data, group=started.group)
        ranks = [json.loads(p.read_text()) for p in sorted(workers.glob("rank*.json"))]
        import ray

        ray.shutdown()
    out.write_text(json.dumps({"driver": t, "ranks": ranks}))


def case_overrides(case: str, tmp: Path) -> tuple[str, list[str]]:
    config, overrides, _ = CASES[case]
    return config, [*absolute_paths(config), *(o.format(tmp=tmp) for o in overrides), f"output_dir={tmp}"]


def phases(m: dict) -> dict[str, float]:
    """Seconds per phase along the critical path (the last rank to reach each stage)."""
    d, ranks = m["driver"], m["ranks"]
    p = {"python + imports": d["imports"] - d["process_created"],
         "config": d["config"] - d["imports"],
         "checks (data, teacher, MLflow store; Ray: while ray.init starts the cluster)": d["checks"] - d["config"],
         "MLflow run": d["mlflow"] - d["checks"]}
    if not ranks:
        p.update({"models + optimisers": d["models"] - d["mlflow"],
                  "first step": d["first_step"] - d["models"]})
        end = d["first_step"]
    else:
        last = lambda key: max(r[key] for r in ranks)  # noqa: E731
        p.update({"worker group start (placement group, workers, gloo)": last("entered") - d["mlflow"],
                  "worker imports": last("imports") - last("entered"),
                  "dataset (each worker: mapped from the object store)": last("dataset") - last("imports"),
                  "models + optimisers": last("models") - last("dataset"),
                  "first step (incl. waiting for the slowest role)": last("first_step") - last("models")})
        end = last("first_step")
    p["total: command to first step"] = end - d["process_created"]
    return p


@contextmanager
def running_cluster(tmp: Path):
    """A one-node cluster started beforehand (`ray start --head`, loopback only, as the README's walkthrough
    does): the "warm machine" a run joins through RAY_ADDRESS. Yields its address; stopped afterwards."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp_dir = tempfile.mkdtemp(prefix="rkstart", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--temp-dir={temp_dir}",
                    f"--num-cpus={os.cpu_count()}", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        time.sleep(5)  # let its own start-up settle: a warm machine
        yield f"127.0.0.1:{port}"
    finally:
        import psutil

        for proc in psutil.process_iter(["cmdline"]):
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=1, help="runs per column; the fastest is shown")
    parser.add_argument("--child", nargs=4, metavar=("CASE", "EXECUTOR", "OUT", "TEACHER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], Path(args.child[2]), args.child[3])
    info = machine()
    RUNS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tempfile.mkdtemp(prefix='ray-kd-startup-mlflow-')}/mlflow.db"}
    # each case's teacher file, made once from the warm cache: "cold" stays cold
    teachers = {case: random_teacher(config, absolute_paths(config), model) if model else ""
                for case, (config, _, model) in CASES.items() if case in args.cases}
    results, totals_seen = {}, {}
    for repeat, case, column in itertools.product(range(args.repeats), args.cases, ("ray", "ray joining", "local")):
        executor = column.split()[0]
        with tempfile.TemporaryDirectory(prefix="ray-kd-startup-") as tmp, \
                running_cluster(Path(tmp)) if column == "ray joining" else nullcontext(None) as address:
            out = Path(tmp) / "timings.json"
            subprocess.run([sys.executable, sys.argv[0], "--child", case, executor, str(out), teachers[case]],
                           env={**env, **({"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"} if address else {})}, check=True)
            measured = phases(json.loads(out.read_text()))
            name, total = f"{case} {column}", measured["total: command to first step"]
            totals_seen.setdefault(name, []).append(round(total, 2))
            if name not in results or total < results[name]["total: command to first step"]:
                results[name] = measured
            print(case, column, repeat, {k: round(v, 2) for k, v in measured.items()}, flush=True)
    names = list(dict.fromkeys(k for p in results.values() for k in p))
    names.append(names.pop(names.index("total: command to first step")))
    rows = [{"phase": name, **{col: round(p[name], 2) if name in p else "" for col, p in results.items()}}
            for name in names]
    totals = {col: p["total: command to first step"] for col, p in results.items()}
    dominant = {col: max((k for k in p if not k.startswith("total")), key=p.get) for col, p in results.items()}
    notes = ("Seconds; each column one fresh process. Ray columns: the last rank to reach each stage. "
             "Dominant phase: " + "; ".join(f"{c}: {dominant[c]} ({results[c][dominant[c]]:.1f} of {totals[c]:.1f} s)"
                                           for c in results) + ".")
    if args.repeats > 1:
        notes += (f" Fastest of {args.repeats} runs per column (alternating); every total: "
                  + "; ".join(f"{c}: {v}" for c, v in totals_seen.items()) + ".")
    save("startup", "Start-up: seconds from the command to the first step", rows, ["phase", *results], info, notes,
         {"phases": results})


if __name__ == "__main__":
    main()

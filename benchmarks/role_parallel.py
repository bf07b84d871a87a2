"""Role-parallel speed-up: K roles on K cores (Ray, one worker per role, each pinned to its own core) vs
all K roles in one process pinned to one core; measured against the ideal, sum of role compute / slowest role.

"One device per role" modelled on CPU by CPU affinity (os.sched_setaffinity) and one thread per role.
This machine has 2 cores, so K=2: KD (resnet20 teacher -> resnet8) and DML (2 x resnet8) on the CIFAR-10
JPEG copy, batch 128. SOKD needs 3 roles and so 3 cores: not measurable here.

    .venv/bin/python benchmarks/role_parallel.py [--steps 20] [--repeats 2]
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

from common import absolute_paths, machine, random_teacher, save

CASES = {  # name -> (config, overrides)
    "kd": ("configs/bench_cifar10_kd.yaml", []),  # the frozen teacher posts its outputs ahead (teacher.ahead=2)
    "kd_lockstep": ("configs/bench_cifar10_kd.yaml", ["teacher.ahead=0"]),  # as before teacher.ahead existed
    "dml": ("configs/bench_cifar10_dml.yaml", []),
}


def measure(session, steps: int) -> dict:
    """Seconds per step over the `steps` steps of epoch 1, after epoch 0 as the warm-up (the session is built with
    optim.steps_per_epoch=steps: its input plans the epoch's steps then, so the cap cannot change afterwards)."""
    assert session.steps_per_epoch == steps, (session.steps_per_epoch, steps)
    session.train_epoch(0)
    start = time.perf_counter()
    metrics = session.train_epoch(1)
    per_step = (time.perf_counter() - start) / steps
    compute = {k.split("/")[0]: v for k, v in metrics.items() if k.endswith("/compute_ms")}
    return {"step_s": per_step, "compute_ms": compute}


def pinned_worker(out: str, steps: int):
    def run(config: dict, rank: int) -> None:
        import json
        import os

        import torch

        from ray_kd.config import RunConfig
        from ray_kd.exchange import CollectiveExchange
        from ray_kd.roles import all_roles
        from ray_kd.session import Session

        os.sched_setaffinity(0, {rank % os.cpu_count()})  # this role's own core
        torch.set_num_threads(1)
        cfg = RunConfig.model_validate(config["run"])
        session = Session(cfg, [rank], CollectiveExchange([r.name for r in all_roles(cfg)], rank), torch.device("cpu"))
        result = measure(session, steps)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(result, f)

    return run


def child(case: str, mode: str, out: Path, teacher: str, steps: int) -> None:
    import torch

    from ray_kd.config import load_config
    from ray_kd.exchange import LocalExchange
    from ray_kd.roles import all_roles
    from ray_kd.session import Session

    config, overrides = CASES[case]
    overrides = [*absolute_paths(config), *overrides, f"output_dir={out.parent}", "runtime.threads_per_worker=1",
                 "runtime.cpus_per_worker=1", f"optim.steps_per_epoch={steps}",
                 *([f"teacher.checkpoint={teacher}"] if teacher else [])]
    cfg = load_config(config, overrides)
    n = len(all_roles(cfg))
    if mode == "one-core":
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
        result = measure(Session(cfg, list(range(n)), LocalExchange(), torch.device("cpu")), steps)
    else:
        from ray_kd.ray_executor import connect, run_roles
        from ray_kd.run_storage import RunStorage

        connect(cfg)
        workers = out.parent / "workers"
        workers.mkdir()
        run_roles(cfg, RunStorage.of(cfg), pinned_worker(str(workers), steps))
        ranks = [json.loads(p.read_text()) for p in sorted(workers.glob("rank*.json"))]
        result = {"step_s": max(r["step_s"] for r in ranks),
                  "compute_ms": {k: v for r in ranks for k, v in r["compute_ms"].items()}}
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, mode, out, teacher = args.child
        return child(case, mode, Path(out), teacher, args.steps)
    info = machine()
    rows = []
    for case in args.cases:
        config, _ = CASES[case]
        teacher = random_teacher(config, absolute_paths(config), "resnet20") if case.startswith("kd") else ""
        runs: dict[str, list] = {"one-core": [], "k-cores": []}
        loads = []
        for _ in range(args.repeats):
            for mode in runs:  # alternating
                with tempfile.TemporaryDirectory(prefix="ray-kd-rolepar-") as tmp:
                    out = Path(tmp) / "result.json"
                    loads.append(round(os.getloadavg()[0], 2))
                    subprocess.run([sys.executable, sys.argv[0], "--child", case, mode, str(out), teacher,
                                    "--steps", str(args.steps)], check=True,
                                   stdout=subprocess.DEVNULL)
                    runs[mode].append(json.loads(out.read_text()))
                print(case, mode, runs[mode][-1], flush=True)
        one = min(runs["one-core"], key=lambda r: r["step_s"])
        k = min(runs["k-cores"], key=lambda r: r["step_s"])
        compute = one["compute_ms"]  # each role's compute, measured alone on the one core
        ideal = sum(compute.values()) / max(compute.values())
        measured = one["step_s"] / k["step_s"]
        rows.append({"case": case, "roles": len(compute), "one_core_step_ms": round(1000 * one["step_s"], 1),
                     "k_cores_step_ms": round(1000 * k["step_s"], 1),
                     "role_compute_ms (one core)": " / ".join(f"{r} {v:.0f}" for r, v in sorted(compute.items())),
                     "ideal": round(ideal, 3), "measured": round(measured, 3),
                     "of_ideal": round(measured / ideal, 3), "load_1min": loads})
    notes = ("Step time: the fastest of the alternating runs per mode, each the mean of the --steps steps of an "
             "epoch after a warm-up epoch of as many (Ray: the slowest rank). ideal = sum of role compute / slowest "
             "role, role compute measured in the one-core run (forward + update, no exchange). of_ideal = measured / ideal "
             "(target >= 0.9; KD with its frozen teacher ahead: >= 0.95). kd: the teacher posts its "
             "outputs teacher.ahead=2 steps ahead (the default), so the student finds them waiting; kd_lockstep: "
             "teacher.ahead=0, the student waits for the teacher's forward at every step. SOKD (3 roles) "
             "needs 3 cores; this machine has 2. Other agents' processes share these cores (load_1min per run), "
             "so a pinned role never has its core to itself.")
    save("role_parallel", "Role-parallel speed-up: K roles on K pinned cores vs all on one core", rows,
         ["case", "roles", "one_core_step_ms", "k_cores_step_ms", "role_compute_ms (one core)", "ideal", "measured",
          "of_ideal", "load_1min"], info, notes)


if __name__ == "__main__":
    main()

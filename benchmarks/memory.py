"""Peak resident memory per worker for the CIFAR-size pairs, sampled inside each worker with psutil.

Each Ray worker runs the project's own train_worker under a sampling thread (every 20 ms); the
single-process executor is sampled the same way in its (fresh) process for comparison.

    .venv/bin/python benchmarks/memory.py [--cases cifar-kd cifar-dml] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import absolute_paths, machine, random_teacher, save

CASES = {  # name -> (config, random teacher model)
    "cifar-kd": ("configs/bench_cifar10_kd.yaml", "resnet20"),
    "cifar-dml": ("configs/bench_cifar10_dml.yaml", None),
}


class PeakRSS:
    """A daemon thread sampling this process's RSS; `baseline` is the RSS when it started."""

    def __init__(self, every: float = 0.02):
        import threading

        import psutil

        self.proc, self.every = psutil.Process(), every
        self.baseline = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return {"baseline_mb": self.baseline / 2**20, "peak_mb": self.peak / 2**20,
                "end_uss_mb": self.proc.memory_full_info().uss / 2**20}


def sampled_worker(out: str):
    """The project's train_worker, sampled; each rank writes its figures to `out`/rank<r>.json."""

    def run(config: dict, rank: int) -> None:
        import json

        from ray_kd.config import RunConfig
        from ray_kd.ray_executor import train_worker
        from ray_kd.roles import all_roles

        sampler = PeakRSS()
        train_worker(config, rank)
        role = all_roles(RunConfig.model_validate(config["run"]))[rank]
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"role": f"{role.name} ({role.model})", **sampler.finish()}, f)

    return run


def overrides_for(case: str, executor: str, tmp: Path, steps: int) -> tuple[str, list[str]]:
    config, teacher = CASES[case]
    overrides = [*absolute_paths(config), f"output_dir={tmp}", f"name={case}-{executor}", "optim.epochs=1", f"optim.steps_per_epoch={steps}"]
    if teacher:
        overrides.append(f"teacher.checkpoint={random_teacher(config, overrides, teacher)}")
    return config, overrides


def measure_ray(case: str, tmp: Path, steps: int, shared: bool) -> list[dict]:
    """Each rank's figures; `shared`: the driver's dataset through the object store (what `ray-kd train`
    does), else every worker loads its own."""
    from ray_kd.config import load_config
    from ray_kd.datasets import load_dataset
    from ray_kd.ray_executor import connect, run_roles
    from ray_kd.roles import all_roles
    from ray_kd.run_storage import RunStorage

    config, overrides = overrides_for(case, "ray", tmp, steps)
    n = len(all_roles(load_config(config, overrides)))
    cfg = load_config(config, overrides + ["runtime.threads_per_worker=1", f"runtime.cpus_per_worker={2 / n}"])
    connect(cfg)
    out = tmp / f"{case}-ranks-{shared}"
    out.mkdir()
    run_roles(cfg, RunStorage.of(cfg), sampled_worker(str(out)), dataset=load_dataset(cfg.data) if shared else None)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def child(case: str, executor: str, steps: int, out: Path) -> None:
    """One measurement in this fresh process (a Ray worker's heap is not reused across measurements):
    `local` samples the single-process executor here; `shared` / `own` run the Ray workers."""
    from ray_kd.config import load_config
    from ray_kd.local_executor import LocalExecutor
    from ray_kd.roles import all_roles
    from ray_kd.run_storage import RunStorage

    if executor != "local":
        import ray

        out.write_text(json.dumps(measure_ray(case, out.parent, steps, shared=executor == "shared")))
        ray.shutdown()
        return
    sampler = PeakRSS()
    config, overrides = overrides_for(case, "local", out.parent, steps)
    cfg = load_config(config, overrides)
    n = len(all_roles(cfg))
    local = load_config(config, overrides + ["runtime.executor=local", f"runtime.threads_per_worker={n}"])
    LocalExecutor(local).execute(RunStorage.of(local), None, show_progress=False)
    roles = " + ".join(f"{r.name} ({r.model})" for r in all_roles(cfg))
    out.write_text(json.dumps([{"role": f"all: {roles}", **sampler.finish()}]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20, help="training steps (one epoch, then a full evaluation)")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "EXECUTOR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.steps, Path(args.child[2]))
    info = machine()
    rows = []
    labels = {"shared": "ray, dataset shared (object store)", "own": "ray, dataset loaded by each worker",
              "local": "local (one process)"}
    with tempfile.TemporaryDirectory(prefix="ray-kd-memory-") as tmp:
        for case in args.cases:
            for executor, label in labels.items():
                out = Path(tmp) / f"{case}-{executor}.json"
                subprocess.run([sys.executable, sys.argv[0], "--steps", str(args.steps), "--child", case, executor,
                                str(out)], check=True)
                for r in json.loads(out.read_text()):
                    rows.append({"case": case, "executor": label, **r, "added_mb": r["peak_mb"] - r["baseline_mb"]})
            print([r for r in rows if r["case"] == case], flush=True)
    for case in args.cases:
        for label in (labels["shared"], labels["own"]):
            ray_rows = [r for r in rows if r["case"] == case and r["executor"] == label]
            rows.append({"case": case, "executor": label, "role": "sum of its workers",
                         **{k: sum(r[k] for r in ray_rows) for k in ("baseline_mb", "peak_mb", "added_mb", "end_uss_mb")}})
    notes = ("MiB. peak_mb: the highest RSS sampled every 20 ms while the role trained one epoch of "
             f"{args.steps} steps (batch 128) and evaluated on val (5,000) and test (10,000); baseline_mb: the RSS "
             "before the run started in that process (Python, torch, Ray worker); added_mb = peak - baseline; end_uss_mb: "
             "the memory only that process holds at the end (USS: pages shared with others, such as the object store's "
             "one copy of a shared dataset, left out). "
             "Each process's load_dataset reads the whole decoded CIFAR-10 copy (60,000 x 3 x 32 x 32 uint8 = 176 MiB) "
             "and keeps only the splits it uses (here 5,000 train + 5,000 val + 10,000 test images = 59 MiB); what it frees "
             "mostly stays in the process's heap. A shared dataset is loaded once by the driver and put in Ray's object "
             "store, where every worker of the node maps it (`ray-kd train` does this for an in-memory dataset).")
    save("memory", "Peak resident memory per worker, CIFAR-size pairs", rows,
         ["case", "executor", "role", "baseline_mb", "peak_mb", "added_mb", "end_uss_mb"], info, notes)


if __name__ == "__main__":
    main()

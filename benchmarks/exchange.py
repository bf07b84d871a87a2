"""Per-step latency of exchanging B x C float32 logits among N workers: the collective against the naive path.

(a) collective: the project's CollectiveExchange.all_gather inside the project's own role worker
    group (ray_executor.run_roles: one worker per role, gloo), timed on every rank;
    a step's latency is the slowest rank's call.
(b) naive: Ray's object store through the driver; each of N actors returns its tensor, the driver
    ray.get()s all of them, ray.put()s the list once and every actor ray.get()s it back; timed at the driver.

    .venv/bin/python benchmarks/exchange.py [--steps 300] [--workers 2 3 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from common import RESULTS, machine, save
from ray_kd.config import load_config
from ray_kd.ray_executor import connect, run_roles
from ray_kd.run_storage import RunStorage

SHAPES = [(128, 10), (128, 100), (256, 1000)]


def collective_worker(shapes, steps: int, warmup: int, out: str):
    """What each role worker runs: `steps` timed all_gathers of each shape through CollectiveExchange."""

    def run(config: dict, rank: int) -> None:
        import torch
        import torch.distributed as dist

        from ray_kd.config import RunConfig
        from ray_kd.exchange import CollectiveExchange
        from ray_kd.roles import all_roles

        torch.set_num_threads(1)
        names = [r.name for r in all_roles(RunConfig.model_validate(config["run"]))]
        times = {}
        for b, c in shapes:
            exchange = CollectiveExchange(names, rank)  # it caches one layout per batch size: a fresh one per shape
            mine = {names[rank]: {"logits": torch.randn(b, c)}}
            seconds = []
            for _ in range(warmup + steps):
                start = time.perf_counter()
                everyone = exchange.all_gather(mine)
                seconds.append(time.perf_counter() - start)
            assert torch.equal(everyone[names[rank]]["logits"], mine[names[rank]]["logits"])
            times[f"{b}x{c}"] = seconds[warmup:]
            flat, raw = mine[names[rank]]["logits"].reshape(-1), []  # the bare collective, for reference
            for _ in range(warmup + steps):
                start = time.perf_counter()
                dist.all_gather([torch.empty_like(flat) for _ in names], flat)
                raw.append(time.perf_counter() - start)
            times[f"raw {b}x{c}"] = raw[warmup:]
        per_rank = exchange.gather_objects(times)
        if rank == 0:
            Path(out).write_text(json.dumps(per_rank))

    return run


def collective(n: int, steps: int, warmup: int, tmp: Path) -> dict[str, list[float]]:
    students = ", ".join(["{model: digits_cnn_s}"] * n)
    cfg = load_config(None, [f"students=[{students}]", "method.name=dml",
                             f"output_dir={tmp}", f"name=exchange-{n}"])
    out = tmp / f"collective-{n}.json"
    run_roles(cfg, RunStorage.of(cfg), collective_worker(SHAPES, steps, warmup, str(out)))
    per_rank = json.loads(out.read_text())
    return {key: [max(r[key][i] for r in per_rank) for i in range(steps)] for key in per_rank[0]}


@ray.remote
class Peer:
    def __init__(self, b: int, c: int):
        torch.set_num_threads(1)
        self.logits = torch.randn(b, c)

    def publish(self) -> torch.Tensor:
        return self.logits

    def receive(self, everyone: list[torch.Tensor]) -> int:
        return sum(t.shape[0] for t in everyone)


def naive(n: int, steps: int, warmup: int) -> dict[str, list[float]]:
    times = {}
    for b, c in SHAPES:
        peers = [Peer.options(num_cpus=2 / n / 2).remote(b, c) for _ in range(n)]
        seconds = []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            everyone = ray.get([p.publish.remote() for p in peers])
            back = ray.put(everyone)
            ray.get([p.receive.remote(back) for p in peers])
            seconds.append(time.perf_counter() - start)
        times[f"{b}x{c}"] = seconds[warmup:]
        for p in peers:
            ray.kill(p)
    return times


def _plain_rank(rank: int, n: int, port: int, steps: int, warmup: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    times = {}
    for b, c in SHAPES:
        flat, seconds = torch.randn(b * c), []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            dist.all_gather([torch.empty_like(flat) for _ in range(n)], flat)
            seconds.append(time.perf_counter() - start)
        times[f"{b}x{c}"] = seconds[warmup:]
    queue.put(times)
    dist.barrier()
    dist.destroy_process_group()


def plain_processes(n: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """The bare gloo all_gather among n plain processes, no Ray: what the transport costs on these cores."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_plain_rank, args=(r, n, port, steps, warmup, queue)) for r in range(n)]
    for p in procs:
        p.start()
    per_rank = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return {key: [max(r[key][i] for r in per_rank) for i in range(steps)] for key in per_rank[0]}


def quantile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q * 100) - 1]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['shape']}\nN={r['workers']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["collective_median_ms"] for r in rows], 0.4, label="collective (gloo all_gather)")
    ax.bar([i + 0.2 for i in x], [r["naive_median_ms"] for r in rows], 0.4, label="naive (object store via driver)")
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("median ms per step (log)")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 3, 4])
    args = parser.parse_args()
    info = machine()
    connect(load_config(None, []))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ray-kd-exchange-") as tmp:
        for n in args.workers:
            coll = collective(n, args.steps, args.warmup, Path(tmp))
            slow = naive(n, args.steps, args.warmup)
            plain = plain_processes(n, args.steps, args.warmup)
            for b, c in SHAPES:
                key = f"{b}x{c}"
                row = {"shape": key, "workers": n,
                       "collective_median_ms": 1000 * statistics.median(coll[key]),
                       "collective_p90_ms": 1000 * quantile(coll[key], 0.9),
                       "bare_all_gather_median_ms": 1000 * statistics.median(coll[f"raw {key}"]),
                       "gloo_without_ray_median_ms": 1000 * statistics.median(plain[key]),
                       "naive_median_ms": 1000 * statistics.median(slow[key]),
                       "naive_p90_ms": 1000 * quantile(slow[key], 0.9)}
                row["naive/collective"] = row["naive_median_ms"] / row["collective_median_ms"]
                rows.append(row)
                print(row, flush=True)
    ray.shutdown()
    rows.sort(key=lambda r: (SHAPES.index(tuple(map(int, r["shape"].split("x")))), r["workers"]))
    plot(rows, RESULTS / "exchange.png")
    key = next((r for r in rows if r["shape"] == "128x100" and r["workers"] == 3), rows[0])
    notes = (f"Per step: median and 90th percentile over {args.steps} steps after {args.warmup} warm-up steps; "
             "collective = the slowest rank's CollectiveExchange.all_gather call; naive = the driver's round trip. "
             f"bare_all_gather = dist.all_gather of the same tensor in the same workers, without the project's "
             "flatten/pad/unflatten; gloo_without_ray = that bare all_gather among plain processes (no Ray). "
             f"Targets ({key['shape']}, {key['workers']} workers): collective < 1 ms -> {key['collective_median_ms']:.3f} ms "
             f"({'met' if key['collective_median_ms'] < 1 else 'MISSED'}); naive/collective >= 10 -> "
             f"{key['naive/collective']:.1f}x ({'met' if key['naive/collective'] >= 10 else 'MISSED'}). "
             "Plot: exchange.png.")
    save("exchange", "Exchange latency per step: collective vs object store through the driver", rows,
         ["shape", "workers", "collective_median_ms", "collective_p90_ms", "naive_median_ms", "naive_p90_ms",
          "naive/collective", "bare_all_gather_median_ms", "gloo_without_ray_median_ms"], info, notes, {"steps": args.steps, "warmup": args.warmup})


if __name__ == "__main__":
    main()

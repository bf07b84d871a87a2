"""Streaming ImageFolder (data.mode=stream): memory per worker as the set grows, throughput against in-memory.

Builds ImageFolders from the shared CIFAR-10 JPEG copy into a cache folder: `mixed-<N>` (N training
images, each resized to its own random size of 20-64 px a side) and `uniform-<N>` (the same images at
their stored 32x32, linked). Every measurement runs in a fresh process: one role (resnet8, `ce`) trained
by the single-process executor for a fixed number of steps and then evaluated, while a thread samples the
RSS (and PSS) of the process and of its DataLoader processes every 50 ms; or, for the data path alone,
the same batches drawn without a model. Memory and stream runs alternate (the machine is shared).

    .venv/bin/python benchmarks/streaming.py [--sizes 10000 50000] [--steps 20] [--data-steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, IMAGE_SIZE, WORKERS, TEST_PER_CLASS = 128, 32, 2, 100


def build_trees(cache: Path, sizes: list[int]) -> dict[str, Path]:
    """mixed-<N> and uniform-<N> for each N (N/10 training images a class, 100 test images a class)."""
    from photo_folder import ARCHIVE, linked_subset, make_photo_folder

    from ray_kd.config import DataConfig
    from ray_kd.data import imagefolder_root

    source = imagefolder_root(DataConfig(dataset="imagefolder", root=str(ARCHIVE), cache_dir=str(cache)))
    trees = {}
    for n in sizes:
        trees[f"mixed-{n}"] = make_photo_folder(cache / f"mixed-{n}", n // 10, TEST_PER_CLASS, 20, 64, seed=n,
                                                source=source)
        trees[f"uniform-{n}"] = linked_subset(cache / f"uniform-{n}", n // 10, TEST_PER_CLASS, source)
    return trees


class Sampler:
    """Peak RSS of this process, of its children (the DataLoader processes) and in all, plus peak PSS in all
    (shared pages counted once: the children are forks of this process)."""

    def __init__(self, every: float = 0.05):
        import threading

        import psutil

        self.proc, self.every = psutil.Process(), every
        self.peak = {"main_rss_mb": 0.0, "children_rss_mb": 0.0, "total_rss_mb": 0.0, "total_pss_mb": 0.0}
        self.children_seen = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        main = self.proc.memory_full_info()
        rss, pss = 0, 0
        children = self.proc.children(recursive=True)
        self.children_seen = max(self.children_seen, len(children))
        for child in children:
            try:
                info = child.memory_full_info()
            except psutil.Error:  # exited between listing and reading
                continue
            rss, pss = rss + info.rss, pss + info.pss
        now = {"main_rss_mb": main.rss, "children_rss_mb": rss, "total_rss_mb": main.rss + rss,
               "total_pss_mb": main.pss + pss}
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value / 2**20)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self._sample()

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {**self.peak, "dataloader_processes": self.children_seen}


def overrides(tree: Path, mode: str, cache: Path, out: Path, steps: int) -> list[str]:
    stream = [f"data.image_size={IMAGE_SIZE}", f"data.workers={WORKERS}"] if mode == "stream" else []
    return ["data.dataset=imagefolder", f"data.root={tree}", f"data.mode={mode}", f"data.batch_size={BATCH}",
            f"data.cache_dir={cache}", *stream, "method.name=ce", "students=[{model: resnet8}]", "optim.epochs=1",
            f"optim.steps_per_epoch={steps}", "runtime.executor=local", f"output_dir={out}", f"name={mode}-{tree.name}"]


def child(what: str, tree: Path, mode: str, cache: Path, steps: int, out: Path) -> None:
    """One measurement in this fresh process: `train` (one role, then its evaluation) or `data` (batches only)."""
    from ray_kd.config import load_config

    sampler = Sampler()
    cfg = load_config(None, overrides(tree, mode, cache, out.parent / f"runs-{time.time_ns()}", steps))
    if what == "train":
        from ray_kd.local_executor import LocalExecutor
        from ray_kd.run_storage import RunStorage

        last = LocalExecutor(cfg).execute(RunStorage.of(cfg), None, show_progress=False)
        img_s = json.loads((last / "history.json").read_text())[-1]["student_0/samples_per_s"]
    else:
        from ray_kd.data import seeded_batches
        from ray_kd.datasets import load_dataset

        data = load_dataset(cfg.data)
        batches = seeded_batches(data, BATCH, 0, 0, steps + 1)
        next(batches)  # not timed: starts the DataLoader processes
        start, n = time.perf_counter(), 0
        for _, y in batches:
            n += len(y)
        img_s = n / (time.perf_counter() - start)
    out.write_text(json.dumps({"img_s": img_s, **sampler.finish()}))


def measure(part: str, what: str, tree: Path, mode: str, cache: Path, steps: int, tmp: Path) -> dict:
    out = tmp / f"{what}-{mode}-{tree.name}-{time.time_ns()}.json"
    subprocess.run([sys.executable, sys.argv[0], "--child", what, str(tree), mode, str(cache), str(steps), str(out)],
                   check=True)
    row = {"part": part, "what": what, "tree": tree.name, "mode": mode, **json.loads(out.read_text())}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10000, 50000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data-steps", type=int, default=60, help="batches drawn when timing the data path alone")
    parser.add_argument("--repeats", type=int, default=2, help="alternating memory/stream throughput pairs")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ray-kd-streaming-bench"))
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, tree, mode, cache, steps, out = args.child
        return child(what, Path(tree), mode, Path(cache), int(steps), Path(out))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine, save

    info = machine()
    trees = build_trees(args.cache, args.sizes)
    small, large = min(args.sizes), max(args.sizes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ray-kd-streaming-") as tmp:
        tmp = Path(tmp)
        for n in args.sizes:  # warm the decoded-set caches of the in-memory path and the stream path's mean/std
            for kind, mode in (("uniform", "memory"), ("mixed", "stream")):
                measure("warm-up", "data", trees[f"{kind}-{n}"], mode, args.cache, 1, tmp)
        for n in args.sizes:  # memory per worker as the set grows
            rows.append(measure("growth", "train", trees[f"mixed-{n}"], "stream", args.cache, args.steps, tmp))
            rows.append(measure("growth", "train", trees[f"uniform-{n}"], "memory", args.cache, args.steps, tmp))
        for _ in range(args.repeats):  # throughput on the same 32x32 images, alternating
            for what in ("train", "data"):
                for mode in ("memory", "stream"):
                    steps = args.steps if what == "train" else args.data_steps
                    rows.append(measure("throughput", what, trees[f"uniform-{small}"], mode, args.cache, steps, tmp))
    summary = summarize(rows, small, large)
    notes = notes_for(summary, args, small, large)
    save("streaming", "Streaming ImageFolder: peak memory per worker as the set grows, throughput vs in-memory", rows,
         ["part", "what", "tree", "mode", "img_s", "main_rss_mb", "children_rss_mb", "total_rss_mb", "total_pss_mb",
          "dataloader_processes"], info, notes, extra={"summary": summary})


def summarize(rows: list[dict], small: int, large: int) -> dict:
    def one(what, tree, mode, key):
        return next(r[key] for r in rows if (r["part"], r["what"], r["tree"], r["mode"]) == ("growth", what, tree, mode))

    out = {}
    for key in ("total_rss_mb", "total_pss_mb", "main_rss_mb"):
        out[f"stream_{key}_growth"] = one("train", f"mixed-{large}", "stream", key) / one("train", f"mixed-{small}", "stream", key)
        out[f"memory_{key}_growth"] = one("train", f"uniform-{large}", "memory", key) / one("train", f"uniform-{small}", "memory", key)
    for what in ("train", "data"):
        pairs = [r for r in rows if r["part"] == "throughput" and r["what"] == what]
        memory = [r["img_s"] for r in pairs if r["mode"] == "memory"]
        stream = [r["img_s"] for r in pairs if r["mode"] == "stream"]
        out[f"{what}_stream_over_memory_per_pair"] = [s / m for s, m in zip(stream, memory)]
        out[f"{what}_stream_over_memory_median"] = statistics.median(out[f"{what}_stream_over_memory_per_pair"])
        out[f"{what}_img_s_best"] = {"memory": max(memory), "stream": max(stream)}
    return out


def notes_for(s: dict, args, small: int, large: int) -> str:
    pct = lambda x: f"{100 * (x - 1):+.0f}%"  # noqa: E731
    return f"""\
**Memory per worker** (`what=train`): one role (resnet8, `ce`, batch {BATCH}) trained {args.steps} steps by the
single-process executor and then evaluated on val (10% of train) and test ({10 * TEST_PER_CLASS} images), in a fresh
process. MiB, peaks sampled every 50 ms: `main_rss_mb` the role's process, `children_rss_mb` its {WORKERS} DataLoader
processes together, `total_rss_mb` both (a page shared by the fork is counted in each process), `total_pss_mb` both
with shared pages counted once. From {small} to {large} training images the stream path's total RSS changes by
{pct(s['stream_total_rss_mb_growth'])} (PSS {pct(s['stream_total_pss_mb_growth'])}), on images of mixed sizes
(20-64 px, cropped to {IMAGE_SIZE}); the in-memory path's by {pct(s['memory_total_rss_mb_growth'])} (PSS
{pct(s['memory_total_pss_mb_growth'])}), on the same images at 32x32 (it cannot read mixed sizes).

**Throughput** (`tree=uniform-{small}`, the same 32x32 JPEGs for both paths, alternating memory/stream
{args.repeats} times): `what=train` is the training loop's img/s (`student_0/samples_per_s`: {args.steps} steps
with resnet8 forward+backward, 1 thread); `what=data` is the batches alone ({args.data_steps} batches, normalised and
augmented, the first not timed). Stream/memory, median of the pairs: training {s['train_stream_over_memory_median']:.2f}
(pairs {', '.join(f'{x:.2f}' for x in s['train_stream_over_memory_per_pair'])}), data alone
{s['data_stream_over_memory_median']:.2f} (pairs {', '.join(f'{x:.2f}' for x in s['data_stream_over_memory_per_pair'])}).
The augmentations differ by design: memory crops 32x32 after 4-px padding + flip on the decoded tensor; stream
decodes each JPEG and applies RandomResizedCrop({IMAGE_SIZE}) + flip per sample in {WORKERS} DataLoader processes,
which share this machine's 2 cores with the training thread."""


if __name__ == "__main__":
    main()

"""What every benchmark shares: the machine it ran on, and writing its figures under benchmarks/results/.

Only the driver imports this module; code that runs inside Ray workers uses ray_kd, torch and the
standard library alone (a worker cannot import a script's neighbours).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parent / "runs"  # run folders (git-ignored: `runs/`)
REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """nproc, CPU model, versions, and the load when the benchmark started (the machine is shared)."""
    import ray
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "platform": platform.platform(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def command() -> str:
    """The command line as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(script), *map(shlex.quote, sys.argv[1:])])


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.1f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, title: str, rows: list[dict], columns: list[str], info: dict, notes: str = "",
         extra: dict | None = None, measured_by: str | None = None) -> Path:
    """results/<name>.json (everything), <name>.csv (the rows), <name>.md (the table, notes, machine, command).
    `measured_by`: the command that measured the figures, when this one only rewrites their table (its machine
    `info` then already holds the load at the end)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = measured_by or command()
    if measured_by is None:
        info = {**info, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"title": title, "command": cmd, "machine": info, "rows": rows, **(extra or {})}, indent=2))
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}, key=lambda k: (k not in columns, columns.index(k) if k in columns else k)))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows, columns)
    lines = [f"# {title}", "", table, ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += [f"Command: `{cmd}`", "",
              f"Machine: {info['nproc']} CPUs ({info['cpu_model']}), torch {info['torch']}, ray {info['ray']}, "
              f"Python {info['python']}, load average {info['loadavg_at_start']} at start, {info['loadavg_at_end']} at end (a shared machine), "
              f"{info['date']}.", ""]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines))
    print(f"\n{table}\n\nwrote {md} (+ .csv, .json)", flush=True)
    return md


def random_teacher(config: str, overrides: list[str], model: str) -> str:
    """A randomly initialised teacher file for `config`'s data (speed and memory do not depend on its quality)."""
    from ray_kd.checkpoint import save_model_file
    from ray_kd.config import load_config
    from ray_kd.datasets import load_dataset
    from ray_kd.models import create_model

    data = load_dataset(load_config(config, overrides).data)
    path = RUNS / "random_teachers" / f"{model}_{data.num_classes}x{data.in_channels}.pt"
    if not path.is_file():
        save_model_file(path, model, data.num_classes, data.in_channels,
                        create_model(model, data.num_classes, data.in_channels).state_dict())
    return str(path)


def absolute_paths(config: str) -> list[str]:
    """Overrides that make `config`'s data paths absolute, for a process that may run in another directory
    (a benchmark's child, a Ray worker), where the relative paths of configs/ point nowhere."""
    import yaml

    data = (yaml.safe_load(Path(config).read_text()) or {}).get("data", {})
    out = [f"data.cache_dir={Path(data.get('cache_dir', '.cache/ray_kd')).resolve()}"]
    if data.get("root") and data.get("dataset") != "synthetic":
        out.append(f"data.root={Path(data['root']).resolve()}")
    return out

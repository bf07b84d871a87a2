"""The Python API: everything the `ray-kd` command line and the `ray job submit` entry points do.

    import ray_kd
    summary = ray_kd.train("configs/digits_dml.yaml", {"optim.epochs": 5, "seed": 3})

A config is a YAML path, a dict or a `RunConfig`; overrides are `key=value`
strings or a `{dotted key: value}` dict. Every function returns what it
produced (a summary, the best trial) and raises a `UserError` on bad input.
"""

from __future__ import annotations

from pathlib import Path

from ray_kd.config import ConfigError, Overrides, RunConfig, load_config

ConfigSource = str | Path | dict | RunConfig | None


def train(config: ConfigSource = None, overrides: Overrides | None = None, restart: bool = False) -> dict:
    """Run (or resume) one distillation run; returns its summary (also in `<output_dir>/<name>/summary.json`).
    `restart` discards the checkpoints of an earlier run of that name (one made with another config)."""
    from ray_kd import run

    return run.train(load_config(config, overrides), restart=restart)


def train_teacher(config: ConfigSource, out: str | Path, overrides: Overrides | None = None,
                  restart: bool = False, keep: str = "best") -> dict:
    """Run the config (a teacher config: one model, method `ce`) and save its best student as a teacher file at
    `out`, its weights from the best validation epoch (`keep="best"`) or the last (`keep="last"`); returns the
    summary (`teacher_file`)."""
    from ray_kd import run

    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise ConfigError(f"train_teacher needs out, the teacher file to write (e.g. 'runs/teacher.pt'), not {out!r}")
    return run.train_teacher(load_config(config, overrides), Path(out), restart=restart, keep=keep)


def cache_teacher(config: ConfigSource, overrides: Overrides | None = None) -> dict[str, int]:
    """Compute the frozen teacher's outputs for every step of the run into `teacher.cache` (what is there already
    is read); returns {'read': steps, 'computed': steps}. Runs, seeds and trials with the same key then read them."""
    from ray_kd import run

    return run.cache_teacher(load_config(config, overrides))


def tune(config: ConfigSource, space, overrides: Overrides | None = None, restart: bool = False) -> dict:
    """A Ray Tune sweep over `space` (a YAML path, a dict or a `SweepSpace`); returns the best trial's row. `restart`
    discards an earlier sweep of that name (one made with another config or space) first."""
    from tuning.space import load_space
    from tuning.sweep import sweep

    return sweep(load_config(config, overrides), load_space(space), restart=restart)


__all__ = ["ConfigSource", "cache_teacher", "load_config", "train", "train_teacher", "tune"]

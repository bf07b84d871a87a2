"""A sweep's search space in YAML, validated: which fields to search, how, and how to stop early."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from ray_kd.config import ConfigError
from ray_kd.validation import Strict, one_line
from ray_kd.yaml_files import YamlError, load_yaml_file


class Param(Strict):
    """One searched field: a distribution (uniform/loguniform/randint) or a list of values (choice/grid)."""

    type: Literal["uniform", "loguniform", "randint", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list | None = None

    @model_validator(mode="after")
    def _complete(self) -> "Param":
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"a {self.type} parameter needs a non-empty `values` list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} parameter needs low < high")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("a loguniform parameter needs low > 0")
        return self


class Scheduler(Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, gt=0, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpace(Strict):
    searcher: Literal["optuna", "random", "grid"] = "optuna"
    num_samples: int | None = Field(None, gt=0, description="trials, default 8; for grid: repeats of the whole "
                                                           "grid, default 1 (a repeat runs the same seed again)")
    max_concurrent_trials: int | None = Field(None, gt=0, description="None: as many as the cluster holds")
    scheduler: Scheduler = Field(default_factory=Scheduler)
    params: dict[str, Param] = Field(min_length=1, description="dotted run-config field -> how to search it")

    @model_validator(mode="after")
    def _grid_is_grid(self) -> "SweepSpace":
        kinds = {p.type for p in self.params.values()}
        if self.searcher == "grid" and kinds - {"grid"}:
            raise ValueError("searcher grid takes only `type: grid` parameters")
        if self.searcher != "grid" and "grid" in kinds:
            raise ValueError(f"`type: grid` parameters need `searcher: grid` (got {self.searcher})")
        if self.num_samples is None:
            self.num_samples = 1 if self.searcher == "grid" else 8
        return self

    @property
    def trials(self) -> int:
        """How many trials the whole sweep runs: `num_samples`, times every combination of a grid's values."""
        return self.num_samples * math.prod(len(p.values) for p in self.params.values() if p.type == "grid")


def load_space(source: str | Path | dict | SweepSpace) -> SweepSpace:
    """A validated search space from a YAML path, a dict (the YAML's content) or a SweepSpace."""
    if isinstance(source, SweepSpace):
        return source
    if not isinstance(source, (str, Path, dict)):
        raise ConfigError(f"a search space is a YAML path, a dict or a SweepSpace, not {type(source).__name__} "
                          f"{source!r}")
    try:
        return SweepSpace.model_validate(source if isinstance(source, dict)
                                         else load_yaml_file(source, "search space") or {})
    except YamlError as err:
        raise ConfigError(str(err)) from None
    except ValidationError as err:
        where = "" if isinstance(source, dict) else f" {source}"
        raise ConfigError(f"search space{where}: {one_line(err)}") from None


def check_space(space: SweepSpace, base: dict) -> None:
    """Before any trial starts: every searched field must exist in the run spec `base` (a config dump) and
    take every end of its range (both bounds, or every listed value), so no sweep fails trial by trial."""
    import copy

    from ray_kd.config import apply_overrides, validate_config

    for name, param in space.params.items():
        if param.values is not None:
            samples = param.values
        elif param.type == "randint":
            samples = [int(param.low), int(param.high) - 1]  # tune.randint excludes the upper bound
        else:
            samples = [param.low, param.high]
        for value in samples:
            try:
                validate_config(apply_overrides(copy.deepcopy(base), {name: value}))
            except ConfigError as err:
                raise ConfigError(f"search space param {name}={value!r} does not make a valid run: {err}") from None
        if param.type in ("uniform", "loguniform"):  # its draws between the bounds are fractions
            try:
                validate_config(apply_overrides(copy.deepcopy(base), {name: math.nextafter(param.low, param.high)}))
            except ConfigError:
                raise ConfigError(f"search space param {name}: {param.type} draws fractions, but {name} takes whole "
                                  "numbers; search it with randint, choice or grid") from None


def tune_domain(param: Param):
    from ray import tune

    if param.type == "uniform":
        return tune.uniform(param.low, param.high)
    if param.type == "loguniform":
        return tune.loguniform(param.low, param.high)
    if param.type == "randint":
        return tune.randint(int(param.low), int(param.high))
    if param.type == "choice":
        return tune.choice(param.values)
    return tune.grid_search(param.values)

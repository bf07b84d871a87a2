"""What keeps one run's folder to one run: a lock, a config fingerprint, and the MLflow store it records to.

A run folder (`ray_kd.run_storage`) holds checkpoints that a later start with the same name
resumes. Three things stop two computations from mixing there:
- its lock, held by the one process running the name (`RunStorage.hold_lock`);
- its fingerprint: every field that changes what the run computes (the teacher and
  other weight files by content, the data by its split sizes and labels); a resume that
  differs is refused, naming the fields. A start with another config before the first
  checkpoint is a new run: it gets a new MLflow run, so nothing of the earlier config
  (params, description, method) is reported as this one's. A start whose name came from
  the config file, not from the command, goes to a new folder instead (`ray_kd.run`);
- its MLflow marker: the run's MLflow store and run id; a resume against another store is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

from ray_kd.config import RunConfig, flatten, shown_config, shown_uri
from ray_kd.run_storage import RunFolderError, RunStorage

MAY_CHANGE_ON_RESUME = ("name", "output_dir", "optim.epochs", "data.cache_dir", "data.download", "runtime.*",
                        "tracking.*", "teacher.ahead", "data.decode", "data.prefetch", "data.loader_resources",
                        "data.loader_resources.*")
"""Fields a resume may change: where things go, how long to train, and how it runs; not what it computes."""


def fingerprint(cfg: RunConfig, data=None) -> dict[str, Any]:
    """The fields that change what the run computes, flat; weight files by the sha256 of their content; the
    loaded dataset `data` (when given) by its split sizes and a digest of its labels."""
    flat = flatten(shown_config(cfg))  # credentials in a URI are not what the run computes, nor for a file
    if data is not None:
        from ray_kd.data_sources import dataset_identity

        _, _, sizes, digest = dataset_identity(cfg.data, data)
        flat.update({"data.split_sizes": sizes, "data.labels_digest": digest})
    free = tuple(f.removesuffix("*") for f in MAY_CHANGE_ON_RESUME)
    out = {}
    for key, value in flat.items():
        if key in free or any(f.endswith(".") and key.startswith(f) for f in free):
            continue
        if key.endswith(".checkpoint") and value is not None:
            value = f"sha256:{_sha256(Path(value))}"
        out[key] = value
    return json.loads(json.dumps(out))  # the form it has when read back (tuples -> lists)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_fingerprint(run: RunStorage, now: dict) -> None:
    """Refuse a resume whose fingerprint `now` differs; record the fingerprint of a run with no checkpoint yet. A
    run with no checkpoint whose config changed starts over as a new MLflow run (its earlier run is left as it
    ended), so params and description always belong to what runs."""
    before = run.read_fingerprint(f"run {run.name}")
    differ = [] if before is None else changed_fields(before, now)
    if before is not None and run.checkpoints().folders():
        if differ:
            raise RunFolderError(f"run {run.name} in {run.run_dir} was made with another config or data: "
                                 f"{describe_changes(before, now)}; to keep it, start this one under another "
                                 "name=; to discard its checkpoints and start over, add --restart")
        return
    if (before is None or differ) and run.forget_mlflow_run():
        print(f"run {run.name}: no checkpoint of the earlier start, made with another config "
              f"({', '.join(differ[:4]) or 'unknown'}): starting over as a new MLflow run", flush=True)
    run.write_fingerprint(now)


def made_otherwise(run: RunStorage, now: dict) -> bool:
    """Whether the folder holds checkpoints of a run made with another fingerprint (a resume would be refused);
    for an object-store output_dir, as the store holds it (its mirror may not be pulled yet)."""
    before = run.stored_fingerprint()
    return before is not None and bool(changed_fields(before, now)) and run.has_checkpoints()


def changed_fields(before: dict, now: dict) -> list[str]:
    """The fields whose values differ, changed values before added or removed ones. A field missing from `before`
    that holds its default now was added to the config since (an upgrade of ray-kd): not a change."""
    differ = (k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return sorted((k for k in differ if k in before or now[k] != field_default(k)),
                  key=lambda k: (k not in before or k not in now, k))


_NO_DEFAULT = object()


def field_default(dotted: str) -> Any:
    """The default of a run-config field named flat (`teacher.cache_dtype`, `students.0.model`), as the
    fingerprint holds it; a sentinel for a key that is not a field with a default."""
    def models(annotation) -> list[type]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in get_args(annotation) for m in models(arg)]

    model, field = RunConfig, None
    for part in dotted.split("."):
        if part.isdigit():  # an item of a list field
            continue
        if model is None or part not in model.model_fields:
            return _NO_DEFAULT
        field = model.model_fields[part]
        inner = models(field.annotation)
        model = inner[0] if inner else None
    if field is None or field.is_required():
        return _NO_DEFAULT
    return json.loads(json.dumps(field.get_default(call_default_factory=True), default=str))


def describe_changes(before: dict, now: dict) -> str:
    """The first four changes, `field old -> new`, for a one-line refusal."""
    differ = changed_fields(before, now)
    shown = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:4])
    return shown + (f" (and {len(differ) - 4} more)" if len(differ) > 4 else "")


def check_store(run: RunStorage, uri: str) -> None:
    """A resumed run continues its MLflow run, which lives in the store it was started in."""
    marker = run.mlflow_run(f"run {run.name}")
    if marker is None:
        return
    recorded, shown = shown_uri(marker["tracking_uri"]), shown_uri(uri)  # the marker holds the shown form
    if recorded != shown:
        raise RunFolderError(f"run {run.name} is recorded in the MLflow store {recorded}, not {shown}; resume it with "
                             f"MLFLOW_TRACKING_URI={recorded}, or add --restart to start it over in {shown}")

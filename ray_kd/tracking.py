"""MLflow: where runs go, what a run says about itself, and metric logging that survives restarts.

A run carries tags a reviewer can filter on (its kind, method, architectures,
dataset, seed, git commit, protocol), a one-line description with its result,
its dataset as an input, and, for a KD run, a link to the teacher's run and
model. Per-epoch curves are logged from the epoch history kept in the
checkpoint, only for epochs MLflow does not have yet, so a worker group
restarted from a checkpoint logs each epoch exactly once; the final metrics are
logged once, from the same summary that picks the saved weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import yaml

from ray_kd.config import RunConfig, flatten, shown_config, shown_uri
from ray_kd.errors import UserError, causes, first_line
from ray_kd.evaluation import OBJECTIVE
from ray_kd.run_storage import RunStorage


class TrackingError(UserError, RuntimeError):
    """The MLflow store cannot be reached or written: raised before any training starts."""


def tracking_uri(cfg: RunConfig) -> str:
    """MLFLOW_TRACKING_URI wins, then tracking.uri, then sqlite:///mlflow.db in the working directory.

    A relative sqlite path is made absolute, since Ray workers run in other directories.
    """
    return resolve_uri(cfg.tracking.uri)


def resolve_uri(configured: str | None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str) -> None:
    """The MLflow store answers now, before anything starts: a server that does not and a sqlite file another
    process keeps locked are each one line."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as err:
        if store_locked(err):
            raise TrackingError(f"the MLflow store {shown_uri(uri)} is locked by another process ({SQLITE_LOCKED}, "
                                "for longer than MLflow waits); nothing has started: once the other process lets go "
                                "of the store, run the same command") from None
        first = first_line(err)
        raise TrackingError(f"MLflow store {shown_uri(uri)} is not reachable ({first}); start the tracking server "
                            "or set MLFLOW_TRACKING_URI / tracking.uri to a reachable store") from None


SQLITE_LOCKED = "database is locked"


def store_locked(err: BaseException) -> bool:
    """Whether `err` comes of a sqlite MLflow store that another process kept locked past MLflow's busy timeout
    (20 s). Found by sqlite's own text, anywhere in the chain: a Ray worker's exception reaches the driver without
    its chained sqlite error, its message names it."""
    return any(SQLITE_LOCKED in str(e) for e in causes(err))


def locked_store_error(uri: str, run_id: str, state: str, where: str) -> TrackingError:
    """The one line for a run stopped by a locked store: which store, the MLflow run's true state, what to do."""
    left = "is left RUNNING (the locked store took no mark)" if state == "RUNNING" else f"is {state}"
    return TrackingError(f"the MLflow store {shown_uri(uri)} is locked by another process ({SQLITE_LOCKED}, for "
                         f"longer than MLflow waits); MLflow run {run_id} {left}, checkpoints are kept in {where}: "
                         "once the other process lets go of the store, the same command resumes it")


RUN_KINDS = ("teacher", "baseline", "distillation", "sweep", "sweep_trial", "report")
FINAL_METRICS = ("best_epoch", "val_acc_at_best", "test_acc_at_best_val", "last_test_acc")
"""Per role (`<role>/final/<metric>`: a chart section after the role's curves) and, unprefixed, for the best
student (the one whose weights are saved). Logged once at step 0, which MLflow's UI draws as a bar (a metric
whose latest step is 1 or more is drawn as a line: a lone dot)."""
THROUGHPUT = ("samples_per_s", "compute_ms", "exchange_ms", "wait_ms", "allreduce_ms", "eval_s",
              "images_scored_waiting", "steps_ahead", "cache_hits", "cache_misses", "cache_corrupt", "input_wait_ms",
              "images_decoded", "images_decoded_per_s", "decode_cpu_s", "decode_cpu_ms_per_image", "decodes_per_image",
              "images_trained")
STOPPED_TAG = "ray_kd.stopped"
"""On a run that did not finish (a sweep's trial): why (stopped early by the scheduler, failed, the sweep stopped)."""
NOT_PROTOCOL = ("name", "seed", "output_dir", "runtime.", "tracking.", "data.cache_dir", "teacher.ahead", "data.decode",
                "data.prefetch", "data.loader_resources")
"""Config params that do not change what a run measures: left out of its protocol hash."""


def default_kind(cfg: RunConfig) -> str:
    return "baseline" if cfg.method.name == "ce" else "distillation"


def role_names(kind: str | None) -> dict[str, str]:
    """How roles are shown in MLflow: a `train-teacher` run trains student_0, but it is the teacher."""
    return {"student_0": "teacher"} if kind == "teacher" else {}


def config_params(cfg: RunConfig) -> dict[str, str]:
    """The config as MLflow params (flattened, as strings)."""
    return {k: str(v)[:6000] for k, v in flatten(shown_config(cfg)).items()}


def protocol_hash(params: dict[str, str], drop: tuple[str, ...] = ()) -> str:
    """What runs must share to be compared over seeds: the config params less NOT_PROTOCOL (and `drop`)."""
    kept = {k: v for k, v in params.items() if not k.startswith(NOT_PROTOCOL + drop)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]


def git_state() -> dict[str, str]:
    """The commit of the source tree ray_kd runs from and whether it had uncommitted changes; none without
    git or outside a repository (e.g. the copy `ray job submit` makes)."""
    root = str(Path(__file__).resolve().parent.parent)
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=20,
                                  check=True).stdout.strip()

        commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "ray_kd.git_dirty": str(bool(changes)).lower()}


def run_tags(cfg: RunConfig, kind: str) -> dict[str, str]:
    from mlflow.tracking.context.registry import resolve_tags

    students = sorted({s.model for s in cfg.students})
    tags = {
        "mlflow.runName": cfg.name, "ray_kd.run_kind": kind, "ray_kd.method": cfg.method.name,
        "ray_kd.teacher": cfg.teacher.model if cfg.teacher else "none", "ray_kd.student": "+".join(students),
        "ray_kd.students": str(len(cfg.students)), "ray_kd.dataset": cfg.data.dataset, "ray_kd.seed": str(cfg.seed),
        "ray_kd.protocol": protocol_hash(config_params(cfg)),
        "mlflow.note.content": describe(cfg, kind),
    }
    return {**resolve_tags(), **tags, **git_state()}  # resolve_tags: mlflow.user, mlflow.source.name/type


def describe(cfg: RunConfig, kind: str, summary: dict | None = None) -> str:
    """The run's one-line markdown description: what it is, and its result once it has one (the best student's
    figures, then each other role's test top-1 at its best-val epoch: the final metrics, in words)."""
    students = ", ".join(s.model for s in cfg.students)
    what = (f"**{kind}** `{cfg.method.name}`: {cfg.teacher.model + ' → ' if cfg.teacher else ''}{students} "
            f"on {cfg.data.dataset}, seed {cfg.seed}")
    if summary is None or not summary.get("headline"):
        return f"{what}; running"
    h = summary["headline"]
    if h["test_acc_at_best_val"] is None:  # eval.splits left the test split unscored at that epoch
        figure, aside = f"val top-1 **{h['val_acc_at_best']:.2f}**", "test not scored there"
    else:
        figure, aside = f"test top-1 **{h['test_acc_at_best_val']:.2f}**", f"val {h['val_acc_at_best']:.2f}"
    others = "".join(f"; {role} test {scores['test_acc_at_best_val']:.2f}"
                     for role, scores in summary["roles"].items()
                     if role != summary["best_student"] and scores["test_acc_at_best_val"] is not None)
    return (f"{what}: {summary['best_student']} {figure} at its best-val epoch {h['best_epoch']} of "
            f"{summary['epochs']} ({aside}; last epoch test {h['last_test_acc']:.2f}){others}")


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""The experiment tag saying it holds model training, which MLflow 3.0-3.x UIs before the GenAI/Model training
switch read. MLflow 3.17's UI ignores it: its view is the `workflowType` URL parameter (TRAINING_VIEW), else the
switch last chosen in that browser, else GenAI."""
TRAINING_VIEW = "workflowType=machine_learning"
"""The URL parameter that opens MLflow 3.17's UI in its Model training view (runs, models; not traces)."""


def training_experiment(mlflow, name: str, uri: str) -> str:
    """The id of experiment `name`, created if needed, tagged as model training unless it says otherwise."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        return mlflow.create_experiment(name, artifact_location=_artifact_root(uri), tags=dict([EXPERIMENT_KIND]))
    if EXPERIMENT_KIND[0] not in experiment.tags:
        mlflow.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def start_or_resume(cfg: RunConfig, run: RunStorage, uri: str, parent_run_id: str | None = None,
                    kind: str | None = None) -> str:
    """The run id kept in the run folder `run` (a resumed run continues it), or a new run with the config as
    params, its tags and description, and its teacher's lineage."""
    marker = run.mlflow_run(f"run {run.name}")
    if marker is not None:
        return marker["run_id"]
    mlflow = client(uri)
    exp_id = training_experiment(mlflow, cfg.tracking.experiment, uri)
    tags = run_tags(cfg, kind or default_kind(cfg))
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if cfg.teacher is not None and cfg.teacher.checkpoint is not None:
        tags.update(teacher_origin(cfg.teacher.checkpoint))
    run_id = mlflow.create_run(exp_id, run_name=cfg.name, tags=tags).info.run_id
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in config_params(cfg).items()]
    for i in range(0, len(params), 100):
        mlflow.log_batch(run_id, params=params[i:i + 100])
    mlflow.log_text(run_id, yaml.safe_dump(shown_config(cfg), sort_keys=False), "config.yaml")
    if tags.get("ray_kd.teacher_model_id") and kind != "sweep":  # a sweep's result is its trials', not the teacher
        _link_model_input(mlflow, run_id, tags["ray_kd.teacher_model_id"])
    run.record_mlflow_run(run_id, uri)
    return run_id


def mark_running(mlflow, run, cfg: RunConfig, kind: str | None) -> None:
    """A resumed run shows as running while it runs; one closed as stopped (a sweep's trial) loses that mark and
    its note says running again."""
    if run.info.status == "RUNNING":
        return
    if STOPPED_TAG in run.data.tags:
        mlflow.delete_tag(run.info.run_id, STOPPED_TAG)
        mlflow.set_tag(run.info.run_id, "mlflow.note.content", describe(cfg, kind or default_kind(cfg)))
    mlflow.update_run(run.info.run_id, "RUNNING")


def teacher_origin(checkpoint: str) -> dict[str, str]:
    """Tags naming the run and model a teacher file came from (`ray-kd train-teacher` stores them in the
    file); none for a file without them (older files, or weights from elsewhere)."""
    from ray_kd.checkpoint import safe_load

    origin = safe_load(checkpoint).get("mlflow")
    if not isinstance(origin, dict):
        return {}
    origin = {"test_acc": origin.get("test_acc_at_best_val"), "epoch": origin.get("best_epoch"),  # files before `kept`
              **origin}
    names = {"run_id": "ray_kd.teacher_run_id", "model_id": "ray_kd.teacher_model_id",
             "test_acc": "ray_kd.teacher_test_acc", "epoch": "ray_kd.teacher_epoch", "kept": "ray_kd.teacher_kept"}
    return {tag: str(origin[key]) for key, tag in names.items() if origin.get(key) is not None}


def _link_model_input(mlflow, run_id: str, model_id: str) -> None:
    """The teacher's logged model as an input of this run (MLflow's model lineage), when it is in this store."""
    from mlflow.entities import LoggedModelInput
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_logged_model(model_id)
    except MlflowException:
        return  # trained against another store: the tags still name it
    mlflow.log_inputs(run_id, models=[LoggedModelInput(model_id)])


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database file, not into whatever directory the process
    runs in (under `ray job submit` that is a temporary copy of the working dir)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix):]).parent / "mlruns").as_uri()
    return None  # a tracking server decides


def epoch_metrics(entry: dict[str, float], names: dict[str, str]) -> dict[str, float]:
    """One epoch of the history as MLflow curves: `<role>/val_acc`, `<role>/loss_<term>`, `<role>/lr`, and
    `throughput/<role>/...` (its own chart section, after accuracy). Left out: the epoch (it is the step),
    the per-epoch best-student figures (the final metrics say which student and epoch count), and the
    accuracy of a role that does not train (a frozen teacher), logged once among the final metrics."""
    roles = {k.split("/")[0] for k in entry if k.endswith("/samples_per_s")}
    frozen = roles - {k.split("/")[0] for k in entry if "/loss_" in k}
    out = {}
    for key, value in entry.items():
        if key in ("epoch", OBJECTIVE, "best_student_test_acc"):
            continue
        head, _, what = key.partition("/")
        if head in frozen and what in ("val_acc", "test_acc"):
            continue
        name = f"{names.get(head, head)}/{what}"
        out[("throughput/" + name if what in THROUGHPUT else name).replace("@", "_")] = float(value)
    return out


def epoch_marker(names: dict[str, str]) -> str:
    """A curve every epoch of every run logs: its steps say which epochs MLflow has."""
    return f"{names.get('student_0', 'student_0')}/val_acc"


class MetricSync:
    """Logs the epochs of a history that this MLflow run has not seen yet (step = epoch)."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = client(uri), run_id
        self.names = role_names(self.client.get_run(run_id).data.tags.get("ray_kd.run_kind"))
        self.logged = {int(m.step) for m in self.client.get_metric_history(run_id, epoch_marker(self.names))}

    def sync(self, history: list[dict[str, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for entry in history:
            step = int(entry["epoch"])
            if step in self.logged:
                continue
            metrics = [Metric(k, v, now, step) for k, v in epoch_metrics(entry, self.names).items()]
            for i in range(0, len(metrics), 200):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 200])
            self.logged.add(step)


def latest_epoch(mlflow, run_id: str) -> tuple[int, dict[str, float]]:
    """The last epoch MLflow has for a run, and the run's latest metrics (what the progress line shows)."""
    run = mlflow.get_run(run_id)
    marker = epoch_marker(role_names(run.data.tags.get("ray_kd.run_kind")))
    steps = [int(m.step) for m in mlflow.get_metric_history(run_id, marker)]
    return max(steps, default=0), run.data.metrics


def log_final(mlflow, run_id: str, summary: dict, model_id: str | None, dataset: tuple[str, str] | None) -> None:
    """The final metrics, once (step 0), from the summary: per role, and unprefixed for the best student, those
    also attached to its logged model (and to the dataset it was evaluated on)."""
    from mlflow.entities import Metric

    now, step = int(time.time() * 1000), 0
    name, digest = dataset or (None, None)
    metrics = [Metric(metric_key(f"{role}/final/{k}"), float(scores[k]), now, step)
               for role, scores in summary["roles"].items() for k in FINAL_METRICS
               if scores[k] is not None]  # None: test not scored at the best epoch (eval.splits)
    if summary.get("headline"):
        metrics += [Metric(k, float(summary["headline"][k]), now, step, model_id=model_id, dataset_name=name,
                           dataset_digest=digest) for k in FINAL_METRICS if summary["headline"][k] is not None]
    for i in range(0, len(metrics), 200):
        mlflow.log_batch(run_id, metrics=metrics[i:i + 200])


def metric_key(text: str) -> str:
    """`text` with every character an MLflow metric name may not hold (`+`, `@`, `:`, ...) replaced by `_`."""
    return re.sub(r"[^\w\-. /]", "_", text)


def log_dataset(mlflow, run_id: str, data_cfg, data) -> tuple[str, str]:
    """The dataset as an MLflow input of the run: name, source, a digest of what was read, split sizes."""
    from mlflow.entities import Dataset as DatasetEntity, DatasetInput, InputTag

    from ray_kd.data_sources import dataset_identity
    from ray_kd.streaming import DEFAULT_IMAGE_SIZE

    name, source, sizes, digest = dataset_identity(data_cfg, data)
    image = (list(data.train.images.shape[1:]) if hasattr(data.train, "images")  # in memory
             else [data.in_channels, *[data_cfg.image_size or DEFAULT_IMAGE_SIZE] * 2])  # streamed: as cropped
    profile = {"splits": sizes, "num_classes": data.num_classes, "image": image,
               "val_fraction": data_cfg.val_fraction, "train_subset": data_cfg.train_subset}
    entity = DatasetEntity(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                           profile=json.dumps(profile))
    tags = [InputTag("mlflow.data.context", "training"),
            *(InputTag(f"ray_kd.{k}_size", str(n)) for k, n in sizes.items())]
    mlflow.log_inputs(run_id, datasets=[DatasetInput(entity, tags)])
    return name, digest


@contextlib.contextmanager
def system_metrics(uri: str | None, run_id: str | None, node_id: str, interval: float):
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) for this process,
    logged as `system/<node_id>/...`; it only ever logs and is always stopped on exit, so it never fails
    or holds up a run. Off when there is no run or `interval` is 0."""
    if not run_id or interval <= 0:
        yield
        return
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, node_id=node_id, tracking_uri=uri,
                                   resume_logging=True)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def ui_hint(uri: str, run_id: str) -> str:
    """Where to look at a run: its page in the UI's Model training view (TRAINING_VIEW; without it MLflow 3.17
    opens in its GenAI view), its experiment's runs, and for a local store how to start a UI on loopback."""
    experiment = client(uri).get_run(run_id).info.experiment_id
    local = not uri.startswith(("http://", "https://"))
    base = "http://127.0.0.1:5000" if local else shown_uri(uri).rstrip("/")
    lines = [f"the run in MLflow: {base}/#/experiments/{experiment}/runs/{run_id}?{TRAINING_VIEW}",
             f"  its experiment: {base}/#/experiments/{experiment}/runs?{TRAINING_VIEW}"]
    if local:
        lines.append(f"  (start the UI with: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000)")
    return "\n".join(lines)

"""The driver of one distillation run: check MLflow, train on an executor, record the results."""

from __future__ import annotations

import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from ray_kd.card import log_card, run_card
from ray_kd.checkpoint import atomic_save, safe_load, save_model_file
from ray_kd.config import ConfigError, RunConfig, shown_uri
from ray_kd.data import Dataset, epoch_steps, raw_eval_batches
from ray_kd.datasets import load_dataset
from ray_kd.deliverable import load_student, shipped_meta
from ray_kd.errors import UserError, disk_full
from ray_kd.model_registry import label_version
from ray_kd.preflight import check_folders, check_out_file, check_roles, check_sqlite_store
from ray_kd.results import headline_line, plot_curves, summarize
from ray_kd.run_storage import RunStorage, read_history
from ray_kd.stopping import RunStopped, install_handlers, signal_of
from ray_kd.storage import StorageError, store_down
from ray_kd.teacher_cache import describe_size
from ray_kd import run_folder, tracking


def train(cfg: RunConfig, parent_run_id: str | None = None, kind: str | None = None, restart: bool = False,
          on_epoch: Callable[[dict], None] | None = None, show_progress: bool = True,
          tracking_uri: str | None = None) -> dict:
    """Run (or resume) `cfg` end to end; returns the summary written to the run folder.

    `kind` is the run's `ray_kd.run_kind` tag (teacher, baseline, distillation, sweep_trial); by default
    baseline for the student alone (`ce`), else distillation. `restart` discards the run folder's
    checkpoints first (a new MLflow run too). A sweep's trial is a run like any other, with a parent run (in
    the MLflow store `tracking_uri`, the parent's), its epochs passed to `on_epoch` as their checkpoints land,
    and no epoch lines (`show_progress`)."""
    uri = tracking_uri or tracking.tracking_uri(cfg)
    data, executor = checked_and_connected(cfg, uri)  # data loaded once on the driver: the finish uses it too
    if threading.current_thread() is threading.main_thread():
        install_handlers()
    with _shut_down_after(executor):
        now = run_folder.fingerprint(cfg, data)
        cfg = _free_name(cfg, now, restart)
        run = RunStorage.of(cfg)
        with run.hold_lock():
            if restart:
                run.clear()
            else:
                run.pull()
            run_folder.check_store(run, uri)
            run_folder.check_fingerprint(run, now)
            resumed = run.newest_good(print)
            run_id = tracking.start_or_resume(cfg, run, uri, parent_run_id, kind)
            run.push()
            mlflow = tracking.client(uri)
            before = mlflow.get_run(run_id)
            done = _already_finished(cfg, run, before, resumed)
            if done is not None:
                return done
            tracking.mark_running(mlflow, before, cfg, kind)
            epochs_before = tracking.latest_epoch(mlflow, run_id)[0]
            print(f"run {cfg.name}: folder {run.where()}, MLflow run {run_id} in {shown_uri(uri)}"
                  + (f", resuming after epoch {len(resumed[1])}" if resumed else ""), flush=True)
            earlier, start = run.wall_before(), time.perf_counter()
            last = None
            try:
                try:
                    last = executor.execute(run, data, (uri, run_id), on_epoch, show_progress)
                    return finish(cfg, last, uri, run_id, earlier + time.perf_counter() - start, data, run)
                except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (see ray_kd.stopping)
                    _mark_unfinished(uri, before, epochs_before, "KILLED")
                    stopped = run.newest_good()
                    epochs = len(stopped[1]) if stopped else 0
                    raise RunStopped(f"run {cfg.name} stopped at epoch {epochs}" if last is None else
                                     f"run {cfg.name} stopped while finishing after its last epoch ({epochs}): the "
                                     "same command finishes it", signal_of(err)) from None
                except BaseException as err:  # the run shows as failed until a resume finishes it
                    state = _mark_unfinished(uri, before, epochs_before, "FAILED")
                    run.discard_partial()
                    named = disk_full(err, run.where()) or store_down(err, cfg.output_dir, run_id, state) or (
                        tracking.locked_store_error(uri, run_id, state, run.where())
                        if tracking.store_locked(err) else None)
                    if named is not None:
                        raise named from None
                    raise
            finally:  # every start's time counts, a stopped or failed one's too
                run.record_wall(earlier + time.perf_counter() - start)
                if not isinstance(sys.exc_info()[1], StorageError):  # a store that stopped answering takes none
                    run.push()


def _free_name(cfg: RunConfig, now: dict, restart: bool) -> RunConfig:
    """`cfg` under the name it runs as: the config's own; or, when that name came from the config file (no
    `name=` given) and its folder holds checkpoints of another config, the first of `<name>-2`, `<name>-3`, ...
    that is new or holds this config's run (`now`: its fingerprint), said in one line. A `name=` given is kept (a
    changed config is then refused, see run_folder.check_fingerprint)."""
    if restart or cfg.name_given:
        return cfg
    name, n = cfg.name, 1
    while run_folder.made_otherwise(RunStorage.of(cfg), now):
        n += 1
        cfg = cfg.model_copy(update={"name": f"{name}-{n}"})
    if n > 1:
        print(f"run {name} was made with another config or data: this one runs as {cfg.name} (give name= to "
              f"choose its name)", flush=True)
    return cfg


def _already_finished(cfg: RunConfig, run: RunStorage, mlflow_run, resumed) -> dict | None:
    """The summary of a FINISHED run whose checkpoints hold every epoch asked for: a rerun of it changes nothing
    (no second model, no final metrics logged again); None when there is training or finishing to do."""
    if mlflow_run.info.status != "FINISHED" or not resumed or len(resumed[1]) < cfg.optim.epochs:
        return None
    summary = run.read_summary()
    if summary is None:
        return None
    print(f"run {cfg.name}: already finished all {cfg.optim.epochs} epochs, nothing to do (raise optim.epochs to "
          f"extend it, or add --restart to run it again); summary: {run.summary_file}", flush=True)
    return summary


@contextmanager
def _shut_down_after(executor):
    """The role workers started during the checks end with the run, even when it fails before training."""
    try:
        yield
    finally:
        executor.shutdown()


def _mark_unfinished(uri: str, before, epochs_before: int, status: str) -> str:
    """KILLED or FAILED, except that a FINISHED run stays FINISHED when this start added no epoch to it; the state
    the MLflow run is left in (RUNNING when a locked store takes no mark)."""
    mlflow = tracking.client(uri)
    try:
        if before.info.status == "FINISHED" and tracking.latest_epoch(mlflow, before.info.run_id)[0] == epochs_before:
            status = "FINISHED"
        mlflow.set_terminated(before.info.run_id, status)
    except Exception as err:
        if not tracking.store_locked(err):
            raise
        return "RUNNING"
    return status


def executor_for(cfg: RunConfig):
    """The executor `runtime.executor` names (Ray's module imported only for it): `start(checks) -> Dataset`,
    `execute(run, dataset, mlflow_run, on_epoch, show_progress) -> last checkpoint`, `shutdown()`."""
    if cfg.runtime.executor == "local":
        from ray_kd.local_executor import LocalExecutor

        return LocalExecutor(cfg)
    from ray_kd.ray_executor import RayExecutor

    return RayExecutor(cfg)


def checked_and_connected(cfg: RunConfig, uri: str):
    """The preflight and the MLflow store's checks, done while the executor starts (a Ray cluster joined or
    started, its role workers started: see `RayExecutor.start`). Returns the dataset and the started executor;
    the caller shuts it down."""
    def checks() -> Dataset:
        data = preflight(cfg)
        check_sqlite_store(uri)
        tracking.check_reachable(uri)
        return data

    executor = executor_for(cfg)
    return executor.start(checks), executor


def preflight(cfg: RunConfig) -> Dataset:
    """Fail in seconds, before any worker starts: every folder the run writes must be writable, the data must
    load and fit every role and weight file. Returns the dataset."""
    check_folders(cfg)
    data = load_dataset(cfg.data)
    check_roles(cfg, data)
    n, size, replicas = len(data.train.labels), cfg.data.batch_size, cfg.runtime.replicas
    steps = epoch_steps(data, size, cfg.optim.steps_per_epoch)
    last = min(size, n - (steps - 1) * size)
    if last < replicas:
        raise ConfigError(f"config error: the epoch's last batch holds {last} of the {n:,} training images, too few "
                          f"to split into runtime.replicas={replicas} shards; pick a data.batch_size that leaves "
                          f"at least {replicas} (or set optim.steps_per_epoch)")
    if cfg.teacher is not None and cfg.teacher.cache is not None:
        size_line = describe_size(min(n, steps * size), data.num_classes, cfg.teacher.cache_topk, cfg.optim.epochs,
                                  cfg.teacher.cache_dtype)
        print(f"teacher.cache {shown_uri(cfg.teacher.cache)}: {size_line}", flush=True)
    if cfg.data.batch_size > n:
        print(f"note: data.batch_size={cfg.data.batch_size} is larger than the {n:,} training images: every epoch "
              f"is one step of {n:,} images", flush=True)
    return data


def train_teacher(cfg: RunConfig, out: Path, restart: bool = False, keep: str = "best") -> dict:
    """Run `cfg` (its own method: a teacher config has one model and `ce`) and save its best student as a teacher
    file; returns the run's summary, with the file's path as `teacher_file`.

    `keep` picks the weights: `best` (the epoch of best validation top-1) or `last` (the last epoch). With a
    small validation split the best epoch can be noise (a val top-1 of 1,000 images moves by a point from
    one epoch to the next), and with a schedule that anneals to the end the last epoch is usually as good.
    The file also names the MLflow run (and, for `best`, the logged model) it came from, and the epoch and
    figures of the weights it holds (plain values, so it still loads with `weights_only=True`): a KD run
    that uses it tags and links that teacher run."""
    if keep not in ("best", "last"):
        raise UserError(f"keep={keep!r}: choose 'best' (the best validation epoch) or 'last' (the last epoch)")
    check_out_file(out)
    summary = train(cfg, kind="teacher", restart=restart)
    blob = safe_load(summary["best_student_file"])
    head = summary["headline"]
    kept = {"kept": keep, "epoch": head["best_epoch"], "val_acc": head["val_acc_at_best"],
            "test_acc": head["test_acc_at_best_val"]}
    if keep == "last":
        ran_as = Path(summary["best_student_file"]).parent.name  # the run's folder: its name, if it took a new one
        run = RunStorage.of(cfg.model_copy(update={"name": ran_as}))
        folder, _ = run.newest_good()
        net = run.role_state(folder, summary["best_role"])["net"]
        blob["state_dict"] = {k.removeprefix("backbone."): v for k, v in net.items() if k.startswith("backbone.")}
        kept.update(epoch=summary["epochs"], val_acc=head["last_val_acc"], test_acc=head["last_test_acc"])
    blob.update(kept)
    blob["mlflow"] = {"run_id": summary["mlflow_run_id"], "tracking_uri": shown_uri(tracking.tracking_uri(cfg)),
                      "model_id": summary.get("mlflow_model_id") if keep == "best" else None, **kept}
    atomic_save(blob, out)
    test = kept["test_acc"]
    print(f"teacher: {out} (epoch {kept['epoch']}, the {keep}: val top-1 {kept['val_acc']:.2f}, "
          f"test top-1 {'not scored' if test is None else f'{test:.2f}'})", flush=True)
    return {**summary, "teacher_file": str(out)}


def cache_teacher(cfg: RunConfig) -> dict[str, int]:
    """`ray-kd cache-teacher`: fill `teacher.cache` with the frozen teacher's outputs for every step of the run
    (and its val/test scores), in this process, so the runs, seeds and sweep trials with its key only read them.
    Returns the steps read and computed."""
    from ray_kd.local_executor import fill_teacher_cache

    if cfg.teacher is None or cfg.teacher.cache is None:
        raise ConfigError("config error: cache-teacher fills teacher.cache: give a config with a frozen teacher "
                          "(e.g. method kd) and set teacher.cache")
    data = preflight(cfg)
    totals = fill_teacher_cache(cfg, data)
    print(f"teacher.cache {shown_uri(cfg.teacher.cache)}: {totals['computed']} steps computed, {totals['read']} read", flush=True)
    return totals


def finish(cfg: RunConfig, checkpoint: Path, uri: str, run_id: str, wall: float, data: Dataset,
           run: RunStorage) -> dict:
    """The summary, the curve plot, the best student's weights and MLflow model, the final metrics and the
    description: all from one summary, so every figure shown matches the weights saved."""
    history = read_history(checkpoint)
    mlflow = tracking.client(uri)
    kind = mlflow.get_run(run_id).data.tags.get("ray_kd.run_kind")
    names = tracking.role_names(kind)
    summary = summarize(history, wall, run_id, names)
    trial = kind == "sweep_trial"  # a sweep's trial is scored, not delivered: no model, plot or dataset input
    dataset = None if trial else tracking.log_dataset(mlflow, run_id, cfg.data, data)
    model_id = None
    if summary["best_role"] and not trial:
        role = summary["best_role"]
        best = run.role_state(checkpoint, role)["best"]
        if best["epoch"] != summary["headline"]["best_epoch"]:  # the session and the summary choose alike
            raise RuntimeError(f"{role}: saved weights from epoch {best['epoch']} but the history's best "
                               f"validation epoch is {summary['headline']['best_epoch']}")
        index = int(role.split("_")[1])
        arch = cfg.students[index].model
        path = run.best_student_file
        save_model_file(path, arch, data.num_classes, data.in_channels, best["state_dict"],
                        role=summary["best_student"], **summary["headline"], **shipped_meta(cfg, data, index))
        mlflow.log_artifact(run_id, str(path))
        student = load_student(path)
        summary["card"] = run_card(cfg, data, student, summary)
        model_name = re.sub(r"[/:.%\"']", "-", f"{summary['best_student']}-{arch}")  # MLflow's allowed characters
        model_id = _log_pytorch_model(uri, run_id, model_name, arch, student, data, summary, cfg)
        summary.update(best_student_file=str(path), best_student_model=arch, mlflow_model_id=model_id)
    tracking.log_final(mlflow, run_id, summary, model_id, dataset)
    students = ", ".join(s.model for s in cfg.students)
    title = f"{cfg.method.name}: {cfg.teacher.model + ' -> ' if cfg.teacher else ''}{students} on {cfg.data.dataset}, seed {cfg.seed}"
    chosen = (summary["best_role"], summary["headline"]["best_epoch"]) if summary["best_role"] else None
    if not trial:
        mlflow.log_artifact(run_id, str(plot_curves(history, run.plot_file, title, names, chosen)))
    path = run.write_summary(summary)
    if not trial:
        mlflow.log_artifact(run_id, str(path))
    card = summary["card"]["line"] if summary.get("card") else None
    if card:
        log_card(mlflow, run_id, summary["card"])
    description = tracking.describe(cfg, kind, summary)  # one line: the card follows the result on it
    mlflow.set_tag(run_id, "mlflow.note.content", f"{description}; {card}" if card else description)
    mlflow.set_terminated(run_id, "FINISHED")
    headline = headline_line(summary)
    if headline:
        print(headline + (f"\n{card}" if card else ""), flush=True)
    print(f"summary: {path}\n{tracking.ui_hint(uri, run_id)}", flush=True)
    return summary


def _log_pytorch_model(uri: str, run_id: str, name: str, arch: str, model, data, summary: dict,
                       cfg: RunConfig) -> str:
    """The best student as shipped (raw images in, `ray_kd.deliverable`) as an MLflow model named
    `<role>-<arch>`, an output of the run, so the UI shows it and `mlflow.pytorch.load_model` gets it;
    registered under `tracking.register_model` when set, with its alias and tags. Returns its id.

    The model is created first and logged outside any active run: logged inside one, MLflow would copy
    every run metric at the model's step (system metrics, the last epoch's curves) onto the model."""
    import logging

    import mlflow
    import mlflow.pytorch
    from mlflow.entities import LoggedModelOutput

    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # its warning on pickle: said in the README

    mlflow.set_tracking_uri(uri)
    client = tracking.client(uri)
    run = client.get_run(run_id)
    params = {**run.data.params, "architecture": arch, "num_classes": str(data.num_classes), "in_channels": str(data.in_channels), "input": model.describe()}
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, params=params)
    example = next(raw_eval_batches(data.val, data, batch_size=2))[0].numpy()
    with torch.no_grad():
        signature = mlflow.models.infer_signature(example, model(torch.from_numpy(example)).numpy())
    # Pickled (not torch.export's pt2): `mlflow.pytorch.load_model` gives back this nn.Module, `.eval()` and
    # its `transform()` included; its classes travel with it as code (`code_paths`).
    info = mlflow.pytorch.log_model(model, name=name, model_id=logged.model_id, input_example=example,
                                    signature=signature, serialization_format="pickle",
                                    code_paths=[str(Path(__file__).parent)],
                                    pip_requirements=["torch", "torchvision"] + (["timm"] if arch.startswith("timm:")
                                                                                 else []),
                                    registered_model_name=cfg.tracking.register_model)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=summary["epochs"])])
    if cfg.tracking.register_model:
        label_version(client, cfg, summary, info.registered_model_version)
    return logged.model_id

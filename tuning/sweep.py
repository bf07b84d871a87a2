"""The Tune driver: every trial is a full multi-worker distillation run, searched on validation only.

Each trial runs `ray_kd`'s own role group (one worker per role, its resources
placed as one group) inside a Tune function trainable, reporting each epoch's
metrics to Tune as its checkpoint lands; the searcher (Optuna TPE, random or
grid) and the ASHA scheduler read `best_student_val_acc`. MLflow gets a parent
run for the sweep and a nested child run per trial.

A sweep is a run like any other (see `ray_kd.run_folder`): its folder
`<output_dir>/<name>-sweep/` is locked while it runs, and holds a fingerprint (the
run spec's, the space, the epochs) that a resume must match. Ctrl-C or SIGTERM stops
it cleanly (Tune saves its state and stops the trials); the same command resumes the
trials that did not finish.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from ray_kd import run_folder, tracking
from ray_kd.config import ConfigError, RunConfig, apply_overrides, flatten, load_config, shown_config, shown_uri
from ray_kd.errors import UserError
from ray_kd.evaluation import OBJECTIVE, require_val_every_epoch
from ray_kd.replicas import world_size
from ray_kd.roles import all_roles
from ray_kd.run_storage import RunFolderError, RunStorage
from ray_kd.stopping import RunStopped, install_handlers, signal_of
from ray_kd.tracking import STOPPED_TAG
from tuning.outcome import SCORED, best_trial, figures, finished_status, reason, trial_figures, tune_verbosity
from tuning.space import SweepSpace, check_space, tune_domain

TRIAL_DRIVER_CPU = 0.01


class SweepError(UserError, RuntimeError):
    """Every trial of the sweep failed."""


def run_trial(params: dict, base: dict, sweep_dir: str, uri: str, parent_run_id: str) -> None:
    """One trial: the base run spec with this trial's values, a run (`ray_kd.run.train`) on the cluster's workers
    whose MLflow run is a child of the sweep's.

    Its last epoch goes to Tune only once the run is closed (summary, final metrics, FINISHED): the
    scheduler stops a trial as soon as it reports its last epoch, which would cut the closing short."""
    from ray import tune

    from ray_kd.run import train

    trial_id = tune.get_context().get_trial_id()
    tree = trial_spec(base, params)
    tree.update(name=f"{base['name']}-{trial_id}", output_dir=str(Path(sweep_dir) / "trials"))
    cfg = load_config(tree)  # a name the sweep chose: a trial is never moved to another folder

    def report_but_last(record: dict) -> None:
        if record["epoch"] < cfg.optim.epochs:
            tune.report(record)

    train(cfg, parent_run_id, "sweep_trial", on_epoch=report_but_last, show_progress=False, tracking_uri=uri)
    tune.report(RunStorage.of(cfg).checkpoints().latest_history()[-1])


def trial_spec(base: dict, params: dict) -> dict:
    """What a trial runs: the sweep's run spec (paths absolute) with the trial's values, typed (never through
    YAML strings), on the Ray executor (a trial is always a Ray run); best_config.yaml is the best one's."""
    tree = apply_overrides(copy.deepcopy(base), params)
    tree["runtime"]["executor"] = "ray"
    return tree


def sweep(cfg: RunConfig, space: SweepSpace, restart: bool = False) -> dict:
    """Run (or resume) the sweep named `<cfg.name>-sweep`; returns the best trial's row. `restart` discards
    an earlier sweep of that name (its trials, Tune state and results) first."""
    from ray_kd.preflight import check_address, cluster_address
    from ray_kd.ray_executor import check_fits, connect_checked, use_gpu

    require_val_every_epoch(cfg)
    tune_verbosity()  # a bad RAY_KD_TUNE_VERBOSE: one line before anything starts
    parent_cfg = cfg.model_copy(update={"name": f"{cfg.name}-sweep"})
    sweep_run = RunStorage.of(parent_cfg)
    if sweep_run.remote:
        raise ConfigError(f"config error: a sweep keeps its trials and Tune's state under output_dir, which must be a "
                          f"local path or file:// URI (on a cluster, a folder every node sees), not "
                          f"{shown_uri(cfg.output_dir)}; object stores are for `ray-kd train`")
    check_space(space, cfg.model_dump())
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    with sweep_run.hold_lock():
        if restart:
            sweep_run.clear()
        run_folder.check_store(sweep_run, uri)
        check_fingerprint(sweep_run, sweep_fingerprint(cfg, space))
        check_address(cluster_address(cfg))  # a dead cluster, or one refusing our token: one line
        connect_checked(cfg)
        if threading.current_thread() is threading.main_thread():
            install_handlers()  # after ray.init, which installs its own SIGTERM handler
        check_fits(cfg, use_gpu(cfg))
        parent_id = tracking.start_or_resume(parent_cfg, sweep_run, uri, kind="sweep")
        mlflow = tracking.client(uri)
        if mlflow.get_run(parent_id).info.status != "RUNNING":  # a resumed sweep shows as running while it runs
            mlflow.set_tag(parent_id, "mlflow.note.content", tracking.describe(parent_cfg, "sweep"))
            mlflow.update_run(parent_id, "RUNNING")
        return _search(cfg, space, sweep_run, uri, parent_id)


def sweep_fingerprint(cfg: RunConfig, space: SweepSpace) -> dict:
    """What a sweep computes: the run spec's fingerprint (seed included), the epochs (ASHA's horizon) and the
    whole space (searcher, samples, scheduler, params)."""
    return {**run_folder.fingerprint(cfg), "optim.epochs": cfg.optim.epochs,
            **json.loads(json.dumps(flatten({"space": space.model_dump()})))}


def check_fingerprint(sweep_run: RunStorage, now: dict) -> None:
    """Refuse to resume a started sweep (one with Tune state) made with another fingerprint: its trials and
    results belong to that one. A sweep not started yet takes the new one, as a new MLflow parent run."""
    from ray import tune

    name, folder = sweep_run.name, sweep_run.run_dir
    before = sweep_run.read_fingerprint(f"sweep {name}")
    if before is not None and not run_folder.changed_fields(before, now):
        return
    if tune.Tuner.can_restore(str(folder / "tune")):
        raise RunFolderError(f"sweep {name} in {folder} was made with another config, space or epochs: "
                             f"{_changes(before, now)}; to keep it, start this one under another "
                             "name=; to discard it and start over, add --restart")
    if sweep_run.forget_mlflow_run():
        print(f"sweep {name}: no trial of the earlier start, made with another config or space: starting over "
              "as a new MLflow run", flush=True)
    sweep_run.write_fingerprint(now)


def _changes(before: dict | None, now: dict) -> str:
    if before is None:
        return "it has no fingerprint (made by an earlier ray-kd)"
    return run_folder.describe_changes(before, now)


def _search(cfg: RunConfig, space: SweepSpace, sweep_run: RunStorage, uri: str, parent_id: str) -> dict:
    """Log the space, fit the sweep, then report it; stopped by a signal, record what finished and raise
    RunStopped. The parent run never stays RUNNING after the sweep is gone."""
    mlflow = tracking.client(uri)
    sweep_dir = sweep_run.run_dir
    try:
        mlflow.log_text(parent_id, yaml.safe_dump(space.model_dump(), sort_keys=False), "space.yaml")
        print(f"sweep {sweep_run.name}: folder {sweep_dir}, MLflow parent run {parent_id} in {shown_uri(uri)}", flush=True)
        with _stop_on_signal() as caught:
            if cfg.teacher is not None and cfg.teacher.cache is not None:
                _fill_teacher_cache(cfg)
            with _env("RAY_AIR_NEW_OUTPUT", "0" if tune_verbosity() == 0 else None):  # its engine at verbose 0
                _tuner(cfg, space, sweep_dir, uri, parent_id).fit()  # still prints a header and a table
        rows = _rows(cfg, space, sweep_dir)
        _close_children(mlflow, parent_id, {f"{cfg.name}-{r['trial_id']}": r for r in rows})
        if not caught:
            return _report(cfg, space, rows, sweep_dir, uri, parent_id)
        mlflow.log_artifact(parent_id, str(_write_table(rows, space, sweep_dir)))
        done = f"{sum(r['status'] in SCORED for r in rows)} of {space.trials} trials done"
        _end_note(mlflow, mlflow.get_run(parent_id), f"stopped with {done}; the same command resumes it")
        mlflow.set_terminated(parent_id, "KILLED")
        raise RunStopped(f"sweep {sweep_run.name} stopped with {done} (table {sweep_dir / 'results.csv'})",
                         caught[0])
    except KeyboardInterrupt as err:  # a second signal, or one outside Tune's loop: no saved state to report
        _close_children(mlflow, parent_id, {})
        _end_note(mlflow, mlflow.get_run(parent_id), "stopped; the same command resumes it")
        mlflow.set_terminated(parent_id, "KILLED")
        raise RunStopped(f"sweep {sweep_run.name} stopped", signal_of(err)) from None
    except RunStopped:
        raise
    except BaseException as err:
        _end_note(mlflow, mlflow.get_run(parent_id), f"failed: {reason(err)}")
        mlflow.set_terminated(parent_id, "FAILED")
        raise


def _fill_teacher_cache(cfg: RunConfig) -> None:
    """A frozen teacher's outputs for every step, computed once into `teacher.cache` before any trial starts (on one
    worker's resources), so that every trial reads them, however many run at once."""
    import ray

    from ray_kd.local_executor import fill_teacher_cache
    from ray_kd.ray_executor import use_gpu, worker_user_error

    task = ray.remote(num_cpus=cfg.runtime.cpus_per_worker, num_gpus=1 if use_gpu(cfg) else 0)(fill_teacher_cache)
    print(f"teacher.cache {shown_uri(cfg.teacher.cache)}: the teacher's outputs for every step, before the trials", flush=True)
    try:
        totals = ray.get(task.remote(cfg.with_absolute_paths(), None, False))
    except ray.exceptions.RayTaskError as err:
        own = worker_user_error(err)
        if own is not None:
            raise own from None
        raise
    print(f"teacher.cache: {totals['computed']} steps computed, {totals['read']} read", flush=True)


def _tuner(cfg: RunConfig, space: SweepSpace, sweep_dir: Path, uri: str, parent_id: str):
    """A new Tuner, or the one saved in the sweep folder (resuming the trials that did not finish)."""
    from ray import tune

    from tuning.trial_lines import TrialLines

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.with_absolute_paths().model_dump(), sweep_dir=str(sweep_dir), uri=uri,
                             parent_run_id=parent_id),
        {"CPU": TRIAL_DRIVER_CPU},  # the trial only drives its Train run; its workers hold the real resources
    )
    path = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(path)):
        print(f"resuming the sweep in {path}", flush=True)
        return tune.Tuner.restore(str(path), trainable, resume_errored=False)
    return tune.Tuner(trainable, param_space={k: tune_domain(p) for k, p in space.params.items()},
                      tune_config=_tune_config(cfg, space),
                      run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=tune_verbosity(),
                                                callbacks=[TrialLines(list(space.params), cfg.optim.epochs)],
                                                failure_config=tune.FailureConfig(max_failures=0)))


def trials_that_fit(cfg: RunConfig, cluster: dict[str, float], gpu: bool) -> int:
    """How many trials the cluster holds at once (at least 1): a trial is its run's workers (a worker per role and
    replica placed apart, a worker per replica placed together; `cpus_per_worker` each and a GPU each when the run
    uses GPUs) plus its Tune driver's sliver of a CPU."""
    workers = world_size(cfg, len(all_roles(cfg)))
    fits = math.floor(cluster.get("CPU", 1) / (workers * cfg.runtime.cpus_per_worker + TRIAL_DRIVER_CPU))
    if gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / workers))
    return max(1, fits)


def _tune_config(cfg: RunConfig, space: SweepSpace):
    """The searcher carries the concurrency limit: Tune applies `TuneConfig.max_concurrent_trials` to a Searcher
    (Optuna) but ignores it for a search algorithm such as the random and grid searchers' generator."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ray_kd.ray_executor import use_gpu

    concurrent = space.max_concurrent_trials or trials_that_fit(cfg, ray.cluster_resources(), use_gpu(cfg))
    if space.searcher == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=concurrent)
    else:
        from ray.tune.search import BasicVariantGenerator

        searcher = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=cfg.optim.epochs,
                               grace_period=space.scheduler.grace_period,
                               reduction_factor=space.scheduler.reduction_factor)
                 if space.scheduler.type == "asha" else FIFOScheduler())
    return tune.TuneConfig(metric=OBJECTIVE, mode="max", search_alg=searcher, scheduler=scheduler,
                           num_samples=space.num_samples)


@contextmanager
def _stop_on_signal() -> Iterator[list[int]]:
    """While `tuner.fit()` runs, Ctrl-C or SIGTERM ends it the way Tune ends it on Ctrl-C (the sweep's state
    saved, the trials stopped, fit() returning as if done), and the signal is kept, so the sweep says it was
    stopped. Tune's own SIGINT handler keeps nothing, so it is off, and both signals go to the stop handler
    Tune installs for SIGUSR1 while its loop runs; a second signal, or one outside that loop, goes to ray_kd's
    handlers (`ray_kd.stopping`, installed by `sweep`): it stops at once."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

    def on_signal(signum, frame):
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if caught or not callable(tune_stop):
            saved[signum](signum, frame)
            return
        caught.append(signum)
        tune_stop(signum, frame)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        with _env("TUNE_DISABLE_SIGINT_HANDLER", "1"):
            yield caught
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Environment variable `name` set to `value` (None: as it is) for the block, then as it was."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _rows(cfg: RunConfig, space: SweepSpace, sweep_dir: Path) -> list[dict]:
    """One row per trial, from the state Tune saved as its loop ended: fit() returns the trials as its
    clean-up left them, which marks the ones a stop cut short TERMINATED like those the scheduler stopped.
    Status: ok (every epoch), stopped early (by the scheduler), error, unfinished (the sweep was stopped)."""
    from ray.tune import ExperimentAnalysis, ResultGrid
    from ray.tune.experiment import Trial

    analysis = ExperimentAnalysis(str(sweep_dir / "tune"))
    rows = []
    for trial, result in zip(analysis.trials, ResultGrid(analysis)):
        row = {"trial_id": trial.trial_id, **{k: trial.config.get(k) for k in space.params}}
        frame = result.metrics_dataframe
        if frame is not None and OBJECTIVE in frame:
            row.update(trial_figures(frame.to_dict("records")))
        if trial.status == Trial.ERROR:
            row.update(status="error", reason=reason(result.error))
        elif trial.status != Trial.TERMINATED:
            row["status"] = "unfinished"
        else:
            row["status"] = finished_status(row.get("epochs", 0), cfg.optim.epochs)
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def _close_children(mlflow, parent_id: str, rows: dict[str, dict]) -> None:
    """Every trial's run ends with what happened to it (a finished trial closed its own): stopped early by the
    scheduler, failed, or cut short by a stop (`rows` by run name; a run without a row was cut short)."""
    parent = mlflow.get_run(parent_id)
    children = mlflow.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    for child in children:  # a trial's own failure marked it FAILED; one closed before has its reason tagged
        if child.info.status == "FINISHED" or STOPPED_TAG in child.data.tags:
            continue
        row = rows.get(child.data.tags.get("mlflow.runName"), {"status": "unfinished"})
        status, why = {
            "stopped early": ("KILLED", f"stopped early by the scheduler after epoch {row.get('epochs')}"),
            "error": ("FAILED", f"failed: {row.get('reason')}"),
        }.get(row["status"], ("KILLED", "the sweep was stopped before this trial finished; the same command "
                                        "resumes it"))
        mlflow.set_tag(child.info.run_id, STOPPED_TAG, why)
        _end_note(mlflow, child, why)
        mlflow.set_terminated(child.info.run_id, status)


def _end_note(mlflow, run, outcome: str) -> None:
    """The run's description with how it ended in place of "running"."""
    note = run.data.tags.get("mlflow.note.content", "").removesuffix("; running")
    mlflow.set_tag(run.info.run_id, "mlflow.note.content", f"{note}; {outcome}")


def _write_table(rows: list[dict], space: SweepSpace, sweep_dir: Path) -> Path:
    """results.csv: a row per trial, the best one (`tuning.outcome.best_trial`) marked."""
    columns = ["trial_id", *space.params, "status", "epochs", "best_epoch", "best_val_acc", "test_acc_at_best_val",
               "best"]
    best = best_trial(rows)
    table = sweep_dir / "results.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "best": "yes" if r is best else ""} for r in rows)
    return table


def _report(cfg: RunConfig, space: SweepSpace, rows: list[dict], sweep_dir: Path, uri: str, parent_id: str) -> dict:
    """results.csv, objective-vs-parameter plots, best_config.yaml (from the trials that ended: ok or stopped
    early); all on the parent run, which ends FINISHED."""
    mlflow = tracking.client(uri)
    table = _write_table(rows, space, sweep_dir)
    best = best_trial(rows)
    if best is None:
        raise SweepError(f"no trial of the sweep finished; see {table} and {sweep_dir / 'tune'} for their errors")
    scored = [r for r in rows if r["status"] in SCORED and "best_val_acc" in r]
    best_file = _write_best_config(cfg, space, best, sweep_dir)
    plot = _plot(scored, list(space.params), sweep_dir / "objective.png")

    for path in (table, best_file, plot):
        mlflow.log_artifact(parent_id, str(path))
    mlflow.log_metric(parent_id, "best_val_acc", best["best_val_acc"])
    mlflow.log_metric(parent_id, "test_acc_at_best_val", best["test_acc_at_best_val"])
    mlflow.set_tag(parent_id, "best_trial", str(best["trial_id"]))
    for k in space.params:
        mlflow.set_tag(parent_id, f"best.{k}", str(best[k]))
    _end_note(mlflow, mlflow.get_run(parent_id), f"best of {len(scored)} trials: {best['trial_id']}, {figures(best)}")
    mlflow.set_terminated(parent_id, "FINISHED")
    print(f"best trial {best['trial_id']} of {len(rows)}: {figures(best)}; config {best_file}; table {table}\n"
          f"{tracking.ui_hint(uri, parent_id)}", flush=True)
    return best


def _write_best_config(cfg: RunConfig, space: SweepSpace, best: dict, sweep_dir: Path) -> Path:
    """best_config.yaml: the best trial's own run spec (`trial_spec`), under the name `<name>-best` in the sweep's
    output_dir, headed by what it reproduces of the trial and what it cannot."""
    absolute = cfg.with_absolute_paths()  # no credentials in a file: shown_config strips them from every URI
    tree = trial_spec(shown_config(absolute), {k: best[k] for k in space.params})
    tree.update(name=f"{cfg.name}-best", output_dir=shown_uri(absolute.output_dir))
    threads = tree["runtime"]["threads_per_worker"]
    head = [f"The best trial of sweep {cfg.name}-sweep (results.csv marks it): {best['trial_id']}, {best['status']}, "
            f"{best['epochs']} of {cfg.optim.epochs} epochs, best student {figures(best)}.",
            f"`ray-kd train -c` this file repeats that trial's run: the same per-epoch validation numbers on the Ray "
            f"executor with runtime.threads_per_worker={threads}, as the trial ran (the same torch build and CPU kind)."]
    if best["status"] != "ok":
        head.append(f"The scheduler stopped that trial after epoch {best['epochs']}: this file trains all "
                    f"{cfg.optim.epochs} epochs, and its first {best['epochs']} are the trial's.")
    path = sweep_dir / "best_config.yaml"
    path.write_text("".join(f"# {line}\n" for line in head) + yaml.safe_dump(tree, sort_keys=False))
    return path


def _plot(rows: list[dict], params: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False)
    for ax, param in zip(axes[0], params):
        ax.scatter([r[param] for r in rows], [r["best_val_acc"] for r in rows])
        ax.set_xlabel(param)
        ax.set_ylabel("best student val top-1 (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

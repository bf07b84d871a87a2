"""The Tune driver: every trial is a full multi-worker distillation run, searched on validation only.

Each trial runs `ray_kd`'s own role group (one worker per role, its resources
placed as one group) inside a Tune function trainable, reporting each epoch's
metrics to Tune as its checkpoint lands; the searcher (Optuna TPE, random or
grid) and the ASHA scheduler read `best_student_val_acc`. MLflow gets a parent
run for the sweep and a nested child run per trial. Re-running the same command
resumes an interrupted sweep.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import yaml

from ray_kd import tracking
from ray_kd.checkpoint import read_history
from ray_kd.config import RunConfig, apply_overrides, validate_config
from ray_kd.evaluation import require_val_every_epoch
from ray_kd.results import summarize, write_summary
from ray_kd.session import OBJECTIVE, all_roles
from tuning.space import SweepSpace, check_space, tune_domain

TEST_METRIC = "best_student_test_acc"
TRIAL_DRIVER_CPU = 0.01


def run_trial(params: dict, base: dict, sweep_dir: str, uri: str, parent_run_id: str) -> None:
    """One trial: the base run spec with this trial's values, trained on the cluster, logged as a child run."""
    import time

    from ray import tune

    from ray_kd.ray_executor import run_on_ray

    trial_id = tune.get_context().get_trial_id()
    tree = apply_overrides(copy.deepcopy(base), params)  # typed values, never through YAML strings
    tree.update(name=f"{base['name']}-{trial_id}", output_dir=str(Path(sweep_dir) / "trials"))
    cfg = validate_config(tree)
    run_id = tracking.start_or_resume(cfg, uri, parent_run_id, kind="sweep_trial")
    start = time.perf_counter()
    last = run_on_ray(cfg, uri, run_id, on_epoch=tune.report, show_progress=False)
    history = read_history(last)
    summary = summarize(history, time.perf_counter() - start, run_id)
    write_summary(summary, cfg.run_dir)
    mlflow = tracking.client(uri)
    tracking.log_final(mlflow, run_id, summary, None, None)
    mlflow.set_tag(run_id, "mlflow.note.content", tracking.describe(cfg, "sweep_trial", summary))
    mlflow.set_terminated(run_id, "FINISHED")


def sweep(cfg: RunConfig, space: SweepSpace) -> dict:
    """Run (or resume) the sweep named `<cfg.name>-sweep`; returns the best trial's row."""
    from ray import tune

    from ray_kd.ray_executor import check_fits, connect, use_gpu

    require_val_every_epoch(cfg)
    check_space(space, cfg.model_dump())
    name = f"{cfg.name}-sweep"
    parent_cfg = cfg.model_copy(update={"name": name})
    sweep_dir = parent_cfg.run_dir
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    connect(cfg)
    check_fits(cfg, use_gpu(cfg))
    parent_id = tracking.start_or_resume(parent_cfg, uri, kind="sweep")
    tracking.client(uri).log_text(parent_id, yaml.safe_dump(space.model_dump(), sort_keys=False), "space.yaml")
    print(f"sweep {name}: folder {sweep_dir}, MLflow parent run {parent_id} in {uri}", flush=True)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.with_absolute_paths().model_dump(), sweep_dir=str(sweep_dir), uri=uri,
                             parent_run_id=parent_id),
        {"CPU": TRIAL_DRIVER_CPU},  # the trial only drives its Train run; its workers hold the real resources
    )
    path = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(path)):
        print(f"resuming the sweep in {path}", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=False)
    else:
        tuner = tune.Tuner(trainable, param_space={k: tune_domain(p) for k, p in space.params.items()},
                           tune_config=_tune_config(cfg, space),
                           run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=1,
                                                     failure_config=tune.FailureConfig(max_failures=0)))
    try:
        results = tuner.fit()
        return _report(cfg, space, results, sweep_dir, uri, parent_id)
    except BaseException as err:  # the parent run never stays RUNNING after the sweep is gone
        tracking.client(uri).set_terminated(parent_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise


def _tune_config(cfg: RunConfig, space: SweepSpace):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    per_trial = len(all_roles(cfg)) * cfg.runtime.cpus_per_worker + TRIAL_DRIVER_CPU
    concurrent = space.max_concurrent_trials or max(1, math.floor(ray.cluster_resources().get("CPU", 1) / per_trial))
    if space.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=cfg.seed)
    else:
        from ray.tune.search import BasicVariantGenerator

        searcher = BasicVariantGenerator(random_state=cfg.seed)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=cfg.optim.epochs,
                               grace_period=space.scheduler.grace_period,
                               reduction_factor=space.scheduler.reduction_factor)
                 if space.scheduler.type == "asha" else FIFOScheduler())
    return tune.TuneConfig(metric=OBJECTIVE, mode="max", search_alg=searcher, scheduler=scheduler,
                           num_samples=space.num_samples, max_concurrent_trials=concurrent)


def _report(cfg: RunConfig, space: SweepSpace, results, sweep_dir: Path, uri: str, parent_id: str) -> dict:
    """results.csv, objective-vs-parameter plots, best_config.yaml; all on the parent run."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        row = {"trial_id": result.metrics.get("trial_id") if result.metrics else None,
               **{k: result.config.get(k) for k in space.params}, "status": "error" if result.error else "ok"}
        if frame is not None and OBJECTIVE in frame:
            best = frame.loc[frame[OBJECTIVE].idxmax()]
            row.update(epochs=len(frame), best_val_acc=float(best[OBJECTIVE]), test_acc_at_best_val=float(best[TEST_METRIC]))
            if not result.error and len(frame) < cfg.optim.epochs:
                row["status"] = "stopped early"
        rows.append(row)
    scored = [r for r in rows if "best_val_acc" in r]
    if not scored:
        raise RuntimeError(f"every trial of the sweep failed; see {sweep_dir / 'tune'} for their errors")
    best = max(scored, key=lambda r: r["best_val_acc"])
    columns = ["trial_id", *space.params, "status", "epochs", "best_val_acc", "test_acc_at_best_val"]
    table = sweep_dir / "results.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    best_tree = apply_overrides(cfg.model_dump(), {k: best[k] for k in space.params})
    best_tree["name"] = f"{cfg.name}-best"
    best_file = sweep_dir / "best_config.yaml"
    best_file.write_text(yaml.safe_dump(best_tree, sort_keys=False))
    plot = _plot(scored, list(space.params), sweep_dir / "objective.png")

    mlflow = tracking.client(uri)
    for path in (table, best_file, plot):
        mlflow.log_artifact(parent_id, str(path))
    mlflow.log_metric(parent_id, "best_val_acc", best["best_val_acc"])
    mlflow.log_metric(parent_id, "test_acc_at_best_val", best["test_acc_at_best_val"])
    mlflow.set_tag(parent_id, "best_trial", str(best["trial_id"]))
    for k in space.params:
        mlflow.set_tag(parent_id, f"best.{k}", str(best[k]))
    _close_children(mlflow, parent_id)
    mlflow.set_terminated(parent_id, "FINISHED")
    print(f"best trial {best['trial_id']}: val {best['best_val_acc']:.2f} (test {best['test_acc_at_best_val']:.2f}); "
          f"config {best_file}; table {table}", flush=True)
    return best


def _close_children(mlflow, parent_id: str) -> None:
    """Trials the scheduler stopped never finished their run: mark them KILLED, not RUNNING forever."""
    parent = mlflow.get_run(parent_id)
    children = mlflow.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    for child in children:
        if child.info.status == "RUNNING":
            mlflow.set_tag(child.info.run_id, "ray_kd.stopped", "early (scheduler) or failed")
            mlflow.set_terminated(child.info.run_id, "KILLED")


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

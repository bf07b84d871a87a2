"""The multi-seed report (`ray-kd report`, `ray_kd.report`): accuracy over seeds, and the gain over the student alone.

Finished baseline and distillation runs of an experiment are grouped by method,
teacher, student, dataset and protocol (the config less what does not change
what a run measures: its seed, name, output folder, runtime and tracking; see
`tracking.protocol_hash`). Per group: mean ± std over seeds of the test top-1
at the best-validation epoch and at the last epoch, and the *paired* difference
against the student-alone (`ce`) group of the same student, dataset and
protocol less method and teacher, matched seed by seed (the seed fixes the
data order and the student's initialisation, so pairing removes most of the
seed-to-seed spread). A seed run twice counts once: its latest run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from ray_kd import tracking
from ray_kd.errors import UserError
from ray_kd.preflight import check_writable

GROUP = ["method", "teacher", "student", "dataset", "protocol"]
SCORES = ["test_acc_at_best_val", "last_test_acc"]
BASELINE = "ce"


class ReportError(UserError, ValueError):
    """Nothing to report: no such experiment, or no finished runs in it."""


def report(experiment: str = "ray-kd", out_dir: str | Path = "runs/report", tracking_uri: str | None = None,
           log_to_mlflow: bool = True) -> dict:
    """Write report.csv, report.md and report.png into `out_dir` and log them to a `report` run of the
    experiment; returns {'rows': [...], 'files': {...}, 'mlflow_run_id': ...}."""
    check_writable(out_dir, "--out")  # before the store is read: a report that cannot be written is not made
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)
    mlflow = tracking.client(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"no MLflow experiment {experiment!r} in {uri}; run `ray-kd train` first, or name "
                          "the experiment with --experiment (and the store with --tracking-uri)")
    runs = collect(mlflow, found.experiment_id)
    if runs.empty:
        raise ReportError(f"experiment {experiment!r} in {uri} has no finished baseline or distillation runs "
                          "to report on")
    table = aggregate(runs)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "report.csv", "md": out / "report.md", "png": out / "report.png"}
    table.to_csv(files["csv"], index=False, float_format="%.4f")
    markdown = to_markdown(table, experiment)
    files["md"].write_text(markdown)
    plot(table, files["png"])
    run_id = _log(mlflow, found.experiment_id, files, markdown, table, len(runs)) if log_to_mlflow else None
    print(markdown + f"\nfiles: {out}/report.{{md,csv,png}}" +
          (f"\n{tracking.ui_hint(uri, run_id)}" if run_id else ""), flush=True)
    return {"rows": table.to_dict("records"), "files": {k: str(v) for k, v in files.items()}, "mlflow_run_id": run_id}


def collect(mlflow, experiment_id: str):
    """One row per finished baseline/distillation run: its group, seed, pairing key and final metrics."""
    import pandas as pd

    rows, token = [], None
    while True:
        page = mlflow.search_runs([experiment_id], "attributes.status = 'FINISHED'", max_results=1000,
                                  page_token=token)
        for run in page:
            tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
            if tags.get("ray_kd.run_kind") not in ("baseline", "distillation") or not all(m in metrics for m in SCORES):
                continue
            rows.append({
                "run_id": run.info.run_id, "run_name": run.info.run_name, "start_time": run.info.start_time,
                "method": tags["ray_kd.method"], "teacher": tags["ray_kd.teacher"], "student": tags["ray_kd.student"],
                "dataset": tags["ray_kd.dataset"], "protocol": tracking.protocol_hash(params),
                "alone_protocol": tracking.protocol_hash(params, drop=("method.", "teacher", "students.")),
                "seed": int(tags["ray_kd.seed"]), **{m: metrics[m] for m in SCORES}})
        token = page.token
        if not token:
            break
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values("start_time").drop_duplicates(GROUP + ["seed"], keep="last")


def aggregate(runs):
    """Per group: n, seeds, mean and std of each score; for a method other than the baseline, the paired
    difference of test_acc_at_best_val against the student-alone group (mean, std, number of pairs)."""
    import pandas as pd

    rows = []
    for key, group in runs.groupby(GROUP, sort=True):
        row = dict(zip(GROUP, key), n=len(group), seeds=" ".join(str(s) for s in sorted(group["seed"])))
        for score in SCORES:
            row[f"{score}_mean"] = group[score].mean()
            row[f"{score}_std"] = group[score].std(ddof=1) if len(group) > 1 else math.nan
        alone = runs[(runs["method"] == BASELINE) & (runs["student"] == row["student"]) &
                     (runs["dataset"] == row["dataset"]) & (runs["alone_protocol"] == group["alone_protocol"].iloc[0])]
        pairs = group.merge(alone, on="seed", suffixes=("", "_alone")) if row["method"] != BASELINE else alone.iloc[:0]
        diff = pairs["test_acc_at_best_val"] - pairs["test_acc_at_best_val_alone"] if len(pairs) else pd.Series([])
        row.update(gain_vs_alone_mean=diff.mean() if len(diff) else math.nan,
                   gain_vs_alone_std=diff.std(ddof=1) if len(diff) > 1 else math.nan, gain_vs_alone_n=len(diff))
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(mean: float, std: float, sign: bool = False) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean:+.2f}" if sign else f"{mean:.2f}"
    return text if math.isnan(std) else f"{text} ± {std:.2f}"


def to_markdown(table, experiment: str) -> str:
    lines = [f"### ray-kd report: experiment `{experiment}`", "",
             "Test top-1 (%) of the best student, mean ± std over seeds; gain = paired difference vs the student "
             "alone (`ce`) on the same seeds.", "",
             "| method | teacher | student | dataset | protocol | n | seeds | test @ best val | last-epoch test | gain vs alone (pairs) |",
             "| --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for r in table.to_dict("records"):
        gain = (f"{_pm(r['gain_vs_alone_mean'], r['gain_vs_alone_std'], sign=True)} ({r['gain_vs_alone_n']})"
                if r["gain_vs_alone_n"] else "–")
        lines.append(f"| {r['method']} | {r['teacher']} | {r['student']} | {r['dataset']} | `{r['protocol']}` | {r['n']} "
                     f"| {r['seeds']} | {_pm(r['test_acc_at_best_val_mean'], r['test_acc_at_best_val_std'])} "
                     f"| {_pm(r['last_test_acc_mean'], r['last_test_acc_std'])} | {gain} |")
    return "\n".join(lines) + "\n"


def plot(table, path: Path) -> Path:
    """report.png: the `figure`."""
    import matplotlib.pyplot as plt

    fig = figure(table)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure(table):
    """Left: each group's test top-1 at best val (mean ± std), right: its paired gain over the student alone; points
    with error bars on axes that span the data (bars from 0 would make groups a point apart look alike)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_dict("records")
    labels = [f"{r['method']}  {r['teacher'] + '→' if r['teacher'] != 'none' else ''}{r['student']}, {r['dataset']} "
              f"[{r['protocol'][:6]}] n={r['n']}" for r in rows]
    y = list(range(len(rows)))
    fig, (acc, gain) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * len(rows)), sharey=True,
                                    gridspec_kw={"width_ratios": [3, 2]})
    acc.errorbar([r["test_acc_at_best_val_mean"] for r in rows], y, fmt="o", color="C0", capsize=3,
                 xerr=[0 if math.isnan(r["test_acc_at_best_val_std"]) else r["test_acc_at_best_val_std"] for r in rows])
    acc.set(yticks=y, yticklabels=labels, xlabel="test top-1 at best val (%)", title="accuracy, mean ± std over seeds")
    acc.set_ylim(len(rows) - 0.5, -0.5)  # the first group on top
    paired = [r for r in rows if r["gain_vs_alone_n"]]
    gain.errorbar([r["gain_vs_alone_mean"] for r in paired], [y[rows.index(r)] for r in paired], fmt="o",
                  color="C2", capsize=3,
                  xerr=[0 if math.isnan(r["gain_vs_alone_std"]) else r["gain_vs_alone_std"] for r in paired])
    gain.axvline(0, color="k", linewidth=0.8)  # the student alone: the reference a gain is read against
    gain.set(xlabel="gain vs student alone (points, paired)", title="paired gain over the student alone")
    for ax in (acc, gain):
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _log(mlflow, experiment_id: str, files: dict[str, Path], markdown: str, table, n_runs: int) -> str:
    """A `report` run holding the three files, with the table as its description and its figures as
    metrics (`<method>/<teacher-to-student>.<dataset>.<protocol>/<figure>`, one chart section per method)."""
    from mlflow.entities import Metric
    from mlflow.tracking.context.registry import resolve_tags

    tags = {**resolve_tags(), **tracking.git_state(), "ray_kd.run_kind": "report", "mlflow.note.content": markdown,
            "ray_kd.report_runs": str(n_runs)}
    now, metrics = int(time.time() * 1000), []
    for r in table.to_dict("records"):
        pair = f"{r['teacher']}-to-{r['student']}" if r["teacher"] != "none" else r["student"]
        prefix = f"{r['method']}/{pair}.{r['dataset']}.{r['protocol'][:6]}"
        for figure in ("test_acc_at_best_val_mean", "test_acc_at_best_val_std", "last_test_acc_mean",
                       "gain_vs_alone_mean", "gain_vs_alone_std"):
            if not math.isnan(r[figure]):
                metrics.append(Metric(tracking.metric_key(f"{prefix}/{figure}"), float(r[figure]), now, 0))
    run_id = mlflow.create_run(experiment_id, run_name="report", tags=tags).info.run_id
    try:
        for path in files.values():
            mlflow.log_artifact(run_id, str(path))
        for i in range(0, len(metrics), 200):
            mlflow.log_batch(run_id, metrics=metrics[i:i + 200])
    except BaseException:  # never left RUNNING
        mlflow.set_terminated(run_id, "FAILED")
        raise
    mlflow.set_terminated(run_id, "FINISHED")
    return run_id

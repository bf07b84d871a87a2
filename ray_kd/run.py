"""The driver of one distillation run: check MLflow, train on an executor, record the results."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ray_kd.checkpoint import load_model_file, safe_load, save_model_file
from ray_kd.config import ConfigError, RunConfig
from ray_kd.data import load_dataset
from ray_kd.recipe import preflight_amp
from ray_kd.session import all_roles
from ray_kd.results import plot_curves, summarize, write_summary
from ray_kd import tracking


def train(cfg: RunConfig, parent_run_id: str | None = None) -> dict:
    """Run (or resume) `cfg` end to end; returns the summary written to `<run_dir>/summary.json`."""
    preflight(cfg)
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    run_id = tracking.start_or_resume(cfg, uri, parent_run_id)
    print(f"run {cfg.name}: folder {cfg.run_dir}, MLflow run {run_id} in {uri}", flush=True)
    start = time.perf_counter()
    try:
        if cfg.runtime.executor == "local":
            from ray_kd.local_executor import run_local

            last = run_local(cfg, tracking.MetricSync(uri, run_id))
        else:
            from ray_kd.ray_executor import run_on_ray

            last = run_on_ray(cfg, uri, run_id)
    except BaseException:  # Ctrl-C included: the run shows as failed until a resume finishes it
        tracking.client(uri).set_terminated(run_id, "FAILED")
        raise
    return finish(cfg, last, uri, run_id, time.perf_counter() - start)


def preflight(cfg: RunConfig) -> None:
    """Fail in seconds, before any worker starts: the data must load and every checkpoint must fit it."""
    preflight_amp(cfg)
    data = load_dataset(cfg.data)
    method, roles = cfg.method.build(), all_roles(cfg)
    try:
        method.check_roles(roles, data.num_classes, data.in_channels)
    except ValueError as err:
        raise ConfigError(f"config error: {err}") from None
    for role in roles:
        if role.checkpoint is not None:
            load_model_file(role.checkpoint, role.model, data.num_classes, method.input_channels(role, data.in_channels))


def train_teacher(cfg: RunConfig, out: Path) -> dict:
    """Train `cfg.students[0]` alone with cross-entropy and save its best weights as a teacher file;
    returns the run's summary, with the file's path as `teacher_file`."""
    summary = train(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(summary["best_student_file"], out)
    print(f"teacher: {out} (val top-1 {summary['roles']['student_0']['best_val_acc']:.2f})", flush=True)
    return {**summary, "teacher_file": str(out)}


def finish(cfg: RunConfig, checkpoint: Path, uri: str, run_id: str, wall: float) -> dict:
    """summary.json, the curve plot, the best student's weights; all logged to the MLflow run."""
    history = json.loads((checkpoint / "history.json").read_text())
    summary = summarize(history, wall, run_id)
    mlflow = tracking.client(uri)
    run_dir = cfg.run_dir
    plot = plot_curves(history, run_dir / "accuracy.png")
    mlflow.log_artifact(run_id, str(plot))
    if summary["best_student"]:
        role = summary["best_student"]
        best = safe_load(checkpoint / f"{role}.pt")["best"]
        k = int(role.split("_")[1])
        data = load_dataset(cfg.data)
        path = run_dir / "best_student.pt"
        save_model_file(path, cfg.students[k].model, data.num_classes, data.in_channels, best["state_dict"])
        mlflow.log_artifact(run_id, str(path))
        _log_pytorch_model(uri, run_id, cfg.students[k].model, data, best["state_dict"])
        summary["best_student_file"] = str(path)
    path = write_summary(summary, run_dir)
    mlflow.log_artifact(run_id, str(path))
    mlflow.set_terminated(run_id, "FINISHED")
    print(f"summary: {path}\nbrowse the runs: mlflow ui --backend-store-uri {uri} --host 127.0.0.1", flush=True)
    return summary


class LogitsOnly(torch.nn.Module):
    """The served form of a student: images in, logits out (the stage features stay internal)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def _log_pytorch_model(uri: str, run_id: str, model_name: str, data, state_dict: dict) -> None:
    """The best student as an MLflow model, so the UI shows it and `mlflow.pytorch.load_model` gets it."""
    import mlflow
    import mlflow.pytorch

    from ray_kd.models import create_model

    model = create_model(model_name, data.num_classes, data.in_channels)
    model.load_state_dict(state_dict)
    model = LogitsOnly(model)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        example = data.normalize(data.val.images[:2])
        with torch.no_grad():
            signature = mlflow.models.infer_signature(example.numpy(), model.eval()(example).numpy())
        mlflow.pytorch.log_model(model, name="best_student", input_example=example, signature=signature,
                                 pip_requirements=["torch", "torchvision"])

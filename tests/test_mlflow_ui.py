"""The MLflow review in a real browser: benchmarks/mlflow_ui_check.py against a fresh store (a KD run and a
3-trial sweep), `mlflow ui` on loopback and headless Chromium. Needs chromium and chromedriver (.ci/run installs
Debian's)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import mlflow_ui_check  # noqa: E402


def test_the_printed_links_open_the_runs_in_the_model_training_view(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # the check sets its own store; restored after the test
    assert mlflow_ui_check.main(["--out", str(tmp_path), "--screenshots", str(tmp_path / "shots")]) == 0
    checked = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ok: ")]
    assert len(checked) == 4, checked  # GenAI without the parameter; run page; its charts; sweep parent
    assert "Model metrics: sections ['student_0', 'student_0/final'" in checked[2], checked[2]
    for name in ("mlflow-run.png", "mlflow-sweep.png", "mlflow-run-charts.png"):
        assert (tmp_path / "shots" / name).stat().st_size > 10_000

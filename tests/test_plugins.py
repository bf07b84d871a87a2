"""Methods, models and data sources from outside the package: a plugin installed for real (entry points) runs on Ray
and in a sweep, a `package.module:Class` method runs, a broken plugin is one line; the Python API end to end."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ray_kd
from ray_kd.config import ConfigError, load_config
from ray_kd.methods.registry import method_class
from ray_kd.plugins import PluginError
from tuning.space import SweepSpace

PLUGIN = Path(__file__).parent / "plugin_example"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """pip-installs tests/plugin_example (a copy, so no build files land in the repo) for this module's tests."""
    source = tmp_path_factory.mktemp("plugin") / "src"
    shutil.copytree(PLUGIN, source)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", str(source)]
    subprocess.run(pip, check=True)
    yield "ray-kd-example-plugin"
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "ray-kd-example-plugin"], check=True)


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ray_kd.cli", *args], capture_output=True, text=True, env=env)


def test_plugins_are_listed_with_their_origin(installed_plugin):
    methods, models, datasets = cli("methods"), cli("models"), cli("datasets")
    assert methods.returncode == 0 and models.returncode == 0 and datasets.returncode == 0
    line = next(line for line in methods.stdout.splitlines() if line.startswith("warmup_kd"))
    assert f"plugin {installed_plugin}" in line and "Warm-up KD" in line
    assert any(line.startswith("kd ") and "built-in" in line for line in methods.stdout.splitlines())
    assert any(line.startswith("digits_mlp") and installed_plugin in line for line in models.stdout.splitlines())
    assert ray_kd.list_models("digits_*") == ["digits_cnn_l", "digits_cnn_s", "digits_mlp"]
    line = next(line for line in datasets.stdout.splitlines() if line.startswith("inverted_digits"))
    assert f"plugin {installed_plugin}" in line and "dark on light" in line
    assert any(line.startswith("cifar10 ") and "built-in" in line for line in datasets.stdout.splitlines())


def test_plugin_method_model_and_data_run_on_ray_through_the_api(ray_cluster, installed_plugin, digits_teacher,
                                                                 mlflow_uri, tmp_path):
    import mlflow

    summary = ray_kd.train(None, {
        "name": "plugin", "output_dir": str(tmp_path), "method": {"name": "warmup_kd", "warmup_epochs": 2},
        "teacher": {"model": "digits_cnn_l", "checkpoint": digits_teacher}, "students": [{"model": "digits_mlp"}],
        "data.dataset": "inverted_digits", "optim.epochs": 2, "optim.steps_per_epoch": 3})
    assert summary["epochs"] == 2 and summary["best_student"] == "student_0"
    history = json.loads(next((tmp_path / "plugin" / "checkpoints").rglob("history.json")).read_text())
    assert all(entry["student_0/loss_kd"] > 0 for entry in history)
    run = mlflow.get_run(summary["mlflow_run_id"])
    (dataset,) = run.inputs.dataset_inputs  # the source's own identity, recorded as the run's dataset input
    assert dataset.dataset.name == "inverted_digits"
    assert json.loads(dataset.dataset.source) == {"uri": "sklearn digits, inverted"}


def test_plugin_method_in_a_sweep(ray_cluster, installed_plugin, digits_teacher, mlflow_uri, tmp_path):
    space = SweepSpace.model_validate({"searcher": "grid", "num_samples": 1, "scheduler": {"type": "none"},
                                       "params": {"method.warmup_epochs": {"type": "grid", "values": [3]}}})
    best = ray_kd.tune("configs/digits_kd.yaml", space, {
        "method": {"name": "warmup_kd"}, "teacher.checkpoint": digits_teacher, "output_dir": str(tmp_path),
        "name": "plug", "optim.epochs": 1, "optim.steps_per_epoch": 2})
    assert best["status"] == "ok" and best["method.warmup_epochs"] == 3
    assert load_config(tmp_path / "plug-sweep" / "best_config.yaml").method.name == "warmup_kd"


def test_a_method_named_by_its_import_path_runs(installed_plugin, digits_teacher, mlflow_uri, tmp_path):
    summary = ray_kd.train("configs/digits_kd.yaml", [
        "method={name: 'ray_kd_example_plugin:WarmupKD'}", f"teacher.checkpoint={digits_teacher}",
        "runtime.executor=local", f"output_dir={tmp_path}", "name=by-path", "optim.epochs=1", "optim.steps_per_epoch=2"])
    assert summary["epochs"] == 1
    assert method_class("ray_kd_example_plugin:WarmupKD+skd").name == "warmup_kd+skd"  # wrappers compose over it


def test_a_broken_plugin_is_one_line(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ray_kd.methods]\nbroken = not_a_module_anywhere:Method\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="method plugin 'broken' .*broken-plugin.* failed to import: "
                                          "ModuleNotFoundError"):
        method_class("no_such_method")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    result = cli("train", "method.name=no_such_method", env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "failed to import" in result.stderr
    with pytest.raises(PluginError, match="cannot be imported"):
        load_config(None, ["method.name=not_a_module_anywhere:Thing"])


def test_overrides_keep_their_types():
    """A dict of overrides (the API's, and every sweep trial's) sets typed values: "1.0" stays a string."""
    assert load_config(None, {"tracking.experiment": "1.0"}).tracking.experiment == "1.0"
    with pytest.raises(ConfigError, match="tracking.experiment"):
        load_config(None, ["tracking.experiment=1.0"])  # as a YAML scalar it is a float


def test_the_readme_api_examples_use_the_api():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [part.split("```", 1)[0] for part in readme.split("```python")[1:]]  # Python API's, and Sweeps'
    for block in blocks:
        compile(block, "README", "exec")
    used = {word.split("(")[0].removeprefix("ray_kd.") for block in blocks for word in block.split()
            if word.startswith("ray_kd.")}
    assert {"train", "train_teacher", "tune", "load_config"} <= used
    assert all(hasattr(ray_kd, name) for name in used), used


@pytest.mark.parametrize("page, count", [("adding-a-method.md", 3), ("adding-a-data-source.md", 1)])
def test_the_guide_shows_the_tested_plugin_code(page, count):
    guide = (Path(__file__).parents[1] / "docs" / page).read_text()
    plugin = (PLUGIN / "ray_kd_example_plugin" / "__init__.py").read_text()
    blocks = [part.split("```", 1)[0] for part in guide.split("```python")[1:]]
    assert len(blocks) == count and all(textwrap.dedent(b).strip() in plugin for b in blocks)

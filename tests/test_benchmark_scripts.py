"""The benchmark scripts still import and build their runs' configs: nothing else runs them between sessions
(sweeps.py once imported a quality.py helper that had been removed, and no test noticed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import importlib, pathlib, sys
sys.path.insert(0, 'benchmarks')
for script in sorted(pathlib.Path('benchmarks').glob('*.py')):
    importlib.import_module(script.stem)
import quality, sweeps
from ray_kd.config import load_config
for dataset, methods in sweeps.TUNED.items():
    for method in methods:
        config, overrides = quality.run_args(dataset, method, 0, runtime=sweeps.SWEEP_RUNTIME, name='sweep',
                                             output_dir=pathlib.Path('unused'))
        cfg = load_config(config, overrides)
        assert cfg.runtime.executor == 'ray' and cfg.name == 'sweep', (dataset, method)
        assert cfg.method.name == method, (dataset, method, cfg.method.name)
        if method in ('kd', 'lwkd') and dataset in quality.PINNED:  # the committed teacher files
            assert pathlib.Path(cfg.teacher.checkpoint).is_file(), cfg.teacher.checkpoint
    for method in quality.variants(dataset):
        load_config(*quality.run_args(dataset, method, 0))
print('checked')
"""


def test_benchmark_scripts_import_and_build_their_configs():
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("checked")

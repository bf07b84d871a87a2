"""ray-kd: distributed online knowledge distillation on Ray.

The public API (imported on first use, so `import ray_kd` stays light):
- runs: `train`, `train_teacher`, `cache_teacher`, `tune`, `load_config` (see `ray_kd.api`); `report` (ray_kd.reporting);
- the shipped student: `load_student` (ray_kd.deliverable: raw images in), `export` (ray_kd.export: ONNX,
  TorchScript, pt2);
- extension points: `Method`, `MethodParams`, `RoleModule`, `FrozenTeacher`, `Role`, `Step`,
  `register_method`, `register_wrapper`, `list_methods`; `register_model`, `create_model`,
  `list_models`, `StagedNet` (see docs/adding-a-method.md); `DataSource`, `Split`, `DataError`,
  `register_dataset`, `list_datasets` (see docs/adding-a-data-source.md).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "train": "ray_kd.api", "train_teacher": "ray_kd.api", "cache_teacher": "ray_kd.api", "tune": "ray_kd.api",
    "load_config": "ray_kd.api",
    "report": "ray_kd.reporting", "load_student": "ray_kd.deliverable", "export": "ray_kd.export", "RunConfig": "ray_kd.config",
    "Method": "ray_kd.methods", "MethodParams": "ray_kd.methods", "RoleModule": "ray_kd.methods",
    "FrozenTeacher": "ray_kd.methods", "Role": "ray_kd.methods", "Step": "ray_kd.methods",
    "register_method": "ray_kd.methods", "register_wrapper": "ray_kd.methods", "list_methods": "ray_kd.methods",
    "register_model": "ray_kd.models", "create_model": "ray_kd.models", "list_models": "ray_kd.models",
    "StagedNet": "ray_kd.models",
    "DataSource": "ray_kd.data_sources", "Split": "ray_kd.data_sources", "register_dataset": "ray_kd.data_sources",
    "list_datasets": "ray_kd.data_sources", "DataError": "ray_kd.data_sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ray_kd' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

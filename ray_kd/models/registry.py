"""A timm-style registry: `@register_model` on a builder, `create_model(name, ...)` to build, `list_models('resnet*')`.

An installed package adds models through the entry-point group `ray_kd.models`:
each entry names a builder `(num_classes, in_channels) -> StagedNet`, registered
under the entry's name the first time a name is not found (in the driver and in
every Ray worker alike).
"""

from __future__ import annotations

import fnmatch
from typing import Callable

from ray_kd.models.base import StagedNet
from ray_kd.plugins import load_entry_points
from ray_kd.models.external import build_external, is_external

ENTRY_POINT_GROUP = "ray_kd.models"
_BUILDERS: dict[str, Callable[..., StagedNet]] = {}
_ORIGINS: dict[str, str] = {}


def register_model(builder: Callable[..., StagedNet], name: str | None = None,
                   origin: str | None = None) -> Callable[..., StagedNet]:
    """Register `builder(num_classes, in_channels) -> StagedNet` under `name` (default: its function name)."""
    name = name or builder.__name__
    if _BUILDERS.get(name, builder) is not builder:
        raise ValueError(f"model {name!r} is registered twice")
    _BUILDERS[name] = builder
    _ORIGINS[name] = origin or ("built-in" if builder.__module__.startswith("ray_kd.") else f"module {builder.__module__}")
    return builder


def load_plugins() -> None:
    """Import every `ray_kd.models` entry point (again each call, as for methods); a broken plugin is one line."""
    for name, builder, origin in load_entry_points(ENTRY_POINT_GROUP, "model"):
        register_model(builder, name, origin)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style wildcard, plugins included."""
    load_plugins()
    return sorted(fnmatch.filter(_BUILDERS, pattern))


def model_origin(name: str) -> str:
    return _ORIGINS[name]


def create_model(name: str, num_classes: int, in_channels: int = 3, **options) -> StagedNet:
    """`options` (model_kwargs, stages) are for external models: `torchvision:`, `timm:`, `package.module:factory`."""
    if is_external(name):
        return build_external(name, num_classes, in_channels, **options)
    if name not in _BUILDERS:
        load_plugins()
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if any(options.values()):
        raise ValueError(f"model {name!r} is built in: it takes no {', '.join(k for k, v in options.items() if v)}")
    return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels)

"""A timm-style registry: `@register_model` on a builder, `create_model(name, ...)` to build."""

from __future__ import annotations

from typing import Callable

from ray_kd.models.base import StagedNet

_BUILDERS: dict[str, Callable[..., StagedNet]] = {}


def register_model(builder: Callable[..., StagedNet]) -> Callable[..., StagedNet]:
    """Register `builder(num_classes, in_channels) -> StagedNet` under its function name."""
    if builder.__name__ in _BUILDERS:
        raise ValueError(f"model {builder.__name__!r} is registered twice")
    _BUILDERS[builder.__name__] = builder
    return builder


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def create_model(name: str, num_classes: int, in_channels: int = 3) -> StagedNet:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels)

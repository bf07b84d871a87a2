"""Method registry: every module in this package that defines a `Method` subclass with a `name` registers it.

A method name may also compose a wrapper over a base method, as in `kd+skd`
(see `compose` in the wrapper's module); `method_class` resolves both.
"""

from __future__ import annotations

import importlib
import pkgutil

from ray_kd.methods.base import Method, MethodParams, Outputs, Role, RoleNet

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def _registered() -> dict[str, type[Method]]:
    found, todo = {}, list(Method.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "name" in cls.__dict__:
            found[cls.name] = cls
    return found


METHODS: dict[str, type[Method]] = _registered()


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodParams", "Outputs", "Role", "RoleNet", "method_class"]

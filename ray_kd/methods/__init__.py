"""Method registry: every module in this package that defines a `Method` subclass with a `name` registers it.

A method name may also compose a wrapper over a base method, as in `kd+skd`:
a module that defines `compose(base) -> type[Method]` is a wrapper named after
the module (skd.py: `skd`); `method_class` resolves both.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from ray_kd.methods.base import Method, MethodParams, Outputs, Role, RoleNet

WRAPPERS: dict[str, Callable[[type[Method]], type[Method]]] = {}
for _module in pkgutil.iter_modules(__path__):
    _loaded = importlib.import_module(f"{__name__}.{_module.name}")
    if hasattr(_loaded, "compose"):
        WRAPPERS[_module.name] = _loaded.compose


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
    """`kd` is a registered method; `kd+skd` is the `skd` wrapper composed over it."""
    base, *wrappers = name.split("+")
    if base not in METHODS:
        raise ValueError(f"unknown method {base!r}; choose one of: {', '.join(sorted(METHODS))}")
    cls = METHODS[base]
    for wrapper in wrappers:
        if wrapper not in WRAPPERS:
            raise ValueError(f"unknown wrapper {wrapper!r} in method {name!r}; "
                             f"choose one of: {', '.join(sorted(WRAPPERS))}")
        cls = WRAPPERS[wrapper](cls)
    return cls


__all__ = ["METHODS", "WRAPPERS", "Method", "MethodParams", "Outputs", "Role", "RoleNet", "method_class"]

"""Code a config names: entry points (how an installed package adds methods `ray_kd.methods` and models
`ray_kd.models`), and `package.module:name` imports, limited by the optional RAY_KD_ALLOWED_MODULES allow-list.

A config is code: `students.0.model=pkg.mod:factory` imports `pkg.mod` and calls `factory` (with the config's
`model_kwargs`) when the run is built, as Hydra's `_target_` does. Run configs you trust, or set
RAY_KD_ALLOWED_MODULES=pkg_a,pkg_b (comma-separated modules; their submodules are allowed too) on every node to
refuse any other module a config names."""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import Iterator

from ray_kd.errors import UserError


class PluginError(UserError, ImportError):
    """A plugin (entry point or `package.module:Class`) that cannot be imported or is not what it claims."""


def load_entry_points(group: str, kind: str) -> Iterator[tuple[str, object, str]]:
    """(entry name, loaded object, origin) of every entry point in `group`; a broken one is one line naming it."""
    for entry in entry_points(group=group):
        origin = f"plugin {entry.dist.name if entry.dist else entry.value}"
        try:
            loaded = entry.load()
        except Exception as err:
            raise PluginError(f"{kind} plugin {entry.name!r} ({entry.value}, from {origin}) failed to import: "
                              f"{type(err).__name__}: {err}") from None
        yield entry.name, loaded, origin


ALLOWED_MODULES_ENV = "RAY_KD_ALLOWED_MODULES"


def check_allowed(module: str, what: str) -> None:
    """Refuse `module` (named by `what` in a config) unless RAY_KD_ALLOWED_MODULES is unset or allows it."""
    allowed = [m.strip() for m in os.environ.get(ALLOWED_MODULES_ENV, "").split(",") if m.strip()]
    if allowed and not any(module == m or module.startswith(m + ".") for m in allowed):
        raise PluginError(f"{what}: module {module!r} is not in {ALLOWED_MODULES_ENV}={','.join(allowed)}; "
                          "add it there if you trust it")


def import_class(path: str, kind: str, base: type, what: str) -> type:
    """`package.module:Class` named in a config -> that class, a `base` subclass (`what` names it in the error)."""
    module_name, _, attr = path.partition(":")
    check_allowed(module_name, f"{kind} {path!r}")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as err:
        raise PluginError(f"{kind} {path!r} cannot be imported ({type(err).__name__}: {err}); check the "
                          "package is installed on every node and the name is package.module:Class") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{kind} {path!r} is not a {what}")
    return cls

"""Where methods are found: a registry filled by decorators, Python entry points, and `package.module:Class` names.

- Built-in methods register with `@register_method`; wrappers (like SKD's `+skd`)
  with `@register_wrapper("skd")` on a function `base class -> composed class`.
- An installed package adds methods through the entry-point group `ray_kd.methods`
  (each entry names a `Method` subclass, or a module whose import registers some);
  they are loaded the first time a name is not found, in the driver and in every
  Ray worker alike, since both resolve the same name the same way.
- A config may also name a class directly: `method.name: mypkg.methods:MyMethod`.
`kd+skd` is the `skd` wrapper composed over `kd`; wrappers compose over any base.
"""

from __future__ import annotations

from typing import Callable

from ray_kd.methods.base import Method
from ray_kd.plugins import import_class, load_entry_points

ENTRY_POINT_GROUP = "ray_kd.methods"
METHODS: dict[str, type[Method]] = {}
WRAPPERS: dict[str, Callable[[type[Method]], type[Method]]] = {}
ORIGINS: dict[str, str] = {}
"""Method or wrapper name -> where it came from: 'built-in', or 'plugin <distribution>'."""


def register_method(cls: type[Method], origin: str | None = None) -> type[Method]:
    """Class decorator: make `cls` findable by its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Method) and isinstance(cls.__dict__.get("name"), str)):
        raise TypeError(f"{cls!r} is not a Method subclass with a `name`")
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice ({METHODS[cls.name].__module__} and {cls.__module__})")
    METHODS[cls.name] = cls
    ORIGINS.setdefault(cls.name, origin or _origin(cls.__module__))
    return cls


def register_wrapper(name: str):
    """Function decorator: `compose(base) -> type[Method]` becomes the wrapper `+name`."""

    def register(compose: Callable[[type[Method]], type[Method]]):
        WRAPPERS[name] = compose
        ORIGINS.setdefault(f"+{name}", _origin(compose.__module__))
        return compose

    return register


def _origin(module: str) -> str:
    return "built-in" if module.startswith("ray_kd.") else f"module {module}"


def load_plugins() -> None:
    """Import every `ray_kd.methods` entry point (again each call: a plugin installed since is found; loading
    the same class twice is harmless); a broken plugin is one line naming it."""
    for _, loaded, origin in load_entry_points(ENTRY_POINT_GROUP, "method"):
        if isinstance(loaded, type) and issubclass(loaded, Method):
            register_method(loaded, origin)


def import_method(path: str) -> type[Method]:
    """`package.module:Class` -> that Method subclass (registered on the way)."""
    cls = import_class(path, "method", Method, "ray_kd.methods.Method subclass")
    METHODS.setdefault(path, cls)
    ORIGINS.setdefault(path, f"import {path.partition(':')[0]}")
    return cls


def method_class(name: str) -> type[Method]:
    """`kd` is a registered method, `pkg.mod:Class` an importable one; `kd+skd` is `skd` composed over `kd`."""
    base, *wrappers = name.split("+")
    if ":" in base:
        cls = import_method(base)
    else:
        if base not in METHODS:
            load_plugins()
        if base not in METHODS:
            raise ValueError(f"unknown method {base!r}; choose one of: {', '.join(sorted(METHODS))} "
                             "(or name a class as package.module:Class)")
        cls = METHODS[base]
    for wrapper in wrappers:
        if wrapper not in WRAPPERS:
            raise ValueError(f"unknown wrapper {wrapper!r} in method {name!r}; "
                             f"choose one of: {', '.join(sorted(WRAPPERS))}")
        cls = WRAPPERS[wrapper](cls)
    return cls


def list_methods() -> list[tuple[str, str, str]]:
    """(name, origin, first docstring line) of every method and wrapper, plugins included."""
    load_plugins()
    rows = [(name, ORIGINS.get(name, "built-in"), _summary(cls)) for name, cls in sorted(METHODS.items())]
    rows += [(f"+{name}", ORIGINS.get(f"+{name}", "built-in"), _summary(compose))
             for name, compose in sorted(WRAPPERS.items())]
    return rows


def _summary(obj) -> str:
    import sys

    doc = sys.modules[obj.__module__].__doc__ or obj.__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""

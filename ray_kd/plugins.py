"""Python entry points: how an installed package adds methods (`ray_kd.methods`) and models (`ray_kd.models`)."""

from __future__ import annotations

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

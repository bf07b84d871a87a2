"""Strict pydantic models, and their validation errors as the one line a user reads."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """A spec section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lr=inf is an error, not a NaN run


def one_line(err: ValidationError, prefix: str = "") -> str:
    """The first error as `where: what` (the count of the rest after it)."""
    first = err.errors()[0]
    where = prefix + ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; check its spelling against configs/ and the README"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"

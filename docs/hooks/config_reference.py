"""mkdocs hook: the configuration reference's field tables, generated from `ray_kd.config` at build time so the page
cannot drift from the code (the marker `<!-- config fields -->` in configuration.md is replaced)."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

MARKER = "<!-- config fields -->"


def on_page_markdown(markdown: str, page, **_) -> str:
    if page.file.src_uri != "configuration.md" or MARKER not in markdown:
        return markdown
    from ray_kd.config import RunConfig

    return markdown.replace(MARKER, "\n".join(_tables(RunConfig, "")))


def _tables(model: type[BaseModel], prefix: str) -> list[str]:
    """One table for `model`'s plain fields, then one section per nested model (a role, `optim`, ...)."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        inner = _model_of(field.annotation)
        if inner is not None:
            nested.append((f"{prefix}{name}{'.N' if _is_list(field.annotation) else ''}", inner))
        else:
            rows.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | "
                        f"{(field.description or '').replace('|', '/').replace('<', '&lt;')} |")
    out = []
    if rows:
        out += [f"### `{prefix.rstrip('.') or 'top level'}`", "", "| field | type | default | what |",
                "| --- | --- | --- | --- |", *rows, ""]
    for path, inner in nested:
        out += _tables(inner, path + ".")
    return out


def _args(annotation) -> tuple:
    return typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType, list) else ()


def _model_of(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in _args(annotation) if (m := _model_of(a)) is not None), None)


def _is_list(annotation) -> bool:
    return typing.get_origin(annotation) is list or any(_is_list(a) for a in _args(annotation))


def _type(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return f"`{text}`".replace("|", "or")


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return f"`{field.default_factory()!r}`" if field.default_factory else "required"
    return f"`{field.default!r}`"

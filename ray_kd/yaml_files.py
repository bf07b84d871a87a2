"""Reading YAML specs strictly: safe types only, and a key written twice is an error, not "the last wins"."""

from __future__ import annotations

from pathlib import Path

import yaml

from ray_kd.errors import UserError, first_line


class YamlError(UserError, ValueError):
    """A YAML file that cannot be read as a spec: the message names the file, the line and the problem."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping holding the same key twice."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: its problem and column, without PyYAML's quoted snippet and caret lines (a value
    given on the command line is one line: its column is enough)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        return f"{err.problem or err.context}" + (f" at column {mark.column + 1}" if mark is not None else "")
    return first_line(err)


def load_yaml_file(path: str | Path, what: str):
    """The document in `path` (a `what`, e.g. "config file"); any problem is one line with its line number."""
    path = Path(path)
    if path.is_dir():
        raise YamlError(f"{what} {path} is a folder; name a YAML file in it (e.g. {path / 'run.yaml'})")
    if not path.is_file():
        raise YamlError(f"{what} {path} does not exist")
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise YamlError(f"{what} {path} is not valid YAML at{where}: {err.problem or err.context}; "
                        "fix that line") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise YamlError(f"{what} {path} is not valid YAML: {str(err).splitlines()[0]}") from None

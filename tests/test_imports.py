"""The package's modules import one another without a cycle, and only the run object spells a run folder's files.

Every import counts, a function-level one too (an import deferred into a function to dodge a cycle still ties
the two modules together); the implicit import of a module's parent package (`ray_kd/__init__.py`, whose exports
are imported on first use) does not.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ray_kd"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, at any level of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported(path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert "ray_kd.run_storage" in graph and graph["ray_kd.run"]  # it read the package
    assert cycles(graph) == []


def test_bookkeeping_modules_do_not_import_the_epoch_loop():
    graph = import_graph()
    for module in ("ray_kd.run_folder", "ray_kd.run_storage", "ray_kd.preflight", "ray_kd.tracking", "ray_kd.run"):
        assert "ray_kd.session" not in graph[module], module


def test_only_the_run_object_spells_a_run_folder_file():
    spelled = re.compile(r"\"(summary|history|fingerprint|wall|manifest)\.json\"|mlflow_run\.json|run\.lock|"
                         r"epoch_\{|best_student\.pt\"|accuracy\.png\"")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for folder in ("ray_kd", "tuning", "jobs")
                 for p in (ROOT / folder).rglob("*.py") if p.name != "run_storage.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if spelled.search(line)]
    assert offenders == []


def takes_run_config(folder: Path) -> list[str]:
    """Functions with a parameter annotated with `RunConfig` (`RunConfig | None`, `"RunConfig"` included)."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if any(p.annotation is not None and "RunConfig" in ast.unparse(p.annotation) for p in params):
                    found.append(f"{path.relative_to(ROOT)}:{node.name}")
    return found


def test_the_whole_run_config_reaches_few_functions():
    """The run object (`RunStorage`) carries what the run's files need; the whole config goes where settings are
    read. 49 in ray_kd and 10 in tuning on 2026-12-07 before the run object took the paths; a new one is a choice
    (since then: `loader.start_loaders`, which places a replica's loader by the runtime, teacher and data settings)."""
    assert len(takes_run_config(PACKAGE)) <= 48
    assert len(takes_run_config(ROOT / "tuning")) <= 10

"""Structural rules of the code base, checked on its source: no import cycles, one method list.

The import walk counts every import statement, including those inside functions: an import
deferred into a function "to avoid a cycle" is still a cycle (the two modules still cannot be
understood, tested or reused apart), it only moves the failure from import time to call time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Package name -> source folder (pyproject.toml's package-dir).
PACKAGES = {"aqexport": ROOT / "aqexport", "aqexport.passes": ROOT / "passes", "aqexport.runtime": ROOT / "runtime"}


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if name.startswith("aqexport.passes") and folder != PACKAGES["aqexport.passes"]:
                continue
            modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every aqexport module ``name`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_walk_sees_function_level_imports():
    graph = import_graph()
    assert "aqexport.pipeline" in graph["aqexport.cli"]  # cli imports the pipeline inside a command
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_graph_passes_do_not_import_torch():
    """The lowering side reads the plan's transforms through numpy (aqexport.transform_algebra)."""
    for path in PACKAGES["aqexport.passes"].glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "torch" not in imported, path.name


@pytest.mark.parametrize("package", ["aqexport.passes"])
def test_every_pass_is_exported(package):
    import importlib

    import onnx_ir as ir

    exported = importlib.import_module(package)
    for path in PACKAGES[package].glob("[!_]*.py"):
        module = importlib.import_module(f"{package}.{path.stem}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, ir.passes.PassBase)
                and value.__module__ == module.__name__
            ):
                assert getattr(exported, value.__name__, None) is value, f"{value.__name__} not in {package}.__all__"
                assert value.__name__ in exported.__all__

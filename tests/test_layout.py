"""The layout: imports go down the layers, nothing private crosses a module, small classes.

Read from the source with :mod:`ast` (nothing is imported or run): every
``aiograceful`` module's ``from ... import ...`` statements make the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aiograceful

PACKAGE = Path(aiograceful.__file__).parent
#: A class past this many lines is two ideas (the drop-ins' server subclasses included).
MAX_CLASS_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """``(module, imported name)`` for each name ``name`` imports from a package module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    # Imports under ``if TYPE_CHECKING:`` are for annotations only: never run.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in typing_only:
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            submodule = f"{target}.{alias.name}"
            if submodule in modules:
                found.append((submodule, ""))  # a module of the package, imported whole
            elif target in modules:
                found.append((target, alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {target for target, _ in _imports(name, path, modules)}
        for name, path in modules.items()
    }


def test_layout_imports_have_no_cycle() -> None:
    """No module imports, directly or not, a module that imports it (the package root included)."""
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_layout_no_private_name_crosses_a_module() -> None:
    """No module imports another module's private (underscored) name."""
    modules = _modules()
    crossing = [
        (name, target, imported)
        for name, path in modules.items()
        for target, imported in _imports(name, path, modules)
        if imported.startswith("_") and not imported.startswith("__")
    ]
    assert crossing == []


def test_layout_no_class_is_two_ideas() -> None:
    """No class of the package is longer than about 450 lines."""
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    long.append((path.name, node.name, lines))
    assert long == []

"""The close path runs compiled or as Python, as selected, and both come from one source."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
import re
from pathlib import Path

import pytest

from aiograceful import _compiled

PACKAGE = Path(_compiled.__file__).parent


def _built() -> bool:
    return (PACKAGE / "_ext" / "BUILD").exists()


def test_compiled_path_is_the_one_selected() -> None:
    """AIOGRACEFUL_NO_EXTENSIONS=1 runs the .py modules; else a build, when made, runs."""
    files = {
        name: importlib.import_module(f"aiograceful.{name}").__file__ for name in _compiled.MODULES
    }
    if os.environ.get(_compiled.ENV_VAR):
        assert not _compiled.COMPILED
        assert all(str(f).endswith(".py") for f in files.values()), files
        return
    if not _built():
        pytest.skip(f"the C extension was not built: {_compiled.REASON}")
    # Built: the compiled modules run, or the reason (a stale build, say) is the failure.
    assert _compiled.REASON == ""
    assert _compiled.COMPILED
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert all(str(f).endswith(suffixes) for f in files.values()), files


def _slots(path: Path) -> dict[str, set[str]]:
    """``__slots__`` of each class of a module, read from its source."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if (
                isinstance(stmt, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in stmt.targets)
                and isinstance(stmt.value, ast.Tuple)
            ):
                found[node.name] = {
                    e.value
                    for e in stmt.value.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                }
    return found


def _declared(path: Path) -> dict[str, set[str]]:
    """Attributes each ``cdef class`` of a ``.pxd`` declares."""
    found: dict[str, set[str]] = {}
    current = ""
    for line in path.read_text().splitlines():
        head = re.match(r"cdef class (\w+)", line)
        if head:
            current = head.group(1)
            found[current] = set()
            continue
        attr = re.match(r"\s+cdef public \w+ (\w+)$", line)
        if attr and current:
            found[current].add(attr.group(1))
    return found


@pytest.mark.parametrize("name", _compiled.MODULES)
def test_compiled_pxd_declares_every_slot(name: str) -> None:
    """Each extension type of a .pxd declares exactly its class's __slots__ (one source)."""
    slots = _slots(PACKAGE / f"{name}.py")
    declared = _declared(PACKAGE / f"{name}.pxd")
    assert declared
    for cls, attrs in declared.items():
        assert attrs == slots.get(cls, set()), cls


def test_compiled_graceful_protocol_subclass_keeps_working() -> None:
    """GracefulProtocol stays a Python class: a subclass adds attributes and overrides hooks."""
    from aiograceful import GracefulProtocol

    class Mine(GracefulProtocol):
        def __init__(self) -> None:
            self.seen = 0

        def on_peer_eof(self) -> None:
            self.seen += 1

    mine = Mine()
    mine.on_peer_eof()
    assert mine.seen == 1
    assert mine.state.name == "OPEN"

"""The README's commands and code blocks stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_gives_the_two_commands() -> None:
    """The README keeps the main-job command and the test command."""
    text = README.read_text()
    assert "python -m aiograceful demo" in text
    assert "python -m pytest" in text
    assert 'pip install -e ".[dev]"' in text


@pytest.mark.parametrize("index", range(2))
def test_readme_quick_starts_compile_and_import(index: int) -> None:
    """Each quick start compiles, and every name it imports from aiograceful exists."""
    blocks = python_blocks()
    assert len(blocks) >= 2
    source = blocks[index]
    compile(source, f"README block {index}", "exec")
    import aiograceful

    for match in re.finditer(r"from aiograceful import ([\w, ]+)", source):
        for name in match.group(1).split(","):
            assert hasattr(aiograceful, name.strip()), name

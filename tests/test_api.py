"""The public surface: names, docstrings, typing marker."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

import aiograceful

PUBLIC = [
    "DEFAULT_BACKLOG",
    "DEFAULT_FORCE_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_DISCARD",
    "DEFAULT_SEND_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "UNSET",
    "AcceptQueueStats",
    "CloseOutcome",
    "CloseResult",
    "GracefulProtocol",
    "GracefulServer",
    "HalfCloseState",
    "LingerOptions",
    "ServerStats",
    "ShutdownNotice",
    "ShutdownPhase",
    "ShutdownReport",
    "UntestedServerWarning",
    "abort",
    "create_server",
    "create_unix_server",
    "graceful_close",
    "listen_fds",
    "start_server",
    "start_unix_server",
]

#: Constants: a docstring cannot be attached to a float or an enum member.
CONSTANTS = {
    "DEFAULT_BACKLOG",
    "DEFAULT_FORCE_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_DISCARD",
    "DEFAULT_SEND_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "UNSET",
}


def test_api_all_is_pinned() -> None:
    """__all__ is exactly the public names (sorted), and each one exists."""
    assert aiograceful.__all__ == PUBLIC
    for name in PUBLIC:
        assert hasattr(aiograceful, name), name


def test_api_init_only_reexports() -> None:
    """Every public name is defined in a private module, not in __init__."""
    for name in PUBLIC:
        obj = getattr(aiograceful, name)
        module = getattr(obj, "__module__", None)
        if module is not None and name not in CONSTANTS:
            assert module.startswith("aiograceful._"), (name, module)


def test_api_public_names_have_docstrings() -> None:
    """Every public class, function, method and property has its own docstring."""
    missing: list[str] = []
    for name in PUBLIC:
        if name in CONSTANTS:
            continue
        obj = getattr(aiograceful, name)
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                documentable = callable(member) or isinstance(
                    member, property | staticmethod | classmethod
                )
                if documentable and not (getattr(member, "__doc__", None) or "").strip():
                    missing.append(f"{name}.{attr}")
    assert missing == []


def test_api_defaults_are_the_documented_ones() -> None:
    """The linger defaults: 30 s total, 5 s idle (nginx's), a finite cap of at least 16 MiB."""
    assert aiograceful.DEFAULT_TIMEOUT == 30.0
    assert aiograceful.DEFAULT_IDLE_TIMEOUT == 5.0
    assert 16 * 1024 * 1024 <= aiograceful.DEFAULT_MAX_DISCARD < 2**40
    options = aiograceful.LingerOptions()
    assert options.timeout == aiograceful.DEFAULT_TIMEOUT
    assert options.idle_timeout == aiograceful.DEFAULT_IDLE_TIMEOUT
    assert options.max_discard == aiograceful.DEFAULT_MAX_DISCARD
    assert options.reset_on_failure is False


def test_api_outcomes_are_the_contract() -> None:
    """CloseOutcome has exactly the contract's six outcomes."""
    assert [o.name for o in aiograceful.CloseOutcome] == [
        "CLEAN",
        "TIMEOUT",
        "IDLE_TIMEOUT",
        "OVERFLOW",
        "PEER_RESET",
        "ABORTED",
    ]


def test_api_close_result_is_frozen() -> None:
    """CloseResult is a frozen dataclass with the contract's fields."""
    result = aiograceful.CloseResult(aiograceful.CloseOutcome.CLEAN, 3, 0.5)
    assert (result.outcome, result.discarded, result.duration, result.trailing) == (
        aiograceful.CloseOutcome.CLEAN,
        3,
        0.5,
        b"",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.discarded = 4  # type: ignore[misc]


def test_api_py_typed_ships() -> None:
    """The package carries its py.typed marker."""
    assert (Path(aiograceful.__file__).parent / "py.typed").is_file()

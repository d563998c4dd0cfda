"""Each drop-in checks the installed server's version when it is imported.

Older than the drop-in's ``MINIMUM_VERSION``: an ImportError naming both
versions. Newer than its ``TESTED_UP_TO``: an ``UntestedServerWarning``, and
the drop-in runs. The version is read from the package's metadata, so each
test replaces ``importlib.metadata.version`` and imports the drop-in's module
afresh (a new module object, not the one the other tests use).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import types
import warnings

import pytest

from aiograceful import UntestedServerWarning

# (drop-in module, distribution, a release older than its minimum, one newer than tested).
DROPINS = [
    ("aiograceful.uvicorn", "uvicorn", "0.21.1", "0.99.0"),
    ("aiograceful.hypercorn", "hypercorn", "0.15.0", "0.99.0"),
    ("aiograceful.aiohttp", "aiohttp", "3.8.6", "3.99.0"),
]
IDS = [dist for _, dist, _, _ in DROPINS]


def _import_fresh(name: str) -> types.ModuleType:
    """Run the module ``name``'s code in a new module object (``sys.modules`` is untouched)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None, name
    assert spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pretend(monkeypatch: pytest.MonkeyPatch, dist: str, version: str) -> None:
    """``importlib.metadata.version(dist)`` answers ``version`` (other packages: the truth)."""
    real = importlib.metadata.version

    def fake(name: str) -> str:
        return version if name.lower() == dist else real(name)

    monkeypatch.setattr(importlib.metadata, "version", fake)


@pytest.mark.parametrize(("module", "dist", "old", "new"), DROPINS, ids=IDS)
def test_dropin_older_server_is_an_import_error(
    monkeypatch: pytest.MonkeyPatch, module: str, dist: str, old: str, new: str
) -> None:
    """An installed server older than the minimum: ImportError, naming both versions."""
    installed = pytest.importorskip(module)
    _pretend(monkeypatch, dist, old)
    expected = f"{module} needs {dist} >= {installed.MINIMUM_VERSION}, found {old}"
    with pytest.raises(ImportError, match=expected.replace(".", r"\.")):
        _import_fresh(module)


@pytest.mark.parametrize(("module", "dist", "old", "new"), DROPINS, ids=IDS)
def test_dropin_newer_server_warns_and_imports(
    monkeypatch: pytest.MonkeyPatch, module: str, dist: str, old: str, new: str
) -> None:
    """An installed server newer than tested: a warning (UntestedServerWarning), and it imports."""
    installed = pytest.importorskip(module)
    _pretend(monkeypatch, dist, new)
    with pytest.warns(UntestedServerWarning, match=f"found {new}") as caught:
        fresh = _import_fresh(module)
    assert issubclass(UntestedServerWarning, UserWarning)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert installed.TESTED_UP_TO in str(caught[0].message)
    assert fresh.TESTED_UP_TO == installed.TESTED_UP_TO


@pytest.mark.parametrize(("module", "dist", "old", "new"), DROPINS, ids=IDS)
def test_dropin_tested_range_imports_without_a_warning(
    monkeypatch: pytest.MonkeyPatch, module: str, dist: str, old: str, new: str
) -> None:
    """A patch release of the newest tested minor is as good as its .0, and the minimum
    itself imports: neither warns."""
    installed = pytest.importorskip(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for version in (f"{installed.TESTED_UP_TO}.99", f"{installed.MINIMUM_VERSION}.0"):
            _pretend(monkeypatch, dist, version)
            assert _import_fresh(module).TESTED_UP_TO == installed.TESTED_UP_TO


@pytest.mark.parametrize(("module", "dist", "old", "new"), DROPINS, ids=IDS)
def test_dropin_installed_server_warns_only_when_newer_than_tested(
    module: str, dist: str, old: str, new: str
) -> None:
    """The server this suite runs against is at least the minimum, and it warns on import
    exactly when it is newer than TESTED_UP_TO: the suite then runs on, and its results
    say whether the range can grow (pyproject's filterwarnings lets that warning show)."""
    installed = pytest.importorskip(module)
    found = tuple(int(p) for p in importlib.metadata.version(dist).split(".")[:2])
    newest = tuple(int(p) for p in installed.TESTED_UP_TO.split("."))
    oldest = tuple(int(p) for p in installed.MINIMUM_VERSION.split("."))
    assert oldest <= found, (found, oldest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _import_fresh(module)
    untested = [w for w in caught if issubclass(w.category, UntestedServerWarning)]
    assert len(untested) == (1 if found > newest else 0), [str(w.message) for w in caught]

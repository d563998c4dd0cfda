"""The server versions a drop-in supports, checked when it is imported.

Each drop-in (:mod:`aiograceful.uvicorn`, ``.hypercorn``, ``.aiohttp``)
subclasses its server's classes and relies on their attributes, so it
declares a range: the oldest version those exist in (``MINIMUM``), and the
newest version its tests ran against (``TESTED_UP_TO``). Below the range its
import fails with an ImportError saying what to install; above it, it warns
(:class:`UntestedServerWarning`) and runs. The installed version is read from
the package's metadata (``importlib.metadata``), so the check needs no import
of the server (sentry-sdk's ``_check_minimum_version`` is the precedent).
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings

__all__ = ["UntestedServerWarning", "check_server_version", "release"]


class UntestedServerWarning(UserWarning):
    """The installed server is newer than the newest version its drop-in was tested with.

    The drop-in still runs; a later release may have changed an attribute it
    relies on. ``warnings.filterwarnings("ignore", category=...)`` silences it.
    """


_RELEASE = re.compile(r"\d+(?:\.\d+)*")


def release(version: str) -> tuple[int, ...]:
    """A version's numeric release: ``"3.9.5"`` -> ``(3, 9, 5)``, ``"1.0rc1"`` -> ``(1, 0)``."""
    match = _RELEASE.match(version.strip().lstrip("vV"))
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group().split("."))


def check_server_version(
    module: str, distribution: str, minimum: str, tested_up_to: str
) -> str | None:
    """Check the installed ``distribution`` against ``module``'s supported range.

    Raises ImportError when it is older than ``minimum``; warns
    (:class:`UntestedServerWarning`) when its release, cut to as many parts
    as ``tested_up_to`` has (``"0.54"``: any 0.54.x is tested), is newer.
    Returns the version found, or None when the package has no metadata
    (a vendored copy): nothing can be checked then.
    """
    try:
        found = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        installed = release(found)
    except ValueError:
        return found  # not a release number anyone compares (a local build): let it run
    if installed < release(minimum):
        raise ImportError(
            f"{module} needs {distribution} >= {minimum}, found {found}:"
            f" pip install '{distribution}>={minimum}'"
        )
    newest = release(tested_up_to)
    if installed[: len(newest)] > newest:
        warnings.warn(
            f"{module} is tested with {distribution} {minimum} to {tested_up_to}, found {found};"
            f" it may rely on something {distribution} {found} changed",
            UntestedServerWarning,
            stacklevel=3,
        )
    return found

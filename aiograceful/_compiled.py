"""Which path runs the close: the compiled modules, or their Python source.

One source, two speeds (aiohttp's and yarl's convention). The modules of
:data:`MODULES` are built by Cython from the same ``.py`` files (pure-Python
mode: a ``.pxd`` beside each makes its classes extension types) into the
``_ext`` directory of the package, with a ``BUILD`` manifest naming the hash of
each source they came from. At ``import aiograceful`` this module puts ``_ext``
first on the package's ``__path__`` when:

* ``AIOGRACEFUL_NO_EXTENSIONS`` is unset or empty (set, it selects the Python
  modules, the reference: ``AIOGRACEFUL_NO_EXTENSIONS=1``);
* the build left every module of :data:`MODULES` in ``_ext``;
* each source (``.py`` and ``.pxd``) still has the hash it was built from. An
  edited source after an editable install makes the whole set fall back to
  Python (a stale build never runs): :data:`REASON` says so, and
  ``pip install -e .`` rebuilds.

It is all or nothing: the compiled classes extend one another across modules.
:data:`COMPILED` says which path was taken, :data:`REASON` why not.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import sys
from pathlib import Path
from typing import Final

__all__ = ["COMPILED", "ENV_VAR", "MODULES", "REASON", "source_hash"]

#: Set (non-empty) to run the Python modules even where the compiled ones are built.
ENV_VAR: Final = "AIOGRACEFUL_NO_EXTENSIONS"
#: The modules built from their source, in import order.
MODULES: Final = ("_state", "_deadlines", "_record", "_linger")

_PACKAGE_DIR: Final = Path(__file__).resolve().parent
_EXT_DIR: Final = _PACKAGE_DIR / "_ext"
_MANIFEST: Final = "BUILD"


def source_hash(name: str, package_dir: Path = _PACKAGE_DIR) -> str:
    """The hash a build of module ``name`` is keyed by: its ``.py`` and its ``.pxd``."""
    digest = hashlib.sha256()
    for suffix in (".py", ".pxd"):
        path = package_dir / f"{name}{suffix}"
        if path.exists():
            digest.update(suffix.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _why_not() -> str:
    """Empty when the compiled modules may be used; else the reason they are not."""
    if os.environ.get(ENV_VAR):
        return f"{ENV_VAR} is set"
    try:
        manifest = json.loads((_EXT_DIR / _MANIFEST).read_text())
    except (OSError, ValueError):
        return "not built (no C compiler, Cython, or a failed build at install)"
    built = manifest.get("modules", {}) if isinstance(manifest, dict) else {}
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    for name in MODULES:
        if not any((_EXT_DIR / f"{name}{suffix}").exists() for suffix in suffixes):
            return f"{name} was not built for this Python"
        if built.get(name) != source_hash(name):
            return f"stale: {name}.py or .pxd changed since the build (pip install -e . rebuilds)"
    return ""


REASON: Final = _why_not()
#: True when the modules of :data:`MODULES` are the compiled ones.
COMPILED: Final = not REASON

if COMPILED:
    # The package's own directory stays on the path for everything else.
    _package = sys.modules[__name__.rpartition(".")[0]]
    if str(_EXT_DIR) not in _package.__path__:
        _package.__path__.insert(0, str(_EXT_DIR))
    del _package

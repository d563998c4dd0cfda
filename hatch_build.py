"""Build hook: compile the close path (aiograceful._compiled.MODULES) with Cython, if it can.

The ``.py`` files are the source (Cython's pure-Python mode, with a ``.pxd``
beside each); the extension modules go to ``aiograceful/_ext/`` with a
``BUILD`` manifest of the source hashes, where ``aiograceful._compiled`` looks
for them. Without Cython or a C compiler, or when the build fails, or with
``AIOGRACEFUL_NO_EXTENSIONS=1`` at install time, the package installs as pure
Python and says so in one line: it is the same library, slower.

Hatchling stays the backend (the project's metadata is written for it) and
setuptools' ``build_ext`` is only borrowed to drive the compiler: it knows
each platform's flags.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PACKAGE = "aiograceful"


def _load_compiled(root: Path) -> Any:
    """``aiograceful/_compiled.py`` alone (importing the package would pick a path)."""
    spec = importlib.util.spec_from_file_location(
        "_aiograceful_build_compiled", root / PACKAGE / "_compiled.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Set while it runs: alone, it must not look for a build or touch the package.
    saved = os.environ.get("AIOGRACEFUL_NO_EXTENSIONS")
    os.environ["AIOGRACEFUL_NO_EXTENSIONS"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["AIOGRACEFUL_NO_EXTENSIONS"]
        else:
            os.environ["AIOGRACEFUL_NO_EXTENSIONS"] = saved
    return module


def build_extensions(root: Path) -> list[Path]:
    """Compile the modules into ``aiograceful/_ext``; the files made. Raises on failure."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    compiled = _load_compiled(root)
    package_dir = root / PACKAGE
    ext_dir = package_dir / "_ext"
    shutil.rmtree(ext_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        extensions = [
            Extension(
                f"{PACKAGE}.{name}",
                [str(package_dir / f"{name}.py")],
                # No debug information: a quarter of the size (GCC and Clang).
                extra_compile_args=["-g0"] if sys.platform != "win32" else [],
            )
            for name in compiled.MODULES
        ]
        modules = cythonize(
            extensions,
            build_dir=tmp,
            quiet=True,
            force=True,
            include_path=[str(root)],
            compiler_directives={
                "language_level": 3,
                # Annotations stay annotations: no C coercion of an argument
                # typed float or int, so the compiled module takes (and
                # refuses) exactly what the Python one does.
                "annotation_typing": False,
                "binding": True,
            },
        )
        dist = Distribution({"name": PACKAGE, "ext_modules": modules})
        cmd = build_ext(dist)
        cmd.build_lib = str(Path(tmp) / "lib")
        cmd.build_temp = str(Path(tmp) / "temp")
        cmd.ensure_finalized()
        cmd.run()
        ext_dir.mkdir()
        made = []
        for output in cmd.get_outputs():
            target = ext_dir / Path(output).name
            shutil.copyfile(output, target)
            made.append(target)
    manifest = {
        "modules": {name: compiled.source_hash(name, package_dir) for name in compiled.MODULES},
        "python": sys.version.split()[0],
    }
    (ext_dir / "BUILD").write_text(json.dumps(manifest, indent=1) + "\n")
    made.append(ext_dir / "BUILD")
    return made


class CustomBuildHook(BuildHookInterface):  # type: ignore[misc]  # hatchling is untyped
    """Compile what can be compiled; never fail the install over it."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        if os.environ.get("AIOGRACEFUL_NO_EXTENSIONS"):
            self.app.display_info("aiograceful: AIOGRACEFUL_NO_EXTENSIONS is set: pure Python")
            shutil.rmtree(root / PACKAGE / "_ext", ignore_errors=True)
            return
        try:
            made = build_extensions(root)
        except Exception as exc:  # any failure: no compiler, no Cython, a compile error
            shutil.rmtree(root / PACKAGE / "_ext", ignore_errors=True)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.app.display_warning(
                f"aiograceful: C extension not built ({reason}); installing pure Python"
            )
            return
        self.app.display_info(f"aiograceful: compiled {len(made) - 1} modules with Cython")
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            # _ext is not in version control (.gitignore): include it by name.
            for path in made:
                build_data["force_include"][str(path)] = str(path.relative_to(root))

"""Slot booking engine: the pure core (``engine.core``) and the actor shell (``engine.shell``).

With ``SLOTENGINE_COMPILE=1`` at install time the core's hot modules are
compiled (mypyc) into extension modules next to their sources, and Python
imports those first. A compiled module older than its source may run stale
code, so for such a module the source is imported instead, with a warning:
never wrong, only slower until the next compiled build.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import pathlib
import sys
import types
import warnings
from collections.abc import Sequence

_CORE = pathlib.Path(__file__).parent / "core"


class _PreferSource(importlib.abc.MetaPathFinder):
    """Finds the named modules from their ``.py`` source, ahead of any extension module."""

    def __init__(self, sources: dict[str, pathlib.Path]) -> None:
        self._sources = sources

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        source = self._sources.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname, source)


def _stale_compiled_modules() -> dict[str, pathlib.Path]:
    stale: dict[str, pathlib.Path] = {}
    for source in _CORE.glob("*.py"):
        for native in _CORE.glob(f"{source.stem}.*.so"):
            if source.stat().st_mtime > native.stat().st_mtime:
                stale[f"engine.core.{source.stem}"] = source
    return stale


_stale = _stale_compiled_modules()
if _stale:
    warnings.warn(
        f"compiled {', '.join(sorted(_stale))} older than the source: running the source"
        " (rebuild with SLOTENGINE_COMPILE=1 pip install -e . to use the compiled code)",
        RuntimeWarning,
        stacklevel=2,
    )
    sys.meta_path.insert(0, _PreferSource(_stale))

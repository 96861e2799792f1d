"""Slot booking engine: the pure core (``engine.core``) and the actor shell (``engine.shell``).

With ``SLOTENGINE_COMPILE=1`` at install time the core's hot modules are
compiled (mypyc) into extension modules next to their sources, and Python
imports those first. A compiled module older than its source would silently
run stale code, so importing the engine refuses that, naming the file.
"""

import pathlib

_CORE = pathlib.Path(__file__).parent / "core"

for _source in _CORE.glob("*.py"):
    for _native in _CORE.glob(f"{_source.stem}.*.so"):
        if _source.stat().st_mtime > _native.stat().st_mtime:
            raise ImportError(
                f"{_native} was compiled before {_source.name} last changed: rebuild it"
                " (SLOTENGINE_COMPILE=1 pip install -e .) or delete the compiled file"
            )

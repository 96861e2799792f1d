"""How fast the machine was while a bench ran, so results of different runs compare.

A shared machine's speed drifts: neighbours on the same host take caches,
memory bandwidth and CPU time (steal), and the same code can measure a
third slower in one hour than in another. Every bench result therefore
carries, under ``machine``:

- ``calibration_ms``: the best of a few timings of one fixed pure-Python
  workload (dict, list and string operations, the kind of work the engine
  does), taken just before and just after the scenario. Lower is faster; two
  results compare fairly when their calibrations are alike.
- ``steal_share``: the share of CPU time the hypervisor gave to others over
  the run (Linux ``/proc/stat``; absent elsewhere).
- ``arch``, ``cpus`` and the one-minute load average at the end.
- ``python`` (the interpreter's version), ``libpython`` (``shared`` when the
  interpreter runs from a shared ``libpython``, as a default pyenv build
  does; ``static`` when it is linked into the executable, as distributions
  build it, with profile-guided and link-time optimisation; ``None`` where
  ``/proc`` cannot tell) and ``compiled_core`` (whether the shard core runs
  as native code, built with ``SLOTENGINE_COMPILE=1``). They are this
  process's, which a server the bench starts shares; on this machine the
  distribution's interpreter serves about a sixth more requests than pyenv's
  build, and the calibration runs faster under it too, so compare
  calibrations only between runs on the same interpreter.

It must never take a calibration while the scenario runs (only just before and
just after it), so that it measures the machine and not the run.
"""

import os
import platform
import time
from pathlib import Path
from typing import Any, Final

CALIBRATION_ROUNDS: Final = 5
CALIBRATION_ITEMS: Final = 20_000
PROC_STAT: Final = "/proc/stat"
PROC_SELF_MAPS: Final = Path("/proc/self/maps")
# Fields of /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal ...
STEAL_FIELD: Final = 7


def _workload() -> int:
    table: dict[str, int] = {}
    order: list[tuple[int, str]] = []
    total = 0
    for n in range(CALIBRATION_ITEMS):
        key = f"booking-{n}"
        table[key] = n
        order.append((n, key))
        total += table.get(f"booking-{n // 2}", 0)
    while order:
        _, key = order.pop()
        total -= table.pop(key)
    return total


def calibration_ms() -> float:
    """The best of ``CALIBRATION_ROUNDS`` timings of the fixed workload, in ms."""
    best = float("inf")
    for _ in range(CALIBRATION_ROUNDS):
        started = time.perf_counter()
        _workload()
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def libpython_linkage(maps: Path = PROC_SELF_MAPS) -> str | None:
    """``shared`` when this interpreter runs from a shared libpython, ``static``
    when it is linked into the executable, ``None`` where it cannot be told."""
    try:
        mapped = maps.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return "shared" if "/libpython" in mapped else "static"


def compiled_core() -> bool:
    """Whether the shard core runs as native code (built with mypyc) or interpreted."""
    import engine.core.shard

    return not engine.core.shard.__file__.endswith(".py")


def cpu_ticks() -> list[int] | None:
    """The machine's CPU time counters, or None where /proc/stat is missing."""
    try:
        with open(PROC_STAT, encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    return [int(value) for value in fields[1:]]


class MachineWatch:
    """Calibrates before a run and after it, and counts the steal in between."""

    def __init__(self) -> None:
        self._before_ms = calibration_ms()
        self._ticks = cpu_ticks()

    def summary(self) -> dict[str, Any]:
        after_ms = calibration_ms()
        result: dict[str, Any] = {
            "calibration_ms": round((self._before_ms + after_ms) / 2, 2),
            "calibration_before_ms": self._before_ms,
            "calibration_after_ms": after_ms,
            "arch": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
            "libpython": libpython_linkage(),
            "compiled_core": compiled_core(),
        }
        ticks = cpu_ticks()
        if self._ticks is not None and ticks is not None and len(ticks) > STEAL_FIELD:
            spent = [b - a for a, b in zip(self._ticks, ticks, strict=False)]
            total = sum(spent[: STEAL_FIELD + 1])
            result["steal_share"] = round(spent[STEAL_FIELD] / total, 3) if total else 0.0
        return result

"""Live progress of the HTTP scenarios on stderr: tqdm's bar when it is installed.

tqdm is an optional extra (``bench``, also in ``dev``): without it a scenario
runs the same and shows no bar. This module owns only that choice; it must
never change what a scenario measures or prints on stdout.
"""

import sys
from typing import Any, Protocol


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, *, refresh: bool = True, **figures: Any) -> Any: ...

    def close(self) -> Any: ...


class _Silent:
    """What stands in for a bar without tqdm: counts nothing, shows nothing."""

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, *, refresh: bool = True, **figures: Any) -> None:
        return None

    def close(self) -> None:
        return None


def progress_bar(*, total: int | None, desc: str, unit: str, mininterval: float) -> Progress:
    """A bar on stderr, or a silent stand-in when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent()
    bar: Progress = tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=mininterval
    )
    return bar

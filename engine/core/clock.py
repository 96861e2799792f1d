"""Time, passed in. The core never reads a clock itself; shells and tests do.

``ManualClock`` is the clock of tests, simulations and the demo: time moves
only when told to.
"""

from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...


class ManualClock:
    def __init__(self, start_ms: int) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance_ms(self, delta_ms: int) -> int:
        if delta_ms < 0:
            raise ValueError("time never goes backwards")
        self._now_ms += delta_ms
        return self._now_ms

    def set_ms(self, now_ms: int) -> None:
        if now_ms < self._now_ms:
            raise ValueError("time never goes backwards")
        self._now_ms = now_ms

"""The real clock of the shell: wall time in epoch milliseconds, never going backwards.

The core's deadlines are epoch milliseconds (they are stored and survive a
restart), so the shell reads wall time. Wall time can step back (NTP); the core
must never see time go backwards, so a step back holds the clock still until
wall time catches up.
"""

import time


class SystemClock:
    def __init__(self) -> None:
        self._last_ms = 0

    def now_ms(self) -> int:
        now_ms = time.time_ns() // 1_000_000
        if now_ms < self._last_ms:
            return self._last_ms
        self._last_ms = now_ms
        return now_ms

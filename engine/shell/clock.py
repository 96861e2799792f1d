"""The real clock of the shell: epoch milliseconds that never go backwards.

The core's deadlines are epoch milliseconds (they are stored and survive a
restart), so the shell's clock must read as wall time. But wall time can step
back (NTP), and a clock that merely held still until wall time caught up would
let every hold outlive its deadline by the size of the step. So time advances
with the monotonic clock from an epoch anchor, and re-anchors only forward,
when wall time runs ahead (a step forward, or slow drift), never back.
"""

import time
from collections.abc import Callable

# Wall time may run ahead of the anchored clock by this much before the clock
# jumps forward to it: small drift is absorbed, real steps are followed.
REANCHOR_AHEAD_MS = 1_000


class SystemClock:
    def __init__(
        self,
        wall_ns: Callable[[], int] = time.time_ns,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._wall_ns = wall_ns
        self._monotonic_ns = monotonic_ns
        self._anchor_wall_ms = wall_ns() // 1_000_000
        self._anchor_monotonic_ns = monotonic_ns()
        self._last_ms = self._anchor_wall_ms

    def now_ms(self) -> int:
        elapsed_ms = (self._monotonic_ns() - self._anchor_monotonic_ns) // 1_000_000
        now_ms = self._anchor_wall_ms + elapsed_ms
        wall_ms = self._wall_ns() // 1_000_000
        if wall_ms > now_ms + REANCHOR_AHEAD_MS:
            self._anchor_wall_ms = wall_ms
            self._anchor_monotonic_ns = self._monotonic_ns()
            now_ms = wall_ms
        # Monotonic time never goes back, and neither does a forward re-anchor.
        now_ms = max(now_ms, self._last_ms)
        self._last_ms = now_ms
        return now_ms

"""A hierarchical timer wheel: every deadline of a shard, in O(1) per timer.

Theory of operation
-------------------
Time is counted in ticks of ``tick_ms``. Level 0 has one bucket per tick for
the next ``BUCKETS`` ticks; each higher level has buckets ``BUCKETS`` times as
wide. A timer lives at the lowest level whose span still contains both its
tick and the current tick (their tick numbers agree above that level's bits),
in the bucket its own tick bits select. When the current tick crosses a
boundary of level L, the level-L bucket for the new span is emptied and its
timers re-inserted: they drop to a lower level, and finally into level 0,
where a bucket holds timers of exactly one tick.

``advance(now_ms)`` moves the current tick to ``now_ms // tick_ms`` and returns
the keys whose deadline is at or before ``now_ms``: never early, each key at
most once, ordered by deadline and then by the order they were scheduled. It
skips stretches where the lower levels are empty, so a jump of hours costs a
handful of steps, not one per tick.

Scheduling a key that is already scheduled moves it; ``cancel`` removes it. A
key whose deadline has already passed is due at the next ``advance``.

Invariants (checked by ``check``): every live key is in exactly one bucket and
in ``_where``; a key in level L, bucket b, has tick bits ``(tick >> 6L) & 63 ==
b``, and agrees with the current tick above bit 6(L+1); ``_count[L]`` is the
number of keys in level L.
"""

from collections.abc import Hashable
from typing import Final, Generic, TypeVar

import msgspec

from engine.core.errors import require
from engine.core.limits import TIMER_TICK_MS, TIMER_WHEEL_BUCKETS, TIMER_WHEEL_LEVELS

K = TypeVar("K", bound=Hashable)

# Final: a compiled build then reads them as constants, not from the module's dict.
_BITS: Final = TIMER_WHEEL_BUCKETS.bit_length() - 1
_MASK: Final = TIMER_WHEEL_BUCKETS - 1
_DUE: Final = -1
_OVERFLOW: Final = -2
assert 1 << _BITS == TIMER_WHEEL_BUCKETS, "buckets per level must be a power of two"


class TimerWheelStatistics(msgspec.Struct, frozen=True, kw_only=True):
    timers: int
    per_level: tuple[int, ...]
    due: int
    fired_total: int
    cascaded_total: int
    current_ms: int


class TimerWheel(Generic[K]):
    def __init__(
        self, now_ms: int, tick_ms: int = TIMER_TICK_MS, levels: int = TIMER_WHEEL_LEVELS
    ) -> None:
        require(tick_ms > 0, "tick_ms must be positive")
        self._tick_ms = tick_ms
        self._levels = levels
        # Ticks up to and including _current have been processed.
        self._current = now_ms // tick_ms
        # _buckets[level][index]: key -> (deadline_ms, sequence)
        self._buckets: list[list[dict[K, tuple[int, int]]]] = [
            [{} for _ in range(TIMER_WHEEL_BUCKETS)] for _ in range(levels)
        ]
        self._count = [0] * levels
        # Keys whose deadline was not after the current tick when scheduled.
        self._due: dict[K, tuple[int, int]] = {}
        # Keys beyond the top level's span (never expected with 7 levels).
        self._overflow: dict[K, tuple[int, int]] = {}
        # key -> where it lives, as one int so the collector never tracks it:
        # level * BUCKETS + bucket index, or _DUE / _OVERFLOW.
        self._where: dict[K, int] = {}
        self._sequence = 0
        self._fired_total = 0
        self._cascaded_total = 0

    # -- queries ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def deadline_of(self, key: K) -> int | None:
        place = self._where.get(key)
        return None if place is None else self._home(place)[key][0]

    def next_wakeup_ms(self) -> int | None:
        """A time at or before the earliest pending deadline (None when empty).

        Exact for timers in level 0; for higher levels it is the start of the
        bucket's span, where a cascade brings the timer closer.
        """
        if not self._where:
            return None
        if self._due:
            return self._current * self._tick_ms
        for level in range(self._levels):
            if self._count[level] == 0:
                continue
            shift = _BITS * level
            base = self._current >> shift
            buckets = self._buckets[level]
            for step in range(1 if level == 0 else 0, TIMER_WHEEL_BUCKETS + 1):
                span = base + step
                if buckets[span & _MASK]:
                    if level == 0:
                        return span * self._tick_ms
                    # The bucket is cascaded when the current tick reaches
                    # the start of its span; nothing in it is due before.
                    return max(span << shift, self._current + 1) * self._tick_ms
        # Only overflow timers remain.
        return min(deadline for deadline, _ in self._overflow.values())

    # -- changes ---------------------------------------------------------------

    def schedule(self, key: K, deadline_ms: int) -> None:
        """Arm ``key`` for ``deadline_ms``; re-arming moves an existing timer."""
        self.cancel(key)
        self._sequence += 1
        self._insert(key, (deadline_ms, self._sequence))

    def cancel(self, key: K) -> bool:
        # get and del, not pop(key, None): a compiled build calls those directly.
        where = self._where
        place = where.get(key)
        if place is None:
            return False
        del where[key]
        del self._home(place)[key]
        if place >= 0:
            self._count[place >> _BITS] -= 1
        return True

    def advance(self, now_ms: int) -> list[K]:
        """Move time to ``now_ms``; return the keys now due, in deadline order."""
        target = now_ms // self._tick_ms
        if target <= self._current and not self._due:
            return []  # the common case: several commands within one tick
        fired: list[tuple[int, int, K]] = []
        self._take_due(fired)
        while self._current < target:
            if not self._where:
                self._current = target
                break
            self._current = self._next_stop(target)
            self._cascade_at(self._current)
            bucket = self._buckets[0][self._current & _MASK]
            if bucket:
                self._count[0] -= len(bucket)
                for key, (deadline, sequence) in bucket.items():
                    del self._where[key]
                    fired.append((deadline, sequence, key))
                self._buckets[0][self._current & _MASK] = {}
        # A cascade puts a timer whose tick is the current one among the due.
        self._take_due(fired)
        if len(fired) > 1:
            fired.sort(key=_deadline_then_sequence)
        self._fired_total += len(fired)
        return [key for _, _, key in fired]

    # -- internals -------------------------------------------------------------

    def _take_due(self, fired: list[tuple[int, int, K]]) -> None:
        if self._due:
            fired.extend((d, s, k) for k, (d, s) in self._due.items())
            for key in self._due:
                del self._where[key]
            self._due = {}

    def _next_stop(self, target: int) -> int:
        """The next tick in (current, target] where something may happen.

        A tick matters if its level-0 bucket holds timers, or if it crosses a
        boundary of a non-empty higher level (a cascade).
        """
        current = self._current
        if self._count[0]:
            # Scan the rest of this level-0 rotation for a non-empty bucket.
            end = min(target, (current | _MASK) + 1)
            buckets = self._buckets[0]
            tick = current + 1
            while tick < end:
                if buckets[tick & _MASK]:
                    return tick
                tick += 1
            return end
        # Level 0 is empty: jump to the next boundary of the lowest non-empty level.
        for level in range(1, self._levels):
            if self._count[level]:
                shift = _BITS * level
                boundary = ((current >> shift) + 1) << shift
                return min(target, boundary)
        if self._overflow:
            top_shift = _BITS * self._levels
            return min(target, ((current >> top_shift) + 1) << top_shift)
        return target

    def _cascade_at(self, tick: int) -> None:
        """Re-insert the timers whose span starts at ``tick``, highest level first."""
        if self._overflow and tick & ((1 << (_BITS * self._levels)) - 1) == 0:
            self._reinsert(self._overflow)
            self._overflow = {}
        for level in range(self._levels - 1, 0, -1):
            shift = _BITS * level
            if tick & ((1 << shift) - 1):
                continue
            index = (tick >> shift) & _MASK
            bucket = self._buckets[level][index]
            if bucket:
                self._count[level] -= len(bucket)
                self._buckets[level][index] = {}
                self._cascaded_total += len(bucket)
                self._reinsert(bucket)

    def _reinsert(self, entries: dict[K, tuple[int, int]]) -> None:
        for key, entry in entries.items():
            del self._where[key]
            self._insert(key, entry)

    def _insert(self, key: K, entry: tuple[int, int]) -> None:
        # Round the deadline up to a tick so a timer never fires early.
        tick = -(-entry[0] // self._tick_ms)
        if tick <= self._current:
            self._due[key] = entry
            self._where[key] = _DUE
            return
        # The level is where the highest bit that differs from the current
        # tick falls: above it both agree, so the timer's span contains now.
        level = ((tick ^ self._current).bit_length() - 1) // _BITS
        if level < self._levels:
            index = (tick >> (_BITS * level)) & _MASK
            self._buckets[level][index][key] = entry
            self._count[level] += 1
            self._where[key] = (level << _BITS) | index
            return
        self._overflow[key] = entry
        self._where[key] = _OVERFLOW

    def _home(self, place: int) -> dict[K, tuple[int, int]]:
        if place >= 0:
            return self._buckets[place >> _BITS][place & _MASK]
        return self._due if place == _DUE else self._overflow

    # -- introspection -----------------------------------------------------------

    def statistics(self) -> TimerWheelStatistics:
        return TimerWheelStatistics(
            timers=len(self._where),
            per_level=tuple(self._count),
            due=len(self._due),
            fired_total=self._fired_total,
            cascaded_total=self._cascaded_total,
            current_ms=self._current * self._tick_ms,
        )

    def check(self) -> None:
        """Verify the invariants of the module docstring (O(timers))."""
        seen = 0
        for level in range(self._levels):
            count = 0
            shift = _BITS * level
            for index, bucket in enumerate(self._buckets[level]):
                for key, (deadline, _) in bucket.items():
                    tick = -(-deadline // self._tick_ms)
                    require(
                        self._where[key] == (level << _BITS) | index, f"timer {key!r} misplaced"
                    )
                    require((tick >> shift) & _MASK == index, f"timer {key!r} in wrong bucket")
                    require(
                        tick >> (shift + _BITS) == self._current >> (shift + _BITS),
                        f"timer {key!r} at wrong level",
                    )
                    require(tick > self._current, f"timer {key!r} overdue in a bucket")
                    count += 1
            require(count == self._count[level], f"level {level} count is off")
            seen += count
        for key in self._due:
            require(self._where[key] == _DUE, f"due timer {key!r} misplaced")
        for key in self._overflow:
            require(self._where[key] == _OVERFLOW, f"overflow timer {key!r} misplaced")
        seen += len(self._due) + len(self._overflow)
        require(seen == len(self._where), "timer index out of step with the buckets")


def _deadline_then_sequence(item: tuple[int, int, object]) -> tuple[int, int]:
    return item[0], item[1]

"""A slot's line of WAITING users: FIFO order, O(log n) positions.

Users are kept by their join sequence number in an ascending list, so a
user's 1-based position is the count of sequence numbers before theirs: a
bisect, O(log n), and a 100,000-user line answers a position without a scan.
Sequence numbers only grow, so joining appends (O(1)); offering advances a
head index (O(1), the dead prefix is dropped now and then); leaving or timing
out from the middle deletes one list item (a memmove, microseconds even for
100,000 users). The list and ``bisect`` are C code: for the short lines that
are the common case this beats any balanced tree written in Python.

The line also keeps the times at which its head recently moved (an offer, a
departure from the front) so it can estimate the wait from the rate the line
actually advances, not from a guess.

Invariants: ``_seq_of`` and ``_user_of`` are inverse maps of the same users;
the sorted list holds exactly their sequence numbers; sequence numbers only
grow.

It must never let a later joiner overtake an earlier one, nor scan the line to
answer a position.
"""

from bisect import bisect_left
from collections.abc import Iterator
from typing import Final

from engine.core.errors import InvariantViolation, require
from engine.core.limits import WAIT_ESTIMATE_SAMPLES_MAX

# Bound once: a compiled build reads a Final as a constant, not from the module's dict.
_bisect_left: Final = bisect_left

# Drop the dead prefix of the list once it is this long and at least half of it.
_COMPACT_AFTER: Final = 64


class WaitingLine:
    def __init__(self) -> None:
        # Ascending sequence numbers; items before _head have left the line.
        self._order: list[int] = []
        self._head = 0
        self._seq_of: dict[str, int] = {}
        self._user_of: dict[int, str] = {}
        self._next_seq = 1
        # The latest times (ms) at which a user left the front of the line, as a
        # ring of WAIT_ESTIMATE_SAMPLES_MAX: a list and an index are native
        # operations in the compiled build, where a deque's are generic calls.
        self._advances_ms: list[int] = []
        self._oldest_advance = 0
        self._last_advance_ms = 0
        # The number of waiting users, as a plain attribute: the shard reads it
        # on every reserve, and a method call there is measurable.
        self.size = 0
        # Users who left the line (offered, left, timed out) since this line was
        # built: live position updates are numbered by it.
        self.departures = 0

    def __len__(self) -> int:
        return self.size

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._seq_of

    def __iter__(self) -> Iterator[str]:
        """Users from the head to the tail."""
        return (self._user_of[seq] for seq in self._order[self._head :])

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def push(self, user_id: str) -> int:
        if user_id in self._seq_of:
            raise InvariantViolation(f"{user_id} is already in line")
        seq = self._next_seq
        self._next_seq += 1
        self._insert(user_id, seq)
        return seq

    def restore(self, user_id: str, seq: int) -> None:
        """Put a user back at a known sequence number (recovery from storage)."""
        require(user_id not in self._seq_of and seq not in self._user_of, "duplicate restore")
        self._insert(user_id, seq)
        self._next_seq = max(self._next_seq, seq + 1)

    def skip_past(self, seq: int) -> None:
        """Never hand out ``seq`` or anything before it (recovery: it was used once)."""
        self._next_seq = max(self._next_seq, seq + 1)

    def head(self) -> str | None:
        return self._user_of[self._order[self._head]] if self.size else None

    def pop_head(self, now_ms: int) -> str:
        if not self.size:
            raise InvariantViolation("pop from an empty line")
        seq = self._order[self._head]
        self._head += 1
        if self._head >= _COMPACT_AFTER and self._head * 2 >= len(self._order):
            del self._order[: self._head]
            self._head = 0
        user_id = self._user_of.pop(seq)
        del self._seq_of[user_id]
        self.size -= 1
        self.departures += 1
        self._advanced(now_ms)
        return user_id

    def remove(self, user_id: str, now_ms: int) -> int:
        """Take a user out of the line; returns their sequence number."""
        seq = self._seq_of.pop(user_id)
        index = _bisect_left(self._order, seq, self._head)
        was_head = index == self._head
        del self._order[index]
        del self._user_of[seq]
        self.size -= 1
        self.departures += 1
        if was_head:
            self._advanced(now_ms)
        return seq

    def seq_of(self, user_id: str) -> int | None:
        return self._seq_of.get(user_id)

    def position(self, user_id: str) -> int | None:
        """1-based place in line, or None if the user is not waiting."""
        seq = self._seq_of.get(user_id)
        if seq is None:
            return None
        return _bisect_left(self._order, seq, self._head) - self._head + 1

    def estimated_wait_ms(self, position: int, now_ms: int, prior_interval_ms: int) -> int:
        """Position times the observed interval between head advances.

        With fewer than two observations the prior (one hold TTL shared by the
        slot's capacity) stands in. The gap since the last advance counts as
        an interval too once it is longer than the average, so a line that
        stalled does not keep promising its old pace.
        """
        samples = len(self._advances_ms)
        latest_ms = self._last_advance_ms
        if samples >= 2:
            oldest_ms = self._advances_ms[self._oldest_advance]
            interval = (latest_ms - oldest_ms) / (samples - 1)
            interval = max(interval, float(now_ms - latest_ms))
        elif samples == 1:
            interval = max(float(prior_interval_ms), float(now_ms - latest_ms))
        else:
            interval = float(prior_interval_ms)
        return int(position * interval)

    def _advanced(self, now_ms: int) -> None:
        samples = self._advances_ms
        if len(samples) < WAIT_ESTIMATE_SAMPLES_MAX:
            samples.append(now_ms)
        else:
            samples[self._oldest_advance] = now_ms
            self._oldest_advance = (self._oldest_advance + 1) % WAIT_ESTIMATE_SAMPLES_MAX
        self._last_advance_ms = now_ms

    def check(self) -> None:
        require(
            self.size == len(self._order) - self._head == len(self._seq_of) == len(self._user_of),
            "line sizes differ",
        )
        for user_id, seq in self._seq_of.items():
            require(self._user_of.get(seq) == user_id, f"line maps disagree for {user_id}")
            require(seq < self._next_seq, "sequence number from the future")
        require(self._order[self._head :] == sorted(self._user_of), "line order broken")

    def _insert(self, user_id: str, seq: int) -> None:
        self.size += 1
        order = self._order
        if not order or order[-1] < seq:
            order.append(seq)
        else:  # only a restore from storage can come out of order
            order.insert(_bisect_left(order, seq, self._head), seq)
        self._seq_of[user_id] = seq
        self._user_of[seq] = user_id


def describe_wait(seconds: int | None) -> str | None:
    """A human estimate: "~6 minutes" (rounded up, never "~0").

    Here rather than beside the records it describes: every queue view asks
    for it, and this module is compiled in the native build.
    """
    if seconds is None:
        return None
    if seconds < 60:
        return "less than a minute"
    if seconds < 3_600:
        minutes = -(-seconds // 60)
        return f"~{minutes} minute" + ("s" if minutes != 1 else "")
    hours = -(-seconds // 3_600)
    return f"~{hours} hour" + ("s" if hours != 1 else "")

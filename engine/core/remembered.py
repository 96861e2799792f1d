"""What a shard remembers of the requests it decided: outcomes and idempotency keys.

``RequestMemory`` owns two memories and their pruning. Every state-changing
request id's first result is kept for ``REQUEST_OUTCOMES_RETENTION_MS`` (at
most about ``REQUEST_OUTCOMES_MAX``), so that a batch retried after an actor
failure gets its first results instead of applying twice. A client's
Idempotency-Key is kept per (user, command, key) with the command's
fingerprint (``engine/core/fingerprint.py``) and its first result for
``IDEMPOTENCY_RETENTION_MS`` (at most ``IDEMPOTENCY_RECORDS_MAX``), tagged
with the partition of the command's routing id, so that a partition handed
to another shard takes its keys along (``forget_keys`` here, ``merge_keys``
there). What was remembered since the last ``drain`` is also logged, for
storage.

It must never decide a command nor touch slots, bookings or events: the shard
(``engine/core/shard.py``) asks it and tells it, nothing else does.
"""

import heapq
from collections import deque
from collections.abc import Iterable
from typing import Final

from engine.core.limits import (
    IDEMPOTENCY_RECORDS_MAX,
    IDEMPOTENCY_RETENTION_MS,
    REQUEST_OUTCOMES_MAX,
    REQUEST_OUTCOMES_RETENTION_MS,
)
from engine.core.protocol import AnyResult, KeyRecord, OutcomeRecord

# (user id, command name, key)
IdempotencyScope = tuple[str, str, str]
_OutcomeRecord: Final = OutcomeRecord


class RequestMemory:
    def __init__(self) -> None:
        # request id -> first result
        self.outcomes: dict[str, AnyResult] = {}
        # The same request ids grouped by the millisecond they were remembered
        # in, oldest first: a command appends to the current group, and only a
        # new millisecond (once per batch, not per command) prunes.
        self._outcome_groups: deque[tuple[int, list[str]]] = deque()
        self._outcome_group: list[str] = []
        self._outcome_group_ms = -1
        # (user, command, key) -> (when, fingerprint, first result, partition or
        # -1), and the same oldest first: every record has the same retention,
        # so the oldest expires first and pruning never scans.
        self.keys: dict[IdempotencyScope, tuple[int, bytes, AnyResult, int]] = {}
        self._key_order: deque[tuple[int, IdempotencyScope]] = deque()
        # What was remembered since the last drain, for storage.
        self._outcome_log: list[OutcomeRecord] = []
        self._key_log: list[KeyRecord] = []

    def remember_outcome(self, request_id: str, result: AnyResult, now_ms: int) -> None:
        self.outcomes[request_id] = result
        self._outcome_log.append(_OutcomeRecord(request_id, now_ms, result))
        if now_ms == self._outcome_group_ms:
            self._outcome_group.append(request_id)
            return
        self._forget_outcomes(now_ms)
        self._outcome_group_ms = now_ms
        self._outcome_group = [request_id]
        self._outcome_groups.append((now_ms, self._outcome_group))

    def _forget_outcomes(self, now_ms: int) -> None:
        """Drop the outcomes past their retention, and the oldest beyond the cap.

        Whole milliseconds go at a time, so the cap can be exceeded by the
        commands of one millisecond until the next one starts.
        """
        groups = self._outcome_groups
        outcomes = self.outcomes
        oldest_allowed_ms = now_ms - REQUEST_OUTCOMES_RETENTION_MS
        while groups and (groups[0][0] < oldest_allowed_ms or len(outcomes) > REQUEST_OUTCOMES_MAX):
            for request_id in groups.popleft()[1]:
                # Present unless storage handed the same request id over twice.
                if request_id in outcomes:
                    del outcomes[request_id]

    def remember_key(
        self,
        scope: IdempotencyScope,
        fingerprint: bytes,
        result: AnyResult,
        now_ms: int,
        *,
        partition: int = -1,
    ) -> None:
        """``partition``: that of the command's routing id, -1 when it has none."""
        self.keys[scope] = (now_ms, fingerprint, result, partition)
        self._key_log.append(
            KeyRecord(scope[0], scope[1], scope[2], now_ms, fingerprint, result, partition)
        )
        self._key_order.append((now_ms, scope))
        self._forget_keys_before(now_ms)

    def _forget_keys_before(self, now_ms: int) -> None:
        """Drop the keys past their retention at ``now_ms``, and the oldest beyond the cap."""
        records = self.keys
        order = self._key_order
        expired_before_ms = now_ms - IDEMPOTENCY_RETENTION_MS
        while order and (len(order) > IDEMPOTENCY_RECORDS_MAX or order[0][0] <= expired_before_ms):
            at_ms, old = order.popleft()
            record = records.get(old)
            # A key re-used after its retention has a newer record: keep that one.
            if record is not None and record[0] == at_ms:
                del records[old]

    def merge_keys(self, keys: Iterable[KeyRecord]) -> None:
        """Remember keys storage kept, beside the ones remembered here; logs nothing.

        A scope remembered here already keeps the later of its two records (the
        stored one on a tie, as ``restore`` replays storage in order).
        """
        records = self.keys
        added: list[tuple[int, IdempotencyScope]] = []
        for key in sorted(keys, key=lambda k: k.at_ms):
            scope = (key.user_id, key.command, key.key)
            current = records.get(scope)
            if current is not None and current[0] > key.at_ms:
                continue
            records[scope] = (key.at_ms, key.fingerprint, key.result, key.partition)
            added.append((key.at_ms, scope))
        if not added:
            return
        order = self._key_order
        if order and order[-1][0] > added[0][0]:
            # Older than some remembered here: the order must stay oldest first.
            self._key_order = deque(heapq.merge(order, added, key=lambda entry: entry[0]))
        else:
            order.extend(added)
        self._forget_keys_before(self._key_order[-1][0])

    def merge_outcomes(self, outcomes: Iterable[OutcomeRecord], now_ms: int) -> None:
        """Remember outcomes another shard decided (their partition moved here), beside
        the ones remembered here; logs nothing. They are kept as if remembered at
        ``now_ms`` (the pruning stays oldest first): a little longer than their own
        retention, never shorter. A request id remembered here already keeps its own."""
        known = self.outcomes
        fresh = {o.request_id: o.result for o in outcomes if o.request_id not in known}
        if not fresh:
            return
        known.update(fresh)
        merged = list(fresh)
        if now_ms == self._outcome_group_ms:
            self._outcome_group.extend(merged)
            return
        self._forget_outcomes(now_ms)
        self._outcome_group_ms = now_ms
        self._outcome_group = merged
        self._outcome_groups.append((now_ms, self._outcome_group))

    def forget_keys(self, partitions: frozenset[int]) -> None:
        """Forget the keys of these partitions (the shard no longer serves them);
        the ones of no known partition (-1) stay."""
        records = self.keys
        for scope in [s for s, record in records.items() if record[3] in partitions]:
            del records[scope]
        kept: deque[tuple[int, IdempotencyScope]] = deque()
        for at_ms, scope in self._key_order:
            record = records.get(scope)
            if record is not None and record[0] == at_ms:
                kept.append((at_ms, scope))
        self._key_order = kept

    def restore(self, outcomes: Iterable[OutcomeRecord], keys: Iterable[KeyRecord]) -> None:
        """Remember what storage kept, as if it had been decided here; logs nothing."""
        for outcome in sorted(outcomes, key=lambda o: o.at_ms):
            self.remember_outcome(outcome.request_id, outcome.result, outcome.at_ms)
        self.merge_keys(keys)
        # Storage has all of this already.
        self._outcome_log = []

    def drain(self) -> tuple[list[OutcomeRecord], list[KeyRecord]]:
        """Request outcomes and idempotency records remembered since the last call."""
        outcomes, self._outcome_log = self._outcome_log, []
        keys, self._key_log = self._key_log, []
        return outcomes, keys

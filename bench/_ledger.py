"""The client side of the fault scenarios (``failover``, ``rebalance``, ``chaos``):
callers with a ledger of every change they were acknowledged, probers, and the
checks of that ledger against PostgreSQL.

The ledger holds what the clients were told: each booking's latest acknowledged
status, and the request id of every acknowledged change (a hold, a queue join, a
confirmation, a cancellation, a queue leave), which leaves an audit row. The
check finds an acknowledged change lost when its booking is not at its
acknowledged status or a later one, or its request left no audit row; and the
violations: slots over capacity, users with two active bookings of a slot, and
the findings of the reconciliation checks (``persistence.checks``).

It must never change what it checks: it only reads the database, and it may run
while the load goes on (what it compares is what was acknowledged when it began).
"""

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

from engine.core import protocol as p
from engine.core.routing import shard_of, shard_of_resource
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.errors import ShellError

PROBE_EVERY_S: Final = 0.05
# A caller pauses after a 503 before its next request, as a client honouring
# retryAfter would, if for less.
PAUSE_AFTER_503_S: Final = 0.05
# The answers that acknowledge a change (each leaves an audit row under its request
# id); a Reserve or JoinQueue answered 200 found the hold or the place already there.
CHANGES: Final = {
    p.Reserve: (201, 202),
    p.JoinQueue: (201, 202),
    p.Confirm: (200,),
    p.Cancel: (200,),
    p.LeaveQueue: (204,),
}


@dataclass
class Ledger:
    """What the clients were told: every acknowledged change, and every 503."""

    # Booking id -> the latest status a client was acknowledged.
    bookings: dict[str, str] = field(default_factory=dict)
    # Request id of every acknowledged change -> "<command> <status>".
    changes: dict[str, str] = field(default_factory=dict)
    answered: int = 0
    unavailable: int = 0
    unavailable_by_shard: dict[int, int] = field(default_factory=dict)
    # Per shard: when (monotonic seconds) each 503 was given.
    failed_at: dict[int, list[float]] = field(default_factory=dict)

    def record(self, command: p.AnyCommand, result: p.AnyResult) -> None:
        self.answered += 1
        if isinstance(result, p.Failure):
            return
        if result.status in CHANGES.get(type(command), ()):
            self.changes[command.request_id] = f"{type(command).__name__} {result.status}"
        if isinstance(result, p.BookingResult):
            self.bookings[result.booking.id] = result.booking.status.value

    def failed(self, shard: int | None) -> None:
        self.unavailable += 1
        if shard is not None:
            self.unavailable_by_shard[shard] = self.unavailable_by_shard.get(shard, 0) + 1
            self.failed_at.setdefault(shard, []).append(time.monotonic())


class Load:
    """Callers and probers on one client, until ``stopping`` is set."""

    def __init__(self, client: EngineClient, ledger: Ledger, shard_count: int) -> None:
        self.client = client
        self.ledger = ledger
        self.shard_count = shard_count
        self.ids = RequestIds()
        self.stopping = asyncio.Event()
        # Per shard: (sent, answered, served) of every probe, monotonic seconds.
        self.probes: dict[int, list[tuple[float, float, bool]]] = {}

    async def execute(self, command: p.AnyCommand, routed_by: str) -> p.AnyResult | None:
        """The result, recorded; None (and a 503 counted) when the engine did not answer.

        Every ``ShellError`` is a 503 with ``retryAfter`` at the gateway
        (``gateway.http.engine_unavailable``), as is a shard's own 503.
        """
        try:
            result = await self.client.execute(command)
        except ShellError:
            self.ledger.failed(shard_of(routed_by, self.shard_count))
            return None
        self.ledger.record(command, result)
        if isinstance(result, p.Failure) and result.status == 503:
            self.ledger.failed(shard_of(routed_by, self.shard_count))
        return result

    async def caller(self, user: str, slots: list[str], seed: float) -> None:
        rng = random.Random(seed)
        ids = self.ids
        while not self.stopping.is_set():
            slot_id = rng.choice(slots)
            held = await self.execute(
                p.Reserve(request_id=ids.next(), slot_id=slot_id, user_id=user), slot_id
            )
            booking_id: str | None = None
            if isinstance(held, p.BookingResult) and held.status == 201:
                booking_id = held.booking.id
            elif isinstance(held, p.QueueResult):
                if rng.random() < 0.5:
                    await self.execute(
                        p.LeaveQueue(request_id=ids.next(), slot_id=slot_id, user_id=user), slot_id
                    )
                continue
            elif held is None:
                await asyncio.sleep(PAUSE_AFTER_503_S)
                continue
            else:
                # Refused (the queue full, already booked): a moment before the next try.
                await asyncio.sleep(PROBE_EVERY_S)
                continue
            confirmed = await self.execute(
                p.Confirm(request_id=ids.next(), booking_id=booking_id, user_id=user), booking_id
            )
            if isinstance(confirmed, p.BookingResult) and rng.random() < 0.7:
                await self.execute(
                    p.Cancel(request_id=ids.next(), booking_id=booking_id, user_id=user),
                    booking_id,
                )

    async def prober(self, shard: int, slot_id: str) -> None:
        samples = self.probes.setdefault(shard, [])
        while not self.stopping.is_set():
            sent = time.monotonic()
            result = await self.execute(
                p.GetSlot(request_id=self.ids.next(), slot_id=slot_id), slot_id
            )
            served = isinstance(result, p.SlotResult)
            samples.append((sent, time.monotonic(), served))
            await asyncio.sleep(PROBE_EVERY_S)

    def unavailable_s(self, shard: int, lost_at: float) -> float | None:
        """The longest the shard went without serving a probe, across the loss: from
        the last probe served before ``lost_at`` (or the latest answer before a gap
        after it) to the next one served. None: it never served again."""
        answers = sorted(answered for _, answered, served in self.probes.get(shard, []) if served)
        before = [at for at in answers if at < lost_at]
        after = [at for at in answers if at >= lost_at]
        if not after:
            return None
        previous = before[-1] if before else lost_at
        longest = 0.0
        for at in after:
            longest = max(longest, at - previous)
            previous = at
        return round(longest, 3)


def resource_on(shard: int, shard_count: int, stem: str) -> str:
    """A resource id (and so its slots) routed to ``shard``."""
    n = 0
    while True:
        resource = f"{stem}-{n}-{uuid.uuid4().hex[:6]}"
        if shard_of_resource(resource, shard_count) == shard:
            return resource
        n += 1


async def check_changes(database_url: str, ledger: Ledger) -> list[str]:
    """Acknowledged changes whose request left no audit row: lost (their request ids)."""
    import asyncpg

    # What was acknowledged before the query: the load may go on meanwhile.
    acknowledged = list(ledger.changes)
    connection = await asyncpg.connect(database_url)
    try:
        found = {
            row["request_id"]
            for row in await connection.fetch(
                "SELECT DISTINCT request_id FROM audit_log WHERE request_id = ANY($1::text[])",
                acknowledged,
            )
        }
    finally:
        await connection.close()
    return [request_id for request_id in acknowledged if request_id not in found]


async def check_database(database_url: str, ledger: Ledger) -> dict[str, Any]:
    """Lost acknowledged changes and invariant violations as PostgreSQL has them."""
    import asyncpg

    from bench import _http
    from persistence.checks import VIOLATION_KINDS, check
    from persistence.reconcile import wall_clock_ms

    bookings = _http.Ledger(acknowledged=dict(ledger.bookings))
    found = await _http.check_database(database_url, bookings)
    unaudited = await check_changes(database_url, ledger)
    connection = await asyncpg.connect(database_url)
    try:
        report = await check(connection, now_ms=wall_clock_ms())
    finally:
        await connection.close()
    reconcile = {kind: n for kind, n in report.found.items() if n and kind in VIOLATION_KINDS}
    return {
        "acknowledged_changes": len(ledger.changes),
        "acknowledged_bookings": found["acknowledged_bookings"],
        "lost_acks": found["lost_acks"] + len(unaudited),
        "lost_ack_examples": found["lost_ack_examples"]
        + [f"{r} {ledger.changes[r]}" for r in unaudited[:5]],
        "violations": found["invariant_violations"] + sum(reconcile.values()),
        "slots_over_capacity": found["slots_over_capacity"],
        "users_with_two_active_bookings": found["users_with_two_active_bookings"],
        "reconcile_findings": reconcile,
    }

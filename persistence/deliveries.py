"""The outbox and its deliveries in PostgreSQL: what delivery workers take, claim and record.

Workers run anywhere and any number at once; PostgreSQL alone keeps them
apart:

- ``take_batches`` locks undispatched outbox batches with ``FOR UPDATE SKIP
  LOCKED``: within the caller's transaction, no other worker sees them; the
  caller adds their deliveries and marks them dispatched before it commits, so
  a batch is fanned out once (and again, harmlessly, only if that transaction
  is lost: a delivery's id names its event and target, so it is one row).
- ``claim_due`` leases due deliveries and counts the attempt in one statement;
  the attempt number is the fence: ``record_results`` changes a delivery only
  if no later attempt has been claimed since, so a worker that outlived its
  lease cannot overwrite what another did.

It must never decide what is delivered nor how (engine/notify does): it moves
rows.
"""

from dataclasses import dataclass
from typing import Any, Final

import asyncpg

# Delivery statuses (the deliveries table's CHECK).
PENDING: Final = "pending"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"
DEAD: Final = "dead"


@dataclass(frozen=True, slots=True)
class OutboxBatch:
    id: int
    shard: int
    committed_ms: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class NewDelivery:
    id: str
    event_id: str
    event_type: str
    channel: str
    endpoint_id: str | None
    user_id: str | None
    subject: str
    seq: int
    body: bytes
    next_attempt_ms: int
    committed_ms: int
    created_at_ms: int
    # A delivery attempted as it was fanned out is written with its outcome.
    status: str = PENDING
    attempts: int = 0
    last_error: str | None = None
    delivered_at_ms: int | None = None

    def first_attempt(self) -> "ClaimedDelivery":
        """This delivery as claimed for its first attempt."""
        return ClaimedDelivery(
            self.id, self.event_id, self.event_type, self.channel, self.endpoint_id,
            self.user_id, self.body, 1, self.committed_ms,
        )  # fmt: skip

    def attempted(self, result: "DeliveryResult") -> "NewDelivery":
        """This delivery as written after its first attempt ended with ``result``."""
        return NewDelivery(
            self.id, self.event_id, self.event_type, self.channel, self.endpoint_id,
            self.user_id, self.subject, self.seq, self.body, result.next_attempt_ms,
            self.committed_ms, self.created_at_ms, result.status, 1, result.error,
            result.at_ms if result.status == DELIVERED else None,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    id: str
    event_id: str
    event_type: str
    channel: str
    endpoint_id: str | None
    user_id: str | None
    body: bytes
    # This attempt's number (1 for the first): the fence of its result.
    attempt: int
    committed_ms: int


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    id: str
    attempt: int
    status: str
    # For FAILED: when the next attempt is due.
    next_attempt_ms: int
    error: str | None
    at_ms: int


@dataclass(frozen=True, slots=True)
class OutboxState:
    undispatched_events: int
    # When the oldest undispatched batch was committed, or None.
    oldest_undispatched_ms: int | None
    due_deliveries: int
    dead_deliveries: int


async def take_batches(connection: asyncpg.Connection, limit: int) -> list[OutboxBatch]:
    """Lock up to ``limit`` undispatched batches, oldest first (inside a transaction)."""
    rows = await connection.fetch(
        "SELECT id, shard, committed_ms, payload FROM outbox_batches"
        " WHERE dispatched_ms IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )
    return [OutboxBatch(r["id"], r["shard"], r["committed_ms"], r["payload"]) for r in rows]


async def slot_facts(connection: asyncpg.Connection, slot_ids: list[str]) -> dict[str, Any]:
    """Slot id -> its stored row (domain, resource, times, metadata), deleted ones too."""
    rows = await connection.fetch(
        "SELECT id, resource_id, domain, start_ms, end_ms, capacity, metadata::text AS metadata"
        " FROM slots WHERE id = ANY($1::text[])",
        slot_ids,
    )
    return {row["id"]: row for row in rows}


async def subscribed_endpoints(connection: asyncpg.Connection) -> list[tuple[str, frozenset[str]]]:
    """The live webhook endpoints and the events each takes."""
    rows = await connection.fetch(
        "SELECT id, events FROM webhook_endpoints WHERE deleted_at_ms IS NULL ORDER BY id"
    )
    return [(row["id"], frozenset(row["events"])) for row in rows]


async def users_with_contacts(connection: asyncpg.Connection, user_ids: list[str]) -> set[str]:
    rows = await connection.fetch(
        "SELECT user_id FROM contacts WHERE user_id = ANY($1::text[])", user_ids
    )
    return {row["user_id"] for row in rows}


# The columns a new delivery is written with, in NewDelivery's order.
_NEW_COLUMNS: Final = (
    "id", "event_id", "event_type", "channel", "endpoint_id", "user_id", "subject", "seq",
    "body", "next_attempt_ms", "committed_ms", "created_at_ms", "status", "attempts",
    "last_error", "delivered_at_ms",
)  # fmt: skip


async def add_deliveries(connection: asyncpg.Connection, deliveries: list[NewDelivery]) -> None:
    """Write new deliveries (inside the caller's transaction).

    By binary COPY, which costs PostgreSQL and the worker a third less than an
    INSERT a row, under a savepoint: a delivery's id is derived from its event
    and target, so one fanned out again (the same event in two batches) is the
    same row, and then the whole set is written again by an INSERT that keeps
    the rows already there as they are."""
    if not deliveries:
        return
    records = [(
        d.id, d.event_id, d.event_type, d.channel, d.endpoint_id, d.user_id, d.subject, d.seq,
        d.body, d.next_attempt_ms, d.committed_ms, d.created_at_ms, d.status, d.attempts,
        d.last_error, d.delivered_at_ms,
    ) for d in deliveries]  # fmt: skip
    try:
        async with connection.transaction():  # a savepoint: a conflict undoes only the copy
            await connection.copy_records_to_table(
                "deliveries", records=records, columns=_NEW_COLUMNS
            )
        return
    except asyncpg.UniqueViolationError:
        pass
    await connection.execute(
        "INSERT INTO deliveries (" + ", ".join(_NEW_COLUMNS) + ")"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
        " $6::text[], $7::text[], $8::integer[], $9::bytea[], $10::bigint[], $11::bigint[],"
        " $12::bigint[], $13::text[], $14::integer[], $15::text[], $16::bigint[])"
        " ON CONFLICT (id) DO NOTHING",
        *(list(column) for column in zip(*records, strict=True)),
    )


async def mark_dispatched(
    connection: asyncpg.Connection, batch_ids: list[int], now_ms: int
) -> None:
    await connection.execute(
        "UPDATE outbox_batches SET dispatched_ms = $2 WHERE id = ANY($1::bigint[])",
        batch_ids,
        now_ms,
    )


async def claim_due(
    connection: asyncpg.Connection, now_ms: int, lease_ms: int, limit: int
) -> list[ClaimedDelivery]:
    """Lease up to ``limit`` due deliveries (pending or failed, no live lease), counting
    the attempt: no other worker takes them until the lease lapses."""
    rows = await connection.fetch(
        "UPDATE deliveries d SET lease_until_ms = $1 + $2, attempts = d.attempts + 1"
        " FROM (SELECT id FROM deliveries"
        "        WHERE status IN ('pending', 'failed') AND next_attempt_ms <= $1"
        "          AND (lease_until_ms IS NULL OR lease_until_ms <= $1)"
        "        ORDER BY next_attempt_ms LIMIT $3 FOR UPDATE SKIP LOCKED) due"
        " WHERE d.id = due.id"
        " RETURNING d.id, d.event_id, d.event_type, d.channel, d.endpoint_id, d.user_id,"
        " d.body, d.attempts, d.committed_ms",
        now_ms,
        lease_ms,
        limit,
    )
    return [
        ClaimedDelivery(
            r["id"],
            r["event_id"],
            r["event_type"],
            r["channel"],
            r["endpoint_id"],
            r["user_id"],
            r["body"],
            r["attempts"],
            r["committed_ms"],
        )
        for r in rows
    ]


async def record_results(connection: asyncpg.Connection, results: list[DeliveryResult]) -> int:
    """Record attempts' outcomes; returns how many still held their attempt (the rest
    were claimed again meanwhile, or redelivered, and are left as they are)."""
    if not results:
        return 0
    status = await connection.execute(
        "UPDATE deliveries d SET status = r.status, lease_until_ms = NULL,"
        " last_error = r.error, next_attempt_ms = r.next_attempt_ms,"
        " delivered_at_ms = CASE WHEN r.status = 'delivered' THEN r.at_ms END"
        " FROM unnest($1::text[], $2::integer[], $3::text[], $4::bigint[], $5::text[],"
        "             $6::bigint[]) AS r (id, attempt, status, next_attempt_ms, error, at_ms)"
        " WHERE d.id = r.id AND d.attempts = r.attempt AND d.status IN ('pending', 'failed')",
        [r.id for r in results],
        [r.attempt for r in results],
        [r.status for r in results],
        [r.next_attempt_ms for r in results],
        [r.error for r in results],
        [r.at_ms for r in results],
    )
    return int(status.split()[-1])


async def outbox_state(connection: asyncpg.Connection, now_ms: int) -> OutboxState:
    row = await connection.fetchrow(
        "SELECT (SELECT coalesce(sum(events), 0) FROM outbox_batches"
        "         WHERE dispatched_ms IS NULL) AS undispatched,"
        "       (SELECT min(committed_ms) FROM outbox_batches"
        "         WHERE dispatched_ms IS NULL) AS oldest,"
        "       (SELECT count(*) FROM deliveries"
        "         WHERE status IN ('pending', 'failed') AND next_attempt_ms <= $1) AS due,"
        "       (SELECT count(*) FROM deliveries WHERE status = 'dead') AS dead",
        now_ms,
    )
    assert row is not None
    return OutboxState(int(row["undispatched"]), row["oldest"], row["due"], row["dead"])


async def purge_delivered(
    connection: asyncpg.Connection, older_than_ms: int, batch_rows: int = 5_000
) -> int:
    """Delete dispatched batches and delivered deliveries older than the cut-off (dead
    ones stay, visible and redeliverable, until their endpoint's deliveries are purged
    by hand); returns how many rows went."""
    batches = await connection.execute(
        "DELETE FROM outbox_batches WHERE id IN (SELECT id FROM outbox_batches"
        " WHERE dispatched_ms IS NOT NULL AND committed_ms < $1 ORDER BY id LIMIT $2)",
        older_than_ms,
        batch_rows,
    )
    delivered = await connection.execute(
        "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
        " WHERE status = 'delivered' AND created_at_ms < $1 LIMIT $2)",
        older_than_ms,
        batch_rows,
    )
    return int(batches.split()[-1]) + int(delivered.split()[-1])

"""The SQL a shard owner runs: taking a shard over (fence + reload) and writing a flush.

Every function takes an open asyncpg connection and runs inside the caller's
transaction discipline described on each. Nothing here decides a business
rule: the rows are what the engine's events say.
"""

from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import msgspec

from engine.core import limits
from engine.core.protocol import KeyRecord, OutcomeRecord
from engine.core.records import Booking, QueueEntry, StoredSlot
from persistence.rows import AUDIT_COLUMNS, FlushRows

# Final bookings and ended slots come back into memory for as long as the
# engine would have kept them there.
_BOOKING_COLUMNS: Final = (
    "id, slot_id, user_id, status, reserved_at_ms, expires_at_ms, confirmed_at_ms,"
    " completed_at_ms, cancelled_at_ms, cancel_reason, cancelled_by, refund_percentage,"
    " via_queue, version"
)
_ENTRY_COLUMNS: Final = (
    "slot_id, user_id, seq, status, joined_at_ms, last_seen_ms, notified_at_ms,"
    " booking_id, ended_at_ms, version"
)


class StaleToken(Exception):
    """The fence row holds a newer token (or the same token of another owner)."""

    def __init__(self, stored_token: int) -> None:
        super().__init__(f"the shard's fence holds token {stored_token}")
        self.stored_token = stored_token


class FenceRejected(Exception):
    """A flush carried a token older than the fence row's: another owner took over."""


@dataclass
class ShardSnapshot:
    shard: int
    token: int
    slots: list[StoredSlot]
    bookings: list[Booking]
    entries: list[QueueEntry]
    outcomes: list[OutcomeRecord]
    keys: list[KeyRecord]


class Codecs:
    """msgpack for remembered outcomes and results; JSON for slot metadata."""

    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.outcomes = msgspec.msgpack.Decoder(list[OutcomeRecord])
        self.result_of_key = msgspec.msgpack.Decoder(KeyRecord)
        self.metadata = msgspec.msgpack.Decoder(dict[str, Any])
        self.json = msgspec.json.Encoder()


async def fence_token(connection: asyncpg.Connection, shard: int) -> int:
    """The newest token that wrote for ``shard`` (0 if none)."""
    token = await connection.fetchval("SELECT token FROM shard_fences WHERE shard = $1", shard)
    return int(token or 0)


async def take_over(
    connection: asyncpg.Connection, shard: int, token: int, owner: str, now_ms: int
) -> ShardSnapshot:
    """Write ``token`` to the shard's fence and load the shard, in one transaction.

    The fence moves only to a newer token, or stays with the same token and
    owner (an owner reloading after a failed flush). Holding the fence row's
    lock while loading means a late flush of a previous owner either committed
    before (and is loaded) or runs after and is rejected: it can never land
    unseen between the takeover and this owner's first write.
    """
    async with connection.transaction():
        accepted = await connection.fetchval(
            """
            INSERT INTO shard_fences AS f (shard, token, owner) VALUES ($1, $2, $3)
            ON CONFLICT (shard) DO UPDATE SET token = EXCLUDED.token, owner = EXCLUDED.owner,
                                              updated_at = now()
             WHERE f.token < EXCLUDED.token
                OR (f.token = EXCLUDED.token AND f.owner = EXCLUDED.owner)
            RETURNING token
            """,
            shard,
            token,
            owner,
        )
        if accepted is None:
            raise StaleToken(await fence_token(connection, shard))
        return await _load(connection, shard, token, now_ms)


async def _load(
    connection: asyncpg.Connection, shard: int, token: int, now_ms: int
) -> ShardSnapshot:
    codecs = Codecs()
    ended_cutoff_ms = now_ms - limits.ENDED_SLOT_RETENTION_MS
    final_cutoff_ms = now_ms - limits.FINAL_BOOKING_RETENTION_MS
    slot_rows = await connection.fetch(
        """
        SELECT id, resource_id, domain, start_ms, end_ms, capacity, blocked,
               metadata::text AS metadata, version
          FROM slots
         WHERE shard = $1 AND deleted_at_ms IS NULL AND end_ms > $2
        """,
        shard,
        ended_cutoff_ms,
    )
    slots = [
        StoredSlot(
            id=row["id"],
            resource_id=row["resource_id"],
            domain=row["domain"],
            start_ms=row["start_ms"],
            end_ms=row["end_ms"],
            capacity=row["capacity"],
            blocked=row["blocked"],
            metadata=msgspec.Raw(codecs.encoder.encode(msgspec.json.decode(row["metadata"]))),
            version=row["version"],
        )
        for row in slot_rows
    ]
    booking_rows = await connection.fetch(
        f"""
        SELECT {", ".join("b." + c.strip() for c in _BOOKING_COLUMNS.split(","))}
          FROM bookings b JOIN slots s ON s.id = b.slot_id
         WHERE s.shard = $1 AND s.deleted_at_ms IS NULL AND s.end_ms > $2
           AND (b.status IN ('RESERVED', 'CONFIRMED') OR b.updated_at_ms > $3)
        """,
        shard,
        ended_cutoff_ms,
        final_cutoff_ms,
    )
    bookings = msgspec.convert([dict(row) for row in booking_rows], list[Booking])
    entry_rows = await connection.fetch(
        f"""
        SELECT {", ".join("q." + c.strip() for c in _ENTRY_COLUMNS.split(","))}
          FROM queue_entries q JOIN slots s ON s.id = q.slot_id
         WHERE s.shard = $1 AND s.deleted_at_ms IS NULL AND s.end_ms > $2
        """,
        shard,
        ended_cutoff_ms,
    )
    entries = msgspec.convert([dict(row) for row in entry_rows], list[QueueEntry])
    outcome_rows = await connection.fetch(
        """
        SELECT outcomes FROM request_outcomes
         WHERE shard = $1 AND at_ms > $2
         ORDER BY id DESC
        """,
        shard,
        now_ms - limits.REQUEST_OUTCOMES_RETENTION_MS,
    )
    outcomes: list[OutcomeRecord] = []
    for row in outcome_rows:
        outcomes.extend(codecs.outcomes.decode(row["outcomes"]))
        if len(outcomes) >= limits.REQUEST_OUTCOMES_MAX:
            break
    key_rows = await connection.fetch(
        """
        SELECT user_id, command, key, at_ms, fingerprint, result
          FROM idempotency_records
         WHERE shard = $1 AND at_ms > $2
         ORDER BY at_ms DESC
         LIMIT $3
        """,
        shard,
        now_ms - limits.IDEMPOTENCY_RETENTION_MS,
        limits.IDEMPOTENCY_RECORDS_MAX,
    )
    keys = [
        KeyRecord(
            row["user_id"],
            row["command"],
            row["key"],
            row["at_ms"],
            bytes(row["fingerprint"]),
            codecs.result_of_key.decode(row["result"]).result,
        )
        for row in key_rows
    ]
    return ShardSnapshot(shard, token, slots, bookings, entries, outcomes, keys)


async def write_flush(
    connection: asyncpg.Connection,
    rows: FlushRows,
    token: int,
    owner: str,
    codecs: Codecs,
    *,
    fence_check: bool = True,
) -> None:
    """Write one flush in the caller's transaction, after checking the fence.

    ``fence_check=False`` exists only so a test can show what the fence
    prevents; nothing else may pass it.
    """
    if fence_check:
        advanced = await connection.fetchval(
            """
            UPDATE shard_fences SET token = $2, owner = $3, updated_at = now()
             WHERE shard = $1 AND (token < $2 OR (token = $2 AND owner = $3))
            RETURNING token
            """,
            rows.shard,
            token,
            owner,
        )
        if advanced is None:
            raise FenceRejected(f"shard {rows.shard}: token {token} of {owner} is fenced off")
    if rows.slots:
        await _write_slots(connection, rows, codecs)
    if rows.bookings:
        await _write_bookings(connection, rows)
    if rows.entries:
        await _write_entries(connection, rows)
    if rows.audit:
        await connection.copy_records_to_table(
            "audit_log", records=rows.audit, columns=AUDIT_COLUMNS
        )
    if rows.outcomes:
        await connection.execute(
            "INSERT INTO request_outcomes (shard, at_ms, requests, outcomes)"
            " VALUES ($1, $2, $3, $4)",
            rows.shard,
            rows.outcomes[-1].at_ms,
            len(rows.outcomes),
            codecs.encoder.encode(rows.outcomes),
        )
    if rows.keys:
        latest = {(k.user_id, k.command, k.key): k for k in rows.keys}
        await connection.execute(
            """
            INSERT INTO idempotency_records
                   (shard, user_id, command, key, at_ms, fingerprint, result)
            SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::int8[],
                                     $6::bytea[], $7::bytea[])
            ON CONFLICT (shard, user_id, command, key) DO UPDATE
               SET at_ms = EXCLUDED.at_ms, fingerprint = EXCLUDED.fingerprint,
                   result = EXCLUDED.result
            """,
            rows.shard,
            [k.user_id for k in latest.values()],
            [k.command for k in latest.values()],
            [k.key for k in latest.values()],
            [k.at_ms for k in latest.values()],
            [k.fingerprint for k in latest.values()],
            [codecs.encoder.encode(k) for k in latest.values()],
        )


async def _write_slots(connection: asyncpg.Connection, rows: FlushRows, codecs: Codecs) -> None:
    slots = list(rows.slots.values())
    await connection.execute(
        """
        INSERT INTO slots (id, shard, resource_id, domain, start_ms, end_ms, capacity, blocked,
                           metadata, version, created_at_ms, updated_at_ms, deleted_at_ms)
        SELECT u.id, $1, u.resource_id, u.domain, u.start_ms, u.end_ms, u.capacity, u.blocked,
               u.metadata::jsonb, u.version, u.created_at_ms, u.updated_at_ms, u.deleted_at_ms
          FROM unnest($2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int4[],
                      $8::bool[], $9::text[], $10::int4[], $11::int8[], $12::int8[], $13::int8[])
               AS u (id, resource_id, domain, start_ms, end_ms, capacity, blocked, metadata,
                     version, created_at_ms, updated_at_ms, deleted_at_ms)
        ON CONFLICT (id) DO UPDATE
           SET start_ms = EXCLUDED.start_ms, end_ms = EXCLUDED.end_ms,
               capacity = EXCLUDED.capacity, blocked = EXCLUDED.blocked,
               metadata = EXCLUDED.metadata, version = EXCLUDED.version,
               updated_at_ms = EXCLUDED.updated_at_ms, deleted_at_ms = EXCLUDED.deleted_at_ms
        """,
        rows.shard,
        [s.view.id for s in slots],
        [s.view.resource_id for s in slots],
        [s.view.domain for s in slots],
        [s.view.start_ms for s in slots],
        [s.view.end_ms for s in slots],
        [s.view.capacity for s in slots],
        [s.view.blocked for s in slots],
        [codecs.json.encode(codecs.metadata.decode(s.view.metadata)).decode() for s in slots],
        [s.view.version for s in slots],
        [s.created_at_ms for s in slots],
        [s.updated_at_ms for s in slots],
        [s.deleted_at_ms for s in slots],
    )


async def _write_bookings(connection: asyncpg.Connection, rows: FlushRows) -> None:
    bookings = rows.bookings_final_first()
    await connection.execute(
        """
        INSERT INTO bookings (id, slot_id, user_id, status, reserved_at_ms, expires_at_ms,
                              confirmed_at_ms, completed_at_ms, cancelled_at_ms, cancel_reason,
                              cancelled_by, refund_percentage, via_queue, version, updated_at_ms)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[],
                             $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::text[],
                             $11::text[], $12::int2[], $13::bool[], $14::int4[], $15::int8[])
        ON CONFLICT (id) DO UPDATE
           SET status = EXCLUDED.status, expires_at_ms = EXCLUDED.expires_at_ms,
               confirmed_at_ms = EXCLUDED.confirmed_at_ms,
               completed_at_ms = EXCLUDED.completed_at_ms,
               cancelled_at_ms = EXCLUDED.cancelled_at_ms,
               cancel_reason = EXCLUDED.cancel_reason, cancelled_by = EXCLUDED.cancelled_by,
               refund_percentage = EXCLUDED.refund_percentage, version = EXCLUDED.version,
               updated_at_ms = EXCLUDED.updated_at_ms
         WHERE bookings.version <= EXCLUDED.version
        """,
        [b.id for b, _ in bookings],
        [b.slot_id for b, _ in bookings],
        [b.user_id for b, _ in bookings],
        [b.status.value for b, _ in bookings],
        [b.reserved_at_ms for b, _ in bookings],
        [b.expires_at_ms for b, _ in bookings],
        [b.confirmed_at_ms for b, _ in bookings],
        [b.completed_at_ms for b, _ in bookings],
        [b.cancelled_at_ms for b, _ in bookings],
        [b.cancel_reason for b, _ in bookings],
        [b.cancelled_by for b, _ in bookings],
        [b.refund_percentage for b, _ in bookings],
        [b.via_queue for b, _ in bookings],
        [b.version for b, _ in bookings],
        [at_ms for _, at_ms in bookings],
    )


async def _write_entries(connection: asyncpg.Connection, rows: FlushRows) -> None:
    left = [key for key, value in rows.entries.items() if value is None]
    kept = [value for value in rows.entries.values() if value is not None]
    if left:
        await connection.execute(
            """
            DELETE FROM queue_entries q
             USING unnest($1::text[], $2::text[]) AS gone (slot_id, user_id)
             WHERE q.slot_id = gone.slot_id AND q.user_id = gone.user_id
            """,
            [slot_id for slot_id, _ in left],
            [user_id for _, user_id in left],
        )
    if kept:
        await connection.execute(
            """
            INSERT INTO queue_entries (slot_id, user_id, seq, status, joined_at_ms, last_seen_ms,
                                       notified_at_ms, booking_id, ended_at_ms, version,
                                       updated_at_ms)
            SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[],
                                 $6::int8[], $7::int8[], $8::text[], $9::int8[], $10::int4[],
                                 $11::int8[])
            ON CONFLICT (slot_id, user_id) DO UPDATE
               SET seq = EXCLUDED.seq, status = EXCLUDED.status,
                   joined_at_ms = EXCLUDED.joined_at_ms, last_seen_ms = EXCLUDED.last_seen_ms,
                   notified_at_ms = EXCLUDED.notified_at_ms, booking_id = EXCLUDED.booking_id,
                   ended_at_ms = EXCLUDED.ended_at_ms, version = EXCLUDED.version,
                   updated_at_ms = EXCLUDED.updated_at_ms
            """,
            [e.slot_id for e, _ in kept],
            [e.user_id for e, _ in kept],
            [e.seq for e, _ in kept],
            [e.status.value for e, _ in kept],
            [e.joined_at_ms for e, _ in kept],
            [e.last_seen_ms for e, _ in kept],
            [e.notified_at_ms for e, _ in kept],
            [e.booking_id for e, _ in kept],
            [e.ended_at_ms for e, _ in kept],
            [e.version for e, _ in kept],
            [at_ms for _, at_ms in kept],
        )


async def purge_request_outcomes(connection: asyncpg.Connection, shard: int, now_ms: int) -> None:
    await connection.execute(
        "DELETE FROM request_outcomes WHERE shard = $1 AND at_ms < $2",
        shard,
        now_ms - limits.REQUEST_OUTCOMES_RETENTION_MS,
    )

"""The SQL a shard owner runs: taking a shard over (fence + reload of its partitions) and
writing a flush.

Every function takes an open asyncpg connection and runs inside the caller's
transaction discipline described on each. It must never decide a business
rule: the rows are what the engine's events say.
"""

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import msgspec

from engine.core import limits
from engine.core.protocol import KeyRecord, OutcomeRecord
from engine.core.records import Booking, QueueEntry, SlotView, StoredSlot
from engine.core.routing import PartitionSet, outcome_partition
from persistence import limits as storage_limits
from persistence.rows import FlushRows, SlotRow

# Final bookings and ended slots come back into memory for as long as the
# engine would have kept them there.
_BOOKING_COLUMNS: Final = (
    "id, slot_id, user_id, status, reserved_at_ms, expires_at_ms, confirmed_at_ms,"
    " completed_at_ms, cancelled_at_ms, cancel_reason, cancelled_by, refund_percentage,"
    " via_queue, version, extensions"
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
    """A flush carried a token older than the fence row's (another owner took over), or
    the generation of a partition set that has changed since (a partition moved)."""


class PartitionsMoved(FenceRejected):
    """Only the generation moved on: the owner still owns the shard, but a partition
    left or joined it since it loaded, so it reloads them (nothing was written)."""


class NotPartitioned(Exception):
    """The database has no partition map yet (``persistence.partitioning`` creates it)."""


@dataclass
class ShardSnapshot:
    shard: int
    token: int
    # The partitions loaded, and the generation of that set at the load: a
    # flush carries it, and is refused once a partition has moved.
    partitions: PartitionSet
    generation: int
    slots: list[StoredSlot]
    bookings: list[Booking]
    entries: list[QueueEntry]
    outcomes: list[OutcomeRecord]
    keys: list[KeyRecord]
    # When the shard last committed before this load (its fence row's last
    # change, a flush or a takeover, in the database's clock; None: never).
    # Set by ``take_over`` only.
    committed_at_ms: int | None = None


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
    token = await connection.fetchval(
        "SELECT token FROM shard_fences WHERE shard = $1",
        shard,
        timeout=storage_limits.DATABASE_STATEMENT_TIMEOUT_MS / 1000,
    )
    return int(token or 0)


async def take_over(
    connection: asyncpg.Connection,
    shard: int,
    token: int,
    owner: str,
    now_ms: int,
    *,
    timeout_s: float = storage_limits.SHARD_LOAD_TIMEOUT_MS / 1000,
) -> ShardSnapshot:
    """Write ``token`` to the shard's fence and load the partitions the map gives the
    shard, in one transaction.

    The fence moves only to a newer token, or stays with the same token and
    owner. Holding the fence row's lock while loading means a late flush of a
    previous owner (or of this owner's state before a reload, which had an
    older token) either committed before (and is loaded) or runs after and is
    rejected: it can never land unseen between the takeover and this owner's
    first write. A move of a partition raises the generation under the same
    lock, so it either happened before (and the partitions read here are the
    new ones) or waits for this load and then fences it off. Each statement
    may take ``timeout_s``. Raises ``NotPartitioned`` for a database without
    a partition map.
    """
    async with connection.transaction():
        # The fence row as it was (every flush and takeover stamps updated_at):
        # when the shard last committed, read in the same statement.
        accepted = await connection.fetchrow(
            """
            WITH before AS (SELECT updated_at FROM shard_fences WHERE shard = $1)
            INSERT INTO shard_fences AS f (shard, token, owner) VALUES ($1, $2, $3)
            ON CONFLICT (shard) DO UPDATE SET token = EXCLUDED.token, owner = EXCLUDED.owner,
                                              updated_at = now()
             WHERE f.token < EXCLUDED.token
                OR (f.token = EXCLUDED.token AND f.owner = EXCLUDED.owner)
            RETURNING token, generation,
                      (SELECT (extract(epoch FROM updated_at) * 1000)::bigint FROM before)
                          AS committed_at_ms
            """,
            shard,
            token,
            owner,
            timeout=timeout_s,
        )
        if accepted is None:
            raise StaleToken(await fence_token(connection, shard))
        count = await connection.fetchval("SELECT partitions FROM partition_map")
        if count is None:
            raise NotPartitioned("the database has no partition map yet")
        owned = await connection.fetch(
            "SELECT partition FROM partitions WHERE shard = $1", shard, timeout=timeout_s
        )
        partitions = PartitionSet(count, frozenset(row["partition"] for row in owned))
        snapshot = await _load(
            connection, shard, token, accepted["generation"], partitions, now_ms, timeout_s
        )
        # Partitions that came from another shard lately bring its outcomes of them.
        snapshot.outcomes.extend(
            await _moved_outcomes(connection, shard, partitions.owned, now_ms, timeout_s)
        )
        snapshot.committed_at_ms = accepted["committed_at_ms"]
        return snapshot


async def hand_over(
    connection: asyncpg.Connection,
    shard: int,
    token: int,
    owner: str,
    generation: int,
    moves: Mapping[int, int],
) -> int:
    """The old owner's side of a live move: its ``moves`` (partition -> new shard)
    are served by their new shards from this commit on. Returns the shard's new
    generation, which its later flushes carry.

    Run by the owner on its writer's connection after every flush of the moving
    partitions committed (and once nothing in its memory can change them), in
    one transaction: the map row's lock (moves never interleave), then the
    shard's own fence row, which must still hold ``token``, ``owner`` and
    ``generation`` (else ``FenceRejected`` for another owner's token, or
    ``PartitionsMoved`` when a move this owner did not make came first: it
    reloads), its generation raised, and the partitions reassigned. Raises
    ``PartitionsMoved`` too when a partition of ``moves`` is not on this shard
    any more. The new shards' fence rows are left alone: each
    takes its partitions (``take_partitions``) once this has committed.
    """
    async with connection.transaction():
        await connection.execute("SELECT 1 FROM partition_map FOR UPDATE")
        raised = await connection.fetchval(
            "UPDATE shard_fences SET generation = generation + 1, updated_at = now()"
            " WHERE shard = $1 AND token = $2 AND owner = $3 AND generation = $4"
            " RETURNING generation",
            shard,
            token,
            owner,
            generation,
        )
        if raised is None:
            fence = await connection.fetchrow(
                "SELECT token, owner FROM shard_fences WHERE shard = $1", shard
            )
            if fence is not None and (fence["token"], fence["owner"]) == (token, owner):
                # Still the owner, but a partition was moved by force meanwhile.
                raise PartitionsMoved(f"shard {shard}: generation {generation} has moved on")
            raise FenceRejected(f"shard {shard}: token {token} of {owner} is fenced off")
        held = await connection.fetchval(
            "SELECT count(*) FROM partitions WHERE partition = ANY($1::int[]) AND shard = $2",
            list(moves),
            shard,
        )
        if held != len(moves):
            raise PartitionsMoved(f"shard {shard}: a partition to hand over is not its own")
        await connection.execute(
            "UPDATE partitions p SET shard = m.shard, previous_shard = p.shard, moved_at = now()"
            " FROM unnest($1::int[], $2::int[]) AS m (partition, shard)"
            " WHERE p.partition = m.partition",
            list(moves),
            list(moves.values()),
        )
        await connection.execute(
            "UPDATE partition_map SET version = version + 1, updated_at = now()"
        )
        return int(raised)


async def take_partitions(
    connection: asyncpg.Connection,
    shard: int,
    token: int,
    owner: str,
    loaded: PartitionSet,
    now_ms: int,
    *,
    timeout_s: float = storage_limits.SHARD_LOAD_TIMEOUT_MS / 1000,
) -> ShardSnapshot:
    """The new owner's side of a live move: the records of the partitions the map
    gives the shard beyond ``loaded`` (those it serves already), and the
    generation its flushes carry from now on.

    One transaction holding the shard's fence row, which must still hold
    ``token`` and ``owner`` (else ``FenceRejected``): a move raises only the
    old owner's generation, and the old owner committed everything of a
    partition before handing it over, so what is read here is complete and
    nobody else can write it any more. Raises ``PartitionsMoved`` when a
    partition of ``loaded`` is no longer the shard's (moved away without its
    release: the owner reloads everything). The snapshot's ``partitions`` are
    the added ones only (empty when there are none), and its ``outcomes`` the
    request outcomes their previous shards remembered of them lately.
    """
    async with connection.transaction():
        fence = await connection.fetchrow(
            "SELECT token, owner, generation FROM shard_fences WHERE shard = $1 FOR UPDATE",
            shard,
            timeout=timeout_s,
        )
        if fence is None or fence["token"] != token or fence["owner"] != owner:
            raise FenceRejected(f"shard {shard}: token {token} of {owner} is fenced off")
        mapped = frozenset(
            row["partition"]
            for row in await connection.fetch(
                "SELECT partition FROM partitions WHERE shard = $1", shard, timeout=timeout_s
            )
        )
        if not loaded.owned <= mapped:
            raise PartitionsMoved(f"shard {shard}: a partition it serves moved away")
        added = PartitionSet(loaded.partitions, mapped - loaded.owned)
        snapshot = await _load(
            connection,
            shard,
            token,
            fence["generation"],
            added,
            now_ms,
            timeout_s,
            adopting=True,
        )
        if added.owned:
            snapshot.outcomes = await _moved_outcomes(
                connection, shard, added.owned, now_ms, timeout_s
            )
        return snapshot


async def _moved_outcomes(
    connection: asyncpg.Connection,
    shard: int,
    added: frozenset[int],
    now_ms: int,
    timeout_s: float,
) -> list[OutcomeRecord]:
    """The request outcomes of ``added`` their previous shards remembered in the last
    ``MOVED_OUTCOMES_WINDOW_MS``: a change resent across the move (a gateway resends
    within its patience) gets its first answer, not a second run. Those of results
    that name no slot (a 204, a refusal: ``outcome_partition``) stay behind; such a
    change resent across a move is decided again."""
    sources = [
        row["previous_shard"]
        for row in await connection.fetch(
            "SELECT DISTINCT previous_shard FROM partitions"
            " WHERE partition = ANY($1::int[]) AND previous_shard IS NOT NULL"
            " AND previous_shard <> $2",
            sorted(added),
            shard,
            timeout=timeout_s,
        )
    ]
    if not sources:
        return []
    rows = await connection.fetch(
        """
        SELECT outcomes FROM request_outcomes
         WHERE shard = ANY($1::int[]) AND at_ms > $2
         ORDER BY id DESC
        """,
        sources,
        now_ms - storage_limits.MOVED_OUTCOMES_WINDOW_MS,
        timeout=timeout_s,
    )
    decoder = Codecs().outcomes
    partitions = await connection.fetchval("SELECT partitions FROM partition_map")
    found: list[OutcomeRecord] = []
    for row in rows:
        found.extend(
            outcome
            for outcome in decoder.decode(zlib.decompress(row["outcomes"]))
            if outcome_partition(outcome.result, partitions) in added
        )
        if len(found) >= limits.REQUEST_OUTCOMES_MAX:
            break
    return found


async def _load(
    connection: asyncpg.Connection,
    shard: int,
    token: int,
    generation: int,
    partitions: PartitionSet,
    now_ms: int,
    timeout_s: float,
    *,
    adopting: bool = False,
) -> ShardSnapshot:
    """The records of ``partitions``; with ``adopting`` (partitions joining a running
    shard) no request outcomes and only those partitions' idempotency records."""
    codecs = Codecs()
    owned = sorted(partitions.owned)
    ended_cutoff_ms = now_ms - limits.ENDED_SLOT_RETENTION_MS
    final_cutoff_ms = now_ms - limits.FINAL_BOOKING_RETENTION_MS
    slot_rows = await connection.fetch(
        """
        SELECT id, resource_id, domain, start_ms, end_ms, capacity, blocked,
               metadata::text AS metadata, version
          FROM slots
         WHERE partition = ANY($1::int[]) AND deleted_at_ms IS NULL AND end_ms > $2
        """,
        owned,
        ended_cutoff_ms,
        timeout=timeout_s,
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
         WHERE s.partition = ANY($1::int[]) AND s.deleted_at_ms IS NULL AND s.end_ms > $2
           AND (b.status IN ('RESERVED', 'CONFIRMED') OR b.updated_at_ms > $3)
        """,
        owned,
        ended_cutoff_ms,
        final_cutoff_ms,
        timeout=timeout_s,
    )
    bookings = msgspec.convert([dict(row) for row in booking_rows], list[Booking])
    entry_rows = await connection.fetch(
        f"""
        SELECT {", ".join("q." + c.strip() for c in _ENTRY_COLUMNS.split(","))}
          FROM queue_entries q JOIN slots s ON s.id = q.slot_id
         WHERE s.partition = ANY($1::int[]) AND s.deleted_at_ms IS NULL AND s.end_ms > $2
        """,
        owned,
        ended_cutoff_ms,
        timeout=timeout_s,
    )
    entries = msgspec.convert([dict(row) for row in entry_rows], list[QueueEntry])
    outcomes: list[OutcomeRecord] = []
    if not adopting:
        outcome_rows = await connection.fetch(
            """
            SELECT outcomes FROM request_outcomes
             WHERE shard = $1 AND at_ms > $2
             ORDER BY id DESC
            """,
            shard,
            now_ms - limits.REQUEST_OUTCOMES_RETENTION_MS,
            timeout=timeout_s,
        )
        for row in outcome_rows:
            outcomes.extend(codecs.outcomes.decode(zlib.decompress(row["outcomes"])))
            if len(outcomes) >= limits.REQUEST_OUTCOMES_MAX:
                break
    keys = await _load_keys(
        connection, None if adopting else shard, owned, now_ms, timeout_s, codecs
    )
    return ShardSnapshot(
        shard, token, partitions, generation, slots, bookings, entries, outcomes, keys
    )


async def _load_keys(
    connection: asyncpg.Connection,
    shard: int | None,
    owned: list[int],
    now_ms: int,
    timeout_s: float,
    codecs: Codecs,
) -> list[KeyRecord]:
    """The idempotency records of the ``owned`` partitions, whichever shard wrote them,
    and (given ``shard``) the shard's own records of no known partition."""
    key_rows = await connection.fetch(
        """
        SELECT user_id, command, key, at_ms, fingerprint, result, partition
          FROM idempotency_records
         WHERE (partition = ANY($1::int[]) OR (partition IS NULL AND shard = $2))
           AND at_ms > $3
         ORDER BY at_ms DESC
         LIMIT $4
        """,
        owned,
        -1 if shard is None else shard,
        now_ms - limits.IDEMPOTENCY_RETENTION_MS,
        limits.IDEMPOTENCY_RECORDS_MAX,
        timeout=timeout_s,
    )
    return [
        KeyRecord(
            row["user_id"],
            row["command"],
            row["key"],
            row["at_ms"],
            bytes(row["fingerprint"]),
            codecs.result_of_key.decode(row["result"]).result,
            -1 if row["partition"] is None else row["partition"],
        )
        for row in key_rows
    ]


FENCED_SQLSTATE: Final = "SLF01"
PARTITIONS_MOVED_SQLSTATE: Final = "SLF02"
OUTCOMES_COMPRESS_LEVEL: Final = 1


async def write_flush(
    connection: asyncpg.Connection,
    rows: FlushRows,
    token: int,
    owner: str,
    codecs: Codecs,
    *,
    generation: int = 0,
    fence_check: bool = True,
    outbox: bool = True,
) -> None:
    """Write one flush: one call of ``write_shard_flush``, one round trip, one transaction.

    ``outbox``: its notifiable events go to the transactional outbox in the same
    statement (``append_outbox``); off, none do.

    Raises ``FenceRejected`` when the fence has moved past ``token``, or past
    ``generation`` (the partition set the owner loaded has changed).
    ``fence_check=False`` exists only so a test can show what the fence
    prevents; nothing else may pass it.
    """
    changed, new = rows.split_bookings()
    committed_ms = int(time.time() * 1000)
    notifiable = rows.notifiable if outbox else []
    left = [key for key, value in rows.entries.items() if value is None]
    kept = [value for value in rows.entries.values() if value is not None]
    try:
        await connection.execute(
            # The outbox in the same statement, so the same transaction: an event
            # exists exactly when its change is committed.
            "SELECT write_shard_flush($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,"
            " $14, $15, $16), append_outbox($1, $17, $18, $19)",
            rows.shard,
            token,
            owner,
            generation,
            fence_check,
            [_slot_write(row.view, row, codecs) for row in rows.slots.values()],
            [_booking_write(b, at_ms) for b, at_ms in changed],
            [_booking_write(b, at_ms) for b, at_ms in new],
            [_entry_write(e, at_ms) for e, at_ms in kept],
            [slot_id for slot_id, _ in left],
            [user_id for _, user_id in left],
            rows.audit,
            rows.outcomes[-1].at_ms if rows.outcomes else 0,
            len(rows.outcomes),
            # zlib's fastest level: replies repeat their slot views, so a flush's outcomes
            # shrink several times over, and so does the write-ahead log.
            zlib.compress(codecs.encoder.encode(rows.outcomes), OUTCOMES_COMPRESS_LEVEL)
            if rows.outcomes
            else b"",
            _key_writes(rows.keys, codecs),
            committed_ms,
            len(notifiable),
            zlib.compress(codecs.encoder.encode(notifiable), OUTCOMES_COMPRESS_LEVEL)
            if notifiable
            else b"",
        )
    except asyncpg.PostgresError as exc:
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate == FENCED_SQLSTATE:
            raise FenceRejected(str(exc)) from exc
        if sqlstate == PARTITIONS_MOVED_SQLSTATE:
            raise PartitionsMoved(str(exc)) from exc
        raise


def _slot_write(view: SlotView, row: SlotRow, codecs: Codecs) -> tuple[Any, ...]:
    return (
        view.id,
        view.resource_id,
        view.domain,
        view.start_ms,
        view.end_ms,
        view.capacity,
        view.blocked,
        codecs.json.encode(codecs.metadata.decode(view.metadata)).decode(),
        view.version,
        row.created_at_ms,
        row.updated_at_ms,
        row.deleted_at_ms,
    )


def _booking_write(b: Booking, at_ms: int) -> tuple[Any, ...]:
    return (
        b.id,
        b.slot_id,
        b.user_id,
        b.status.value,
        b.reserved_at_ms,
        b.expires_at_ms,
        b.confirmed_at_ms,
        b.completed_at_ms,
        b.cancelled_at_ms,
        b.cancel_reason,
        b.cancelled_by,
        b.refund_percentage,
        b.via_queue,
        b.version,
        at_ms,
        b.extensions,
    )


def _entry_write(e: QueueEntry, at_ms: int) -> tuple[Any, ...]:
    return (
        e.slot_id,
        e.user_id,
        e.seq,
        e.status.value,
        e.joined_at_ms,
        e.last_seen_ms,
        e.notified_at_ms,
        e.booking_id,
        e.ended_at_ms,
        e.version,
        at_ms,
    )


def _key_writes(keys: list[KeyRecord], codecs: Codecs) -> list[tuple[Any, ...]]:
    latest = {(k.user_id, k.command, k.key): k for k in keys}
    return [
        (
            k.user_id,
            k.command,
            k.key,
            k.at_ms,
            k.fingerprint,
            codecs.encoder.encode(k),
            None if k.partition < 0 else k.partition,
        )
        for k in latest.values()
    ]

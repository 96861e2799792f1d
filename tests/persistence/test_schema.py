"""The database's own safety nets, exercised with plain SQL (no engine).

The engine never relies on these: they are there so that a bug in the engine,
or a row written by hand, cannot double-book, overlap slots or rewrite
history. Each test writes rows directly and checks that PostgreSQL refuses
(or accepts) them, and when: the overlap check is deferred to COMMIT, so a
statement that breaks it succeeds and the commit fails.
"""

import contextlib
import re
import shutil
from pathlib import Path

import asyncpg
import pytest

from persistence.migrate import MIGRATIONS_DIR, MigrationError, migrate
from persistence.partitioning import ensure_partition_map
from tests.support.domain import HOUR_MS

NOW_MS = 1_800_000_000_000
HOLD_MS = 120_000


# -- rows, written by hand (shared with the reconcile and CLI tests) ------------


async def add_slot(
    db: asyncpg.Connection,
    slot_id: str,
    *,
    resource: str | None = None,
    start_ms: int = NOW_MS + HOUR_MS,
    end_ms: int = NOW_MS + 2 * HOUR_MS,
    capacity: int = 2,
    shard: int = 0,
    deleted_at_ms: int | None = None,
) -> None:
    """A slot in partition ``shard``, which the map (spread over 4 shards) gives that shard."""
    await ensure_partition_map(db, partitions=None, shard_count=4)
    await db.execute(
        """
        INSERT INTO slots (id, partition, resource_id, domain, start_ms, end_ms, capacity,
                           created_at_ms, updated_at_ms, deleted_at_ms)
        VALUES ($1, $2, $3, 'default', $4, $5, $6, $7, $7, $8)
        """,
        slot_id,
        shard,
        resource or f"res-{slot_id}",
        start_ms,
        end_ms,
        capacity,
        NOW_MS,
        deleted_at_ms,
    )


async def add_booking(
    db: asyncpg.Connection,
    booking_id: str,
    slot_id: str,
    user_id: str,
    status: str = "RESERVED",
    *,
    reserved_at_ms: int | None = None,
    expires_at_ms: int | None = None,
    via_queue: bool = False,
    refund_percentage: int | None = None,
) -> None:
    """A booking; a hold lasts HOLD_MS unless both of its times are given."""
    if reserved_at_ms is None:
        reserved_at_ms = NOW_MS if expires_at_ms is None else expires_at_ms - HOLD_MS
    if expires_at_ms is None:
        expires_at_ms = reserved_at_ms + HOLD_MS
    await db.execute(
        """
        INSERT INTO bookings (id, slot_id, user_id, status, reserved_at_ms, expires_at_ms,
                              refund_percentage, via_queue, updated_at_ms)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $5)
        """,
        booking_id,
        slot_id,
        user_id,
        status,
        reserved_at_ms,
        expires_at_ms,
        refund_percentage,
        via_queue,
    )


async def add_entry(
    db: asyncpg.Connection,
    slot_id: str,
    user_id: str,
    seq: int,
    status: str = "WAITING",
    *,
    booking_id: str | None = None,
) -> None:
    await db.execute(
        """
        INSERT INTO queue_entries (slot_id, user_id, seq, status, joined_at_ms, last_seen_ms,
                                   notified_at_ms, booking_id, updated_at_ms)
        VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $5)
        """,
        slot_id,
        user_id,
        seq,
        status,
        NOW_MS,
        NOW_MS if status == "NOTIFIED" else None,
        booking_id,
    )


async def add_audit(db: asyncpg.Connection, at_ms: int, entity_id: str = "b-1") -> int:
    row_id: int = await db.fetchval(
        """
        INSERT INTO audit_log (at_ms, shard, request_id, actor, entity, entity_id, slot_id,
                               user_id, from_status, to_status, trigger)
        VALUES ($1, 0, 'rq-1', 'alice', 'booking', $2, 's-1', 'alice', 'RESERVED', 'CONFIRMED',
                'confirm')
        RETURNING id
        """,
        at_ms,
        entity_id,
    )
    return row_id


async def counts(db: asyncpg.Connection, slot_id: str) -> tuple[int, int]:
    row = await db.fetchrow("SELECT confirmed_count, held_count FROM slots WHERE id = $1", slot_id)
    assert row is not None
    return row["confirmed_count"], row["held_count"]


async def commit_fails(
    db: asyncpg.Connection, *statements: str, error: type[Exception]
) -> pytest.ExceptionInfo[Exception]:
    """Runs ``statements`` in one transaction: each succeeds, the COMMIT raises ``error``."""
    ran = 0
    with pytest.raises(error) as info:
        async with db.transaction():
            for statement in statements:
                await db.execute(statement)
                ran += 1
    assert ran == len(statements), "a statement failed before the commit"
    return info


# -- slots of one resource never overlap ----------------------------------------

# The migration's fallback for servers without btree_gist (the embedded build).
_BOX_RULE = re.compile(
    r"ALTER TABLE slots ADD CONSTRAINT slots_no_overlap EXCLUDE USING gist \(\s*box\(.*?"
    r"DEFERRABLE INITIALLY DEFERRED;",
    re.DOTALL,
)


@pytest.fixture(params=["installed", "box"])
async def no_overlap(request: pytest.FixtureRequest, db: asyncpg.Connection) -> str:
    """Runs a test on the rule this server got, then on the box fallback."""
    if request.param == "box":
        found = _BOX_RULE.search((MIGRATIONS_DIR / "0001_schema.sql").read_text())
        if found is None:
            pytest.skip("the migration has no box fallback")
        await db.execute("ALTER TABLE slots DROP CONSTRAINT slots_no_overlap")
        await db.execute(found.group(0))
        definition = await db.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'slots_no_overlap'"
        )
        assert "box(" in definition
    return str(request.param)


async def test_an_overlapping_slot_of_the_same_resource_is_refused_at_commit(
    db: asyncpg.Connection,
    no_overlap: str,
) -> None:
    await add_slot(db, "s-1", resource="room", start_ms=NOW_MS, end_ms=NOW_MS + HOUR_MS)
    info = await commit_fails(
        db,
        f"""INSERT INTO slots (id, partition, resource_id, domain, start_ms, end_ms, capacity,
                               created_at_ms, updated_at_ms)
            VALUES ('s-2', 0, 'room', 'default', {NOW_MS + HOUR_MS // 2},
                    {NOW_MS + 2 * HOUR_MS}, 1, {NOW_MS}, {NOW_MS})""",
        error=asyncpg.ExclusionViolationError,
    )
    assert info.value.constraint_name == "slots_no_overlap"  # type: ignore[attr-defined]
    assert await db.fetchval("SELECT count(*) FROM slots") == 1
    # The same window on another resource is fine.
    await add_slot(db, "s-3", resource="other", start_ms=NOW_MS, end_ms=NOW_MS + HOUR_MS)


async def test_adjacent_slots_do_not_overlap(db: asyncpg.Connection, no_overlap: str) -> None:
    await add_slot(db, "s-1", resource="room", start_ms=NOW_MS, end_ms=NOW_MS + HOUR_MS)
    await add_slot(
        db, "s-2", resource="room", start_ms=NOW_MS + HOUR_MS, end_ms=NOW_MS + 2 * HOUR_MS
    )
    await add_slot(db, "s-0", resource="room", start_ms=NOW_MS - HOUR_MS, end_ms=NOW_MS)
    assert await db.fetchval("SELECT count(*) FROM slots") == 3


async def test_an_overlap_of_one_millisecond_is_refused(
    db: asyncpg.Connection, no_overlap: str
) -> None:
    end_ms = NOW_MS + 90 * 86_400_000
    await add_slot(db, "s-1", resource="room", start_ms=NOW_MS, end_ms=end_ms)
    for start_ms, finish_ms in [(end_ms - 1, end_ms + HOUR_MS), (NOW_MS - HOUR_MS, NOW_MS + 1)]:
        with pytest.raises(asyncpg.ExclusionViolationError):
            await add_slot(db, "s-2", resource="room", start_ms=start_ms, end_ms=finish_ms)
    # Inside and around.
    for start_ms, finish_ms in [(NOW_MS + 5, NOW_MS + 6), (NOW_MS - 1, end_ms + 1)]:
        with pytest.raises(asyncpg.ExclusionViolationError):
            await add_slot(db, "s-2", resource="room", start_ms=start_ms, end_ms=finish_ms)
    await add_slot(db, "s-2", resource="room", start_ms=end_ms, end_ms=end_ms + 1)
    await add_slot(db, "s-3", resource="room ", start_ms=NOW_MS, end_ms=end_ms)


async def test_a_deleted_slot_no_longer_blocks_its_window(
    db: asyncpg.Connection, no_overlap: str
) -> None:
    await add_slot(
        db, "s-1", resource="room", start_ms=NOW_MS, end_ms=NOW_MS + HOUR_MS, deleted_at_ms=NOW_MS
    )
    await add_slot(db, "s-2", resource="room", start_ms=NOW_MS, end_ms=NOW_MS + HOUR_MS)
    # Bringing the deleted one back would overlap.
    await commit_fails(
        db,
        "UPDATE slots SET deleted_at_ms = NULL WHERE id = 's-1'",
        error=asyncpg.ExclusionViolationError,
    )


async def test_the_overlap_check_waits_for_the_commit(
    db: asyncpg.Connection, no_overlap: str
) -> None:
    """One flush may put a slot where another was and move that one away."""
    await add_slot(db, "s-1", resource="room", start_ms=NOW_MS, end_ms=NOW_MS + HOUR_MS)
    async with db.transaction():
        await add_slot(db, "s-2", resource="room", start_ms=NOW_MS, end_ms=NOW_MS + HOUR_MS)
        await db.execute(
            "UPDATE slots SET start_ms = $1, end_ms = $2 WHERE id = 's-1'",
            NOW_MS + HOUR_MS,
            NOW_MS + 2 * HOUR_MS,
        )
    assert await db.fetchval("SELECT count(*) FROM slots") == 2


# -- one active booking per user and slot ------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [("RESERVED", "RESERVED"), ("CONFIRMED", "RESERVED"), ("RESERVED", "CONFIRMED")],
)
async def test_a_second_active_booking_of_a_user_on_a_slot_is_refused(
    db: asyncpg.Connection, first: str, second: str
) -> None:
    await add_slot(db, "s-1", capacity=5)
    await add_booking(db, "b-1", "s-1", "alice", first)
    with pytest.raises(asyncpg.UniqueViolationError) as info:
        await add_booking(db, "b-2", "s-1", "alice", second)
    assert info.value.constraint_name == "bookings_one_active_per_user_slot"  # type: ignore[attr-defined]
    # Another user, or the same user on another slot, is fine.
    await add_booking(db, "b-3", "s-1", "bob", second)
    await add_slot(db, "s-2", capacity=5)
    await add_booking(db, "b-4", "s-2", "alice", second)


@pytest.mark.parametrize("final", ["EXPIRED", "CANCELLED", "COMPLETED"])
async def test_a_new_booking_after_the_first_ended_is_fine(
    db: asyncpg.Connection, final: str
) -> None:
    await add_slot(db, "s-1")
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    await db.execute("UPDATE bookings SET status = $1 WHERE id = 'b-1'", final)
    await add_booking(db, "b-2", "s-1", "alice", "RESERVED")
    await db.execute("UPDATE bookings SET status = 'EXPIRED' WHERE id = 'b-2'")
    await add_booking(db, "b-3", "s-1", "alice", "CONFIRMED")
    assert await counts(db, "s-1") == (1, 0)
    # Reviving an ended booking next to the active one is refused.
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("UPDATE bookings SET status = 'RESERVED' WHERE id = 'b-2'")


# -- capacity -------------------------------------------------------------------------


def _reserve(booking_id: str, user_id: str, slot_id: str = "s-1") -> str:
    return (
        "INSERT INTO bookings (id, slot_id, user_id, status, reserved_at_ms, expires_at_ms,"
        " updated_at_ms)"
        f" VALUES ('{booking_id}', '{slot_id}', '{user_id}', 'RESERVED', {NOW_MS},"
        f" {NOW_MS + HOLD_MS}, {NOW_MS})"
    )


async def over_capacity_refused(db: asyncpg.Connection, *statements: str) -> None:
    """Runs ``statements`` in one transaction, which must not commit: the capacity
    check refuses it (at the offending statement or at the latest at COMMIT)."""
    with pytest.raises(asyncpg.CheckViolationError) as info:
        async with db.transaction():
            for statement in statements:
                await db.execute(statement)
    assert info.value.constraint_name == "slots_within_capacity"  # type: ignore[attr-defined]


async def test_three_holds_on_a_capacity_two_slot_in_one_statement_are_refused(
    db: asyncpg.Connection,
) -> None:
    await add_slot(db, "s-1", capacity=2)
    values = ", ".join(
        f"('b-{n}', 's-1', 'u-{n}', 'RESERVED', {NOW_MS}, {NOW_MS + HOLD_MS}, {NOW_MS})"
        for n in range(3)
    )
    statement = (
        "INSERT INTO bookings (id, slot_id, user_id, status, reserved_at_ms, expires_at_ms,"
        f" updated_at_ms) VALUES {values}"
    )
    await over_capacity_refused(db, statement)
    # Outside a transaction block too (the statement is its own transaction).
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(statement)
    assert await db.fetchval("SELECT count(*) FROM bookings") == 0
    assert await counts(db, "s-1") == (0, 0)
    # Two fit.
    await db.execute(statement.rsplit(", (", 1)[0])
    assert await counts(db, "s-1") == (0, 2)


async def test_three_holds_in_separate_statements_of_a_transaction_are_refused(
    db: asyncpg.Connection,
) -> None:
    await add_slot(db, "s-1", capacity=2)
    await over_capacity_refused(
        db, _reserve("b-1", "alice"), _reserve("b-2", "bob"), _reserve("b-3", "carol")
    )
    assert await db.fetchval("SELECT count(*) FROM bookings") == 0
    assert await counts(db, "s-1") == (0, 0)
    # A place freed first makes room for the next one.
    async with db.transaction():
        for statement in (_reserve("b-1", "alice"), _reserve("b-2", "bob")):
            await db.execute(statement)
        await db.execute("UPDATE bookings SET status = 'EXPIRED' WHERE id = 'b-1'")
        await db.execute(_reserve("b-3", "carol"))
    assert await counts(db, "s-1") == (0, 2)


async def test_capacity_cannot_drop_below_the_bookings(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=3)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    await add_booking(db, "b-2", "s-1", "bob", "RESERVED")
    await over_capacity_refused(db, "UPDATE slots SET capacity = 1 WHERE id = 's-1'")
    assert await db.fetchval("SELECT capacity FROM slots WHERE id = 's-1'") == 3
    await db.execute("UPDATE slots SET capacity = 2 WHERE id = 's-1'")
    assert await db.fetchval("SELECT capacity FROM slots WHERE id = 's-1'") == 2


async def test_reviving_expired_bookings_past_capacity_is_refused(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=2)
    for n in range(3):
        await add_booking(db, f"b-{n}", "s-1", f"u-{n}", "RESERVED")
        await db.execute("UPDATE bookings SET status = 'EXPIRED' WHERE id = $1", f"b-{n}")
    await add_booking(db, "b-9", "s-1", "u-9", "CONFIRMED")
    await over_capacity_refused(
        db, "UPDATE bookings SET status = 'CONFIRMED' WHERE status = 'EXPIRED'"
    )
    assert await counts(db, "s-1") == (1, 0)
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE status = 'EXPIRED'") == 3
    # One of them fits.
    await db.execute("UPDATE bookings SET status = 'CONFIRMED' WHERE id = 'b-0'")
    assert await counts(db, "s-1") == (2, 0)


async def test_deleting_bookings_frees_their_places(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=2)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    await add_booking(db, "b-2", "s-1", "bob", "RESERVED")
    await db.execute("DELETE FROM bookings WHERE id = 'b-1'")
    assert await counts(db, "s-1") == (0, 1)
    await add_booking(db, "b-3", "s-1", "carol", "CONFIRMED")
    assert await counts(db, "s-1") == (1, 1)
    await db.execute("DELETE FROM bookings")
    assert await counts(db, "s-1") == (0, 0)


# -- checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "start_ms", "end_ms", "constraint"),
    [
        (0, NOW_MS, NOW_MS + HOUR_MS, "slots_capacity_positive"),
        (-1, NOW_MS, NOW_MS + HOUR_MS, "slots_capacity_positive"),
        (1, NOW_MS, NOW_MS, "slots_end_after_start"),
        (1, NOW_MS, NOW_MS - 1, "slots_end_after_start"),
    ],
)
async def test_slot_checks(
    db: asyncpg.Connection, capacity: int, start_ms: int, end_ms: int, constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await add_slot(db, "s-1", capacity=capacity, start_ms=start_ms, end_ms=end_ms)
    assert info.value.constraint_name == constraint  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", ["PENDING", "reserved", "", "BOOKED"])
async def test_unknown_booking_statuses_are_refused(db: asyncpg.Connection, status: str) -> None:
    await add_slot(db, "s-1")
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await add_booking(db, "b-1", "s-1", "alice", status)
    assert info.value.constraint_name == "bookings_status_known"  # type: ignore[attr-defined]
    await add_booking(db, "b-1", "s-1", "alice", "RESERVED")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE bookings SET status = $1 WHERE id = 'b-1'", status)


@pytest.mark.parametrize("status", ["LEFT", "waiting"])
async def test_unknown_queue_statuses_are_refused(db: asyncpg.Connection, status: str) -> None:
    await add_slot(db, "s-1")
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await add_entry(db, "s-1", "alice", 1, status)
    assert info.value.constraint_name == "queue_entries_status_known"  # type: ignore[attr-defined]


async def test_a_notified_entry_needs_its_booking(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1")
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await add_entry(db, "s-1", "alice", 1, "NOTIFIED")
    assert info.value.constraint_name == "queue_entries_notified_has_booking"  # type: ignore[attr-defined]


@pytest.mark.parametrize("refund", [-1, 101, 1000])
async def test_refunds_outside_0_to_100_are_refused(db: asyncpg.Connection, refund: int) -> None:
    await add_slot(db, "s-1", capacity=3)
    with pytest.raises(asyncpg.CheckViolationError):
        await add_booking(db, "b-1", "s-1", "alice", "CANCELLED", refund_percentage=refund)
    await add_booking(db, "b-2", "s-1", "alice", "CANCELLED", refund_percentage=0)
    await add_booking(db, "b-3", "s-1", "alice", "CANCELLED", refund_percentage=100)


async def test_a_hold_must_expire_after_it_was_taken(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1")
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await add_booking(db, "b-1", "s-1", "alice", reserved_at_ms=NOW_MS, expires_at_ms=NOW_MS)
    assert info.value.constraint_name == "bookings_hold_after_reserve"  # type: ignore[attr-defined]


# -- the counts follow the bookings ---------------------------------------------------


async def test_counts_follow_inserts_updates_and_deletes(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=5)
    await add_slot(db, "s-2", capacity=5)
    await add_booking(db, "b-1", "s-1", "alice", "RESERVED")
    await add_booking(db, "b-2", "s-1", "bob", "RESERVED")
    await add_booking(db, "b-3", "s-1", "carol", "CONFIRMED")
    await add_booking(db, "b-4", "s-1", "dave", "EXPIRED")
    assert await counts(db, "s-1") == (1, 2)
    await db.execute("UPDATE bookings SET status = 'CONFIRMED' WHERE id = 'b-1'")
    assert await counts(db, "s-1") == (2, 1)
    await db.execute("UPDATE bookings SET status = 'EXPIRED' WHERE id = 'b-2'")
    assert await counts(db, "s-1") == (2, 0)
    await db.execute("UPDATE bookings SET status = 'CANCELLED' WHERE id = 'b-3'")
    assert await counts(db, "s-1") == (1, 0)
    # Backwards too (the engine never does it, but a hand-written row might).
    await db.execute("UPDATE bookings SET status = 'RESERVED' WHERE id IN ('b-2', 'b-4')")
    assert await counts(db, "s-1") == (1, 2)
    await db.execute("UPDATE bookings SET status = 'CONFIRMED' WHERE status = 'RESERVED'")
    assert await counts(db, "s-1") == (3, 0)
    # An update that changes nothing that counts, and one that moves a booking.
    await db.execute("UPDATE bookings SET version = version + 1")
    assert await counts(db, "s-1") == (3, 0)
    await db.execute("UPDATE bookings SET slot_id = 's-2' WHERE id = 'b-1'")
    assert (await counts(db, "s-1"), await counts(db, "s-2")) == ((2, 0), (1, 0))
    await db.execute("DELETE FROM bookings WHERE id = 'b-2'")
    assert await counts(db, "s-1") == (1, 0)
    await db.execute("DELETE FROM bookings")
    assert (await counts(db, "s-1"), await counts(db, "s-2")) == ((0, 0), (0, 0))


async def test_one_statement_over_several_slots(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=5)
    await add_slot(db, "s-2", capacity=5)
    await db.execute(
        f"""
        INSERT INTO bookings (id, slot_id, user_id, status, reserved_at_ms, expires_at_ms,
                              updated_at_ms)
        VALUES ('b-1', 's-1', 'alice', 'RESERVED', {NOW_MS}, {NOW_MS + HOLD_MS}, {NOW_MS}),
               ('b-2', 's-1', 'bob', 'CONFIRMED', {NOW_MS}, {NOW_MS + HOLD_MS}, {NOW_MS}),
               ('b-3', 's-2', 'alice', 'RESERVED', {NOW_MS}, {NOW_MS + HOLD_MS}, {NOW_MS}),
               ('b-4', 's-2', 'bob', 'RESERVED', {NOW_MS}, {NOW_MS + HOLD_MS}, {NOW_MS}),
               ('b-5', 's-2', 'carol', 'CANCELLED', {NOW_MS}, {NOW_MS + HOLD_MS}, {NOW_MS})
        """
    )
    assert (await counts(db, "s-1"), await counts(db, "s-2")) == ((1, 1), (0, 2))
    await db.execute(
        "UPDATE bookings SET status = CASE status WHEN 'RESERVED' THEN 'CONFIRMED'"
        " ELSE 'CANCELLED' END WHERE status IN ('RESERVED', 'CONFIRMED')"
    )
    assert (await counts(db, "s-1"), await counts(db, "s-2")) == ((1, 0), (2, 0))


async def test_counts_follow_an_upsert(db: asyncpg.Connection) -> None:
    """The writer's INSERT ... ON CONFLICT DO UPDATE fires both the insert and the update
    counting, each with its own rows; rows the version guard skips count for nothing."""
    await add_slot(db, "s-1", capacity=5)
    await add_booking(db, "b-1", "s-1", "alice", "RESERVED")
    await add_booking(db, "b-2", "s-1", "bob", "RESERVED")
    await db.execute("UPDATE bookings SET version = 5 WHERE id = 'b-2'")
    upsert = """
        INSERT INTO bookings (id, slot_id, user_id, status, reserved_at_ms, expires_at_ms,
                              version, updated_at_ms)
        SELECT u.id, 's-1', u.user_id, u.status, $1::int8, $1::int8 + $2::int8, u.version, $1::int8
          FROM unnest($3::text[], $4::text[], $5::text[], $6::int4[])
               AS u (id, user_id, status, version)
        ON CONFLICT (id) DO UPDATE
           SET status = EXCLUDED.status, version = EXCLUDED.version,
               updated_at_ms = EXCLUDED.updated_at_ms
         WHERE bookings.version <= EXCLUDED.version
    """
    await db.execute(
        upsert,
        NOW_MS,
        HOLD_MS,
        ["b-1", "b-2", "b-3", "b-4"],
        ["alice", "bob", "carol", "dave"],
        # b-1 confirmed (an update), b-2 expired by a stale version (skipped),
        # b-3 a new hold, b-4 a new confirmed booking.
        ["CONFIRMED", "EXPIRED", "RESERVED", "CONFIRMED"],
        [2, 3, 1, 1],
    )
    assert await counts(db, "s-1") == (2, 2)
    assert await db.fetchval("SELECT status FROM bookings WHERE id = 'b-2'") == "RESERVED"
    await db.execute(
        upsert, NOW_MS, HOLD_MS, ["b-2", "b-3"], ["bob", "carol"], ["EXPIRED", "EXPIRED"], [6, 2]
    )
    assert await counts(db, "s-1") == (2, 0)
    # An upsert that would overfill the slot is refused like any write.
    await db.execute("UPDATE slots SET capacity = 3 WHERE id = 's-1'")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            upsert,
            NOW_MS,
            HOLD_MS,
            ["b-2", "b-5"],
            ["bob", "erin"],
            ["RESERVED", "RESERVED"],
            [7, 1],
        )
    assert await counts(db, "s-1") == (2, 0)


async def test_truncating_bookings_leaves_no_phantom_counts(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=1)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    # Refusing the TRUNCATE would do as well as following it.
    with contextlib.suppress(asyncpg.PostgresError):
        await db.execute("TRUNCATE bookings")
    confirmed = await db.fetchval("SELECT count(*) FROM bookings WHERE status = 'CONFIRMED'")
    assert await counts(db, "s-1") == (confirmed, 0)


# -- the audit log is append-only -----------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET actor = 'mallory'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ],
)
async def test_the_audit_log_refuses_changes(db: asyncpg.Connection, statement: str) -> None:
    row_id = await add_audit(db, NOW_MS)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute(statement)
    row = await db.fetchrow("SELECT id, actor FROM audit_log")
    assert row is not None
    assert (row["id"], row["actor"]) == (row_id, "alice")


async def test_setting_the_purge_switch_by_hand_does_not_open_the_log(
    db: asyncpg.Connection,
) -> None:
    await add_audit(db, NOW_MS)
    await db.execute("SET slotengine.audit_purge = 'on'")
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute("DELETE FROM audit_log")
    finally:
        await db.execute("RESET slotengine.audit_purge")


async def test_purge_removes_only_old_rows_at_most_n(db: asyncpg.Connection) -> None:
    ids = [await add_audit(db, NOW_MS + n * 1000, f"b-{n}") for n in range(5)]
    cutoff = NOW_MS + 3000  # rows 0, 1, 2 are older
    assert await db.fetchval("SELECT purge_audit_log($1, 2)", cutoff) == 2
    assert await db.fetchval("SELECT array_agg(id ORDER BY id) FROM audit_log") == ids[2:]
    assert await db.fetchval("SELECT purge_audit_log($1, 2)", cutoff) == 1
    assert await db.fetchval("SELECT purge_audit_log($1, 2)", cutoff) == 0
    assert await db.fetchval("SELECT array_agg(id ORDER BY id) FROM audit_log") == ids[3:]


async def test_after_a_purge_the_log_is_append_only_again(db: asyncpg.Connection) -> None:
    await add_audit(db, NOW_MS)
    await add_audit(db, NOW_MS + 1)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with db.transaction():
            assert await db.fetchval("SELECT purge_audit_log($1, 10)", NOW_MS + 1) == 1
            await db.execute("DELETE FROM audit_log")
    # The failed transaction took the purge back with it.
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 2


# -- identifiers and lookups ----------------------------------------------------------

ID_COLUMNS = {
    "slots": ("id", "resource_id"),
    "bookings": ("id", "slot_id", "user_id", "status"),
    "queue_entries": ("slot_id", "user_id", "status", "booking_id"),
    "audit_log": ("entity_id", "slot_id", "user_id", "request_id"),
    "idempotency_records": ("user_id", "command", "key"),
}


async def test_identifiers_compare_byte_by_byte(db: asyncpg.Connection) -> None:
    rows = await db.fetch(
        """
        SELECT table_name, column_name, collation_name FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name = ANY($1::text[])
        """,
        list(ID_COLUMNS),
    )
    collations = {(r["table_name"], r["column_name"]): r["collation_name"] for r in rows}
    for table, columns in ID_COLUMNS.items():
        for column in columns:
            assert collations[(table, column)] == "C", (table, column)
    # Ordered as the engine orders them (code points), whatever the database's locale.
    ids = ["b", "B", "a-2", "a-10", "é", "Z", "ä", "z"]
    for n, slot_id in enumerate(ids):
        await add_slot(
            db, slot_id, start_ms=NOW_MS + n * HOUR_MS, end_ms=NOW_MS + (n + 1) * HOUR_MS
        )
    assert await db.fetchval("SELECT array_agg(id ORDER BY id) FROM slots") == sorted(ids)


async def test_equality_lookups_use_hash_indexes(db: asyncpg.Connection) -> None:
    methods = dict(
        await db.fetch(
            """
            SELECT i.relname, am.amname FROM pg_index x
              JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_am am ON am.oid = i.relam
             WHERE i.relname = ANY($1::text[])
            """,
            ["audit_log_by_entity", "bookings_by_user", "queue_entries_by_user"],
        )
    )
    assert methods == {
        "audit_log_by_entity": "hash",
        "bookings_by_user": "hash",
        "queue_entries_by_user": "hash",
    }
    await add_slot(db, "s-1")
    await add_booking(db, "b-1", "s-1", "alice")
    await add_booking(db, "b-2", "s-1", "bob")
    await add_entry(db, "s-1", "carol", 1)
    await add_audit(db, NOW_MS, "b-1")
    await add_audit(db, NOW_MS + 1, "b-2")
    await db.execute("SET enable_seqscan = off")
    assert await db.fetchval("SELECT array_agg(id) FROM bookings WHERE user_id = 'bob'") == ["b-2"]
    assert await db.fetchval("SELECT count(*) FROM queue_entries WHERE user_id = 'carol'") == 1
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE entity_id = 'b-1'") == 1


# -- migrations -----------------------------------------------------------------------


def _copy_migrations(directory: Path) -> Path:
    directory.mkdir()
    for path in MIGRATIONS_DIR.glob("*.sql"):
        shutil.copy(path, directory / path.name)
    return directory


async def _applied(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT name FROM schema_migrations ORDER BY version")
    return [row["name"] for row in rows]


async def test_migrating_twice_applies_nothing_the_second_time(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    before = await _applied(db)
    assert before == [path.name for path in sorted(MIGRATIONS_DIR.glob("*.sql"))]
    assert await migrate(db) == []
    directory = _copy_migrations(tmp_path / "migrations")
    (directory / "9001_extra_table.sql").write_text("CREATE TABLE extra_table (id int);")
    assert await migrate(db, directory) == ["9001_extra_table.sql"]
    assert await migrate(db, directory) == []
    assert await _applied(db) == [*before, "9001_extra_table.sql"]
    assert await db.fetchval("SELECT count(*) FROM extra_table") == 0


async def test_a_changed_migration_is_refused(db: asyncpg.Connection, tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path / "migrations")
    first = sorted(directory.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after it was applied\n")
    (directory / "9001_extra_table.sql").write_text("CREATE TABLE extra_table (id int);")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(db, directory)
    assert "9001_extra_table.sql" not in await _applied(db)


@pytest.mark.parametrize("name", ["2_short.sql", "0002-dash.sql", "0002_Upper.sql", "0002_.sql"])
async def test_a_misnamed_migration_is_refused(
    db: asyncpg.Connection, tmp_path: Path, name: str
) -> None:
    directory = _copy_migrations(tmp_path / "migrations")
    (directory / name).write_text("CREATE TABLE extra_table (id int);")
    before = await _applied(db)
    with pytest.raises(MigrationError, match=r"NNNN_what\.sql"):
        await migrate(db, directory)
    assert await _applied(db) == before


async def test_two_migrations_with_one_version_are_refused(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    directory = _copy_migrations(tmp_path / "migrations")
    (directory / "9001_one.sql").write_text("CREATE TABLE one (id int);")
    (directory / "9001_two.sql").write_text("CREATE TABLE two (id int);")
    with pytest.raises(MigrationError, match="share a version"):
        await migrate(db, directory)


async def test_a_failing_migration_leaves_nothing_behind(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    directory = _copy_migrations(tmp_path / "migrations")
    (directory / "9001_half.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT no_such_function();"
    )
    before = await _applied(db)
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrate(db, directory)
    assert await _applied(db) == before
    assert await db.fetchval("SELECT to_regclass('half_done')") is None
    # The lock was released: the next run can go ahead.
    (directory / "9001_half.sql").write_text("CREATE TABLE half_done (id int);")
    assert await migrate(db, directory) == ["9001_half.sql"]

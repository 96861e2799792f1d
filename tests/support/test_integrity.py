"""The fault tests' integrity check can fail: each corruption planted by hand
(triggers and foreign keys bypassed, as a broken flush or an operator could)
is reported by the reconciliation checks it goes through, and a clean state
passes."""

from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from tests.persistence.test_schema import NOW_MS, add_booking, add_slot
from tests.support.integrity import assert_consistent

Plant = Callable[[asyncpg.Connection], Awaitable[None]]


async def bypassing_the_database(db: asyncpg.Connection, *statements: str) -> None:
    """Runs ``statements`` as a replica would: no trigger, no foreign key."""
    await db.execute("SET session_replication_role = replica")
    try:
        for statement in statements:
            await db.execute(statement)
    finally:
        await db.execute("SET session_replication_role = DEFAULT")


async def two_confirmed_on_a_place_for_one(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=1)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    await bypassing_the_database(
        db,
        "INSERT INTO bookings (id, slot_id, user_id, status, reserved_at_ms, expires_at_ms,"
        " via_queue, updated_at_ms) SELECT 'b-2', slot_id, 'bob', 'CONFIRMED', reserved_at_ms,"
        " expires_at_ms, false, updated_at_ms FROM bookings WHERE id = 'b-1'",
    )


async def a_booking_without_its_slot(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=1)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    await bypassing_the_database(db, "DELETE FROM slots WHERE id = 's-1'")


async def counters_that_drifted(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=2)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    await bypassing_the_database(db, "UPDATE slots SET confirmed_count = 0 WHERE id = 's-1'")


async def a_hold_nobody_expired(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=2)
    await add_booking(db, "b-1", "s-1", "alice", expires_at_ms=NOW_MS - 61_000)


@pytest.mark.parametrize(
    ("plant", "kind"),
    [
        (two_confirmed_on_a_place_for_one, "slot_over_capacity"),
        (a_booking_without_its_slot, "booking_without_slot"),
        (counters_that_drifted, "counter_drift"),
        (a_hold_nobody_expired, "hold_past_deadline"),
    ],
)
async def test_a_corrupted_row_fails_the_check(
    db: asyncpg.Connection, plant: Plant, kind: str
) -> None:
    await plant(db)
    with pytest.raises(AssertionError, match=kind) as failed:
        await assert_consistent(db, now_ms=NOW_MS)
    assert "b-1" in str(failed.value) or "s-1" in str(failed.value)


async def test_memory_that_differs_from_the_database_fails_the_check(
    db: asyncpg.Connection,
) -> None:
    await add_slot(db, "s-1", capacity=2)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    await assert_consistent(db, now_ms=NOW_MS, engine_counts={"s-1": (1, 0)})
    with pytest.raises(AssertionError, match="engine_counts_differ"):
        await assert_consistent(db, now_ms=NOW_MS, engine_counts={"s-1": (0, 1)})
    with pytest.raises(AssertionError, match="engine_slot_unknown"):
        await assert_consistent(db, now_ms=NOW_MS, engine_counts={"s-lost": (1, 0)})


async def test_a_clean_state_passes(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=2)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    await add_booking(db, "b-2", "s-1", "bob")
    report = await assert_consistent(db, now_ms=NOW_MS)
    assert (report.findings, report.violations_left) == ([], 0)

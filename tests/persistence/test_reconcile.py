"""Reconciliation against a real database: each check finds the problem planted
for it (by hand-written SQL, bypassing the triggers where a problem cannot be
made otherwise), repairs only what is safe, and a clean database gives nothing.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from persistence.checks import Finding, ReconcileReport, iso_utc
from persistence.reconcile import reconcile
from persistence.repairs import REPAIR_ACTOR, REPAIR_TRIGGER
from tests.persistence.test_schema import (
    HOLD_MS,
    HOUR_MS,
    NOW_MS,
    add_audit,
    add_booking,
    add_entry,
    add_slot,
    counts,
)

GRACE_MS = 60_000
STALE_MS = NOW_MS - GRACE_MS - 1  # a deadline just past the grace


@asynccontextmanager
async def triggers_off(db: asyncpg.Connection) -> AsyncIterator[None]:
    """Plants what the triggers would prevent (they do not fire for a replica)."""
    await db.execute("SET session_replication_role = replica")
    try:
        yield
    finally:
        await db.execute("SET session_replication_role = DEFAULT")


async def set_fence(db: asyncpg.Connection, shard: int, token: int, owner: str = "o-1") -> None:
    await db.execute(
        """
        INSERT INTO shard_fences (shard, token, owner) VALUES ($1, $2, $3)
        ON CONFLICT (shard) DO UPDATE SET token = EXCLUDED.token, owner = EXCLUDED.owner
        """,
        shard,
        token,
        owner,
    )


async def check(db: asyncpg.Connection, **options: Any) -> ReconcileReport:
    options.setdefault("now_ms", NOW_MS)
    options.setdefault("repair", False)
    options.setdefault("hold_grace_ms", GRACE_MS)
    return await reconcile(db, **options)


def kinds(report: ReconcileReport) -> list[tuple[str, str | None, str | None]]:
    return sorted((f.kind, f.slot_id, f.booking_id) for f in report.findings)


def finding(report: ReconcileReport, booking_id: str) -> Finding:
    (found,) = [f for f in report.findings if f.booking_id == booking_id]
    return found


async def status(db: asyncpg.Connection, booking_id: str) -> tuple[str, int, int]:
    row = await db.fetchrow(
        "SELECT status, version, updated_at_ms FROM bookings WHERE id = $1", booking_id
    )
    assert row is not None
    return row["status"], row["version"], row["updated_at_ms"]


async def snapshot(db: asyncpg.Connection) -> dict[str, list[asyncpg.Record]]:
    return {
        table: await db.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("slots", "bookings", "queue_entries", "audit_log", "shard_fences")
    }


async def plant_clean_state(db: asyncpg.Connection) -> None:
    """Everything a running engine leaves behind, all of it consistent."""
    await set_fence(db, 0, 3)
    await set_fence(db, 1, 5)
    await add_slot(db, "s-1", capacity=2, shard=0)
    await add_slot(db, "s-2", capacity=1, shard=1)
    await add_slot(db, "s-gone", capacity=1, shard=1, deleted_at_ms=NOW_MS - HOUR_MS)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    # A hold past its deadline, but within the grace: its owner is on it.
    await add_booking(db, "b-2", "s-1", "bob", reserved_at_ms=NOW_MS - HOLD_MS - 1_000)
    await add_booking(db, "b-3", "s-1", "carol", "EXPIRED", reserved_at_ms=NOW_MS - HOUR_MS)
    await add_booking(db, "b-4", "s-gone", "dave", "CANCELLED", refund_percentage=100)
    # A queue offer on a full slot, and a user waiting behind it.
    await add_booking(db, "b-5", "s-2", "erin", via_queue=True)
    await add_entry(db, "s-2", "erin", 1, "NOTIFIED", booking_id="b-5")
    await add_entry(db, "s-2", "frank", 2, "WAITING")
    await add_entry(db, "s-1", "gina", 1, "CONVERTED", booking_id="b-1")
    await add_audit(db, NOW_MS)


# -- a clean database -----------------------------------------------------------------


async def test_a_clean_database_gives_no_findings(db: asyncpg.Connection) -> None:
    await plant_clean_state(db)
    engine = {"s-1": (1, 1), "s-2": (0, 1)}
    report = await check(db, engine_counts=engine)
    assert report.findings == []
    assert report.violations_left == 0
    assert set(report.found.values()) == {0}
    before = await snapshot(db)
    report = await check(db, engine_counts=engine, repair=True, owned_shards=set())
    assert report.findings == []
    assert await snapshot(db) == before


async def test_an_empty_database_gives_no_findings(db: asyncpg.Connection) -> None:
    report = await check(db, repair=True, owned_shards=set())
    assert (report.findings, report.violations_left) == ([], 0)


# -- bookings without a slot ----------------------------------------------------------


async def test_active_bookings_on_a_deleted_slot(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=3, shard=2)
    await add_booking(db, "b-held", "s-1", "alice", "RESERVED")
    await add_booking(db, "b-booked", "s-1", "bob", "CONFIRMED")
    await add_booking(db, "b-over", "s-1", "carol", "EXPIRED")
    await db.execute("UPDATE slots SET deleted_at_ms = $1 WHERE id = 's-1'", NOW_MS - 5)

    report = await check(db)
    assert kinds(report) == [
        ("booking_without_slot", "s-1", "b-booked"),
        ("booking_without_slot", "s-1", "b-held"),
    ]
    assert finding(report, "b-held").shard == 2
    # Times read as ISO 8601 UTC (NOW_MS is 2027-01-15T08:00:00Z).
    assert finding(report, "b-held").detail.endswith("was deleted at 2027-01-15T07:59:59.995Z")
    assert report.violations_left == 2

    report = await check(db, repair=True, owned_shards=set())
    assert finding(report, "b-held").repaired
    assert not finding(report, "b-booked").repaired
    assert await status(db, "b-held") == ("EXPIRED", 2, NOW_MS)
    assert await status(db, "b-booked") == ("CONFIRMED", 1, NOW_MS)
    assert await counts(db, "s-1") == (1, 0)
    assert report.violations_left == 1

    report = await check(db, repair=True, owned_shards=set())
    assert kinds(report) == [("booking_without_slot", "s-1", "b-booked")]


async def test_a_booking_whose_slot_row_is_missing(db: asyncpg.Connection) -> None:
    async with triggers_off(db):
        await add_booking(db, "b-1", "nowhere", "alice", "RESERVED", expires_at_ms=STALE_MS)
    report = await check(db, repair=True, owned_shards=set())
    (only,) = report.findings
    assert (only.kind, only.booking_id, only.shard, only.repaired) == (
        "booking_without_slot",
        "b-1",
        None,
        False,
    )
    assert "missing" in only.detail
    assert (await status(db, "b-1"))[0] == "RESERVED"


# -- counters and capacity ---------------------------------------------------------------


async def test_drifted_counters_are_found_and_recomputed(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=3, shard=1)
    await add_slot(db, "s-2", capacity=3, shard=1)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    await add_booking(db, "b-2", "s-1", "bob", "RESERVED")
    await add_booking(db, "b-3", "s-2", "alice", "CONFIRMED")
    async with triggers_off(db):
        await db.execute("UPDATE slots SET confirmed_count = 0, held_count = 2 WHERE id = 's-1'")
        await add_booking(db, "b-4", "s-2", "bob", "RESERVED")
    assert (await counts(db, "s-1"), await counts(db, "s-2")) == ((0, 2), (1, 0))

    report = await check(db)
    assert kinds(report) == [("counter_drift", "s-1", None), ("counter_drift", "s-2", None)]
    assert "1 confirmed + 1 held" in report.findings[0].detail
    assert "0 confirmed + 2 held" in report.findings[0].detail

    # Counters belong to the database: repaired even with every shard owned.
    report = await check(db, repair=True)
    assert [f.repaired for f in report.findings] == [True, True]
    assert report.violations_left == 0
    assert (await counts(db, "s-1"), await counts(db, "s-2")) == ((1, 1), (1, 1))
    audit = await db.fetch(
        "SELECT entity, entity_id, actor, trigger, shard, details::text AS details"
        " FROM audit_log ORDER BY id"
    )
    assert [(r["entity"], r["entity_id"], r["actor"], r["trigger"], r["shard"]) for r in audit] == [
        ("slot", "s-1", REPAIR_ACTOR, REPAIR_TRIGGER, 1),
        ("slot", "s-2", REPAIR_ACTOR, REPAIR_TRIGGER, 1),
    ]
    assert (await check(db)).findings == []
    # The triggers go on from the recomputed values.
    await db.execute("UPDATE bookings SET status = 'CONFIRMED' WHERE id = 'b-2'")
    assert await counts(db, "s-1") == (2, 0)


async def test_a_slot_over_capacity_is_reported_and_its_counters_kept(
    db: asyncpg.Connection,
) -> None:
    await add_slot(db, "s-1", capacity=2)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    async with triggers_off(db):
        await add_booking(db, "b-2", "s-1", "bob", "CONFIRMED")
        await add_booking(db, "b-3", "s-1", "carol", "CONFIRMED")
    report = await check(db, repair=True, owned_shards=set())
    assert kinds(report) == [("counter_drift", "s-1", None), ("slot_over_capacity", "s-1", None)]
    assert not any(f.repaired for f in report.findings)
    detail = {f.kind: f.detail for f in report.findings}
    assert "3 confirmed + 0 held, over its capacity 2" in detail["slot_over_capacity"]
    assert "not repaired: its bookings exceed its capacity" in detail["counter_drift"]
    assert await counts(db, "s-1") == (1, 0)
    assert report.violations_left == 2


# -- holds past their deadline --------------------------------------------------------------


async def plant_holds(db: asyncpg.Connection, shard: int = 1) -> None:
    await add_slot(db, "s-1", capacity=4, shard=shard)
    await add_booking(db, "b-stale", "s-1", "alice", expires_at_ms=STALE_MS)
    await add_booking(
        db, "b-late", "s-1", "bob", reserved_at_ms=NOW_MS - HOLD_MS, expires_at_ms=NOW_MS - 10
    )
    await add_booking(db, "b-fresh", "s-1", "carol")


async def test_holds_past_their_deadline_are_found(db: asyncpg.Connection) -> None:
    await plant_holds(db)
    report = await check(db)
    assert kinds(report) == [("hold_past_deadline", "s-1", "b-stale")]
    assert finding(report, "b-stale").shard == 1
    assert finding(report, "b-stale").detail == (
        "RESERVED 60 s past its deadline 2027-01-15T07:58:59.999Z"
    )
    # Without a grace, the late one counts too.
    assert len((await check(db, hold_grace_ms=0)).findings) == 2


@pytest.mark.parametrize("owned", [None, {1}, {0, 1, 2}])
async def test_a_hold_of_an_owned_shard_is_left_to_its_owner(
    db: asyncpg.Connection, owned: set[int] | None
) -> None:
    await plant_holds(db)
    before = await snapshot(db)
    report = await check(db, repair=True, owned_shards=owned)
    assert not finding(report, "b-stale").repaired
    assert "has an owner" in finding(report, "b-stale").detail
    assert report.violations_left == 1
    assert await snapshot(db) == before


async def test_a_hold_of_a_shard_nobody_owns_is_expired(db: asyncpg.Connection) -> None:
    await plant_holds(db)
    await set_fence(db, 1, 7)
    asked: list[int] = []

    async def owned(shard: int) -> bool:
        asked.append(shard)
        return False

    report = await check(db, repair=True, owned_shards=owned)
    assert asked == [1]
    assert finding(report, "b-stale").repaired
    assert report.violations_left == 0
    assert await status(db, "b-stale") == ("EXPIRED", 2, NOW_MS)
    assert (await status(db, "b-late"))[0] == "RESERVED"
    assert await counts(db, "s-1") == (0, 2)
    row = await db.fetchrow("SELECT * FROM audit_log")
    assert row is not None
    assert dict(row) | {"id": 0, "request_id": "", "details": ""} == {
        "id": 0,
        "at_ms": NOW_MS,
        "shard": 1,
        "request_id": "",
        "actor": REPAIR_ACTOR,
        "entity": "booking",
        "entity_id": "b-stale",
        "slot_id": "s-1",
        "user_id": "alice",
        "from_status": "RESERVED",
        "to_status": "EXPIRED",
        "trigger": REPAIR_TRIGGER,
        "details": "",
        # A repair comes from no HTTP request.
        "http_request_id": None,
        "client_ip": None,
        "user_agent": None,
    }
    assert (await check(db)).findings == []


@pytest.mark.parametrize("fenced", [True, False])
async def test_a_takeover_during_the_repair_stops_it(
    db: asyncpg.Connection, database_url: str, fenced: bool
) -> None:
    """The owner check said "nobody", but a new owner wrote its token before the
    repair locked the fence: its loaded state must not change behind its back."""
    await plant_holds(db)
    if fenced:
        await set_fence(db, 1, 7)
    other = await asyncpg.connect(database_url)

    async def taken_over_after_asking(shard: int) -> bool:
        await set_fence(other, shard, 8, "o-new")
        return False

    try:
        report = await check(db, repair=True, owned_shards=taken_over_after_asking)
    finally:
        await other.close()
    assert not finding(report, "b-stale").repaired
    assert "taken over" in finding(report, "b-stale").detail
    assert (await status(db, "b-stale"))[0] == "RESERVED"
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 0


async def test_a_first_takeover_in_flight_holds_the_repair_back(
    db: asyncpg.Connection, database_url: str
) -> None:
    """No fence row yet: a first owner is writing one (not committed) and loading the
    shard. The repair must wait for it, then see the shard taken."""
    await plant_holds(db)
    owner = await asyncpg.connect(database_url)
    try:
        taking_over = owner.transaction()
        await taking_over.start()
        await set_fence(owner, 1, 1, "o-first")
        repair = asyncio.create_task(check(db, repair=True, owned_shards=set()))
        done, _ = await asyncio.wait({repair}, timeout=0.5)
        assert not done, "the repair went ahead of a takeover in flight"
        await taking_over.commit()
        report = await asyncio.wait_for(repair, timeout=10)
    finally:
        await owner.close()
    assert not finding(report, "b-stale").repaired
    assert "taken over" in finding(report, "b-stale").detail
    assert (await status(db, "b-stale"))[0] == "RESERVED"


async def test_queue_offers_and_holds_with_waiting_users_are_left_to_the_next_owner(
    db: asyncpg.Connection,
) -> None:
    await add_slot(db, "s-1", capacity=1)
    await add_booking(
        db,
        "b-offer",
        "s-1",
        "alice",
        via_queue=True,
        expires_at_ms=STALE_MS,
    )
    await add_entry(db, "s-1", "alice", 1, "NOTIFIED", booking_id="b-offer")
    await add_slot(db, "s-2", capacity=1)
    await add_booking(
        db,
        "b-held",
        "s-2",
        "bob",
        expires_at_ms=STALE_MS,
    )
    await add_entry(db, "s-2", "carol", 1, "WAITING")
    before = await snapshot(db)
    report = await check(db, repair=True, owned_shards=set())
    assert kinds(report) == [
        ("hold_past_deadline", "s-1", "b-offer"),
        ("hold_past_deadline", "s-2", "b-held"),
    ]
    assert not any(f.repaired for f in report.findings)
    assert "queue offer" in finding(report, "b-offer").detail
    assert "users wait" in finding(report, "b-held").detail
    assert await snapshot(db) == before


# -- queue entries --------------------------------------------------------------------------


async def test_notified_entries_without_their_offered_hold(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=5)
    await add_slot(db, "s-2", capacity=5)
    await add_booking(db, "b-expired", "s-1", "bob", "EXPIRED", via_queue=True)
    await add_booking(db, "b-direct", "s-1", "carol")
    await add_booking(db, "b-other", "s-1", "erin", via_queue=True)
    await add_booking(db, "b-fine", "s-1", "fay", via_queue=True)
    await add_booking(db, "b-elsewhere", "s-2", "gus", via_queue=True)
    await add_entry(db, "s-1", "alice", 1, "NOTIFIED", booking_id="b-missing")
    await add_entry(db, "s-1", "bob", 2, "NOTIFIED", booking_id="b-expired")
    await add_entry(db, "s-1", "carol", 3, "NOTIFIED", booking_id="b-direct")
    await add_entry(db, "s-1", "dave", 4, "NOTIFIED", booking_id="b-other")
    await add_entry(db, "s-1", "fay", 5, "NOTIFIED", booking_id="b-fine")
    await add_entry(db, "s-1", "gus", 6, "NOTIFIED", booking_id="b-elsewhere")
    await add_entry(db, "s-1", "hal", 7, "EXPIRED", booking_id="b-expired")
    before = await snapshot(db)
    report = await check(db, repair=True, owned_shards=set())
    details = {f.user_id: f.detail for f in report.findings}
    assert {f.kind for f in report.findings} == {"notified_entry_without_hold"}
    assert sorted(details) == ["alice", "bob", "carol", "dave", "gus"]
    assert "does not exist" in details["alice"]
    assert "is EXPIRED" in details["bob"]
    assert "not offered from the queue" in details["carol"]
    assert "belongs to erin" in details["dave"]
    assert "slot s-2" in details["gus"]
    assert not any(f.repaired for f in report.findings)
    assert await snapshot(db) == before


# -- the engine's counts ----------------------------------------------------------------------


async def test_engine_counts_that_differ_from_the_database(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=3)
    await add_slot(db, "s-2", capacity=3, shard=3)
    await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
    await add_booking(db, "b-2", "s-1", "bob")
    await add_booking(db, "b-3", "s-2", "alice")
    engine = {"s-1": (1, 1), "s-2": (1, 0), "s-new": (0, 1)}
    before = await snapshot(db)
    report = await check(db, engine_counts=engine, repair=True, owned_shards=set())
    assert kinds(report) == [
        ("engine_counts_differ", "s-2", None),
        ("engine_slot_unknown", "s-new", None),
    ]
    differ, unknown = report.findings
    assert differ.shard == 3
    assert "engine counts 1 confirmed + 0 held, the database 0 confirmed + 1 held" in differ.detail
    assert (differ.violation, unknown.violation) == (True, False)
    assert report.violations == [differ]
    assert report.violations_left == 1
    assert not differ.repaired
    assert await snapshot(db) == before


# -- the listing limit -------------------------------------------------------------------------


async def test_past_the_listing_limit_findings_are_counted(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=10, shard=0)
    for n in range(5):
        await add_booking(
            db,
            f"b-{n}",
            "s-1",
            f"u-{n}",
            expires_at_ms=STALE_MS - n,
        )
    report = await check(db, findings_max=2)
    assert len(report.findings) == 2
    assert report.found["hold_past_deadline"] == 5
    assert report.violations_left == 5
    # The oldest first.
    assert [f.booking_id for f in report.findings] == ["b-4", "b-3"]
    report = await check(db, findings_max=2, repair=True, owned_shards=set())
    assert report.violations_left == 3
    assert await counts(db, "s-1") == (0, 3)


def test_instants_are_printed_as_iso_8601_utc() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(NOW_MS) == "2027-01-15T08:00:00.000Z"
    assert iso_utc(NOW_MS - 1) == "2027-01-15T07:59:59.999Z"

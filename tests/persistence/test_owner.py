"""A shard owner against real PostgreSQL and Redis: durable replies, recovery, leases."""

import asyncio
import hashlib

import asyncpg
import pytest

from engine.core import protocol as p
from engine.core.routing import PartitionSet
from engine.core.states import BookingStatus, QueueStatus
from engine.core.storable import NUMBER_MESSAGE
from engine.shell.clock import SystemClock
from engine.shell.errors import ShardFailed
from engine.shell.owner import OwnerState
from engine.shell.owner_states import OwnerTransitionRefused
from persistence.store import ShardSnapshot
from tests.persistence.helpers import (
    Driver,
    booking_row,
    create_slot,
    make_owner,
    request_id,
    slot_on,
)
from tests.support.domain import HOUR_MS


async def test_acknowledged_changes_are_in_the_database_and_come_back_after_a_restart(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    owner = make_owner(database_url, redis_namespace)
    await owner.start()
    drive = Driver(owner)
    now_ms = SystemClock().now_ms()
    slot_id = slot_on(0, 1)
    created = await drive.one(create_slot(slot_id, now_ms, capacity=1, metadata={"room": 7}))
    assert created.status == 201
    held = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="ann"))
    assert isinstance(held, p.BookingResult) and held.status == 201
    queued = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="bob"))
    assert isinstance(queued, p.QueueResult) and queued.status == 202
    confirm_id = request_id()
    confirmed = await drive.one(
        p.Confirm(request_id=confirm_id, booking_id=held.booking.id, user_id="ann")
    )
    assert isinstance(confirmed, p.BookingResult)
    assert confirmed.booking.status is BookingStatus.CONFIRMED

    # Acknowledged means committed: the rows are there before the owner stops.
    row = await booking_row(db, held.booking.id)
    assert row is not None and row["status"] == "CONFIRMED"
    slot_row = await db.fetchrow("SELECT * FROM slots WHERE id = $1", slot_id)
    assert (slot_row["confirmed_count"], slot_row["held_count"]) == (1, 0)
    assert slot_row["metadata"] == '{"room": 7}'
    entry = await db.fetchrow("SELECT * FROM queue_entries WHERE user_id = 'bob'")
    assert entry["status"] == "WAITING" and entry["seq"] == 1
    transitions = await db.fetch(
        "SELECT from_status, to_status, trigger FROM audit_log WHERE entity_id = $1 ORDER BY id",
        held.booking.id,
    )
    assert [tuple(r) for r in transitions] == [
        ("PENDING", "RESERVED", "reserve"),
        ("RESERVED", "CONFIRMED", "confirm"),
    ]
    await owner.close()

    successor = make_owner(database_url, redis_namespace)
    await successor.start()
    assert successor.state is OwnerState.SERVING
    drive = Driver(successor)
    # The same request id answers with its first outcome: nothing applies twice.
    replay = await drive.one(
        p.Confirm(request_id=confirm_id, booking_id=held.booking.id, user_id="ann")
    )
    assert replay == confirmed
    position = await drive.one(
        p.QueuePosition(request_id=request_id(), slot_id=slot_id, user_id="bob")
    )
    assert isinstance(position, p.QueueResult)
    assert position.entry.status is QueueStatus.WAITING and position.entry.position == 1
    assert position.entry.slot.current_bookings == 1
    assert position.entry.slot.metadata_dict() == {"room": 7}
    # Capacity freed after the restart goes to the queue, as before it.
    cancelled = await drive.one(
        p.Cancel(request_id=request_id(), booking_id=held.booking.id, user_id="ann")
    )
    assert isinstance(cancelled, p.BookingResult)
    offered = await drive.one(
        p.QueuePosition(request_id=request_id(), slot_id=slot_id, user_id="bob")
    )
    assert isinstance(offered, p.QueueResult) and offered.entry.status is QueueStatus.NOTIFIED
    successor.check_invariants()
    await successor.close()
    tokens = await db.fetchval("SELECT token FROM shard_fences WHERE shard = 0")
    assert tokens == 2


async def test_a_hold_acknowledged_before_a_restart_expires_on_time_after_it(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    owner = make_owner(database_url, redis_namespace)
    await owner.start()
    drive = Driver(owner)
    now_ms = SystemClock().now_ms()
    slot_id = slot_on(0, 1)
    await drive.one(create_slot(slot_id, now_ms, capacity=1, domain="short"))
    held = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="ann"))
    assert isinstance(held, p.BookingResult)
    await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="bob"))
    await owner.close()
    # The hold lapses while nobody owns the shard ...
    await asyncio.sleep(0.5)
    successor = make_owner(database_url, redis_namespace)
    await successor.start()
    # ... so the new owner fires it at once and offers the place to the queue.
    async with asyncio.timeout(10):
        while True:
            row = await booking_row(db, held.booking.id)
            offered = await db.fetchval("SELECT status FROM queue_entries WHERE user_id = 'bob'")
            if row["status"] == "EXPIRED" and offered == "NOTIFIED":
                break
            await asyncio.sleep(0.05)
    assert row["version"] == 2
    await successor.close()


async def test_idempotency_keys_survive_a_restart(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    owner = make_owner(database_url, redis_namespace)
    await owner.start()
    drive = Driver(owner)
    slot_id = slot_on(0, 1)
    other_slot = slot_on(0, 1, resource="other")
    now_ms = SystemClock().now_ms()
    await drive.one(create_slot(slot_id, now_ms, capacity=1))
    await drive.one(create_slot(other_slot, now_ms, capacity=1))
    first = await drive.one(
        p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="ann", idempotency_key="k1")
    )
    assert isinstance(first, p.BookingResult) and first.status == 201
    assert await db.fetchval("SELECT count(*) FROM idempotency_records") == 1
    await owner.close()

    successor = make_owner(database_url, redis_namespace)
    await successor.start()
    drive = Driver(successor)
    # A new request id with the same key and body: the first outcome, not a second hold.
    replay = await drive.one(
        p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="ann", idempotency_key="k1")
    )
    assert replay == first
    reused = await drive.one(
        p.Reserve(request_id=request_id(), slot_id=other_slot, user_id="ann", idempotency_key="k1")
    )
    assert isinstance(reused, p.Failure) and reused.code == "IdempotencyKeyReused"
    assert await db.fetchval("SELECT count(*) FROM bookings") == 1
    await successor.close()


async def test_metadata_numbers_load_back_as_stored_and_a_float_jsonb_would_widen_is_refused(
    database_url: str, redis_namespace: str
) -> None:
    owner = make_owner(database_url, redis_namespace)
    await owner.start()
    now_ms = SystemClock().now_ms()
    edges = {"top": 9.223372036854775e18, "low": -9.223372036854775e18, "tiny": 5e-324, "e": 1e16}
    kept, widened = slot_on(0, 1, "kept"), slot_on(0, 1, "widened")
    try:
        created, refused = await Driver(owner).run(
            create_slot(kept, now_ms, metadata=edges),
            # jsonb would give it back as 100000000000000000000, which no shard could load.
            create_slot(widened, now_ms + 2 * HOUR_MS, metadata={"n": 1e20}),
        )
    finally:
        await owner.close()
    assert created.status == 201
    assert isinstance(refused, p.Failure) and refused.details == {"metadata.n": NUMBER_MESSAGE}

    successor = make_owner(database_url, redis_namespace)
    try:
        await successor.start()
        found = await Driver(successor).one(p.GetSlot(request_id=request_id(), slot_id=kept))
    finally:
        await successor.close()
    assert isinstance(found, p.SlotResult)
    # By value (1e16 comes back as the integer 10000000000000000).
    assert {k: float(v) for k, v in found.slot.metadata_dict().items()} == edges


async def test_text_too_long_for_an_index_is_refused_alone_and_the_flush_commits(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    # Incompressible, and past the ~2.7 kB an index row holds (idempotency_records_pkey,
    # slots_by_resource): once one of them failed the whole flush with a 503 for all.
    too_long = "".join(hashlib.sha256(bytes([n])).hexdigest() for n in range(100))
    owner = make_owner(database_url, redis_namespace)
    await owner.start()
    now_ms = SystemClock().now_ms()
    slot_id = slot_on(0, 1)
    try:
        drive = Driver(owner)
        assert (await drive.one(create_slot(slot_id, now_ms, capacity=3))).status == 201
        keyed, resource, held = await drive.run(
            p.Reserve(
                request_id=request_id(), slot_id=slot_id, user_id="ann", idempotency_key=too_long
            ),
            create_slot(slot_on(0, 1), now_ms + 2 * HOUR_MS, resource_id=too_long),
            p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="bob"),
        )
    finally:
        await owner.close()
    assert isinstance(keyed, p.Failure) and list(keyed.details) == ["idempotencyKey"], keyed
    assert isinstance(resource, p.Failure) and list(resource.details) == ["resourceId"]
    assert isinstance(held, p.BookingResult) and held.status == 201, held
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE slot_id = $1", slot_id) == 1


async def test_the_owner_of_shard_0_purges_audit_rows_and_request_outcomes_past_their_retention(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO audit_log (at_ms, shard, request_id, actor, entity, entity_id, slot_id,"
        " trigger) VALUES (1, 0, 'old', 'system', 'slot', 's', 's', 'created')"
    )
    # Old outcomes of every shard, not only its own: the one purge of request outcomes.
    await db.execute(
        "INSERT INTO request_outcomes (shard, at_ms, requests, outcomes)"
        " VALUES (0, 1, 1, '\\x00'), (3, 1, 1, '\\x00')"
    )
    owner = make_owner(database_url, redis_namespace, maintenance_every_s=0.2)
    await owner.start()
    async with asyncio.timeout(30):
        while await db.fetchval(
            "SELECT (SELECT count(*) FROM audit_log WHERE request_id = 'old')"
            " + (SELECT count(*) FROM request_outcomes WHERE at_ms = 1)"
        ):
            await asyncio.sleep(0.05)
    await owner.close()


async def test_a_read_beside_a_change_is_answered_before_the_change_commits(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    flush_may_start = asyncio.Event()
    flush_may_start.set()

    async def gate() -> None:
        await flush_may_start.wait()

    owner = make_owner(database_url, redis_namespace, before_flush=gate)
    await owner.start()
    drive = Driver(owner)
    now_ms = SystemClock().now_ms()
    busy, quiet = slot_on(0, 1), slot_on(0, 1)
    await drive.run(create_slot(busy, now_ms), create_slot(quiet, now_ms))

    flush_may_start.clear()
    reserve = p.Reserve(request_id=request_id(), slot_id=busy, user_id="ann")
    position = p.QueuePosition(request_id=request_id(), slot_id=quiet, user_id="bob")
    early: list[bytes] = []
    batch = asyncio.ensure_future(
        owner.execute_batch(drive.codec.encode_batch([reserve, position]), early.append)
    )
    async with asyncio.timeout(10):
        while not early:
            await asyncio.sleep(0.005)

    # The position is out; the reserve waits for its commit, which has not happened.
    answered = drive.codec.decode_early(early[0])
    assert answered.indices == [1] and answered.results[0].status == 404
    assert not batch.done()
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE slot_id = $1", busy) == 0
    flush_may_start.set()
    held, _ = drive.codec.decode_reply(await asyncio.wait_for(batch, 10))
    assert held.status == 201
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE slot_id = $1", busy) == 1
    runtime = owner.runtime
    assert runtime is not None and runtime.statistics().reads_answered_early == 1
    await owner.close()


async def test_a_load_that_completes_after_the_owner_stopped_never_serves(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    owner = make_owner(database_url, redis_namespace)
    await owner.start()
    assert owner.state is OwnerState.SERVING
    token = owner.statistics().token
    assert token is not None
    await owner.close()
    assert owner.state is OwnerState.STOPPED

    # A reload that was under way when the owner stopped hands its snapshot over
    # late: the owner's table has no edge from STOPPED, so nothing is served.
    late = ShardSnapshot(
        shard=0,
        token=token,
        partitions=PartitionSet.single(0, 1),
        generation=0,
        slots=[],
        bookings=[],
        entries=[],
        outcomes=[],
        keys=[],
    )
    closed_runtime = owner.runtime
    with pytest.raises(OwnerTransitionRefused):
        owner._serve(late, db)
    assert owner.state is OwnerState.STOPPED and owner.runtime is closed_runtime
    with pytest.raises(ShardFailed):
        await Driver(owner).one(p.ListSlots(request_id=request_id()))

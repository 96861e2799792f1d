"""Partitions in PostgreSQL: P recorded once, the map and its moves, and the fence per partition.

The zombie test follows ``test_zombie.py``: owner A serves a partition, applies
a confirmation in memory and freezes before its flush; the partition moves to
owner B, which reloads and serves it; then A's late flush goes out. With the
fence the database refuses it (A answers 503 and reloads what the map leaves
it), and what clients were told agrees with the database. The negative
control disables A's fence check: its confirmation lands and is acknowledged,
then the hold expires under B, which never heard of it: a lost acknowledgement.
"""

import asyncio
import functools
import shutil
import time
from pathlib import Path

import asyncpg
import pytest

from config.settings import Settings
from engine.core import protocol as p
from engine.core.routing import PARTITIONS_DEFAULT, partition_of
from engine.core.states import QueueStatus
from engine.shell.clock import SystemClock
from engine.shell.coalescer import EngineClient
from engine.shell.errors import ShardUnreachable
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.owner import OwnerState
from gateway.server import EngineStartFailed, storage_and_partitions
from persistence.migrate import MIGRATIONS_DIR, migrate
from persistence.partitioning import (
    PartitioningError,
    establish_partitions,
    load_partition_map,
    move_partitions,
    read_partition_map,
)
from tests.persistence.conftest import REDIS_URL
from tests.persistence.helpers import (
    Driver,
    create_slot,
    make_owner,
    policies,
    request_id,
    slot_on,
    storage,
)
from tests.persistence.test_zombie import (
    Gate,
    hold_then_freeze,
    slot_counts,
    wake_the_zombie,
)
from tests.support.integrity import assert_consistent

HOLD_MS = 3_000
LEGACY_ROWS = Path(__file__).parent / "fixtures" / "legacy_0002.sql"
# When the legacy rows were written: their holds expired two minutes later.
LEGACY_HOLDS_EXPIRE_MS = 1_796_651_967_561


async def test_a_new_database_records_its_partitions_and_spreads_them(
    db: asyncpg.Connection,
) -> None:
    first, moved = await establish_partitions(db, partitions=None, shard_count=4)
    assert (first.partitions, first.version, moved) == (PARTITIONS_DEFAULT, 1, {})
    assert first.counts() == {0: 1024, 1: 1024, 2: 1024, 3: 1024}
    # For a shard count dividing P, every slot is where `routing key % shards` put it.
    assert first.shard_of(slot_on(3, 4)) == 3
    again, moved = await establish_partitions(db, partitions=PARTITIONS_DEFAULT, shard_count=4)
    assert (again, moved) == (first, {})
    assert await load_partition_map(db) == first


async def test_another_p_on_an_existing_database_is_refused_with_one_line(
    database_url: str, db: asyncpg.Connection
) -> None:
    await establish_partitions(db, partitions=64, shard_count=2)
    with pytest.raises(PartitioningError, match="created with 64 partitions") as refused:
        await establish_partitions(db, partitions=128, shard_count=2)
    assert "\n" not in str(refused.value)
    # Through a start: the same line, as the reason the engine did not start.
    asked = Settings(database_url=database_url, redis_url=REDIS_URL, partitions=128, shards=2)
    with pytest.raises(EngineStartFailed, match="not SLOTENGINE_PARTITIONS=128"):
        await storage_and_partitions(asked)
    # Unset, the recorded P is used.
    storage, partition_map = await storage_and_partitions(
        Settings(database_url=database_url, redis_url=REDIS_URL, shards=2)
    )
    assert storage.partitions == partition_map.partitions == 64


async def test_more_shards_than_partitions_are_refused(db: asyncpg.Connection) -> None:
    with pytest.raises(PartitioningError, match="3 shards cannot share 2 partitions"):
        await establish_partitions(db, partitions=2, shard_count=3)
    await establish_partitions(db, partitions=2, shard_count=2)
    with pytest.raises(PartitioningError, match="3 shards cannot share the database's 2"):
        await establish_partitions(db, partitions=None, shard_count=3)


async def test_a_new_shard_count_moves_the_fewest_partitions_and_every_slot_is_served(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    two, _ = await establish_partitions(db, partitions=12, shard_count=2)
    owners = [make_owner(database_url, redis_namespace, shard=s, shard_count=2) for s in (0, 1)]
    for owner in owners:
        await owner.start()
    now_ms = SystemClock().now_ms()
    slots: list[str] = []
    for n in range(24):
        slot_id = f"{n * 0x0AAAAAAB % 2**32:08x}-s{n}"
        shard = two.shard_of(slot_id)
        assert shard is not None
        created = await Driver(owners[shard]).one(create_slot(slot_id, now_ms, resource_id=f"r{n}"))
        assert created.status == 201, created
        slots.append(slot_id)
    assert {partition_of(slot_id, 12) for slot_id in slots} == set(range(12))
    fences = dict(await db.fetch("SELECT shard, generation FROM shard_fences"))
    for owner in owners:
        await owner.close()

    three, moved = await establish_partitions(db, partitions=None, shard_count=3)
    assert three.counts() == {0: 4, 1: 4, 2: 4}
    assert len(moved) == 4 and three.version == two.version + 1
    # Only moves to the new shard: each old shard gave up two of its six.
    assert {to for _, to in moved.values()} == {2}
    after = dict(await db.fetch("SELECT shard, generation FROM shard_fences"))
    assert after == {shard: generation + 1 for shard, generation in fences.items()}

    owners = [make_owner(database_url, redis_namespace, shard=s, shard_count=3) for s in range(3)]
    for owner in owners:
        await owner.start()
    try:
        for slot_id in slots:
            shard = three.shard_of(slot_id)
            assert shard is not None
            view = await Driver(owners[shard]).one(
                p.GetSlot(request_id=request_id(), slot_id=slot_id)
            )
            assert isinstance(view, p.SlotResult), (slot_id, shard, view)
            others = [s for s in range(3) if s != shard]
            for other in others:
                missing = await Driver(owners[other]).one(
                    p.GetSlot(request_id=request_id(), slot_id=slot_id)
                )
                # Not a 404: "not served here", for the caller to follow the map.
                assert p.not_served(missing) == partition_of(slot_id, 12), missing
    finally:
        for owner in owners:
            await owner.close()


@pytest.mark.parametrize("fence_check", [True, False], ids=["fenced", "fence-disabled"])
async def test_a_paused_owner_of_a_moved_partition_cannot_write_after_the_move(
    fence_check: bool, database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    await establish_partitions(db, partitions=2, shard_count=2)
    gate = Gate()
    zombie = make_owner(
        database_url,
        redis_namespace,
        shard=0,
        shard_count=2,
        owner="owner-a",
        before_flush=gate,
        fence_check=fence_check,
        hold_ttl_ms=HOLD_MS,
    )
    successor = make_owner(
        database_url, redis_namespace, shard=1, shard_count=2, owner="owner-b", hold_ttl_ms=HOLD_MS
    )
    await zombie.start()
    await successor.start()
    a, b = Driver(zombie), Driver(successor)
    slot_id = slot_on(0, 2)
    held, late_reply = await hold_then_freeze(a, gate, slot_id)

    # The partition moves to B. B's own partitions changed too: its next flush is
    # refused before it writes anything, and it reloads, now with A's partition.
    moved = await move_partitions(db, {partition_of(slot_id, 2): 1})
    assert moved.owners == (1, 1)
    refused = await b.one(create_slot(slot_on(1, 2), SystemClock().now_ms()))
    assert refused.status == 503, refused
    async with asyncio.timeout(20):
        while successor.state is not OwnerState.SERVING:
            await asyncio.sleep(0.02)
    assert successor.statistics().state == "serving" and successor.state is OwnerState.SERVING
    reply, acknowledged_confirmation, lost_acknowledgements = await wake_the_zombie(
        db, b, gate, late_reply, held.booking.id
    )
    try:
        if fence_check:
            assert isinstance(reply, p.Failure) and reply.status == 503, reply
            assert lost_acknowledgements == 0
            # A is still shard 0's owner: it reloads, with no partition left.
            async with asyncio.timeout(20):
                while zombie.state is not OwnerState.SERVING:
                    await asyncio.sleep(0.02)
            gone = await a.one(p.GetSlot(request_id=request_id(), slot_id=slot_id))
            assert p.not_served(gone) == partition_of(slot_id, 2), gone
            await assert_consistent(db, engine_counts=await slot_counts(b, slot_id))
        else:
            # The negative control: without the fence the zombie's write lands and
            # the client holds a confirmation the database no longer has.
            assert acknowledged_confirmation
            assert lost_acknowledgements == 1
    finally:
        await successor.close()
        await zombie.close()


async def test_a_database_written_before_partitions_loads_with_its_holds_and_queues(
    database_url: str, redis_namespace: str, tmp_path: Path
) -> None:
    """Rows written by the engine before partitions (``fixtures/legacy_0002.sql``: two
    shards, on each a slot of capacity 2 with two holds taken with Idempotency-Keys
    and two users waiting) are served after the migration by the same shards."""
    admin = await asyncpg.connect(database_url)
    await admin.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    before = tmp_path / "migrations"
    before.mkdir()
    for name in ("0001_schema.sql", "0002_lean_indexes.sql"):
        shutil.copy(MIGRATIONS_DIR / name, before / name)
    await migrate(admin, before)
    await admin.execute(LEGACY_ROWS.read_text())
    await admin.execute("SELECT pg_catalog.set_config('search_path', 'public', false)")
    # The rows as if written a moment ago: their holds lapse in three seconds.
    shift = int(time.time() * 1000) + HOLD_MS - LEGACY_HOLDS_EXPIRE_MS
    await admin.execute(
        """
        UPDATE slots SET start_ms = start_ms + $1, end_ms = end_ms + $1,
                         created_at_ms = created_at_ms + $1, updated_at_ms = updated_at_ms + $1;
        """.replace("$1", str(shift))
        + f"""
        UPDATE bookings SET reserved_at_ms = reserved_at_ms + {shift},
                            expires_at_ms = expires_at_ms + {shift},
                            updated_at_ms = updated_at_ms + {shift};
        UPDATE queue_entries SET joined_at_ms = joined_at_ms + {shift},
                                 last_seen_ms = last_seen_ms + {shift},
                                 updated_at_ms = updated_at_ms + {shift};
        UPDATE idempotency_records SET at_ms = at_ms + {shift};
        UPDATE request_outcomes SET at_ms = at_ms + {shift};
        """
    )
    slots = dict(await admin.fetch("SELECT shard, id FROM slots ORDER BY shard"))
    holds = await admin.fetch(
        "SELECT id, slot_id, user_id FROM bookings WHERE status = 'RESERVED' ORDER BY id"
    )
    assert len(slots) == 2 and len(holds) == 4

    applied = await migrate(admin)
    assert applied[:2] == ["0003_partitions.sql", "0004_partition_moves.sql"]
    partition_map, moved = await establish_partitions(admin, partitions=None, shard_count=2)
    assert (partition_map.partitions, partition_map.owners, moved) == (2, (0, 1), {})
    assert dict(await admin.fetch("SELECT partition, id FROM slots")) == slots
    # Partition n was shard n: every idempotency record knows its partition, so it
    # follows the partition when it moves.
    assert await admin.fetch("SELECT DISTINCT shard, partition FROM idempotency_records") != []
    assert not await admin.fetchval(
        "SELECT count(*) FROM idempotency_records WHERE partition IS DISTINCT FROM shard"
    )

    owners = [make_owner(database_url, redis_namespace, shard=s, shard_count=2) for s in (0, 1)]
    for owner in owners:
        await owner.start()
    try:
        for shard, slot_id in slots.items():
            drive = Driver(owners[shard])
            view = await drive.one(p.GetSlot(request_id=request_id(), slot_id=slot_id))
            assert isinstance(view, p.SlotResult) and view.slot.held_count == 2, view
            for user_id in ("alice", "bob"):
                again = await drive.one(
                    p.Reserve(
                        request_id=request_id(),
                        slot_id=slot_id,
                        user_id=user_id,
                        idempotency_key=f"k-{user_id}",
                    )
                )
                # The key's first outcome, replayed: the same hold, not a new one.
                assert isinstance(again, p.BookingResult), again
                assert again.booking.id in {h["id"] for h in holds}
            for position, user_id in enumerate(("carol", "dave"), start=1):
                place = await drive.one(
                    p.QueuePosition(request_id=request_id(), slot_id=slot_id, user_id=user_id)
                )
                assert isinstance(place, p.QueueResult), place
                assert (place.entry.status, place.entry.position) == (
                    QueueStatus.WAITING,
                    position,
                )
        # The holds' timers were re-armed from the rows: they lapse, and the
        # waiting users are offered the places.
        async with asyncio.timeout(30):
            while (
                await admin.fetchval("SELECT count(*) FROM bookings WHERE status = 'EXPIRED'") < 4
                or await admin.fetchval(
                    "SELECT count(*) FROM queue_entries WHERE status = 'NOTIFIED'"
                )
                < 4
            ):
                await asyncio.sleep(0.1)
        await assert_consistent(admin)
    finally:
        for owner in owners:
            await owner.close()
        await admin.close()


@pytest.mark.parametrize("reads_the_map", [True, False], ids=["follows", "no-map-source"])
async def test_a_gateway_with_an_old_map_is_told_and_follows_the_stored_one(
    reads_the_map: bool, database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    """A gateway started before a partition moved routes by the old map: the shard
    answers that it does not serve the partition (applying nothing), and the
    client reads the stored map and sends the command where it now goes. A
    client that cannot read the map answers 503 (never 404, never a 500)."""
    old_map, _ = await establish_partitions(db, partitions=4, shard_count=2)
    slot_id = slot_on(0, 4)  # partition 0: shard 0 in the old map
    host = OwnedInProcessHost(
        shard_count=2, policies=policies(), storage=storage(database_url, redis_namespace)
    )
    await host.start()
    try:
        setup = EngineClient(host, partition_map=old_map)
        assert (await setup.execute(create_slot(slot_id, SystemClock().now_ms()))).status == 201
    finally:
        await host.close()
    new_map = await move_partitions(db, {0: 1})
    assert new_map.shard_of(slot_id) == 1 and new_map.version == old_map.version + 1

    host = OwnedInProcessHost(
        shard_count=2, policies=policies(), storage=storage(database_url, redis_namespace)
    )
    await host.start()
    try:
        source = functools.partial(read_partition_map, database_url)
        client = EngineClient(
            host,
            partition_map=old_map,
            map_source=source if reads_the_map else None,
            unavailable_patience_ms=300,
        )
        reserve = p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="ann")
        if not reads_the_map:
            with pytest.raises(ShardUnreachable, match="partition 0 is moving"):
                await client.execute(reserve)
            assert await db.fetchval("SELECT count(*) FROM bookings") == 0
            return
        held = await client.execute(reserve)
        assert isinstance(held, p.BookingResult) and held.status == 201, held
        view = await client.execute(p.GetSlot(request_id=request_id(), slot_id=slot_id))
        assert isinstance(view, p.SlotResult) and view.slot.held_count == 1
        stats = client.statistics()
        assert (stats.redirected, stats.map_reads) == (1, 1)
        assert client.partition_map == new_map
        assert await db.fetchval("SELECT count(*) FROM bookings") == 1
    finally:
        await host.close()

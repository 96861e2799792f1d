"""The write-behind writer on its own: group commit, its size limit, durability waits."""

import asyncio

import asyncpg

from engine.core import protocol as p
from engine.core.clock import ManualClock
from engine.core.shard import ShardCore
from persistence.partitioning import ensure_partition_map
from persistence.store import take_over
from persistence.writer import ShardWriter
from tests.persistence.helpers import create_slot, policies, request_id, slot_on
from tests.support.domain import HOUR_MS

NOW_MS = 1_900_000_000_000


async def _writer(database_url: str, **options: object) -> tuple[ShardWriter, asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    await ensure_partition_map(connection, partitions=None, shard_count=1)
    await take_over(connection, 0, 1, "owner", NOW_MS)
    writer = ShardWriter(connection, shard=0, token=1, owner="owner", **options)  # type: ignore[arg-type]
    writer.start()
    return writer, connection


def _changes(reserves: int) -> tuple[list[p.AnyEvent], ShardCore]:
    core = ShardCore(
        shard_id=0, shard_count=1, policies=policies(), now_ms=ManualClock(NOW_MS).now_ms()
    )
    slot_id = slot_on(0, 1)
    core.execute(create_slot(slot_id, NOW_MS, capacity=reserves, start_ms=NOW_MS + HOUR_MS), NOW_MS)
    for n in range(reserves):
        core.execute(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id=f"u{n}"), NOW_MS)
    return core.drain_events(), core


async def test_everything_published_before_a_wait_is_committed_when_it_returns(
    database_url: str, db: asyncpg.Connection
) -> None:
    writer, connection = await _writer(database_url)
    events, _ = _changes(30)
    for event in events:
        writer.publish([event])
    await writer.wait_durable()
    assert await db.fetchval("SELECT count(*) FROM bookings") == 30
    stats = writer.statistics()
    # 31 hand-offs went out in far fewer transactions: group commit.
    assert stats.flushes < 31 and stats.events_written == len(events)
    await writer.close()
    await connection.close()


async def test_a_flush_never_carries_more_than_its_limit(
    database_url: str, db: asyncpg.Connection
) -> None:
    writer, connection = await _writer(database_url, flush_events_max=10)
    events, _ = _changes(45)
    for start in range(0, len(events), 3):
        writer.publish(events[start : start + 3])
    await writer.wait_durable()
    stats = writer.statistics()
    assert stats.flush_events_max <= 10 + 2  # the hand-off that crossed the limit
    assert stats.flushes >= len(events) // 12
    assert await db.fetchval("SELECT count(*) FROM bookings") == 45
    await writer.close()
    await connection.close()


async def test_relaxed_durability_answers_before_the_commit(
    database_url: str, db: asyncpg.Connection
) -> None:
    gate = asyncio.Event()

    async def held() -> None:
        await gate.wait()

    writer, connection = await _writer(database_url, relaxed=True, before_flush=held)
    events, _ = _changes(5)
    writer.publish(events)
    await asyncio.wait_for(writer.wait_durable(), 5)  # does not wait for the commit
    assert await db.fetchval("SELECT count(*) FROM bookings") == 0
    gate.set()
    async with asyncio.timeout(10):
        while await db.fetchval("SELECT count(*) FROM bookings") != 5:
            await asyncio.sleep(0.02)
    await writer.close()
    await connection.close()


async def test_a_wait_for_a_position_needs_only_the_hand_offs_up_to_it(
    database_url: str, db: asyncpg.Connection
) -> None:
    gate = asyncio.Event()
    flushes = 0

    async def second_held() -> None:
        nonlocal flushes
        flushes += 1
        if flushes > 1:
            await gate.wait()

    writer, connection = await _writer(database_url, before_flush=second_held)
    events, _ = _changes(4)
    writer.publish(events[:2])
    first = writer.position
    await writer.wait_durable(first)
    assert writer.durable_position >= first
    writer.publish(events[2:])  # its flush is held
    await asyncio.wait_for(writer.wait_durable(first), 5)  # already committed: at once
    later = asyncio.ensure_future(writer.wait_durable())
    await asyncio.sleep(0.05)
    assert not later.done()
    assert writer.durable_position == first
    gate.set()
    await asyncio.wait_for(later, 10)
    assert writer.durable_position == writer.position
    assert await db.fetchval("SELECT count(*) FROM bookings") == 4
    await writer.close()
    await connection.close()


async def test_the_flush_lag_is_the_age_of_the_oldest_uncommitted_change(
    database_url: str, db: asyncpg.Connection
) -> None:
    gate = asyncio.Event()

    async def held() -> None:
        await gate.wait()

    writer, connection = await _writer(database_url, before_flush=held)
    idle = writer.statistics()
    assert (idle.flush_lag_ms, idle.last_flush_ago_ms, idle.pending_events) == (0, None, 0)
    events, _ = _changes(3)
    writer.publish(events[:2])  # its flush hangs: a frozen database, as the writer sees it
    done = asyncio.ensure_future(writer.wait_durable())
    await asyncio.sleep(0.2)
    writer.publish(events[2:])  # waits behind it, younger
    first = writer.statistics()
    await asyncio.sleep(0.3)
    second = writer.statistics()
    # The lag is the older change's age, and it grows while nothing commits.
    assert first.flush_lag_ms >= 200 and second.flush_lag_ms >= first.flush_lag_ms + 300
    # Queued behind the flush (the rows being flushed are not counted as pending).
    assert second.pending_events > 0 and second.last_flush_ago_ms is None
    gate.set()
    await asyncio.wait_for(done, 10)
    await asyncio.wait_for(writer.wait_durable(), 10)
    committed = writer.statistics()
    assert (committed.flush_lag_ms, committed.pending_events) == (0, 0)
    assert committed.last_flush_ago_ms is not None and committed.last_flush_ago_ms < 5_000
    # Idle: nothing is behind, however long since the last commit.
    await asyncio.sleep(0.2)
    quiet = writer.statistics()
    assert quiet.flush_lag_ms == 0
    assert quiet.last_flush_ago_ms is not None
    assert quiet.last_flush_ago_ms >= committed.last_flush_ago_ms + 200
    assert await db.fetchval("SELECT count(*) FROM bookings") == 3
    await writer.close()
    await connection.close()

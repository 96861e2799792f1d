"""A batch re-sent after its owner died applies once, even across a restart.

The coalescer re-sends the same bytes (the same request ids) when a call
fails with the actor's death; the batch may or may not have been applied.
Outcomes are remembered with the flush that committed them, so the new owner
answers a re-sent batch with the first outcomes instead of applying it again.
"""

import asyncio
import os
import signal
import uuid

import asyncpg
import pytest

from engine.core import protocol as p
from engine.core.routing import make_slot_id
from engine.shell.clock import SystemClock
from engine.shell.owner import StorageSettings
from engine.shell.ray_actor import RayShardTransport, kill_shard_actors
from tests.persistence.conftest import REDIS_URL
from tests.persistence.helpers import Driver, create_slot, make_owner, request_id, slot_on
from tests.support.domain import POLICIES


async def _count(db: asyncpg.Connection, slot_id: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM bookings WHERE slot_id = $1", slot_id))


async def test_a_batch_committed_before_its_owner_died_is_answered_from_memory_of_it(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    first = make_owner(database_url, redis_namespace, owner="host-1/a", succeeds="host-1/")
    await first.start()
    slot_id = slot_on(0, 1)
    drive = Driver(first)
    await drive.one(create_slot(slot_id, SystemClock().now_ms(), capacity=5))
    batch = [
        p.Reserve(request_id=request_id(), slot_id=slot_id, user_id=f"user-{n}") for n in range(3)
    ]
    data = drive.codec.encode_batch(batch)
    first_answers = drive.codec.decode_reply(await first.execute_batch(data))
    assert [r.status for r in first_answers] == [201, 201, 201]
    # The owner dies without a word (no flush, no lease release); the same actor's
    # next incarnation takes the shard over at once.
    first.pause_lease_renewal()
    second = make_owner(database_url, redis_namespace, owner="host-1/b", succeeds="host-1/")
    await second.start()
    again = drive.codec.decode_reply(await second.execute_batch(data))
    assert again == first_answers
    assert await _count(db, slot_id) == 3
    await second.close()


@pytest.mark.ray
async def test_a_batch_resent_to_a_killed_and_restarted_actor_applies_once(
    ray_cluster: str, database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    prefix = f"retry-{uuid.uuid4().hex[:8]}"
    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
    )
    transport = await RayShardTransport.connect(
        shard_count=1, policies=POLICIES, name_prefix=prefix, storage=storage, timeout_ms=60_000
    )
    try:
        codec = p.BatchCodec()
        resource = f"room-{uuid.uuid4().hex[:6]}"
        slot_id = make_slot_id(resource, uuid.uuid4().hex)
        now_ms = SystemClock().now_ms()
        created = await transport.call_batch(
            0,
            codec.encode_batch([create_slot(slot_id, now_ms, capacity=10, resource_id=resource)]),
            60_000,
        )
        assert codec.decode_reply(created)[0].status == 201
        data = codec.encode_batch(
            [
                p.Reserve(request_id=request_id(), slot_id=slot_id, user_id=f"user-{n}")
                for n in range(5)
            ]
        )
        identity = await transport.identity(0, timeout_ms=60_000)
        # The call and the kill race: the batch may die before, during or after
        # its commit, and its reply may or may not get out.
        call = asyncio.create_task(transport.call_batch(0, data, 60_000))
        await asyncio.sleep(0.005)
        os.kill(identity.pid, signal.SIGKILL)
        first: list[p.AnyResult] | None
        try:
            first = codec.decode_reply(await call)
        except Exception:
            first = None
        async with asyncio.timeout(60):
            while True:
                try:
                    again = codec.decode_reply(await transport.call_batch(0, data, 60_000))
                    break
                except Exception:
                    await asyncio.sleep(0.2)
        assert [r.status for r in again] == [201] * 5
        if first is not None:
            assert again == first
        assert await _count(db, slot_id) == 5
        # And once more, for good measure: still the first outcomes, still five bookings.
        assert codec.decode_reply(await transport.call_batch(0, data, 60_000)) == again
        assert await _count(db, slot_id) == 5
    finally:
        kill_shard_actors(shard_count=1, name_prefix=prefix)

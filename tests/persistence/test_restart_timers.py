"""A shard actor restarted by Ray serves its shard at once, called or not.

A hold is acknowledged, then the shard actor's process is SIGKILLed; Ray restarts
it, and nobody calls the shard again. The new incarnation must take the shard
over from PostgreSQL and re-arm its timers by itself: the hold expires in the
database after its deadline (never before), within a bound generous for a loaded
machine, not only once some request reaches the shard.
"""

import asyncio
import functools
import os
import signal
import time
import uuid

import asyncpg
import pytest

from engine.core import protocol as p
from engine.core.routing import make_slot_id
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.owner import StorageSettings
from engine.shell.ray_actor import kill_shard_actors
from tests.persistence.conftest import REDIS_URL
from tests.persistence.test_crash import _while_restarting, connect_owned_shards
from tests.support.domain import DAY_MS, HOUR_MS, policy

pytestmark = pytest.mark.ray

HOLD_MS = 3_000
POLICIES = {"default": policy(), "expiring": policy("expiring", hold_ttl_ms=HOLD_MS)}
# After its deadline the hold expires once the restarted process has started and
# loaded its shard: seconds, on a loaded machine tens of them; without the start
# on creation, never (the test's own deadline).
EXPIRY_DEADLINE_S = 60.0
POLL_S = 0.2


async def test_a_restarted_shard_actor_expires_holds_without_being_called(
    ray_cluster: str, database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    prefix = f"restart-{uuid.uuid4().hex[:8]}"
    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
    )
    transport = await connect_owned_shards(1, POLICIES, prefix, storage)
    client = EngineClient(transport)
    ids = RequestIds()
    try:
        resource = f"expiring-{uuid.uuid4().hex[:6]}"
        slot_id = make_slot_id(resource, uuid.uuid4().hex)
        start_ms = time.time_ns() // 1_000_000 + DAY_MS
        created = await client.execute(
            p.CreateSlot(
                request_id=ids.next(),
                slot_id=slot_id,
                resource_id=resource,
                domain="expiring",
                start_ms=start_ms,
                end_ms=start_ms + HOUR_MS,
                capacity=1,
            )
        )
        assert created.status == 201, created
        hold = await client.execute(
            p.Reserve(request_id=ids.next(), slot_id=slot_id, user_id="quiet-quinn")
        )
        assert isinstance(hold, p.BookingResult) and hold.status == 201, hold

        before = await transport.identity(0, timeout_ms=60_000)
        os.kill(before.pid, signal.SIGKILL)
        # From here on, nothing calls the shard until the hold has expired.

        async with asyncio.timeout(EXPIRY_DEADLINE_S + HOLD_MS / 1000):
            while (
                await db.fetchval("SELECT status FROM bookings WHERE id = $1", hold.booking.id)
                != "EXPIRED"
            ):
                await asyncio.sleep(POLL_S)
        expired_at_ms = await db.fetchval(
            "SELECT at_ms FROM audit_log WHERE entity_id = $1 AND to_status = 'EXPIRED'",
            hold.booking.id,
        )
        assert expired_at_ms >= hold.booking.expires_at_ms

        # It was the new incarnation that expired it.
        after = await _while_restarting(functools.partial(transport.identity, 0, timeout_ms=60_000))
        assert after.pid != before.pid and after.restarted
    finally:
        kill_shard_actors(shard_count=1, name_prefix=prefix)

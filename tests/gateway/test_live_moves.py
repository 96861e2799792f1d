"""Live updates follow partitions that move between shards (real PostgreSQL and Redis).

The gateway here is wired as ``slotengine serve`` wires one
(``gateway.server.follow_the_map``): its engine client routes by the stored
partition map and reads it again when the bus channel says it changed
(``MAP_CHANGED``, as ``engine/shell/scaling.py`` publishes it) or every
``MAP_REFRESH_EVERY_S``; the live connections follow each new map without
closing. The shards are durable in-process owners and the partitions move
live (``engine.shell.rebalance.rebalance``), as ``slotengine cluster scale``
moves them between shard actors.
"""

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from config.redis_keys import MAP_CHANGED, RedisKeys
from engine.core.routing import PartitionMap
from engine.shell.coalescer import EngineClient
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.owner import StorageSettings
from engine.shell.rebalance import rebalance
from gateway import server
from gateway.app import create_app
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.live.bus import EventBus
from gateway.live.endpoints import LiveConnections, add_realtime
from persistence.partitioning import read_partition_map
from tests.conftest import REDIS_URL
from tests.gateway.conftest import SECRET, Token
from tests.gateway.test_api import Client, _slot
from tests.gateway.test_realtime import (
    RECEIVE_LIMIT_S,
    _next_of,
    _query_token,
    _reserve,
)
from tests.support.domain import POLICIES

# The stored map's partitions moved in one step (the default P is 4,096).
ONE_STEP = 65_536
# Without a notice the gateway reads the map this often (the test's own interval).
REFRESH_QUICKLY_S = 0.2
# Never within a test: only the notice can make the gateway read the map.
REFRESH_NEVER_S = 3_600.0


@dataclass
class Deployment:
    database_url: str
    host: OwnedInProcessHost
    client: EngineClient
    live: LiveConnections
    api: Client
    publisher: aioredis.Redis
    namespace: str

    async def announce_map(self) -> None:
        """What the coordinator of a scale publishes once the map changed."""
        await self.publisher.publish(RedisKeys(self.namespace).bus_channel, MAP_CHANGED)


Start = Callable[[int], Awaitable[Deployment]]


@pytest.fixture
async def deployment(database_url: str, redis_namespace: str) -> AsyncIterator[Start]:
    """Starts the shards and one gateway following the partition map."""
    started: list[Callable[[], Awaitable[None]]] = []

    async def start(shard_count: int) -> Deployment:
        storage = StorageSettings(
            database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
        )
        host = OwnedInProcessHost(shard_count=shard_count, policies=POLICIES, storage=storage)
        await host.start()
        source = functools.partial(read_partition_map, database_url)
        client = EngineClient(host, partition_map=await source(), map_source=source)
        redis_client = aioredis.Redis.from_url(REDIS_URL)
        bus = EventBus(redis_client, redis_namespace)
        await bus.start()
        live = LiveConnections(bus)
        app = create_app(client, Verifier(AuthSettings(secret=SECRET)))
        add_realtime(app, live)
        api: Client = TestClient(TestServer(app))
        await api.start_server()
        following = asyncio.get_running_loop().create_task(server.follow_the_map(client, live))

        async def stop() -> None:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following
            await api.close()
            await bus.close()
            await redis_client.aclose()
            await host.close()

        started.append(stop)
        return Deployment(
            database_url=database_url,
            host=host,
            client=client,
            live=live,
            api=api,
            publisher=redis_client,
            namespace=redis_namespace,
        )

    yield start
    for stop in started:
        await stop()


def _resource_on(partition_map: PartitionMap, shard: int) -> str:
    """A resource whose slots the map puts on ``shard``."""
    for n in range(10_000):
        resource_id = f"room-moving-{n}"
        if partition_map.shard_of_resource(resource_id) == shard:
            return resource_id
    raise AssertionError(f"no resource routes to shard {shard}")


async def _queued_slot_on(
    deployment: Deployment, token: Token, shard: int, waiting: list[str]
) -> str:
    """A slot of capacity 1 on ``shard``, held by "holder", with ``waiting`` queued."""
    resource_id = _resource_on(deployment.client.partition_map, shard)
    slot = await _slot(deployment.api, token, capacity=1, resourceId=resource_id)
    await _reserve(deployment.api, token, slot["id"], "holder")
    for user in waiting:
        assert "queue" in await _reserve(deployment.api, token, slot["id"], user)
    slot_id: str = slot["id"]
    assert deployment.client.shard_of(slot_id) == shard
    return slot_id


async def _moved_off_shard_one(deployment: Deployment) -> None:
    """Every partition of shard 1 moves to shard 0, the gateway not told."""
    report = await rebalance(deployment.database_url, deployment.host, 1, step_partitions=ONE_STEP)
    assert report.moved > 0 and report.counts == {0: report.partitions}


async def _position_after_the_move(
    ws: aiohttp.ClientWebSocketResponse, deployment: Deployment, token: Token, slot_id: str
) -> None:
    """The watch's snapshot again, from the new owner; then a change there reaches it."""
    resynced = await _next_of(ws, "queue.position")
    assert resynced["position"] == 3 and resynced["totalInQueue"] == 3
    assert deployment.client.shard_of(slot_id) == 0
    left = await deployment.api.delete(f"/api/slots/{slot_id}/queue", headers=token("w1"))
    assert left.status == 204
    moved = await _next_of(ws, "queue.position")
    assert moved["position"] == 2 and moved["totalInQueue"] == 2
    assert moved["status"] == "WAITING"
    # The watched user's own place changes on the new owner too.
    gone = await deployment.api.delete(f"/api/slots/{slot_id}/queue", headers=token("w3"))
    assert gone.status == 204
    own = await _next_of(ws, "queue.position")
    assert own["position"] is None and own["status"] is None


async def test_a_queue_watch_follows_its_slot_to_the_shard_it_moved_to(
    deployment: Start, token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "MAP_REFRESH_EVERY_S", REFRESH_NEVER_S)
    gateway = await deployment(2)
    slot_id = await _queued_slot_on(gateway, token, 1, ["w1", "w2", "w3"])
    async with gateway.api.ws_connect(f"/ws/queue/{slot_id}?token={_query_token('w3')}") as ws:
        assert (await _next_of(ws, "queue.position"))["position"] == 3
        await _moved_off_shard_one(gateway)
        # The gateway still routes by the map it had: nothing asked it to read again.
        assert gateway.client.shard_of(slot_id) == 1
        await gateway.announce_map()
        await _position_after_the_move(ws, gateway, token, slot_id)
        assert not ws.closed
    assert gateway.live.interests == set()
    assert gateway.live.bus.statistics().channels == 0


async def test_without_the_notice_the_periodic_read_of_the_map_gets_there(
    deployment: Start, token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "MAP_REFRESH_EVERY_S", REFRESH_QUICKLY_S)
    gateway = await deployment(2)
    slot_id = await _queued_slot_on(gateway, token, 1, ["w1", "w2", "w3"])
    async with gateway.api.ws_connect(f"/ws/queue/{slot_id}?token={_query_token('w3')}") as ws:
        assert (await _next_of(ws, "queue.position"))["position"] == 3
        await _moved_off_shard_one(gateway)
        # No notice, and no command that a shard could refuse: the refresh alone.
        await _position_after_the_move(ws, gateway, token, slot_id)


async def test_a_bookings_watch_hears_a_shard_added_by_a_scale_up(
    deployment: Start, token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "MAP_REFRESH_EVERY_S", REFRESH_NEVER_S)
    gateway = await deployment(1)
    before = gateway.client.partition_map
    assert before.shard_count == 1
    # A slot that the scale-up moves to the new shard.
    resource_id = _resource_on(before.respread(2), 1)
    slot = await _slot(gateway.api, token, capacity=2, resourceId=resource_id)
    bus = gateway.live.bus
    async with gateway.api.ws_connect(f"/ws/bookings?token={_query_token('ann')}") as ws:
        assert bus.statistics().channels == 1
        await gateway.host.grow(2)
        report = await rebalance(gateway.database_url, gateway.host, 2, step_partitions=ONE_STEP)
        assert report.moved > 0
        await gateway.announce_map()
        # The connection listens to the new shard too, once the gateway read the map.
        async with asyncio.timeout(RECEIVE_LIMIT_S):
            while bus.statistics().channels < 2:
                await asyncio.sleep(0.01)
        assert gateway.client.shard_of(slot["id"]) == 1
        mine = (await _reserve(gateway.api, token, slot["id"], "ann"))["booking"]
        update = await _next_of(ws, "booking.updated")
        assert update["slotId"] == slot["id"] and update["booking"]["id"] == mine["id"]
        assert update["booking"]["status"] == "RESERVED"
        assert not ws.closed

"""Live updates over WebSocket and SSE, fanned out through Redis (real PostgreSQL and Redis).

Each gateway here is an aiohttp app with its own ``EventBus`` (its own pub/sub
connection) on the same durable in-process engine, as two gateway processes
would share the shard actors. Beside the test policies the engine serves
``idle``, whose waiting users are expired after ``IDLE_MS`` without a sign of
life: a live watch on one's queue place is one.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from engine.core.routing import shard_of
from engine.shell.coalescer import EngineClient
from engine.shell.events import PublisherStatistics
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.owner import StorageSettings
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.live.bus import EventBus
from gateway.live.endpoints import (
    CLOSE_TRY_AGAIN_LATER,
    TOUCH_EVERY_S_MAX,
    LiveConnections,
    add_realtime,
    touch_every_s,
)
from tests.conftest import REDIS_URL
from tests.engine.shell.conftest import wait_until
from tests.gateway.conftest import SECRET, SHARDS, Token
from tests.gateway.test_api import Client, _slot
from tests.support.domain import POLICIES, policy

# Generous: a message normally arrives within milliseconds.
RECEIVE_LIMIT_S = 10.0

Gateway = Callable[..., Awaitable[Client]]

# The "idle" domain's queue inactivity timeout, and how often the gateways here
# touch the places their connections watch (well within it, as served).
IDLE_MS = 2_000
TOUCH_EVERY_S = 0.2


@pytest.fixture
async def host(database_url: str, redis_namespace: str) -> AsyncIterator[OwnedInProcessHost]:
    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
    )
    policies = {**POLICIES, "idle": policy("idle", queue_inactivity_ms=IDLE_MS)}
    engine_host = OwnedInProcessHost(shard_count=SHARDS, policies=policies, storage=storage)
    await engine_host.start()
    yield engine_host
    await engine_host.close()


@pytest.fixture
async def gateway(
    host: OwnedInProcessHost, redis_namespace: str
) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """Starts gateways on the shared engine, each with its own Redis pub/sub connection."""
    started: list[tuple[Client, EventBus, aioredis.Redis]] = []

    async def start(**live_options: Any) -> Client:
        redis_client = aioredis.Redis.from_url(REDIS_URL)
        bus = EventBus(redis_client, redis_namespace)
        await bus.start()
        app = create_app(EngineClient(host), Verifier(AuthSettings(secret=SECRET)))
        add_realtime(app, LiveConnections(bus, **live_options))
        client: Client = TestClient(TestServer(app))
        await client.start_server()
        started.append((client, bus, redis_client))
        return client

    yield start
    for client, bus, redis_client in started:
        await client.close()
        await bus.close()
        await redis_client.aclose()


def _query_token(sub: str, role: str = "user") -> str:
    return issue_token(SECRET, sub, role, 3600)


async def _next(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.receive(), RECEIVE_LIMIT_S)
    assert message.type is aiohttp.WSMsgType.TEXT, message
    data: dict[str, Any] = json.loads(message.data)
    return data


async def _next_of(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    """The next message of ``kind``, skipping others (slot.updated comes with most changes)."""
    while True:
        data = await _next(ws)
        if data["type"] == kind:
            return data


async def _reserve(api: Client, token: Token, slot_id: str, user: str) -> dict[str, Any]:
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": slot_id}, headers=token(user)
    )
    assert response.status in (201, 202), await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def _queued_slot(api: Client, token: Token, waiting: list[str]) -> str:
    """A slot of capacity 1 held by "holder", with ``waiting`` queued in that order."""
    slot = await _slot(api, token, capacity=1)
    await _reserve(api, token, slot["id"], "holder")
    for user in waiting:
        assert "queue" in await _reserve(api, token, slot["id"], user)
    return str(slot["id"])


async def test_the_queue_socket_starts_with_the_position_then_the_slot(
    gateway: Gateway, token: Token
) -> None:
    api = await gateway()
    slot_id = await _queued_slot(api, token, ["w1", "w2", "w3"])
    async with api.ws_connect(f"/ws/queue/{slot_id}?token={_query_token('w2')}") as ws:
        first = await _next(ws)
        assert first == {
            "type": "queue.position",
            "slotId": slot_id,
            "position": 2,
            "status": "WAITING",
            "totalInQueue": 3,
            "estimatedWaitTime": first["estimatedWaitTime"],
            "estimatedWaitSeconds": first["estimatedWaitSeconds"],
            "bookingId": None,
        }
        assert first["estimatedWaitSeconds"] > 0
        second = await _next(ws)
        assert second["type"] == "slot.updated" and second["slotId"] == slot_id
        assert second["slot"]["heldCount"] == 1 and second["slot"]["queueLength"] == 3


async def test_a_watcher_not_in_the_queue_gets_a_null_position(
    gateway: Gateway, token: Token
) -> None:
    api = await gateway()
    slot_id = await _queued_slot(api, token, ["w1"])
    async with api.ws_connect(
        f"/ws/queue/{slot_id}", headers=token("onlooker")
    ) as ws:  # the header works too
        first = await _next(ws)
        assert first["type"] == "queue.position"
        assert first["position"] is None and first["status"] is None
        assert first["totalInQueue"] == 1
        assert (await _next(ws))["type"] == "slot.updated"


async def test_a_change_through_one_gateway_reaches_a_socket_on_another(
    gateway: Gateway, token: Token
) -> None:
    one, other = await gateway(), await gateway()
    slot_id = await _queued_slot(one, token, ["w1", "w2", "w3"])
    async with one.ws_connect(f"/ws/queue/{slot_id}?token={_query_token('w3')}") as ws:
        assert (await _next_of(ws, "queue.position"))["position"] == 3
        left = await other.delete(f"/api/slots/{slot_id}/queue", headers=token("w1"))
        assert left.status == 204
        moved = await _next_of(ws, "queue.position")
        assert moved["position"] == 2 and moved["totalInQueue"] == 2
        assert moved["status"] == "WAITING"
        # Someone behind does not move anyone ahead: w2 leaving moves w3 again.
        again = await other.delete(f"/api/slots/{slot_id}/queue", headers=token("w2"))
        assert again.status == 204
        assert (await _next_of(ws, "queue.position"))["position"] == 1


async def test_a_shard_nobody_watches_publishes_again_once_a_socket_connects(
    gateway: Gateway, token: Token, host: OwnedInProcessHost
) -> None:
    api = await gateway()
    slot_id = await _queued_slot(api, token, ["w1", "w2", "w3"])
    shard = shard_of(slot_id, host.shard_count)
    assert shard is not None

    def events() -> PublisherStatistics:
        stats = host.owner(shard).statistics().events
        assert stats is not None
        return stats

    # Those changes reached no subscriber, so the shard stops publishing; a
    # poll does not turn it on again (only a live watch's snapshot does).
    async with asyncio.timeout(RECEIVE_LIMIT_S):
        while events().publishing:
            await asyncio.sleep(0.01)
    polled = await api.get(f"/api/slots/{slot_id}/queue/position", headers=token("w3"))
    assert polled.status == 200 and (await polled.json())["position"] == 3
    left = await api.delete(f"/api/slots/{slot_id}/queue", headers=token("w1"))
    assert left.status == 204
    assert not events().publishing
    skipped = events().unwatched
    assert skipped > 0
    async with api.ws_connect(f"/ws/queue/{slot_id}?token={_query_token('w3')}") as ws:
        assert (await _next_of(ws, "queue.position"))["position"] == 2
        assert events().publishing
        ahead_left = await api.delete(f"/api/slots/{slot_id}/queue", headers=token("w2"))
        assert ahead_left.status == 204
        moved = await _next_of(ws, "queue.position")
        assert moved["position"] == 1 and moved["totalInQueue"] == 1
        assert events().unwatched == skipped and events().publishing


async def test_freed_capacity_offers_the_head_and_moves_everyone_behind(
    gateway: Gateway, token: Token
) -> None:
    api = await gateway()
    slot = await _slot(api, token, capacity=1)
    held = await _reserve(api, token, slot["id"], "holder")
    booking_id = held["booking"]["id"]
    for user in ("w1", "w2"):
        await _reserve(api, token, slot["id"], user)
    head = await api.ws_connect(f"/ws/queue/{slot['id']}?token={_query_token('w1')}")
    behind = await api.ws_connect(f"/ws/queue/{slot['id']}?token={_query_token('w2')}")
    try:
        assert (await _next_of(head, "queue.position"))["position"] == 1
        assert (await _next_of(behind, "queue.position"))["position"] == 2
        confirm = await api.post(f"/api/bookings/{booking_id}/confirm", headers=token("holder"))
        assert confirm.status == 200
        cancel = await api.post(
            f"/api/bookings/{booking_id}/cancel", json={"reason": "ill"}, headers=token("holder")
        )
        assert cancel.status == 200

        offer = await _next_of(head, "queue.offer")
        assert offer["slotId"] == slot["id"] and offer["bookingId"]
        assert offer["expiresAt"].endswith("Z")
        notified = await _next_of(head, "queue.position")
        assert notified["status"] == "NOTIFIED" and notified["position"] is None
        assert notified["totalInQueue"] == 1  # w2 alone waits now
        assert notified["bookingId"] == offer["bookingId"]
        moved = await _next_of(behind, "queue.position")
        assert moved["position"] == 1 and moved["totalInQueue"] == 1

        claimed = await api.post(f"/api/bookings/{offer['bookingId']}/confirm", headers=token("w1"))
        assert claimed.status == 200
        converted = await _next_of(head, "queue.position")
        assert converted["status"] == "CONVERTED"
    finally:
        await head.close()
        await behind.close()


async def test_joining_while_connected_sends_the_new_position(
    gateway: Gateway, token: Token
) -> None:
    api = await gateway()
    slot_id = await _queued_slot(api, token, ["w1"])
    async with api.ws_connect(f"/ws/queue/{slot_id}?token={_query_token('late')}") as ws:
        assert (await _next_of(ws, "queue.position"))["position"] is None
        joined = await api.post(f"/api/slots/{slot_id}/queue", headers=token("late"))
        assert joined.status == 201
        update = await _next_of(ws, "queue.position")
        assert update["position"] == 2 and update["status"] == "WAITING"


async def test_the_bookings_socket_starts_with_active_bookings_then_follows_changes(
    gateway: Gateway, token: Token
) -> None:
    api = await gateway()
    slot = await _slot(api, token, capacity=2)
    other_slot = await _slot(api, token, capacity=2)
    mine = (await _reserve(api, token, slot["id"], "ann"))["booking"]
    await _reserve(api, token, other_slot["id"], "bob")  # not ann's: never sent to her
    async with api.ws_connect(f"/ws/bookings?token={_query_token('ann')}") as ws:
        first = await _next(ws)
        assert first["type"] == "booking.updated" and first["slotId"] == slot["id"]
        assert first["booking"]["id"] == mine["id"] and first["booking"]["status"] == "RESERVED"
        confirmed = await api.post(f"/api/bookings/{mine['id']}/confirm", headers=token("ann"))
        assert confirmed.status == 200
        update = await _next(ws)
        assert update["booking"]["status"] == "CONFIRMED"
        assert update["booking"]["version"] > first["booking"]["version"]
        second = (await _reserve(api, token, other_slot["id"], "ann"))["booking"]
        created = await _next(ws)
        assert created["booking"]["id"] == second["id"]


async def test_the_socket_handshake_has_the_security_headers_and_a_request_id(
    gateway: Gateway, token: Token
) -> None:
    api = await gateway()
    slot_id = await _queued_slot(api, token, ["w1"])
    handshake = await api.get(
        f"/ws/queue/{slot_id}?token={_query_token('w1')}",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "X-Request-Id": "trace-ws",
        },
    )
    assert handshake.status == 101
    assert handshake.headers["X-Request-Id"] == "trace-ws"
    assert handshake.headers["X-Content-Type-Options"] == "nosniff"
    assert handshake.headers["X-Frame-Options"] == "DENY"
    handshake.close()


async def test_the_event_stream_carries_the_same_events(gateway: Gateway, token: Token) -> None:
    api = await gateway()
    slot_id = await _queued_slot(api, token, ["w1", "w2"])
    response = await api.get(f"/api/slots/{slot_id}/queue/events", headers=token("w2"))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Request-Id"]

    async def next_event() -> tuple[str, dict[str, Any]]:
        kind = ""
        while True:
            line = (await asyncio.wait_for(response.content.readline(), RECEIVE_LIMIT_S)).decode()
            if line.startswith("event: "):
                kind = line.removeprefix("event: ").strip()
            elif line.startswith("data: "):
                return kind, json.loads(line.removeprefix("data: "))

    kind, data = await next_event()
    assert kind == "queue.position" and data["position"] == 2
    assert (await next_event())[0] == "slot.updated"
    await api.delete(f"/api/slots/{slot_id}/queue", headers=token("w1"))
    while True:
        kind, data = await next_event()
        if kind == "queue.position":
            break
    assert data["position"] == 1
    response.close()


async def test_the_event_stream_is_as_the_document_describes_it(
    gateway: Gateway, token: Token
) -> None:
    api = await gateway()
    document = await (await api.get("/openapi.json")).json()
    operation = document["paths"]["/api/slots/{slotId}/queue/events"]["get"]
    described = operation["responses"]["200"]["content"]["text/event-stream"]["schema"]
    slot_id = await _queued_slot(api, token, ["w1", "w2"])
    response = await api.get(f"/api/slots/{slot_id}/queue/events", headers=token("w2"))
    await api.delete(f"/api/slots/{slot_id}/queue", headers=token("w1"))
    events: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    # The first state (position, slot), then the change (position, slot): each
    # event is its "event" and "data" fields, a blank line ends it.
    while len(events) < 4:
        line = (await asyncio.wait_for(response.content.readline(), RECEIVE_LIMIT_S)).decode()
        if line == "\n":
            if "data" in fields:
                events.append(fields)
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.rstrip("\n").partition(": ")
            fields[name] = value
    response.close()
    components = {"components": document["components"]}
    assert [event["event"] for event in events] == ["queue.position", "slot.updated"] * 2
    for event in events:
        assert jsonschema_rs.validator_for({**described, **components}).is_valid(event), event
        # OpenAPI leaves "contentSchema" to the reader: the data is checked here.
        (branch,) = [
            b for b in described["oneOf"] if b["properties"]["event"]["const"] == event["event"]
        ]
        content = {**branch["properties"]["data"]["contentSchema"], **components}
        data = json.loads(event["data"])
        assert jsonschema_rs.validator_for(content, validate_formats=True).is_valid(data), data


async def test_the_event_stream_takes_the_token_as_a_query_parameter(
    gateway: Gateway, token: Token
) -> None:
    api = await gateway()
    slot_id = await _queued_slot(api, token, ["w1"])
    response = await api.get(f"/api/slots/{slot_id}/queue/events?token={_query_token('w1')}")
    assert response.status == 200
    response.close()


async def test_live_routes_refuse_before_upgrading(gateway: Gateway, token: Token) -> None:
    api = await gateway()
    slot_id = await _queued_slot(api, token, [])
    for path in (f"/ws/queue/{slot_id}", "/ws/bookings"):
        for query in ("", "?token=not-a-token"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await api.ws_connect(path + query)
            assert refused.value.status == 401
    events = await api.get(f"/api/slots/{slot_id}/queue/events")
    assert events.status == 401 and (await events.json())["error"] == "Unauthorized"
    with pytest.raises(aiohttp.WSServerHandshakeError) as unknown:
        await api.ws_connect(f"/ws/queue/s0-missing?token={_query_token('w1')}")
    assert unknown.value.status == 404
    missing = await api.get(f"/api/slots/s0-missing/queue/events?token={_query_token('w1')}")
    assert missing.status == 404 and (await missing.json())["error"] == "NotFound"
    plain = await api.get(f"/ws/queue/{slot_id}?token={_query_token('w1')}")
    assert plain.status == 400  # not a WebSocket upgrade


async def test_a_consumer_that_falls_behind_is_disconnected(gateway: Gateway, token: Token) -> None:
    # An outbox of one message: the first state (position, then slot) overflows it
    # before the connection's sender runs, as a consumer that never reads would.
    api = await gateway(outbox_messages_max=1)
    slot_id = await _queued_slot(api, token, ["w1"])
    async with api.ws_connect(f"/ws/queue/{slot_id}?token={_query_token('w1')}") as ws:
        while True:
            message = await asyncio.wait_for(ws.receive(), RECEIVE_LIMIT_S)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                break
        assert ws.close_code == CLOSE_TRY_AGAIN_LATER


async def test_idle_connections_get_heartbeats(gateway: Gateway, token: Token) -> None:
    api = await gateway(heartbeat_s=0.2)
    slot_id = await _queued_slot(api, token, ["w1"])
    # WebSocket: the server pings; a client that answers no pong is closed.
    async with api.ws_connect(
        f"/ws/queue/{slot_id}?token={_query_token('w1')}", autoping=False
    ) as ws:
        kinds = [(await _next(ws))["type"] for _ in range(2)]
        assert kinds == ["queue.position", "slot.updated"]
        ping = await asyncio.wait_for(ws.receive(), RECEIVE_LIMIT_S)
        assert ping.type is aiohttp.WSMsgType.PING
    # SSE: a comment line as often.
    response = await api.get(f"/api/slots/{slot_id}/queue/events", headers=token("w1"))
    async with asyncio.timeout(RECEIVE_LIMIT_S):
        while (await response.content.readline()) != b": heartbeat\n":
            pass
    response.close()


@pytest.mark.parametrize("route", ["websocket", "sse"])
async def test_a_watcher_stays_waiting_past_the_inactivity_timeout_and_others_expire(
    gateway: Gateway, token: Token, route: str
) -> None:
    api = await gateway(touch_every_s=TOUCH_EVERY_S)
    slot = await _slot(api, token, capacity=1, domain="idle")
    slot_id = str(slot["id"])
    held = await _reserve(api, token, slot_id, "holder")
    confirmed = await api.post(
        f"/api/bookings/{held['booking']['id']}/confirm", headers=token("holder")
    )
    assert confirmed.status == 200
    assert "queue" in await _reserve(api, token, slot_id, "watcher")
    assert "queue" in await _reserve(api, token, slot_id, "idler")

    async def queue_length() -> int:
        # The slot's view: reading it is no sign of life of anyone in its queue.
        response = await api.get(f"/api/slots/{slot_id}", headers=token("viewer"))
        length: int = (await response.json())["queueLength"]
        return length

    if route == "websocket":
        watching: Any = api.ws_connect(f"/ws/queue/{slot_id}?token={_query_token('watcher')}")
    else:
        watching = api.get(f"/api/slots/{slot_id}/queue/events", headers=token("watcher"))
    async with watching as connection:
        if route == "websocket":
            assert (await _next(connection))["status"] == "WAITING"
        else:
            assert connection.status == 200
        # The idler joined after the watcher and said nothing since: expired. The
        # watcher waited longer than the idler, and waits on.
        await wait_until(queue_length, lambda length: length == 1)
    position = await api.get(f"/api/slots/{slot_id}/queue/position", headers=token("watcher"))
    watcher = await position.json()
    assert (watcher["status"], watcher["position"]) == ("WAITING", 1)
    idler = await api.get(f"/api/slots/{slot_id}/queue/position", headers=token("idler"))
    assert (await idler.json())["status"] == "EXPIRED"
    # Once the watch is closed, nothing keeps the watcher active any more.
    await wait_until(queue_length, lambda length: length == 0)


def test_watchers_are_touched_three_times_per_inactivity_timeout_and_at_least_every_30_s() -> None:
    assert touch_every_s(3_000) == 1.0
    assert touch_every_s(IDLE_MS) < IDLE_MS / 1000
    assert touch_every_s(4 * 3_600_000) == TOUCH_EVERY_S_MAX == 30.0

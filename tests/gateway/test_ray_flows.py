"""The main flows end to end, over HTTP and WebSocket, through real Ray shard actors.

Each test starts durable shard actors of its own on the session's local Ray
(named ``<prefix>-<n>`` with a prefix of its own, so no two tests share an
actor): they take their leases in Redis under the test's key prefix, write
behind to the test's own PostgreSQL database, and publish committed events on
``{namespace}:events:...``. Each gateway is an aiohttp app with its own
``RayShardTransport`` to those actors (found by name, as a second gateway
process would), its own coalescer and its own ``EventBus``.

Nothing here sleeps for a fixed time to let something happen: a timer's effect
is polled for, with a deadline, and a WebSocket message is awaited, with one.
"""

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from engine.shell.coalescer import EngineClient
from engine.shell.owner import StorageSettings
from engine.shell.ray_actor import RayShardTransport, kill_shard_actors
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.principal import Role
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.live.bus import EventBus
from gateway.live.endpoints import LiveConnections, add_realtime
from gateway.observability.endpoints import add_observability
from tests.conftest import REDIS_URL
from tests.gateway.conftest import SECRET
from tests.support.domain import POLICIES, SHORT_HOLD_MS, policy

pytestmark = pytest.mark.ray

Client = TestClient[Any, Any]
Gateway = Callable[[], Awaitable[Client]]

SHARDS = 2
# The shell tests' domains plus "short-hold": holds lapse in 300 ms, offers last the
# default claim TTL. ("short" offers lapse in 300 ms too: a window that a position poll
# on a busy machine can miss, so NOTIFIED could not be asserted reliably there.)
CLAIM_TTL_MS = POLICIES["default"].claim_ttl_ms
FLOW_POLICIES = {
    **POLICIES,
    "short-hold": policy("short-hold", hold_ttl_ms=SHORT_HOLD_MS, claim_ttl_ms=CLAIM_TTL_MS),
}
# Starting an actor process and taking its shard over from PostgreSQL: seconds, not minutes.
CONNECT_TIMEOUT_MS = 60_000
# Generous: a message normally arrives within milliseconds.
RECEIVE_LIMIT_S = 10.0
# How long a polled-for change may take (a 300 ms hold, read within a second of lapsing).
POLL_LIMIT_S = 10.0
POLL_EVERY_S = 0.02
IDLE_LIMIT_S = 30.0


class _Like:
    """Equal to any value ``matches`` accepts: for what the server chooses (ids, times)."""

    def __init__(self, description: str, matches: Callable[[object], bool]) -> None:
        self._description = description
        self._matches = matches

    def __eq__(self, other: object) -> bool:
        return self._matches(other)

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<{self._description}>"


_RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")
# docs/api.md: timestamps are RFC 3339 strings, answered in UTC.
TIME = _Like(
    "an RFC 3339 UTC time", lambda v: isinstance(v, str) and bool(_RFC3339_UTC.fullmatch(v))
)
TEXT = _Like("a non-empty string", lambda v: isinstance(v, str) and v != "")
POSITIVE = _Like("a positive int", lambda v: type(v) is int and v > 0)
OBJECT = _Like("a JSON object", lambda v: isinstance(v, dict))


def _at_least(floor: int) -> _Like:
    return _Like(f"an int >= {floor}", lambda v: type(v) is int and v >= floor)


def _ms(rfc3339: str) -> int:
    moment = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    return round(moment.timestamp() * 1000)


class Shards(msgspec.Struct, kw_only=True):
    prefix: str
    storage: StorageSettings
    transport: RayShardTransport


@pytest.fixture
async def shards(
    ray_cluster: str, database_url: str, redis_namespace: str
) -> AsyncIterator[Shards]:
    """Durable shard actors of this test alone; killed for good afterwards."""
    prefix = f"flows-{uuid.uuid4().hex[:10]}"
    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
    )
    try:
        transport = await RayShardTransport.connect(
            shard_count=SHARDS,
            policies=FLOW_POLICIES,
            name_prefix=prefix,
            storage=storage,
            timeout_ms=CONNECT_TIMEOUT_MS,
        )
        yield Shards(prefix=prefix, storage=storage, transport=transport)
        # Whatever a test did, each shard's memory still agrees with itself.
        for shard in range(SHARDS):
            await transport.check_invariants(shard, timeout_ms=CONNECT_TIMEOUT_MS)
    finally:
        kill_shard_actors(shard_count=SHARDS, name_prefix=prefix)


@pytest.fixture
async def gateway(shards: Shards, redis_namespace: str) -> AsyncIterator[Gateway]:
    """Starts gateways on this test's shard actors, each as a gateway process would be."""
    async with contextlib.AsyncExitStack() as stack:

        async def start() -> Client:
            # Found by name: the very actors the fixture started, not new ones.
            transport = await RayShardTransport.connect(
                shard_count=SHARDS,
                policies=FLOW_POLICIES,
                name_prefix=shards.prefix,
                storage=shards.storage,
                timeout_ms=CONNECT_TIMEOUT_MS,
            )
            for shard in range(SHARDS):
                mine = await transport.identity(shard, timeout_ms=CONNECT_TIMEOUT_MS)
                theirs = await shards.transport.identity(shard, timeout_ms=CONNECT_TIMEOUT_MS)
                assert mine.pid == theirs.pid, "the gateway found another actor"
            engine = EngineClient(transport)
            stack.push_async_callback(engine.wait_idle, IDLE_LIMIT_S)
            redis_client = aioredis.Redis.from_url(REDIS_URL)
            stack.push_async_callback(redis_client.aclose)
            bus = EventBus(redis_client, redis_namespace)
            await bus.start()
            stack.push_async_callback(bus.close)
            app = create_app(engine, Verifier(AuthSettings(secret=SECRET)))
            add_realtime(app, LiveConnections(bus))
            client: Client = TestClient(TestServer(app))
            await client.start_server()
            stack.push_async_callback(client.close)
            return client

        yield start


# -- helpers ------------------------------------------------------------------------


def _bearer(sub: str, role: Role = "user") -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, sub, role, 3600)}"}


def _ws_path(slot_id: str, sub: str) -> str:
    return f"/ws/queue/{slot_id}?token={issue_token(SECRET, sub, 'user', 3600)}"


async def _answer(response: aiohttp.ClientResponse, status: int) -> Any:
    text = await response.text()
    assert response.status == status, f"{response.method} {response.url.path}: {text}"
    return json.loads(text) if text else None


async def _slot(api: Client, *, capacity: int, domain: str = "default") -> dict[str, Any]:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    body = {
        "resourceId": f"room-{uuid.uuid4().hex[:12]}",
        "domain": domain,
        "startTime": start.isoformat(),
        "endTime": (start + timedelta(hours=1)).isoformat(),
        "capacity": capacity,
    }
    created = await api.post("/api/admin/slots", json=body, headers=_bearer("root", "admin"))
    slot: dict[str, Any] = await _answer(created, 201)
    assert slot == {
        "id": TEXT,
        "resourceId": body["resourceId"],
        "domain": domain,
        "startTime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "endTime": (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "capacity": capacity,
        "currentBookings": 0,
        "heldCount": 0,
        "available": capacity,
        "status": "AVAILABLE",
        "queueLength": 0,
        "metadata": {},
        "version": slot["version"],
    }
    return slot


async def _reserve(api: Client, slot_id: str, user: str, status: int) -> dict[str, Any]:
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": slot_id}, headers=_bearer(user)
    )
    body: dict[str, Any] = await _answer(response, status)
    return body


async def _position(api: Client, slot_id: str, user: str) -> dict[str, Any]:
    response = await api.get(f"/api/slots/{slot_id}/queue/position", headers=_bearer(user))
    body: dict[str, Any] = await _answer(response, 200)
    return body


async def _booking(api: Client, booking_id: str, user: str) -> dict[str, Any]:
    response = await api.get(f"/api/bookings/{booking_id}", headers=_bearer(user))
    body: dict[str, Any] = await _answer(response, 200)
    return body


async def _poll(
    probe: Callable[[], Awaitable[dict[str, Any]]], done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Ask ``probe`` until ``done`` holds; fails (with the last answer) past POLL_LIMIT_S."""
    last: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(POLL_LIMIT_S):
            while True:
                last = await probe()
                if done(last):
                    return last
                await asyncio.sleep(POLL_EVERY_S)
    except TimeoutError:
        pytest.fail(f"not reached within {POLL_LIMIT_S} s; last answer: {last}")


async def _next(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.receive(), RECEIVE_LIMIT_S)
    assert message.type is aiohttp.WSMsgType.TEXT, message
    data: dict[str, Any] = json.loads(message.data)
    return data


async def _next_of(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    """The next message of ``kind``; only slot.updated messages (most changes send one)
    may come before it."""
    while True:
        data = await _next(ws)
        if data["type"] == kind:
            return data
        assert data["type"] == "slot.updated", f"waiting for {kind}, got {data}"


def _queue_entry(
    slot_id: str,
    user: str,
    *,
    status: str,
    position: int | None,
    total: int,
    booking_id: str | None = None,
    joined_at: str | None = None,
    notified: bool = False,
    slot: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A QueueEntry as docs/api.md describes it (the wait estimate only while WAITING)."""
    waiting = status == "WAITING"
    return {
        "slotId": slot_id,
        "userId": user,
        "status": status,
        "position": position,
        "totalInQueue": total,
        "estimatedWaitTime": TEXT if waiting else None,
        "estimatedWaitSeconds": POSITIVE if waiting else None,
        "joinedAt": joined_at or TIME,
        "notifiedAt": TIME if notified else None,
        "bookingId": booking_id,
        "offerExpiresAt": TIME if status == "NOTIFIED" else None,
        "slotDetails": slot if slot is not None else OBJECT,
    }


def _slot_view(
    slot: dict[str, Any], *, confirmed: int, held: int, queued: int, status: str
) -> dict[str, Any]:
    """``slot`` (as created) with the given counts; its version only grows."""
    return {
        **slot,
        "currentBookings": confirmed,
        "heldCount": held,
        "available": max(slot["capacity"] - confirmed - held, 0),
        "status": status,
        "queueLength": queued,
        "version": _at_least(slot["version"]),
    }


def _booking_body(
    booking_id: str,
    user: str,
    slot_id: str,
    status: str,
    *,
    reserved_at: str | None = None,
    expires_at: str | None = None,
    confirmed: bool = False,
    cancelled_by: str | None = None,
    cancel_reason: str | None = None,
    refund: int | None = None,
) -> dict[str, Any]:
    cancelled = status == "CANCELLED"
    return {
        "id": booking_id,
        "userId": user,
        "slotId": slot_id,
        "status": status,
        "reservedAt": reserved_at or TIME,
        "expiresAt": expires_at or TIME,
        "confirmedAt": TIME if confirmed else None,
        "completedAt": None,
        "cancelledAt": TIME if cancelled else None,
        "cancelReason": cancel_reason,
        "cancelledBy": cancelled_by,
        "refundPercentage": refund,
        "version": POSITIVE,
        "extensions": 0,
    }


# -- flow 1 (and the data flow 3 checks in PostgreSQL) ----------------------------------


class FirstFlow(msgspec.Struct, kw_only=True):
    slot_id: str
    ann_booking: str
    bob_booking: str
    # bob's queue.position message when he was offered the place.
    notified: dict[str, Any]


async def _reserve_confirm_cancel_and_offer(api: Client) -> FirstFlow:
    slot = await _slot(api, capacity=1)
    slot_id = slot["id"]

    held = await _reserve(api, slot_id, "ann", 201)
    ann = held["booking"]
    assert held == {"booking": _booking_body(ann["id"], "ann", slot_id, "RESERVED")}
    # The default domain's hold TTL: two minutes.
    assert _ms(ann["expiresAt"]) - _ms(ann["reservedAt"]) == POLICIES["default"].hold_ttl_ms

    queued = await _reserve(api, slot_id, "bob", 202)
    held_slot = _slot_view(slot, confirmed=0, held=1, queued=1, status="RESERVED")
    assert queued == {
        "queue": _queue_entry(slot_id, "bob", status="WAITING", position=1, total=1,
                              slot=held_slot)
    }  # fmt: skip
    joined_at = queued["queue"]["joinedAt"]

    async with api.ws_connect(_ws_path(slot_id, "bob")) as ws:
        first = await _next(ws)
        assert first == {
            "type": "queue.position",
            "slotId": slot_id,
            "position": 1,
            "status": "WAITING",
            "totalInQueue": 1,
            "estimatedWaitTime": TEXT,
            "estimatedWaitSeconds": POSITIVE,
            "bookingId": None,
        }
        assert await _next(ws) == {"type": "slot.updated", "slotId": slot_id, "slot": held_slot}

        confirmed = await api.post(f"/api/bookings/{ann['id']}/confirm", headers=_bearer("ann"))
        assert await _answer(confirmed, 200) == _booking_body(
            ann["id"], "ann", slot_id, "CONFIRMED",
            reserved_at=ann["reservedAt"], expires_at=ann["expiresAt"], confirmed=True,
        )  # fmt: skip
        cancelled = await api.post(
            f"/api/bookings/{ann['id']}/cancel",
            json={"reason": "plans changed"},
            headers=_bearer("ann"),
        )
        assert await _answer(cancelled, 200) == _booking_body(
            ann["id"], "ann", slot_id, "CANCELLED",
            reserved_at=ann["reservedAt"], expires_at=ann["expiresAt"], confirmed=True,
            cancelled_by="ann", cancel_reason="plans changed", refund=100,
        )  # fmt: skip

        offer = await _next_of(ws, "queue.offer")
        assert offer == {
            "type": "queue.offer",
            "slotId": slot_id,
            "bookingId": TEXT,
            "expiresAt": TIME,
        }
        # Its exact body is checked by the flow's own test, once the flow has run.
        notified = await _next_of(ws, "queue.position")
        assert notified["status"] == "NOTIFIED", notified
        assert notified["bookingId"] == offer["bookingId"], notified
        bob_booking = offer["bookingId"]

        # The offer is a hold of bob's, for the domain's claim TTL.
        offered = await _booking(api, bob_booking, "bob")
        assert offered == _booking_body(
            bob_booking, "bob", slot_id, "RESERVED", expires_at=offer["expiresAt"]
        )
        assert _ms(offered["expiresAt"]) - _ms(offered["reservedAt"]) == CLAIM_TTL_MS
        offered_slot = _slot_view(slot, confirmed=0, held=1, queued=0, status="RESERVED")
        assert await _position(api, slot_id, "bob") == _queue_entry(
            slot_id, "bob", status="NOTIFIED", position=None, total=0,
            booking_id=bob_booking, joined_at=joined_at, notified=True, slot=offered_slot,
        )  # fmt: skip

        claimed = await api.post(f"/api/bookings/{bob_booking}/confirm", headers=_bearer("bob"))
        assert await _answer(claimed, 200) == _booking_body(
            bob_booking, "bob", slot_id, "CONFIRMED",
            reserved_at=offered["reservedAt"], expires_at=offered["expiresAt"], confirmed=True,
        )  # fmt: skip
        converted = await _next_of(ws, "queue.position")
        assert converted["status"] == "CONVERTED" and converted["position"] is None

    booked_slot = _slot_view(slot, confirmed=1, held=0, queued=0, status="BOOKED")
    position = await _position(api, slot_id, "bob")
    assert position == _queue_entry(
        slot_id, "bob", status="CONVERTED", position=None, total=0,
        booking_id=bob_booking, joined_at=joined_at, notified=True, slot=booked_slot,
    )  # fmt: skip
    view = await api.get(f"/api/slots/{slot_id}", headers=_bearer("ann"))
    assert await _answer(view, 200) == booked_slot
    return FirstFlow(
        slot_id=slot_id, ann_booking=ann["id"], bob_booking=bob_booking, notified=notified
    )


async def test_reserve_confirm_cancel_offers_the_next_queued_user(gateway: Gateway) -> None:
    api = await gateway()
    flow = await _reserve_confirm_cancel_and_offer(api)
    # Once bob is offered nobody is WAITING: docs/api.md counts WAITING entries only in
    # totalInQueue, and the position poll above said 0.
    assert flow.notified == {
        "type": "queue.position",
        "slotId": flow.slot_id,
        "position": None,
        "status": "NOTIFIED",
        "totalInQueue": 0,
        "estimatedWaitTime": None,
        "estimatedWaitSeconds": None,
        "bookingId": flow.bob_booking,
    }


# -- flow 2 ---------------------------------------------------------------------------


async def test_a_lapsed_hold_offers_its_place_to_the_next_queued_user(gateway: Gateway) -> None:
    api = await gateway()
    slot = await _slot(api, capacity=1, domain="short-hold")
    slot_id = slot["id"]

    # Bob watches from before he joins, so nothing can happen before his socket is there.
    async with api.ws_connect(_ws_path(slot_id, "bob")) as ws:
        first = await _next(ws)
        assert first["type"] == "queue.position" and first["status"] is None
        assert first["position"] is None and first["totalInQueue"] == 0
        assert (await _next(ws))["type"] == "slot.updated"

        ann = (await _reserve(api, slot_id, "ann", 201))["booking"]
        assert ann["status"] == "RESERVED"
        assert _ms(ann["expiresAt"]) - _ms(ann["reservedAt"]) == SHORT_HOLD_MS
        queued = await _reserve(api, slot_id, "bob", 202)
        assert queued["queue"]["status"] == "WAITING" and queued["queue"]["position"] == 1

        # Nobody acts from here on. Joining while connected makes the watch read bob's
        # place: WAITING 1, or already NOTIFIED when the hold lapsed before that read.
        before_offer: list[dict[str, Any]] = []
        while (message := await _next(ws))["type"] != "queue.offer":
            assert message["type"] in ("queue.position", "slot.updated"), message
            if message["type"] == "queue.position":
                before_offer.append(message)
        offer = message
        assert offer == {
            "type": "queue.offer",
            "slotId": slot_id,
            "bookingId": TEXT,
            "expiresAt": TIME,
        }
        assert before_offer, "joining while connected sends the new position"
        for early in before_offer:
            assert (early["status"], early["position"], early["bookingId"]) in (
                ("WAITING", 1, None),
                ("NOTIFIED", None, offer["bookingId"]),
            ), early
        notified = await _next_of(ws, "queue.position")
        assert (notified["status"], notified["position"], notified["bookingId"]) == (
            "NOTIFIED",
            None,
            offer["bookingId"],
        )

    # Events go out after their commit: the poll already reads what the socket said.
    offered_slot = _slot_view(slot, confirmed=0, held=1, queued=0, status="RESERVED")
    entry = await _position(api, slot_id, "bob")
    assert entry == _queue_entry(
        slot_id, "bob", status="NOTIFIED", position=None, total=0,
        booking_id=offer["bookingId"], joined_at=queued["queue"]["joinedAt"], notified=True,
        slot=offered_slot,
    )  # fmt: skip
    assert entry["offerExpiresAt"] == offer["expiresAt"]

    lapsed = await _poll(
        lambda: _booking(api, ann["id"], "ann"), lambda b: b["status"] != "RESERVED"
    )
    assert lapsed == _booking_body(
        ann["id"], "ann", slot_id, "EXPIRED",
        reserved_at=ann["reservedAt"], expires_at=ann["expiresAt"],
    )  # fmt: skip
    late = await api.post(f"/api/bookings/{ann['id']}/confirm", headers=_bearer("ann"))
    assert (await _answer(late, 409))["error"] == "ReservationExpired"

    # The offer is bob's hold for the domain's claim TTL; he takes it.
    offered = await _booking(api, offer["bookingId"], "bob")
    assert offered == _booking_body(
        offer["bookingId"], "bob", slot_id, "RESERVED", expires_at=offer["expiresAt"]
    )
    assert _ms(offered["expiresAt"]) - _ms(offered["reservedAt"]) == CLAIM_TTL_MS
    claimed = await api.post(f"/api/bookings/{offer['bookingId']}/confirm", headers=_bearer("bob"))
    assert (await _answer(claimed, 200))["status"] == "CONFIRMED"
    assert (await _position(api, slot_id, "bob"))["status"] == "CONVERTED"
    view = await api.get(f"/api/slots/{slot_id}", headers=_bearer("ann"))
    assert await _answer(view, 200) == _slot_view(
        slot, confirmed=1, held=0, queued=0, status="BOOKED"
    )


# -- flow 3 ---------------------------------------------------------------------------


async def test_the_first_flow_is_in_postgresql(gateway: Gateway, database_url: str) -> None:
    api = await gateway()
    flow = await _reserve_confirm_cancel_and_offer(api)

    # Every answer above came after its commit: the rows are there now, not eventually.
    connection = await asyncpg.connect(database_url)
    try:
        bookings = await connection.fetch(
            "SELECT id, user_id, status, cancel_reason, cancelled_by, refund_percentage,"
            " via_queue, confirmed_at_ms IS NOT NULL AS confirmed,"
            " cancelled_at_ms IS NOT NULL AS cancelled"
            " FROM bookings WHERE slot_id = $1 ORDER BY reserved_at_ms, id",
            flow.slot_id,
        )
        assert [dict(row) for row in bookings] == [
            {
                "id": flow.ann_booking,
                "user_id": "ann",
                "status": "CANCELLED",
                "cancel_reason": "plans changed",
                "cancelled_by": "ann",
                "refund_percentage": 100,
                "via_queue": False,
                "confirmed": True,
                "cancelled": True,
            },
            {
                "id": flow.bob_booking,
                "user_id": "bob",
                "status": "CONFIRMED",
                "cancel_reason": None,
                "cancelled_by": None,
                "refund_percentage": None,
                "via_queue": True,
                "confirmed": True,
                "cancelled": False,
            },
        ]
        entries = await connection.fetch(
            "SELECT user_id, status, booking_id FROM queue_entries WHERE slot_id = $1",
            flow.slot_id,
        )
        assert [dict(row) for row in entries] == [
            {"user_id": "bob", "status": "CONVERTED", "booking_id": flow.bob_booking}
        ]
        counts = await connection.fetchrow(
            "SELECT capacity, confirmed_count, held_count FROM slots WHERE id = $1", flow.slot_id
        )
        assert counts is not None and dict(counts) == {
            "capacity": 1,
            "confirmed_count": 1,
            "held_count": 0,
        }
        transitions = await connection.fetch(
            "SELECT entity_id, from_status, to_status FROM audit_log"
            " WHERE entity = 'booking' AND slot_id = $1 ORDER BY id",
            flow.slot_id,
        )
        by_booking: dict[str, list[str | None]] = {}
        for row in transitions:
            by_booking.setdefault(row["entity_id"], []).append(row["to_status"])
        assert by_booking == {
            flow.ann_booking: ["RESERVED", "CONFIRMED", "CANCELLED"],
            flow.bob_booking: ["RESERVED", "CONFIRMED"],
        }
    finally:
        await connection.close()


# -- flow 4 ---------------------------------------------------------------------------


async def test_a_change_through_one_gateway_reaches_a_socket_on_the_other(
    gateway: Gateway,
) -> None:
    first = await gateway()
    second = await gateway()
    slot = await _slot(first, capacity=1)
    slot_id = slot["id"]
    await _reserve(first, slot_id, "hal", 201)
    assert (await _reserve(second, slot_id, "wes", 202))["queue"]["position"] == 1
    assert (await _reserve(first, slot_id, "wil", 202))["queue"]["position"] == 2

    async with first.ws_connect(_ws_path(slot_id, "wil")) as ws:
        before = await _next(ws)
        assert before["type"] == "queue.position"
        assert (before["position"], before["status"], before["totalInQueue"]) == (2, "WAITING", 2)
        assert (await _next(ws))["type"] == "slot.updated"

        left = await second.delete(f"/api/slots/{slot_id}/queue", headers=_bearer("wes"))
        assert await _answer(left, 204) is None

        moved = await _next_of(ws, "queue.position")
        assert moved == {
            "type": "queue.position",
            "slotId": slot_id,
            "position": 1,
            "status": "WAITING",
            "totalInQueue": 1,
            "estimatedWaitTime": TEXT,
            "estimatedWaitSeconds": POSITIVE,
            "bookingId": None,
        }
        assert moved["estimatedWaitSeconds"] < before["estimatedWaitSeconds"]

    # Both gateways read the same state from the same actors.
    for api in (first, second):
        entry = await _position(api, slot_id, "wil")
        assert (entry["status"], entry["position"], entry["totalInQueue"]) == ("WAITING", 1, 1)
        missing = await api.get(f"/api/slots/{slot_id}/queue/position", headers=_bearer("wes"))
        assert (await _answer(missing, 404))["error"] == "NotFound"


async def test_the_audit_rows_carry_the_origin_refusals_and_cancellations_through_actors(
    gateway: Gateway, db: asyncpg.Connection
) -> None:
    """Through the shard actors as through an in-process shard: the origin crosses
    the actor boundary with the command and lands in the audit row only."""
    api = await gateway()
    slot = await _slot(api, capacity=1, domain="noqueue")
    origin = {"X-Request-Id": "ray-audit-1", "User-Agent": "ray-audit/1.0"}
    held = await _answer(
        await api.post(
            "/api/bookings/reserve",
            json={"slotId": slot["id"]},
            headers={**_bearer("ann"), **origin},
        ),
        201,
    )
    booking_id = held["booking"]["id"]
    refused = await api.post(
        "/api/bookings/reserve",
        json={"slotId": slot["id"]},
        headers={**_bearer("bob"), "X-Request-Id": "ray-audit-2"},
    )
    assert refused.status == 409 and refused.headers["X-Request-Id"] == "ray-audit-2"
    await _answer(
        await api.post(f"/api/bookings/{booking_id}/confirm", headers=_bearer("ann")), 200
    )
    await _answer(
        await api.post(
            f"/api/bookings/{booking_id}/cancel",
            json={"reason": "moved"},
            headers={**_bearer("ann"), "X-Request-Id": "ray-audit-3"},
        ),
        200,
    )
    rows = await db.fetch(
        "SELECT entity, to_status, trigger, details, http_request_id, client_ip, user_agent"
        " FROM audit_log WHERE slot_id = $1 AND entity <> 'slot' ORDER BY id",
        slot["id"],
    )
    summary = [
        (r["entity"], r["to_status"], r["trigger"], r["http_request_id"], r["client_ip"])
        for r in rows
    ]
    assert summary == [
        ("booking", "RESERVED", "reserve", "ray-audit-1", "127.0.0.1"),
        ("attempt", None, "refused", "ray-audit-2", "127.0.0.1"),
        ("booking", "CONFIRMED", "confirm", TEXT, "127.0.0.1"),
        ("booking", "CANCELLED", "cancel", "ray-audit-3", "127.0.0.1"),
    ]
    assert rows[0]["user_agent"] == "ray-audit/1.0"
    assert msgspec.json.decode(rows[1]["details"]) == {"reason": "SlotFull", "command": "reserve"}
    assert msgspec.json.decode(rows[3]["details"]) == {
        "reason": "moved",
        "refund": 100,
        "initiator": "user",
    }


async def test_each_actors_redis_and_database_work_reaches_metrics_with_its_shard(
    shards: Shards, database_url: str
) -> None:
    """The durations, flush sizes and connections each actor process measured itself
    travel in its owner's statistics to a gateway's ``/metrics``, labelled ``shard``."""
    engine = EngineClient(shards.transport)
    app = create_app(engine, Verifier(AuthSettings(secret=SECRET)))
    add_observability(
        app,
        engine=engine,
        transport=shards.transport,
        database_url=database_url,
        redis_url=REDIS_URL,
    )
    async with TestClient(TestServer(app)) as api:
        on_shard = {engine.shard_of((await _slot(api, capacity=1))["id"]) for _ in range(16)}
        assert on_shard == set(range(SHARDS))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POLL_LIMIT_S
        while True:
            scraped = await api.get("/metrics")
            families = {
                family.name: family
                for family in text_string_to_metric_families(await scraped.text())
            }
            counts = {
                (sample.labels.get("operation") or sample.labels["query_type"],
                 sample.labels.get("shard")): sample.value
                for name in ("redis_operation_duration_seconds", "database_query_duration_seconds")
                for sample in families[name].samples
                if sample.name.endswith("_count")
            }  # fmt: skip
            if all(counts.get(("lease_renew", str(n)), 0) for n in range(SHARDS)):
                break
            assert loop.time() < deadline, counts
            await asyncio.sleep(0.5)
    for shard in map(str, range(SHARDS)):
        for label in ("lease_acquire", "lease_renew", "publish", "fence_read", "shard_load"):
            assert counts.get((label, shard), 0) >= 1, (label, shard)
        assert counts.get(("flush", shard), 0) >= 1, shard
    flushed = {
        sample.labels["shard"]: sample.value
        for sample in families["engine_shard_flush_events"].samples
        if sample.name == "engine_shard_flush_events_count"
    }
    assert flushed == {str(n): counts[("flush", str(n))] for n in range(SHARDS)}
    in_use_max = {
        (sample.labels["shard"], sample.labels["state"]): sample.value
        for sample in families["engine_shard_db_connections"].samples
    }
    assert in_use_max[("0", "max")] == 2 and in_use_max[("1", "max")] == 1

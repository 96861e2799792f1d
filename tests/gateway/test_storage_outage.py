"""A PostgreSQL outage through the gateway: reads go on, holds are not lost to it.

A gateway with live updates sits in front of one durable shard on a PostgreSQL
of the test's own, which is stopped and started again on the same port:

- while it is down, GET of a slot, a booking, the caller's bookings and a queue
  position answer 200 with the committed state, a new live connection gets its
  first state, an open one stays open, and every change answers 503 with
  ``retryAfter``;
- holds whose deadline falls during the outage are still RESERVED after the
  recovery, with ``expiresAt`` at least the recovery plus the grace, an
  ``outage_grace`` row in the audit log, and can be confirmed; one left alone
  then expires, not before its new deadline;
- the shard serves changes again by itself (no restart), and live updates flow
  again on the connections opened before the outage: the grace reaches the
  hold's owner as a change of the booking, a freed place the waiting user.
"""

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from config.redis_keys import RedisKeys
from engine.shell.clock import SystemClock
from engine.shell.coalescer import EngineClient
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.owner import OwnerState, StorageSettings
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.live.bus import EventBus
from gateway.live.endpoints import LiveConnections, add_realtime
from persistence.migrate import migrate_url
from persistence.services import PrivatePostgres, create_database
from tests.conftest import REDIS_URL
from tests.gateway.conftest import SECRET
from tests.support.domain import POLICIES, policy

pytest_plugins = ["tests.support.fixtures"]

Client = TestClient[Any, Any]

# Holds that outlast setting the scene, and lapse while the database is down.
HOLD_MS: Final = 3_000
# Long enough to confirm after the recovery on a loaded machine; short enough for
# the hold left alone to expire within the test.
GRACE_MS: Final = 6_000
WAIT_S: Final = 60.0
RECEIVE_S: Final = 30.0
LEASE: Final[dict[str, Any]] = {
    "lease_ttl_ms": 1_500,
    "lease_renew_every_ms": 300,
    "lease_margin_ms": 300,
    "rebuild_retry_ms": 200,
}
OUTAGE_POLICIES: Final = {
    **POLICIES,
    "brief": policy("brief", hold_ttl_ms=HOLD_MS, claim_ttl_ms=HOLD_MS),
}


def bearer(sub: str, role: str = "user") -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, sub, role, 3600)}"}


def query_token(sub: str) -> str:
    return issue_token(SECRET, sub, "user", 3600)


def ms(stamp: str) -> int:
    return int(datetime.fromisoformat(stamp).timestamp() * 1000)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT_S):
            while not await check():
                await asyncio.sleep(0.1)
    except TimeoutError:
        pytest.fail(f"not within {WAIT_S:g} s: {what}")


async def call(
    api: Client, method: str, path: str, user: str, body: Any = None, role: str = "user"
) -> tuple[int, dict[str, Any], str | None]:
    async with asyncio.timeout(WAIT_S):
        response = await api.request(method, path, json=body, headers=bearer(user, role))
        text = await response.text()
    return response.status, (json.loads(text) if text else {}), response.headers.get("Retry-After")


async def next_of(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    """The next message of ``kind``, skipping others."""
    async with asyncio.timeout(RECEIVE_S):
        while True:
            message = await ws.receive()
            assert message.type is aiohttp.WSMsgType.TEXT, message
            data: dict[str, Any] = json.loads(message.data)
            if data["type"] == kind:
                return data


@pytest.fixture
async def outage_database(private_postgres: PrivatePostgres) -> str:
    url = private_postgres.url_for(f"outage_{secrets.token_hex(4)}")
    await create_database(url)
    await migrate_url(url)
    return url


@pytest.fixture
async def served(
    outage_database: str, redis_namespace: str
) -> AsyncIterator[tuple[Client, OwnedInProcessHost]]:
    storage = StorageSettings(
        database_url=outage_database,
        redis_url=REDIS_URL,
        namespace=redis_namespace,
        outage_hold_grace_ms=GRACE_MS,
        **LEASE,
    )
    host = OwnedInProcessHost(shard_count=1, policies=OUTAGE_POLICIES, storage=storage)
    await host.start()
    redis_client = aioredis.Redis.from_url(REDIS_URL)
    bus = EventBus(redis_client, redis_namespace)
    try:
        await bus.start()
        app = create_app(EngineClient(host), Verifier(AuthSettings(secret=SECRET)))
        add_realtime(app, LiveConnections(bus))
        api: Client = TestClient(TestServer(app))
        await api.start_server()
        try:
            yield api, host
        finally:
            await api.close()
    finally:
        await bus.close()
        await redis_client.aclose()
        await host.close()


async def create_slot(api: Client, capacity: int, domain: str = "default") -> str:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    status, body, _ = await call(
        api,
        "POST",
        "/api/admin/slots",
        "root",
        {
            "resourceId": f"room-{secrets.token_hex(4)}",
            "domain": domain,
            "startTime": start.isoformat(),
            "endTime": (start + timedelta(hours=1)).isoformat(),
            "capacity": capacity,
        },
        role="admin",
    )
    assert status == 201, body
    return str(body["id"])


async def reserve(api: Client, slot_id: str, user: str) -> tuple[int, dict[str, Any], str | None]:
    return await call(api, "POST", "/api/bookings/reserve", user, {"slotId": slot_id})


def refused(answer: tuple[int, dict[str, Any], str | None]) -> bool:
    status, body, retry_after = answer
    return (
        status == 503
        and body.get("error") == "ServiceUnavailable"
        and body.get("retryAfter", 0) >= 1
        and retry_after == str(body["retryAfter"])
    )


async def test_reads_go_on_and_holds_outlive_a_postgres_outage_by_the_grace(
    private_postgres: PrivatePostgres,
    outage_database: str,
    served: tuple[Client, OwnedInProcessHost],
    redis_namespace: str,
) -> None:
    api, host = served
    owner = host.owner(0)
    roomy = await create_slot(api, 10)
    brief = await create_slot(api, 10, domain="brief")
    full = await create_slot(api, 1)
    probe_slot = await create_slot(api, 100)

    # Committed before the outage: carol's confirmed booking, hank's place on the
    # full slot with wendy waiting behind it, and two holds that lapse during it.
    status, held, _ = await reserve(api, roomy, "carol")
    assert status == 201, held
    carol = held["booking"]["id"]
    status, confirmed, _ = await call(api, "POST", f"/api/bookings/{carol}/confirm", "carol")
    assert status == 200 and confirmed["status"] == "CONFIRMED", confirmed
    status, body, _ = await reserve(api, full, "hank")
    assert status == 201, body
    hank = body["booking"]["id"]
    status, body, _ = await call(api, "POST", f"/api/bookings/{hank}/confirm", "hank")
    assert status == 200, body
    status, waiting, _ = await call(api, "POST", f"/api/slots/{full}/queue", "wendy")
    assert status == 201 and waiting["position"] == 1, waiting
    status, body, _ = await reserve(api, brief, "larry")
    assert status == 201, body
    larry = body["booking"]
    status, body, _ = await reserve(api, brief, "mia")
    assert status == 201, body
    mia = body["booking"]
    slot_before = (await call(api, "GET", f"/api/slots/{roomy}", "anyone"))[1]

    async with contextlib.AsyncExitStack() as stack:
        watcher = await stack.enter_async_context(
            api.ws_connect(f"/ws/queue/{full}?token={query_token('wendy')}")
        )
        first = await next_of(watcher, "queue.position")
        assert first["position"] == 1
        bookings_watcher = await stack.enter_async_context(
            api.ws_connect(f"/ws/bookings?token={query_token('larry')}")
        )
        assert (await next_of(bookings_watcher, "booking.updated"))["booking"] == larry

        await private_postgres.astop("fast")
        try:
            # The first change finds the database gone: 503 with a retry hint, and
            # the shard serves reads of its committed state from then on.
            async def degraded() -> bool:
                answer = await reserve(api, probe_slot, f"probe-{secrets.token_hex(3)}")
                assert answer[0] in (201, 503), answer
                return owner.state is OwnerState.DEGRADED

            await eventually(degraded, "the shard notices the outage")

            changes = [
                await reserve(api, roomy, "quinn"),
                await call(api, "POST", f"/api/bookings/{larry['id']}/confirm", "larry"),
                await call(api, "POST", f"/api/bookings/{carol}/cancel", "carol", {}),
                await call(api, "POST", f"/api/slots/{full}/queue", "xavier"),
            ]
            for answer in changes:
                assert refused(answer), answer

            # The holds' deadlines pass while the database is down; no expiry.
            async def lapsed() -> bool:
                return SystemClock().now_ms() > max(ms(larry["expiresAt"]), ms(mia["expiresAt"]))

            await eventually(lapsed, "the holds' deadlines pass during the outage")

            status, slot_now, _ = await call(api, "GET", f"/api/slots/{roomy}", "anyone")
            assert status == 200 and slot_now == slot_before, slot_now
            status, seen, _ = await call(api, "GET", f"/api/bookings/{carol}", "carol")
            assert status == 200 and seen == confirmed, seen
            status, mine, _ = await call(api, "GET", "/api/bookings/my", "carol")
            assert status == 200 and [b["id"] for b in mine["items"]] == [carol], mine
            status, position, _ = await call(
                api, "GET", f"/api/slots/{full}/queue/position", "wendy"
            )
            assert status == 200 and position["position"] == 1, position
            assert position["status"] == "WAITING"
            status, still, _ = await call(api, "GET", f"/api/bookings/{larry['id']}", "larry")
            assert status == 200 and still == larry, still
            # A new live connection gets its first state from the committed one.
            async with api.ws_connect(f"/ws/queue/{full}?token={query_token('wendy')}") as late:
                assert (await next_of(late, "queue.position"))["position"] == 1
            assert not watcher.closed
            assert owner.state is OwnerState.DEGRADED
        finally:
            recovered_ms = SystemClock().now_ms()
            if not private_postgres.running:
                await private_postgres.astart()

        # No restart: the same shard takes changes again by itself.
        async def serves() -> bool:
            answer = await reserve(api, probe_slot, f"probe-{secrets.token_hex(3)}")
            return answer[0] == 201

        await eventually(serves, "reservations are taken again after PostgreSQL returned")
        assert owner.state is OwnerState.SERVING

        status, graced, _ = await call(api, "GET", f"/api/bookings/{larry['id']}", "larry")
        assert status == 200 and graced["status"] == "RESERVED", graced
        assert ms(graced["expiresAt"]) >= recovered_ms + GRACE_MS, graced
        assert graced["version"] == larry["version"] + 1 and graced["extensions"] == 0
        # The grace reaches the hold's owner live, as a change of the booking.
        while True:
            update = (await next_of(bookings_watcher, "booking.updated"))["booking"]
            if update["version"] > larry["version"]:
                break
        assert update == graced
        status, body, _ = await call(api, "POST", f"/api/bookings/{larry['id']}/confirm", "larry")
        assert status == 200 and body["status"] == "CONFIRMED", body

        # Live updates flow again on the connection opened before the outage.
        status, body, _ = await call(api, "POST", f"/api/bookings/{hank}/cancel", "hank", {})
        assert status == 200, body
        offer = await next_of(watcher, "queue.offer")
        assert offer["slotId"] == full

    db = await asyncpg.connect(outage_database)
    try:
        # Mia's hold, left alone, expires once its grace is over, not before.
        async def expired() -> bool:
            status = await db.fetchval("SELECT status FROM bookings WHERE id = $1", mia["id"])
            return bool(status == "EXPIRED")

        await eventually(expired, "the hold left alone expires after its grace")
        rows = await db.fetch(
            "SELECT entity_id, trigger, to_status, at_ms FROM audit_log"
            " WHERE entity_id = ANY($1::text[]) ORDER BY id",
            [larry["id"], mia["id"]],
        )
        graces = {r["entity_id"]: r["at_ms"] for r in rows if r["trigger"] == "outage_grace"}
        assert set(graces) == {larry["id"], mia["id"]}
        assert all(at_ms >= recovered_ms for at_ms in graces.values())
        expiry = [r for r in rows if r["entity_id"] == mia["id"] and r["to_status"] == "EXPIRED"]
        assert len(expiry) == 1 and expiry[0]["trigger"] == "hold_ttl"
        assert expiry[0]["at_ms"] >= graces[mia["id"]] + GRACE_MS
        stored = await db.fetchval("SELECT expires_at_ms FROM bookings WHERE id = $1", mia["id"])
        assert stored >= recovered_ms + GRACE_MS
        assert (
            await db.fetchval("SELECT status FROM bookings WHERE id = $1", larry["id"])
            == "CONFIRMED"
        )
        assert await db.fetchval(
            "SELECT count(*) FROM audit_log WHERE trigger = 'outage_grace'"
        ) == len(graces)
    finally:
        await db.close()
    # Nothing of the grace is left behind for a later load.
    redis_client = aioredis.Redis.from_url(REDIS_URL)
    try:
        marker = RedisKeys(redis_namespace).shard_storage_lost(0)
        assert await redis_client.exists(marker) == 0
    finally:
        await redis_client.aclose()

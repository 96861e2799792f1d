"""The cap on each user's live connections, counted in Redis across gateways.

Real PostgreSQL and Redis: each gateway here is an aiohttp app with its own
event bus and its own ``ConnectionLimiter`` (its own Redis client) on the same
namespace, as two gateway processes of one deployment would be; the last test
runs ``slotengine serve --workers 2``.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from engine.shell.coalescer import EngineClient
from engine.shell.inproc import OwnedInProcessHost
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.connlimit import (
    ConnectionLimiter,
    ConnectionLimiterUnavailable,
    Place,
    TooManyConnections,
)
from gateway.live.bus import EventBus
from gateway.live.endpoints import LiveConnections, add_realtime
from gateway.openapi import build_document
from gateway.server import REDIS_CONNECTIONS_MAX, gateway_redis
from persistence.services import PrivateRedis
from tests.conftest import REDIS_URL
from tests.gateway.conftest import SECRET, Token
from tests.gateway.test_api import Client, _slot
from tests.gateway.test_serve import ROOT, Served, _stop_cleanly

pytest_plugins = ["tests.support.fixtures"]

CAP = 3
# Generous: an answer normally arrives within milliseconds.
ANSWER_LIMIT_S = 10.0
# Nothing listens there: connections are refused at once.
UNREACHABLE_REDIS_URL = "redis://127.0.0.1:1/0"
UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


@dataclass(frozen=True)
class Gateway:
    api: Client
    limiter: ConnectionLimiter


StartGateway = Callable[..., Awaitable[Gateway]]


def _limiter_client(url: str = REDIS_URL) -> "aioredis.Redis":
    # As the server builds it: short timeouts, no retries.
    return aioredis.Redis.from_url(
        url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


@pytest.fixture
async def gateway(host: OwnedInProcessHost, redis_namespace: str) -> AsyncIterator[StartGateway]:
    closing: list[Callable[[], Awaitable[None]]] = []

    async def start(
        *, per_user_max: int = CAP, limiter_redis_url: str = REDIS_URL, **options: Any
    ) -> Gateway:
        bus_client = aioredis.Redis.from_url(REDIS_URL)
        bus = EventBus(bus_client, redis_namespace)
        await bus.start()
        async with asyncio.timeout(ANSWER_LIMIT_S):
            while not bus.statistics().connected:  # serving live routes from the start
                await asyncio.sleep(0.01)
        limiter_client = _limiter_client(limiter_redis_url)
        limiter = ConnectionLimiter(
            limiter_client, per_user_max, namespace=redis_namespace, **options
        )
        app = create_app(EngineClient(host), Verifier(AuthSettings(secret=SECRET)))
        add_realtime(app, LiveConnections(bus, limiter=limiter))
        api: Client = TestClient(TestServer(app))
        await api.start_server()

        async def close() -> None:
            await api.close()
            await bus.close()
            await bus_client.aclose()
            await limiter_client.aclose()

        closing.append(close)
        return Gateway(api, limiter)

    yield start
    for close in closing:
        await close()


def _token(user: str) -> str:
    return issue_token(SECRET, user, "user", 3600)


def _paths(slot_id: str) -> tuple[str, str, str]:
    """The three live routes: two WebSockets and the event stream."""
    return "/ws/bookings", f"/ws/queue/{slot_id}", f"/api/slots/{slot_id}/queue/events"


async def _open(api: Client, path: str, user: str) -> Any:
    """A live connection of ``user`` on ``path``, open (WebSocket or event stream)."""
    url = f"{path}?token={_token(user)}"
    if path.startswith("/ws/"):
        return await api.ws_connect(url)
    response = await api.get(url)
    assert response.status == 200, await response.text()
    return response


async def _close(connection: Any) -> None:
    if isinstance(connection, aiohttp.ClientWebSocketResponse):
        await connection.close()
    else:
        connection.close()


async def _attempt(api: Client, path: str, user: str) -> aiohttp.ClientResponse:
    """The answer to one live request, without upgrading (a WebSocket's is 101 if admitted)."""
    headers = UPGRADE if path.startswith("/ws/") else {}
    response = await api.get(f"{path}?token={_token(user)}", headers=headers)
    if response.status not in (101, 200):
        await response.read()
    response.close()
    return response


async def _assert_refused(api: Client, path: str, user: str) -> dict[str, Any]:
    """``user`` is refused on ``path`` with the contract's 429 shape; the body."""
    response = await _attempt(api, path, user)
    assert response.status == 429, (path, response.status)
    body: dict[str, Any] = await response.json()
    assert body == {
        "error": "TooManyConnections",
        "message": body["message"],
        "details": {"limit": CAP},
        "retryAfter": body["retryAfter"],
    }
    assert f"at most {CAP} live connections" in body["message"]
    assert response.headers["Retry-After"] == str(body["retryAfter"])
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Request-Id"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    return body


async def _wait_admitted(api: Client, path: str, user: str) -> Any:
    """Open a connection as soon as ``user`` is admitted, within ``ANSWER_LIMIT_S``.

    The server gives a place back right after it answered the client's close,
    so the first attempt may come a moment too early.
    """
    async with asyncio.timeout(ANSWER_LIMIT_S):
        while True:
            try:
                return await _open(api, path, user)
            except aiohttp.WSServerHandshakeError as refused:
                assert refused.status == 429
            except AssertionError:
                pass
            await asyncio.sleep(0.02)


async def test_the_cap_holds_for_a_user_across_gateways_and_refuses_before_upgrading(
    gateway: StartGateway, token: Token
) -> None:
    one, other = await gateway(), await gateway()
    slot_id = (await _slot(one.api, token, capacity=1))["id"]
    bookings, queue, events = _paths(slot_id)
    held = [
        await _open(one.api, bookings, "ann"),
        await _open(other.api, queue, "ann"),
        await _open(other.api, events, "ann"),
    ]
    try:
        for api in (one.api, other.api):
            for path in (bookings, queue, events):
                body = await _assert_refused(api, path, "ann")
                # Her places are live and renewed: none lapses sooner than a lease.
                assert 1 <= body["retryAfter"] <= 60
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await one.api.ws_connect(f"{bookings}?token={_token('ann')}")
        assert refused.value.status == 429
        # Other users are not affected, on either gateway.
        others = [
            await _open(one.api, bookings, "bob"),
            await _open(other.api, events, "bob"),
            await _open(other.api, queue, "cyd"),
        ]
        for connection in others:
            await _close(connection)
        # The refusals took no place: ann still holds exactly her three.
        records = aioredis.Redis.from_url(REDIS_URL)
        try:
            assert await records.zcard(one.limiter.record("ann")) == CAP
        finally:
            await records.aclose()
        assert one.limiter.statistics().held + other.limiter.statistics().held == CAP
    finally:
        for connection in held:
            await _close(connection)


async def test_a_closed_connection_frees_its_place_at_once(
    gateway: StartGateway, token: Token
) -> None:
    one, other = await gateway(), await gateway()
    slot_id = (await _slot(one.api, token, capacity=1))["id"]
    bookings, queue, events = _paths(slot_id)
    held = [
        await _open(one.api, bookings, "ann"),
        await _open(one.api, queue, "ann"),
        await _open(other.api, events, "ann"),
    ]
    await _assert_refused(other.api, bookings, "ann")
    # A WebSocket closed on one gateway: its place serves on the other at once
    # (well before its lease of a minute would have lapsed).
    await _close(held.pop(0))
    held.append(await _wait_admitted(other.api, queue, "ann"))
    await _assert_refused(one.api, events, "ann")
    # An event stream closed by its client, likewise.
    await _close(held.pop(1))
    held.append(await _wait_admitted(one.api, bookings, "ann"))
    await _assert_refused(one.api, queue, "ann")
    for connection in held:
        await _close(connection)
    async with asyncio.timeout(ANSWER_LIMIT_S):
        while one.limiter.statistics().held or other.limiter.statistics().held:
            await asyncio.sleep(0.02)


async def test_a_burst_of_users_connecting_to_one_gateway_all_get_places(
    redis_namespace: str,
) -> None:
    """More places asked at once than redis-py's pool holds by default (100): they wait
    for a connection of the gateway's client instead of being refused (it was a 503).
    The waits are bounded generously: what is checked is that none is refused, not how
    fast a loaded machine answers (redis-py's default pool refuses at once)."""
    client = gateway_redis(REDIS_URL, timeout_s=60)
    limiter = ConnectionLimiter(client, CAP, namespace=redis_namespace)
    users = [f"user-{n}" for n in range(3 * REDIS_CONNECTIONS_MAX // 2)]
    try:
        places = await asyncio.gather(*(limiter.take(user) for user in users))
        assert all(isinstance(place, Place) for place in places)
        await asyncio.gather(*(limiter.give_back(place) for place in places))
    finally:
        await limiter.close()
        await client.aclose()


async def test_concurrent_connections_of_one_user_never_pass_the_cap(
    redis_namespace: str,
) -> None:
    clients = [_limiter_client(), _limiter_client()]
    limiters = [ConnectionLimiter(c, CAP, namespace=redis_namespace) for c in clients]
    try:
        takers = [limiter for limiter in limiters for _ in range(10)]
        outcomes = await asyncio.gather(
            *(limiter.take("ann") for limiter in takers), return_exceptions=True
        )
        taken = [
            (limiter, place)
            for limiter, place in zip(takers, outcomes, strict=True)
            if isinstance(place, Place)
        ]
        refused = [outcome for outcome in outcomes if not isinstance(outcome, Place)]
        assert len(taken) == CAP
        assert all(isinstance(outcome, TooManyConnections) for outcome in refused)
        assert sum(limiter.statistics().held for limiter in limiters) == CAP
        for limiter, place in taken:
            await limiter.give_back(place)
        assert sum(limiter.statistics().held for limiter in limiters) == 0
        # The last place given back, the user's record is gone.
        assert not await clients[0].exists(limiters[0].record("ann"))
    finally:
        for limiter, client in zip(limiters, clients, strict=True):
            await limiter.close()
            await client.aclose()


# A gateway process that takes places, renews them, and reports each renewal:
# killed with SIGKILL, it gives nothing back.
_GATEWAY_THAT_DIES = """
import asyncio, sys
import redis.asyncio as aioredis
from gateway.connlimit import ConnectionLimiter

async def main(url, namespace, user, places, lease_ms, renew_every_s):
    limiter = ConnectionLimiter(
        aioredis.Redis.from_url(url), places, namespace=namespace,
        lease_ms=lease_ms, renew_every_s=renew_every_s,
    )
    for _ in range(places):
        await limiter.take(user)
    print("held", flush=True)
    renewals = 0
    while True:
        await asyncio.sleep(0.01)
        if limiter.statistics().renewals > renewals:
            renewals = limiter.statistics().renewals
            print("renewed", flush=True)

url, namespace, user, places, lease_ms, renew_every_s = sys.argv[1:]
asyncio.run(main(url, namespace, user, int(places), int(lease_ms), float(renew_every_s)))
"""
DYING_LEASE_MS = 2_000
DYING_RENEW_EVERY_S = 0.25


async def test_a_crashed_gateways_places_lapse_by_themselves_and_live_ones_do_not(
    gateway: StartGateway, token: Token, redis_namespace: str
) -> None:
    api = (await gateway()).api
    slot_id = (await _slot(api, token, capacity=1))["id"]
    bookings, queue, events = _paths(slot_id)
    dying = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _GATEWAY_THAT_DIES, REDIS_URL, redis_namespace, "ann",
        str(CAP), str(DYING_LEASE_MS), str(DYING_RENEW_EVERY_S),
        cwd=ROOT, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )  # fmt: skip
    try:
        assert dying.stdout is not None
        async with asyncio.timeout(60):
            assert await dying.stdout.readline() == b"held\n"
            # Renewed for longer than a lease: the places still stand.
            renewed_since = time.monotonic()
            while time.monotonic() - renewed_since <= 1.5 * DYING_LEASE_MS / 1000:
                assert await dying.stdout.readline() == b"renewed\n"
        await _assert_refused(api, events, "ann")
    finally:
        dying.send_signal(signal.SIGKILL)
        await dying.wait()
    # Dead: nothing renews its places, nothing gives them back; until they
    # lapse, the user stays at the cap, and is told when the first will lapse.
    body = await _assert_refused(api, queue, "ann")
    assert 1 <= body["retryAfter"] <= DYING_LEASE_MS / 1000
    held = [await _wait_admitted(api, path, "ann") for path in (bookings, queue, events)]
    await _assert_refused(api, bookings, "ann")
    for connection in held:
        await _close(connection)


async def test_redis_unreachable_refuses_new_live_connections_like_the_bus_does(
    gateway: StartGateway, token: Token
) -> None:
    counted = await gateway()
    slot_id = (await _slot(counted.api, token, capacity=1))["id"]
    # Only the limiter's Redis is away here: the answer is the one a gateway
    # gives when its pub/sub cannot subscribe (503 with a retryAfter).
    api = (await gateway(limiter_redis_url=UNREACHABLE_REDIS_URL)).api
    for path in _paths(slot_id):
        response = await _attempt(api, path, "ann")
        assert response.status == 503, path
        body = await response.json()
        assert body == {
            "error": "ServiceUnavailable",
            "message": "live updates are unavailable: Redis is unreachable",
            "retryAfter": 1,
        }
        assert response.headers["Retry-After"] == "1"
    # A cap of 0 is no cap: nothing is counted, so the unreachable Redis is never asked.
    uncapped = (await gateway(per_user_max=0, limiter_redis_url=UNREACHABLE_REDIS_URL)).api
    connections = [await _open(uncapped, _paths(slot_id)[0], "ann") for _ in range(CAP + 1)]
    for connection in connections:
        await _close(connection)


async def test_places_outlive_a_redis_outage_and_are_renewed_back_after_it(
    private_redis: PrivateRedis,
) -> None:
    client = _limiter_client(private_redis.url)
    limiter = ConnectionLimiter(client, CAP, namespace="ns", lease_ms=2_000, renew_every_s=0.05)
    records = aioredis.Redis.from_url(private_redis.url)
    try:
        place = await limiter.take("ann")
        await private_redis.astop("kill")
        with pytest.raises(ConnectionLimiterUnavailable):
            await limiter.take("ann")  # the gateway answers 503 (above)
        # The renewals fail and go on; the connection keeps its place meanwhile.
        failures = limiter.statistics().renewal_failures
        async with asyncio.timeout(ANSWER_LIMIT_S):
            while limiter.statistics().renewal_failures < failures + 2:
                await asyncio.sleep(0.01)
        assert limiter.statistics().held == 1
        # Back, and empty (no persistence): the next renewal puts the place back.
        await private_redis.astart()
        async with asyncio.timeout(ANSWER_LIMIT_S):
            while True:
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    if await records.zcard(limiter.record("ann")) == 1:
                        break
                await asyncio.sleep(0.01)
        await limiter.give_back(place)
        assert await records.zcard(limiter.record("ann")) == 0
    finally:
        await limiter.close()
        await client.aclose()
        await records.aclose()


async def test_serve_with_two_workers_caps_a_users_live_connections(
    database_url: str, tmp_path: Path
) -> None:
    served = Served(database_url, tmp_path)
    served.env["SLOTENGINE_LIVE_CONNECTIONS_PER_USER_MAX"] = "2"
    log_path = tmp_path / "serve.log"
    served.start_inproc_workers(log_path)
    try:
        user = served.token("ann")
        other = served.token("bob")
        url = f"ws://127.0.0.1:{served.port}/ws/bookings?token="
        # A new connection per request: the kernel spreads them over both workers.
        fresh = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=fresh) as session:
            async with asyncio.timeout(120):
                ready = 0
                while ready < 4:  # four answers in a row: both workers serving
                    try:
                        async with session.get(
                            f"{served.base}/api/slots", headers={"Authorization": f"Bearer {user}"}
                        ) as probe:
                            ready = ready + 1 if probe.status == 200 else 0
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.3)
            held = [await session.ws_connect(url + user) for _ in range(2)]
            # Whichever worker the kernel hands them to, the deployment's count refuses.
            for _ in range(8):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(url + user)
                assert refused.value.status == 429
            bobs = await session.ws_connect(url + other)
            await bobs.close()
            for ws in held:
                await ws.close()
    finally:
        _stop_cleanly(served, signal.SIGINT, log_path)


def test_the_document_lists_the_refusal_on_every_live_route() -> None:
    paths = build_document()["paths"]
    for path in ("/ws/bookings", "/ws/queue/{slotId}", "/api/slots/{slotId}/queue/events"):
        assert "429" in paths[path]["get"]["responses"], path

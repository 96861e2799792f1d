"""GET, PUT and DELETE /api/me/contact over HTTP on the real PostgreSQL, and the token's
email claim recorded when its user reserves or queues: sealed, never logged."""

import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from engine.shell.coalescer import EngineClient
from engine.shell.inproc import OwnedInProcessHost
from gateway.app import create_app
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.handling import TOKEN_EMAILS_KEY
from gateway.idempotency import KeyRegistry
from gateway.ratelimit import RateLimiter, RateLimits
from persistence.contacts import get_contact
from persistence.sealing import KeyRing, new_key
from tests.conftest import REDIS_URL
from tests.gateway.conftest import SECRET, Token
from tests.gateway.test_api import _window

Client = TestClient[Any, Any]
ANN = "ann.smith+slots@example.com"
RING = KeyRing([new_key("k1")])


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def client(
    host: OwnedInProcessHost, redis_namespace: str, pool: asyncpg.Pool
) -> AsyncIterator[Client]:
    redis_client = aioredis.Redis.from_url(REDIS_URL)
    app = create_app(
        EngineClient(host),
        Verifier(AuthSettings(secret=SECRET)),
        RateLimiter(redis_client, RateLimits(), namespace=redis_namespace),
        keys=KeyRegistry(redis_client, redis_namespace),
        database=pool,
        data_keys=RING,
    )
    async with TestClient(TestServer(app)) as test_client:
        yield test_client
    await redis_client.aclose()


async def _slot(client: Client, token: Token, resource: str, capacity: int) -> dict[str, Any]:
    start, end = _window()
    body = {"resourceId": resource, "startTime": start, "endTime": end, "capacity": capacity}
    response = await client.post("/api/admin/slots", json=body, headers=token("root", "admin"))
    assert response.status == 201, await response.text()
    slot: dict[str, Any] = await response.json()
    return slot


async def _recorded(client: Client) -> None:
    """Wait for the token claims' recordings under way."""
    await client.app[TOKEN_EMAILS_KEY].drain(timeout_s=10)


async def test_a_user_sets_reads_and_erases_its_address_and_only_its_own(
    client: Client, pool: asyncpg.Pool, token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ann = token("ann")
    missing = await client.get("/api/me/contact", headers=ann)
    assert missing.status == 404 and (await missing.json())["error"] == "NotFound"
    put = await client.put("/api/me/contact", json={"email": ANN}, headers=ann)
    assert put.status == 200, await put.text()
    body = await put.json()
    assert body["email"] == ANN and body["source"] == "api" and body["updatedAt"].endswith("Z")
    got = await client.get("/api/me/contact", headers=ann)
    assert got.status == 200 and await got.json() == body
    # Sealed at rest: the table holds no byte of the address.
    raw = await pool.fetchval("SELECT email FROM contacts WHERE user_id = 'ann'")
    assert b"ann.smith" not in raw and b"example.com" not in raw
    assert "example.com" not in await pool.fetchval(
        "SELECT string_agg(c::text, '') FROM contacts c"
    )
    # Another user sees none of it, and its own erasure leaves ann's alone.
    bob = token("bob")
    assert (await client.get("/api/me/contact", headers=bob)).status == 404
    assert (await client.delete("/api/me/contact", headers=bob)).status == 204
    assert (await client.get("/api/me/contact", headers=ann)).status == 200
    # Erasure: the row is gone, and erasing again is the same answer.
    erased = await client.delete("/api/me/contact", headers=ann)
    assert erased.status == 204
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 0
    assert (await client.get("/api/me/contact", headers=ann)).status == 404
    assert (await client.delete("/api/me/contact", headers=ann)).status == 204
    assert (await client.get("/api/me/contact")).status == 401
    assert ANN not in caplog.text and "ann.smith" not in caplog.text


@pytest.mark.parametrize(
    "email",
    [
        "not-an-address",
        "ann@localhost",
        "ann@example.com\n",
        "ann @example.com",
        "ann@-example.com",
        "a" * 250 + "@x.co",
        "",
        None,
        7,
    ],
)
async def test_an_implausible_address_is_a_validation_error_that_does_not_repeat_it(
    client: Client, token: Token, email: Any
) -> None:
    response = await client.put("/api/me/contact", json={"email": email}, headers=token("ann"))
    assert response.status == 422, await response.text()
    body = await response.json()
    assert body["error"] == "ValidationError" and set(body["details"]) == {"email"}
    if isinstance(email, str) and email:
        assert email.strip() not in await response.text()


async def test_the_longest_address_is_taken(client: Client, token: Token) -> None:
    longest = "a" * 64 + "@" + ".".join(["b" * 61] * 3) + ".ccc"
    assert len(longest) == 254
    response = await client.put("/api/me/contact", json={"email": longest}, headers=token("ann"))
    assert response.status == 200 and (await response.json())["email"] == longest
    too_long = "a" + longest
    response = await client.put("/api/me/contact", json={"email": too_long}, headers=token("ann"))
    assert response.status == 422


async def test_the_token_claim_is_recorded_once_and_never_overrides_an_address_set_by_the_user(
    client: Client, pool: asyncpg.Pool, token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first = await _slot(client, token, "room-1", capacity=1)
    second = await _slot(client, token, "room-2", capacity=1)
    claimed = token("ann", email="ann@claims.example.org")
    reserved = await client.post(
        "/api/bookings/reserve", json={"slotId": first["id"]}, headers=claimed
    )
    assert reserved.status == 201, await reserved.text()
    await _recorded(client)
    contact = await get_contact(pool, RING, "ann")
    assert contact is not None
    assert (contact.email, contact.source) == ("ann@claims.example.org", "token")
    recorded_at = contact.updated_at_ms
    # Remembered per gateway: the next request with the same claim writes nothing.
    await client.post("/api/bookings/reserve", json={"slotId": second["id"]}, headers=claimed)
    await _recorded(client)
    assert await pool.fetchval("SELECT updated_at_ms FROM contacts") == recorded_at
    # An address the user sets wins over any claim, now and later.
    put = await client.put("/api/me/contact", json={"email": ANN}, headers=token("ann"))
    assert put.status == 200
    other = token("ann", email="ann@elsewhere.example.net")
    third = await _slot(client, token, "room-3", capacity=1)
    held = await client.post("/api/bookings/reserve", json={"slotId": third["id"]}, headers=other)
    assert held.status == 201, await held.text()
    await _recorded(client)
    contact = await get_contact(pool, RING, "ann")
    assert contact is not None and (contact.email, contact.source) == (ANN, "api")
    # Bob queues with a claim of his own: recorded as his.
    bob = token("bob", email="bob@claims.example.org")
    queued = await client.post(f"/api/slots/{second['id']}/queue", headers=bob)
    assert queued.status == 201, await queued.text()  # ann's hold filled it
    await _recorded(client)
    bobs = await get_contact(pool, RING, "bob")
    assert bobs is not None and bobs.email == "bob@claims.example.org"
    for text in ("ann@claims", "ann@elsewhere", "bob@claims", ANN):
        assert text not in caplog.text


async def test_a_service_acting_for_a_user_records_nothing_and_a_bad_claim_is_ignored(
    client: Client, pool: asyncpg.Pool, token: Token
) -> None:
    slot = await _slot(client, token, "room-1", capacity=5)
    service = token("booker", "service", email="robot@service.example.com")
    reserved = await client.post(
        "/api/bookings/reserve", json={"slotId": slot["id"], "userId": "carl"}, headers=service
    )
    assert reserved.status == 201, await reserved.text()
    odd = token("dora", email="not an address")
    assert (
        await client.post("/api/bookings/reserve", json={"slotId": slot["id"]}, headers=odd)
    ).status == 201
    await _recorded(client)
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 0


async def test_a_failed_recording_never_fails_the_reservation_nor_logs_the_address(
    client: Client, pool: asyncpg.Pool, token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    slot = await _slot(client, token, "room-1", capacity=5)
    await pool.execute("ALTER TABLE contacts RENAME TO contacts_away")
    claimed = token("ann", email="ann@claims.example.org")
    reserved = await client.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=claimed
    )
    assert reserved.status == 201
    await _recorded(client)
    assert "recording a token's email claim failed: UndefinedTableError" in caplog.text
    assert "ann@claims" not in caplog.text
    # Not remembered as recorded: the next request tries again, and succeeds.
    await pool.execute("ALTER TABLE contacts_away RENAME TO contacts")
    await client.post("/api/bookings/reserve", json={"slotId": slot["id"]}, headers=claimed)
    await _recorded(client)
    contact = await get_contact(pool, RING, "ann")
    assert contact is not None and contact.email == "ann@claims.example.org"


async def test_without_a_database_the_routes_answer_503(api: Client, token: Token) -> None:
    for method in ("GET", "DELETE"):
        response = await api.request(method, "/api/me/contact", headers=token("ann"))
        assert response.status == 503
    response = await api.put("/api/me/contact", json={"email": ANN}, headers=token("ann"))
    assert response.status == 503 and (await response.json())["error"] == "ServiceUnavailable"

"""The admin webhook API end to end: a real socket, real PostgreSQL, sealed secrets.

The app is the one ``create_app`` builds, with the database pool and the data
key ring set as the server sets them; no engine is needed (no shard owns
webhooks).
"""

import base64
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks.webhooks import Webhook

from engine.notify.events import EVENT_TYPES
from engine.notify.webhooks import new_secret, webhook_headers
from gateway.app import create_app
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.http import DATA_KEYS_KEY, DATABASE_KEY
from persistence.sealing import KeyRing, new_key
from persistence.webhooks import endpoint_secrets
from tests.gateway.conftest import SECRET, Token
from tests.support.deliveries import delivery_row, insert_delivery

Client = TestClient[Any, Any]
URL = "https://93.184.215.14/hooks/slotengine"
WEBHOOKS = "/api/admin/webhooks"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as created:
        yield created


async def _client(pool: asyncpg.Pool | None, *, allow_private: bool) -> Client:
    app = create_app(
        None, Verifier(AuthSettings(secret=SECRET)), webhook_allow_private=allow_private
    )
    if pool is not None:
        app[DATABASE_KEY] = pool
        app[DATA_KEYS_KEY] = KeyRing([new_key("k1")])
    client: Client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def api(pool: asyncpg.Pool) -> AsyncIterator[Client]:
    client = await _client(pool, allow_private=False)
    yield client
    await client.close()


@pytest.fixture
def admin(token: Token) -> dict[str, str]:
    return token("root", "admin")


async def _create(api: Client, admin: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await api.post(WEBHOOKS, json={"url": URL, "events": ["*"], **body}, headers=admin)
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def test_an_endpoint_shows_its_secret_once_and_stores_it_sealed(
    api: Client, admin: dict[str, str], pool: asyncpg.Pool
) -> None:
    created = await _create(api, admin, events=["booking.confirmed", "booking.cancelled"])
    assert created["id"].startswith("we_")
    assert created["url"] == URL
    assert created["events"] == ["booking.confirmed", "booking.cancelled"]
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    assert abs(_ms(created["createdAt"]) - time.time() * 1000) < 3_600_000

    listed = await api.get(WEBHOOKS, headers=admin)
    assert listed.status == 200
    page = await listed.json()
    assert page == {"items": [{k: v for k, v in created.items() if k != "secret"}],
                    "nextCursor": None}  # fmt: skip
    assert secret not in await listed.text()

    rows = await pool.fetch("SELECT * FROM webhook_endpoints")
    assert len(rows) == 1
    raw = repr([dict(row) for row in rows]).encode() + bytes(rows[0]["secret"])
    assert secret.encode() not in raw
    assert secret.removeprefix("whsec_").encode() not in raw
    assert base64.b64decode(secret.removeprefix("whsec_")) not in raw


def _ms(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000


async def test_a_client_secret_is_kept_and_events_are_normalised(
    api: Client, admin: dict[str, str]
) -> None:
    secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    created = await _create(api, admin, secret=secret, events=["slot.created", "slot.created"])
    assert created["secret"] == secret
    assert created["events"] == ["slot.created"]
    every = await _create(api, admin, events=["queue.offer", "*"])
    assert every["events"] == ["*"]
    assert (await _create(api, admin, secret=None))["secret"] != secret
    assert len((await (await api.get(WEBHOOKS, headers=admin)).json())["items"]) == 3


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://example.com/x", "events": ["*"]}, "url"),
        ({"url": "file:///etc/passwd", "events": ["*"]}, "url"),
        ({"url": "http://127.0.0.1:8080/", "events": ["*"]}, "url"),
        ({"url": "http://localhost/hook", "events": ["*"]}, "url"),
        ({"url": "http://10.0.0.7/hook", "events": ["*"]}, "url"),
        ({"url": "http://192.168.1.1/hook", "events": ["*"]}, "url"),
        ({"url": "http://169.254.169.254/latest/meta-data/", "events": ["*"]}, "url"),
        ({"url": "http://[::1]/hook", "events": ["*"]}, "url"),
        ({"url": "http://[fd00::1]/hook", "events": ["*"]}, "url"),
        ({"url": "https://user:pw@93.184.215.14/", "events": ["*"]}, "url"),
        ({"url": URL, "events": ["booking.exploded"]}, "events[0]"),
        ({"url": URL, "events": []}, "events"),
        (
            {
                "url": URL,
                "events": ["*"],
                "secret": "not-a-secret-at-all-but-long-enough-0123456789",
            },
            "secret",
        ),
        ({"url": URL, "events": ["*"], "secret": "whsec_" + "A" * 31 + "="}, "secret"),
        ({"url": URL, "events": ["*"], "other": 1}, "other"),
        ({"events": ["*"]}, "url"),
    ],
)
async def test_a_bad_endpoint_is_422_naming_its_field(
    api: Client, admin: dict[str, str], pool: asyncpg.Pool, body: dict[str, Any], field: str
) -> None:
    response = await api.post(WEBHOOKS, json=body, headers=admin)
    assert response.status == 422, await response.text()
    error = await response.json()
    assert error["error"] == "ValidationError"
    assert field in error["details"], error
    assert await pool.fetchval("SELECT count(*) FROM webhook_endpoints") == 0


async def test_private_addresses_are_taken_when_the_server_allows_them(
    pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    client = await _client(pool, allow_private=True)
    try:
        for url in ("http://127.0.0.1:8080/hook", "http://localhost/hook", "http://[::1]/"):
            response = await client.post(
                WEBHOOKS, json={"url": url, "events": ["*"]}, headers=admin
            )
            assert response.status == 201, await response.text()
        refused = await client.post(WEBHOOKS, json={"url": "ftp://127.0.0.1/", "events": ["*"]},
                                    headers=admin)  # fmt: skip
        assert refused.status == 422
    finally:
        await client.close()


async def test_a_deleted_endpoint_is_gone_and_its_due_deliveries_dead(
    api: Client, admin: dict[str, str], pool: asyncpg.Pool
) -> None:
    created = await _create(api, admin)
    pending = await insert_delivery(pool, created["id"], created_at_ms=1)
    delivered = await insert_delivery(pool, created["id"], created_at_ms=2, status="delivered")
    path = f"{WEBHOOKS}/{created['id']}"
    response = await api.delete(path, headers=admin)
    assert response.status == 204
    assert (await api.delete(path, headers=admin)).status == 404
    assert (await api.get(f"{path}/deliveries", headers=admin)).status == 404
    assert (await (await api.get(WEBHOOKS, headers=admin)).json())["items"] == []
    row = await delivery_row(pool, pending)
    assert (row["status"], row["last_error"]) == ("dead", "endpoint deleted")
    assert (await delivery_row(pool, delivered))["status"] == "delivered"
    assert (await api.delete(f"{WEBHOOKS}/we_unknown", headers=admin)).status == 404
    assert (await api.delete(f"{WEBHOOKS}/we%00x", headers=admin)).status == 404


async def test_deliveries_are_listed_by_status_in_pages(
    api: Client, admin: dict[str, str], pool: asyncpg.Pool
) -> None:
    endpoint = (await _create(api, admin))["id"]
    ids = [
        await insert_delivery(
            pool, endpoint, created_at_ms=1_800_000_000_000 + n,
            status="failed" if n % 2 else "delivered", attempts=n,
            last_error="HTTP 500" if n % 2 else None,
            delivered_at_ms=None if n % 2 else 1_800_000_000_500 + n,
        )
        for n in range(5)
    ]  # fmt: skip
    path = f"{WEBHOOKS}/{endpoint}/deliveries"
    seen: list[dict[str, Any]] = []
    cursor = ""
    while True:
        response = await api.get(path, params={"limit": "2", "cursor": cursor}, headers=admin)
        assert response.status == 200, await response.text()
        page = await response.json()
        assert set(page) == {"items", "nextCursor"}
        seen += page["items"]
        if page["nextCursor"] is None:
            break
        cursor = page["nextCursor"]
    assert [d["id"] for d in seen] == ids[::-1]
    newest = seen[0]
    assert newest == {
        "id": ids[4], "eventId": newest["eventId"], "eventType": "booking.confirmed",
        "channel": "webhook", "status": "delivered", "attempts": 4, "lastError": None,
        "nextAttemptAt": "2027-01-15T08:00:00.004Z", "createdAt": "2027-01-15T08:00:00.004Z",
        "deliveredAt": "2027-01-15T08:00:00.504Z",
    }  # fmt: skip
    failed = await api.get(path, params={"status": "failed"}, headers=admin)
    page = await failed.json()
    assert [d["id"] for d in page["items"]] == [ids[3], ids[1]]
    assert page["nextCursor"] is None
    assert {d["lastError"] for d in page["items"]} == {"HTTP 500"}
    for params, field in (({"status": "lost"}, "status"), ({"limit": "0"}, "limit"),
                          ({"limit": "x"}, "limit"), ({"cursor": "nope"}, "cursor")):  # fmt: skip
        bad = await api.get(path, params=params, headers=admin)
        assert bad.status == 422, params
        assert field in (await bad.json())["details"]
    assert (await api.get(f"{WEBHOOKS}/we_unknown/deliveries", headers=admin)).status == 404
    odd = await api.get(f"{path}?cursor=-1.%00%C3%AC", headers=admin)
    assert odd.status == 200
    assert await odd.json() == {"items": [], "nextCursor": None}


async def test_a_redelivery_resets_the_delivery(
    api: Client, admin: dict[str, str], pool: asyncpg.Pool
) -> None:
    endpoint = (await _create(api, admin))["id"]
    delivery = await insert_delivery(
        pool, endpoint, created_at_ms=1_000, status="dead", attempts=9, last_error="timeout",
        lease_until_ms=2_000,
    )  # fmt: skip
    before = int(time.time() * 1000)
    response = await api.post(f"/api/admin/deliveries/{delivery}/redeliver", headers=admin)
    assert response.status == 202
    row = await delivery_row(pool, delivery)
    assert (row["status"], row["attempts"], row["lease_until_ms"]) == ("pending", 0, None)
    assert row["next_attempt_ms"] >= before
    listed = await (await api.get(f"{WEBHOOKS}/{endpoint}/deliveries?status=pending",
                                  headers=admin)).json()  # fmt: skip
    assert [d["id"] for d in listed["items"]] == [delivery]
    unknown = await api.post("/api/admin/deliveries/dlv_unknown/redeliver", headers=admin)
    assert unknown.status == 404
    assert (await unknown.json())["error"] == "NotFound"


ROUTES = [
    ("POST", WEBHOOKS),
    ("GET", WEBHOOKS),
    ("DELETE", f"{WEBHOOKS}/we_x"),
    ("GET", f"{WEBHOOKS}/we_x/deliveries"),
    ("POST", "/api/admin/deliveries/dlv_x/redeliver"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_only_admins_may_call(
    api: Client, token: Token, pool: asyncpg.Pool, method: str, path: str
) -> None:
    body = {"url": URL, "events": ["*"]} if method == "POST" else None
    for who in (token("ann"), token("svc", "service")):
        response = await api.request(method, path, json=body, headers=who)
        assert response.status == 403
        assert (await response.json())["error"] == "Forbidden"
    assert (await api.request(method, path, json=body)).status == 401
    assert await pool.fetchval("SELECT count(*) FROM webhook_endpoints") == 0


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_without_a_database_the_routes_are_503(
    admin: dict[str, str], method: str, path: str
) -> None:
    client = await _client(None, allow_private=False)
    try:
        body = {"url": URL, "events": list(EVENT_TYPES)} if method == "POST" else None
        response = await client.request(method, path, json=body, headers=admin)
        assert response.status == 503
        assert (await response.json())["error"] == "ServiceUnavailable"
    finally:
        await client.close()


async def test_the_secret_verifies_what_a_worker_signs(
    api: Client, admin: dict[str, str], pool: asyncpg.Pool
) -> None:
    """The secret answered on creation is the one the workers sign with."""
    created = await _create(api, admin)
    ring = api.server.app[DATA_KEYS_KEY]
    async with pool.acquire() as connection:
        (target,) = await endpoint_secrets(connection, ring)
    body = b'{"type": "booking.confirmed"}'
    headers = webhook_headers(target.secret, "evt_1", int(time.time()), body)
    assert Webhook(created["secret"]).verify(body, headers) == {"type": "booking.confirmed"}
    assert new_secret() != created["secret"]

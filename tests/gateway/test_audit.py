"""The audit trail through the real gateway, on durable in-process shards (real
PostgreSQL and Redis): refused reservation attempts with their reason, each
change's origin (X-Request-Id, client address, user agent), the trusted proxy
header believed only from a trusted peer, cancellations with their reason,
refund and initiator, and no token or contact detail in any row, nor any
origin in what is published of the events (the outbox, the live bus).
"""

import asyncio
import logging
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from config.redis_keys import RedisKeys
from engine.core.routing import shard_of
from engine.shell.coalescer import EngineClient
from engine.shell.inproc import OwnedInProcessHost
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.http import USER_AGENT_CHARS_MAX
from gateway.live.bus import EventBus
from gateway.live.endpoints import LiveConnections, add_realtime
from tests.conftest import REDIS_URL
from tests.gateway.conftest import SECRET, SHARDS, Token
from tests.gateway.test_api import Client, _slot

AGENT = "audit-check/2.1 (+mailto:crawler-ops@example.org)"
STORED_AGENT = "audit-check/2.1 (+mailto:[redacted])"

Gateway = Callable[..., Awaitable[Client]]


@pytest.fixture
async def gateway(host: OwnedInProcessHost) -> AsyncIterator[Gateway]:
    """Starts gateways on the shared engine, with the trusted proxy settings given."""
    started: list[Client] = []

    async def start(header: str | None = None, proxies: Sequence[str] = ()) -> Client:
        app = create_app(
            EngineClient(host),
            Verifier(AuthSettings(secret=SECRET)),
            trusted_proxy_header=header,
            trusted_proxies=proxies,
        )
        client: Client = TestClient(TestServer(app))
        await client.start_server()
        started.append(client)
        return client

    yield start
    for client in started:
        await client.close()


async def _audit(db: asyncpg.Connection, **where: Any) -> list[asyncpg.Record]:
    clauses = " AND ".join(f"{name} = ${i}" for i, name in enumerate(where, 1))
    return await db.fetch(
        "SELECT entity, entity_id, slot_id, user_id, from_status, to_status, trigger,"
        " details, http_request_id, client_ip, user_agent"
        f" FROM audit_log WHERE {clauses} ORDER BY id",
        *where.values(),
    )


async def test_refused_attempts_are_audited_with_their_reason(
    api: Client, token: Token, db: asyncpg.Connection
) -> None:
    full = await _slot(api, token, capacity=1, domain="noqueue")
    held = await api.post("/api/bookings/reserve", json={"slotId": full["id"]}, headers=token("a"))
    assert held.status == 201
    again = await api.post("/api/bookings/reserve", json={"slotId": full["id"]}, headers=token("a"))
    assert again.status == 200  # the user's own hold: not a refusal
    refused = await api.post(
        "/api/bookings/reserve",
        json={"slotId": full["id"]},
        headers={**token("b"), "X-Request-Id": "refused-1", "User-Agent": AGENT},
    )
    assert refused.status == 409 and (await refused.json())["error"] == "SlotFull"
    blocked = await _slot(api, token, capacity=3, blocked=True)
    closed = await api.post(
        "/api/bookings/reserve", json={"slotId": blocked["id"]}, headers=token("c")
    )
    assert closed.status == 409
    code = (await closed.json())["error"]

    rows = await _audit(db, entity="attempt")
    assert [
        (r["entity_id"], r["slot_id"], r["user_id"], r["from_status"], r["to_status"], r["trigger"])
        for r in rows
    ] == [
        (full["id"], full["id"], "b", None, None, "refused"),
        (blocked["id"], blocked["id"], "c", None, None, "refused"),
    ]
    assert [msgspec.json.decode(r["details"]) for r in rows] == [
        {"reason": "SlotFull", "command": "reserve"},
        {"reason": code, "command": "reserve"},
    ]
    assert (rows[0]["http_request_id"], rows[0]["client_ip"], rows[0]["user_agent"]) == (
        "refused-1",
        "127.0.0.1",
        STORED_AGENT,
    )
    # Nothing changed: no booking row, no slot count moved, for either refusal.
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE user_id IN ('b', 'c')") == 0


async def test_a_change_carries_its_origin_and_its_request_id_joins_header_log_and_row(
    api: Client, token: Token, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    slot = await _slot(api, token, capacity=2)
    long_agent = "x" * (USER_AGENT_CHARS_MAX + 50)
    with caplog.at_level(logging.INFO, logger="slotengine.access"):
        sent = await api.post(
            "/api/bookings/reserve",
            json={"slotId": slot["id"]},
            headers={**token("ann"), "X-Request-Id": "trace-4f1c", "User-Agent": AGENT},
        )
        made = await api.post(
            "/api/bookings/reserve",
            json={"slotId": slot["id"]},
            headers={**token("bo"), "User-Agent": long_agent},
        )
    assert sent.status == made.status == 201
    assert sent.headers["X-Request-Id"] == "trace-4f1c"
    generated = made.headers["X-Request-Id"]
    assert generated and generated != "trace-4f1c"
    logged = {
        getattr(r, "request_id", None) for r in caplog.records if r.name == "slotengine.access"
    }
    assert {"trace-4f1c", generated} <= logged

    booking_id = (await sent.json())["booking"]["id"]
    (row,) = await _audit(db, entity_id=booking_id)
    assert (row["to_status"], row["http_request_id"], row["client_ip"], row["user_agent"]) == (
        "RESERVED",
        "trace-4f1c",
        "127.0.0.1",
        STORED_AGENT,
    )
    (other,) = await _audit(db, entity_id=(await made.json())["booking"]["id"])
    assert other["http_request_id"] == generated
    assert other["user_agent"] == "x" * USER_AGENT_CHARS_MAX
    # The slot's creation came through the API too; a timer's change has no origin.
    (created,) = await _audit(db, entity="slot", entity_id=slot["id"])
    assert created["client_ip"] == "127.0.0.1" and created["http_request_id"]


@pytest.mark.parametrize(
    ("proxies", "forwarded", "client"),
    [
        # The peer (127.0.0.1) is a trusted proxy: the rightmost untrusted hop.
        (["127.0.0.0/8"], "203.0.113.9, 198.51.100.7", "198.51.100.7"),
        (["127.0.0.0/8", "10.0.0.0/8"], "198.51.100.7, 10.1.2.3, 127.0.0.5", "198.51.100.7"),
        (["127.0.0.0/8"], "[2001:db8::7]:4711", "2001:db8::7"),
        (["127.0.0.0/8"], "not-an-address", "127.0.0.1"),
        # The peer is not trusted: the header is the client's word, ignored.
        (["10.0.0.0/8"], "198.51.100.7", "127.0.0.1"),
    ],
)
async def test_the_proxy_header_is_believed_only_from_a_trusted_peer(
    gateway: Gateway,
    token: Token,
    db: asyncpg.Connection,
    proxies: list[str],
    forwarded: str,
    client: str,
) -> None:
    api = await gateway("X-Forwarded-For", proxies)
    slot = await _slot(api, token, capacity=1)
    response = await api.post(
        "/api/bookings/reserve",
        json={"slotId": slot["id"]},
        headers={**token("ann"), "X-Forwarded-For": forwarded},
    )
    assert response.status == 201
    (row,) = await _audit(db, entity_id=(await response.json())["booking"]["id"])
    assert row["client_ip"] == client


async def test_without_the_setting_the_proxy_header_is_ignored(
    api: Client, token: Token, db: asyncpg.Connection
) -> None:
    slot = await _slot(api, token, capacity=1)
    response = await api.post(
        "/api/bookings/reserve",
        json={"slotId": slot["id"]},
        headers={**token("ann"), "X-Forwarded-For": "198.51.100.7"},
    )
    (row,) = await _audit(db, entity_id=(await response.json())["booking"]["id"])
    assert row["client_ip"] == "127.0.0.1"


async def _confirmed(api: Client, token: Token, slot_id: str, user: str) -> str:
    held = await api.post("/api/bookings/reserve", json={"slotId": slot_id}, headers=token(user))
    booking_id: str = (await held.json())["booking"]["id"]
    confirmed = await api.post(f"/api/bookings/{booking_id}/confirm", headers=token(user))
    assert confirmed.status == 200
    return booking_id


async def test_a_cancellation_row_has_its_reason_refund_and_initiator(
    api: Client, token: Token, db: asyncpg.Connection
) -> None:
    slot = await _slot(api, token, capacity=3)
    mine = await _confirmed(api, token, slot["id"], "ann")
    theirs = await _confirmed(api, token, slot["id"], "bo")
    by_user = await api.post(
        f"/api/bookings/{mine}/cancel",
        json={"reason": "plans changed, call +44 20 7946 0958 or ann@example.org"},
        headers={**token("ann"), "X-Request-Id": "cancel-1"},
    )
    assert by_user.status == 200
    by_admin = await api.post(
        f"/api/bookings/{theirs}/cancel",
        json={"reason": "room closed"},
        headers=token("root", "admin"),
    )
    assert by_admin.status == 200
    refund = (await by_user.json())["refundPercentage"]

    (user_row,) = [r for r in await _audit(db, entity_id=mine) if r["to_status"] == "CANCELLED"]
    assert user_row["http_request_id"] == "cancel-1"
    assert msgspec.json.decode(user_row["details"]) == {
        "reason": "plans changed, call [redacted] or [redacted]",
        "refund": refund,
        "initiator": "user",
    }
    (admin_row,) = [r for r in await _audit(db, entity_id=theirs) if r["to_status"] == "CANCELLED"]
    assert msgspec.json.decode(admin_row["details"]) == {
        "reason": "room closed",
        "refund": 100,
        "initiator": "admin",
    }


_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


async def test_no_audit_row_holds_a_token_or_a_contact_detail(
    api: Client, token: Token, db: asyncpg.Connection
) -> None:
    slot = await _slot(api, token, capacity=1, domain="noqueue")
    with_email = token("ann", email="ann@example.org")
    bearer = with_email["Authorization"].removeprefix("Bearer ")
    headers = {**with_email, "User-Agent": AGENT, "X-Request-Id": "contact-check"}
    held = await api.post("/api/bookings/reserve", json={"slotId": slot["id"]}, headers=headers)
    booking_id = (await held.json())["booking"]["id"]
    await api.post(f"/api/bookings/{booking_id}/confirm", headers=headers)
    await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers={**token("bo"), **headers}
    )
    await api.post(
        f"/api/bookings/{booking_id}/cancel",
        json={"reason": "write to ann@example.org or call 0044 20 7946 0958"},
        headers=headers,
    )
    # Every column of every row, as text: the booking's (held, confirmed,
    # cancelled), the refused attempt's, the slot's.
    text = await db.fetch("SELECT t::text AS row FROM audit_log t")
    assert len(text) >= 5
    assert any("contact-check" in row for (row,) in text)
    for (row,) in text:
        assert bearer not in row and "eyJ" not in row
        assert not _EMAIL.search(row), row
        assert "7946" not in row, row


async def test_published_events_carry_no_origin(
    host: OwnedInProcessHost, redis_namespace: str, token: Token, db: asyncpg.Connection
) -> None:
    """What leaves the engine of an event (a live update on the bus, the outbox
    webhooks and emails are made of) holds no IP address, user agent or request id."""
    redis_client = aioredis.Redis.from_url(REDIS_URL)
    bus = EventBus(redis_client, redis_namespace)
    await bus.start()
    app = create_app(EngineClient(host), Verifier(AuthSettings(secret=SECRET)))
    add_realtime(app, LiveConnections(bus))
    api: Client = TestClient(TestServer(app))
    await api.start_server()
    raw = redis_client.pubsub()
    try:
        slot = await _slot(api, token, capacity=1)
        await raw.subscribe(RedisKeys(redis_namespace).shard_events(shard_of(slot["id"], SHARDS)))
        watch = issue_token(SECRET, "ann", "user", 3600)
        async with api.ws_connect(f"/ws/bookings?token={watch}") as ws:
            reserved = await api.post(
                "/api/bookings/reserve",
                json={"slotId": slot["id"]},
                headers={**token("ann"), "User-Agent": AGENT, "X-Request-Id": "published-7"},
            )
            assert reserved.status == 201
            booking_id = (await reserved.json())["booking"]["id"]
            update = await asyncio.wait_for(ws.receive_str(), 10)
            assert booking_id in update
            published = b""
            deadline = asyncio.get_running_loop().time() + 10
            while booking_id.encode() not in published:
                assert asyncio.get_running_loop().time() < deadline, "no event published"
                # (None for the subscription's own confirmation, or nothing yet.)
                message = await raw.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    published = message["data"]
        payloads = [
            zlib.decompress(row["payload"])
            for row in await db.fetch("SELECT payload FROM outbox_batches")
        ]
        assert any(booking_id.encode() in payload for payload in payloads)
        (row,) = await _audit(db, entity_id=booking_id)
        assert row["client_ip"] == "127.0.0.1"  # the origin was there to leak
        for leaked in (b"audit-check", b"127.0.0.1", b"published-7"):
            assert leaked not in published
            assert leaked not in update.encode()
            assert all(leaked not in payload for payload in payloads)
    finally:
        await raw.aclose()
        await api.close()
        await bus.close()
        await redis_client.aclose()


async def test_a_user_agent_that_is_not_text_is_stored_as_text(
    api: Client, token: Token, db: asyncpg.Connection
) -> None:
    """Bytes that are not UTF-8 (or control characters) in the header cannot fail the
    flush that carries the change: they are stored replaced."""
    slot = await _slot(api, token, capacity=1)
    body = b'{"slotId": "%s"}' % slot["id"].encode()
    request = (
        b"POST /api/bookings/reserve HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        b"Authorization: " + token("ann")["Authorization"].encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n"
        b"X-Request-Id: bytes-1\r\n"
        b"User-Agent: odd\xff\xfe agent/1\r\n\r\n" % len(body)
    ) + body
    assert api.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", api.server.port)
    try:
        writer.write(request)
        status_line = await asyncio.wait_for(reader.readline(), 10)
        await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_line.split()[1] == b"201", status_line
    (row,) = await _audit(db, entity="booking", http_request_id="bytes-1")
    assert row["user_agent"] == "odd\ufffd\ufffd agent/1"
    # The shard still serves: its flush went through.
    again = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("bo")
    )
    assert again.status in (201, 202)

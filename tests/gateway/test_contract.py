"""docs/api.md, endpoint by endpoint, over the real gateway (HTTP on a socket).

Every endpoint of the contract answers its success path and each error code
docs/api.md lists for it, with the documented body shape; every route refuses
missing and bad tokens; users never see each other's bookings or queue
entries. The engine is the durable in-process one on the test PostgreSQL and
Redis, with docs/api.md's default rate limits (``tests/gateway/conftest.py``).

The ``host`` fixture is overridden here only to add two domains to the test
policies: ``strict`` (users may cancel until 48 h before the start, refund
50 %), so that the cancellation window and a policy refund other than 100 %
can be shown, and ``fixed`` (holds are never extended). WebSocket and SSE
routes are covered in ``test_realtime.py``.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.core.limits import LIST_LIMIT_MAX
from engine.core.routing import shard_of_resource
from engine.shell.coalescer import EngineClient
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.owner import StorageSettings
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.http import BODY_BYTES_MAX
from gateway.ratelimit import RateLimits
from tests.conftest import REDIS_URL
from tests.engine.shell.conftest import wait_until
from tests.gateway.conftest import SECRET, SHARDS, Token
from tests.gateway.test_api import Client, _window
from tests.support.domain import HOUR_MS, POLICIES, policy

STRICT_REFUND = 50
CONTRACT_POLICIES = {
    **POLICIES,
    "strict": policy(
        "strict", cancel_allowed_until_ms=48 * HOUR_MS, refund_percentage=STRICT_REFUND
    ),
    "fixed": policy("fixed", hold_extensions_max=0),
}
# The hold TTL of the test policies' "default" domain.
HOLD_TTL = timedelta(minutes=2)
QUEUE_MAX = 100
OTHER_SECRET = "another-secret-0123456789abcdef0123456789ab"

SLOT_KEYS = frozenset(
    {"id", "resourceId", "domain", "startTime", "endTime", "capacity", "currentBookings",
     "heldCount", "available", "status", "queueLength", "metadata", "version"}
)  # fmt: skip
BOOKING_KEYS = frozenset(
    {"id", "userId", "slotId", "status", "reservedAt", "expiresAt", "confirmedAt",
     "completedAt", "cancelledAt", "cancelReason", "cancelledBy", "refundPercentage", "version",
     "extensions"}
)  # fmt: skip
QUEUE_KEYS = frozenset(
    {"slotId", "userId", "status", "position", "totalInQueue", "estimatedWaitTime",
     "estimatedWaitSeconds", "joinedAt", "notifiedAt", "bookingId", "slotDetails"}
)  # fmt: skip
ERROR_KEYS = frozenset({"error", "message", "details", "retryAfter"})
UTC_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")


@pytest.fixture
async def host(database_url: str, redis_namespace: str) -> AsyncIterator[OwnedInProcessHost]:
    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
    )
    engine_host = OwnedInProcessHost(
        shard_count=SHARDS, policies=CONTRACT_POLICIES, storage=storage
    )
    await engine_host.start()
    yield engine_host
    await engine_host.close()


# -- helpers ---------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _parse(stamp: str) -> datetime:
    assert UTC_TIME.match(stamp), f"not an RFC 3339 UTC time ending in Z: {stamp!r}"
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _resource(prefix: str = "room") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _admin(token: Token) -> dict[str, str]:
    return token("root", "admin")


def _slot_body(
    *,
    start: datetime | None = None,
    hours: float = 1,
    capacity: int = 1,
    resource: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    if start is None:
        start_text, end_text = _window(days=1, hours=int(hours))
    else:
        start_text, end_text = start.isoformat(), (start + timedelta(hours=hours)).isoformat()
    return {
        "resourceId": resource or _resource(),
        "startTime": start_text,
        "endTime": end_text,
        "capacity": capacity,
        **fields,
    }


async def _json(response: ClientResponse, status: int) -> Any:
    text = await response.text()
    assert response.status == status, (
        f"{response.method} {response.url.path_qs}: {response.status} {text}"
    )
    return json.loads(text) if text else None


async def _error(response: ClientResponse, status: int, code: str) -> dict[str, Any]:
    """An error answer: exact status and code, docs/api.md's shape, a request id."""
    body: dict[str, Any] = await _json(response, status)
    assert response.content_type == "application/json"
    assert set(body) <= ERROR_KEYS and {"error", "message"} <= set(body), body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    if status in (429, 503):
        assert isinstance(body["retryAfter"], int) and body["retryAfter"] >= 1, body
        assert response.headers["Retry-After"] == str(body["retryAfter"])
    else:
        assert "retryAfter" not in body and "Retry-After" not in response.headers, body
    if status == 422:
        assert isinstance(body["details"], dict) and body["details"], body
    assert response.headers.get("X-Request-Id")
    return body


def _check_slot(slot: dict[str, Any]) -> None:
    assert set(slot) >= SLOT_KEYS, sorted(SLOT_KEYS - set(slot))
    _parse(slot["startTime"])
    _parse(slot["endTime"])
    expected = slot["capacity"] - slot["currentBookings"] - slot["heldCount"]
    assert slot["available"] == max(0, expected), slot
    assert slot["status"] in ("AVAILABLE", "RESERVED", "BOOKED", "BLOCKED", "EXPIRED")
    assert isinstance(slot["metadata"], dict) and isinstance(slot["version"], int)


def _check_booking(booking: dict[str, Any]) -> None:
    assert set(booking) >= BOOKING_KEYS, sorted(BOOKING_KEYS - set(booking))
    assert booking["status"] in ("RESERVED", "CONFIRMED", "EXPIRED", "CANCELLED", "COMPLETED")
    for field in ("reservedAt", "expiresAt", "confirmedAt", "completedAt", "cancelledAt"):
        if booking[field] is not None:
            _parse(booking[field])
    assert isinstance(booking["version"], int)


def _check_entry(entry: dict[str, Any]) -> None:
    assert set(entry) >= QUEUE_KEYS, sorted(QUEUE_KEYS - set(entry))
    assert entry["status"] in ("WAITING", "NOTIFIED", "EXPIRED", "CONVERTED")
    _parse(entry["joinedAt"])
    if entry["notifiedAt"] is not None:
        _parse(entry["notifiedAt"])
    if entry["status"] == "WAITING":
        assert isinstance(entry["position"], int) and entry["position"] >= 1, entry
    else:
        assert entry["position"] is None, entry
    _check_slot(entry["slotDetails"])


async def _create(api: Client, token: Token, **kwargs: Any) -> dict[str, Any]:
    response = await api.post("/api/admin/slots", json=_slot_body(**kwargs), headers=_admin(token))
    slot: dict[str, Any] = await _json(response, 201)
    return slot


async def _get_slot(api: Client, token: Token, slot_id: str) -> dict[str, Any]:
    slot: dict[str, Any] = await _json(
        await api.get(f"/api/slots/{slot_id}", headers=token("viewer")), 200
    )
    return slot


async def _reserve(
    api: Client, token: Token, slot_id: str, user: str, status: int = 201
) -> dict[str, Any]:
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": slot_id}, headers=token(user)
    )
    body: dict[str, Any] = await _json(response, status)
    return body


async def _hold(api: Client, token: Token, slot_id: str, user: str) -> dict[str, Any]:
    booking: dict[str, Any] = (await _reserve(api, token, slot_id, user))["booking"]
    assert booking["status"] == "RESERVED"
    return booking


async def _confirmed(api: Client, token: Token, slot_id: str, user: str) -> dict[str, Any]:
    held = await _hold(api, token, slot_id, user)
    booking: dict[str, Any] = await _json(
        await api.post(f"/api/bookings/{held['id']}/confirm", headers=token(user)), 200
    )
    assert booking["status"] == "CONFIRMED"
    return booking


async def _booking(api: Client, token: Token, booking_id: str, user: str) -> dict[str, Any]:
    booking: dict[str, Any] = await _json(
        await api.get(f"/api/bookings/{booking_id}", headers=token(user)), 200
    )
    return booking


async def _position(api: Client, token: Token, slot_id: str, user: str) -> dict[str, Any]:
    entry: dict[str, Any] = await _json(
        await api.get(f"/api/slots/{slot_id}/queue/position", headers=token(user)), 200
    )
    _check_entry(entry)
    return entry


async def _poll(
    api: Client, path: str, headers: dict[str, str], done: Callable[[Any], bool]
) -> Any:
    """GET ``path`` until ``done`` holds for its body (a deadline, never a fixed sleep)."""

    async def probe() -> Any:
        return await _json(await api.get(path, headers=headers), 200)

    return await wait_until(probe, done)


def _unknown_like(entity_id: str, kind: str) -> str:
    """An id routed to the same shard as ``entity_id`` that names nothing."""
    return f"{entity_id[:8]}-{kind}doesnotexist0"


def _resource_on_shard(shard: int, prefix: str) -> str:
    return next(
        name
        for name in (f"{prefix}-{n}-{uuid.uuid4().hex[:6]}" for n in range(1000))
        if shard_of_resource(name, SHARDS) == shard
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: Any) -> str:
    return _b64(json.dumps(value).encode())


def _claims(**claims: Any) -> dict[str, Any]:
    return {"sub": "root", "role": "admin", "exp": int(time.time()) + 3600, **claims}


# -- slots: create ---------------------------------------------------------------------


async def test_create_slot_answers_201_with_a_camelcase_slot_in_utc(
    api: Client, token: Token
) -> None:
    # Input with fractional seconds and a non-UTC offset; answered in UTC with a Z.
    plus_two = timezone(timedelta(hours=2))
    start = (datetime.now(plus_two) + timedelta(days=1)).replace(microsecond=250_000)
    end = start + timedelta(hours=1, milliseconds=500)
    resource = _resource()
    body = {
        "resourceId": resource,
        "domain": "default",
        "startTime": start.isoformat(),
        "endTime": end.isoformat(),
        "capacity": 3,
        "metadata": {"floor": 2, "tags": ["quiet"]},
    }
    response = await api.post("/api/admin/slots", json=body, headers=_admin(token))
    slot = await _json(response, 201)
    assert response.content_type == "application/json"
    _check_slot(slot)
    assert slot["startTime"] == start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + ".250Z"
    assert slot["endTime"] == end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + ".750Z"
    assert {k: slot[k] for k in ("resourceId", "domain", "capacity", "metadata")} == {
        "resourceId": resource,
        "domain": "default",
        "capacity": 3,
        "metadata": {"floor": 2, "tags": ["quiet"]},
    }
    assert (slot["currentBookings"], slot["heldCount"], slot["available"]) == (0, 0, 3)
    assert (slot["status"], slot["queueLength"]) == ("AVAILABLE", 0)
    assert isinstance(slot["id"], str) and slot["id"]
    assert await _get_slot(api, token, slot["id"]) == slot

    # The domain defaults to "default"; a slot may be created blocked.
    blocked = await _create(api, token, blocked=True)
    assert (blocked["domain"], blocked["status"]) == ("default", "BLOCKED")


async def test_create_slot_refuses_invalid_fields_with_422_and_per_field_details(
    api: Client, token: Token
) -> None:
    start = _now() + timedelta(days=1)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"capacity": 0}, "capacity"),
        ({"capacity": -2}, "capacity"),
        ({"capacity": "two"}, "capacity"),
        ({"endTime": start.isoformat()}, "endTime"),
        ({"endTime": (start - timedelta(minutes=1)).isoformat()}, "endTime"),
        ({"domain": "no-such-domain"}, "domain"),
        ({"startTime": start.replace(tzinfo=None).isoformat()}, "startTime"),
        ({"endTime": (start + timedelta(hours=1)).replace(tzinfo=None).isoformat()}, "endTime"),
        ({"startTime": "tomorrow at ten"}, "startTime"),
    ]
    for fields, field in cases:
        body = {**_slot_body(start=start), **fields}
        response = await api.post("/api/admin/slots", json=body, headers=_admin(token))
        problem = await _error(response, 422, "ValidationError")
        assert field in problem["details"], (fields, problem)
    # Nothing was created.
    listing = await _json(await api.get("/api/slots", headers=token("ann")), 200)
    assert listing == {"items": [], "nextCursor": None}


async def test_a_missing_required_field_is_named_in_the_422_details(
    api: Client, token: Token
) -> None:
    body = _slot_body()
    del body["resourceId"]
    response = await api.post("/api/admin/slots", json=body, headers=_admin(token))
    problem = await _error(response, 422, "ValidationError")
    assert "resourceId" in problem["details"], problem
    reserve = await api.post("/api/bookings/reserve", json={}, headers=token("ann"))
    problem = await _error(reserve, 422, "ValidationError")
    assert "slotId" in problem["details"], problem


async def test_create_slot_refuses_an_overlap_on_the_same_resource_with_409(
    api: Client, token: Token
) -> None:
    resource = _resource()
    start = _now() + timedelta(days=1)
    first = await _create(api, token, resource=resource, start=start, hours=2)
    for offset_h, hours in ((1, 2), (-1, 2), (0.5, 0.5), (-1, 4)):
        body = _slot_body(resource=resource, start=start + timedelta(hours=offset_h), hours=hours)
        response = await api.post("/api/admin/slots", json=body, headers=_admin(token))
        await _error(response, 409, "SlotOverlap")
    # Touching is not overlapping, and another resource is free at the same time.
    await _create(api, token, resource=resource, start=start + timedelta(hours=2))
    await _create(api, token, resource=_resource(), start=start, hours=2)
    listing = await _json(
        await api.get("/api/slots", params={"resourceId": resource}, headers=token("ann")), 200
    )
    assert len(listing["items"]) == 2 and first["id"] in {s["id"] for s in listing["items"]}


# -- slots: read, update, delete ---------------------------------------------------------


async def test_get_slot_answers_200_and_404_for_an_unknown_id(api: Client, token: Token) -> None:
    slot = await _create(api, token, capacity=2)
    got = await _get_slot(api, token, slot["id"])
    _check_slot(got)
    assert got["id"] == slot["id"]
    for unknown in (_unknown_like(slot["id"], "s"), "nope"):
        await _error(await api.get(f"/api/slots/{unknown}", headers=token("ann")), 404, "NotFound")


async def test_update_slot_changes_times_capacity_metadata_and_blocked(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=1, metadata={"a": 1})
    start = _parse(slot["startTime"]) + timedelta(hours=2)
    end = start + timedelta(minutes=90)
    changes = {
        "startTime": start.isoformat(),
        "endTime": end.isoformat(),
        "capacity": 4,
        "metadata": {"b": 2},
    }
    path = f"/api/admin/slots/{slot['id']}"
    updated = await _json(await api.put(path, json=changes, headers=_admin(token)), 200)
    _check_slot(updated)
    assert _parse(updated["startTime"]) == start and _parse(updated["endTime"]) == end
    assert (updated["capacity"], updated["available"], updated["metadata"]) == (4, 4, {"b": 2})
    assert updated["version"] > slot["version"]
    assert await _get_slot(api, token, slot["id"]) == updated

    blocked = await _json(await api.put(path, json={"blocked": True}, headers=_admin(token)), 200)
    assert blocked["status"] == "BLOCKED" and blocked["version"] > updated["version"]
    unblocked = await _json(
        await api.put(path, json={"blocked": False}, headers=_admin(token)), 200
    )
    assert unblocked["status"] == "AVAILABLE"

    # Raised capacity is offered to the head of the queue.
    full = await _create(api, token, capacity=1)
    await _hold(api, token, full["id"], "holder")
    assert "queue" in await _reserve(api, token, full["id"], "w1", status=202)
    raised = await _json(
        await api.put(
            f"/api/admin/slots/{full['id']}", json={"capacity": 2}, headers=_admin(token)
        ),
        200,
    )
    assert (raised["heldCount"], raised["queueLength"], raised["available"]) == (2, 0, 0)
    offer = await _position(api, token, full["id"], "w1")
    assert offer["status"] == "NOTIFIED" and offer["bookingId"]
    assert (await _booking(api, token, offer["bookingId"], "w1"))["status"] == "RESERVED"


async def test_update_slot_refusals_409_422_and_404(api: Client, token: Token) -> None:
    resource = _resource()
    start = _now() + timedelta(days=1)
    slot = await _create(api, token, capacity=2, resource=resource, start=start)
    later = await _create(api, token, resource=resource, start=start + timedelta(hours=3))
    await _hold(api, token, slot["id"], "ann")
    await _confirmed(api, token, slot["id"], "bob")
    path = f"/api/admin/slots/{slot['id']}"
    before = await _get_slot(api, token, slot["id"])

    below = await api.put(path, json={"capacity": 1}, headers=_admin(token))
    await _error(below, 409, "CapacityBelowBookings")
    onto = {
        "startTime": later["startTime"],
        "endTime": (_parse(later["startTime"]) + timedelta(hours=1)).isoformat(),
    }
    await _error(await api.put(path, json=onto, headers=_admin(token)), 409, "SlotOverlap")
    invalid: list[tuple[dict[str, Any], str]] = [
        ({"capacity": 0}, "capacity"),
        ({"endTime": slot["startTime"]}, "endTime"),
        ({"startTime": start.replace(tzinfo=None).isoformat()}, "startTime"),
    ]
    for fields, field in invalid:
        problem = await _error(
            await api.put(path, json=fields, headers=_admin(token)), 422, "ValidationError"
        )
        assert field in problem["details"], (fields, problem)
    for unknown in (_unknown_like(slot["id"], "s"), "nope"):
        response = await api.put(
            f"/api/admin/slots/{unknown}", json={"capacity": 3}, headers=_admin(token)
        )
        await _error(response, 404, "NotFound")
    assert await _get_slot(api, token, slot["id"]) == before


async def test_delete_slot_answers_204_then_404(api: Client, token: Token) -> None:
    slot = await _create(api, token)
    path = f"/api/admin/slots/{slot['id']}"
    deleted = await api.delete(path, headers=_admin(token))
    assert deleted.status == 204 and await deleted.read() == b""
    assert deleted.headers.get("X-Request-Id")
    await _error(await api.get(f"/api/slots/{slot['id']}", headers=token("ann")), 404, "NotFound")
    await _error(await api.delete(path, headers=_admin(token)), 404, "NotFound")
    await _error(await api.delete("/api/admin/slots/nope", headers=_admin(token)), 404, "NotFound")


async def test_delete_slot_with_bookings_is_409_unless_forced_and_force_cleans_up(
    api: Client, token: Token, db: asyncpg.Connection
) -> None:
    slot = await _create(api, token, capacity=2)
    held = await _hold(api, token, slot["id"], "holder")
    booked = await _confirmed(api, token, slot["id"], "booker")
    assert "queue" in await _reserve(api, token, slot["id"], "waiter", status=202)
    path = f"/api/admin/slots/{slot['id']}"

    await _error(await api.delete(path, headers=_admin(token)), 409, "SlotHasBookings")
    await _error(
        await api.delete(path, params={"force": "false"}, headers=_admin(token)),
        409,
        "SlotHasBookings",
    )
    kept = await _get_slot(api, token, slot["id"])
    assert (kept["currentBookings"], kept["heldCount"], kept["queueLength"]) == (1, 1, 1)

    forced = await api.delete(path, params={"force": "true"}, headers=_admin(token))
    assert forced.status == 204, await forced.text()
    await _error(await api.get(f"/api/slots/{slot['id']}", headers=token("ann")), 404, "NotFound")
    expired = await _booking(api, token, held["id"], "holder")
    assert expired["status"] == "EXPIRED"
    cancelled = await _booking(api, token, booked["id"], "booker")
    assert cancelled["status"] == "CANCELLED" and cancelled["cancelledAt"] is not None
    assert (cancelled["cancelReason"], cancelled["refundPercentage"]) == ("slot deleted", 100)
    # The slot is gone, so its queue cannot be read over HTTP any more; the
    # waiter's entry is durably EXPIRED (the 204 came after the commit).
    await _error(
        await api.get(f"/api/slots/{slot['id']}/queue/position", headers=token("waiter")),
        404,
        "NotFound",
    )
    status = await db.fetchval(
        "SELECT status FROM queue_entries WHERE slot_id = $1 AND user_id = $2",
        slot["id"],
        "waiter",
    )
    assert status == "EXPIRED"


# -- slots: listing ------------------------------------------------------------------------


async def test_list_slots_filters_by_resource_time_status_and_availability_and_pages(
    api: Client, token: Token
) -> None:
    base = _now() + timedelta(days=1)
    shared = _resource("shared")
    a = await _create(api, token, start=base, capacity=2)
    b = await _create(api, token, start=base + timedelta(days=1), resource=shared)
    c = await _create(api, token, start=base + timedelta(days=2), resource=shared, blocked=True)
    d = await _create(api, token, start=base + timedelta(days=3))
    await _hold(api, token, d["id"], "ann")
    everything = {s["id"] for s in (a, b, c, d)}

    async def ids(**params: str) -> set[str]:
        page = await _json(await api.get("/api/slots", params=params, headers=token("ann")), 200)
        assert set(page) == {"items", "nextCursor"} and page["nextCursor"] is None, page
        for item in page["items"]:
            _check_slot(item)
        return {item["id"] for item in page["items"]}

    assert await ids() == everything
    assert await ids(resourceId=shared) == {b["id"], c["id"]}
    assert await ids(resourceId=_resource()) == set()
    # startTime in [from, to)
    assert await ids(**{"from": b["startTime"], "to": c["startTime"]}) == {b["id"]}
    assert await ids(**{"from": a["startTime"]}) == everything
    assert await ids(to=a["startTime"]) == set()
    assert await ids(to=b["startTime"]) == {a["id"]}
    assert await ids(status="BLOCKED") == {c["id"]}
    assert await ids(status="RESERVED") == {d["id"]}
    assert await ids(status="AVAILABLE") == {a["id"], b["id"]}
    assert await ids(status="BOOKED") == set()
    assert await ids(available="true") == {a["id"], b["id"]}
    assert await ids(available="false") == everything
    assert await ids(resourceId=shared, available="true") == {b["id"]}

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        page = await _json(await api.get("/api/slots", params=params, headers=token("ann")), 200)
        assert len(page["items"]) <= 1
        seen += [item["id"] for item in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert cursor is None and len(seen) == len(set(seen)) and set(seen) == everything


async def test_list_slots_caps_the_limit(api: Client, token: Token) -> None:
    base = _now() + timedelta(days=1)
    count = LIST_LIMIT_MAX + 1
    for first in range(0, count, 50):
        await asyncio.gather(
            *(
                _create(api, token, start=base + timedelta(hours=n))
                for n in range(first, min(first + 50, count))
            )
        )
    page = await _json(
        await api.get("/api/slots", params={"limit": "100000"}, headers=token("ann")), 200
    )
    assert len(page["items"]) == LIST_LIMIT_MAX and page["nextCursor"]
    rest = await _json(
        await api.get(
            "/api/slots",
            params={"limit": "100000", "cursor": page["nextCursor"]},
            headers=token("ann"),
        ),
        200,
    )
    assert len(rest["items"]) == 1 and rest["nextCursor"] is None
    assert not {s["id"] for s in page["items"]} & {s["id"] for s in rest["items"]}


async def test_list_slots_refuses_bad_filters_with_422(api: Client, token: Token) -> None:
    cases: list[tuple[dict[str, str], str]] = [
        ({"status": "NOPE"}, "status"),
        ({"limit": "ten"}, "limit"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2030-01-01T00:00:00"}, "from"),
        ({"to": "2030-13-01T00:00:00Z"}, "to"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"available": "maybe"}, "available"),
    ]
    for params, field in cases:
        response = await api.get("/api/slots", params=params, headers=token("ann"))
        problem = await _error(response, 422, "ValidationError")
        assert field in problem["details"], (params, problem)


@pytest.mark.parametrize("path", ["/api/slots", "/api/bookings/my"])
async def test_a_limit_below_1_is_a_bad_filter_and_one_above_the_maximum_is_capped(
    api: Client, token: Token, path: str
) -> None:
    for raw in ("0", "-5"):
        response = await api.get(path, params={"limit": raw}, headers=token("ann"))
        problem = await _error(response, 422, "ValidationError")
        assert set(problem["details"]) == {"limit"}, (raw, problem)
    # (test_list_slots_caps_the_limit shows a full capped page)
    page = await _json(await api.get(path, params={"limit": "100000"}, headers=token("ann")), 200)
    assert page["items"] == [] and page["nextCursor"] is None


# -- bookings: reserve ---------------------------------------------------------------------


async def test_reserve_answers_201_with_a_new_hold_then_200_with_the_same_hold(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=2)
    first = await _reserve(api, token, slot["id"], "ann", status=201)
    assert set(first) == {"booking"}
    booking = first["booking"]
    _check_booking(booking)
    assert (booking["status"], booking["userId"], booking["slotId"]) == (
        "RESERVED",
        "ann",
        slot["id"],
    )
    assert _parse(booking["expiresAt"]) - _parse(booking["reservedAt"]) == HOLD_TTL
    for field in ("confirmedAt", "completedAt", "cancelledAt", "cancelReason", "cancelledBy"):
        assert booking[field] is None, field
    assert booking["refundPercentage"] is None
    again = await _reserve(api, token, slot["id"], "ann", status=200)
    assert again == first
    view = await _get_slot(api, token, slot["id"])
    assert (view["heldCount"], view["currentBookings"], view["available"]) == (1, 0, 1)
    assert view["status"] == "RESERVED"


async def test_reserve_on_a_full_slot_with_a_queue_answers_202_then_200(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=1)
    await _hold(api, token, slot["id"], "holder")
    queued = await _reserve(api, token, slot["id"], "w1", status=202)
    assert set(queued) == {"queue"}
    entry = queued["queue"]
    _check_entry(entry)
    assert (entry["status"], entry["position"], entry["totalInQueue"]) == ("WAITING", 1, 1)
    assert (entry["userId"], entry["slotId"], entry["bookingId"]) == ("w1", slot["id"], None)
    assert entry["notifiedAt"] is None
    assert isinstance(entry["estimatedWaitSeconds"], int)
    assert isinstance(entry["estimatedWaitTime"], str)
    details = entry["slotDetails"]
    assert (details["id"], details["heldCount"], details["queueLength"]) == (slot["id"], 1, 1)
    second = (await _reserve(api, token, slot["id"], "w2", status=202))["queue"]
    assert (second["position"], second["totalInQueue"]) == (2, 2)
    again = await _reserve(api, token, slot["id"], "w1", status=200)
    assert set(again) == {"queue"}
    assert (again["queue"]["position"], again["queue"]["totalInQueue"]) == (1, 2)
    assert (await _get_slot(api, token, slot["id"]))["queueLength"] == 2


async def test_reserve_of_an_unknown_slot_is_404(api: Client, token: Token) -> None:
    slot = await _create(api, token)
    for unknown in (_unknown_like(slot["id"], "s"), "nope"):
        response = await api.post(
            "/api/bookings/reserve", json={"slotId": unknown}, headers=token("ann")
        )
        await _error(response, 404, "NotFound")
    for body in ({"slotId": ""}, {"slotId": 7}):
        response = await api.post("/api/bookings/reserve", json=body, headers=token("ann"))
        problem = await _error(response, 422, "ValidationError")
        assert "slotId" in problem["details"], problem


async def test_reserve_and_join_of_a_blocked_slot_are_409_slot_not_reservable(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, blocked=True)
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("ann")
    )
    await _error(response, 409, "SlotNotReservable")
    joined = await api.post(f"/api/slots/{slot['id']}/queue", headers=token("ann"))
    await _error(joined, 409, "SlotNotReservable")
    path = f"/api/admin/slots/{slot['id']}"
    await _json(await api.put(path, json={"blocked": False}, headers=_admin(token)), 200)
    await _hold(api, token, slot["id"], "ann")
    await _json(await api.put(path, json={"blocked": True}, headers=_admin(token)), 200)
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("bob")
    )
    await _error(response, 409, "SlotNotReservable")


async def test_reserve_beyond_the_domains_booking_window_is_409(api: Client, token: Token) -> None:
    far = await _create(api, token, start=_now() + timedelta(days=400))
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": far["id"]}, headers=token("ann")
    )
    await _error(response, 409, "OutsideBookingWindow")
    near = await _create(api, token, start=_now() + timedelta(days=364))
    await _hold(api, token, near["id"], "ann")


async def test_reserve_of_a_full_slot_without_a_queue_is_409_slot_full(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=1, domain="noqueue")
    await _hold(api, token, slot["id"], "ann")
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("bob")
    )
    await _error(response, 409, "SlotFull")
    joined = await api.post(f"/api/slots/{slot['id']}/queue", headers=token("bob"))
    await _error(joined, 409, "QueueDisabled")
    assert (await _get_slot(api, token, slot["id"]))["queueLength"] == 0


async def test_reserve_and_join_of_a_full_queue_are_409_queue_full(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=1)
    await _hold(api, token, slot["id"], "holder")
    users = [f"w{n}" for n in range(QUEUE_MAX)]
    for first in range(0, QUEUE_MAX, 25):
        answers = await asyncio.gather(
            *(_reserve(api, token, slot["id"], u, status=202) for u in users[first : first + 25])
        )
        assert all("queue" in answer for answer in answers)
    assert (await _get_slot(api, token, slot["id"]))["queueLength"] == QUEUE_MAX
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("late")
    )
    await _error(response, 409, "QueueFull")
    joined = await api.post(f"/api/slots/{slot['id']}/queue", headers=token("later"))
    await _error(joined, 409, "QueueFull")
    # Someone already queued is answered 200 before the queue's size is checked.
    again = await _reserve(api, token, slot["id"], "w0", status=200)
    assert again["queue"]["position"] == 1


async def test_reserve_and_join_by_a_user_with_a_confirmed_booking_are_409_already_booked(
    api: Client, token: Token
) -> None:
    roomy = await _create(api, token, capacity=2)
    await _confirmed(api, token, roomy["id"], "ann")
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": roomy["id"]}, headers=token("ann")
    )
    await _error(response, 409, "AlreadyBooked")
    full = await _create(api, token, capacity=1)
    await _confirmed(api, token, full["id"], "ann")
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": full["id"]}, headers=token("ann")
    )
    await _error(response, 409, "AlreadyBooked")
    joined = await api.post(f"/api/slots/{full['id']}/queue", headers=token("ann"))
    await _error(joined, 409, "AlreadyBooked")


# -- bookings: idempotency -----------------------------------------------------------------


async def test_an_idempotency_key_replays_the_first_status_and_body_even_a_409(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=2)
    headers = {**token("ann"), "Idempotency-Key": "replay-1"}
    body = {"slotId": slot["id"]}
    first = await _json(await api.post("/api/bookings/reserve", json=body, headers=headers), 201)
    replay = await _json(await api.post("/api/bookings/reserve", json=body, headers=headers), 201)
    assert replay == first

    blocked = await _create(api, token, blocked=True)
    refused_headers = {**token("ann"), "Idempotency-Key": "replay-2"}
    refused_body = {"slotId": blocked["id"]}
    refused = await _error(
        await api.post("/api/bookings/reserve", json=refused_body, headers=refused_headers),
        409,
        "SlotNotReservable",
    )
    await _json(
        await api.put(
            f"/api/admin/slots/{blocked['id']}", json={"blocked": False}, headers=_admin(token)
        ),
        200,
    )
    replayed = await _error(
        await api.post("/api/bookings/reserve", json=refused_body, headers=refused_headers),
        409,
        "SlotNotReservable",
    )
    assert replayed == refused
    # Without the key the (now unblocked) slot takes the hold.
    await _hold(api, token, blocked["id"], "ann")


async def test_an_idempotency_key_with_another_body_is_409_on_the_same_shard(
    api: Client, token: Token
) -> None:
    shard = 0
    slot = await _create(api, token, capacity=2, resource=_resource_on_shard(shard, "idem"))
    other = await _create(api, token, capacity=2, resource=_resource_on_shard(shard, "idem"))
    headers = {**token("ann"), "Idempotency-Key": "same-shard"}
    await _json(
        await api.post("/api/bookings/reserve", json={"slotId": slot["id"]}, headers=headers), 201
    )
    reused = await api.post("/api/bookings/reserve", json={"slotId": other["id"]}, headers=headers)
    await _error(reused, 409, "IdempotencyKeyReused")
    assert (await _get_slot(api, token, other["id"]))["heldCount"] == 0


async def test_an_idempotency_key_with_another_body_is_409_whichever_shard_the_slot_is_on(
    api: Client, token: Token
) -> None:
    """docs/api.md scopes keys per user and endpoint: the slot's shard is not part of it."""
    slot = await _create(api, token, capacity=2, resource=_resource_on_shard(0, "idem"))
    other = await _create(api, token, capacity=2, resource=_resource_on_shard(1, "idem"))
    headers = {**token("ann"), "Idempotency-Key": "cross-shard"}
    await _json(
        await api.post("/api/bookings/reserve", json={"slotId": slot["id"]}, headers=headers), 201
    )
    reused = await api.post("/api/bookings/reserve", json={"slotId": other["id"]}, headers=headers)
    await _error(reused, 409, "IdempotencyKeyReused")
    assert (await _get_slot(api, token, other["id"]))["heldCount"] == 0


async def test_idempotency_keys_are_scoped_per_user_and_endpoint(api: Client, token: Token) -> None:
    slot = await _create(api, token, capacity=2)
    key = {"Idempotency-Key": "shared-key"}
    ann = await _json(
        await api.post(
            "/api/bookings/reserve", json={"slotId": slot["id"]}, headers={**token("ann"), **key}
        ),
        201,
    )
    bob = await _json(
        await api.post(
            "/api/bookings/reserve", json={"slotId": slot["id"]}, headers={**token("bob"), **key}
        ),
        201,
    )
    assert bob["booking"]["userId"] == "bob" and bob["booking"]["id"] != ann["booking"]["id"]
    confirmed = await _json(
        await api.post(
            f"/api/bookings/{ann['booking']['id']}/confirm", headers={**token("ann"), **key}
        ),
        200,
    )
    assert confirmed["status"] == "CONFIRMED"


# -- bookings: confirm, cancel, read ---------------------------------------------------------


async def test_confirm_answers_200_confirmed_and_a_repeat_is_200_unchanged(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=1)
    held = await _hold(api, token, slot["id"], "ann")
    path = f"/api/bookings/{held['id']}/confirm"
    confirmed = await _json(await api.post(path, headers=token("ann")), 200)
    _check_booking(confirmed)
    assert (confirmed["id"], confirmed["status"]) == (held["id"], "CONFIRMED")
    assert confirmed["confirmedAt"] is not None and confirmed["version"] > held["version"]
    assert await _json(await api.post(path, headers=token("ann")), 200) == confirmed
    view = await _get_slot(api, token, slot["id"])
    assert (view["currentBookings"], view["heldCount"], view["status"]) == (1, 0, "BOOKED")
    for unknown in (_unknown_like(held["id"], "b"), "nope"):
        response = await api.post(f"/api/bookings/{unknown}/confirm", headers=token("ann"))
        await _error(response, 404, "NotFound")


async def test_confirm_of_a_lapsed_hold_is_409_reservation_expired(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=1, domain="short")
    held = await _hold(api, token, slot["id"], "ann")
    await _poll(
        api, f"/api/bookings/{held['id']}", token("ann"), lambda b: b["status"] == "EXPIRED"
    )
    confirm = await api.post(f"/api/bookings/{held['id']}/confirm", headers=token("ann"))
    await _error(confirm, 409, "ReservationExpired")
    cancel = await api.post(f"/api/bookings/{held['id']}/cancel", headers=token("ann"))
    await _error(cancel, 409, "InvalidTransition")
    assert (await _booking(api, token, held["id"], "ann"))["status"] == "EXPIRED"
    view = await _get_slot(api, token, slot["id"])
    assert (view["heldCount"], view["available"]) == (0, 1)
    fresh = await _hold(api, token, slot["id"], "ann")
    assert fresh["id"] != held["id"]


async def test_other_transitions_are_409_invalid_transition(api: Client, token: Token) -> None:
    slot = await _create(api, token, capacity=1)
    held = await _hold(api, token, slot["id"], "ann")
    # Cancel needs a CONFIRMED booking.
    cancel = await api.post(
        f"/api/bookings/{held['id']}/cancel", json={"reason": "x"}, headers=token("ann")
    )
    await _error(cancel, 409, "InvalidTransition")
    assert (await _booking(api, token, held["id"], "ann"))["status"] == "RESERVED"
    await _json(await api.post(f"/api/bookings/{held['id']}/confirm", headers=token("ann")), 200)
    await _json(await api.post(f"/api/bookings/{held['id']}/cancel", headers=token("ann")), 200)
    # CANCELLED is final.
    confirm = await api.post(f"/api/bookings/{held['id']}/confirm", headers=token("ann"))
    await _error(confirm, 409, "InvalidTransition")
    again = await api.post(f"/api/bookings/{held['id']}/cancel", headers=token("ann"))
    await _error(again, 409, "InvalidTransition")
    assert (await _booking(api, token, held["id"], "ann"))["status"] == "CANCELLED"


# -- holds: extend, release -------------------------------------------------------------

# The test policies' extension (docs/api.md's default): a minute, twice.
EXTENSION = timedelta(minutes=1)


async def _audit(db: asyncpg.Connection, booking_id: str) -> list[tuple[str | None, ...]]:
    rows = await db.fetch(
        "SELECT from_status, to_status, trigger, actor, request_id FROM audit_log"
        " WHERE entity_id = $1 ORDER BY id",
        booking_id,
    )
    return [tuple(row) for row in rows]


async def test_extend_moves_expires_at_by_the_domains_extension_up_to_its_limit(
    api: Client, token: Token, db: asyncpg.Connection
) -> None:
    slot = await _create(api, token, capacity=1)
    held = await _hold(api, token, slot["id"], "ann")
    assert held["extensions"] == 0
    path = f"/api/bookings/{held['id']}/extend"
    first = await _json(await api.post(path, headers=token("ann")), 200)
    _check_booking(first)
    assert (first["id"], first["status"], first["extensions"]) == (held["id"], "RESERVED", 1)
    assert _parse(first["expiresAt"]) == _parse(held["expiresAt"]) + EXTENSION
    assert first["version"] == held["version"] + 1
    second = await _json(await api.post(path, headers=token("ann")), 200)
    assert second["extensions"] == 2
    assert _parse(second["expiresAt"]) == _parse(held["expiresAt"]) + 2 * EXTENSION
    refused = await _error(await api.post(path, headers=token("ann")), 409, "ExtensionLimitReached")
    assert refused["details"] == {"extensions": 2, "maxExtensions": 2}
    assert await _booking(api, token, held["id"], "ann") == second
    view = await _get_slot(api, token, slot["id"])
    assert (view["heldCount"], view["available"]) == (1, 0)
    audit = await _audit(db, held["id"])
    assert [row[:4] for row in audit] == [
        ("PENDING", "RESERVED", "reserve", "ann"),
        ("RESERVED", "RESERVED", "extended", "ann"),
        ("RESERVED", "RESERVED", "extended", "ann"),
    ]


async def test_a_domain_without_extensions_refuses_the_first(api: Client, token: Token) -> None:
    slot = await _create(api, token, capacity=1, domain="fixed")
    held = await _hold(api, token, slot["id"], "ann")
    response = await api.post(f"/api/bookings/{held['id']}/extend", headers=token("ann"))
    body = await _error(response, 409, "ExtensionLimitReached")
    assert body["details"] == {"extensions": 0, "maxExtensions": 0}
    assert await _booking(api, token, held["id"], "ann") == held


async def test_extend_never_reaches_past_the_slots_start(api: Client, token: Token) -> None:
    # The hold lapses two minutes after it is taken; the slot starts half a minute later.
    start = _now() + timedelta(minutes=2, seconds=30)
    slot = await _create(api, token, capacity=1, start=start)
    held = await _hold(api, token, slot["id"], "ann")
    path = f"/api/bookings/{held['id']}/extend"
    capped = await _json(await api.post(path, headers=token("ann")), 200)
    assert (capped["expiresAt"], capped["extensions"]) == (slot["startTime"], 1)
    body = await _error(await api.post(path, headers=token("ann")), 409, "HoldAtSlotStart")
    assert body["details"] == {"startTime": slot["startTime"]}
    assert await _booking(api, token, held["id"], "ann") == capped


async def test_extend_and_release_refuse_a_booking_that_is_not_a_live_hold(
    api: Client, token: Token
) -> None:
    booked = await _confirmed(api, token, (await _create(api, token))["id"], "ann")
    for action in ("extend", "release"):
        response = await api.post(f"/api/bookings/{booked['id']}/{action}", headers=token("ann"))
        await _error(response, 409, "InvalidTransition")
        unknown = _unknown_like(booked["id"], "b")
        response = await api.post(f"/api/bookings/{unknown}/{action}", headers=token("ann"))
        await _error(response, 404, "NotFound")
    assert await _booking(api, token, booked["id"], "ann") == booked
    slot = await _create(api, token, capacity=1, domain="short")
    lapsed = await _hold(api, token, slot["id"], "ann")
    await _poll(
        api, f"/api/bookings/{lapsed['id']}", token("ann"), lambda b: b["status"] == "EXPIRED"
    )
    extend = await api.post(f"/api/bookings/{lapsed['id']}/extend", headers=token("ann"))
    await _error(extend, 409, "ReservationExpired")
    release = await api.post(f"/api/bookings/{lapsed['id']}/release", headers=token("ann"))
    await _error(release, 409, "InvalidTransition")


async def test_release_expires_the_hold_and_offers_the_place_to_the_next_user_at_once(
    api: Client, token: Token, db: asyncpg.Connection
) -> None:
    slot = await _create(api, token, capacity=1)
    held = await _hold(api, token, slot["id"], "ann")
    for user in ("bob", "cy"):
        assert (await _reserve(api, token, slot["id"], user, 202))["queue"]["status"] == "WAITING"
    path = f"/api/bookings/{held['id']}/release"
    keyed = {**token("ann"), "Idempotency-Key": "release-1"}
    released = await _json(await api.post(path, headers=keyed), 200)
    _check_booking(released)
    assert (released["id"], released["status"]) == (held["id"], "EXPIRED")
    assert released["expiresAt"] == held["expiresAt"]
    # The reply came after the commit: bob holds the place already, nobody polled for it.
    bob = await _position(api, token, slot["id"], "bob")
    assert bob["status"] == "NOTIFIED" and bob["bookingId"] is not None
    offer = await _booking(api, token, bob["bookingId"], "bob")
    assert (offer["status"], offer["slotId"]) == ("RESERVED", slot["id"])
    assert bob["offerExpiresAt"] == offer["expiresAt"]
    cy = await _position(api, token, slot["id"], "cy")
    assert (cy["status"], cy["position"], cy["totalInQueue"]) == ("WAITING", 1, 1)
    view = await _get_slot(api, token, slot["id"])
    assert (view["heldCount"], view["queueLength"], view["available"]) == (1, 1, 0)
    # The same key replays the first answer; without it, a second release is refused.
    assert await _json(await api.post(path, headers=keyed), 200) == released
    await _error(await api.post(path, headers=token("ann")), 409, "InvalidTransition")
    ann_audit = await _audit(db, held["id"])
    assert [row[:4] for row in ann_audit] == [
        ("PENDING", "RESERVED", "reserve", "ann"),
        ("RESERVED", "EXPIRED", "released", "ann"),
    ]
    bob_audit = await _audit(db, bob["bookingId"])
    # The offer is part of the release: the same request, the same actor.
    assert bob_audit == [("PENDING", "RESERVED", "queue_offer", "ann", ann_audit[1][4])]


async def test_an_extension_with_an_idempotency_key_applies_once(api: Client, token: Token) -> None:
    held = await _hold(api, token, (await _create(api, token))["id"], "ann")
    path = f"/api/bookings/{held['id']}/extend"
    keyed = {**token("ann"), "Idempotency-Key": "extend-1"}
    first = await _json(await api.post(path, headers=keyed), 200)
    assert await _json(await api.post(path, headers=keyed), 200) == first
    assert (await _booking(api, token, held["id"], "ann"))["extensions"] == 1
    # The key is the extend endpoint's: the same key on release is another request.
    released = await _json(
        await api.post(f"/api/bookings/{held['id']}/release", headers=keyed), 200
    )
    assert released["status"] == "EXPIRED"


async def test_a_booking_of_an_ended_slot_is_completed_and_final(api: Client, token: Token) -> None:
    started = _now() - timedelta(hours=1)
    ends = datetime.now(UTC) + timedelta(seconds=2)
    body = {**_slot_body(start=started), "endTime": ends.isoformat()}
    slot = await _json(await api.post("/api/admin/slots", json=body, headers=_admin(token)), 201)
    booking = await _confirmed(api, token, slot["id"], "ann")
    await _poll(api, f"/api/slots/{slot['id']}", token("ann"), lambda s: s["status"] == "EXPIRED")
    completed = await _booking(api, token, booking["id"], "ann")
    assert completed["status"] == "COMPLETED" and completed["completedAt"] is not None
    for action in ("confirm", "cancel"):
        response = await api.post(f"/api/bookings/{booking['id']}/{action}", headers=token("ann"))
        await _error(response, 409, "InvalidTransition")
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("bob")
    )
    await _error(response, 409, "SlotNotReservable")
    joined = await api.post(f"/api/slots/{slot['id']}/queue", headers=token("bob"))
    await _error(joined, 409, "SlotNotReservable")


async def test_cancel_answers_200_with_the_refund_of_the_domains_policy(
    api: Client, token: Token
) -> None:
    cases = (("default", timedelta(days=1), 100), ("strict", timedelta(days=3), STRICT_REFUND))
    for domain, ahead, refund in cases:
        slot = await _create(api, token, capacity=1, domain=domain, start=_now() + ahead)
        booking = await _confirmed(api, token, slot["id"], "ann")
        response = await api.post(
            f"/api/bookings/{booking['id']}/cancel",
            json={"reason": "plans changed"},
            headers=token("ann"),
        )
        cancelled = await _json(response, 200)
        _check_booking(cancelled)
        assert (cancelled["status"], cancelled["refundPercentage"]) == ("CANCELLED", refund)
        assert cancelled["cancelReason"] == "plans changed"
        assert cancelled["cancelledAt"] is not None
        view = await _get_slot(api, token, slot["id"])
        assert (view["currentBookings"], view["available"]) == (0, 1)
    for unknown in (_unknown_like(booking["id"], "b"), "nope"):
        response = await api.post(f"/api/bookings/{unknown}/cancel", headers=token("ann"))
        await _error(response, 404, "NotFound")


async def test_cancel_after_the_slot_started_is_409_cancellation_window_closed(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, start=_now() - timedelta(hours=1), hours=3)
    booking = await _confirmed(api, token, slot["id"], "ann")
    response = await api.post(
        f"/api/bookings/{booking['id']}/cancel", json={"reason": "late"}, headers=token("ann")
    )
    await _error(response, 409, "CancellationWindowClosed")
    assert (await _booking(api, token, booking["id"], "ann"))["status"] == "CONFIRMED"


async def test_cancel_inside_the_domains_allowed_until_hours_is_409(
    api: Client, token: Token
) -> None:
    # "strict" allows cancelling until 48 h before the start; this slot starts in 24 h.
    slot = await _create(api, token, domain="strict", start=_now() + timedelta(days=1))
    booking = await _confirmed(api, token, slot["id"], "ann")
    response = await api.post(
        f"/api/bookings/{booking['id']}/cancel", json={"reason": "late"}, headers=token("ann")
    )
    await _error(response, 409, "CancellationWindowClosed")
    assert (await _booking(api, token, booking["id"], "ann"))["status"] == "CONFIRMED"


async def test_an_admin_cancels_any_booking_but_only_with_a_reason(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=1)
    booking = await _confirmed(api, token, slot["id"], "ann")
    path = f"/api/bookings/{booking['id']}/cancel"
    for body in (None, {}, {"reason": "   "}):
        problem = await _error(
            await api.post(path, json=body, headers=_admin(token)), 422, "ValidationError"
        )
        assert "reason" in problem["details"], (body, problem)
    assert (await _booking(api, token, booking["id"], "ann"))["status"] == "CONFIRMED"
    cancelled = await _json(
        await api.post(path, json={"reason": "double-booked room"}, headers=_admin(token)), 200
    )
    assert (cancelled["status"], cancelled["cancelReason"]) == ("CANCELLED", "double-booked room")
    assert cancelled["refundPercentage"] == 100
    response = await api.post(
        f"/api/bookings/{_unknown_like(booking['id'], 'b')}/cancel",
        json={"reason": "x"},
        headers=_admin(token),
    )
    await _error(response, 404, "NotFound")


async def test_get_booking_answers_200_to_its_owner_and_admins_and_404_for_unknown_ids(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token)
    held = await _hold(api, token, slot["id"], "ann")
    mine = await _booking(api, token, held["id"], "ann")
    _check_booking(mine)
    assert mine == held
    as_admin = await _json(await api.get(f"/api/bookings/{held['id']}", headers=_admin(token)), 200)
    assert as_admin == held
    for unknown in (_unknown_like(held["id"], "b"), "nope"):
        await _error(
            await api.get(f"/api/bookings/{unknown}", headers=token("ann")), 404, "NotFound"
        )


async def test_another_users_booking_is_404_on_every_booking_route(
    api: Client, token: Token
) -> None:
    held = await _hold(api, token, (await _create(api, token))["id"], "ann")
    booked = await _confirmed(api, token, (await _create(api, token))["id"], "ann")
    for booking in (held, booked):
        unknown = _unknown_like(booking["id"], "b")
        for method, suffix, body in (
            ("GET", "", None),
            ("POST", "/confirm", None),
            ("POST", "/cancel", {"reason": "mine now"}),
            ("POST", "/extend", None),
            ("POST", "/release", None),
        ):
            theirs = await api.request(
                method, f"/api/bookings/{booking['id']}{suffix}", json=body, headers=token("eve")
            )
            missing = await api.request(
                method, f"/api/bookings/{unknown}{suffix}", json=body, headers=token("eve")
            )
            # Exactly the answer for an id that does not exist.
            assert await _error(theirs, 404, "NotFound") == await _error(missing, 404, "NotFound")
    assert await _booking(api, token, held["id"], "ann") == held
    assert await _booking(api, token, booked["id"], "ann") == booked
    mine = await _json(await api.get("/api/bookings/my", headers=token("eve")), 200)
    assert mine == {"items": [], "nextCursor": None}


async def test_my_bookings_lists_only_the_callers_bookings_filters_by_status_and_pages(
    api: Client, token: Token
) -> None:
    slots = [await _create(api, token, capacity=2) for _ in range(3)]
    held = [await _hold(api, token, slot["id"], "ann") for slot in slots[:2]]
    booked = await _confirmed(api, token, slots[2]["id"], "ann")
    await _hold(api, token, slots[0]["id"], "bob")
    everything = {b["id"] for b in [*held, booked]}

    async def listing(**params: str) -> dict[str, Any]:
        page: dict[str, Any] = await _json(
            await api.get("/api/bookings/my", params=params, headers=token("ann")), 200
        )
        assert set(page) == {"items", "nextCursor"}
        for item in page["items"]:
            _check_booking(item)
            assert item["userId"] == "ann"
        return page

    page = await listing()
    assert {b["id"] for b in page["items"]} == everything and page["nextCursor"] is None
    confirmed = await listing(status="CONFIRMED")
    assert [b["id"] for b in confirmed["items"]] == [booked["id"]]
    reserved = await listing(status="RESERVED")
    assert {b["id"] for b in reserved["items"]} == {b["id"] for b in held}
    assert (await listing(status="CANCELLED"))["items"] == []

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        page = await listing(limit="2", **({"cursor": cursor} if cursor else {}))
        assert len(page["items"]) <= 2
        seen += [b["id"] for b in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert cursor is None and len(seen) == len(set(seen)) and set(seen) == everything

    for params, field in (({"status": "NOPE"}, "status"), ({"limit": "x"}, "limit")):
        response = await api.get("/api/bookings/my", params=params, headers=token("ann"))
        problem = await _error(response, 422, "ValidationError")
        assert field in problem["details"], problem


# -- the queue -----------------------------------------------------------------------------


async def test_join_queue_answers_201_then_200_and_position_answers_the_entry(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=1)
    await _hold(api, token, slot["id"], "holder")
    path = f"/api/slots/{slot['id']}/queue"
    joined = await _json(await api.post(path, headers=token("w1")), 201)
    _check_entry(joined)
    assert (joined["status"], joined["position"], joined["totalInQueue"]) == ("WAITING", 1, 1)
    assert (joined["userId"], joined["slotId"]) == ("w1", slot["id"])
    again = await _json(await api.post(path, headers=token("w1")), 200)
    assert (again["status"], again["position"]) == ("WAITING", 1)
    second = await _json(await api.post(path, headers=token("w2")), 201)
    assert (second["position"], second["totalInQueue"]) == (2, 2)
    position = await _position(api, token, slot["id"], "w2")
    assert (position["status"], position["position"], position["totalInQueue"]) == (
        "WAITING",
        2,
        2,
    )
    assert isinstance(position["estimatedWaitSeconds"], int)
    assert isinstance(position["estimatedWaitTime"], str) and position["estimatedWaitTime"]
    assert (await _get_slot(api, token, slot["id"]))["queueLength"] == 2


async def test_leave_queue_answers_204_and_leaving_an_offer_passes_it_on(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=1)
    booking = await _confirmed(api, token, slot["id"], "holder")
    path = f"/api/slots/{slot['id']}/queue"
    for user in ("w1", "w2", "w3"):
        await _json(await api.post(path, headers=token(user)), 201)

    left = await api.delete(path, headers=token("w1"))
    assert left.status == 204 and await left.read() == b""
    # A user who leaves has no entry any more.
    await _error(await api.get(f"{path}/position", headers=token("w1")), 404, "NotFound")
    await _error(await api.delete(path, headers=token("w1")), 404, "NotFound")
    assert (await _position(api, token, slot["id"], "w2"))["position"] == 1

    await _json(
        await api.post(f"/api/bookings/{booking['id']}/cancel", headers=token("holder")), 200
    )
    offer = await _position(api, token, slot["id"], "w2")
    assert offer["status"] == "NOTIFIED" and offer["bookingId"] and offer["notifiedAt"]
    rejoin = await _json(await api.post(path, headers=token("w2")), 200)
    assert (rejoin["status"], rejoin["bookingId"]) == ("NOTIFIED", offer["bookingId"])
    view = await _get_slot(api, token, slot["id"])
    assert (view["heldCount"], view["queueLength"]) == (1, 1)

    # Leaving while NOTIFIED gives the hold up and the next user is offered.
    assert (await api.delete(path, headers=token("w2"))).status == 204
    assert (await _booking(api, token, offer["bookingId"], "w2"))["status"] == "EXPIRED"
    await _error(await api.get(f"{path}/position", headers=token("w2")), 404, "NotFound")
    next_offer = await _position(api, token, slot["id"], "w3")
    assert next_offer["status"] == "NOTIFIED" and next_offer["bookingId"]
    await _json(
        await api.post(f"/api/bookings/{next_offer['bookingId']}/confirm", headers=token("w3")),
        200,
    )
    converted = await _position(api, token, slot["id"], "w3")
    assert (converted["status"], converted["bookingId"]) == ("CONVERTED", next_offer["bookingId"])


async def test_join_queue_refusals_404_and_409(api: Client, token: Token) -> None:
    free = await _create(api, token, capacity=1)
    for unknown in (_unknown_like(free["id"], "s"), "nope"):
        for method, suffix in (("POST", ""), ("DELETE", ""), ("GET", "/position")):
            response = await api.request(
                method, f"/api/slots/{unknown}/queue{suffix}", headers=token("ann")
            )
            await _error(response, 404, "NotFound")
    joined = await api.post(f"/api/slots/{free['id']}/queue", headers=token("ann"))
    await _error(joined, 409, "SlotAvailable")
    await _hold(api, token, free["id"], "ann")
    held = await api.post(f"/api/slots/{free['id']}/queue", headers=token("ann"))
    await _error(held, 409, "AlreadyHeld")
    blocked = await _create(api, token, blocked=True)
    response = await api.post(f"/api/slots/{blocked['id']}/queue", headers=token("ann"))
    await _error(response, 409, "SlotNotReservable")
    closed = await _create(api, token, capacity=1, domain="noqueue")
    await _hold(api, token, closed["id"], "bob")
    response = await api.post(f"/api/slots/{closed['id']}/queue", headers=token("ann"))
    await _error(response, 409, "QueueDisabled")


async def test_position_answers_the_latest_entry_whatever_its_status(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=1, domain="short")
    await _hold(api, token, slot["id"], "holder")
    assert "queue" in await _reserve(api, token, slot["id"], "w1", status=202)
    # The holder's hold lapses, w1 is offered a hold, which lapses too.
    await _poll(
        api,
        f"/api/slots/{slot['id']}",
        token("ann"),
        lambda s: s["heldCount"] == 0 and s["queueLength"] == 0,
    )
    entry = await _position(api, token, slot["id"], "w1")
    assert (entry["status"], entry["position"]) == ("EXPIRED", None)
    assert entry["bookingId"] and entry["notifiedAt"]
    assert (await _booking(api, token, entry["bookingId"], "w1"))["status"] == "EXPIRED"


async def test_another_users_queue_entry_is_404_for_a_user_who_never_joined(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token, capacity=1)
    await _hold(api, token, slot["id"], "holder")
    assert "queue" in await _reserve(api, token, slot["id"], "w1", status=202)
    path = f"/api/slots/{slot['id']}/queue"
    await _error(await api.get(f"{path}/position", headers=token("eve")), 404, "NotFound")
    await _error(await api.delete(path, headers=token("eve")), 404, "NotFound")
    # The holder holds the slot but never queued.
    await _error(await api.get(f"{path}/position", headers=token("holder")), 404, "NotFound")
    assert (await _position(api, token, slot["id"], "w1"))["position"] == 1


# -- bad requests ------------------------------------------------------------------------


async def test_malformed_json_and_a_wrong_content_type_are_400(api: Client, token: Token) -> None:
    slot = await _create(api, token, capacity=1)
    held = await _hold(api, token, slot["id"], "ann")
    body_routes = [
        ("POST", "/api/admin/slots", _admin(token), _slot_body()),
        ("PUT", f"/api/admin/slots/{slot['id']}", _admin(token), {"capacity": 3}),
        ("POST", "/api/bookings/reserve", token("ann"), {"slotId": slot["id"]}),
        ("POST", f"/api/bookings/{held['id']}/confirm", token("ann"), {}),
        ("POST", f"/api/bookings/{held['id']}/cancel", token("ann"), {"reason": "x"}),
        ("POST", f"/api/slots/{slot['id']}/queue", token("bob"), {}),
    ]
    for method, path, headers, good in body_routes:
        for data in (b"{not json", b"{", b'{"', b"\xff\xfe"):
            malformed = await api.request(
                method, path, data=data, headers={**headers, "Content-Type": "application/json"}
            )
            assert (await _error(malformed, 400, "BadRequest"))["message"], (method, path)
        wrong_type = await api.request(
            method,
            path,
            data=json.dumps(good).encode(),
            headers={**headers, "Content-Type": "text/plain"},
        )
        await _error(wrong_type, 400, "BadRequest")
    empty = await api.post(
        "/api/bookings/reserve",
        data=b"",
        headers={**token("ann"), "Content-Type": "application/json"},
    )
    await _error(empty, 400, "BadRequest")
    # Nothing changed.
    view = await _get_slot(api, token, slot["id"])
    assert (view["capacity"], view["heldCount"]) == (1, 1)
    assert (await _booking(api, token, held["id"], "ann"))["status"] == "RESERVED"


async def test_truncated_json_is_400_even_when_its_start_breaks_the_schema(
    api: Client, token: Token
) -> None:
    """Malformed JSON is 400 whatever the part that did parse says; 422 is for valid JSON."""
    slot = await _create(api, token, capacity=1)
    for data in (b'{"bogus": 1', b'{"slotId": 5,', b"[1, 2"):
        response = await api.post(
            "/api/bookings/reserve",
            data=data,
            headers={**token("ann"), "Content-Type": "application/json"},
        )
        await _error(response, 400, "BadRequest")
    truncated = json.dumps(_slot_body(capacity=0)).encode()[:-1]
    response = await api.post(
        "/api/admin/slots",
        data=truncated,
        headers={**_admin(token), "Content-Type": "application/json"},
    )
    await _error(response, 400, "BadRequest")
    assert (await _get_slot(api, token, slot["id"]))["heldCount"] == 0


async def test_a_body_over_the_limit_is_413(api: Client, token: Token) -> None:
    slot = await _create(api, token)
    big = {"slotId": "x" * (BODY_BYTES_MAX + 1)}
    response = await api.post("/api/bookings/reserve", json=big, headers=token("ann"))
    await _error(response, 413, "PayloadTooLarge")
    metadata = _slot_body(metadata={"blob": "y" * (BODY_BYTES_MAX + 1)})
    response = await api.post("/api/admin/slots", json=metadata, headers=_admin(token))
    await _error(response, 413, "PayloadTooLarge")

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"slotId": "'
        for _ in range(4):
            yield b"z" * (BODY_BYTES_MAX // 2)
        yield b'"}'

    chunked = await api.post(
        "/api/bookings/reserve",
        data=chunks(),
        headers={**token("ann"), "Content-Type": "application/json"},
    )
    await _error(chunked, 413, "PayloadTooLarge")
    assert (await _get_slot(api, token, slot["id"]))["heldCount"] == 0


async def test_every_answer_carries_the_request_id_sent_or_a_generated_one(
    api: Client, token: Token
) -> None:
    slot = await _create(api, token)
    requests: list[tuple[str, str, dict[str, str], Any]] = [
        ("GET", f"/api/slots/{slot['id']}", token("ann"), None),  # 200
        ("POST", "/api/bookings/reserve", token("ann"), {"slotId": slot["id"]}),  # 201
        ("GET", "/api/slots/nope", token("ann"), None),  # 404
        ("GET", "/api/slots", {}, None),  # 401
        ("POST", "/api/admin/slots", token("ann"), _slot_body()),  # 403
        ("GET", "/api/slots", token("ann"), {"limit": "x"}),  # 422 (query)
        ("DELETE", f"/api/admin/slots/{_unknown_like(slot['id'], 's')}", _admin(token), None),
    ]
    generated: set[str] = set()
    for n, (method, path, headers, body) in enumerate(requests):
        params = body if method == "GET" else None
        payload = None if method == "GET" else body
        sent = f"trace-{n}-{uuid.uuid4().hex[:6]}"
        echoed = await api.request(
            method, path, json=payload, params=params, headers={**headers, "X-Request-Id": sent}
        )
        assert echoed.headers.get("X-Request-Id") == sent, (method, path, echoed.status)
        plain = await api.request(method, path, json=payload, params=params, headers=headers)
        request_id = plain.headers.get("X-Request-Id")
        assert request_id and request_id not in generated, (method, path, plain.status)
        generated.add(request_id)
    deleted = await api.delete(
        f"/api/admin/slots/{(await _create(api, token))['id']}",
        headers={**_admin(token), "X-Request-Id": "trace-204"},
    )
    assert deleted.status == 204 and deleted.headers.get("X-Request-Id") == "trace-204"


# -- authentication and roles ------------------------------------------------------------


def _bad_authorization(kind: str) -> dict[str, str]:
    """An Authorization header that must get 401; its claims would make the caller an admin."""
    if kind == "missing":
        return {}
    if kind == "not bearer":
        return {"Authorization": "Basic cm9vdDpyb290"}
    if kind == "garbage":
        return {"Authorization": "Bearer not.a.jwt"}
    if kind == "alg none":
        unsigned = f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(_claims())}."
        return {"Authorization": f"Bearer {unsigned}"}
    claims = {
        "expired": _claims(exp=int(time.time()) - 60),
        "wrong secret": _claims(),
        "no exp": {"sub": "root", "role": "admin"},
        "no sub": {"role": "admin", "exp": int(time.time()) + 3600},
    }[kind]
    secret = OTHER_SECRET if kind == "wrong secret" else SECRET
    return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}


def _routes(slot_id: str, booking_id: str) -> list[tuple[str, str, Any]]:
    """Every /api route of docs/api.md but the live ones, with a body that would succeed."""
    return [
        ("POST", "/api/admin/slots", _slot_body()),
        ("GET", "/api/slots", None),
        ("GET", f"/api/slots/{slot_id}", None),
        ("PUT", f"/api/admin/slots/{slot_id}", {"capacity": 5}),
        ("DELETE", f"/api/admin/slots/{slot_id}", None),
        ("DELETE", f"/api/admin/slots/{slot_id}?force=true", None),
        ("POST", "/api/bookings/reserve", {"slotId": slot_id}),
        ("POST", f"/api/bookings/{booking_id}/confirm", None),
        ("POST", f"/api/bookings/{booking_id}/cancel", {"reason": "x"}),
        ("POST", f"/api/bookings/{booking_id}/extend", None),
        ("POST", f"/api/bookings/{booking_id}/release", None),
        ("GET", "/api/bookings/my", None),
        ("GET", f"/api/bookings/{booking_id}", None),
        ("POST", f"/api/slots/{slot_id}/queue", None),
        ("DELETE", f"/api/slots/{slot_id}/queue", None),
        ("GET", f"/api/slots/{slot_id}/queue/position", None),
    ]


@pytest.mark.parametrize(
    "kind",
    ["missing", "not bearer", "garbage", "alg none", "expired", "wrong secret", "no exp", "no sub"],
)
async def test_every_route_refuses_a_missing_or_bad_token_with_401(
    api: Client, token: Token, kind: str
) -> None:
    slot = await _create(api, token, capacity=2)
    held = await _hold(api, token, slot["id"], "root")
    before = await _get_slot(api, token, slot["id"])
    headers = _bad_authorization(kind)
    for method, path, body in _routes(slot["id"], held["id"]):
        response = await api.request(method, path, json=body, headers=headers)
        await _error(response, 401, "Unauthorized")
    # Nothing happened.
    assert await _get_slot(api, token, slot["id"]) == before
    assert await _booking(api, token, held["id"], "root") == held
    listing = await _json(await api.get("/api/slots", headers=token("ann")), 200)
    assert [s["id"] for s in listing["items"]] == [slot["id"]]


async def test_admin_routes_refuse_users_and_services_with_403(api: Client, token: Token) -> None:
    slot = await _create(api, token, capacity=2)
    for role in ("user", "service"):
        headers = token("mallory", role)
        admin_routes = [
            ("POST", "/api/admin/slots", _slot_body()),
            ("PUT", f"/api/admin/slots/{slot['id']}", {"capacity": 5}),
            ("DELETE", f"/api/admin/slots/{slot['id']}", None),
            ("DELETE", f"/api/admin/slots/{slot['id']}?force=true", None),
        ]
        for method, path, body in admin_routes:
            response = await api.request(method, path, json=body, headers=headers)
            await _error(response, 403, "Forbidden")
    assert await _get_slot(api, token, slot["id"]) == slot
    listing = await _json(await api.get("/api/slots", headers=token("ann")), 200)
    assert [s["id"] for s in listing["items"]] == [slot["id"]]


async def test_an_rs256_gateway_accepts_its_key_and_refuses_hs256_signed_with_the_public_key(
    host: OwnedInProcessHost, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65_537, key_size=2_048)
    other_key = rsa.generate_private_key(public_exponent=65_537, key_size=2_048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "rsa.pem").write_bytes(pem)
    verifier = Verifier(AuthSettings(public_key_file=tmp_path / "rsa.pem"))
    app = create_app(EngineClient(host), verifier)

    def rs256(signing_key: rsa.RSAPrivateKey = key, **claims: Any) -> dict[str, str]:
        signed = jwt.encode(_claims(**claims), signing_key, algorithm="RS256")
        return {"Authorization": f"Bearer {signed}"}

    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT'})}.{_segment(_claims())}"
    forged = (
        f"{signing_input}.{_b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"
    )
    refused = [
        {"Authorization": f"Bearer {forged}"},
        {"Authorization": f"Bearer {issue_token(SECRET, 'root', 'admin', 3600)}"},
        rs256(other_key),
        rs256(exp=int(time.time()) - 60),
    ]
    async with TestClient(TestServer(app)) as client:
        created = await _json(
            await client.post("/api/admin/slots", json=_slot_body(), headers=rs256()), 201
        )
        await _json(await client.get("/api/slots", headers=rs256(sub="ann", role="user")), 200)
        for headers in refused:
            await _error(
                await client.post("/api/admin/slots", json=_slot_body(), headers=headers),
                401,
                "Unauthorized",
            )
            await _error(
                await client.get(f"/api/slots/{created['id']}", headers=headers),
                401,
                "Unauthorized",
            )
        listing = await _json(await client.get("/api/slots", headers=rs256()), 200)
        assert [s["id"] for s in listing["items"]] == [created["id"]]


async def test_a_service_acts_for_the_user_named_in_the_body(api: Client, token: Token) -> None:
    service = token("billing", "service")
    slot = await _create(api, token, capacity=1)
    reserved = await _json(
        await api.post(
            "/api/bookings/reserve", json={"slotId": slot["id"], "userId": "carol"}, headers=service
        ),
        201,
    )
    booking = reserved["booking"]
    assert booking["userId"] == "carol"
    confirmed = await _json(
        await api.post(
            f"/api/bookings/{booking['id']}/confirm", json={"userId": "carol"}, headers=service
        ),
        200,
    )
    assert (confirmed["status"], confirmed["userId"]) == ("CONFIRMED", "carol")
    # Carol sees it as her own; the service reads it for her.
    assert (await _booking(api, token, booking["id"], "carol"))["status"] == "CONFIRMED"
    read = await api.get(
        f"/api/bookings/{booking['id']}", params={"userId": "carol"}, headers=service
    )
    assert (await _json(read, 200))["id"] == booking["id"]
    mine = await api.get("/api/bookings/my", params={"userId": "carol"}, headers=service)
    assert [b["id"] for b in (await _json(mine, 200))["items"]] == [booking["id"]]
    # Acting for someone else, the service does not see carol's booking.
    other = await api.get(
        f"/api/bookings/{booking['id']}", params={"userId": "dave"}, headers=service
    )
    await _error(other, 404, "NotFound")

    path = f"/api/slots/{slot['id']}/queue"
    joined = await _json(await api.post(path, json={"userId": "dave"}, headers=service), 201)
    assert (joined["userId"], joined["position"]) == ("dave", 1)
    position = await api.get(f"{path}/position", params={"userId": "dave"}, headers=service)
    assert (await _json(position, 200))["userId"] == "dave"
    assert (await _position(api, token, slot["id"], "dave"))["position"] == 1
    left = await api.delete(path, params={"userId": "dave"}, headers=service)
    assert left.status == 204, await left.text()

    cancelled = await _json(
        await api.post(
            f"/api/bookings/{booking['id']}/cancel",
            json={"userId": "carol", "reason": "changed plans"},
            headers=service,
        ),
        200,
    )
    assert (cancelled["status"], cancelled["userId"]) == ("CANCELLED", "carol")
    # A user cannot act for another user.
    response = await api.post(
        "/api/bookings/reserve",
        json={"slotId": slot["id"], "userId": "carol"},
        headers=token("eve"),
    )
    await _error(response, 403, "Forbidden")


# -- rate limits -----------------------------------------------------------------------------

# docs/api.md's defaults: requests per minute, per user and endpoint.
LIMITS = {"reserve": 10, "queue_join": 20, "cancel": 5, "position": 100}
# The limits' window in the test below: a day, so that no budget comes back while
# its requests run, however slow the machine (a minute's window let 101 position
# requests on a loaded machine earn a request back: 404 instead of 429).
TEST_WINDOW_S = 86_400


def test_the_default_limits_are_the_documented_ones() -> None:
    defaults = RateLimits()
    assert defaults.period_s == 60
    assert {endpoint: defaults.limit(endpoint) for endpoint in LIMITS} == LIMITS


@pytest.mark.parametrize(
    "rate_limits", [RateLimits(period_s=TEST_WINDOW_S, **LIMITS)], ids=["day-window"]
)
@pytest.mark.parametrize("endpoint", list(LIMITS))
async def test_past_its_limit_an_endpoint_answers_429_with_retry_after(
    api: Client, token: Token, endpoint: str, rate_limits: RateLimits
) -> None:
    slot = await _create(api, token, capacity=1)
    await _hold(api, token, slot["id"], "holder")
    missing_booking = _unknown_like(slot["id"], "b")
    requests: dict[str, Callable[[str], Any]] = {
        "reserve": lambda user: api.post(
            "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token(user)
        ),
        "queue_join": lambda user: api.post(f"/api/slots/{slot['id']}/queue", headers=token(user)),
        # Refused requests count too: these are 404s.
        "cancel": lambda user: api.post(
            f"/api/bookings/{missing_booking}/cancel", headers=token(user)
        ),
        "position": lambda user: api.get(
            f"/api/slots/{slot['id']}/queue/position", headers=token(user)
        ),
    }
    send = requests[endpoint]
    limit = LIMITS[endpoint]
    statuses = [(await send("eve")).status for _ in range(limit)]
    assert 429 not in statuses, statuses
    refused = await send("eve")
    body = await _error(refused, 429, "RateLimited")
    # Seconds until the next request is allowed: at most one emission interval.
    assert 1 <= body["retryAfter"] <= -(-rate_limits.period_s // limit), body
    # Another user has a budget of their own.
    assert (await send("zed")).status != 429


async def test_refused_requests_count_against_the_reserve_limit(api: Client, token: Token) -> None:
    """docs/api.md: every authenticated request to the endpoint counts, invalid bodies included."""
    slot = await _create(api, token, capacity=1)
    headers = {**token("eve"), "Content-Type": "application/json"}
    for data in [b"{not json"] * 5 + [b'{"slotId": ""}'] * 5:
        response = await api.post("/api/bookings/reserve", data=data, headers=headers)
        assert response.status in (400, 422), await response.text()
    response = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("eve")
    )
    await _error(response, 429, "RateLimited")

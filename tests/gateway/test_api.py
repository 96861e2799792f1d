"""The HTTP API of docs/api.md over durable in-process shards (real PostgreSQL and Redis)."""

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestClient

from engine.core.routing import shard_of_resource
from tests.gateway.conftest import SHARDS, Token

Client = TestClient[Any, Any]


def _window(days: int = 1, hours: int = 1) -> tuple[str, str]:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)
    return start.isoformat(), (start + timedelta(hours=hours)).isoformat()


async def _slot(api: Client, token: Token, capacity: int = 1, **fields: Any) -> dict[str, Any]:
    start, end = _window()
    body = {"resourceId": f"room-{id(fields)}-{capacity}", "startTime": start, "endTime": end,
            "capacity": capacity, **fields}  # fmt: skip
    response = await api.post("/api/admin/slots", json=body, headers=token("root", "admin"))
    assert response.status == 201, await response.text()
    slot: dict[str, Any] = await response.json()
    return slot


async def test_reserve_confirm_cancel_and_the_next_queued_user_is_offered(
    api: Client, token: Token
) -> None:
    slot = await _slot(api, token, capacity=1, metadata={"floor": 2})
    assert slot["status"] == "AVAILABLE" and slot["available"] == 1
    assert slot["metadata"] == {"floor": 2} and slot["startTime"].endswith("Z")

    held = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("ann")
    )
    assert held.status == 201
    booking = (await held.json())["booking"]
    assert booking["status"] == "RESERVED" and booking["userId"] == "ann"
    again = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("ann")
    )
    assert again.status == 200 and (await again.json())["booking"]["id"] == booking["id"]

    queued = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("bob")
    )
    assert queued.status == 202
    entry = (await queued.json())["queue"]
    assert entry["status"] == "WAITING" and entry["position"] == 1
    assert entry["slotDetails"]["heldCount"] == 1

    confirmed = await api.post(f"/api/bookings/{booking['id']}/confirm", headers=token("ann"))
    assert confirmed.status == 200 and (await confirmed.json())["status"] == "CONFIRMED"
    cancelled = await api.post(
        f"/api/bookings/{booking['id']}/cancel",
        json={"reason": "plans changed"},
        headers=token("ann"),
    )
    body = await cancelled.json()
    assert cancelled.status == 200 and body["status"] == "CANCELLED"
    assert body["refundPercentage"] == 100

    position = await api.get(f"/api/slots/{slot['id']}/queue/position", headers=token("bob"))
    offer = await position.json()
    assert position.status == 200 and offer["status"] == "NOTIFIED" and offer["bookingId"]
    claimed = await api.post(f"/api/bookings/{offer['bookingId']}/confirm", headers=token("bob"))
    assert claimed.status == 200 and (await claimed.json())["status"] == "CONFIRMED"

    mine = await api.get("/api/bookings/my", headers=token("ann"))
    assert [b["status"] for b in (await mine.json())["items"]] == ["CANCELLED"]


async def test_errors_have_the_contract_shape_and_status(api: Client, token: Token) -> None:
    slot = await _slot(api, token, capacity=1)
    missing = await api.get(f"/api/slots/{slot['id']}")
    assert missing.status == 401 and (await missing.json())["error"] == "Unauthorized"
    forbidden = await api.post("/api/admin/slots", json={}, headers=token("ann"))
    assert forbidden.status == 403 and (await forbidden.json())["error"] == "Forbidden"
    malformed = await api.post(
        "/api/bookings/reserve",
        data=b"{not json",
        headers={**token("ann"), "Content-Type": "application/json"},
    )
    assert malformed.status == 400 and (await malformed.json())["error"] == "BadRequest"
    start, end = _window()
    invalid = await api.post(
        "/api/admin/slots",
        json={"resourceId": "r", "startTime": start, "endTime": end, "capacity": 0},
        headers=token("root", "admin"),
    )
    problem = await invalid.json()
    assert invalid.status == 422 and problem["error"] == "ValidationError"
    assert "capacity" in problem["details"]
    naive = await api.post(
        "/api/admin/slots",
        json={"resourceId": "r", "startTime": "2030-01-01T10:00:00", "endTime": end, "capacity": 1},
        headers=token("root", "admin"),
    )
    assert naive.status == 422 and "startTime" in (await naive.json())["details"]
    too_big = await api.post(
        "/api/bookings/reserve", json={"slotId": "x" * 40_000}, headers=token("ann")
    )
    assert too_big.status == 413
    unknown = await api.get("/api/slots/nope", headers=token("ann"))
    assert unknown.status == 404 and (await unknown.json())["error"] == "NotFound"

    held = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("ann")
    )
    booking_id = (await held.json())["booking"]["id"]
    # Another user's booking answers exactly like a missing one, on every booking route.
    for method, path in (
        ("GET", f"/api/bookings/{booking_id}"),
        ("POST", f"/api/bookings/{booking_id}/confirm"),
        ("POST", f"/api/bookings/{booking_id}/cancel"),
    ):
        other = await api.request(method, path, headers=token("mallory"))
        assert other.status == 404, (method, path)
    echoed = await api.get(
        f"/api/slots/{slot['id']}", headers={**token("ann"), "X-Request-Id": "trace-1"}
    )
    assert echoed.headers["X-Request-Id"] == "trace-1"
    assert echoed.headers["X-Content-Type-Options"] == "nosniff"
    generated = await api.get(f"/api/slots/{slot['id']}", headers=token("ann"))
    assert len(generated.headers["X-Request-Id"]) >= 16


async def test_an_idempotency_key_replays_the_first_answer_and_refuses_another_body(
    api: Client, token: Token
) -> None:
    slot = await _slot(api, token, capacity=2, resourceId="idem-room")
    # Another slot on the same shard: a key is remembered by the shard it was used on.
    shard = shard_of_resource("idem-room", SHARDS)
    neighbour = next(
        f"idem-other-{n}"
        for n in range(100)
        if shard_of_resource(f"idem-other-{n}", SHARDS) == shard
    )
    other = await _slot(api, token, capacity=2, resourceId=neighbour)
    headers = {**token("ann"), "Idempotency-Key": "k-1"}
    first = await api.post("/api/bookings/reserve", json={"slotId": slot["id"]}, headers=headers)
    replay = await api.post("/api/bookings/reserve", json={"slotId": slot["id"]}, headers=headers)
    assert first.status == 201 and replay.status == 201
    assert await first.json() == await replay.json()
    reused = await api.post("/api/bookings/reserve", json={"slotId": other["id"]}, headers=headers)
    assert reused.status == 409 and (await reused.json())["error"] == "IdempotencyKeyReused"


async def test_listing_slots_pages_across_shards(api: Client, token: Token) -> None:
    created = [await _slot(api, token, capacity=1, resourceId=f"list-room-{n}") for n in range(5)]
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        url = "/api/slots?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (await api.get(url, headers=token("ann"))).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(slot["id"] for slot in created)
    bad = await api.get("/api/slots?status=NOPE&limit=x", headers=token("ann"))
    assert bad.status == 422 and set((await bad.json())["details"]) == {"status", "limit"}


async def test_a_user_past_the_reserve_limit_gets_429_with_retry_after(
    api: Client, token: Token
) -> None:
    slot = await _slot(api, token, capacity=1, resourceId="limited-room")
    answers = [
        await api.post("/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("eve"))
        for _ in range(11)
    ]
    assert [a.status for a in answers[:10]] == [201] + [200] * 9
    refused = answers[10]
    body = await refused.json()
    assert refused.status == 429 and body["error"] == "RateLimited"
    assert int(refused.headers["Retry-After"]) == body["retryAfter"] >= 1
    # Another user, or another endpoint, has a budget of its own.
    other = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("zed")
    )
    assert other.status == 202
    position = await api.get(f"/api/slots/{slot['id']}/queue/position", headers=token("eve"))
    assert position.status == 404  # eve holds the slot; she never queued

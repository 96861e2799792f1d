"""``GET /api/bookings/{bookingId}/calendar.ics`` over durable in-process shards (real
PostgreSQL and Redis): the owner's CONFIRMED booking as an iCalendar file."""

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import icalendar
import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine.shell.coalescer import EngineClient
from engine.shell.inproc import OwnedInProcessHost
from gateway.app import create_app
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from tests.gateway.conftest import SECRET, Token

Client = TestClient[Any, Any]


@pytest.fixture
async def api(host: OwnedInProcessHost) -> AsyncIterator[Client]:
    """The gateway, told the default domain's entity name as ``slotengine serve`` tells it."""
    verifier = Verifier(AuthSettings(secret=SECRET))
    app = create_app(EngineClient(host), verifier, entities={"default": "Room"})
    async with TestClient(TestServer(app)) as client:
        yield client


async def a_hold(api: Client, token: Token, user: str = "ann") -> tuple[dict[str, Any], str]:
    """A new slot tomorrow at a whole second, and ``user``'s hold on it: (slot, booking id)."""
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    body = {
        "resourceId": "room-12",
        "startTime": start.isoformat(),
        "endTime": (start + timedelta(minutes=90)).isoformat(),
        "capacity": 2,
    }
    created = await api.post("/api/admin/slots", json=body, headers=token("root", "admin"))
    assert created.status == 201, await created.text()
    slot: dict[str, Any] = await created.json()
    held = await api.post("/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token(user))
    assert held.status == 201, await held.text()
    return slot, (await held.json())["booking"]["id"]


async def test_the_owner_of_a_confirmed_booking_gets_its_calendar_file(
    api: Client, token: Token
) -> None:
    slot, booking_id = await a_hold(api, token)
    confirmed = await api.post(f"/api/bookings/{booking_id}/confirm", headers=token("ann"))
    assert confirmed.status == 200
    version = (await confirmed.json())["version"]

    response = await api.get(f"/api/bookings/{booking_id}/calendar.ics", headers=token("ann"))
    assert response.status == 200, await response.text()
    assert response.content_type == "text/calendar"
    assert response.headers["Content-Disposition"] == 'attachment; filename="booking.ics"'
    assert response.headers["Cache-Control"] == "no-store"
    calendar = icalendar.Calendar.from_ical(await response.read())
    assert str(calendar["METHOD"]) == "PUBLISH"
    (event,) = calendar.walk("VEVENT")
    assert str(event["UID"]) == f"{booking_id}@slotengine"
    start = datetime.fromisoformat(slot["startTime"].replace("Z", "+00:00"))
    assert event.decoded("DTSTART") == start
    assert event.decoded("DTEND") == start + timedelta(minutes=90)
    assert str(event["SUMMARY"]) == "Room room-12"
    assert str(event["STATUS"]) == "CONFIRMED"
    assert event.decoded("SEQUENCE") == version

    # A service acting for the owner gets it too.
    acting = await api.get(
        f"/api/bookings/{booking_id}/calendar.ics",
        params={"userId": "ann"},
        headers=token("billing", "service"),
    )
    assert acting.status == 200
    assert await acting.read() != b""


async def test_another_users_booking_is_not_found(api: Client, token: Token) -> None:
    _, booking_id = await a_hold(api, token)
    await api.post(f"/api/bookings/{booking_id}/confirm", headers=token("ann"))
    for headers in (token("bob"), token("root", "admin")):
        response = await api.get(f"/api/bookings/{booking_id}/calendar.ics", headers=headers)
        assert response.status == 404
        assert (await response.json())["error"] == "NotFound"
    unknown = await api.get("/api/bookings/no-such-booking/calendar.ics", headers=token("ann"))
    assert unknown.status == 404
    assert (await unknown.json())["error"] == "NotFound"


async def test_a_booking_that_is_not_confirmed_has_no_calendar_file(
    api: Client, token: Token
) -> None:
    _, booking_id = await a_hold(api, token)
    held = await api.get(f"/api/bookings/{booking_id}/calendar.ics", headers=token("ann"))
    assert held.status == 409
    body = await held.json()
    assert body["error"] == "Conflict"
    assert "RESERVED" in body["message"]

    await api.post(f"/api/bookings/{booking_id}/confirm", headers=token("ann"))
    cancelled = await api.post(f"/api/bookings/{booking_id}/cancel", headers=token("ann"))
    assert cancelled.status == 200
    after = await api.get(f"/api/bookings/{booking_id}/calendar.ics", headers=token("ann"))
    assert after.status == 409
    assert "CANCELLED" in (await after.json())["message"]


async def test_a_token_is_required(api: Client) -> None:
    response = await api.get("/api/bookings/anything/calendar.ics")
    assert response.status == 401

"""A thousand users press "reserve" on one slot of capacity 100, at once, over HTTP."""

import asyncio
import collections
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestClient

from tests.gateway.conftest import Token

USERS = 1_000
CAPACITY = 100


async def test_a_thousand_concurrent_reserves_get_exactly_their_places(
    api: TestClient[Any, Any], token: Token
) -> None:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    created = await api.post(
        "/api/admin/slots",
        json={
            "resourceId": "storm-room",
            "startTime": start.isoformat(),
            "endTime": (start + timedelta(hours=1)).isoformat(),
            "capacity": CAPACITY,
        },
        headers=token("root", "admin"),
    )
    slot_id = (await created.json())["id"]
    headers = {f"user-{n}": token(f"user-{n}") for n in range(USERS)}

    async def reserve(user: str) -> tuple[int, Any]:
        response = await api.post(
            "/api/bookings/reserve", json={"slotId": slot_id}, headers=headers[user]
        )
        return response.status, await response.json()

    answers = await asyncio.gather(*(reserve(user) for user in headers))

    statuses = collections.Counter(status for status, _ in answers)
    assert statuses == {201: CAPACITY, 202: CAPACITY, 409: USERS - 2 * CAPACITY}
    assert {body["error"] for status, body in answers if status == 409} == {"QueueFull"}
    holders = [body["booking"]["userId"] for status, body in answers if status == 201]
    assert len(set(holders)) == CAPACITY
    positions = sorted(body["queue"]["position"] for status, body in answers if status == 202)
    assert positions == list(range(1, CAPACITY + 1))

    slot = await (await api.get(f"/api/slots/{slot_id}", headers=token("ann"))).json()
    assert (slot["heldCount"], slot["available"], slot["queueLength"]) == (CAPACITY, 0, CAPACITY)
    assert slot["status"] == "RESERVED"

"""/openapi.json describes every API route, from the schemas that validate requests."""

import re
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.openapi import build_document
from tests.gateway.conftest import Token


def _template(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


async def test_the_document_lists_every_api_route_and_docs_render_it(
    api: TestClient[Any, Any],
) -> None:
    response = await api.get("/openapi.json")
    document = await response.json()
    assert response.status == 200 and document["openapi"] == "3.1.0"
    served = {
        (route.method.lower(), _template(route.resource.canonical))
        for route in api.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith(("/api/", "/ws/"))
        and route.method != "HEAD"
    }
    described = {
        (method, _template(path))
        for path, methods in document["paths"].items()
        for method in methods
    }
    assert served == described
    reserve = document["paths"]["/api/bookings/reserve"]["post"]
    assert set(reserve["responses"]) >= {"200", "201", "202", "409", "422"}
    schema = reserve["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert document["components"]["schemas"][schema.rsplit("/", 1)[1]]["required"] == ["slotId"]
    events = document["paths"]["/api/slots/{slotId}/queue/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert set(events["x-messages"]) == {"queue.position", "queue.offer", "slot.updated"}
    bookings = document["paths"]["/ws/bookings"]["get"]
    assert set(bookings["x-messages"]) == {"booking.updated"} and "101" in bookings["responses"]
    page = await api.get("/docs")
    assert page.status == 200 and "/api/bookings/reserve" in await page.text()


def test_the_document_is_the_same_every_time() -> None:
    assert build_document() == build_document()


async def test_a_refused_method_names_the_methods_the_route_takes(
    api: TestClient[Any, Any], token: Token
) -> None:
    for method, path, allowed in [
        ("TRACE", "/api/slots", "GET, HEAD"),
        ("OPTIONS", "/api/admin/slots/some-slot", "DELETE, PUT"),
        ("PATCH", "/api/bookings/some-booking", "GET, HEAD"),
        # A route's own name is never taken for a booking id, as in OpenAPI.
        ("GET", "/api/bookings/reserve", "POST"),
    ]:
        response = await api.request(method, path, headers=token("ann"))
        assert response.status == 405, (method, path)
        assert response.headers["Allow"] == allowed
        assert (await response.json())["error"] == "MethodNotAllowed"

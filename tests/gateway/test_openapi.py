"""/openapi.json describes every API route, and exactly what each one accepts and answers."""

import re
from typing import Any

import jsonschema_rs
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.explorer import load_assets, render_docs
from gateway.openapi import build_document
from tests.gateway.conftest import SECRET, Token
from tests.gateway.test_api import _slot

Client = TestClient[Any, Any]


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


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> jsonschema_rs.Validator:
    """A validator of ``schema``, whose references point into ``document``."""
    return jsonschema_rs.validator_for(
        {**schema, "components": document["components"]}, validate_formats=True
    )


def _answer_schema(document: dict[str, Any], path: str, method: str, status: int) -> Any:
    return document["paths"][path][method]["responses"][str(status)]["content"]["application/json"][
        "schema"
    ]


def _query_schema(document: dict[str, Any], path: str, method: str, name: str) -> Any:
    (parameter,) = [p for p in document["paths"][path][method]["parameters"] if p["name"] == name]
    return parameter["schema"]


def test_every_link_leads_to_an_operation_and_sets_only_its_parameters() -> None:
    document = build_document()
    operations = {
        operation["operationId"]: operation
        for methods in document["paths"].values()
        for operation in methods.values()
    }
    followed = set()
    for methods in document["paths"].values():
        for operation in methods.values():
            for response in operation["responses"].values():
                for name, link in response.get("links", {}).items():
                    target = operations[link["operationId"]]
                    taken = {parameter["name"] for parameter in target["parameters"]}
                    assert set(link.get("parameters", {})) <= taken, name
                    if "requestBody" in link:
                        assert "requestBody" in target, name
                    followed.add((operation["operationId"], name))
    # The main flows chain: a slot, its hold, confirmed, cancelled; a queue place, its position.
    assert {
        ("post__api_admin_slots", "Reserve"),
        ("post__api_bookings_reserve", "Confirm"),
        ("post__api_bookings_bookingId_confirm", "Cancel"),
        ("post__api_bookings_reserve", "JoinQueue"),
        ("post__api_slots_slotId_queue", "QueuePosition"),
    } <= followed


async def test_the_document_lists_the_domains_a_slot_may_name() -> None:
    app = create_app(None, Verifier(AuthSettings(secret=SECRET)), domains=["medical", "default"])
    async with TestClient(TestServer(app)) as client:
        document = await (await client.get("/openapi.json")).json()
    domain = document["components"]["schemas"]["CreateSlotBody"]["properties"]["domain"]
    assert domain["enum"] == ["default", "medical"]


async def test_a_refused_method_names_the_methods_the_route_takes(
    api: Client, token: Token
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


async def test_reserve_answers_are_as_documented_including_a_queue_place_again(
    api: Client, token: Token
) -> None:
    document = await (await api.get("/openapi.json")).json()
    slot = await _slot(api, token, capacity=1)
    answers = []
    for user in ("ann", "ann", "bob", "bob"):
        response = await api.post(
            "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token(user)
        )
        answers.append((response.status, await response.json()))
    # A hold, the same hold, a queue place, the same queue place.
    assert [status for status, _ in answers] == [201, 200, 202, 200]
    assert "queue" in answers[3][1]
    for status, body in answers:
        schema = _answer_schema(document, "/api/bookings/reserve", "post", status)
        assert _validator(document, schema).is_valid(body), (status, body)


async def test_query_values_are_refused_exactly_when_the_document_refuses_them(
    api: Client, token: Token
) -> None:
    document = await (await api.get("/openapi.json")).json()
    candidates = {
        "from": ["2030-01-01T00:00:00Z", "2030-01-01t00:00:00.5+01:00", "2030-01-01 00:00:00Z",
                 "2030-01-01T00:00:00+0100", "2030-01-01T00:00:00", "2030-02-30T00:00:00Z",
                 "2030-01-01T23:59:60Z", "0001-01-01T00:00:00Z", ""],
        "status": ["AVAILABLE", "BLOCKED", "available", "PENDING", ""],
        "cursor": ["", "1893456000000.slot", "-5.", "5", "x.5", "not-a-cursor"],
    }  # fmt: skip
    for name, values in candidates.items():
        validator = _validator(document, _query_schema(document, "/api/slots", "get", name))
        for value in values:
            response = await api.get("/api/slots", params={name: value}, headers=token("ann"))
            assert response.status in (200, 422)
            assert (response.status == 200) == validator.is_valid(value), (name, value)
    statuses = _validator(document, _query_schema(document, "/api/bookings/my", "get", "status"))
    for value in ["CONFIRMED", "PENDING", "confirmed", ""]:
        response = await api.get("/api/bookings/my", params={"status": value}, headers=token("ann"))
        assert (response.status == 200) == statuses.is_valid(value), value


async def test_every_refusal_of_a_bad_input_is_documented(api: Client, token: Token) -> None:
    document = await (await api.get("/openapi.json")).json()
    admin = token("root", "admin")
    slot = await _slot(api, token, capacity=1)
    # ?force= takes true or false.
    bad_force = await api.delete(f"/api/admin/slots/{slot['id']}?force=null", headers=admin)
    assert bad_force.status == 422
    assert "422" in document["paths"]["/api/admin/slots/{slotId}"]["delete"]["responses"]
    # An admin cancels with a reason, and the document says so.
    held = await api.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("ann")
    )
    booking_id = (await held.json())["booking"]["id"]
    confirmed = await api.post(f"/api/bookings/{booking_id}/confirm", headers=token("ann"))
    assert confirmed.status == 200
    no_reason = await api.post(f"/api/bookings/{booking_id}/cancel", headers=admin)
    assert no_reason.status == 422 and "reason" in (await no_reason.json())["details"]
    cancel = document["paths"]["/api/bookings/{bookingId}/cancel"]["post"]
    assert "admin" in cancel["responses"]["422"]["description"]
    assert "admin must give a reason" in cancel["description"]
    # A capacity is a whole number, as JSON Schema's "integer" means it: 2.0 is 2.
    start, end = slot["startTime"], slot["endTime"]
    for capacity, status in [(2.0, 201), (2.5, 422)]:
        response = await api.post(
            "/api/admin/slots",
            json={"resourceId": f"whole-{capacity}", "startTime": start, "endTime": end,
                  "capacity": capacity},
            headers=admin,
        )  # fmt: skip
        assert response.status == status
        body = await response.json()
        schema = _answer_schema(document, "/api/admin/slots", "post", status)
        assert _validator(document, schema).is_valid(body)
    assert body["details"]["capacity"]
    # A userId in the query is a storable id, as in a body.
    for path in ("/api/bookings/my", "/api/slots/{slotId}/queue/position"):
        user = _validator(document, _query_schema(document, path, "get", "userId"))
        response = await api.get(
            path.format(slotId=slot["id"]), params={"userId": "a\x00b"}, headers=token("ann")
        )
        assert response.status == 422 and not user.is_valid("a\x00b")
        assert "422" in document["paths"][path]["get"]["responses"]
    # An Idempotency-Key is visible ASCII (here the UTF-8 bytes of "é", read as such).
    key = _query_schema(document, "/api/bookings/reserve", "post", "Idempotency-Key")
    for value, valid in [("order-17 retry", True), ("Ã©", False)]:
        assert _validator(document, key).is_valid(value.encode("latin-1").decode()) is valid
        response = await api.post(
            "/api/bookings/reserve",
            json={"slotId": "unknown"},
            headers={**token("ann"), "Idempotency-Key": value},
        )
        assert response.status == (404 if valid else 422)


# -- /docs: the explorer, from the installed package's assets -----------------------
_REFERENCE = re.compile(r"""(?:src|href)=['"]([^'"]+)['"]""")
# What each asset must be served as, by its name's ending.
_ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


async def _docs_page(api: Client) -> tuple[str, list[str]]:
    page = await api.get("/docs")
    assert page.status == 200 and page.content_type == "text/html"
    text = await page.text()
    return text, _REFERENCE.findall(text)


async def test_docs_references_only_assets_of_this_origin(api: Client) -> None:
    text, references = await _docs_page(api)
    assets = [ref for ref in references if ref.startswith("/docs/assets/")]
    assert {ref.split("?")[0].rsplit("/", 1)[1] for ref in assets} >= {
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "docs.js",
    }
    # Every reference is a path of this origin: no scheme, no other host.
    assert all(ref.startswith("/") and not ref.startswith("//") for ref in references), references
    assert "http://" not in text and "https://" not in text
    # No script of the page is inline: each names its source.
    assert re.findall(r"<script(?![^>]*\bsrc=)", text) == []
    # Without JavaScript, the routes and the document are still there.
    noscript = text.split("<noscript>", 1)[1].split("</noscript>", 1)[0]
    assert "/api/bookings/reserve" in noscript and "/openapi.json" in noscript


async def test_docs_keeps_scripts_to_this_origin(api: Client) -> None:
    page = await api.get("/docs")
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in page.headers["Content-Security-Policy"].split(";")
    )
    assert policy["script-src"] == "'self'" and policy["connect-src"] == "'self'"
    assert policy["style-src"] == "'self'"
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert page.headers["X-Content-Type-Options"] == "nosniff"


async def test_every_asset_of_docs_is_served_with_its_type_and_may_be_cached(api: Client) -> None:
    _, references = await _docs_page(api)
    assets = [ref for ref in references if ref.startswith("/docs/assets/")]
    assert assets
    for reference in assets:
        response = await api.get(reference)
        body = await response.read()
        name = reference.split("?")[0]
        assert response.status == 200, reference
        assert response.content_type == _ASSET_TYPES[name[name.rindex(".") :]], reference
        assert body, reference
        assert response.headers["Cache-Control"] == "public, max-age=86400", reference
        assert response.headers["X-Content-Type-Options"] == "nosniff", reference
        # The page names the asset by its digest: a changed asset is a new URL.
        assert reference.endswith("?v=" + response.headers["ETag"].strip('"')), reference
        again = await api.get(reference, headers={"If-None-Match": response.headers["ETag"]})
        assert again.status == 304 and await again.read() == b"", reference
    start = await api.get("/docs/assets/docs.js")
    script = await start.text()
    # The explorer loads this origin's document, and calls no validator elsewhere.
    assert 'url: "/openapi.json"' in script and "validatorUrl: null" in script
    assert "//" not in script  # no URL of another origin, absolute or scheme-relative


async def test_a_file_that_is_not_an_asset_is_not_served(api: Client) -> None:
    for name in ("index.html", "swagger-ui-bundle.js.map", "..%2F__init__.py", "LICENSE"):
        response = await api.get(f"/docs/assets/{name}")
        assert response.status == 404, name
        assert (await response.json())["error"] == "NotFound", name


def test_without_the_package_docs_is_the_route_table_alone() -> None:
    document = build_document()
    with_explorer = render_docs(document, load_assets())
    alone = render_docs(document, None)
    assert "<script" in with_explorer and "/docs/assets/" in with_explorer
    assert "<script" not in alone and "/docs/assets/" not in alone
    assert "/api/bookings/reserve" in alone and "href='/openapi.json'" in alone

"""``/openapi.json`` (OpenAPI 3.1) and ``/docs``, generated from the schemas that validate requests.

The request and response bodies come from ``gateway.schemas`` through
``msgspec.json.schema_components``, so the document cannot drift from what the
server accepts and answers. The operations are listed once, in ``OPERATIONS``,
next to their statuses and error codes as API.md gives them.
"""

import html
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web

from gateway import schemas as s
from gateway.schemas import (
    BookingUpdatedMessage,
    QueueOfferMessage,
    QueuePositionMessage,
    SlotUpdatedMessage,
)

API_VERSION: Final = "1.0.0"


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    role: str
    request: type | None = None
    responses: dict[int, type | None] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    query: tuple[tuple[str, str, str], ...] = ()  # (name, JSON type, description)
    idempotent_key: bool = False
    auth: bool = True
    # "sse": answers text/event-stream; "websocket": a WebSocket upgrade (101).
    live: str | None = None


_LIVE_QUERY = (
    ("token", "string", "the bearer token, for clients that cannot set headers"),
    ("userId", "string", "the user a service caller watches for"),
)
_PAGE_QUERY = (
    ("limit", "integer", "page size (capped at 200)"),
    ("cursor", "string", "nextCursor of the previous page"),
)

OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation("post", "/api/admin/slots", "Create a slot", "admin", s.CreateSlotBody,
              {201: s.SlotOut}, (400, 401, 403, 409, 413, 422, 503)),
    Operation("get", "/api/slots", "List slots", "any", None, {200: s.SlotPageOut},
              (401, 422, 503),
              query=(("resourceId", "string", "only this resource's slots"),
                     ("from", "string", "startTime at or after (RFC 3339)"),
                     ("to", "string", "startTime before (RFC 3339)"),
                     ("status", "string", "AVAILABLE, RESERVED, BOOKED, BLOCKED or EXPIRED"),
                     ("available", "boolean", "only slots taking holds"),
                     *_PAGE_QUERY)),
    Operation("get", "/api/slots/{slotId}", "Read a slot", "any", None, {200: s.SlotOut},
              (401, 404, 503)),
    Operation("put", "/api/admin/slots/{slotId}", "Change a slot", "admin", s.UpdateSlotBody,
              {200: s.SlotOut}, (400, 401, 403, 404, 409, 413, 422, 503)),
    Operation("delete", "/api/admin/slots/{slotId}", "Delete a slot", "admin", None,
              {204: None}, (401, 403, 404, 409, 503),
              query=(("force", "boolean", "cancel bookings and expire holds and queue entries"),)),
    Operation("post", "/api/bookings/reserve", "Reserve a slot (hold or queue place)", "user",
              s.ReserveBody, {201: s.BookingEnvelope, 200: s.BookingEnvelope,
                              202: s.QueueEnvelope},
              (400, 401, 403, 404, 409, 413, 422, 429, 503), idempotent_key=True),
    Operation("post", "/api/bookings/{bookingId}/confirm", "Confirm a hold", "owner",
              s.ActingBody, {200: s.BookingOut}, (400, 401, 403, 404, 409, 422, 503),
              idempotent_key=True),
    Operation("post", "/api/bookings/{bookingId}/cancel", "Cancel a confirmed booking",
              "owner or admin", s.CancelBody, {200: s.BookingOut},
              (400, 401, 403, 404, 409, 422, 429, 503), idempotent_key=True),
    Operation("get", "/api/bookings/my", "The caller's bookings", "user", None,
              {200: s.BookingPageOut}, (401, 422, 503),
              query=(("status", "string", "only bookings in this status"), *_PAGE_QUERY)),
    Operation("get", "/api/bookings/{bookingId}", "Read a booking", "owner or admin", None,
              {200: s.BookingOut}, (401, 404, 503)),
    Operation("post", "/api/slots/{slotId}/queue", "Join a slot's waiting queue", "user",
              s.ActingBody, {201: s.QueueEntryOut, 200: s.QueueEntryOut},
              (400, 401, 403, 404, 409, 422, 429, 503), idempotent_key=True),
    Operation("delete", "/api/slots/{slotId}/queue", "Leave a slot's waiting queue", "user",
              None, {204: None}, (401, 403, 404, 503)),
    Operation("get", "/api/slots/{slotId}/queue/position", "The caller's queue entry", "user",
              None, {200: s.QueueEntryOut}, (401, 403, 404, 429, 503)),
    Operation("get", "/api/slots/{slotId}/queue/events",
              "Live queue position and slot availability (server-sent events)", "user",
              None, {200: None}, (401, 403, 404, 429, 503), query=_LIVE_QUERY, live="sse"),
    Operation("get", "/ws/queue/{slotId}",
              "Live queue position and slot availability (WebSocket)", "user",
              None, {101: None}, (400, 401, 403, 404, 429, 503), query=_LIVE_QUERY,
              live="websocket"),
    Operation("get", "/ws/bookings", "Live changes of the caller's bookings (WebSocket)", "user",
              None, {101: None}, (400, 401, 403, 429, 503), query=_LIVE_QUERY,
              live="websocket"),
)  # fmt: skip

# The messages of the live routes, by their ``type``.
LIVE_MESSAGES: Final[dict[str, type]] = {
    "queue.position": QueuePositionMessage,
    "queue.offer": QueueOfferMessage,
    "slot.updated": SlotUpdatedMessage,
    "booking.updated": BookingUpdatedMessage,
}

_STATUS_TEXT: Final = {
    101: "Switching Protocols (then JSON text messages; see x-messages)",
    200: "OK", 201: "Created", 202: "Accepted (queued)", 204: "No Content",
    400: "Malformed JSON or wrong content type", 401: "Missing or bad token",
    403: "Wrong role", 404: "Unknown id (or another user's)", 409: "Business conflict",
    408: "The body did not arrive in time", 413: "Body too large", 422: "Validation error",
    429: "Rate limited",
    503: "A dependency is down: try again after retryAfter seconds. details.outcome"
         " = \"unknown\": the change reached the engine and no answer came back; it may"
         " have been applied, and a retry with the same Idempotency-Key returns its outcome",
}  # fmt: skip


def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every operation above."""
    bodies: set[type] = {s.ErrorOut, *LIVE_MESSAGES.values()}
    for operation in OPERATIONS:
        if operation.request is not None:
            bodies.add(operation.request)
        bodies.update(t for t in operation.responses.values() if t is not None)
    ordered = sorted(bodies, key=lambda t: t.__name__)
    refs, components = msgspec.json.schema_components(
        ordered, ref_template="#/components/schemas/{name}"
    )
    ref_of = dict(zip(ordered, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method] = _operation(operation, ref_of)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "slotengine",
            "version": API_VERSION,
            "description": "Slot booking: timed holds, FIFO waiting queues, no double booking.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


def _operation(operation: Operation, ref_of: dict[type, dict[str, Any]]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _path_parameters(operation.path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": {"type": kind},
         "description": text}
        for name, kind, text in operation.query
    ]  # fmt: skip
    if operation.idempotent_key:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                "description": "replays the first answer for 24 h (per user and endpoint)",
            }
        )
    responses: dict[str, Any] = {}
    for status, body in operation.responses.items():
        entry: dict[str, Any] = {"description": _STATUS_TEXT[status]}
        if body is not None:
            entry["content"] = {"application/json": {"schema": ref_of[body]}}
        elif operation.live == "sse" and status == 200:
            entry["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
        responses[str(status)] = entry
    # A body read too slowly is 408, whichever operation it was sent to.
    read_timeout = (408,) if operation.request is not None else ()
    for status in sorted((*operation.errors, *read_timeout)):
        responses[str(status)] = {
            "description": _STATUS_TEXT[status],
            "content": {"application/json": {"schema": ref_of[s.ErrorOut]}},
        }
    document: dict[str, Any] = {
        "summary": operation.summary,
        "description": f"Who: {operation.role}.",
        "operationId": f"{operation.method}_{operation.path}".replace("/", "_")
        .replace("{", "")
        .replace("}", ""),
        "parameters": parameters,
        "responses": responses,
    }
    if operation.auth:
        document["security"] = [{"bearer": []}]
    if operation.live is not None:
        # Each message is a JSON object; its "type" names its schema. The current
        # state comes first, then every committed change.
        document["x-messages"] = {
            kind: ref_of[message]
            for kind, message in LIVE_MESSAGES.items()
            if (kind == "booking.updated") == (operation.path == "/ws/bookings")
        }
    if operation.request is not None:
        document["requestBody"] = {
            "required": operation.request is not s.ActingBody
            and operation.request is not s.CancelBody,
            "content": {"application/json": {"schema": ref_of[operation.request]}},
        }
    return document


def _path_parameters(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def render_docs(document: dict[str, Any]) -> str:
    """A self-contained page (no scripts, no outside assets) listing every operation."""
    rows = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            statuses = ", ".join(operation["responses"])
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}"
                f"</code></td><td>{html.escape(operation['summary'])}</td>"
                f"<td>{html.escape(operation['description'])}</td><td>{statuses}</td></tr>"
            )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>slotengine API</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;"
        "border-bottom:1px solid #ddd;text-align:left}</style></head><body>"
        f"<h1>slotengine API {html.escape(document['info']['version'])}</h1>"
        "<p>The machine-readable document is <a href='/openapi.json'>/openapi.json</a>.</p>"
        "<table><tr><th>method</th><th>path</th><th>what</th><th>who</th><th>statuses</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )


def add_openapi(app: web.Application) -> None:
    document = build_document()
    body = msgspec.json.encode(document)
    page = render_docs(document)

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def docs(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/docs", docs)

"""``/openapi.json`` (OpenAPI 3.1), generated from the schemas that validate requests.

The request and response bodies come from ``gateway.schemas`` through
``msgspec.json.schema_components``, so the document cannot drift from what the
server accepts and answers. The operations are listed once, in ``OPERATIONS``,
next to their statuses and error codes as docs/api.md gives them. ``/docs``,
the explorer of this document, is ``gateway.explorer``'s.

It must never describe a body by hand nor serve ``/docs``: the schemas describe
the bodies, ``gateway.explorer`` serves the explorer.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, get_args

import msgspec
from aiohttp import web

from engine.core import limits
from gateway import schemas as s
from gateway.explorer import add_docs
from gateway.schemas import (
    BookingUpdatedMessage,
    QueueOfferMessage,
    QueuePositionMessage,
    SlotUpdatedMessage,
)

API_VERSION: Final = "1.0.0"


# A query parameter: its name, its JSON Schema and what it does.
Query = tuple[str, dict[str, Any], str]
# A response body: one struct, or several (``oneOf``).
Body = type | tuple[type, ...] | None


@dataclass(frozen=True)
class Link:
    """An OpenAPI link: what a client may call next with the values this answer gave."""

    status: int
    name: str
    method: str
    path: str
    parameters: dict[str, str] = field(default_factory=dict)
    body: dict[str, str] | None = None


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    role: str
    request: type | None = None
    responses: dict[int, Body] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    query: tuple[Query, ...] = ()
    idempotent_key: bool = False
    auth: bool = True
    # "sse": answers text/event-stream; "websocket": a WebSocket upgrade (101).
    live: str | None = None
    # A body that is a file rather than JSON, by status: its media type.
    files: dict[int, str] = field(default_factory=dict)
    # What a status means here, where the general text says too little.
    notes: dict[int, str] = field(default_factory=dict)
    rules: str = ""
    links: tuple[Link, ...] = ()


def _enum(values: Iterable[str]) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


_INSTANT = {"type": "string", "format": "date-time", "pattern": s.INSTANT_PATTERN}
_USER_QUERY: Query = (
    "userId",
    {"type": "string", "maxLength": limits.ID_CHARS_MAX, "pattern": s.STORABLE_TEXT},
    "the user a service acts for (others may name only themselves)",
)
_PAGE_QUERY: tuple[Query, ...] = (
    (
        "limit",
        {"type": "integer", "minimum": 1},
        f"page size, at least 1 (a ValidationError below), taken as {limits.LIST_LIMIT_MAX}"
        " above it",
    ),
    ("cursor", {"type": "string", "pattern": s.CURSOR_PATTERN}, "nextCursor of the previous page"),
)
# The statuses a filter takes are those answered (a booking is never PENDING).
_SLOT_STATUSES = get_args(s.SlotStatusName)
_BOOKING_STATUSES = get_args(s.BookingStatusName)
# The rules of a slot's times across fields, which no JSON Schema can state.
_SLOT_TIMES = (
    "Validation error, or a rule across fields: endTime after startTime, at most"
    f" {limits.SLOT_DURATION_MAX_MS // 86_400_000} days later, and not in the past"
)
_SLOT = "/api/slots/{slotId}"
_BOOKING = "/api/bookings/{bookingId}"
_WEBHOOK = "/api/admin/webhooks/{endpointId}"
_DELIVERY_STATUSES = get_args(s.DeliveryStatusName)
# What a webhook endpoint must be beyond its schema: its host is resolved.
_WEBHOOK_RULES = (
    "Validation error: an unknown event type, a secret that is not whsec_ and the base64"
    " of 24 to 64 bytes, or a URL whose host does not resolve or is (or resolves to) a"
    " private, loopback, link-local or reserved address"
)


# Where a link leads: the operation and the id it takes (a path or query
# parameter, or the body's ``slotId`` for a reservation).
_TARGETS: Final = {
    "GetSlot": ("get", _SLOT, "slotId"),
    "UpdateSlot": ("put", "/api/admin/slots/{slotId}", "slotId"),
    "DeleteSlot": ("delete", "/api/admin/slots/{slotId}", "slotId"),
    "Reserve": ("post", "/api/bookings/reserve", "slotId"),
    "JoinQueue": ("post", _SLOT + "/queue", "slotId"),
    "QueuePosition": ("get", _SLOT + "/queue/position", "slotId"),
    "LeaveQueue": ("delete", _SLOT + "/queue", "slotId"),
    "QueueEvents": ("get", _SLOT + "/queue/events", "slotId"),
    "GetBooking": ("get", _BOOKING, "bookingId"),
    "DeleteWebhook": ("delete", _WEBHOOK, "endpointId"),
    "WebhookDeliveries": ("get", _WEBHOOK + "/deliveries", "endpointId"),
    "Confirm": ("post", _BOOKING + "/confirm", "bookingId"),
    "Cancel": ("post", _BOOKING + "/cancel", "bookingId"),
    "Calendar": ("get", _BOOKING + "/calendar.ics", "bookingId"),
    "Extend": ("post", _BOOKING + "/extend", "bookingId"),
    "Release": ("post", _BOOKING + "/release", "bookingId"),
}


def _links(status: int, names: Iterable[str], **values: str) -> tuple[Link, ...]:
    """The links ``names`` from answers of ``status``: what a client may call next.

    ``values`` are runtime expressions (``$response.body#/id``) for the ids
    the next calls take: ``slotId``, ``bookingId``.
    """
    links = []
    for name in names:
        method, path, taken = _TARGETS[name]
        value = {taken: values[taken]}
        if name == "Reserve":
            links.append(Link(status, name, method, path, body=value))
        else:
            links.append(Link(status, name, method, path, value))
    return tuple(links)


# A slot's queue can be joined only once the slot is full: after a hold.
_SLOT_NEXT = ("GetSlot", "UpdateSlot", "DeleteSlot", "Reserve", "QueueEvents")
_OF_SLOT = {"slotId": "$response.body#/id"}
_OF_BOOKING = {"bookingId": "$response.body#/id"}
_OF_HOLD = {"bookingId": "$response.body#/booking/id", "slotId": "$response.body#/booking/slotId"}
_OF_ENTRY = {"slotId": "$response.body#/slotId"}
_ENTRY_NEXT = ("QueuePosition", "QueueEvents", "LeaveQueue")


OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation("post", "/api/admin/slots", "Create a slot", "admin", s.CreateSlotBody,
              {201: s.SlotOut}, (400, 401, 403, 409, 413, 422, 503),
              notes={409: "SlotOverlap: the resource has a slot at an overlapping time",
                     422: _SLOT_TIMES},
              links=_links(201, _SLOT_NEXT, **_OF_SLOT)),
    Operation("get", "/api/slots", "List slots", "any", None, {200: s.SlotPageOut},
              (401, 422, 503),
              query=(("resourceId", {"type": "string"}, "only this resource's slots"),
                     ("from", _INSTANT, "startTime at or after"),
                     ("to", _INSTANT, "startTime before"),
                     ("status", _enum(_SLOT_STATUSES), "only slots in this status"),
                     ("available", {"type": "boolean"}, "only slots taking holds"),
                     *_PAGE_QUERY),
              ),
    Operation("get", _SLOT, "Read a slot", "any", None, {200: s.SlotOut}, (401, 404, 503)),
    Operation("put", "/api/admin/slots/{slotId}", "Change a slot", "admin", s.UpdateSlotBody,
              {200: s.SlotOut}, (400, 401, 403, 404, 409, 413, 422, 503),
              notes={409: "SlotOverlap, or CapacityBelowBookings: capacity below the slot's"
                          " bookings and holds",
                     422: _SLOT_TIMES},
              links=_links(200, _SLOT_NEXT, **_OF_SLOT)),
    Operation("delete", "/api/admin/slots/{slotId}", "Delete a slot", "admin", None,
              {204: None}, (401, 403, 404, 409, 422, 503),
              query=(("force", {"type": "boolean"},
                      "cancel bookings and expire holds and queue entries"),),
              notes={409: "SlotHasBookings: the slot has bookings or holds (unless force)"}),
    Operation("post", "/api/bookings/reserve", "Reserve a slot (hold or queue place)", "user",
              s.ReserveBody,
              {201: s.BookingEnvelope, 200: (s.BookingEnvelope, s.QueueEnvelope),
               202: s.QueueEnvelope},
              (400, 401, 403, 404, 409, 413, 422, 429, 503), idempotent_key=True,
              notes={200: "OK: the caller's hold on this slot already ({booking}), or the"
                          " caller's place in its queue already ({queue})"},
              # Another user may join the queue of the slot this hold has filled.
              links=_links(201, ("Confirm", "GetBooking", "JoinQueue", "Extend", "Release"),
                           **_OF_HOLD)),
    Operation("post", _BOOKING + "/confirm", "Confirm a hold", "owner", s.ActingBody,
              {200: s.BookingOut}, (400, 401, 403, 404, 409, 413, 422, 503),
              idempotent_key=True,
              links=_links(200, ("GetBooking", "Cancel", "Calendar"), **_OF_BOOKING)),
    Operation("post", _BOOKING + "/extend", "Extend a hold", "owner", s.ActingBody,
              {200: s.BookingOut}, (400, 401, 403, 404, 409, 413, 422, 503),
              idempotent_key=True,
              notes={409: "ExtensionLimitReached: the domain's holdExtensionsMax extensions"
                          " were made already (or it is 0); HoldAtSlotStart: the hold lasts"
                          " until the slot starts already; ReservationExpired: the hold"
                          " lapsed; InvalidTransition: not RESERVED"},
              rules="expiresAt moves on by the domain's holdExtensionSeconds, never past the"
                    " slot's startTime.",
              links=_links(200, ("Confirm", "Extend", "Release", "GetBooking"), **_OF_BOOKING)),
    Operation("post", _BOOKING + "/release", "Give a hold up", "owner", s.ActingBody,
              {200: s.BookingOut}, (400, 401, 403, 404, 409, 413, 422, 503),
              idempotent_key=True,
              notes={409: "InvalidTransition: not RESERVED (a lapsed, released or confirmed"
                          " booking)"},
              rules="The hold is EXPIRED at once; its place is offered to the head of the"
                    " slot's queue.",
              links=_links(200, ("GetBooking",), **_OF_BOOKING)),
    Operation("post", _BOOKING + "/cancel", "Cancel a confirmed booking",
              "owner or admin", s.CancelBody, {200: s.BookingOut},
              (400, 401, 403, 404, 409, 413, 422, 429, 503), idempotent_key=True,
              notes={422: "Validation error, or an admin cancelling without a reason"},
              rules="An admin must give a reason.",
              links=_links(200, ("GetBooking",), **_OF_BOOKING)),
    Operation("get", "/api/bookings/my", "The caller's bookings", "user", None,
              {200: s.BookingPageOut}, (401, 403, 422, 503),
              query=(("status", _enum(_BOOKING_STATUSES), "only bookings in this status"),
                     _USER_QUERY, *_PAGE_QUERY),
              ),
    Operation("get", _BOOKING, "Read a booking", "owner or admin", None,
              {200: s.BookingOut}, (401, 403, 404, 422, 503), query=(_USER_QUERY,),
              links=_links(200, ("Confirm", "Cancel"), **_OF_BOOKING)),
    Operation("get", _BOOKING + "/calendar.ics", "A confirmed booking's calendar file",
              "owner", None, {200: None}, (401, 403, 404, 409, 422, 503), query=(_USER_QUERY,),
              files={200: "text/calendar"},
              notes={200: "OK: an iCalendar file (RFC 5545, METHOD PUBLISH) with one event,"
                          " the booking's slot in UTC",
                     404: "Unknown id, or another user's booking (an admin's too)",
                     409: "Conflict: the booking is not CONFIRMED"}),
    Operation("post", _SLOT + "/queue", "Join a slot's waiting queue", "user",
              s.ActingBody, {201: s.QueueEntryOut, 200: s.QueueEntryOut},
              (400, 401, 403, 404, 409, 413, 422, 429, 503), idempotent_key=True,
              links=_links(201, _ENTRY_NEXT, **_OF_ENTRY) + _links(200, _ENTRY_NEXT, **_OF_ENTRY)),
    Operation("delete", _SLOT + "/queue", "Leave a slot's waiting queue", "user",
              None, {204: None}, (401, 403, 404, 422, 503), query=(_USER_QUERY,)),
    Operation("get", _SLOT + "/queue/position", "The caller's queue entry", "user",
              None, {200: s.QueueEntryOut}, (401, 403, 404, 422, 429, 503),
              query=(_USER_QUERY,)),
    Operation("get", _SLOT + "/queue/events",
              "Live queue position and slot availability (server-sent events)", "user",
              None, {200: None}, (401, 403, 404, 422, 429, 503), query=(_USER_QUERY,),
              live="sse"),
    Operation("get", "/api/me/contact", "The caller's contact details", "any", None,
              {200: s.ContactOut}, (401, 404, 503),
              notes={404: "NotFound: no contact details are kept for the caller"}),
    Operation("put", "/api/me/contact", "Set the caller's email address", "any",
              s.ContactBody, {200: s.ContactOut}, (400, 401, 413, 422, 503),
              rules="Replaces an address the token's email claim gave; a claim never"
                    " replaces one set here."),
    Operation("delete", "/api/me/contact", "Erase the caller's contact details", "any", None,
              {204: None}, (401, 503), rules="Idempotent: 204 whether or not there were any."),
    Operation("get", "/ws/queue/{slotId}",
              "Live queue position and slot availability (WebSocket)", "user",
              None, {101: None}, (400, 401, 403, 404, 422, 429, 503), query=(_USER_QUERY,),
              live="websocket"),
    Operation("get", "/ws/bookings", "Live changes of the caller's bookings (WebSocket)", "user",
              None, {101: None}, (400, 401, 403, 422, 429, 503), query=(_USER_QUERY,),
              live="websocket"),
    Operation("post", "/api/admin/webhooks", "Register a webhook endpoint", "admin",
              s.CreateWebhookBody, {201: s.CreatedWebhookEndpointOut},
              (400, 401, 403, 413, 422, 503),
              notes={201: "Created: the endpoint, with its signing secret (answered only here)",
                     422: _WEBHOOK_RULES},
              links=_links(201, ("WebhookDeliveries", "DeleteWebhook"),
                           endpointId="$response.body#/id")),
    Operation("get", "/api/admin/webhooks", "List webhook endpoints", "admin", None,
              {200: s.WebhookEndpointPageOut}, (401, 403, 503)),
    Operation("delete", _WEBHOOK, "Delete a webhook endpoint", "admin", None,
              {204: None}, (401, 403, 404, 503)),
    Operation("get", _WEBHOOK + "/deliveries", "A webhook endpoint's deliveries", "admin",
              None, {200: s.DeliveryPageOut}, (401, 403, 404, 422, 503),
              query=(("status", _enum(_DELIVERY_STATUSES), "only deliveries in this status"),
                     *_PAGE_QUERY)),
    Operation("post", "/api/admin/deliveries/{deliveryId}/redeliver", "Send a delivery again",
              "admin", None, {202: None}, (401, 403, 404, 503),
              notes={202: "Accepted: the delivery is pending again, due now, its attempts"
                          " counted from zero"}),
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
# What the live routes' refusals mean (the 400 only on the WebSocket ones).
_LIVE_STATUS_TEXT: Final = {
    400: "Not a WebSocket upgrade",
    429: "TooManyConnections: the caller's live connections are at their cap",
    503: "A dependency is down, or this gateway has too many live connections:"
    " try again after retryAfter seconds",
}


def operation_id(method: str, path: str) -> str:
    return f"{method}_{path}".replace("/", "_").replace("{", "").replace("}", "")


def build_document(domains: Sequence[str] = ()) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every operation above.

    ``domains``: the domains the server knows, the only ones a slot may name
    (left open when not given).
    """
    bodies: set[type] = {s.ErrorOut, *LIVE_MESSAGES.values()}
    for operation in OPERATIONS:
        if operation.request is not None:
            bodies.add(operation.request)
        for body in operation.responses.values():
            bodies.update(body if isinstance(body, tuple) else () if body is None else (body,))
    ordered = sorted(bodies, key=lambda t: t.__name__)
    refs, components = msgspec.json.schema_components(
        ordered, ref_template="#/components/schemas/{name}"
    )
    components[s.METADATA_VALUE] = s.METADATA_VALUE_SCHEMA
    if domains:
        components["CreateSlotBody"]["properties"]["domain"]["enum"] = sorted(domains)
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
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                # Browsers cannot set headers on WebSocket and EventSource requests.
                "token": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "the bearer token, on the live routes only",
                },
            },
        },
    }


def _schema_of(body: Body, ref_of: dict[type, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(body, tuple):
        return {"oneOf": [ref_of[one] for one in body]}
    assert body is not None
    return ref_of[body]


def _event_stream(ref_of: dict[type, dict[str, Any]], kinds: Iterable[str]) -> dict[str, Any]:
    """One server-sent event, as OpenAPI 3.1 describes an item of ``text/event-stream``.

    Its ``event`` names the message type and its ``data`` is that message in
    JSON; comment lines (heartbeats) and the ``retry`` field carry no data.
    """
    return {
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"const": kind},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": ref_of[LIVE_MESSAGES[kind]],
                    },
                    "id": {"type": "string"},
                    "retry": {"type": "integer"},
                },
            }
            for kind in kinds
        ]
    }


def _operation(operation: Operation, ref_of: dict[type, dict[str, Any]]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _path_parameters(operation.path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": text}
        for name, schema, text in operation.query
    ]
    if operation.idempotent_key:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {
                    "type": "string",
                    "pattern": s.IDEMPOTENCY_KEY_PATTERN,
                    "maxLength": limits.IDEMPOTENCY_KEY_CHARS_MAX,
                },
                "description": "visible ASCII (inner spaces allowed); replays the first answer"
                " for 24 h (per user and endpoint)",
            }
        )
    kinds = [
        kind
        for kind in LIVE_MESSAGES
        if (kind == "booking.updated") == (operation.path == "/ws/bookings")
    ]
    responses: dict[str, Any] = {}
    links: dict[int, dict[str, Any]] = {}
    for link in operation.links:
        links.setdefault(link.status, {})[link.name] = _link(link)
    for status, body in operation.responses.items():
        entry: dict[str, Any] = {"description": operation.notes.get(status, _STATUS_TEXT[status])}
        if body is not None:
            entry["content"] = {"application/json": {"schema": _schema_of(body, ref_of)}}
        elif status in operation.files:
            entry["content"] = {operation.files[status]: {"schema": {"type": "string"}}}
        elif operation.live == "sse" and status == 200:
            entry["content"] = {"text/event-stream": {"schema": _event_stream(ref_of, kinds)}}
        if status in links:
            entry["links"] = links[status]
        responses[str(status)] = entry
    # A body read too slowly is 408, whichever operation it was sent to.
    read_timeout = (408,) if operation.request is not None else ()
    for status in sorted((*operation.errors, *read_timeout)):
        general = _LIVE_STATUS_TEXT if operation.live is not None else {}
        text = operation.notes.get(status, general.get(status, _STATUS_TEXT[status]))
        responses[str(status)] = {
            "description": text,
            "content": {"application/json": {"schema": ref_of[s.ErrorOut]}},
        }
    description = f"Who: {operation.role}."
    if operation.rules:
        description += f" {operation.rules}"
    if operation.live == "websocket":
        description += " A WebSocket upgrade (RFC 6455); a plain request is refused with 400."
    document: dict[str, Any] = {
        "summary": operation.summary,
        "description": description,
        "operationId": operation_id(operation.method, operation.path),
        "parameters": parameters,
        "responses": responses,
    }
    if operation.auth:
        document["security"] = [{"bearer": []}]
        if operation.live is not None:
            document["security"].append({"token": []})
    if operation.live is not None:
        # Each message is a JSON object; its "type" names its schema. The current
        # state comes first, then every committed change.
        document["x-messages"] = {kind: ref_of[LIVE_MESSAGES[kind]] for kind in kinds}
    if operation.request is not None:
        document["requestBody"] = {
            "required": operation.request is not s.ActingBody
            and operation.request is not s.CancelBody,
            "content": {"application/json": {"schema": ref_of[operation.request]}},
        }
    return document


def _link(link: Link) -> dict[str, Any]:
    document: dict[str, Any] = {"operationId": operation_id(link.method, link.path)}
    if link.parameters:
        document["parameters"] = dict(link.parameters)
    if link.body is not None:
        document["requestBody"] = dict(link.body)
    return document


def _path_parameters(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def add_openapi(app: web.Application, domains: Sequence[str] = ()) -> None:
    document = build_document(domains)
    body = msgspec.json.encode(document)

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/openapi.json", openapi)
    add_docs(app, document)

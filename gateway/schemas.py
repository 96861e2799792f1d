"""The API's request and response bodies as msgspec structs: decoding is validation.

Field names are camelCase on the wire (``rename="camel"``); times are RFC 3339
strings, answered in UTC with millisecond precision when it is not zero, and
required to carry an offset on input. The same structs generate the OpenAPI
document, so what validates a request is what the document describes.

It must never call the engine or hold state: a struct says what a body looks
like, the shards decide what it may do.
"""

import functools
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

import msgspec

from engine.core import limits
from engine.core.records import Booking, QueueView, SlotView
from engine.core.storable import NUMBER_BOUND, metadata_problem
from engine.notify.events import ALL_EVENTS, EVENT_TYPES
from persistence.contacts import EMAIL_CHARS_MAX, EMAIL_PATTERN, plausible_email

# Every string a client sends is stored by PostgreSQL, which refuses U+0000
# (``engine.core.storable``): the pattern refuses it while decoding, with the
# field's name, and tells the OpenAPI document.
STORABLE_TEXT: Final = "^[^\\u0000]*$"
Id = Annotated[
    str, msgspec.Meta(min_length=1, max_length=limits.ID_CHARS_MAX, pattern=STORABLE_TEXT)
]
Reason = Annotated[
    str, msgspec.Meta(max_length=limits.CANCEL_REASON_CHARS_MAX, pattern=STORABLE_TEXT)
]
# A whole number, as JSON Schema means "integer": 528.0 and 5.28e2 are 528 too.
# (Read as a float, which holds every capacity exactly; handlers take its int.)
Capacity = Annotated[
    float,
    msgspec.Meta(
        ge=1, le=limits.SLOT_CAPACITY_MAX, multiple_of=1, extra_json_schema={"type": "integer"}
    ),
]

# Slot metadata: JSON the database stores as it is (``check_metadata``). The
# document states what a JSON Schema can (no U+0000 in any string or key, every
# number within 64 bits) and says the rest: at most JSON_DEPTH_MAX levels and
# SLOT_METADATA_BYTES_MAX bytes as compact JSON.
METADATA_VALUE: Final = "MetadataValue"
METADATA_VALUE_SCHEMA: Final = {
    "description": "a JSON value whose strings and keys have no U+0000 and whose numbers"
    " are within 64 bits",
    "anyOf": [
        {"type": ["null", "boolean"]},
        {
            "type": "number",
            "exclusiveMinimum": -NUMBER_BOUND,
            "exclusiveMaximum": NUMBER_BOUND,
        },
        {"type": "string", "pattern": STORABLE_TEXT},
        {"type": "array", "items": {"$ref": f"#/components/schemas/{METADATA_VALUE}"}},
        {
            "type": "object",
            "propertyNames": {"pattern": STORABLE_TEXT},
            "additionalProperties": {"$ref": f"#/components/schemas/{METADATA_VALUE}"},
        },
    ],
}
Metadata = Annotated[
    dict[str, Any],
    msgspec.Meta(
        description=f"at most {limits.JSON_DEPTH_MAX} levels deep and"
        f" {limits.SLOT_METADATA_BYTES_MAX} bytes as compact JSON",
        extra_json_schema={
            "propertyNames": {"pattern": STORABLE_TEXT},
            "additionalProperties": {"$ref": f"#/components/schemas/{METADATA_VALUE}"},
        },
    ),
]

# An instant on input: RFC 3339 with its offset, as the document's pattern says
# and nothing else (a space for the "T", an offset without its colon or a leap
# second are refused, though a lenient parser would take them). Years run from
# 0002 to 9998 so that every offset keeps the instant within the years 0001 to
# 9999 in UTC, which is how it is answered; fractions of a second beyond the
# millisecond are dropped. Checked by the bodies (``check_instants``) and the
# query filters (``to_ms``), with the field's name.
INSTANT_PATTERN: Final = (
    r"^(000[2-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])"
    r"-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
INSTANT_MESSAGE: Final = "must be an RFC 3339 time with an offset, years 0002 to 9998"
_INSTANT: Final = re.compile(INSTANT_PATTERN.removesuffix("$") + r"\Z")
Instant = Annotated[
    str,
    msgspec.Meta(
        extra_json_schema={"format": "date-time", "pattern": INSTANT_PATTERN},
        description="RFC 3339 with an offset, years 0002 to 9998",
    ),
]
# A page cursor: the sort key and the id of the last item of the previous page.
# Every string of this form is a position in the order, so none is refused; an
# empty one is the first page.
CURSOR_PATTERN: Final = r"^$|^-?[0-9]{1,18}\."
# An Idempotency-Key: visible ASCII, inner spaces allowed (HTTP strips the outer ones).
IDEMPOTENCY_KEY_PATTERN: Final = r"^[!-~]([ -~]*[!-~])?$"
# An instant as answered: RFC 3339 in UTC.
Stamp = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]
SlotStatusName = Literal["AVAILABLE", "RESERVED", "BOOKED", "BLOCKED", "EXPIRED"]
BookingStatusName = Literal["RESERVED", "CONFIRMED", "EXPIRED", "CANCELLED", "COMPLETED"]
QueueStatusName = Literal["WAITING", "NOTIFIED", "EXPIRED", "CONVERTED"]


class _Body(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class CreateSlotBody(_Body, frozen=True):
    resource_id: Id
    start_time: Instant
    end_time: Instant
    capacity: Capacity
    domain: Id = "default"
    metadata: Metadata = {}
    blocked: bool = False

    def __post_init__(self) -> None:
        check_instants(startTime=self.start_time, endTime=self.end_time)
        check_metadata(self.metadata)


class UpdateSlotBody(_Body, frozen=True):
    start_time: Instant | None = None
    end_time: Instant | None = None
    capacity: Capacity | None = None
    metadata: Metadata | None = None
    blocked: bool | None = None

    def __post_init__(self) -> None:
        check_instants(startTime=self.start_time, endTime=self.end_time)
        if self.metadata is not None:
            check_metadata(self.metadata)


def check_instants(**instants: str | None) -> None:
    """Each instant given as documented (``INSTANT_PATTERN``); raised as ``check_metadata``."""
    for field, text in instants.items():
        if text is not None and _instant(text) is None:
            raise ValueError(f"{INSTANT_MESSAGE} - at `$.{field}`")


def check_metadata(metadata: dict[str, Any]) -> None:
    """Slot metadata the database stores as it is (``engine.core.storable``).

    Raised from a body's ``__post_init__``, the ValueError is msgspec's
    ValidationError for the body, in msgspec's own "message - at `path`" form
    so that the answer names the member at fault.
    """
    found = metadata_problem(metadata)
    if found is not None:
        where, message = found
        raise ValueError(f"{message} - at `$.{where}`")


# A body is one object around its fields: it may nest one level more than its metadata.
BODY_DEPTH_MAX: Final = limits.JSON_DEPTH_MAX + 1
# What the depth check looks at: an escape inside a string (two bytes, so that
# an escaped quote does not end the string), a quote, and the brackets.
_JSON_STRUCTURE: Final = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)


def nested_deeper_than(raw: bytes, depth_max: int) -> bool:
    """Whether the JSON text ``raw`` opens more than ``depth_max`` arrays or objects at once.

    Checked on the bytes, before decoding: decoders recurse once a level, and a
    few kilobytes of brackets would otherwise exhaust the interpreter's stack.
    Where ``raw`` is malformed the answer holds for its well-formed beginning,
    which is as far as a decoder reads before it stops.
    """
    if raw.count(b"[") + raw.count(b"{") <= depth_max:
        return False
    depth = 0
    in_string = False
    for token in _JSON_STRUCTURE.findall(raw):
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue
        elif token in b"[{":
            depth += 1
            if depth > depth_max:
                return True
        else:
            depth -= 1
    return False


class ReserveBody(_Body, frozen=True):
    slot_id: Id
    # Only a ``service`` caller may act for another user.
    user_id: Id | None = None


class CancelBody(_Body, frozen=True):
    reason: Reason | None = None
    user_id: Id | None = None


class ActingBody(_Body, frozen=True):
    """The optional body of confirm and queue calls: a ``service`` names its user."""

    user_id: Id | None = None


# An email address: checked by ``ContactBody`` (the whole text must match, which
# Python's "$" alone would not make so), described by the document.
EMAIL_MESSAGE: Final = f"must be an email address (user@example.com), at most {EMAIL_CHARS_MAX}"
Email = Annotated[
    str,
    msgspec.Meta(max_length=EMAIL_CHARS_MAX, extra_json_schema={"pattern": EMAIL_PATTERN}),
]


class ContactBody(_Body, frozen=True):
    email: Email

    def __post_init__(self) -> None:
        # The message never repeats the address: it is personal data.
        if not plausible_email(self.email):
            raise ValueError(f"{EMAIL_MESSAGE} characters - at `$.email`")


# A webhook endpoint's URL: http or https (what else it must be, the gateway checks
# by resolving its host), at most WEBHOOK_URL_CHARS_MAX characters.
WEBHOOK_URL_CHARS_MAX: Final = 2048
WEBHOOK_URL_PATTERN: Final = "^[Hh][Tt][Tt][Pp][Ss]?://[^\\u0000]+$"
WebhookUrl = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=WEBHOOK_URL_CHARS_MAX,
        pattern=WEBHOOK_URL_PATTERN,
        description="an http or https URL whose host is not a private, loopback or"
        " link-local address (unless the server allows private addresses)",
    ),
]
# An event type an endpoint subscribes to, or "*" for all of them.
EventName = Annotated[str, msgspec.Meta(extra_json_schema={"enum": [*EVENT_TYPES, ALL_EVENTS]})]
# A client-given secret: "whsec_" and the base64 of 24 to 64 bytes.
WEBHOOK_SECRET_PATTERN: Final = "^whsec_[A-Za-z0-9+/]+={0,2}$"
WebhookSecret = Annotated[
    str,
    msgspec.Meta(
        pattern=WEBHOOK_SECRET_PATTERN,
        min_length=6 + 32,
        max_length=6 + 88,
        description="whsec_ and the base64 of 24 to 64 random bytes",
    ),
]
_EVENT_NAMES: Final = frozenset((*EVENT_TYPES, ALL_EVENTS))


class CreateWebhookBody(_Body, frozen=True):
    url: WebhookUrl
    events: Annotated[list[EventName], msgspec.Meta(min_length=1, max_length=64)]
    # None: the server makes one (and answers it once, on creation).
    secret: WebhookSecret | None = None

    def __post_init__(self) -> None:
        for index, name in enumerate(self.events):
            if name not in _EVENT_NAMES:
                raise ValueError(f"not an event type - at `$.events[{index}]`")


# -- responses ------------------------------------------------------------------


class _Out(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    pass


class SlotOut(_Out, frozen=True):
    id: str
    resource_id: str
    domain: str
    start_time: Stamp
    end_time: Stamp
    capacity: int
    current_bookings: int
    held_count: int
    available: int
    status: SlotStatusName
    queue_length: int
    metadata: dict[str, Any]
    version: int


class BookingOut(_Out, frozen=True):
    id: str
    user_id: str
    slot_id: str
    status: BookingStatusName
    reserved_at: Stamp
    expires_at: Stamp
    confirmed_at: Stamp | None
    completed_at: Stamp | None
    cancelled_at: Stamp | None
    cancel_reason: str | None
    cancelled_by: str | None
    refund_percentage: int | None
    version: int
    # How many times the hold was extended (POST /api/bookings/{id}/extend).
    extensions: int


class QueueEntryOut(_Out, frozen=True):
    slot_id: str
    user_id: str
    status: QueueStatusName
    position: int | None
    total_in_queue: int
    estimated_wait_time: str | None
    estimated_wait_seconds: int | None
    joined_at: Stamp
    notified_at: Stamp | None
    booking_id: str | None
    offer_expires_at: Stamp | None
    slot_details: SlotOut


class BookingEnvelope(_Out, frozen=True):
    booking: BookingOut


class QueueEnvelope(_Out, frozen=True):
    queue: QueueEntryOut


class SlotPageOut(_Out, frozen=True):
    items: list[SlotOut]
    next_cursor: str | None


class BookingPageOut(_Out, frozen=True):
    items: list[BookingOut]
    next_cursor: str | None


class ContactOut(_Out, frozen=True):
    email: str
    # "token": the token's email claim; "api": set with PUT /api/me/contact.
    source: Literal["token", "api"]
    updated_at: Stamp


class WebhookEndpointOut(_Out, frozen=True):
    id: str
    url: str
    events: list[str]
    created_at: Stamp


class CreatedWebhookEndpointOut(WebhookEndpointOut, frozen=True):
    """An endpoint as its creation answers it: the only answer with its secret."""

    secret: str


class WebhookEndpointPageOut(_Out, frozen=True):
    items: list[WebhookEndpointOut]
    next_cursor: str | None


DeliveryStatusName = Literal["pending", "delivered", "failed", "dead"]


class DeliveryOut(_Out, frozen=True):
    id: str
    event_id: str
    event_type: str
    channel: Literal["webhook", "email"]
    status: DeliveryStatusName
    attempts: int
    last_error: str | None
    next_attempt_at: Stamp
    created_at: Stamp
    delivered_at: Stamp | None


class DeliveryPageOut(_Out, frozen=True):
    items: list[DeliveryOut]
    next_cursor: str | None


class ErrorOut(msgspec.Struct, omit_defaults=True, kw_only=True, frozen=True):
    error: str
    message: str
    details: dict[str, Any] = {}
    retryAfter: int | None = None


# -- live messages (WebSocket and SSE) ------------------------------------------------


class _Message(msgspec.Struct, rename="camel", kw_only=True, frozen=True, tag_field="type"):
    slot_id: str


class QueuePositionMessage(_Message, frozen=True, tag="queue.position"):
    position: int | None
    status: QueueStatusName | None
    total_in_queue: int
    estimated_wait_time: str | None
    estimated_wait_seconds: int | None
    booking_id: str | None


class QueueOfferMessage(_Message, frozen=True, tag="queue.offer"):
    booking_id: str
    expires_at: Stamp


class SlotUpdatedMessage(_Message, frozen=True, tag="slot.updated"):
    slot: SlotOut


class BookingUpdatedMessage(_Message, frozen=True, tag="booking.updated"):
    booking: BookingOut


# -- conversions ------------------------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
RFC3339_CACHED_MAX = 4096
_MILLISECOND = timedelta(milliseconds=1)


def _instant(text: str) -> datetime | None:
    """``text`` as an aware datetime if it is an instant as documented, else None."""
    if _INSTANT.match(text) is None:
        return None
    # Microseconds at most, so that parsing never rounds (which could carry into the next year).
    date_time, dot, rest = text.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{date_time}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        return msgspec.convert(text, datetime)
    except msgspec.ValidationError:  # no such day (February 30th)
        return None


def to_ms(text: str, field: str) -> int:
    """Epoch milliseconds of an instant (see ``Instant``); anything else is a validation error."""
    value = _instant(text)
    if value is None:
        raise msgspec.ValidationError(f"{INSTANT_MESSAGE} - at `$.{field}`")
    return (value - _EPOCH) // _MILLISECOND


@functools.lru_cache(maxsize=RFC3339_CACHED_MAX)
def rfc3339(ms: int) -> str:
    """UTC, milliseconds only when there are any: ``2026-01-02T09:30:00Z``.

    Every answer carries several instants, and a slot's start and end recur in
    every answer about it: the last few thousand are kept.
    """
    seconds, millis = divmod(ms, 1000)
    t = time.gmtime(seconds)
    stamp = (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
        f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    )
    return f"{stamp}.{millis:03d}Z" if millis else f"{stamp}Z"


def _maybe(ms: int | None) -> str | None:
    return None if ms is None else rfc3339(ms)


def slot_out(view: SlotView) -> SlotOut:
    return SlotOut(
        id=view.id,
        resource_id=view.resource_id,
        domain=view.domain,
        start_time=rfc3339(view.start_ms),
        end_time=rfc3339(view.end_ms),
        capacity=view.capacity,
        current_bookings=view.current_bookings,
        held_count=view.held_count,
        available=view.available,
        status=view.status.value,
        queue_length=view.queue_length,
        metadata=view.metadata_dict(),
        version=view.version,
    )


def booking_out(booking: Booking) -> BookingOut:
    return BookingOut(
        id=booking.id,
        user_id=booking.user_id,
        slot_id=booking.slot_id,
        status=booking.status.value,  # type: ignore[arg-type]
        reserved_at=rfc3339(booking.reserved_at_ms),
        expires_at=rfc3339(booking.expires_at_ms),
        confirmed_at=_maybe(booking.confirmed_at_ms),
        completed_at=_maybe(booking.completed_at_ms),
        cancelled_at=_maybe(booking.cancelled_at_ms),
        cancel_reason=booking.cancel_reason,
        cancelled_by=booking.cancelled_by,
        refund_percentage=booking.refund_percentage,
        version=booking.version,
        extensions=booking.extensions,
    )


def queue_out(entry: QueueView) -> QueueEntryOut:
    return QueueEntryOut(
        slot_id=entry.slot_id,
        user_id=entry.user_id,
        status=entry.status.value,
        position=entry.position,
        total_in_queue=entry.total_in_queue,
        estimated_wait_time=entry.estimated_wait_time,
        estimated_wait_seconds=entry.estimated_wait_seconds,
        joined_at=rfc3339(entry.joined_at_ms),
        notified_at=_maybe(entry.notified_at_ms),
        booking_id=entry.booking_id,
        offer_expires_at=_maybe(entry.offer_expires_at_ms),
        slot_details=slot_out(entry.slot),
    )

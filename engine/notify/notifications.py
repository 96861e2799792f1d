"""The notifications a shard's committed events make: which, with what id, and what they say.

Pure (no I/O): shared by the delivery workers (engine/notify/worker.py) and the
tests. Each notification has a stable id, the subject it concerns and that
subject's sequence (its version), and the contract's resource plus the event's
own fields (docs/api.md, "Notifications").
"""

import hashlib
from collections.abc import Iterable
from typing import Any, Final

import msgspec

from engine.core.protocol import AnyEvent, BookingChanged, QueueChanged, SlotChanged
from engine.core.records import QueueEntry
from engine.core.states import BookingStatus
from gateway.schemas import booking_out, rfc3339, slot_out


class Notification(msgspec.Struct, frozen=True, kw_only=True):
    """One event as receivers get it: the body of a webhook, the facts of an email."""

    # Stable: the same on every retry and every redelivery (the webhook-id).
    id: str
    type: str
    # Who it is about, and its place in that subject's story (its version):
    # receivers order and deduplicate by (subject, seq).
    subject: str
    seq: int
    at_ms: int
    slot_id: str
    # The user it concerns (None for slot events).
    user_id: str | None
    # The slot's domain, where the event itself says it (slot events).
    domain: str | None
    # The contract's resource (Booking, QueueEntry or Slot) plus the event's own fields.
    data: dict[str, Any]

    def body(self) -> bytes:
        """The webhook body: ``{"type", "timestamp", "data"}``."""
        return _json.encode(
            {"type": self.type, "timestamp": rfc3339(self.at_ms), "data": self.data}
        )


_json = msgspec.json.Encoder()
_BOOKING_EVENTS: Final = {
    BookingStatus.RESERVED: "booking.reserved",
    BookingStatus.CONFIRMED: "booking.confirmed",
    BookingStatus.CANCELLED: "booking.cancelled",
    BookingStatus.EXPIRED: "booking.expired",
    BookingStatus.COMPLETED: "booking.completed",
}
_QUEUE_EVENTS: Final = {
    "joined": "queue.joined",
    "notified": "queue.offer",
    "converted": "queue.converted",
}
_SLOT_EVENTS: Final = {
    "created": "slot.created",
    "updated": "slot.updated",
    "deleted": "slot.deleted",
}
# A hold lengthened stays RESERVED: its transition is told as an extension.
EXTENDED_TRIGGER: Final = "extended"


def notifications(
    events: Iterable[AnyEvent], wanted: frozenset[str] | None = None
) -> list[Notification]:
    """The notifications a flush's events make, in order (others make none); only
    those of the ``wanted`` types, if given (the others cost nothing to skip)."""
    made: list[Notification] = []
    for event in events:
        notification = _notification(event, wanted)
        if notification is not None:
            made.append(notification)
    return made


def _notification(event: AnyEvent, wanted: frozenset[str] | None) -> Notification | None:
    if isinstance(event, BookingChanged):
        booking = event.booking
        if (
            event.to_status is BookingStatus.RESERVED
            and event.from_status is BookingStatus.RESERVED
        ):
            kind = "booking.extended" if event.trigger == EXTENDED_TRIGGER else None
        else:
            kind = _BOOKING_EVENTS.get(event.to_status)
        if kind is None or (wanted is not None and kind not in wanted):
            return None
        data = msgspec.to_builtins(booking_out(booking))
        data["trigger"] = event.trigger
        if kind == "booking.cancelled":
            data["reason"] = booking.cancel_reason
        return _made(
            kind, booking.id, booking.version, event, booking.slot_id, booking.user_id, None, data
        )
    if isinstance(event, QueueChanged):
        entry = event.entry
        kind = _QUEUE_EVENTS.get(event.change)
        if event.change == "expired":
            # An entry ends EXPIRED when its offer lapsed or when it waited idle too long;
            # only the first is an event people are told of.
            kind = "queue.offer_expired" if entry.notified_at_ms is not None else None
        if kind is None or (wanted is not None and kind not in wanted):
            return None
        data = _queue_entry(entry)
        if kind == "queue.offer" and event.offer_expires_at_ms is not None:
            data["claimDeadline"] = rfc3339(event.offer_expires_at_ms)
            data["offerExpiresAt"] = data["claimDeadline"]
        subject = f"{entry.slot_id}/{entry.user_id}/{entry.seq}"
        return _made(kind, subject, entry.version, event, entry.slot_id, entry.user_id, None, data)
    if isinstance(event, SlotChanged):
        kind = _SLOT_EVENTS.get(event.change)
        if kind is None or (wanted is not None and kind not in wanted):
            return None
        view = event.slot
        data = msgspec.to_builtins(slot_out(view))
        return _made(kind, view.id, view.version, event, view.id, None, view.domain, data)
    return None


def _made(
    kind: str,
    subject: str,
    seq: int,
    event: AnyEvent,
    slot_id: str,
    user_id: str | None,
    domain: str | None,
    data: dict[str, Any],
) -> Notification:
    digest = hashlib.blake2b(
        f"{kind}\0{subject}\0{seq}\0{event.at_ms}".encode(), digest_size=16
    ).hexdigest()
    return Notification(
        id=f"msg_{digest}",
        type=kind,
        subject=subject,
        seq=seq,
        at_ms=event.at_ms,
        slot_id=slot_id,
        user_id=user_id,
        domain=domain,
        data=data,
    )


def _queue_entry(entry: QueueEntry) -> dict[str, Any]:
    """The QueueEntry resource as of the event, without what only a live read knows
    (position, totalInQueue, estimates, slotDetails)."""
    return {
        "slotId": entry.slot_id,
        "userId": entry.user_id,
        "status": entry.status.value,
        "joinedAt": rfc3339(entry.joined_at_ms),
        "notifiedAt": None if entry.notified_at_ms is None else rfc3339(entry.notified_at_ms),
        "bookingId": entry.booking_id,
        "offerExpiresAt": None,
    }

"""What one flush writes: a shard's events folded into the rows they leave behind.

Pure and synchronous (no I/O), so it is tested without a database and shared
by the writer and the tests' model of storage. Folding keeps the last state
of every record a flush touched: a booking held, confirmed and cancelled
within one flush is written once, as CANCELLED. Every transition still gets
its own audit row.

Audit rows carry the origin of the change that caused them (the HTTP request's
``X-Request-Id``, the client's IP address and user agent), looked up by the
event's request id in the origins the shard handed over beside its events:
the events themselves never hold it, so what is published of them (live
updates, the outbox) cannot. A reservation attempt the shard refused is an
audit row too (entity ``attempt``, trigger ``refused``, the refusal's code as
``details.reason``), and a cancellation's row has its reason, refund and
initiator in ``details``. No row holds a token or a contact detail: a
cancellation's reason is stored with what looks like an email address or a
phone number masked.

It must never do I/O nor decide a business rule: the rows are what the events
say.
"""

from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.core.protocol import (
    AnyEvent,
    AttemptRefused,
    BookingChanged,
    JoinQueue,
    KeyRecord,
    Origin,
    OutcomeRecord,
    QueueChanged,
    SlotChanged,
)
from engine.core.records import Booking, QueueEntry, SlotView
from engine.core.redaction import redact_contact_details
from engine.core.states import BookingStatus

# The changes of a slot's own settings (counts follow its bookings).
SLOT_SETTING_CHANGES = frozenset({"created", "updated", "deleted"})
# The queue changes people are told of (engine/notify/events.py names them);
# a user leaving the line of their own accord is not one.
NOTIFIED_QUEUE_CHANGES = frozenset({"joined", "notified", "expired", "converted"})

# The columns of the audit_write type (the shard is the flush's): at_ms,
# request_id, actor, entity, entity_id, slot_id, user_id, from_status,
# to_status, trigger, details, then the origin: http_request_id, client_ip,
# user_agent.
AuditRow = tuple[
    int,
    str,
    str,
    str,
    str,
    str,
    str | None,
    str | None,
    str | None,
    str,
    str | None,
    str | None,
    str | None,
    str | None,
]

_json = msgspec.json.Encoder()
_CANCELLED = BookingStatus.CANCELLED


@dataclass
class SlotRow:
    view: SlotView
    created_at_ms: int
    updated_at_ms: int
    deleted_at_ms: int | None


@dataclass
class FlushRows:
    shard: int
    slots: dict[str, SlotRow] = field(default_factory=dict)
    bookings: dict[str, tuple[Booking, int]] = field(default_factory=dict)
    # Bookings born in this flush (inserted); the others exist already (updated).
    created: set[str] = field(default_factory=set)
    # (slot, user) -> the entry's last state and when, or None: the user left.
    entries: dict[tuple[str, str], tuple[QueueEntry, int] | None] = field(default_factory=dict)
    audit: list[AuditRow] = field(default_factory=list)
    outcomes: list[OutcomeRecord] = field(default_factory=list)
    keys: list[KeyRecord] = field(default_factory=list)
    events: int = 0
    # The events themselves, in order: published to subscribers once committed.
    raw: list[AnyEvent] = field(default_factory=list)
    # The events notifications are made of, in order: the transactional outbox's
    # part of this flush (every booking transition, the queue changes of
    # NOTIFIED_QUEUE_CHANGES, slot settings).
    notifiable: list[AnyEvent] = field(default_factory=list)

    def add(self, events: list[AnyEvent], origins: dict[str, Origin] | None = None) -> None:
        """Fold ``events`` in; ``origins`` (by request id) go into their audit rows only."""
        audit = self.audit.append
        notifiable = self.notifiable.append
        self.events += len(events)
        self.raw.extend(events)
        origin: Origin | None = None
        for event in events:
            if origins is not None:
                origin = origins.get(event.request_id)
            if type(event) is BookingChanged:
                booking = event.booking
                self.bookings[booking.id] = (booking, event.at_ms)
                if event.from_status is BookingStatus.PENDING:
                    self.created.add(booking.id)
                notifiable(event)
                audit(
                    (
                        event.at_ms,
                        event.request_id,
                        event.actor,
                        "booking",
                        booking.id,
                        booking.slot_id,
                        booking.user_id,
                        event.from_status.value,
                        event.to_status.value,
                        event.trigger,
                        _cancellation(booking) if event.to_status is _CANCELLED else None,
                        None if origin is None else origin.request_id,
                        None if origin is None else origin.client_ip,
                        None if origin is None else origin.user_agent,
                    )
                )
            elif type(event) is QueueChanged:
                entry = event.entry
                key = (entry.slot_id, entry.user_id)
                self.entries[key] = None if event.change == "left" else (entry, event.at_ms)
                if event.change in NOTIFIED_QUEUE_CHANGES:
                    notifiable(event)
                audit(
                    (
                        event.at_ms,
                        event.request_id,
                        event.actor,
                        "queue",
                        f"{entry.slot_id}/{entry.user_id}",
                        entry.slot_id,
                        entry.user_id,
                        None,
                        entry.status.value,
                        event.change,
                        _details(seq=entry.seq, bookingId=entry.booking_id),
                        None if origin is None else origin.request_id,
                        None if origin is None else origin.client_ip,
                        None if origin is None else origin.user_agent,
                    )
                )
            elif type(event) is SlotChanged and event.change in SLOT_SETTING_CHANGES:
                view = event.slot
                row = self.slots.get(view.id)
                created_ms = row.created_at_ms if row is not None else event.at_ms
                deleted_ms = event.at_ms if event.change == "deleted" else None
                self.slots[view.id] = SlotRow(view, created_ms, event.at_ms, deleted_ms)
                notifiable(event)
                audit(
                    (
                        event.at_ms,
                        event.request_id,
                        event.actor,
                        "slot",
                        view.id,
                        view.id,
                        None,
                        None,
                        view.status.value,
                        event.change,
                        _details(
                            capacity=view.capacity,
                            startMs=view.start_ms,
                            endMs=view.end_ms,
                            blocked=view.blocked,
                            version=view.version,
                        ),
                        None if origin is None else origin.request_id,
                        None if origin is None else origin.client_ip,
                        None if origin is None else origin.user_agent,
                    )
                )

    def remember(
        self,
        outcomes: list[OutcomeRecord],
        keys: list[KeyRecord],
        refused: list[AttemptRefused] | None = None,
    ) -> None:
        self.outcomes.extend(outcomes)
        self.keys.extend(keys)
        if refused:
            self.audit.extend(map(_refusal_row, refused))

    def empty(self) -> bool:
        return not (self.events or self.outcomes or self.keys)

    def row_count(self) -> int:
        """The rows a flush of these writes: slots, bookings, queue entries (kept or
        removed), audit rows, idempotency records, and one of request outcomes
        (the outbox's row not counted)."""
        return (
            len(self.slots)
            + len(self.bookings)
            + len(self.entries)
            + len(self.audit)
            + len(self.keys)
            + (1 if self.outcomes else 0)
        )

    def split_bookings(self) -> tuple[list[tuple[Booking, int]], list[tuple[Booking, int]]]:
        """(bookings that existed before this flush, bookings born in it)."""
        changed: list[tuple[Booking, int]] = []
        new: list[tuple[Booking, int]] = []
        created = self.created
        for booking_id, row in self.bookings.items():
            (new if booking_id in created else changed).append(row)
        return changed, new


def _details(**values: Any) -> str:
    return _json.encode({k: v for k, v in values.items() if v is not None}).decode()


def _cancellation(booking: Booking) -> str:
    """A cancellation's details: its reason (contact details masked), the refund
    (a percentage, by the domain's policy: in full when an admin cancels) and who
    initiated it (``user``, ``admin`` or ``system``)."""
    by = booking.cancelled_by or ""
    reason = booking.cancel_reason
    return _details(
        reason=None if reason is None else redact_contact_details(reason),
        refund=booking.refund_percentage,
        initiator="system" if by == "system" else "admin" if by.startswith("admin") else "user",
    )


def _refusal_row(refused: AttemptRefused) -> AuditRow:
    command = refused.command
    origin = command.origin
    slot_id = command.slot_id
    return (
        refused.at_ms,
        command.request_id,
        command.user_id,
        "attempt",
        slot_id,
        slot_id,
        command.user_id,
        None,
        None,
        "refused",
        _details(
            reason=refused.code,
            command="join_queue" if type(command) is JoinQueue else "reserve",
        ),
        None if type(origin) is not Origin else origin.request_id,
        None if type(origin) is not Origin else origin.client_ip,
        None if type(origin) is not Origin else origin.user_agent,
    )

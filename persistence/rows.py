"""What one flush writes: a shard's events folded into the rows they leave behind.

Pure and synchronous (no I/O), so it is tested without a database and shared
by the writer and the tests' model of storage. Folding keeps the last state
of every record a flush touched: a booking held, confirmed and cancelled
within one flush is written once, as CANCELLED. Every transition still gets
its own audit row.

It must never do I/O nor decide a business rule: the rows are what the events
say.
"""

from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.core.protocol import (
    AnyEvent,
    BookingChanged,
    KeyRecord,
    OutcomeRecord,
    QueueChanged,
    SlotChanged,
)
from engine.core.records import Booking, QueueEntry, SlotView
from engine.core.states import BookingStatus

# The changes of a slot's own settings (counts follow its bookings).
SLOT_SETTING_CHANGES = frozenset({"created", "updated", "deleted"})
# The queue changes people are told of (engine/notify/events.py names them);
# a user leaving the line of their own accord is not one.
NOTIFIED_QUEUE_CHANGES = frozenset({"joined", "notified", "expired", "converted"})

# The columns of the audit_write type (the shard is the flush's).
AuditRow = tuple[int, str, str, str, str, str, str | None, str | None, str | None, str, str | None]

_json = msgspec.json.Encoder()


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

    def add(self, events: list[AnyEvent]) -> None:
        audit = self.audit.append
        notifiable = self.notifiable.append
        self.events += len(events)
        self.raw.extend(events)
        for event in events:
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
                        None,
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
                    )
                )

    def remember(self, outcomes: list[OutcomeRecord], keys: list[KeyRecord]) -> None:
        self.outcomes.extend(outcomes)
        self.keys.extend(keys)

    def empty(self) -> bool:
        return not (self.events or self.outcomes or self.keys)

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

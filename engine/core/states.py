"""Every state rule of bookings, queue entries and slots, as data.

Theory of operation
-------------------
A booking is born PENDING for the instant between a request and its hold and
leaves that state within the same command. From then on it moves only along
``BOOKING_TRANSITIONS``: a table keyed by (state, event). Anything not in the
table is rejected with ``InvalidTransition`` before any state is touched.
EXPIRED, CANCELLED and COMPLETED have no outgoing edges: they are final.
The one edge back to its own state is a hold's extension (RESERVED, extend):
its deadline moves, its status stays, and it is audited like any transition.
A hold released by its owner takes the expire edge (trigger ``released``).

A queue entry is WAITING until the engine offers it a hold (NOTIFIED), and
then CONVERTED when that hold is confirmed, or EXPIRED when the offer lapses.
A WAITING entry can also EXPIRE (inactivity, the slot ended or was deleted).
Leaving the queue deletes the entry rather than moving it.

A slot's status is never stored: ``slot_status`` derives it from the blocked
flag, the clock and the counts, in the precedence docs/api.md gives.
"""

import enum
from typing import Final

from engine.core.errors import InvalidTransition


class BookingStatus(enum.StrEnum):
    PENDING = "PENDING"
    RESERVED = "RESERVED"
    CONFIRMED = "CONFIRMED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"
    COMPLETED = "COMPLETED"


class BookingEvent(enum.StrEnum):
    TAKE_HOLD = "take_hold"
    CONFIRM = "confirm"
    EXPIRE = "expire"
    CANCEL = "cancel"
    COMPLETE = "complete"
    EXTEND = "extend"


BOOKING_TRANSITIONS: Final[dict[tuple[BookingStatus, BookingEvent], BookingStatus]] = {
    (BookingStatus.PENDING, BookingEvent.TAKE_HOLD): BookingStatus.RESERVED,
    (BookingStatus.RESERVED, BookingEvent.CONFIRM): BookingStatus.CONFIRMED,
    (BookingStatus.RESERVED, BookingEvent.EXPIRE): BookingStatus.EXPIRED,
    # The only self-transition: a hold's deadline moves on.
    (BookingStatus.RESERVED, BookingEvent.EXTEND): BookingStatus.RESERVED,
    (BookingStatus.CONFIRMED, BookingEvent.CANCEL): BookingStatus.CANCELLED,
    (BookingStatus.CONFIRMED, BookingEvent.COMPLETE): BookingStatus.COMPLETED,
}

BOOKING_FINAL: Final = frozenset(
    {BookingStatus.EXPIRED, BookingStatus.CANCELLED, BookingStatus.COMPLETED}
)
# Statuses that occupy capacity and count as "the user's booking of this slot".
BOOKING_ACTIVE: Final = frozenset({BookingStatus.RESERVED, BookingStatus.CONFIRMED})


# The same table by status, then event: looked up without building a key tuple
# (it is asked on every change of a booking).
_BOOKING_NEXT: Final[dict[BookingStatus, dict[BookingEvent, BookingStatus]]] = {
    status: {event: to for (origin, event), to in BOOKING_TRANSITIONS.items() if origin is status}
    for status in BookingStatus
}


def next_booking_status(current: BookingStatus, event: BookingEvent) -> BookingStatus:
    """The status ``event`` leads to from ``current``, or ``InvalidTransition``."""
    following = _BOOKING_NEXT[current].get(event)
    if following is None:
        raise InvalidTransition(
            f"a {current} booking cannot {event.value.replace('_', ' ')}",
            {"from": current.value, "event": event.value},
        )
    return following


class QueueStatus(enum.StrEnum):
    WAITING = "WAITING"
    NOTIFIED = "NOTIFIED"
    EXPIRED = "EXPIRED"
    CONVERTED = "CONVERTED"


class QueueEvent(enum.StrEnum):
    OFFER = "offer"
    CONVERT = "convert"
    EXPIRE = "expire"


QUEUE_TRANSITIONS: Final[dict[tuple[QueueStatus, QueueEvent], QueueStatus]] = {
    (QueueStatus.WAITING, QueueEvent.OFFER): QueueStatus.NOTIFIED,
    (QueueStatus.WAITING, QueueEvent.EXPIRE): QueueStatus.EXPIRED,
    (QueueStatus.NOTIFIED, QueueEvent.CONVERT): QueueStatus.CONVERTED,
    (QueueStatus.NOTIFIED, QueueEvent.EXPIRE): QueueStatus.EXPIRED,
}

QUEUE_FINAL: Final = frozenset({QueueStatus.EXPIRED, QueueStatus.CONVERTED})
QUEUE_ACTIVE: Final = frozenset({QueueStatus.WAITING, QueueStatus.NOTIFIED})


def next_queue_status(current: QueueStatus, event: QueueEvent) -> QueueStatus:
    try:
        return QUEUE_TRANSITIONS[(current, event)]
    except KeyError:
        raise InvalidTransition(
            f"a {current} queue entry cannot {event.value}",
            {"from": current.value, "event": event.value},
        ) from None


class SlotStatus(enum.StrEnum):
    AVAILABLE = "AVAILABLE"
    RESERVED = "RESERVED"
    BOOKED = "BOOKED"
    EXPIRED = "EXPIRED"
    BLOCKED = "BLOCKED"


def slot_status(
    *, blocked: bool, ended: bool, capacity: int, confirmed: int, held: int
) -> SlotStatus:
    """docs/api.md's precedence: BLOCKED, EXPIRED, BOOKED, RESERVED, AVAILABLE."""
    if blocked:
        return SlotStatus.BLOCKED
    if ended:
        return SlotStatus.EXPIRED
    if confirmed >= capacity:
        return SlotStatus.BOOKED
    if held > 0:
        return SlotStatus.RESERVED
    return SlotStatus.AVAILABLE


SLOT_TAKES_HOLDS: Final = frozenset({SlotStatus.AVAILABLE, SlotStatus.RESERVED})

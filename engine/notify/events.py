"""The notification events: their names, and which engine events they come from.

It must never do I/O: it is shared by the writer's side (what goes into the
outbox), the delivery workers and the admin API (which event types an endpoint
may subscribe to).
"""

from typing import Final

# Every event a webhook endpoint may subscribe to ("*": all of them).
EVENT_TYPES: Final = (
    "booking.reserved",
    "booking.extended",
    "booking.confirmed",
    "booking.cancelled",
    "booking.expired",
    "booking.completed",
    "queue.joined",
    "queue.offer",
    "queue.offer_expired",
    "queue.converted",
    "slot.created",
    "slot.updated",
    "slot.deleted",
)
ALL_EVENTS: Final = "*"

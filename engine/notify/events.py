"""The notification events' names: what a webhook endpoint may subscribe to.

It must never import anything but the standard library: the gateway's schemas
name these, and engine/notify/notifications.py (which renders the events with
those schemas) builds on them.
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

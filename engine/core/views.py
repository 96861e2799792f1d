"""The read-only projections of a slot and a queue entry that replies and events carry.

Owns how a ``SlotView`` and a ``QueueView`` are built from a slot's state:
the settings part of a slot view built once per version of the slot and
copied with the counts of the moment, the view itself kept until the slot
changes or its end passes, and the estimated wait of the queue. It must never
change a count, a booking or an entry: building a view only fills the slot's
view cache.
"""

from typing import Final

import msgspec

from engine.core.records import Booking, QueueEntry, QueueView, SlotView
from engine.core.slot_state import SlotState
from engine.core.states import QueueStatus, SlotStatus
from engine.core.waiting_line import describe_wait

# Bound once: a compiled build reads a Final as a constant, where an imported
# name is a lookup in the module's dict on every use.
_QueueView: Final = QueueView
_SlotView: Final = SlotView
_replace: Final = msgspec.structs.replace


def slot_view(slot: SlotState, now_ms: int, epoch: str) -> SlotView:
    """The slot as its shard's incarnation ``epoch`` sees it at ``now_ms``."""
    ended = now_ms >= slot.end_ms
    view = slot.view
    if view is not None and slot.view_ended is ended:
        return view
    settings = slot.last_view
    if settings is None or settings.version != slot.version:
        # The settings part, built once per version of the slot: a view then
        # copies it with the counts of the moment, and the settings' boxed
        # numbers carry over. The counts here are never seen.
        settings = _SlotView(
            id=slot.id,
            resource_id=slot.resource_id,
            domain=slot.domain,
            start_ms=slot.start_ms,
            end_ms=slot.end_ms,
            capacity=slot.capacity,
            current_bookings=0,
            held_count=0,
            available=0,
            status=SlotStatus.AVAILABLE,
            queue_length=0,
            blocked=slot.blocked,
            metadata=slot.metadata,
            version=slot.version,
            epoch=epoch,
        )
    view = _replace(
        settings,
        current_bookings=slot.confirmed,
        held_count=slot.held,
        available=slot.capacity - slot.confirmed - slot.held,
        status=slot.status(now_ms),
        queue_length=slot.line.size,
        revision=slot.revision,
        departures=slot.line.departures,
    )
    slot.view = slot.last_view = view
    slot.view_ended = ended
    return view


def wait_per_place_ms(slot: SlotState, now_ms: int) -> int:
    return slot.line.estimated_wait_ms(1, now_ms, prior_ms(slot)) if slot.line.size else 0


def queue_view(
    slot: SlotState, entry: QueueEntry, now_ms: int, epoch: str, bookings: dict[str, Booking]
) -> QueueView:
    """``entry`` of ``slot`` with its place, wait and offer; ``bookings`` holds its offer."""
    # Each of the entry's fields read once: every read is a lookup when compiled.
    status = entry.status
    user_id = entry.user_id
    booking_id = entry.booking_id
    line = slot.line
    position: int | None = None
    wait_s: int | None = None
    if status is QueueStatus.WAITING:
        position = line.position(user_id)
        if position is not None:
            wait_s = -(-line.estimated_wait_ms(position, now_ms, prior_ms(slot)) // 1000)
    offer_expires_at_ms = None
    if status is QueueStatus.NOTIFIED and booking_id is not None:
        offer_expires_at_ms = bookings[booking_id].expires_at_ms
    return _QueueView(
        slot_id=slot.id,
        user_id=user_id,
        status=status,
        seq=entry.seq,
        position=position,
        total_in_queue=line.size,
        estimated_wait_seconds=wait_s,
        estimated_wait_time=describe_wait(wait_s),
        joined_at_ms=entry.joined_at_ms,
        notified_at_ms=entry.notified_at_ms,
        booking_id=booking_id,
        offer_expires_at_ms=offer_expires_at_ms,
        slot=slot_view(slot, now_ms, epoch),
    )


def prior_ms(slot: SlotState) -> int:
    """The wait per place before the line has moved: one hold TTL shared by the capacity."""
    return slot.hold_ttl_ms // max(1, slot.capacity)

"""The shard's invariants, verified in full: the checks tests and the shell run.

Owns ``check_invariants``, which verifies, per slot:
  * 0 <= held, 0 <= confirmed, confirmed + held <= capacity;
  * ``active_by_user`` holds exactly the slot's RESERVED and CONFIRMED
    bookings, one per user, and the counts agree with it;
  * the waiting line holds exactly the WAITING entries, in the idle order by
    last seen, with an idle timer by the front user's deadline; each NOTIFIED
    entry points at a RESERVED hold offered from the queue;
  * if the slot takes holds, it has no free capacity or nobody waits;
  * every RESERVED booking has a hold timer at its ``expires_at_ms``.
The cheap ones are also asserted where counts change
(``SlotState.check_counts``). It costs O(state): it must never run on the
command path, and it must never change anything it checks.
"""

from engine.core.errors import require
from engine.core.records import Booking
from engine.core.slot_state import SlotState, TimerKey
from engine.core.states import BOOKING_FINAL, SLOT_TAKES_HOLDS, BookingStatus, QueueStatus
from engine.core.timer_wheel import TimerWheel


def check_invariants(
    slots: dict[str, SlotState],
    bookings: dict[str, Booking],
    timers: TimerWheel[TimerKey],
    now_ms: int,
) -> None:
    """Verify every invariant of the module docstring (O(state)); ``InvariantViolation`` if not."""
    timers.check()
    holds_seen = 0
    for slot in slots.values():
        slot.check_counts()
        slot.line.check()
        confirmed = held = 0
        for user_id, booking in slot.active_by_user.items():
            require(booking.user_id == user_id, f"{booking.id} indexed under another user")
            require(booking.slot_id == slot.id, f"{booking.id} indexed under another slot")
            require(bookings.get(booking.id) is booking, f"{booking.id} not stored")
            if booking.status is BookingStatus.RESERVED:
                held += 1
                require(
                    timers.deadline_of(("hold", booking.id)) == booking.expires_at_ms,
                    f"hold {booking.id} has no timer at its deadline",
                )
                require(booking.expires_at_ms > now_ms, f"hold {booking.id} is overdue")
            else:
                require(
                    booking.status is BookingStatus.CONFIRMED,
                    f"{booking.id} is {booking.status} but counted as active",
                )
                confirmed += 1
        holds_seen += held
        require(
            (confirmed, held) == (slot.confirmed, slot.held),
            f"slot {slot.id}: counts {slot.confirmed}/{slot.held}"
            f" but bookings say {confirmed}/{held}",
        )
        waiting = {u for u, e in slot.entries.items() if e.status is QueueStatus.WAITING}
        require(waiting == set(slot.line), f"slot {slot.id}: line and entries disagree")
        require(waiting == set(slot.idle), f"slot {slot.id}: idle order and line disagree")
        seen = [slot.entries[u].last_seen_ms for u in slot.idle]
        require(seen == sorted(seen), f"slot {slot.id}: idle order is not by last seen")
        if seen:
            idle_timer_ms = timers.deadline_of(("idle", slot.id))
            require(
                idle_timer_ms is not None and idle_timer_ms <= seen[0] + slot.queue_inactivity_ms,
                f"slot {slot.id}: no idle timer by the front user's deadline",
            )
        require(
            len(list(slot.line)) <= slot.queue_size_max,
            f"slot {slot.id}: line over its size",
        )
        for user_id, entry in slot.entries.items():
            if entry.status is QueueStatus.NOTIFIED:
                offered = slot.active_by_user.get(user_id)
                require(
                    offered is not None
                    and offered.id == entry.booking_id
                    and offered.status is BookingStatus.RESERVED
                    and offered.via_queue,
                    f"slot {slot.id}: NOTIFIED {user_id} has no offered hold",
                )
            if entry.status is QueueStatus.WAITING:
                require(
                    user_id not in slot.active_by_user,
                    f"slot {slot.id}: {user_id} waits while holding",
                )
        if slot.status(now_ms) in SLOT_TAKES_HOLDS:
            require(
                slot.available == 0 or not slot.line.size,
                f"slot {slot.id}: free capacity while users wait",
            )
        if slot.ended:
            require(not slot.active_by_user and not slot.line.size, f"ended slot {slot.id} active")
    for booking in bookings.values():
        if booking.status in BOOKING_FINAL or booking.status is BookingStatus.CONFIRMED:
            continue
        require(booking.status is BookingStatus.RESERVED, f"{booking.id} stuck in {booking.status}")
        owner = slots.get(booking.slot_id)
        require(
            owner is not None and owner.active_by_user.get(booking.user_id) is booking,
            f"hold {booking.id} not indexed by its slot",
        )
    require(
        holds_seen == sum(1 for b in bookings.values() if b.status is BookingStatus.RESERVED),
        "holds outside any slot",
    )

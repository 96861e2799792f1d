"""The waiting queue: joining, positions, offers, claims, leaving, inactivity, fairness."""

from engine.core import protocol as p
from engine.core.states import QueueStatus
from tests.engine.core.conftest import START_MS, Harness
from tests.support.domain import HOUR_MS, MINUTE_MS


def full_slot(h: Harness, capacity: int = 1, **fields: object) -> tuple[str, list[str]]:
    slot_id = h.slot(capacity=capacity, **fields)  # type: ignore[arg-type]
    holds = [h.reserve(slot_id, f"holder{i}").booking.id for i in range(capacity)]
    return slot_id, holds


def test_reserving_a_full_slot_queues_in_order_up_to_the_max(h: Harness) -> None:
    slot_id, _ = full_slot(h)
    queued = [h.reserve(slot_id, user) for user in ("ann", "bob", "cat")]
    assert [r.status for r in queued] == [202, 202, 202]
    assert [r.entry.position for r in queued] == [1, 2, 3]
    assert queued[2].entry.total_in_queue == 3
    again = h.reserve(slot_id, "bob")
    assert (again.status, again.entry.position) == (200, 2)
    refused = h.reserve(slot_id, "dan")
    assert (refused.status, refused.code) == (409, "QueueFull")
    assert h.view(slot_id).queue_length == 3


def test_join_queue_rules(h: Harness) -> None:
    free = h.slot(resource="free")
    assert h.join(free, "ann").code == "SlotAvailable"
    slot_id, (holder_booking,) = full_slot(h)
    assert h.join(slot_id, "holder0").code == "AlreadyHeld"
    joined = h.join(slot_id, "ann")
    assert (joined.status, joined.entry.status, joined.entry.position) == (201, "WAITING", 1)
    assert h.join(slot_id, "ann").status == 200
    h.confirm(holder_booking, "holder0")
    assert h.join(slot_id, "holder0").code == "AlreadyBooked"
    no_queue = h.slot(resource="nq", domain="noqueue")
    h.reserve(no_queue, "x")
    assert h.join(no_queue, "ann").code == "QueueDisabled"
    assert h.join("00000000-snope", "ann").status == 404


def test_a_lapsed_hold_is_offered_to_the_head_with_the_claim_ttl(h: Harness) -> None:
    slot_id, _ = full_slot(h)
    for user in ("ann", "bob", "cat"):
        h.join(slot_id, user)
    h.core.drain_events()
    h.advance(2 * MINUTE_MS)
    ann = h.position(slot_id, "ann").entry
    assert (ann.status, ann.position, ann.notified_at_ms) == ("NOTIFIED", None, h.clock.now_ms())
    assert ann.offer_expires_at_ms == h.clock.now_ms() + MINUTE_MS
    offered = h.booking(ann.booking_id).booking
    assert (offered.user_id, offered.status, offered.via_queue) == ("ann", "RESERVED", True)
    assert [h.position(slot_id, u).entry.position for u in ("bob", "cat")] == [1, 2]
    events = h.core.drain_events()
    offers = [e for e in events if isinstance(e, p.QueueChanged) and e.change == "notified"]
    assert [(e.entry.user_id, e.offer_expires_at_ms) for e in offers] == [
        ("ann", h.clock.now_ms() + MINUTE_MS)
    ]
    assert any(isinstance(e, p.QueueMoved) for e in events)
    # A second reserve by the offered user answers with the offered hold.
    assert h.reserve(slot_id, "ann").booking.id == ann.booking_id


def test_an_unclaimed_offer_expires_and_the_next_user_is_offered(h: Harness) -> None:
    slot_id, _ = full_slot(h)
    h.join(slot_id, "ann")
    h.join(slot_id, "bob")
    h.advance(2 * MINUTE_MS)
    ann_booking = h.position(slot_id, "ann").entry.booking_id
    h.advance(MINUTE_MS)
    ann = h.position(slot_id, "ann").entry
    assert ann.status == QueueStatus.EXPIRED
    assert h.booking(ann_booking).booking.status == "EXPIRED"
    assert h.confirm(ann_booking, "ann").code == "ReservationExpired"
    assert h.position(slot_id, "bob").entry.status == "NOTIFIED"
    # An expired entry may join again, at the back.
    assert h.join(slot_id, "ann").status == 201


def test_confirming_an_offer_converts_the_entry(h: Harness) -> None:
    slot_id, _ = full_slot(h)
    h.join(slot_id, "ann")
    h.advance(2 * MINUTE_MS)
    booking_id = h.position(slot_id, "ann").entry.booking_id
    assert h.confirm(booking_id, "ann").booking.status == "CONFIRMED"
    assert h.position(slot_id, "ann").entry.status == "CONVERTED"
    assert h.join(slot_id, "ann").code == "AlreadyBooked"


def test_a_cancellation_offers_the_freed_place(h: Harness) -> None:
    slot_id, (booking_id,) = full_slot(h)
    h.confirm(booking_id, "holder0")
    h.join(slot_id, "ann")
    h.cancel(booking_id, "holder0")
    assert h.position(slot_id, "ann").entry.status == "NOTIFIED"
    assert h.view(slot_id).held_count == 1


def test_new_arrivals_never_overtake_waiting_users(h: Harness) -> None:
    slot_id, _ = full_slot(h, capacity=2)
    h.join(slot_id, "ann")
    h.advance(2 * MINUTE_MS)  # both holds lapse: ann is offered one, the other frees
    assert h.position(slot_id, "ann").entry.status == "NOTIFIED"
    assert h.reserve(slot_id, "zed").status == 201  # nobody else waits
    h.join(slot_id, "bob")
    assert h.reserve(slot_id, "yan").status == 202  # bob waits: yan queues behind him
    assert h.position(slot_id, "yan").entry.position == 2


def test_leaving_removes_the_entry_and_moves_those_behind(h: Harness) -> None:
    slot_id, _ = full_slot(h)
    for user in ("ann", "bob", "cat"):
        h.join(slot_id, user)
    assert h.leave(slot_id, "bob").status == 204
    assert h.position(slot_id, "bob").status == 404
    assert h.position(slot_id, "cat").entry.position == 2
    assert h.leave(slot_id, "bob").status == 404
    assert h.leave(slot_id, "never").status == 404


def test_leaving_while_notified_gives_the_offer_up(h: Harness) -> None:
    slot_id, _ = full_slot(h)
    h.join(slot_id, "ann")
    h.join(slot_id, "bob")
    h.advance(2 * MINUTE_MS)
    offered = h.position(slot_id, "ann").entry.booking_id
    assert h.leave(slot_id, "ann").status == 204
    assert h.booking(offered).booking.status == "EXPIRED"
    assert h.position(slot_id, "bob").entry.status == "NOTIFIED"
    assert h.position(slot_id, "ann").status == 404


def test_inactive_waiting_users_time_out_and_polling_keeps_them(h: Harness) -> None:
    slot_id, _ = full_slot(h, starts_in_ms=24 * HOUR_MS)
    # Keep the slot full for the whole test.
    for booking in h.run(p.ListBookings, user_id="holder0").items:
        h.confirm(booking.id, "holder0")
    h.join(slot_id, "ann")
    h.join(slot_id, "bob")
    h.advance(3 * HOUR_MS)
    h.position(slot_id, "bob")  # bob shows up; ann does not
    h.advance(HOUR_MS)
    assert h.position(slot_id, "ann").entry.status == QueueStatus.EXPIRED
    bob = h.position(slot_id, "bob").entry
    assert (bob.status, bob.position) == ("WAITING", 1)
    h.advance(4 * HOUR_MS - 1)
    assert h.position(slot_id, "bob").entry.status == "WAITING"


def test_the_wait_estimate_uses_the_observed_pace(h: Harness) -> None:
    slot_id, _ = full_slot(h)
    for user in ("ann", "bob", "cat"):
        h.join(slot_id, user)
    # No history yet: one hold TTL per place for a capacity-1 slot.
    assert h.position(slot_id, "cat").entry.estimated_wait_seconds == 3 * 120
    assert h.position(slot_id, "cat").entry.estimated_wait_time == "~6 minutes"
    h.advance(2 * MINUTE_MS)  # ann offered
    booking_id = h.position(slot_id, "ann").entry.booking_id
    h.advance(10_000)
    h.confirm(booking_id, "ann")
    booking = h.reserve(h.slot(resource="x"), "zzz").booking  # unrelated traffic
    assert booking.status == "RESERVED"
    entry = h.position(slot_id, "cat").entry
    assert entry.position == 2
    assert entry.estimated_wait_seconds is not None and entry.estimated_wait_seconds > 0


def test_slot_end_expires_the_line(h: Harness) -> None:
    slot_id, _ = full_slot(h, starts_in_ms=HOUR_MS, length_ms=HOUR_MS)
    h.join(slot_id, "ann")
    h.advance(2 * HOUR_MS + 1)
    assert h.position(slot_id, "ann").entry.status == "EXPIRED"
    assert h.view(slot_id).queue_length == 0
    assert START_MS  # the harness clock started at START_MS


def test_the_wait_phrase_reads_naturally() -> None:
    from engine.core.waiting_line import describe_wait

    assert [describe_wait(s) for s in (None, 59, 60, 61, 3_599, 3_600, 3_601)] == [
        None,
        "less than a minute",
        "~1 minute",
        "~2 minutes",
        "~60 minutes",
        "~1 hour",
        "~2 hours",
    ]

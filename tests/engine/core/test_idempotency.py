"""Client idempotency keys and request-id replays: first outcome wins, nothing applies twice."""

from engine.core import protocol as p
from tests.engine.core.conftest import HOUR_MS, Harness


def test_same_key_same_request_replays_the_first_outcome(h: Harness) -> None:
    slot_id = h.slot(capacity=5)
    first = h.reserve(slot_id, "ann", idempotency_key="k1")
    replay = h.reserve(slot_id, "ann", idempotency_key="k1")
    assert (first.status, replay.status) == (201, 201)
    assert replay == first
    assert h.view(slot_id).held_count == 1


def test_same_key_other_request_is_refused(h: Harness) -> None:
    one, two = h.slot(resource="a"), h.slot(resource="b")
    h.reserve(one, "ann", idempotency_key="k1")
    refused = h.reserve(two, "ann", idempotency_key="k1")
    assert (refused.status, refused.code) == (409, "IdempotencyKeyReused")
    assert h.view(two).held_count == 0
    # Keys are per user: another user may use the same key.
    assert h.reserve(two, "bob", idempotency_key="k1").status == 201


def test_business_refusals_are_replayed_too(h: Harness) -> None:
    slot_id = h.slot(domain="noqueue")
    h.reserve(slot_id, "ann")
    refused = h.reserve(slot_id, "bob", idempotency_key="k")
    assert refused.code == "SlotFull"
    h.run(p.UpdateSlot, slot_id=slot_id, capacity=2)
    # The first answer stands even though a place is free now.
    assert h.reserve(slot_id, "bob", idempotency_key="k") == refused
    assert h.reserve(slot_id, "bob").status == 201


def test_keys_are_kept_a_day_then_forgotten(h: Harness) -> None:
    slot_id = h.slot(capacity=5, starts_in_ms=48 * HOUR_MS)
    first = h.reserve(slot_id, "ann", idempotency_key="k")
    h.advance(24 * HOUR_MS - 1)
    assert h.reserve(slot_id, "ann", idempotency_key="k") == first
    h.advance(1)
    fresh = h.reserve(slot_id, "ann", idempotency_key="k")
    assert fresh.status == 201 and fresh.booking.id != first.booking.id


def test_a_retried_request_id_applies_once(h: Harness) -> None:
    slot_id = h.slot(capacity=3)
    command = p.Reserve(request_id="batch-7:3", slot_id=slot_id, user_id="ann")
    first = h.core.execute(command, h.clock.now_ms())
    booking_id = first.booking.id
    confirm = p.Confirm(request_id="batch-7:4", booking_id=booking_id, user_id="ann")
    h.core.execute(confirm, h.clock.now_ms())
    events_before = h.core.statistics().events_total
    # The same batch again, as after an actor failure.
    assert h.core.execute(command, h.clock.now_ms()) == first
    assert h.core.execute(confirm, h.clock.now_ms()).booking.status == "CONFIRMED"
    assert h.core.statistics().events_total == events_before
    assert h.core.statistics().replays_total == 2
    assert h.view(slot_id).current_bookings == 1


def test_refused_commands_leave_the_state_unchanged(h: Harness) -> None:
    slot_id = h.slot(capacity=1)
    booking = h.reserve(slot_id, "ann").booking
    h.confirm(booking.id, "ann")
    h.core.drain_events()
    before = (h.view(slot_id), h.booking(booking.id).booking, h.core.statistics().events_total)
    refusals = [
        h.run(p.UpdateSlot, slot_id=slot_id, capacity=0),
        h.run(p.DeleteSlot, slot_id=slot_id),
        h.reserve(slot_id, "ann"),
        h.cancel(booking.id, "bob"),
        h.join(slot_id, "ann"),
        h.leave(slot_id, "ann"),
    ]
    assert all(isinstance(r, p.Failure) for r in refusals)
    after = (h.view(slot_id), h.booking(booking.id).booking, h.core.statistics().events_total)
    assert after == before
    assert h.core.drain_events() == []

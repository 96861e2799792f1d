"""Client idempotency keys and request-id replays: first outcome wins, nothing applies twice."""

from engine.core import limits
from engine.core import protocol as p
from tests.engine.core.conftest import Harness
from tests.support.domain import HOUR_MS


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


def test_request_outcomes_are_kept_for_their_retention_then_forgotten(h: Harness) -> None:
    slot_id = h.slot(capacity=5)
    early = p.Reserve(request_id="early", slot_id=slot_id, user_id="ann")
    first = h.core.execute(early, h.clock.now_ms())
    h.advance(limits.REQUEST_OUTCOMES_RETENTION_MS // 2)
    later = p.Reserve(request_id="later", slot_id=slot_id, user_id="bob")
    later_first = h.core.execute(later, h.clock.now_ms())
    # The last millisecond of the first outcome's retention: still a replay.
    h.advance(limits.REQUEST_OUTCOMES_RETENTION_MS // 2 - 1)
    assert h.core.execute(early, h.clock.now_ms()) == first
    # Past it, the first is forgotten once a new millisecond is remembered;
    # the later one is still within its own.
    h.advance(2)
    h.run(p.Reserve, slot_id=slot_id, user_id="cat")
    assert h.core.statistics().request_outcomes == 2
    assert h.core.execute(later, h.clock.now_ms()) == later_first
    # Forgotten, the first request runs afresh: ann's hold lapsed long ago, so a new one.
    rerun = h.core.execute(early, h.clock.now_ms())
    assert rerun.status == 201 and rerun.booking.id != first.booking.id
    assert h.core.statistics().replays_total == 2


def test_request_outcomes_are_capped_a_millisecond_at_a_time(h: Harness) -> None:
    slot_id = h.slot(capacity=1)
    now_ms = h.clock.now_ms()
    over = limits.REQUEST_OUTCOMES_MAX + 5
    for n in range(over):
        # Cheap to decide, remembered all the same: leaving a queue one is not in.
        h.core.execute(p.LeaveQueue(request_id=f"leave-{n}", slot_id=slot_id, user_id="x"), now_ms)
    # The slot's creation and the leaves, all in one millisecond, stay until the
    # next millisecond is remembered: the cap is kept a millisecond at a time.
    assert h.core.statistics().request_outcomes == over + 1
    h.advance(1)
    h.run(p.LeaveQueue, slot_id=slot_id, user_id="x")
    assert h.core.statistics().request_outcomes == 1


def test_a_storm_of_queue_full_refusals_reports_each_one(h: Harness) -> None:
    slot_id = h.slot(capacity=1)
    h.reserve(slot_id, "holder")
    for user in ("ann", "bob", "cat"):
        h.reserve(slot_id, user)
    refusals = [h.reserve(slot_id, f"late-{n}") for n in range(3)]
    refusals.append(h.join(slot_id, "later"))
    for refused in refusals:
        assert (refused.status, refused.code) == (409, "QueueFull")
        assert refused.details == {"queueLength": 3, "maxSize": 3}
    assert h.core.statistics().failures_total == 4
    # The line moves: a new refusal reports the line as it is.
    h.run(p.LeaveQueue, slot_id=slot_id, user_id="bob")
    assert h.reserve(slot_id, "dan").status == 202
    assert h.reserve(slot_id, "eve").details == {"queueLength": 3, "maxSize": 3}

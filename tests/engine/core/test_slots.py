"""Slot rules: shape, overlap, derived status, capacity changes, deletion, listing."""

import msgspec

from engine.core import protocol as p
from engine.core.records import ShardStatistics
from engine.core.states import SlotStatus
from tests.engine.core.conftest import START_MS, Harness
from tests.support.domain import HOUR_MS, MINUTE_MS


def test_a_new_slot_is_available_with_its_counts(h: Harness) -> None:
    slot = h.view(h.slot(capacity=3))
    assert (slot.status, slot.capacity, slot.available) == (SlotStatus.AVAILABLE, 3, 3)
    assert (slot.current_bookings, slot.held_count, slot.queue_length) == (0, 0, 0)


def test_invalid_shapes_are_422_with_the_field(h: Harness) -> None:
    base = {"resource_id": "r", "domain": "default", "capacity": 1}
    now = START_MS
    cases = [
        ({"capacity": 0, "start_ms": now + HOUR_MS, "end_ms": now + 2 * HOUR_MS}, "capacity"),
        ({"start_ms": now + 2 * HOUR_MS, "end_ms": now + 2 * HOUR_MS}, "endTime"),
        ({"start_ms": now - 2 * HOUR_MS, "end_ms": now - HOUR_MS}, "endTime"),
        ({"start_ms": now, "end_ms": now + 8 * 24 * HOUR_MS}, "endTime"),
    ]
    for i, (fields, field) in enumerate(cases):
        result = h.run(p.CreateSlot, slot_id=f"{'0' * 8}-s{i}", **{**base, **fields})
        assert (result.status, result.code) == (422, "ValidationError")
        assert field in result.details
    unknown = h.run(
        p.CreateSlot,
        slot_id="00000000-sx",
        resource_id="r",
        domain="opera",
        start_ms=now + HOUR_MS,
        end_ms=now + 2 * HOUR_MS,
        capacity=1,
    )
    assert (unknown.status, unknown.details) == (422, {"domain": "unknown domain"})


def test_slots_of_one_resource_never_overlap(h: Harness) -> None:
    h.slot(resource="table-4", starts_in_ms=HOUR_MS, length_ms=HOUR_MS)
    # Back to back is fine, and another resource may use the same time.
    h.slot(resource="table-4", starts_in_ms=2 * HOUR_MS, length_ms=HOUR_MS)
    h.slot(resource="table-5", starts_in_ms=HOUR_MS, length_ms=HOUR_MS)
    clash = h.run(
        p.CreateSlot,
        slot_id="00000000-sclash",
        resource_id="table-4",
        domain="default",
        start_ms=START_MS + HOUR_MS + 30 * MINUTE_MS,
        end_ms=START_MS + 2 * HOUR_MS + 30 * MINUTE_MS,
        capacity=1,
    )
    assert (clash.status, clash.code) == (409, "SlotOverlap")


def test_status_follows_the_precedence_of_the_contract(h: Harness) -> None:
    slot_id = h.slot(capacity=2)
    first = h.reserve(slot_id, "ann").booking
    assert h.view(slot_id).status is SlotStatus.RESERVED
    second = h.reserve(slot_id, "bob").booking
    assert h.view(slot_id).available == 0
    h.confirm(first.id, "ann")
    assert h.view(slot_id).status is SlotStatus.RESERVED  # one hold still active
    h.confirm(second.id, "bob")
    assert h.view(slot_id).status is SlotStatus.BOOKED
    h.run(p.UpdateSlot, slot_id=slot_id, blocked=True)
    assert h.view(slot_id).status is SlotStatus.BLOCKED
    h.run(p.UpdateSlot, slot_id=slot_id, blocked=False)
    h.advance(3 * HOUR_MS)
    assert h.view(slot_id).status is SlotStatus.EXPIRED


def test_capacity_never_drops_below_bookings_and_holds(h: Harness) -> None:
    slot_id = h.slot(capacity=3)
    booking = h.reserve(slot_id, "ann").booking
    h.confirm(booking.id, "ann")
    h.reserve(slot_id, "bob")
    before = h.view(slot_id)
    refused = h.run(p.UpdateSlot, slot_id=slot_id, capacity=1)
    assert (refused.status, refused.code) == (409, "CapacityBelowBookings")
    assert h.view(slot_id) == before
    assert h.run(p.UpdateSlot, slot_id=slot_id, capacity=2).slot.capacity == 2


def test_raising_capacity_and_unblocking_offer_the_waiting_line(h: Harness) -> None:
    slot_id = h.slot(capacity=1)
    h.reserve(slot_id, "ann")
    assert h.reserve(slot_id, "bob").status == 202
    assert h.reserve(slot_id, "cat").status == 202
    h.run(p.UpdateSlot, slot_id=slot_id, capacity=2)
    assert h.position(slot_id, "bob").entry.status == "NOTIFIED"
    h.run(p.UpdateSlot, slot_id=slot_id, blocked=True)
    h.run(p.UpdateSlot, slot_id=slot_id, capacity=3)
    assert h.position(slot_id, "cat").entry.status == "WAITING"  # blocked: no offers
    h.run(p.UpdateSlot, slot_id=slot_id, blocked=False)
    assert h.position(slot_id, "cat").entry.status == "NOTIFIED"


def test_moving_a_slot_checks_overlap_and_moves_its_end(h: Harness) -> None:
    slot_id = h.slot(resource="room", starts_in_ms=HOUR_MS, length_ms=HOUR_MS)
    h.slot(resource="room", starts_in_ms=3 * HOUR_MS, length_ms=HOUR_MS)
    clash = h.run(p.UpdateSlot, slot_id=slot_id, end_ms=START_MS + 3 * HOUR_MS + 1)
    assert clash.code == "SlotOverlap"
    moved = h.run(p.UpdateSlot, slot_id=slot_id, end_ms=START_MS + 2 * HOUR_MS + MINUTE_MS)
    assert moved.slot.end_ms == START_MS + 2 * HOUR_MS + MINUTE_MS
    h.advance(2 * HOUR_MS)
    assert h.view(slot_id).status is SlotStatus.AVAILABLE
    h.advance(MINUTE_MS)
    assert h.view(slot_id).status is SlotStatus.EXPIRED
    assert h.run(p.UpdateSlot, slot_id="00000000-snope", capacity=2).status == 404


def test_delete_refuses_active_bookings_unless_forced(h: Harness) -> None:
    empty = h.slot(resource="a")
    assert h.run(p.DeleteSlot, slot_id=empty).status == 204
    assert h.run(p.GetSlot, slot_id=empty).status == 404

    slot_id = h.slot(resource="b", capacity=2)
    held = h.reserve(slot_id, "ann").booking
    confirmed = h.reserve(slot_id, "bob").booking
    h.confirm(confirmed.id, "bob")
    h.reserve(slot_id, "cat")  # queued
    refused = h.run(p.DeleteSlot, slot_id=slot_id)
    assert (refused.status, refused.code) == (409, "SlotHasBookings")
    h.core.drain_events()
    assert h.run(p.DeleteSlot, slot_id=slot_id, force=True).status == 204
    assert h.booking(held.id).booking.status == "EXPIRED"
    cancelled = h.booking(confirmed.id).booking
    assert (cancelled.status, cancelled.cancel_reason, cancelled.refund_percentage) == (
        "CANCELLED",
        "slot deleted",
        100,
    )
    events = h.core.drain_events()
    expired_entries = [e for e in events if isinstance(e, p.QueueChanged) and e.change == "expired"]
    assert [e.entry.user_id for e in expired_entries] == ["cat"]


def test_listing_filters_and_pages_in_start_order(h: Harness) -> None:
    ids = [
        h.slot(resource="r", starts_in_ms=(i + 1) * HOUR_MS, length_ms=HOUR_MS) for i in range(5)
    ]
    h.slot(resource="other", starts_in_ms=HOUR_MS)
    first = h.run(p.ListSlots, resource_id="r", limit=2).items
    assert [s.id for s in first] == ids[:2]
    after = (first[-1].start_ms, first[-1].id)
    second = h.run(p.ListSlots, resource_id="r", limit=2, after=after).items
    assert [s.id for s in second] == ids[2:4]
    window = h.run(p.ListSlots, from_ms=START_MS + 2 * HOUR_MS, to_ms=START_MS + 4 * HOUR_MS).items
    assert [s.id for s in window] == ids[1:3]
    booking = h.reserve(ids[0], "ann").booking
    h.confirm(booking.id, "ann")
    booked = h.run(p.ListSlots, status=SlotStatus.BOOKED).items
    assert [s.id for s in booked] == [ids[0]]
    available = h.run(p.ListSlots, resource_id="r", available_only=True).items
    assert ids[0] not in [s.id for s in available]


def test_the_statistics_cross_a_process_boundary_as_msgpack(h: Harness) -> None:
    # The engine socket carries them typed: a struct defined in a compiled
    # module would keep ``type`` as the annotation of ``int | None``.
    idle = h.core.statistics()
    assert idle.next_deadline_ms is None
    slot_id = h.slot(capacity=1)
    h.reserve(slot_id, "ann")
    busy = h.core.statistics()
    assert busy.next_deadline_ms is not None
    for statistics in (idle, busy):
        encoded = msgspec.msgpack.encode(statistics)
        assert msgspec.msgpack.decode(encoded, type=ShardStatistics) == statistics

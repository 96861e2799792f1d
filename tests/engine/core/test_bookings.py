"""Booking rules: the transition table, holds, confirmation, cancellation, slot end, audit."""

import itertools
from typing import Any

import pytest

from engine.core import protocol as p
from engine.core.errors import InvalidTransition
from engine.core.routing import make_slot_id
from engine.core.shard import ShardCore
from engine.core.states import (
    BOOKING_FINAL,
    BOOKING_TRANSITIONS,
    BookingEvent,
    BookingStatus,
    next_booking_status,
)
from tests.engine.core.conftest import START_MS, Harness, policy
from tests.support.domain import HOUR_MS, MINUTE_MS


def test_the_table_is_the_contract() -> None:
    assert BOOKING_TRANSITIONS == {
        (BookingStatus.PENDING, BookingEvent.TAKE_HOLD): BookingStatus.RESERVED,
        (BookingStatus.RESERVED, BookingEvent.CONFIRM): BookingStatus.CONFIRMED,
        (BookingStatus.RESERVED, BookingEvent.EXPIRE): BookingStatus.EXPIRED,
        (BookingStatus.RESERVED, BookingEvent.EXTEND): BookingStatus.RESERVED,
        (BookingStatus.CONFIRMED, BookingEvent.CANCEL): BookingStatus.CANCELLED,
        (BookingStatus.CONFIRMED, BookingEvent.COMPLETE): BookingStatus.COMPLETED,
    }


@pytest.mark.parametrize(
    ("status", "event"),
    [
        pair
        for pair in itertools.product(BookingStatus, BookingEvent)
        if pair not in BOOKING_TRANSITIONS
    ],
)
def test_every_other_transition_is_rejected(status: BookingStatus, event: BookingEvent) -> None:
    with pytest.raises(InvalidTransition):
        next_booking_status(status, event)


def test_final_states_have_no_way_out() -> None:
    for status in BOOKING_FINAL:
        assert not any(source is status for source, _ in BOOKING_TRANSITIONS)


def test_reserve_gives_a_hold_with_the_ttl_and_repeats_return_it(h: Harness) -> None:
    slot_id = h.slot(capacity=2)
    first = h.reserve(slot_id, "ann")
    assert first.status == 201
    hold = first.booking
    assert (hold.status, hold.user_id, hold.slot_id) == ("RESERVED", "ann", slot_id)
    assert hold.expires_at_ms == START_MS + 2 * MINUTE_MS
    again = h.reserve(slot_id, "ann")
    assert (again.status, again.booking) == (200, hold)
    assert h.view(slot_id).held_count == 1


def test_confirm_within_the_ttl_and_repeat_confirms_are_harmless(h: Harness) -> None:
    slot_id = h.slot()
    hold = h.reserve(slot_id, "ann").booking
    h.advance(2 * MINUTE_MS - 1)
    confirmed = h.confirm(hold.id, "ann")
    assert (confirmed.status, confirmed.booking.status) == (200, "CONFIRMED")
    assert confirmed.booking.confirmed_at_ms == START_MS + 2 * MINUTE_MS - 1
    again = h.confirm(hold.id, "ann")
    assert again.booking == confirmed.booking
    view = h.view(slot_id)
    assert (view.current_bookings, view.held_count) == (1, 0)
    assert h.reserve(slot_id, "ann").code == "AlreadyBooked"


def test_a_hold_lapses_exactly_at_its_deadline(h: Harness) -> None:
    slot_id = h.slot()
    hold = h.reserve(slot_id, "ann").booking
    h.clock.advance_ms(2 * MINUTE_MS)  # the command itself must fire the due timer
    refused = h.confirm(hold.id, "ann")
    assert (refused.status, refused.code) == (409, "ReservationExpired")
    assert h.booking(hold.id).booking.status == "EXPIRED"
    assert h.view(slot_id).available == 1


def test_only_the_owner_sees_or_confirms_a_booking(h: Harness) -> None:
    slot_id = h.slot()
    hold = h.reserve(slot_id, "ann").booking
    assert h.confirm(hold.id, "bob").status == 404
    assert h.booking(hold.id, "bob", as_admin=False).status == 404
    assert h.booking(hold.id, "ann", as_admin=False).status == 200
    assert h.booking(hold.id, "admin-1", as_admin=True).status == 200
    assert h.confirm("00000000-bnope", "ann").status == 404


def test_cancel_needs_a_confirmed_booking(h: Harness) -> None:
    slot_id = h.slot()
    hold = h.reserve(slot_id, "ann").booking
    refused = h.cancel(hold.id, "ann")
    assert (refused.status, refused.code) == (409, "InvalidTransition")
    h.confirm(hold.id, "ann")
    cancelled = h.cancel(hold.id, "ann", reason="plans changed")
    assert cancelled.booking.status == "CANCELLED"
    assert (cancelled.booking.refund_percentage, cancelled.booking.cancelled_by) == (100, "ann")
    assert h.cancel(hold.id, "ann").code == "InvalidTransition"
    assert h.confirm(hold.id, "ann").code == "InvalidTransition"
    # capacity is back, and the user may book again
    assert h.reserve(slot_id, "ann").status == 201


def test_the_domain_cancellation_window_and_refund(h: Harness) -> None:
    early = h.slot(resource="doc", domain="medical", starts_in_ms=48 * HOUR_MS)
    late = h.slot(resource="doc", domain="medical", starts_in_ms=12 * HOUR_MS)
    for slot_id in (early, late):
        booking = h.reserve(slot_id, "ann").booking
        h.confirm(booking.id, "ann")
        if slot_id == early:
            done = h.cancel(booking.id, "ann")
            assert (done.booking.status, done.booking.refund_percentage) == ("CANCELLED", 50)
        else:
            closed = h.cancel(booking.id, "ann")
            assert (closed.status, closed.code) == (409, "CancellationWindowClosed")
            assert h.booking(booking.id).booking.status == "CONFIRMED"


def test_default_domain_allows_cancelling_until_the_start(h: Harness) -> None:
    slot_id = h.slot(starts_in_ms=HOUR_MS, length_ms=HOUR_MS)
    booking = h.reserve(slot_id, "ann").booking
    h.confirm(booking.id, "ann")
    h.advance(HOUR_MS)
    assert h.cancel(booking.id, "ann").code == "CancellationWindowClosed"


def test_admins_cancel_with_a_reason_at_any_time_with_full_refund(h: Harness) -> None:
    slot_id = h.slot(resource="doc", domain="medical", starts_in_ms=HOUR_MS)
    booking = h.reserve(slot_id, "ann").booking
    h.confirm(booking.id, "ann")
    no_reason = h.cancel(booking.id, "boss", as_admin=True)
    assert (no_reason.status, no_reason.code) == (422, "ValidationError")
    done = h.cancel(booking.id, "boss", as_admin=True, reason="doctor is ill")
    assert done.booking.status == "CANCELLED"
    assert (done.booking.cancel_reason, done.booking.cancelled_by) == (
        "doctor is ill",
        "admin:boss",
    )
    assert done.booking.refund_percentage == 100


def test_the_slot_end_completes_bookings_and_expires_holds(h: Harness) -> None:
    slot_id = h.slot(capacity=2, starts_in_ms=HOUR_MS, length_ms=HOUR_MS)
    confirmed = h.reserve(slot_id, "ann").booking
    h.confirm(confirmed.id, "ann")
    h.advance(HOUR_MS + 30 * MINUTE_MS)
    late_hold = h.reserve(slot_id, "bob").booking  # bookable while running
    h.advance(30 * MINUTE_MS)
    done = h.booking(confirmed.id).booking
    assert (done.status, done.completed_at_ms) == ("COMPLETED", START_MS + 2 * HOUR_MS)
    assert h.booking(late_hold.id).booking.status == "EXPIRED"
    assert h.view(slot_id).status == "EXPIRED"
    refused = h.reserve(slot_id, "cat")
    assert (refused.status, refused.code) == (409, "SlotNotReservable")


def test_blocked_slots_and_the_booking_window_refuse_holds(h: Harness) -> None:
    blocked = h.slot(resource="a", blocked=True)
    assert h.reserve(blocked, "ann").code == "SlotNotReservable"
    assert h.join(blocked, "ann").code == "SlotNotReservable"
    far = h.slot(resource="b", domain="nearby", starts_in_ms=48 * HOUR_MS)
    refused = h.reserve(far, "ann")
    assert (refused.status, refused.code) == (409, "OutsideBookingWindow")
    near = h.slot(resource="c", domain="nearby", starts_in_ms=12 * HOUR_MS)
    assert h.reserve(near, "ann").status == 201
    assert h.reserve("00000000-snope", "ann").status == 404


def test_a_full_slot_without_a_queue_is_slot_full(h: Harness) -> None:
    slot_id = h.slot(domain="noqueue")
    h.reserve(slot_id, "ann")
    refused = h.reserve(slot_id, "bob")
    assert (refused.status, refused.code) == (409, "SlotFull")


def test_every_transition_is_audited(h: Harness) -> None:
    slot_id = h.slot()
    h.core.drain_events()
    hold = h.run(p.Reserve, slot_id=slot_id, user_id="ann", request_id="r-1").booking
    h.run(p.Confirm, booking_id=hold.id, user_id="ann", request_id="r-2")
    h.run(p.Cancel, booking_id=hold.id, user_id="ann", request_id="r-3", reason="x")
    audit = [e for e in h.core.drain_events() if isinstance(e, p.BookingChanged)]
    assert [(e.from_status, e.to_status, e.trigger, e.actor, e.request_id) for e in audit] == [
        ("PENDING", "RESERVED", "reserve", "ann", "r-1"),
        ("RESERVED", "CONFIRMED", "confirm", "ann", "r-2"),
        ("CONFIRMED", "CANCELLED", "cancel", "ann", "r-3"),
    ]
    assert [e.at_ms for e in audit] == [START_MS] * 3
    second = h.reserve(slot_id, "bob").booking
    h.core.drain_events()
    h.advance(2 * MINUTE_MS)
    lapsed = [e for e in h.core.drain_events() if isinstance(e, p.BookingChanged)]
    assert [(e.booking.id, e.to_status, e.trigger, e.actor) for e in lapsed] == [
        (second.id, "EXPIRED", "hold_ttl", "system")
    ]


def test_a_users_bookings_newest_first_with_a_cursor(h: Harness) -> None:
    ids = []
    for i in range(3):
        slot_id = h.slot(resource=f"r{i}")
        ids.append(h.reserve(slot_id, "ann").booking.id)
        h.advance(1)
    page = h.run(p.ListBookings, user_id="ann", limit=2).items
    assert [b.id for b in page] == [ids[2], ids[1]]
    rest = h.run(p.ListBookings, user_id="ann", after=(page[-1].reserved_at_ms, page[-1].id)).items
    assert [b.id for b in rest] == [ids[0]]
    h.confirm(ids[0], "ann")
    confirmed = h.run(p.ListBookings, user_id="ann", status=BookingStatus.CONFIRMED).items
    assert [b.id for b in confirmed] == [ids[0]]
    assert h.run(p.ListBookings, user_id="bob").items == []


def _booking_ids(core: ShardCore, holds: int) -> list[str]:
    slot_id = make_slot_id("ids", "x")
    created = core.execute(
        p.CreateSlot(
            request_id="create",
            slot_id=slot_id,
            resource_id="ids",
            domain="default",
            start_ms=START_MS + HOUR_MS,
            end_ms=START_MS + 2 * HOUR_MS,
            capacity=holds,
        ),
        START_MS,
    )
    assert isinstance(created, p.SlotResult)
    ids = []
    for n in range(holds):
        result = core.execute(
            p.Reserve(request_id=f"r{n}", slot_id=slot_id, user_id=f"u{n}"), START_MS
        )
        assert isinstance(result, p.BookingResult)
        ids.append(result.booking.id)
    return ids


def test_booking_ids_never_repeat_and_differ_between_incarnations() -> None:
    def core(**ids: Any) -> ShardCore:
        return ShardCore(
            shard_id=0, shard_count=1, policies={"default": policy()}, now_ms=START_MS, **ids
        )

    first, second = _booking_ids(core(), 2_000), _booking_ids(core(), 2_000)

    assert len(set(first + second)) == 4_000
    # A fixed seed names the bookings of a replay alike.
    assert _booking_ids(core(id_seed="r"), 3) == _booking_ids(core(id_seed="r"), 3)


def test_a_booking_id_tells_nothing_of_the_next_one() -> None:
    """Ids are not enumerable: beyond the routing key, consecutive ids share nothing."""
    core = ShardCore(shard_id=0, shard_count=1, policies={"default": policy()}, now_ms=START_MS)
    ids = _booking_ids(core, 200)
    uniques = [booking_id.partition("-b")[2] for booking_id in ids]

    assert len({booking_id[:8] for booking_id in ids}) == 1  # the routing key stays in front
    assert all(len(unique) >= 32 for unique in uniques)  # 128 bits or more
    # A shared prefix or a counter would show as long common beginnings.
    ordered = sorted(uniques)  # the longest shared beginning is between neighbours
    common = max(
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        for a, b in itertools.pairwise(ordered)
    )
    assert common <= 8

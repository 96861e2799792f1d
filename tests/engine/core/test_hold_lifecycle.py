"""A hold's own lifecycle: extending it (limits, the slot's start, the timer) and
releasing it (EXPIRED at once, the place offered to the head of the queue); and
the watchers' touch that keeps a waiting user active."""

from typing import Any

import pytest

from engine.core import protocol as p
from engine.core.states import BookingEvent, BookingStatus, next_booking_status
from tests.engine.core.conftest import START_MS, Harness, policy
from tests.support.domain import HOUR_MS, MINUTE_MS, SECOND_MS

EXTENSION_MS = 30 * SECOND_MS


@pytest.fixture
def h() -> Harness:
    return Harness(
        {
            "default": policy(hold_extension_ms=EXTENSION_MS, hold_extensions_max=2),
            "fixed": policy("fixed", hold_extensions_max=0),
            "idle": policy("idle", queue_inactivity_ms=10 * MINUTE_MS),
        }
    )


def _extend(h: Harness, booking_id: str, user: str, **fields: Any) -> Any:
    return h.run(p.ExtendHold, booking_id=booking_id, user_id=user, **fields)


def _release(h: Harness, booking_id: str, user: str, **fields: Any) -> Any:
    return h.run(p.ReleaseHold, booking_id=booking_id, user_id=user, **fields)


def _booking_events(h: Harness) -> list[p.BookingChanged]:
    return [e for e in h.core.drain_events() if type(e) is p.BookingChanged]


def test_extending_is_the_one_self_transition() -> None:
    assert next_booking_status(BookingStatus.RESERVED, BookingEvent.EXTEND) is (
        BookingStatus.RESERVED
    )
    for status in BookingStatus:
        if status is not BookingStatus.RESERVED:
            with pytest.raises(Exception, match="cannot extend"):
                next_booking_status(status, BookingEvent.EXTEND)


def test_an_extension_moves_the_deadline_and_the_timer_and_is_audited(h: Harness) -> None:
    slot_id = h.slot()
    hold = h.reserve(slot_id, "ann").booking
    h.core.drain_events()
    h.advance(MINUTE_MS)
    extended = _extend(h, hold.id, "ann", request_id="ext-1")
    assert extended.status == 200
    booking = extended.booking
    assert booking.status == "RESERVED"
    assert booking.expires_at_ms == hold.expires_at_ms + EXTENSION_MS
    assert (booking.extensions, booking.version) == (1, hold.version + 1)
    (event,) = _booking_events(h)
    assert (event.from_status, event.to_status, event.trigger) == (
        "RESERVED",
        "RESERVED",
        "extended",
    )
    assert (event.request_id, event.actor, event.booking) == ("ext-1", "ann", booking)
    # The old deadline passes: the hold stands; the new one lapses it.
    h.advance(hold.expires_at_ms - h.clock.now_ms())
    assert h.booking(hold.id).booking.status == "RESERVED"
    h.advance(EXTENSION_MS - 1)
    assert h.booking(hold.id).booking.status == "RESERVED"
    h.advance(1)
    assert h.booking(hold.id).booking.status == "EXPIRED"


def test_extensions_stop_at_the_domain_limit(h: Harness) -> None:
    slot_id = h.slot()
    hold = h.reserve(slot_id, "ann").booking
    assert _extend(h, hold.id, "ann").booking.extensions == 1
    second = _extend(h, hold.id, "ann").booking
    assert second.extensions == 2
    refused = _extend(h, hold.id, "ann")
    assert (refused.status, refused.code) == (409, "ExtensionLimitReached")
    assert refused.details == {"extensions": 2, "maxExtensions": 2}
    assert h.booking(hold.id).booking == second


def test_a_domain_without_extensions_refuses_the_first(h: Harness) -> None:
    slot_id = h.slot(domain="fixed")
    hold = h.reserve(slot_id, "ann").booking
    refused = _extend(h, hold.id, "ann")
    assert (refused.status, refused.code) == (409, "ExtensionLimitReached")
    assert h.booking(hold.id).booking == hold


def test_an_extension_never_reaches_past_the_slots_start(h: Harness) -> None:
    # The hold lapses two minutes after the reservation; the slot starts 2m10s after it.
    slot_id = h.slot(starts_in_ms=2 * MINUTE_MS + 10 * SECOND_MS)
    start_ms = START_MS + 2 * MINUTE_MS + 10 * SECOND_MS
    hold = h.reserve(slot_id, "ann").booking
    capped = _extend(h, hold.id, "ann").booking
    assert capped.expires_at_ms == start_ms
    refused = _extend(h, hold.id, "ann")
    assert (refused.status, refused.code) == (409, "HoldAtSlotStart")
    assert refused.details == {"startTimeMs": start_ms}
    assert h.booking(hold.id).booking.extensions == 1


def test_only_a_live_hold_of_ones_own_is_extended(h: Harness) -> None:
    slot_id = h.slot(capacity=2)
    hold = h.reserve(slot_id, "ann").booking
    assert _extend(h, hold.id, "bob").status == 404
    assert _extend(h, "00000000-bnope", "ann").status == 404
    h.confirm(hold.id, "ann")
    confirmed = _extend(h, hold.id, "ann")
    assert (confirmed.status, confirmed.code) == (409, "InvalidTransition")
    lapsing = h.reserve(slot_id, "bob").booking
    h.advance(2 * MINUTE_MS)
    lapsed = _extend(h, lapsing.id, "bob")
    assert (lapsed.status, lapsed.code) == (409, "ReservationExpired")


def test_an_extension_is_applied_once_per_request_id_and_key(h: Harness) -> None:
    slot_id = h.slot()
    hold = h.reserve(slot_id, "ann").booking
    first = _extend(h, hold.id, "ann", request_id="same")
    assert _extend(h, hold.id, "ann", request_id="same") == first
    keyed = _extend(h, hold.id, "ann", idempotency_key="k-1")
    assert _extend(h, hold.id, "ann", idempotency_key="k-1") == keyed
    assert h.booking(hold.id).booking.extensions == 2


def test_an_offered_hold_extended_keeps_its_queue_entry_in_step(h: Harness) -> None:
    slot_id = h.slot()
    hold = h.reserve(slot_id, "ann").booking
    h.reserve(slot_id, "bob")
    _release(h, hold.id, "ann")
    offered = h.position(slot_id, "bob").entry
    extended = _extend(h, offered.booking_id, "bob").booking
    assert h.position(slot_id, "bob").entry.offer_expires_at_ms == extended.expires_at_ms


def test_release_expires_the_hold_and_offers_the_head_of_the_queue_at_once(h: Harness) -> None:
    slot_id = h.slot()
    hold = h.reserve(slot_id, "ann").booking
    h.reserve(slot_id, "bob")
    h.reserve(slot_id, "cy")
    h.core.drain_events()
    released = _release(h, hold.id, "ann", request_id="rel-1")
    assert (released.status, released.booking.status) == (200, "EXPIRED")
    assert released.booking.version == hold.version + 1
    events = h.core.drain_events()
    changes = [e for e in events if type(e) is p.BookingChanged]
    assert [(e.booking.user_id, e.from_status, e.to_status, e.trigger) for e in changes] == [
        ("ann", "RESERVED", "EXPIRED", "released"),
        ("bob", "PENDING", "RESERVED", "queue_offer"),
    ]
    assert all(e.request_id == "rel-1" for e in changes)
    bob = h.position(slot_id, "bob").entry
    assert (bob.status, bob.booking_id) == ("NOTIFIED", changes[1].booking.id)
    assert bob.offer_expires_at_ms == h.clock.now_ms() + MINUTE_MS
    assert h.position(slot_id, "cy").entry.position == 1
    view = h.view(slot_id)
    assert (view.held_count, view.queue_length) == (1, 1)


def test_releasing_an_offered_hold_passes_the_offer_on(h: Harness) -> None:
    slot_id = h.slot()
    hold = h.reserve(slot_id, "ann").booking
    h.reserve(slot_id, "bob")
    h.reserve(slot_id, "cy")
    _release(h, hold.id, "ann")
    offer = h.position(slot_id, "bob").entry.booking_id
    assert _release(h, offer, "bob").booking.status == "EXPIRED"
    assert h.position(slot_id, "bob").entry.status == "EXPIRED"
    assert h.position(slot_id, "cy").entry.status == "NOTIFIED"


def test_release_refuses_what_is_not_a_live_hold_of_ones_own(h: Harness) -> None:
    slot_id = h.slot(capacity=2)
    hold = h.reserve(slot_id, "ann").booking
    assert _release(h, hold.id, "bob").status == 404
    h.confirm(hold.id, "ann")
    confirmed = _release(h, hold.id, "ann")
    assert (confirmed.status, confirmed.code) == (409, "InvalidTransition")
    other = h.reserve(slot_id, "bob").booking
    first = _release(h, other.id, "bob", request_id="r-1")
    assert _release(h, other.id, "bob", request_id="r-1") == first
    again = _release(h, other.id, "bob")
    assert (again.status, again.code) == (409, "InvalidTransition")
    assert _extend(h, other.id, "bob").code == "ReservationExpired"


def test_a_touched_waiting_user_outlives_the_inactivity_timeout(h: Harness) -> None:
    slot_id = h.slot(domain="idle")
    h.confirm(h.reserve(slot_id, "ann").booking.id, "ann")
    h.reserve(slot_id, "watcher")
    h.reserve(slot_id, "idler")
    for _ in range(4):
        h.advance(4 * MINUTE_MS)
        touched = h.run(p.TouchWaiting, places=[(slot_id, "watcher"), ("nowhere", "x")])
        assert touched.status == 204
    assert h.position(slot_id, "watcher").entry.status == "WAITING"
    assert h.position(slot_id, "idler").entry.status == "EXPIRED"


def test_touching_is_not_remembered_and_skips_places_not_waiting(h: Harness) -> None:
    slot_id = h.slot(domain="idle")
    hold = h.reserve(slot_id, "ann").booking
    h.reserve(slot_id, "bob")
    h.core.drain_events()
    before = h.core.statistics().request_outcomes
    h.run(p.TouchWaiting, places=[(slot_id, "ann"), (slot_id, "nobody")], request_id="t")
    h.run(p.TouchWaiting, places=[(slot_id, "bob")], request_id="t")
    assert h.core.statistics().request_outcomes == before
    assert h.core.drain_events() == []  # a touch emits nothing, and is not stored
    h.advance(HOUR_MS)
    assert h.booking(hold.id).booking.status == "EXPIRED"


# -- the grace after a storage outage ---------------------------------------------------


def test_the_outage_grace_moves_only_the_holds_whose_deadline_fell_after_the_last_commit() -> None:
    h = Harness(
        {
            "default": policy(),
            "minute": policy("minute", hold_ttl_ms=MINUTE_MS),
            "three": policy("three", hold_ttl_ms=3 * MINUTE_MS),
            "five": policy("five", hold_ttl_ms=5 * MINUTE_MS),
            "long": policy("long", hold_ttl_ms=20 * MINUTE_MS),
        }
    )
    before = h.reserve(h.slot(domain="minute", resource="r1"), "ann").booking
    during = h.reserve(h.slot(domain="three", resource="r2"), "bob").booking
    soon_after = h.reserve(h.slot(domain="five", resource="r3"), "cy").booking
    later = h.reserve(h.slot(domain="long", resource="r4"), "dee").booking
    kept = h.reserve(h.slot(domain="three", resource="dr-who"), "eve").booking
    confirmed = h.confirm(kept.id, "eve").booking
    h.core.drain_events()
    # The shard last committed two minutes in; it loads again at four, with two
    # minutes of grace: holds due after the commit last until six at least.
    since_ms, now_ms = START_MS + 2 * MINUTE_MS, START_MS + 4 * MINUTE_MS
    until_ms = now_ms + 2 * MINUTE_MS
    extended = h.core.grant_grace(since_ms, until_ms, now_ms)
    assert sorted(b.id for b in extended) == sorted([during.id, soon_after.id])
    events = [e for e in h.core.drain_events() if type(e) is p.BookingChanged]
    assert sorted(e.booking.id for e in events) == sorted([during.id, soon_after.id])
    for event in events:
        assert (event.from_status, event.to_status) == ("RESERVED", "RESERVED")
        assert (event.trigger, event.actor, event.at_ms) == ("outage_grace", "system", now_ms)
        assert event.booking.expires_at_ms == until_ms and event.booking.extensions == 0
    assert h.booking(during.id).booking.version == during.version + 1
    assert h.booking(later.id).booking == later
    assert h.booking(confirmed.id).booking == confirmed

    # The hold due before the last commit expires at once; the others at six.
    h.clock.advance_ms(4 * MINUTE_MS)
    h.advance(0)
    assert h.booking(before.id).booking.status == "EXPIRED"
    assert h.booking(during.id).booking.status == "RESERVED"
    assert h.booking(soon_after.id).booking.status == "RESERVED"
    h.advance(2 * MINUTE_MS - 1)
    assert h.booking(during.id).booking.status == "RESERVED"
    h.advance(1)
    assert h.booking(during.id).booking.status == "EXPIRED"
    assert h.booking(soon_after.id).booking.status == "EXPIRED"
    assert h.booking(later.id).booking.status == "RESERVED"


def test_the_outage_grace_leaves_the_holds_of_an_ended_slot_to_its_end() -> None:
    h = Harness({"default": policy(hold_ttl_ms=5 * MINUTE_MS)})
    slot_id = h.slot(starts_in_ms=MINUTE_MS, length_ms=MINUTE_MS)
    hold = h.reserve(slot_id, "ann").booking
    h.core.drain_events()
    now_ms = START_MS + 3 * MINUTE_MS
    assert hold.expires_at_ms > START_MS
    assert h.core.grant_grace(START_MS, now_ms + 10 * MINUTE_MS, now_ms) == []
    assert h.core.drain_events() == []
    h.clock.advance_ms(3 * MINUTE_MS)
    h.advance(0)
    assert h.booking(hold.id).booking.status == "EXPIRED"

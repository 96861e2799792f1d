"""A hold's extensions and release against real PostgreSQL: the count and the moved
deadline are committed with the booking, survive a restart of the shard's owner,
and every extension and release is an audit row of its own."""

import asyncpg

from engine.core import protocol as p
from engine.core.states import BookingStatus
from engine.shell.clock import SystemClock
from tests.persistence.helpers import (
    Driver,
    booking_row,
    create_slot,
    make_owner,
    request_id,
    slot_on,
)
from tests.support.domain import MINUTE_MS


async def test_extensions_survive_a_restart_and_still_count_against_the_limit(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    owner = make_owner(database_url, redis_namespace)
    await owner.start()
    drive = Driver(owner)
    slot_id = slot_on(0, 1)
    await drive.one(create_slot(slot_id, SystemClock().now_ms(), capacity=1))
    held = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="ann"))
    assert isinstance(held, p.BookingResult)
    hold = held.booking
    extended = await drive.one(
        p.ExtendHold(request_id=request_id(), booking_id=hold.id, user_id="ann")
    )
    assert isinstance(extended, p.BookingResult)
    assert extended.booking.extensions == 1
    # Acknowledged means committed: the count and the new deadline are stored.
    row = await booking_row(db, hold.id)
    assert row is not None
    assert (row["status"], row["extensions"], row["expires_at_ms"], row["version"]) == (
        "RESERVED",
        1,
        hold.expires_at_ms + MINUTE_MS,
        hold.version + 1,
    )
    await owner.close()

    successor = make_owner(database_url, redis_namespace)
    await successor.start()
    drive = Driver(successor)
    loaded = await drive.one(
        p.GetBooking(request_id=request_id(), booking_id=hold.id, user_id="ann")
    )
    assert isinstance(loaded, p.BookingResult)
    assert loaded.booking == extended.booking
    second = await drive.one(
        p.ExtendHold(request_id=request_id(), booking_id=hold.id, user_id="ann")
    )
    assert isinstance(second, p.BookingResult) and second.booking.extensions == 2
    refused = await drive.one(
        p.ExtendHold(request_id=request_id(), booking_id=hold.id, user_id="ann")
    )
    assert isinstance(refused, p.Failure) and refused.code == "ExtensionLimitReached"
    row = await booking_row(db, hold.id)
    assert row is not None
    assert (row["extensions"], row["expires_at_ms"]) == (2, hold.expires_at_ms + 2 * MINUTE_MS)
    await successor.close()


async def test_a_release_is_committed_and_offers_the_place_in_the_same_flush(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    owner = make_owner(database_url, redis_namespace)
    await owner.start()
    drive = Driver(owner)
    slot_id = slot_on(0, 1)
    await drive.one(create_slot(slot_id, SystemClock().now_ms(), capacity=1))
    held = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="ann"))
    assert isinstance(held, p.BookingResult)
    await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="bob"))
    await drive.one(
        p.ExtendHold(request_id=request_id(), booking_id=held.booking.id, user_id="ann")
    )
    released = await drive.one(
        p.ReleaseHold(request_id=request_id(), booking_id=held.booking.id, user_id="ann")
    )
    assert isinstance(released, p.BookingResult)
    assert released.booking.status is BookingStatus.EXPIRED
    # The reply waited for the commit: the release and the offer are both stored.
    row = await booking_row(db, held.booking.id)
    assert row is not None and (row["status"], row["extensions"]) == ("EXPIRED", 1)
    offered = await db.fetchrow(
        "SELECT status, booking_id FROM queue_entries WHERE slot_id = $1 AND user_id = 'bob'",
        slot_id,
    )
    assert offered is not None and offered["status"] == "NOTIFIED"
    offer = await booking_row(db, offered["booking_id"])
    assert offer is not None and (offer["status"], offer["user_id"]) == ("RESERVED", "bob")
    slot_row = await db.fetchrow(
        "SELECT held_count, confirmed_count FROM slots WHERE id = $1", slot_id
    )
    assert (slot_row["held_count"], slot_row["confirmed_count"]) == (1, 0)
    transitions = await db.fetch(
        "SELECT from_status, to_status, trigger, actor FROM audit_log"
        " WHERE entity_id = $1 ORDER BY id",
        held.booking.id,
    )
    assert [tuple(r) for r in transitions] == [
        ("PENDING", "RESERVED", "reserve", "ann"),
        ("RESERVED", "RESERVED", "extended", "ann"),
        ("RESERVED", "EXPIRED", "released", "ann"),
    ]
    await owner.close()

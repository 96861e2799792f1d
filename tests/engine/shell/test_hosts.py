"""The same behaviour over the in-process host and over real Ray shard actors."""

import asyncio
from typing import Any

from engine.core import protocol as p
from engine.core.states import BookingStatus, QueueStatus
from engine.shell import limits
from engine.shell.coalescer import EngineClient
from engine.shell.runtime import RuntimeStatistics
from tests.engine.shell.conftest import WAIT_LIMIT_S, Engine, wait_until


async def test_reserve_confirm_cancel_offers_the_next_queued_user(engine: Engine) -> None:
    slot_id = await engine.slot(capacity=1)

    held = await engine.reserve(slot_id, "alice")
    queued = await engine.reserve(slot_id, "bob")
    assert held.status == 201
    assert held.booking.status is BookingStatus.RESERVED
    assert queued.status == 202
    assert queued.entry.position == 1

    confirmed = await engine.confirm(held.booking.id, "alice")
    assert confirmed.booking.status is BookingStatus.CONFIRMED
    cancelled = await engine.cancel(held.booking.id, "alice")
    assert cancelled.booking.status is BookingStatus.CANCELLED

    offer = await engine.position(slot_id, "bob")
    assert offer.entry.status is QueueStatus.NOTIFIED
    assert offer.entry.booking_id is not None
    offered = await engine.booking(offer.entry.booking_id, "bob")
    assert offered.status is BookingStatus.RESERVED
    assert offered.via_queue
    slot = await engine.view(slot_id)
    assert (slot.current_bookings, slot.held_count, slot.queue_length) == (0, 1, 0)


async def test_a_hold_expires_through_the_real_timer_and_the_next_user_is_offered(
    engine: Engine,
) -> None:
    slot_id = await engine.slot(capacity=1, domain="short")
    held = await engine.reserve(slot_id, "alice")
    assert held.status == 201
    assert (await engine.reserve(slot_id, "bob")).status == 202

    # Nobody sends a command to this slot: only the shell's timer can expire the hold.
    expired = await wait_until(
        lambda: engine.booking(held.booking.id, "alice"),
        lambda booking: booking.status is BookingStatus.EXPIRED,
    )
    assert expired.expires_at_ms >= held.booking.reserved_at_ms

    offer = await engine.position(slot_id, "bob")
    assert offer.entry.status in (QueueStatus.NOTIFIED, QueueStatus.EXPIRED)
    assert offer.entry.booking_id is not None
    # The offered hold has the same short TTL, so it lapses in turn and frees the slot.
    await wait_until(
        lambda: engine.view(slot_id),
        lambda slot: slot.held_count == 0 and slot.available == 1,
    )
    lapsed = await engine.booking(offer.entry.booking_id, "bob")
    assert lapsed.status is BookingStatus.EXPIRED


async def test_concurrent_reserves_on_one_slot_never_exceed_capacity(engine: Engine) -> None:
    capacity = 7
    users = 150
    slot_id = await engine.slot(capacity=capacity)

    results = await asyncio.gather(*(engine.reserve(slot_id, f"user-{n}") for n in range(users)))

    codes = [r.code if isinstance(r, p.Failure) else r.status for r in results]
    assert codes.count(201) == capacity
    assert codes.count(202) == 100  # the domain's queue size
    assert codes.count("QueueFull") == users - capacity - 100
    holders = {r.booking.user_id for r in results if r.status == 201}
    assert len(holders) == capacity
    slot = await engine.view(slot_id)
    assert (slot.held_count, slot.available, slot.queue_length) == (capacity, 0, 100)
    # They arrived in one turn of the loop, so they travelled together.
    assert engine.client.statistics().batch_size_max == users


async def test_a_full_batch_with_a_large_reply_gets_through(engine: Engine) -> None:
    users = limits.BATCH_COMMANDS_MAX
    slot_id = await engine.slot(capacity=users)

    # Over Ray this reply is large enough to travel compressed.
    results = await asyncio.gather(*(engine.reserve(slot_id, f"user-{n}") for n in range(users)))

    assert [r.status for r in results] == [201] * users
    assert len({r.booking.id for r in results}) == users
    assert (await engine.view(slot_id)).held_count == users
    assert engine.client.statistics().batch_size_max == users


async def test_many_slots_across_shards_with_concurrent_users(engine: Engine) -> None:
    slots = await asyncio.gather(*(engine.slot(capacity=3) for _ in range(12)))

    async def book(slot_id: str, user: str) -> Any:
        held = await engine.reserve(slot_id, user)
        if held.status != 201:
            return held
        return await engine.confirm(held.booking.id, user)

    results = await asyncio.gather(*(book(slot_id, f"u{n}") for slot_id in slots for n in range(5)))

    confirmed = [r for r in results if isinstance(r, p.BookingResult)]
    assert len(confirmed) == 3 * len(slots)
    views = await asyncio.gather(*(engine.view(slot_id) for slot_id in slots))
    assert all(view.current_bookings == 3 and view.queue_length == 2 for view in views)


async def test_a_batch_sent_twice_applies_once(engine: Engine) -> None:
    slot_id = await engine.slot(capacity=5)
    codec = p.BatchCodec()
    commands: list[p.AnyCommand] = [
        p.Reserve(request_id=engine.ids.next(), slot_id=slot_id, user_id=f"user-{n}")
        for n in range(3)
    ]
    data = codec.encode_batch(commands)
    shard = engine.client.shard_of(slot_id)
    assert shard is not None
    before = await engine.transport.statistics(shard, timeout_ms=10_000)

    first = codec.decode_reply(await engine.transport.call_batch(shard, data, 10_000))
    again = codec.decode_reply(await engine.transport.call_batch(shard, data, 10_000))

    assert [r.status for r in first] == [201, 201, 201]
    assert again == first
    slot = await engine.view(slot_id)
    assert slot.held_count == 3
    after = await engine.transport.statistics(shard, timeout_ms=10_000)
    assert after.core.replays_total - before.core.replays_total == 3


async def test_statistics_describe_batches_events_and_the_core(engine: Engine) -> None:
    slot_id = await engine.slot(capacity=2)
    await asyncio.gather(*(engine.reserve(slot_id, f"user-{n}") for n in range(4)))
    shard = engine.client.shard_of(slot_id)
    assert shard is not None

    stats = await engine.transport.statistics(shard, timeout_ms=10_000)

    assert isinstance(stats, RuntimeStatistics)
    assert stats.shard_id == shard
    assert stats.batches >= 2
    assert stats.commands >= 5
    assert stats.batch_size_max >= 4
    assert sum(stats.batch_size_histogram) == stats.batches
    assert stats.events > 0
    assert stats.apply_ns > 0
    assert stats.core.holds >= 2
    assert stats.core.waiting >= 2
    assert stats.timer_deadline_ms is not None
    assert not stats.failed
    client_stats = engine.client.statistics()
    assert client_stats.commands_sent == 5
    assert client_stats.batches_sent == 2
    assert client_stats.failed_batches == 0
    assert client_stats.batches_in_flight == (0,) * engine.transport.shard_count


async def test_the_unbatched_client_sends_one_command_per_call(engine: Engine) -> None:
    slot_id = await engine.slot(capacity=2)
    unbatched = EngineClient(engine.transport, coalesce=False)
    engine.client = unbatched

    results = await asyncio.gather(*(engine.reserve(slot_id, f"user-{n}") for n in range(4)))

    assert sorted(r.status for r in results) == [201, 201, 202, 202]
    stats = unbatched.statistics()
    assert (stats.batches_sent, stats.batch_size_max) == (4, 1)
    await unbatched.wait_idle(WAIT_LIMIT_S)

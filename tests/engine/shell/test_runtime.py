"""ShardRuntime on its own: the timer driver, batch limits, failure handling, the sink, counters."""

import asyncio
import time
import uuid
from typing import Any

import pytest

from engine.core import protocol as p
from engine.core.errors import InvariantViolation
from engine.core.routing import make_slot_id
from engine.core.states import BookingStatus
from engine.shell import limits
from engine.shell.clock import SystemClock
from engine.shell.errors import BatchRejected, ShardFailed
from engine.shell.runtime import MemoryEventSink, ShardRuntime
from tests.engine.shell.conftest import WAIT_LIMIT_S, HeldSink
from tests.support.domain import DAY_MS, HOUR_MS, POLICIES


class Shard:
    """One runtime on the real clock, fed through its bytes interface."""

    def __init__(self, **runtime_options: Any) -> None:
        self.sink = MemoryEventSink()
        self.runtime = ShardRuntime.create(
            shard_id=0,
            shard_count=1,
            policies=POLICIES,
            clock=SystemClock(),
            sink=self.sink,
            **runtime_options,
        )
        self.codec = p.BatchCodec()
        self._ids = 0

    def request_id(self) -> str:
        self._ids += 1
        return f"req-{self._ids}"

    async def send(self, *commands: p.AnyCommand) -> list[p.AnyResult]:
        reply = await self.runtime.execute_batch(self.codec.encode_batch(list(commands)))
        return self.codec.decode_reply(reply)

    def create_slot(self, *, capacity: int = 1, domain: str = "default") -> p.CreateSlot:
        resource = f"room-{uuid.uuid4().hex}"
        start_ms = int(time.time() * 1000) + DAY_MS
        return p.CreateSlot(
            request_id=self.request_id(),
            slot_id=make_slot_id(resource, uuid.uuid4().hex),
            resource_id=resource,
            domain=domain,
            start_ms=start_ms,
            end_ms=start_ms + HOUR_MS,
            capacity=capacity,
        )

    def reserve(self, slot_id: str, user: str) -> p.Reserve:
        return p.Reserve(request_id=self.request_id(), slot_id=slot_id, user_id=user)


@pytest.fixture
async def shard() -> Any:
    shard = Shard()
    yield shard
    shard.runtime.close()


async def test_a_hold_expires_by_the_timer_alone(shard: Shard) -> None:
    create = shard.create_slot(domain="short")
    created, held = await shard.send(create, shard.reserve(create.slot_id, "alice"))
    assert created.status == 201
    assert isinstance(held, p.BookingResult)

    expired = await shard.sink.wait_for(
        lambda e: isinstance(e, p.BookingChanged) and e.to_status is BookingStatus.EXPIRED,
        timeout_s=WAIT_LIMIT_S,
    )

    assert isinstance(expired, p.BookingChanged)
    assert expired.booking.id == held.booking.id
    assert expired.at_ms >= held.booking.expires_at_ms
    assert shard.runtime.statistics().timer_firings >= 1
    shard.runtime.check_invariants()


async def test_the_timer_is_armed_for_the_cores_next_deadline(shard: Shard) -> None:
    shard.runtime.start()
    assert shard.runtime.statistics().timer_deadline_ms is None

    create = shard.create_slot()
    await shard.send(create, shard.reserve(create.slot_id, "alice"))

    stats = shard.runtime.statistics()
    assert stats.timer_deadline_ms is not None
    assert stats.timer_deadline_ms == stats.core.next_deadline_ms


async def test_events_reach_the_sink_in_order(shard: Shard) -> None:
    create = shard.create_slot(capacity=2)
    await shard.send(
        create, shard.reserve(create.slot_id, "alice"), shard.reserve(create.slot_id, "bob")
    )

    changes = [e for e in shard.sink.events() if isinstance(e, p.BookingChanged)]
    assert [c.booking.user_id for c in changes] == ["alice", "bob"]
    assert shard.runtime.statistics().events == shard.sink.published


async def test_a_read_a_live_watch_follows_tells_the_publisher_in_its_batch() -> None:
    calls: list[int] = []
    shard = Shard(on_watched=lambda: calls.append(shard.runtime.statistics().batches))
    try:
        create = shard.create_slot()
        slot_id = create.slot_id
        await shard.send(
            create,
            shard.reserve(slot_id, "alice"),
            p.GetSlot(request_id="plain", slot_id=slot_id),
            p.QueuePosition(request_id="plain-position", slot_id=slot_id, user_id="alice"),
            p.ListBookings(request_id="plain-list", user_id="alice"),
        )
        assert calls == []
        # Two watched reads in one batch: told once, before the batch is counted.
        await shard.send(
            p.GetSlot(request_id="watched", slot_id=slot_id, watch=True),
            p.ListBookings(request_id="watched-list", user_id="alice", watch=True),
        )
        assert calls == [1]
        # A watched position read counts even when the user has no entry (404).
        (missing,) = await shard.send(
            p.QueuePosition(request_id="w-pos", slot_id=slot_id, user_id="bob", watch=True)
        )
        assert isinstance(missing, p.Failure) and missing.status == 404
        assert calls == [1, 2]
        await shard.send(p.GetSlot(request_id="plain-again", slot_id=slot_id))
        assert calls == [1, 2]
    finally:
        shard.runtime.close()


async def test_a_batch_over_the_limit_is_refused_whole(shard: Shard) -> None:
    create = shard.create_slot(capacity=limits.BATCH_COMMANDS_MAX + 1)
    too_many = [create] + [
        shard.reserve(create.slot_id, f"user-{n}") for n in range(limits.BATCH_COMMANDS_MAX)
    ]

    with pytest.raises(BatchRejected):
        await shard.send(*too_many)

    (missing,) = await shard.send(p.GetSlot(request_id="get", slot_id=create.slot_id))
    assert isinstance(missing, p.Failure)
    assert missing.code == "NotFound"


async def test_undecodable_bytes_are_refused(shard: Shard) -> None:
    with pytest.raises(BatchRejected):
        await shard.runtime.execute_batch(b"\x93not a batch")
    assert shard.runtime.statistics().batches == 0


async def test_batch_sizes_are_counted_in_power_of_two_buckets(shard: Shard) -> None:
    create = shard.create_slot(capacity=10)
    await shard.send(create)
    await shard.send(*(shard.reserve(create.slot_id, f"u{n}") for n in range(3)))
    await shard.send(*(p.GetSlot(request_id="get", slot_id=create.slot_id) for _ in range(256)))

    stats = shard.runtime.statistics()
    assert (stats.batches, stats.commands, stats.batch_size_max) == (3, 260, 256)
    assert stats.batch_size_histogram[0] == 1
    assert stats.batch_size_histogram[1] == 1
    assert stats.batch_size_histogram[8] == 1
    assert sum(stats.batch_size_histogram) == 3


async def test_a_core_that_raises_stops_the_shard() -> None:
    fatal: list[BaseException] = []
    shard = Shard(on_fatal=fatal.append)
    create = shard.create_slot(domain="short")
    await shard.send(create, shard.reserve(create.slot_id, "alice"))
    assert shard.runtime.statistics().timer_deadline_ms is not None

    # Corrupt the state behind the core's back: its own count check must fire.
    shard.runtime._core._slots[create.slot_id].held = -5
    with pytest.raises(ShardFailed):
        await shard.send(shard.reserve(create.slot_id, "bob"))

    assert len(fatal) == 1
    assert isinstance(fatal[0], InvariantViolation)
    stats = shard.runtime.statistics()
    assert stats.failed
    assert stats.timer_deadline_ms is None
    with pytest.raises(ShardFailed, match="stopped"):
        await shard.send(p.GetSlot(request_id="get", slot_id=create.slot_id))


async def test_the_memory_sink_keeps_only_the_newest_events() -> None:
    sink = MemoryEventSink(events_max=3)
    events = [
        p.QueueMoved(
            at_ms=n, request_id="", actor="system", slot_id="s", removed_seq=n, total_in_queue=0
        )
        for n in range(5)
    ]

    sink.publish(events[:2])
    sink.publish(events[2:])

    assert sink.events() == events[2:]
    assert (sink.published, sink.dropped) == (5, 2)


async def test_the_memory_sink_wakes_a_waiter_on_a_later_event() -> None:
    sink = MemoryEventSink()
    waiting = asyncio.ensure_future(
        sink.wait_for(lambda e: isinstance(e, p.QueueMoved) and e.removed_seq == 7, WAIT_LIMIT_S)
    )
    await asyncio.sleep(0)
    event = p.QueueMoved(
        at_ms=1, request_id="", actor="system", slot_id="s", removed_seq=7, total_in_queue=0
    )

    sink.publish([event])

    assert await waiting == event


class FakeTime:
    """Wall and monotonic nanoseconds, moved by hand."""

    def __init__(self, wall_ms: int) -> None:
        self.wall_ns = wall_ms * 1_000_000
        self.monotonic = 0

    def pass_ms(self, ms: int) -> None:
        self.wall_ns += ms * 1_000_000
        self.monotonic += ms * 1_000_000

    def clock(self) -> SystemClock:
        return SystemClock(wall_ns=lambda: self.wall_ns, monotonic_ns=lambda: self.monotonic)


def test_the_system_clock_keeps_its_pace_when_wall_time_steps_back() -> None:
    fake = FakeTime(wall_ms=5_000_000)
    clock = fake.clock()
    assert clock.now_ms() == 5_000_000
    fake.pass_ms(100)
    fake.wall_ns -= 60_000 * 1_000_000  # NTP steps the wall clock back a minute
    fake.pass_ms(200)
    # Deadlines keep their pace: 300 ms passed, whatever the wall clock says.
    assert clock.now_ms() == 5_000_300


def test_the_system_clock_follows_wall_time_forward_and_never_goes_back() -> None:
    fake = FakeTime(wall_ms=5_000_000)
    clock = fake.clock()
    fake.wall_ns += 500 * 1_000_000  # small drift ahead: absorbed
    assert clock.now_ms() == 5_000_000
    fake.wall_ns += 10_000 * 1_000_000  # a real step forward: followed
    assert clock.now_ms() == 5_010_500
    readings = []
    for _ in range(5):
        fake.pass_ms(1)
        fake.wall_ns -= 3_000_000
        readings.append(clock.now_ms())
    assert readings == sorted(readings)
    assert readings[-1] == 5_010_505


async def test_a_deadline_without_an_armed_timer_breaks_an_invariant(shard: Shard) -> None:
    create = shard.create_slot()
    await shard.send(create, shard.reserve(create.slot_id, "alice"))
    shard.runtime.check_invariants()

    shard.runtime.close()

    with pytest.raises(InvariantViolation, match="armed"):
        shard.runtime.check_invariants()


# -- reads answer once what they read is durable ---------------------------------------


async def _committing(shard: Shard, *commands: p.AnyCommand) -> tuple[list[p.AnyResult], bool]:
    """The answers, and whether they had to wait for a commit (which then happens)."""
    task = asyncio.ensure_future(shard.send(*commands))
    for _ in range(3):
        await asyncio.sleep(0)
    if task.done():
        return task.result(), False
    assert isinstance(shard.sink, HeldSink)
    shard.sink.commit()
    return await task, True


async def _answered(shard: Shard, *commands: p.AnyCommand) -> list[p.AnyResult] | None:
    """The answers if they leave without a commit, None if they wait for one."""
    answers, waited = await _committing(shard, *commands)
    return None if waited else answers


async def test_a_read_waits_only_for_the_slots_it_reads() -> None:
    shard = Shard()
    shard.sink = sink = HeldSink()
    shard.runtime = ShardRuntime.create(
        shard_id=0, shard_count=1, policies=POLICIES, clock=SystemClock(), sink=sink
    )
    quiet, busy = shard.create_slot(), shard.create_slot()
    assert await _answered(shard, quiet, busy) is None  # changes wait for their commit
    held = await _answered(shard, shard.reserve(busy.slot_id, "alice"))
    assert held is None
    (booking,) = await shard.send(
        p.QueuePosition(request_id=shard.request_id(), slot_id=busy.slot_id, user_id="alice"),
    )
    assert booking.status == 404  # durable by now: answered at once, and alice holds, not waits
    # A change of the busy slot is not committed yet...
    await_bob = asyncio.ensure_future(shard.send(shard.reserve(busy.slot_id, "bob")))
    await asyncio.sleep(0)
    assert not await_bob.done()

    # ...so what reads the quiet slot leaves at once,
    quiet_reads = await _answered(
        shard,
        p.GetSlot(request_id=shard.request_id(), slot_id=quiet.slot_id),
        p.QueuePosition(request_id=shard.request_id(), slot_id=quiet.slot_id, user_id="carol"),
        p.GetBooking(request_id=shard.request_id(), booking_id="no-such-booking", user_id="bob"),
    )
    assert quiet_reads is not None
    assert [r.status for r in quiet_reads] == [200, 404, 404]
    # while whatever shows the busy slot waits for its commit.
    await_read = asyncio.ensure_future(
        shard.send(p.GetSlot(request_id=shard.request_id(), slot_id=busy.slot_id))
    )
    await asyncio.sleep(0)
    assert not await_read.done()
    sink.commit()
    (bob,) = await await_bob
    (seen,) = await await_read
    assert isinstance(bob, p.QueueResult)
    assert isinstance(seen, p.SlotResult) and seen.slot.queue_length == 1
    assert shard.runtime.statistics().reads_unheld >= 2
    shard.runtime.close()


async def test_reads_of_a_changed_booking_or_across_slots_wait_for_the_commit() -> None:
    shard = Shard()
    shard.sink = sink = HeldSink()
    shard.runtime = ShardRuntime.create(
        shard_id=0, shard_count=1, policies=POLICIES, clock=SystemClock(), sink=sink
    )
    create = shard.create_slot(capacity=10)
    await _answered(shard, create)
    (held,), waited = await _committing(shard, shard.reserve(create.slot_id, "alice"))
    assert isinstance(held, p.BookingResult) and waited
    reads = (
        p.GetBooking(request_id=shard.request_id(), booking_id=held.booking.id, user_id="alice"),
        p.ListSlots(request_id=shard.request_id()),
        p.ListBookings(request_id=shard.request_id(), user_id="alice"),
    )
    for n, read in enumerate(reads):
        assert await _answered(shard, read) is not None, read  # all durable: at once
        change = asyncio.ensure_future(shard.send(shard.reserve(create.slot_id, f"user-{n}")))
        await asyncio.sleep(0)
        assert not change.done()
        assert await _answered(shard, read) is None, read  # waits for the commit
        await change
    shard.runtime.close()


async def test_a_shard_forgets_the_marks_of_slots_whose_changes_are_durable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "SLOT_MARKS_PRUNE_AT", 8)
    shard = Shard()
    for _ in range(50):
        await shard.send(shard.create_slot())
    # Every change is durable at once in memory: what is remembered stays bounded.
    assert len(shard.runtime._slot_marks) <= 8
    shard.runtime.close()


async def test_reads_beside_changes_leave_early_when_what_they_read_is_durable() -> None:
    shard = Shard()
    shard.sink = sink = HeldSink()
    shard.runtime = ShardRuntime.create(
        shard_id=0, shard_count=1, policies=POLICIES, clock=SystemClock(), sink=sink
    )
    quiet, busy, pending = (shard.create_slot(capacity=1) for _ in range(3))
    assert await _answered(shard, quiet, busy, pending) is None
    # A change of `pending` from an earlier batch, not committed yet.
    earlier = asyncio.ensure_future(shard.send(shard.reserve(pending.slot_id, "dave")))
    await asyncio.sleep(0)
    assert not earlier.done()

    def request() -> str:
        return shard.request_id()

    commands: list[p.AnyCommand] = [
        p.GetSlot(request_id=request(), slot_id=quiet.slot_id),
        shard.reserve(busy.slot_id, "alice"),
        p.QueuePosition(request_id=request(), slot_id=busy.slot_id, user_id="alice"),
        p.GetBooking(request_id=request(), booking_id="no-such-booking", user_id="bob"),
        p.QueuePosition(request_id=request(), slot_id=quiet.slot_id, user_id="carol"),
        p.GetSlot(request_id=request(), slot_id=pending.slot_id),
        p.ListSlots(request_id=request()),
    ]
    early: list[bytes] = []
    batch = asyncio.ensure_future(
        shard.runtime.execute_batch(shard.codec.encode_batch(commands), early.append)
    )
    await asyncio.sleep(0)

    # The batch waits for its change to commit, but its reads of durable slots are out.
    assert not batch.done()
    (data,) = early
    answered = shard.codec.decode_early(data)
    assert answered.indices == [0, 3, 4]
    sink.commit()
    reply = shard.codec.decode_reply(await batch)
    await earlier
    assert answered.results == [reply[index] for index in answered.indices]
    assert [r.status for r in answered.results] == [200, 404, 404]
    assert isinstance(reply[2], p.Failure) and reply[2].status == 404  # alice holds: not queued
    assert shard.runtime.statistics().reads_answered_early == 3

    # A batch that leaves at once (its change was refused, nothing to commit) sends nothing early.
    refused: list[p.AnyCommand] = [
        p.GetSlot(request_id=request(), slot_id=quiet.slot_id),
        shard.reserve(shard.create_slot().slot_id, "alice"),  # a slot never created
    ]
    reply = shard.codec.decode_reply(
        await shard.runtime.execute_batch(shard.codec.encode_batch(refused), early.append)
    )
    assert [r.status for r in reply] == [200, 404]
    assert len(early) == 1
    shard.runtime.close()

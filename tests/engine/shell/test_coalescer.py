"""The coalescer's batching, bounds and retries, over the in-process host with injected faults."""

import asyncio
from typing import Any

import pytest

from engine.core import protocol as p
from engine.core.routing import PartitionMap
from engine.shell import limits
from engine.shell.coalescer import EngineClient, shard_for
from engine.shell.errors import (
    Overloaded,
    ShardBusy,
    ShardCallTimeout,
    ShardUnavailable,
    ShardUnreachable,
    may_have_applied,
)
from engine.shell.inproc import InProcessHost
from engine.shell.runtime import RuntimeStatistics
from tests.engine.shell.conftest import SHARDS, WAIT_LIMIT_S, Engine
from tests.support.domain import POLICIES


class FaultyTransport:
    """Wraps a real host; each planned fault is used by one call, in order."""

    def __init__(self, host: InProcessHost) -> None:
        self.host = host
        # "lost": apply, then lose the reply; "dead": fail before applying; "busy": refuse;
        # "unreachable": never reach the shard; "silent": no answer until the call's timeout.
        self.faults: list[str] = []
        self.sent: list[bytes] = []
        # The timeout each call was given.
        self.timeouts_ms: list[int] = []
        self.gate: asyncio.Event | None = None
        self.calls_waiting = 0

    @property
    def shard_count(self) -> int:
        return self.host.shard_count

    async def call_batch(
        self, shard: int, data: bytes, timeout_ms: int, on_early: Any = None
    ) -> bytes:
        self.sent.append(data)
        self.timeouts_ms.append(timeout_ms)
        if self.gate is not None:
            self.calls_waiting += 1
            await self.gate.wait()
            self.calls_waiting -= 1
        fault = self.faults.pop(0) if self.faults else None
        if fault == "busy":
            raise ShardBusy("too many pending calls")
        if fault == "dead":
            raise ShardUnavailable("actor died")
        if fault == "unreachable":
            raise ShardUnreachable("no engine listens")
        if fault == "silent":
            await asyncio.sleep(timeout_ms / 1000)
            raise ShardCallTimeout(f"no answer in {timeout_ms} ms")
        reply = await self.host.call_batch(shard, data, timeout_ms, on_early)
        if fault == "lost":
            raise ShardUnavailable("actor died after applying")
        return reply

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics:
        return await self.host.statistics(shard, timeout_ms)

    async def check_invariants(self, shard: int, timeout_ms: int) -> None:
        await self.host.check_invariants(shard, timeout_ms)


@pytest.fixture
async def faulty() -> Any:
    host = InProcessHost(shard_count=SHARDS, policies=POLICIES)
    yield FaultyTransport(host)
    for shard in range(SHARDS):
        await host.check_invariants(shard, 10_000)
    host.close()


def engine_over(transport: Any, **options: Any) -> Engine:
    options.setdefault("retry_backoff_ms", 1)
    return Engine(transport, EngineClient(transport, **options))


async def test_a_reply_lost_after_applying_is_resent_and_applied_once(
    faulty: FaultyTransport,
) -> None:
    engine = engine_over(faulty)
    slot_id = await engine.slot(capacity=3)
    faulty.sent.clear()
    faulty.faults = ["lost"]

    held = await engine.reserve(slot_id, "alice")

    assert held.status == 201
    assert len(faulty.sent) == 2
    assert faulty.sent[0] == faulty.sent[1]
    assert engine.client.statistics().retries == 1
    slot = await engine.view(slot_id)
    assert slot.held_count == 1
    shard = shard_for(
        p.GetSlot(request_id="x", slot_id=slot_id), PartitionMap.spread(SHARDS, SHARDS)
    )
    assert shard is not None
    assert (await faulty.statistics(shard, 10_000)).core.replays_total == 1


async def test_a_shard_unreachable_past_the_patience_fails_the_batch_as_applying_nothing(
    faulty: FaultyTransport,
) -> None:
    engine = engine_over(faulty, retries_max=1_000, unavailable_patience_ms=200)
    slot_id = await engine.slot(capacity=3)
    faulty.sent.clear()
    faulty.faults = ["unreachable"] * 10_000

    with pytest.raises(ShardUnreachable) as failed:
        async with asyncio.timeout(WAIT_LIMIT_S):
            await engine.reserve(slot_id, "alice")

    assert not may_have_applied(failed.value)
    # Resent while the patience lasted, then given up: not a thousand times.
    assert 2 <= len(faulty.sent) < 20
    faulty.faults = []
    assert (await engine.view(slot_id)).held_count == 0


async def test_a_batch_that_reached_its_shard_fails_past_the_patience_as_outcome_unknown(
    faulty: FaultyTransport,
) -> None:
    engine = engine_over(faulty, retries_max=1_000, unavailable_patience_ms=200)
    slot_id = await engine.slot(capacity=3)
    faulty.sent.clear()
    faulty.timeouts_ms.clear()
    # Applied, its reply lost; then the shard cannot be reached, or does not answer.
    faulty.faults = ["lost", "unreachable", "silent"] * 1_000
    reserve = p.Reserve(request_id=engine.ids.next(), slot_id=slot_id, user_id="alice")

    with pytest.raises((ShardUnavailable, ShardCallTimeout)) as failed:
        async with asyncio.timeout(WAIT_LIMIT_S):
            await engine.client.execute(reserve)

    assert may_have_applied(failed.value)
    assert len(set(faulty.sent)) == 1  # the same bytes every time
    # Only the first call waited the full call timeout; every resend ended with the patience.
    assert faulty.timeouts_ms[0] == limits.ACTOR_CALL_TIMEOUT_MS
    assert all(timeout_ms <= 200 for timeout_ms in faulty.timeouts_ms[1:])
    # It was applied: asked again (the same request id), the shard answers the first outcome.
    faulty.faults = []
    held = await engine.client.execute(reserve)
    assert held.status == 201
    assert (await engine.view(slot_id)).held_count == 1


async def test_backpressure_is_waited_out(faulty: FaultyTransport) -> None:
    engine = engine_over(faulty)
    slot_id = await engine.slot(capacity=3)
    faulty.faults = ["busy", "busy"]

    held = await engine.reserve(slot_id, "alice")

    assert held.status == 201
    stats = engine.client.statistics()
    assert (stats.busy_retries, stats.retries) == (2, 0)


async def test_retries_are_limited(faulty: FaultyTransport) -> None:
    engine = engine_over(faulty, retries_max=2)
    slot_id = await engine.slot(capacity=3)
    faulty.sent.clear()
    faulty.faults = ["dead"] * 10

    with pytest.raises(ShardUnavailable):
        await engine.reserve(slot_id, "alice")

    assert len(faulty.sent) == 3
    stats = engine.client.statistics()
    assert (stats.retries, stats.failed_batches) == (2, 1)


async def test_backpressure_that_never_clears_ends_in_a_refusal_that_applied_nothing(
    faulty: FaultyTransport,
) -> None:
    engine = engine_over(faulty, call_timeout_ms=20)
    slot_id = await engine.slot(capacity=3)
    faulty.faults = ["busy"] * 10_000

    with pytest.raises(ShardBusy, match="stayed busy") as refused:
        await engine.reserve(slot_id, "alice")

    assert not may_have_applied(refused.value)


async def test_a_shard_with_too_many_waiting_commands_sheds_load(faulty: FaultyTransport) -> None:
    engine = engine_over(faulty, pending_commands_max=2)
    slot_id = await engine.slot(capacity=3)

    results = await asyncio.gather(
        *(engine.reserve(slot_id, f"user-{n}") for n in range(3)), return_exceptions=True
    )

    assert [r.status for r in results[:2]] == [201, 201]  # type: ignore[union-attr]
    assert isinstance(results[2], Overloaded)
    assert engine.client.statistics().overloaded == 1


async def test_big_bursts_split_into_batches_of_the_limit(faulty: FaultyTransport) -> None:
    engine = engine_over(faulty)
    slot_id = await engine.slot()
    faulty.sent.clear()
    burst = 2 * limits.BATCH_COMMANDS_MAX + 88

    views = await asyncio.gather(*(engine.view(slot_id) for _ in range(burst)))

    assert len(views) == burst
    stats = engine.client.statistics()
    assert stats.batch_size_max == limits.BATCH_COMMANDS_MAX
    assert len(faulty.sent) == 3


async def test_calls_in_flight_per_shard_are_bounded(faulty: FaultyTransport) -> None:
    engine = engine_over(faulty, coalesce=False)
    slot_id = await engine.slot(capacity=100)
    faulty.gate = asyncio.Event()
    callers = limits.SHARD_PENDING_CALLS_MAX + 6

    pending = asyncio.gather(*(engine.reserve(slot_id, f"user-{n}") for n in range(callers)))
    async with asyncio.timeout(WAIT_LIMIT_S):
        while faulty.calls_waiting < limits.SHARD_PENDING_CALLS_MAX:
            await asyncio.sleep(0)
    shard = shard_for(
        p.GetSlot(request_id="x", slot_id=slot_id), PartitionMap.spread(SHARDS, SHARDS)
    )
    assert shard is not None
    stats = engine.client.statistics()
    assert stats.batches_in_flight[shard] == limits.SHARD_PENDING_CALLS_MAX
    assert stats.pending_commands[shard] == 6

    faulty.gate.set()
    results = await pending

    assert all(r.status == 201 for r in results)


async def test_an_id_the_engine_never_issued_is_not_found_without_a_call(
    faulty: FaultyTransport,
) -> None:
    engine = engine_over(faulty)

    result = await engine.run(p.GetBooking, booking_id="not-an-id", user_id="alice")

    assert isinstance(result, p.Failure)
    assert result.code == "NotFound"
    assert faulty.sent == []


async def test_a_command_the_wire_cannot_carry_is_refused_alone(faulty: FaultyTransport) -> None:
    engine = engine_over(faulty)
    slot_id = await engine.slot(capacity=5)
    shard = shard_for(
        p.GetSlot(request_id="r", slot_id=slot_id), PartitionMap.spread(SHARDS, SHARDS)
    )
    faulty.sent.clear()

    # Sent in one turn of the loop, so all of them leave in one batch.
    surrogate, too_big, held, read = await asyncio.gather(
        engine.reserve(slot_id, "ann\ud800"),
        engine.client.execute(
            p.ListSlots(request_id=engine.ids.next(), after=(2**70, "x")), shard=shard
        ),
        engine.reserve(slot_id, "bob"),
        engine.run(p.GetSlot, slot_id=slot_id),
    )

    assert isinstance(surrogate, p.Failure) and surrogate.status == 422, surrogate
    assert surrogate.details == {"userId": "must be valid Unicode (no lone surrogates)"}
    assert isinstance(too_big, p.Failure) and too_big.status == 422, too_big
    assert isinstance(held, p.BookingResult) and held.status == 201
    assert isinstance(read, p.SlotResult) and read.slot.held_count == 1
    assert len(faulty.sent) == 1
    assert engine.client.statistics().failed_batches == 0


async def test_commands_spanning_shards_need_an_explicit_shard(faulty: FaultyTransport) -> None:
    engine = engine_over(faulty)
    slot_id = await engine.slot(capacity=2)
    held = await engine.reserve(slot_id, "alice")
    listing = p.ListBookings(request_id=engine.ids.next(), user_id="alice")

    with pytest.raises(ValueError, match="spans shards"):
        await engine.client.execute(listing)
    pages = [await engine.client.execute(listing, shard=n) for n in range(SHARDS)]

    found = [b.id for page in pages if isinstance(page, p.BookingPage) for b in page.items]
    assert found == [held.booking.id]


async def test_a_partial_batch_waits_for_the_reply_in_flight(faulty: FaultyTransport) -> None:
    engine = engine_over(faulty)
    slot_id = await engine.slot(capacity=20)
    faulty.sent.clear()
    faulty.gate = asyncio.Event()
    codec = p.BatchCodec()

    first = asyncio.ensure_future(engine.reserve(slot_id, "first"))
    async with asyncio.timeout(WAIT_LIMIT_S):
        while faulty.calls_waiting < 1:
            await asyncio.sleep(0)
    later = [asyncio.ensure_future(engine.reserve(slot_id, f"user-{n}")) for n in range(10)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(faulty.sent) == 1
    faulty.gate.set()
    results = await asyncio.gather(first, *later)

    assert [r.status for r in results] == [201] * 11
    assert [len(codec.decode_batch(data)) for data in faulty.sent] == [1, 10]


class ChangesHeldTransport(FaultyTransport):
    """Holds every batch that carries a change until ``release``; reads pass."""

    def __init__(self, host: InProcessHost) -> None:
        super().__init__(host)
        self.codec = p.BatchCodec()
        self.released = asyncio.Event()
        self.released.set()
        self.batches: list[list[p.AnyCommand]] = []

    async def call_batch(
        self, shard: int, data: bytes, timeout_ms: int, on_early: Any = None
    ) -> bytes:
        commands = self.codec.decode_batch(data)
        self.batches.append(commands)
        if not all(type(c) in p.READ_ONLY_COMMANDS for c in commands):
            await self.released.wait()
        return await self.host.call_batch(shard, data, timeout_ms, on_early)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _kinds(batch: list[p.AnyCommand]) -> set[bool]:
    return {type(command) in p.READ_ONLY_COMMANDS for command in batch}


async def test_reads_alone_do_not_wait_for_the_changes_in_flight() -> None:
    host = InProcessHost(shard_count=1, policies=POLICIES)
    transport = ChangesHeldTransport(host)
    engine = engine_over(transport)
    quiet, busy = await engine.slot(capacity=5), await engine.slot(capacity=5)
    transport.released.clear()
    transport.batches.clear()

    changes = [asyncio.ensure_future(engine.reserve(busy, f"user-{n}")) for n in range(20)]
    await _settle()
    assert [_kinds(batch) for batch in transport.batches] == [{False}]  # in flight, held
    reads = [asyncio.ensure_future(engine.view(quiet)) for _ in range(20)]
    views = await asyncio.wait_for(asyncio.gather(*reads), WAIT_LIMIT_S)
    assert all(view.id == quiet for view in views)
    assert not any(change.done() for change in changes)
    assert [_kinds(batch) for batch in transport.batches] == [{False}, {True}]

    # With changes waiting too, the reads leave without them; the changes wait their turn.
    late_change = asyncio.ensure_future(engine.reserve(busy, "late"))
    late_reads = [asyncio.ensure_future(engine.view(quiet)) for _ in range(3)]
    views = await asyncio.wait_for(asyncio.gather(*late_reads), WAIT_LIMIT_S)
    assert all(view.id == quiet for view in views)
    assert not late_change.done()
    assert [_kinds(batch) for batch in transport.batches] == [{False}, {True}, {True}]
    transport.released.set()
    answers = await asyncio.wait_for(asyncio.gather(*changes, late_change), WAIT_LIMIT_S)
    assert sorted(a.status for a in answers) == [201] * 5 + [202] * 16
    assert [_kinds(batch) for batch in transport.batches] == [{False}, {True}, {True}, {False}]
    assert [len(batch) for batch in transport.batches[2:]] == [3, 1]
    stats = engine.client.statistics()
    assert stats.pending_commands == (0,) and stats.batches_in_flight == (0,)
    host.close()

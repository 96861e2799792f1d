"""The watches behind the live routes, fed by hand: what a snapshot already has is
skipped, what follows is applied once, and a gap or a new shard incarnation makes
the watch read its state afresh.

The engine is a real in-process host; its in-memory sink keeps every event, so a
test can deliver them late, twice, or leave some out, as pub/sub might.
"""

import json
import time
import uuid
from typing import Any

import msgspec

from engine.core import protocol as p
from engine.core.routing import make_slot_id
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.inproc import InProcessHost
from engine.shell.runtime import MemoryEventSink
from gateway.live.outbox import Outbox
from gateway.live.watches import BookingWatch, QueueWatch
from tests.support.domain import DAY_MS, POLICIES


class Collected:
    """An outbox that keeps every message, decoded."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def put(self, data: bytes) -> None:
        self.messages.append(json.loads(data))

    def positions(self) -> list[int | None]:
        return [m["position"] for m in self.messages if m["type"] == "queue.position"]

    def clear(self) -> None:
        self.messages.clear()


class Setup:
    def __init__(self) -> None:
        self.host = InProcessHost(shard_count=1, policies=POLICIES)
        self.engine = EngineClient(self.host)
        self.ids = RequestIds()
        self.slot_id = make_slot_id("room", uuid.uuid4().hex)
        sink = self.host.sink(0)
        assert isinstance(sink, MemoryEventSink)
        self.sink = sink

    async def run(self, command: p.AnyCommand) -> p.AnyResult:
        result = await self.engine.execute(command)
        assert not isinstance(result, p.Failure), result
        return result

    async def queued_slot(self, users: list[str]) -> None:
        start_ms = int(time.time() * 1000) + DAY_MS
        await self.run(
            p.CreateSlot(
                request_id=self.ids.next(),
                slot_id=self.slot_id,
                resource_id="room",
                domain="default",
                start_ms=start_ms,
                end_ms=start_ms + DAY_MS // 24,
                capacity=1,
            )
        )
        for user in ["holder", *users]:
            await self.run(
                p.Reserve(request_id=self.ids.next(), slot_id=self.slot_id, user_id=user)
            )

    async def leave(self, user: str) -> list[p.AnyEvent]:
        """The events of ``user`` leaving the queue."""
        mark = self.sink.published
        await self.run(p.LeaveQueue(request_id=self.ids.next(), slot_id=self.slot_id, user_id=user))
        return self.sink.events()[mark - self.sink.published :]

    def watch(self, user: str, out: Collected) -> QueueWatch:
        return QueueWatch(self.engine, self.ids, self.slot_id, user, out)  # type: ignore[arg-type]


def _deliver(watch: QueueWatch | BookingWatch, events: list[p.AnyEvent]) -> None:
    for event in events:
        watch.deliver(event)


async def _settle(watch: QueueWatch) -> None:
    """Wait for a resync the watch started, if any."""
    task = watch._resyncing
    if task is not None:
        await task


async def test_a_departure_the_snapshot_has_is_skipped_and_the_next_applied_once() -> None:
    setup = Setup()
    await setup.queued_slot(["u1", "u2", "u3", "u4", "u5"])
    # u1 leaves before the watch reads its state; the event reaches the watch after.
    late = await setup.leave("u1")
    out = Collected()
    watch = setup.watch("u5", out)
    await watch.start()
    assert out.positions() == [4]
    assert [m["type"] for m in out.messages] == ["queue.position", "slot.updated"]
    out.clear()
    _deliver(watch, late)
    assert out.positions() == []  # already in the snapshot
    moved = await setup.leave("u2")
    _deliver(watch, moved)
    assert out.positions() == [3]
    _deliver(watch, moved)  # delivered twice
    assert out.positions() == [3]
    assert watch.resyncs == 0


async def test_a_departure_behind_the_watcher_changes_only_the_total() -> None:
    setup = Setup()
    await setup.queued_slot(["u1", "u2", "u3"])
    out = Collected()
    watch = setup.watch("u1", out)
    await watch.start()
    out.clear()
    _deliver(watch, await setup.leave("u3"))
    update = next(m for m in out.messages if m["type"] == "queue.position")
    assert update["position"] == 1 and update["totalInQueue"] == 2


async def test_a_missed_departure_makes_the_watch_read_its_state_again() -> None:
    setup = Setup()
    await setup.queued_slot(["u1", "u2", "u3", "u4"])
    out = Collected()
    watch = setup.watch("u4", out)
    await watch.start()
    out.clear()
    await setup.leave("u1")  # lost on the way
    _deliver(watch, await setup.leave("u2"))
    await _settle(watch)
    assert watch.resyncs == 1
    assert out.positions() == [2]  # read afresh, not 3


async def test_another_shard_incarnation_makes_the_watch_read_its_state_again() -> None:
    setup = Setup()
    await setup.queued_slot(["u1", "u2"])
    out = Collected()
    watch = setup.watch("u2", out)
    await watch.start()
    out.clear()
    events = await setup.leave("u1")
    moved = [e for e in events if isinstance(e, p.QueueMoved)]
    assert len(moved) == 1
    # As if the shard had restarted: same departure count, another epoch.
    _deliver(watch, [msgspec.structs.replace(moved[0], epoch="another")])
    await _settle(watch)
    assert watch.resyncs == 1
    assert out.positions() == [1]


async def test_events_arriving_during_a_resync_are_applied_after_it() -> None:
    setup = Setup()
    await setup.queued_slot(["u1", "u2", "u3", "u4"])
    out = Collected()
    watch = setup.watch("u4", out)
    await watch.start()
    out.clear()
    await setup.leave("u1")  # missed: the next one starts a resync
    _deliver(watch, await setup.leave("u2"))
    later = await setup.leave("u3")
    _deliver(watch, later)  # while the resync reads its snapshot
    await _settle(watch)
    assert out.positions()[-1] == 1
    assert watch.departures == 3


async def test_the_offer_reaches_the_head_with_its_deadline() -> None:
    setup = Setup()
    await setup.queued_slot(["u1"])
    out = Collected()
    watch = setup.watch("u1", out)
    await watch.start()
    out.clear()
    held = await setup.run(
        p.Reserve(request_id=setup.ids.next(), slot_id=setup.slot_id, user_id="holder")
    )
    assert isinstance(held, p.BookingResult)
    mark = setup.sink.published
    await setup.run(
        p.Confirm(request_id=setup.ids.next(), booking_id=held.booking.id, user_id="holder")
    )
    await setup.run(
        p.Cancel(request_id=setup.ids.next(), booking_id=held.booking.id, user_id="holder")
    )
    _deliver(watch, setup.sink.events()[mark - setup.sink.published :])
    kinds = [m["type"] for m in out.messages]
    assert "queue.offer" in kinds
    offer = next(m for m in out.messages if m["type"] == "queue.offer")
    position = [m for m in out.messages if m["type"] == "queue.position"][-1]
    assert position["status"] == "NOTIFIED" and position["bookingId"] == offer["bookingId"]
    assert position["totalInQueue"] == 0
    # The head's own departure sends nothing of its own: only the offer says so.
    assert [m["status"] for m in out.messages if m["type"] == "queue.position"] == ["NOTIFIED"]


async def test_a_booking_watch_sends_each_version_once() -> None:
    setup = Setup()
    await setup.queued_slot([])
    out = Collected()
    watch = BookingWatch(setup.engine, setup.ids, "holder", out)  # type: ignore[arg-type]
    await watch.start()
    assert [m["booking"]["status"] for m in out.messages] == ["RESERVED"]
    created = [e for e in setup.sink.events() if isinstance(e, p.BookingChanged)]
    _deliver(watch, created)  # the snapshot has it
    assert len(out.messages) == 1
    booking_id = out.messages[0]["booking"]["id"]
    mark = setup.sink.published
    await setup.run(p.Confirm(request_id=setup.ids.next(), booking_id=booking_id, user_id="holder"))
    confirmed = setup.sink.events()[mark - setup.sink.published :]
    _deliver(watch, confirmed)
    _deliver(watch, confirmed)
    assert [m["booking"]["status"] for m in out.messages] == ["RESERVED", "CONFIRMED"]


async def test_an_outbox_past_its_limit_overflows_and_stops_sending() -> None:
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    outbox = Outbox(send, messages_max=2)
    outbox.put(b"1")
    outbox.put(b"2")
    assert not outbox.overflowed
    outbox.put(b"3")
    assert outbox.overflowed and outbox.closed
    await outbox.run()
    assert sent == []  # a consumer this far behind is dropped, not served late
    healthy = Outbox(send, messages_max=2)
    healthy.put(b"a")
    healthy.close()
    await healthy.run()
    assert sent == [b"a"]

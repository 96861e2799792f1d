"""The gateway's event bus on a real Redis: it decodes only what someone watches,
in order, and after losing Redis it reconnects by itself and makes every watch
read its state again (what was published meanwhile is lost to it)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import msgspec
import redis.asyncio as aioredis

from config.redis_keys import MAP_CHANGED, RedisKeys, slot_topic, user_topic
from engine.core import protocol as p
from engine.shell.events import EventPublisher
from gateway.live.bus import EventBus
from persistence.services import PrivateRedis
from tests.conftest import REDIS_URL

pytest_plugins = ["tests.support.fixtures"]

WAIT_LIMIT_S = 10.0


class Recorder:
    def __init__(self) -> None:
        self.events: list[p.AnyEvent] = []
        self.resyncs = 0
        self.changed = asyncio.Event()

    def deliver(self, event: p.AnyEvent) -> None:
        self.events.append(event)
        self.changed.set()

    def resync(self) -> None:
        self.resyncs += 1
        self.changed.set()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_LIMIT_S):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


def _moved(slot_id: str, departures: int) -> p.QueueMoved:
    return p.QueueMoved(
        at_ms=1, request_id="r", actor="system", slot_id=slot_id, removed_seq=departures,
        total_in_queue=10 - departures, epoch="e", departures=departures,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def _bus_and_publisher(
    namespace: str, shard: int
) -> AsyncIterator[tuple[EventBus, EventPublisher]]:
    """A started bus and a shard's publisher on the shared Redis, closed afterwards."""
    client = aioredis.Redis.from_url(REDIS_URL)
    bus = EventBus(client, namespace)
    await bus.start()
    publisher = EventPublisher(client, namespace, shard=shard)
    try:
        yield bus, publisher
    finally:
        await publisher.close()
        await bus.close()
        await client.aclose()


async def test_only_watched_keys_are_delivered_in_the_order_published(
    redis_namespace: str,
) -> None:
    watched, other = Recorder(), Recorder()
    channel = RedisKeys(redis_namespace).shard_events(1)
    async with _bus_and_publisher(redis_namespace, shard=1) as (bus, publisher):
        await bus.subscribe(channel, slot_topic("s-watched"), watched)
        await bus.subscribe(channel, user_topic("nobody"), other)
        publisher.committed([_moved("s-watched", 1), _moved("s-unwatched", 1)])
        publisher.committed([_moved("s-watched", 2), _moved("s-watched", 3)])
        await watched.wait_for(lambda: len(watched.events) == 3)
        assert [e.departures for e in watched.events] == [1, 2, 3]  # type: ignore[union-attr]
        assert other.events == []
        stats = bus.statistics()
        assert stats.events_received == 4 and stats.events_delivered == 3
        await bus.unsubscribe(channel, slot_topic("s-watched"), watched)
        await bus.unsubscribe(channel, user_topic("nobody"), other)
        assert bus.statistics().channels == 0


async def test_after_losing_redis_the_bus_reconnects_and_every_watch_resyncs(
    private_redis: PrivateRedis,
) -> None:
    client = aioredis.Redis.from_url(private_redis.url, socket_connect_timeout=0.5)
    bus = EventBus(client, "ns")
    await bus.start()
    watch = Recorder()
    channel = RedisKeys("ns").shard_events(0)
    try:
        await bus.subscribe(channel, slot_topic("s1"), watch)
        await private_redis.astop()
        await private_redis.astart()
        await watch.wait_for(lambda: watch.resyncs >= 1)
        publisher_client = aioredis.Redis.from_url(private_redis.url)
        publisher = EventPublisher(publisher_client, "ns", shard=0)
        try:
            # Published until the bus is subscribed again; then it arrives.
            async with asyncio.timeout(WAIT_LIMIT_S):
                while not watch.events:
                    # What the watch's resync read does: publishing stops once a
                    # message reached nobody, and a watch's snapshot restarts it.
                    publisher.watched()
                    publisher.committed([_moved("s1", 1)])
                    await asyncio.sleep(0.05)
        finally:
            await publisher.close()
            await publisher_client.aclose()
        assert bus.statistics().connected and bus.statistics().reconnects >= 1
    finally:
        await bus.close()
        await client.aclose()


class SubscribedCheck(Recorder):
    """On resync, publishes on its channel from another connection and records how
    many connections received it: what a watch's snapshot read relies on."""

    def __init__(self, client: aioredis.Redis, channel: str) -> None:
        super().__init__()
        self._client = client
        self._channel = channel
        self.receivers: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def resync(self) -> None:
        task = asyncio.get_running_loop().create_task(self._probe())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self) -> None:
        self.receivers.append(await self._client.publish(self._channel, b"probe"))
        super().resync()


async def test_after_a_reconnection_watches_resync_only_once_subscribed_again(
    private_redis: PrivateRedis,
) -> None:
    """A watch that read its state before the new subscription was in place would
    miss what came between, and could let a shard's publishing switch off for good."""
    client = aioredis.Redis.from_url(private_redis.url, socket_connect_timeout=0.5)
    bus = EventBus(client, "ns")
    await bus.start()
    channel = RedisKeys("ns").shard_events(3)
    probe_client = aioredis.Redis.from_url(private_redis.url)
    watch = SubscribedCheck(probe_client, channel)
    try:
        await bus.subscribe(channel, slot_topic("s1"), watch)
        await private_redis.astop()
        await asyncio.sleep(0.3)  # the bus notices and retries meanwhile
        await private_redis.astart()
        await watch.wait_for(lambda: watch.resyncs >= 1)
        assert watch.receivers and all(count >= 1 for count in watch.receivers)
    finally:
        await bus.close()
        await client.aclose()
        await probe_client.aclose()


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_LIMIT_S):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_shard_nobody_listens_to_stops_publishing_until_a_watch_asks(
    redis_namespace: str,
) -> None:
    watch = Recorder()
    channel = RedisKeys(redis_namespace).shard_events(2)
    async with _bus_and_publisher(redis_namespace, shard=2) as (bus, publisher):
        publisher.committed([_moved("s1", 1)])
        await _until(lambda: not publisher.statistics().publishing)
        assert publisher.statistics().published == 1  # it went out, to nobody
        publisher.committed([_moved("s1", 2), _moved("s1", 3)])
        assert publisher.statistics().unwatched == 2
        # A watch subscribes, then its snapshot read turns publishing on.
        await bus.subscribe(channel, slot_topic("s1"), watch)
        publisher.committed([_moved("s1", 4)])
        assert publisher.statistics().unwatched == 3  # not asked yet: still off
        publisher.watched()
        publisher.committed([_moved("s1", 5)])
        await watch.wait_for(lambda: len(watch.events) == 1)
        assert watch.events[0].departures == 5  # type: ignore[union-attr]
        # Someone listens, so it stays on.
        publisher.committed([_moved("s1", 6)])
        await watch.wait_for(lambda: len(watch.events) == 2)
        assert publisher.statistics().publishing
        # The last watch leaves: the next flush reaches nobody, and it stops again.
        await bus.unsubscribe(channel, slot_topic("s1"), watch)
        publisher.committed([_moved("s1", 7)])
        await _until(lambda: not publisher.statistics().publishing)
        assert publisher.statistics().dropped == 0


class _HeldPublish:
    """A Redis client whose PUBLISH answers only when the test says how many received it."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[asyncio.Future[int]] = asyncio.Queue()

    async def publish(self, channel: str, message: bytes) -> int:
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self.answers.put(answer)
        return await answer


async def test_a_message_sent_before_a_watch_asked_does_not_stop_publishing() -> None:
    """The race the watch counter closes: a PUBLISH that left before the watch's
    subscription reaches nobody, but its answer arrives after the watch asked."""
    client = _HeldPublish()
    publisher = EventPublisher(client, "ns", shard=0)  # type: ignore[arg-type]
    try:
        publisher.committed([_moved("s1", 1)])
        in_flight = await asyncio.wait_for(client.answers.get(), WAIT_LIMIT_S)
        publisher.watched()  # subscribed after that PUBLISH went out, then asked
        in_flight.set_result(0)
        publisher.committed([_moved("s1", 2)])
        assert publisher.statistics().unwatched == 0
        sent_after = await asyncio.wait_for(client.answers.get(), WAIT_LIMIT_S)
        sent_after.set_result(1)
        await _until(lambda: publisher.statistics().published == 2)
        assert publisher.statistics().publishing
        # Without a watch in between, a message that reached nobody stops it.
        publisher.committed([_moved("s1", 3)])
        (await asyncio.wait_for(client.answers.get(), WAIT_LIMIT_S)).set_result(0)
        await _until(lambda: not publisher.statistics().publishing)
    finally:
        await publisher.close()


async def test_the_bus_channel_carries_notices_only_and_map_changed_calls_back(
    redis_namespace: str,
) -> None:
    keys = RedisKeys(redis_namespace)
    watcher = Recorder()
    notices = asyncio.Event()
    told: list[None] = []

    def map_changed() -> None:
        told.append(None)
        notices.set()

    event = msgspec.msgpack.encode(_moved("s-watched", 1))
    shaped_as_events = msgspec.msgpack.encode(([[slot_topic("s-watched")]], [msgspec.Raw(event)]))
    async with _bus_and_publisher(redis_namespace, shard=1) as (bus, _):
        bus.on_map_changed = map_changed
        await bus.subscribe(keys.shard_events(1), slot_topic("s-watched"), watcher)
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            # Neither an event message nor anything else on the bus channel is an event.
            for message in (shaped_as_events, b"something else", MAP_CHANGED):
                await client.publish(keys.bus_channel, message)
            async with asyncio.timeout(WAIT_LIMIT_S):
                await notices.wait()
            assert len(told) == 1
            assert watcher.events == [] and bus.statistics().events_received == 0
            # The same message on a shard's channel is an event, delivered.
            await client.publish(keys.shard_events(1), shaped_as_events)
            await watcher.wait_for(lambda: len(watcher.events) == 1)
            assert len(told) == 1
        finally:
            await client.aclose()

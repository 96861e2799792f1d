"""Committed shard events to Redis pub/sub, for every gateway's live subscribers.

A shard's writer hands over each flush's events once they are committed, so a
subscriber never sees a change that could still be lost. A flush goes out as
one message on the shard's channel (``{ns}:events:shard:{n}``): a msgpack pair
``(keys, events)``, where ``keys[i]`` names who ``events[i]`` concerns
(``s:<slot id>``, and ``u:<user id>`` for bookings; the channel and these
topics are named in ``config/redis_keys.py``). The events are encoded
in one call; a gateway subscribes to the shards its connections need, reads
the events as raw slices and decodes only those whose keys someone watches.

One PUBLISH per flush, not one per event and channel: a busy shard commits
hundreds of events per flush, and a round of Redis commands per event would
cost the shard more CPU than the events themselves.

Publishing is off the request path: replies never wait for it. When Redis is
down (or does not answer within ``REDIS_CALL_TIMEOUT_MS``), events are dropped
(counted and logged): live subscribers detect the gap and read their state
again.

Nobody listening, nothing published. PUBLISH answers how many connections
received the message; once one that was sent after the last watch request
reached nobody, the shard stops publishing (``unwatched`` counts what it
skipped). A watch turns it back on through its snapshot: a gateway subscribes
to the shard's channel first and then reads the snapshot with ``watch=True``,
and the shard calls ``watched()`` in that same batch, before any later change
can commit. So every change the snapshot does not reflect is published, and
the subscription is in place before any PUBLISH that could switch publishing
off again, which therefore reaches it and keeps publishing on. A new
publisher starts on: a restarted shard's subscribers keep their subscriptions.
"""

import asyncio
import contextlib
import logging
from collections import deque
from typing import Final

import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from config.redis_keys import RedisKeys, slot_topic, user_topic
from engine.core.protocol import AnyEvent, BookingChanged, QueueChanged, QueueMoved, SlotChanged
from engine.shell import limits
from persistence import timings as t

logger = logging.getLogger(__name__)

# Flushes waiting to be published; past this the oldest are dropped.
PENDING_FLUSHES_MAX: Final = 1_000
# Events in one published message; a bigger flush goes out as several.
MESSAGE_EVENTS_MAX: Final = 1_000


def keys_of(event: AnyEvent) -> tuple[str, ...]:
    """Who an event concerns: its slot, and for a booking also its user."""
    kind = type(event)
    if kind is BookingChanged:
        booking = event.booking  # type: ignore[union-attr]
        return (slot_topic(booking.slot_id), user_topic(booking.user_id))
    if kind is QueueChanged:
        return (slot_topic(event.entry.slot_id),)  # type: ignore[union-attr]
    if kind is QueueMoved:
        return (slot_topic(event.slot_id),)  # type: ignore[union-attr]
    if kind is SlotChanged:
        return (slot_topic(event.slot.id),)  # type: ignore[union-attr]
    return ()


class PublisherStatistics(msgspec.Struct, frozen=True, kw_only=True):
    publishing: bool
    published: int
    unwatched: int
    dropped: int


class EventPublisher:
    def __init__(
        self,
        client: "aioredis.Redis",
        namespace: str,
        shard: int,
        timings: t.Timings | None = None,
    ) -> None:
        """``timings``: where each flush's publishing is timed (``publish``)."""
        self._client = client
        self._publish_timing = (timings if timings is not None else t.Timings()).redis(
            t.REDIS_PUBLISH
        )
        self._channel = RedisKeys(namespace).shard_events(shard)
        self._encode = msgspec.msgpack.Encoder().encode
        self._pending: deque[list[AnyEvent]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Whether committed events are published; which watch request is the latest.
        self._on = True
        self._watches = 0
        self.published = 0
        self.dropped = 0
        self.unwatched = 0

    def statistics(self) -> PublisherStatistics:
        return PublisherStatistics(
            publishing=self._on,
            published=self.published,
            unwatched=self.unwatched,
            dropped=self.dropped,
        )

    def watched(self) -> None:
        """A live watch follows this shard (synchronous: called in the batch of its
        snapshot): publish every flush committed from now on."""
        self._on = True
        self._watches += 1

    def committed(self, events: list[AnyEvent]) -> None:
        """Take a committed flush's events (synchronous: called by the writer)."""
        if self._closed:
            return
        if not self._on:
            self.unwatched += len(events)
            return
        if len(self._pending) >= PENDING_FLUSHES_MAX:
            self.dropped += len(self._pending.popleft())
        self._pending.append(events)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="publisher")

    async def close(self) -> None:
        # The flag first: redis-py may turn the cancellation of a command in
        # flight into a ConnectionError, which the loop below survives.
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _messages(self, events: list[AnyEvent]) -> list[bytes]:
        encode = self._encode
        messages = []
        for start in range(0, len(events), MESSAGE_EVENTS_MAX):
            chunk = events[start : start + MESSAGE_EVENTS_MAX]
            messages.append(encode(([keys_of(event) for event in chunk], chunk)))
        return messages

    async def _run(self) -> None:
        while not self._closed:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            events = self._pending.popleft()
            watches = self._watches
            try:
                receivers = 0
                for message in self._messages(events):
                    with self._publish_timing.time():
                        async with asyncio.timeout(limits.REDIS_CALL_TIMEOUT_MS / 1000):
                            receivers = await self._client.publish(self._channel, message)
                self.published += len(events)
                if not receivers and watches == self._watches:
                    # Nobody subscribed before this was sent, and no watch asked since.
                    self._on = False
            except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
                self.dropped += len(events)
                logger.warning("events not published (%d dropped so far): %r", self.dropped, exc)

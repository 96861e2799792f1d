"""Committed shard events to Redis pub/sub, for every gateway's live subscribers.

A shard's writer hands over each flush's events once they are committed, so a
subscriber never sees a change that could still be lost. Each event goes, as
msgpack, to the channel of its slot (``{ns}:events:slot:{slot_id}``) and, for a
booking, to its user's (``{ns}:events:user:{user_id}``); a gateway subscribes
only to the channels its connections need.

Publishing is off the request path: replies never wait for it. It pipelines a
flush's events into one round trip. When Redis is down, events are dropped
(counted and logged): live subscribers miss those updates, and any client can
resynchronise by reading its position or booking.
"""

import asyncio
import contextlib
import logging
from collections import deque
from typing import Final

import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from engine.core.protocol import AnyEvent, BookingChanged, QueueChanged, QueueMoved, SlotChanged

logger = logging.getLogger(__name__)

# Flushes waiting to be published; past this the oldest are dropped.
PENDING_FLUSHES_MAX: Final = 1_000


def slot_channel(namespace: str, slot_id: str) -> str:
    return f"{namespace}:events:slot:{slot_id}"


def user_channel(namespace: str, user_id: str) -> str:
    return f"{namespace}:events:user:{user_id}"


def channels_of(namespace: str, event: AnyEvent) -> tuple[str, ...]:
    if isinstance(event, BookingChanged):
        return (
            slot_channel(namespace, event.booking.slot_id),
            user_channel(namespace, event.booking.user_id),
        )
    if isinstance(event, QueueChanged):
        return (slot_channel(namespace, event.entry.slot_id),)
    if isinstance(event, QueueMoved):
        return (slot_channel(namespace, event.slot_id),)
    if isinstance(event, SlotChanged):
        return (slot_channel(namespace, event.slot.id),)
    return ()


class EventPublisher:
    def __init__(self, client: "aioredis.Redis", namespace: str) -> None:
        self._client = client
        self._namespace = namespace
        self._encoder = msgspec.msgpack.Encoder()
        self._pending: deque[list[AnyEvent]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.published = 0
        self.dropped = 0

    def committed(self, events: list[AnyEvent]) -> None:
        """Take a committed flush's events (synchronous: called by the writer)."""
        if self._closed:
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

    async def _run(self) -> None:
        while not self._closed:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            events = self._pending.popleft()
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for event in events:
                        payload = self._encoder.encode(event)
                        for channel in channels_of(self._namespace, event):
                            pipe.publish(channel, payload)
                    await pipe.execute()
                self.published += len(events)
            except (redis.exceptions.RedisError, OSError) as exc:
                self.dropped += len(events)
                logger.warning("events not published (%d dropped so far): %r", self.dropped, exc)

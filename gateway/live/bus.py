"""The ``EventBus``: one gateway process's Redis pub/sub subscription.

It owns the shard channels subscribed (reference counted per listener and
key), the confirmation that a subscription is in place before a watch reads
its snapshot, reconnecting after Redis went away (then every listener is told
to read a fresh snapshot), handing each event to the listeners of its keys,
synchronously and in order, and the deployment's notices on its own channel
(``MAP_CHANGED``: ``on_map_changed``; any other message there is ignored).
It must never wait on a listener, never encode a client's message, and never
import the watches or the endpoints: they are its listeners (``Listener``),
not its dependencies.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final, Protocol

import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from config.redis_keys import MAP_CHANGED, RedisKeys
from engine.core import protocol as p

logger = logging.getLogger("slotengine.realtime")

# WebSocket ping / SSE comment interval (a WebSocket that misses a pong is
# closed), and how long the bus waits for a message before it checks its
# connection.
HEARTBEAT_S: Final = 20.0
# How long a new connection waits for Redis to confirm its subscription.
SUBSCRIBE_TIMEOUT_S: Final = 2.0
# How long closing the bus waits for its reader.
CLOSE_TIMEOUT_S: Final = 2.0
# Reconnecting to Redis after the pub/sub connection broke.
RECONNECT_BACKOFF_MIN_S: Final = 0.1
RECONNECT_BACKOFF_MAX_S: Final = 5.0


class Listener(Protocol):
    def deliver(self, event: p.AnyEvent) -> None:
        """Take one event of a subscribed channel; synchronous, must not wait."""
        ...

    def resync(self) -> None:
        """Events may have been lost: read a fresh snapshot."""
        ...


class BusUnavailable(Exception):
    """Redis cannot be reached: live updates cannot start now."""


class BusStatistics(msgspec.Struct, frozen=True, kw_only=True):
    channels: int
    listeners: int
    events_received: int
    events_delivered: int
    reconnects: int
    connected: bool


class EventBus:
    """One gateway process's Redis pub/sub subscription, shared by every connection.

    Shards publish one message per flush on their own channel: ``(key, event)``
    pairs (``engine/shell/events.py``). The bus subscribes to a shard's channel
    while some listener needs a key of that shard, and decodes only the events
    whose key has listeners.

    Invariants: while connected, the pub/sub connection is subscribed to every
    channel in ``_channel_refs``; ``_confirmed[channel]`` resolves once Redis
    has processed that channel's SUBSCRIBE (a PING sent after it was answered:
    Redis answers a connection's commands in order). ``_listeners[key]`` counts
    each listener's subscriptions to that key (one per shard channel).
    """

    def __init__(self, client: "aioredis.Redis", namespace: str) -> None:
        self._client = client
        self.namespace = namespace
        # The names of the deployment's channels (config/redis_keys.py).
        self.keys = RedisKeys(namespace)
        # The bus channel as a message names it (bytes): notices to every gateway, no events.
        self._notices_channel = self.keys.bus_channel.encode()
        # Called, synchronously, when the partition map changed (a live move): must not wait.
        self.on_map_changed: Callable[[], None] | None = None
        self._message = msgspec.msgpack.Decoder(tuple[list[list[str]], list[msgspec.Raw]])
        self._decoder = msgspec.msgpack.Decoder(p.AnyEvent)
        self._listeners: dict[str, dict[Listener, int]] = {}
        self._channel_refs: dict[str, int] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        # PING payload -> the channels whose SUBSCRIBE it follows.
        self._pings: dict[str, list[str]] = {}
        self._ping_count = 0
        # After a lost connection: the PING whose PONG confirms the resubscription,
        # on which every watch reads its state again.
        self._resync_token: str | None = None
        self._resync_pending = False
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._events_received = 0
        self._events_delivered = 0
        self._reconnects = 0
        self._closed = False

    async def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._run(), name="event-bus")

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._reader, CLOSE_TIMEOUT_S)
        await self._drop_pubsub()

    def statistics(self) -> BusStatistics:
        return BusStatistics(
            channels=len(self._channel_refs),
            listeners=sum(len(listeners) for listeners in self._listeners.values()),
            events_received=self._events_received,
            events_delivered=self._events_delivered,
            reconnects=self._reconnects,
            connected=self._connected.is_set(),
        )

    async def subscribe(self, channel: str, key: str, listener: Listener) -> None:
        """Deliver the events of ``key`` published on ``channel`` to ``listener``,
        from a moment before this returns.

        Raises ``BusUnavailable`` when Redis cannot confirm the subscription in time.
        """
        listeners = self._listeners.setdefault(key, {})
        listeners[listener] = listeners.get(listener, 0) + 1
        self._channel_refs[channel] = self._channel_refs.get(channel, 0) + 1
        confirmed = self._confirmed.get(channel)
        try:
            if confirmed is None:
                confirmed = asyncio.get_running_loop().create_future()
                self._confirmed[channel] = confirmed
                if self._connected.is_set():
                    await self._subscribe_and_ping([channel])
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                await asyncio.shield(confirmed)
        except (TimeoutError, ConnectionError, redis.exceptions.RedisError, OSError) as exc:
            await self.unsubscribe(channel, key, listener)
            raise BusUnavailable(f"live updates are unavailable: {exc!r}") from None

    async def unsubscribe(self, channel: str, key: str, listener: Listener) -> None:
        listeners = self._listeners.get(key)
        if listeners is not None and listener in listeners:
            listeners[listener] -= 1
            if not listeners[listener]:
                del listeners[listener]
            if not listeners:
                del self._listeners[key]
        refs = self._channel_refs.get(channel, 0) - 1
        if refs > 0:
            self._channel_refs[channel] = refs
            return
        self._channel_refs.pop(channel, None)
        confirmed = self._confirmed.pop(channel, None)
        if confirmed is not None and not confirmed.done():
            confirmed.cancel()
        if self._connected.is_set():
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self._pubsub.unsubscribe(channel)

    async def _subscribe_and_ping(self, channels: list[str]) -> str:
        self._ping_count += 1
        token = f"confirm-{self._ping_count}"
        self._pings[token] = channels
        await self._pubsub.subscribe(*channels)
        await self._pubsub.ping(token)
        return token

    async def _run(self) -> None:
        backoff_s = RECONNECT_BACKOFF_MIN_S
        while not self._closed:
            try:
                await self._connect()
                backoff_s = RECONNECT_BACKOFF_MIN_S
                await self._read()
            except (redis.exceptions.RedisError, OSError) as exc:
                if self._connected.is_set():
                    logger.warning("event bus lost Redis: %r", exc)
            was_connected = self._connected.is_set()
            self._connected.clear()
            await self._drop_pubsub()
            self._fail_pending(ConnectionError("Redis connection lost"))
            if self._closed:
                return
            if was_connected:
                self._reconnects += 1
                # Whatever was published meanwhile is lost to us: every watch rereads,
                # once Redis has confirmed the new subscription (see _confirm).
                self._resync_pending = True
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, RECONNECT_BACKOFF_MAX_S)

    async def _connect(self) -> None:
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        # A channel of its own keeps the connection subscribed when no watch needs any.
        channels = [self.keys.bus_channel, *self._channel_refs]
        for channel in self._channel_refs:
            if channel not in self._confirmed or self._confirmed[channel].done():
                self._confirmed[channel] = asyncio.get_running_loop().create_future()
        token = await self._subscribe_and_ping(channels)
        if self._resync_pending:
            self._resync_token = token
        self._connected.set()

    async def _read(self) -> None:
        pubsub = self._pubsub
        # The flag, not only the cancellation, ends the loop: redis-py may swallow
        # a cancellation that arrives while it reads.
        while not self._closed:
            message = await pubsub.get_message(timeout=HEARTBEAT_S)
            if message is None:
                # Quiet for a while: make sure the connection is still there.
                self._ping_count += 1
                await pubsub.ping(f"alive-{self._ping_count}")
                continue
            kind = message["type"]
            if kind == "pong":
                self._confirm(message["data"])
            elif kind == "message":
                if message["channel"] == self._notices_channel:
                    self._notice(message["data"])
                else:
                    self._dispatch(message["data"])

    def _dispatch(self, data: bytes) -> None:
        try:
            keys_of, raws = self._message.decode(data)
        except msgspec.DecodeError:
            logger.warning("an undecodable event message was dropped")
            return
        self._events_received += len(raws)
        listeners_of = self._listeners
        for keys, raw in zip(keys_of, raws, strict=False):
            watching = [listeners for key in keys if (listeners := listeners_of.get(key))]
            if not watching:
                continue
            try:
                event = self._decoder.decode(raw)
            except msgspec.DecodeError:
                logger.warning("an undecodable event was dropped")
                continue
            self._events_delivered += 1
            for listeners in watching:
                for listener in list(listeners):
                    try:
                        listener.deliver(event)
                    except Exception:  # one broken watch must not stop the others
                        logger.exception("a watch failed on an event")

    def _notice(self, data: Any) -> None:
        if data != MAP_CHANGED or self.on_map_changed is None:
            return
        try:
            self.on_map_changed()
        except Exception:  # the bus reads on whatever the callback did
            logger.exception("handling a partition map notice failed")

    def _confirm(self, data: Any) -> None:
        token = data.decode() if isinstance(data, bytes) else str(data)
        for channel in self._pings.pop(token, ()):
            confirmed = self._confirmed.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
        if token == self._resync_token:
            # Subscribed again: a snapshot read from now on misses nothing, and its
            # watch request turns a shard's publishing back on (which a PUBLISH that
            # reached nobody while we were away may have switched off).
            self._resync_token = None
            self._resync_pending = False
            for listener in {lsn for ls in self._listeners.values() for lsn in ls}:
                listener.resync()

    def _fail_pending(self, error: Exception) -> None:
        self._pings.clear()
        for channel, confirmed in list(self._confirmed.items()):
            if not confirmed.done():
                confirmed.set_exception(error)
                # Retrieved here so that a failure nobody awaits is not logged.
                confirmed.exception()
            del self._confirmed[channel]

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

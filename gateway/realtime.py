"""Live updates: ``WS /ws/bookings``, ``WS /ws/queue/{slotId}`` and the SSE stream.

Theory of operation
-------------------
Shards publish their events to Redis pub/sub once they are committed
(``engine/shell/events.py``): one message per flush on the shard's channel,
each event tagged with who it concerns (its slot, and its user for bookings).
Each gateway process has one ``EventBus``: one pub/sub connection, subscribed
to the shard channels its connections need (reference counted), read by one
task that decodes only the events someone here watches and hands them to the
watches of their slot or user, synchronously and in order. So a client
connected to any gateway sees changes made through any other.

A watch is one connection's view of the engine:

- ``QueueWatch``: one user's place in one slot's queue, and the slot;
- ``BookingWatch``: one user's bookings.

A watch subscribes first and reads its snapshot from the engine second, so no
change can fall between the two (the read says ``watch=True``: a shard that
nobody listened to publishes again from that read on); events that the
snapshot already reflects are recognised and skipped:

- the waiting line numbers its departures per shard incarnation (``epoch``,
  ``departures``): a ``QueueMoved`` is applied only if it is the next departure
  after the watch's; an older one is skipped, and a gap or another epoch (a
  rebuilt shard, pub/sub messages lost while Redis was away) makes the watch
  read a fresh snapshot;
- a slot view carries a revision that grows with every change, bookings a
  version: what is not newer than what was sent is skipped.

Every connection sends through an ``Outbox``: a bounded queue drained by one
task. A consumer that falls ``OUTBOX_MESSAGES_MAX`` messages behind is
disconnected (close code 1013, "try again later"; on reconnecting it gets the
current state first), so a slow client costs bounded memory and never delays
anyone else. Connections are pinged (WebSocket) or sent a comment (SSE) every
``HEARTBEAT_S``.

Each user holds a bounded number of live connections across the deployment:
a connection takes a place in its user's record in Redis before it subscribes
or upgrades, and gives it back when it ends (``gateway/connlimit.py``). Past
the cap the request is answered 429 ``TooManyConnections``.

This module never changes engine state: it reads snapshots and forwards
committed events.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Protocol

import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import WSMsgType, web

from engine.core import limits
from engine.core import protocol as p
from engine.core.records import Booking, QueueView, SlotView
from engine.core.routing import shard_of
from engine.core.states import BookingStatus, QueueStatus
from engine.core.waiting_line import describe_wait
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.errors import ShellError
from engine.shell.events import shard_channel, slot_key, user_key
from gateway import schemas as s
from gateway.app import ENGINE_KEY, IDS_KEY, ApiError, principal, stamp_headers, user_param
from gateway.auth import acting_user
from gateway.connlimit import (
    ConnectionLimiter,
    ConnectionLimiterUnavailable,
    Place,
    TooManyConnections,
)

logger = logging.getLogger("slotengine.realtime")

# Messages a connection may have waiting to be sent before it counts as too slow.
OUTBOX_MESSAGES_MAX: Final = 256
# Events a watch keeps while it reads a snapshot; past this it reads another one.
PENDING_EVENTS_MAX: Final = 1_024
# Live connections per gateway process; past this, new ones get 503.
CONNECTIONS_MAX: Final = 50_000
# WebSocket ping / SSE comment interval; a WebSocket that misses a pong is closed.
HEARTBEAT_S: Final = 20.0
# A client sends nothing but control frames: anything bigger is refused.
CLIENT_MESSAGE_BYTES_MAX: Final = 4_096
# How long a new connection waits for Redis to confirm its subscription.
SUBSCRIBE_TIMEOUT_S: Final = 2.0
# Encoded slot.updated messages kept for sharing among the watches of a slot.
SLOT_MESSAGES_CACHED_MAX: Final = 10_000
# How long closing the bus waits for its reader.
CLOSE_TIMEOUT_S: Final = 2.0
# Reconnecting to Redis after the pub/sub connection broke.
RECONNECT_BACKOFF_MIN_S: Final = 0.1
RECONNECT_BACKOFF_MAX_S: Final = 5.0
# Active bookings a /ws/bookings connection starts with, at most.
ACTIVE_BOOKINGS_MAX: Final = 200
# Booking versions a BookingWatch remembers to skip stale updates.
BOOKING_VERSIONS_MAX: Final = 1_000

CLOSE_GOING_AWAY: Final = 1001
CLOSE_TRY_AGAIN_LATER: Final = 1013

_ACTIVE = (BookingStatus.RESERVED, BookingStatus.CONFIRMED)


_encode = msgspec.json.Encoder().encode


def _wait_seconds(position: int | None, wait_per_place_ms: int) -> int | None:
    if position is None:
        return None
    return -(-(position * wait_per_place_ms) // 1000)


# -- the outbox ---------------------------------------------------------------------


class Outbox:
    """A connection's bounded queue of encoded messages, sent in order by one task.

    ``put`` never waits: the bus calls it for thousands of connections in a row.
    """

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        messages_max: int = OUTBOX_MESSAGES_MAX,
    ) -> None:
        self._send = send
        self._messages_max = messages_max
        self._queue: list[bytes] = []
        self._wake = asyncio.Event()
        self.overflowed = False
        self.closed = False
        self.sent = 0

    def put(self, data: bytes) -> None:
        if self.closed:
            return
        if len(self._queue) >= self._messages_max:
            self.overflowed = True
            self.closed = True
        else:
            self._queue.append(data)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def run(self) -> None:
        """Send until closed or the peer is gone; returns after an overflow at once."""
        while True:
            if not self._queue:
                if self.closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.overflowed:
                return
            batch, self._queue = self._queue, []
            for data in batch:
                await self._send(data)
                self.sent += 1


# -- the bus ------------------------------------------------------------------------


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
        channels = [f"{self.namespace}:events:bus", *self._channel_refs]
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


# -- watches ------------------------------------------------------------------------


class _WatchBase:
    """What every watch has: at most one resync task, cancelled on close."""

    _resyncing: asyncio.Task[None] | None = None

    async def close(self) -> None:
        task = self._resyncing
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class QueueWatch(_WatchBase):
    """One user's place in one slot's queue and the slot, as a stream of messages.

    Invariants once synced: ``position`` is the user's place as of departure
    number ``departures`` of line incarnation ``epoch``; ``slot_revision`` is the
    revision of the last slot view sent. While not synced, events wait in
    ``_pending`` (bounded) for the snapshot being read.
    """

    def __init__(
        self, engine: EngineClient, ids: RequestIds, slot_id: str, user_id: str, outbox: Outbox
    ) -> None:
        self._engine = engine
        self._ids = ids
        self.slot_id = slot_id
        self.user_id = user_id
        self._outbox = outbox
        self._synced = False
        self._pending: list[p.AnyEvent] = []
        self._again = False
        self.epoch = ""
        self.departures = 0
        self.slot_revision = -1
        self.seq = 0
        self.status: QueueStatus | None = None
        self.position: int | None = None
        self.total = 0
        self.wait_per_place_ms = 0
        self.booking_id: str | None = None
        self.resyncs = 0

    async def start(self) -> None:
        """The first snapshot and messages; ``LookupError`` if the slot does not exist."""
        snapshot = await self._read_snapshot()
        self._adopt(*snapshot, first=True)
        self._replay()
        if self._again:
            self.resync()

    def deliver(self, event: p.AnyEvent) -> None:
        if self._synced:
            self._apply(event)
        elif len(self._pending) < PENDING_EVENTS_MAX:
            self._pending.append(event)
        else:
            self._pending.clear()
            self._again = True

    def resync(self) -> None:
        self._synced = False
        if self._resyncing is not None and not self._resyncing.done():
            self._again = True
            return
        self._resyncing = asyncio.get_running_loop().create_task(self._resync())

    async def _resync(self) -> None:
        while True:
            self.resyncs += 1
            self._again = False
            try:
                snapshot = await self._read_snapshot()
            except (ShellError, LookupError):
                # The engine is away or the slot is gone: the next event retries
                # (no epoch matches the empty one).
                self._pending.clear()
                self.epoch = ""
                self._synced = True
                return
            self._adopt(*snapshot, first=False)
            self._replay()
            if not self._again:
                return
            self._synced = False

    async def _read_snapshot(self) -> tuple[SlotView, QueueView | None]:
        engine = self._engine
        entry_result = await engine.execute(
            p.QueuePosition(
                request_id=self._ids.next(), slot_id=self.slot_id, user_id=self.user_id, watch=True
            )
        )
        if isinstance(entry_result, p.QueueResult):
            return entry_result.entry.slot, entry_result.entry
        slot_result = await engine.execute(
            p.GetSlot(request_id=self._ids.next(), slot_id=self.slot_id, watch=True)
        )
        if isinstance(slot_result, p.SlotResult):
            return slot_result.slot, None
        assert isinstance(slot_result, p.Failure)
        if slot_result.status == 404:
            raise LookupError(slot_result.message)
        raise ShellError(slot_result.message)

    def _adopt(self, slot: SlotView, entry: QueueView | None, *, first: bool) -> None:
        slot_is_new = first or slot.epoch != self.epoch or slot.revision > self.slot_revision
        self.epoch = slot.epoch
        self.departures = slot.departures
        self.total = slot.queue_length
        estimated_wait_seconds: int | None = None
        if entry is None:
            self.status = None
            self.position = None
            self.seq = 0
            self.booking_id = None
        else:
            self.status = entry.status
            self.position = entry.position
            self.seq = entry.seq
            self.booking_id = entry.booking_id
            estimated_wait_seconds = entry.estimated_wait_seconds
            if entry.position:
                self.wait_per_place_ms = (estimated_wait_seconds or 0) * 1000 // entry.position
        self._synced = True
        self._send_position(estimated_wait_seconds)
        if slot_is_new:
            self._send_slot(slot)

    def _replay(self) -> None:
        pending, self._pending = self._pending, []
        for event in pending:
            self.deliver(event)

    def _apply(self, event: p.AnyEvent) -> None:
        kind = type(event)
        if kind is p.QueueMoved:
            self._moved(event)  # type: ignore[arg-type]
        elif kind is p.SlotChanged:
            slot = event.slot  # type: ignore[union-attr]
            if slot.epoch != self.epoch or slot.revision > self.slot_revision:
                self._send_slot(slot)
        elif kind is p.QueueChanged and event.entry.user_id == self.user_id:  # type: ignore[union-attr]
            self._own_entry_changed(event)  # type: ignore[arg-type]

    def _moved(self, event: p.QueueMoved) -> None:
        if event.epoch != self.epoch:
            self.resync()
            return
        if event.departures <= self.departures:
            return  # the snapshot has it already
        if event.departures != self.departures + 1:
            self.resync()  # some departures never reached us
            return
        self.departures = event.departures
        self.total = event.total_in_queue
        if self.status is not QueueStatus.WAITING or self.position is None:
            return
        if event.removed_seq == self.seq:
            return  # this user's own departure: the entry's change follows and says so
        if event.removed_seq < self.seq:
            self.position -= 1
        self.wait_per_place_ms = event.wait_per_place_ms
        self._send_position(_wait_seconds(self.position, self.wait_per_place_ms))

    def _own_entry_changed(self, event: p.QueueChanged) -> None:
        entry = event.entry
        if entry.seq < self.seq:
            return  # an earlier entry of this user, superseded
        if event.change == "joined":
            if entry.seq != self.seq:
                self.resync()  # joined while connected: the position needs a read
            return
        self.seq = entry.seq
        self.position = None
        if event.change == "left":
            self.status = None
            self.booking_id = None
        else:
            self.status = entry.status
            self.booking_id = entry.booking_id
        if event.change == "notified" and entry.booking_id and event.offer_expires_at_ms:
            self._outbox.put(
                _encode(
                    s.QueueOfferMessage(
                        slot_id=self.slot_id,
                        booking_id=entry.booking_id,
                        expires_at=s.rfc3339(event.offer_expires_at_ms),
                    )
                )
            )
        self._send_position(None)

    def _send_position(self, estimated_wait_seconds: int | None) -> None:
        status = None if self.status is None else self.status.value
        self._outbox.put(
            _encode(
                s.QueuePositionMessage(
                    slot_id=self.slot_id,
                    position=self.position,
                    status=status,  # type: ignore[arg-type]
                    total_in_queue=self.total,
                    estimated_wait_time=describe_wait(estimated_wait_seconds),
                    estimated_wait_seconds=estimated_wait_seconds,
                    booking_id=self.booking_id,
                )
            )
        )

    def _send_slot(self, slot: SlotView) -> None:
        if slot.epoch == self.epoch:
            self.slot_revision = max(self.slot_revision, slot.revision)
        self._outbox.put(_slot_message(slot))


class _SlotMessages:
    """One encoded ``slot.updated`` per slot view, shared by every watch of the slot."""

    def __init__(self, entries_max: int) -> None:
        self._entries_max = entries_max
        self._cache: dict[str, tuple[SlotView, bytes]] = {}

    def __call__(self, slot: SlotView) -> bytes:
        cached = self._cache.get(slot.id)
        if cached is not None and cached[0] is slot:
            return cached[1]
        data = _encode(s.SlotUpdatedMessage(slot_id=slot.id, slot=s.slot_out(slot)))
        if len(self._cache) >= self._entries_max:
            self._cache.clear()
        self._cache[slot.id] = (slot, data)
        return data


_slot_message = _SlotMessages(SLOT_MESSAGES_CACHED_MAX)


class BookingWatch(_WatchBase):
    """One user's bookings: the active ones first, then every change, each version once."""

    def __init__(self, engine: EngineClient, ids: RequestIds, user_id: str, outbox: Outbox) -> None:
        self._engine = engine
        self._ids = ids
        self.user_id = user_id
        self._outbox = outbox
        self._versions: dict[str, int] = {}
        self._synced = False
        self._pending: list[Booking] = []

    async def start(self) -> None:
        await self._sync()

    def deliver(self, event: p.AnyEvent) -> None:
        if type(event) is not p.BookingChanged:
            return
        booking = event.booking
        if booking.user_id != self.user_id:
            return
        if self._synced:
            self._send(booking)
        elif len(self._pending) < PENDING_EVENTS_MAX:
            self._pending.append(booking)

    def resync(self) -> None:
        if self._synced:
            self._synced = False
            self._resyncing = asyncio.get_running_loop().create_task(self._resync())

    async def _resync(self) -> None:
        try:
            await self._sync()
        except ShellError:
            self._synced = True

    async def _sync(self) -> None:
        engine = self._engine
        pages = await asyncio.gather(
            *(
                engine.execute(
                    p.ListBookings(
                        request_id=self._ids.next(),
                        user_id=self.user_id,
                        status=status,
                        limit=ACTIVE_BOOKINGS_MAX,
                        watch=True,
                    ),
                    shard=shard,
                )
                for shard in range(engine.shard_count)
                for status in _ACTIVE
            )
        )
        if any(isinstance(page, p.Failure) for page in pages):
            raise ShellError("the engine could not list the bookings")
        bookings = [b for page in pages if isinstance(page, p.BookingPage) for b in page.items]
        bookings.sort(key=lambda b: (b.reserved_at_ms, b.id))
        for booking in bookings:
            self._send(booking)
        self._synced = True
        pending, self._pending = self._pending, []
        for booking in pending:
            self._send(booking)

    def _send(self, booking: Booking) -> None:
        if self._versions.get(booking.id, 0) >= booking.version:
            return
        if len(self._versions) >= BOOKING_VERSIONS_MAX:
            self._versions.pop(next(iter(self._versions)))
        self._versions[booking.id] = booking.version
        self._outbox.put(
            _encode(
                s.BookingUpdatedMessage(slot_id=booking.slot_id, booking=s.booking_out(booking))
            )
        )


# -- the endpoints --------------------------------------------------------------------


class LiveConnections:
    """The bus and the count of live connections of one gateway process.

    ``limiter``: the places of each user's live connections, shared with every
    other gateway; None counts only this process's connections.
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        limiter: ConnectionLimiter | None = None,
        connections_max: int = CONNECTIONS_MAX,
        outbox_messages_max: int = OUTBOX_MESSAGES_MAX,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.bus = bus
        self.limiter = limiter
        self.heartbeat_s = heartbeat_s
        self.connections_max = connections_max
        self.outbox_messages_max = outbox_messages_max
        self.slow_consumers_closed = 0
        # Every live connection's outbox and, for WebSockets, the socket: closed on shutdown.
        self.connections: dict[Outbox, web.WebSocketResponse | None] = {}

    @property
    def open(self) -> int:
        return len(self.connections)

    async def close_all(self) -> None:
        """Going away: close every connection (clients reconnect to another gateway)."""
        for outbox, ws in list(self.connections.items()):
            outbox.close()
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close(code=CLOSE_GOING_AWAY, message=b"server shutdown")
        if self.limiter is not None:
            # The connections give their places back as they end; any left lapse.
            await self.limiter.close()


LIVE_KEY: Final = web.AppKey("live", LiveConnections)
LIVE_ROUTES_KEY: Final = web.AppKey("live_routes", bool)

AnyWatch = QueueWatch | BookingWatch


def _unavailable(message: str) -> ApiError:
    return ApiError(503, "ServiceUnavailable", message, retry_after_s=limits.RETRY_AFTER_S)


# What a connection listens to: (shard channel, key) pairs.
Interests = list[tuple[str, str]]


async def _opened(
    request: web.Request, interests: Interests, watch: AnyWatch, live: LiveConnections
) -> Interests:
    """Subscribe, then read the snapshot: the HTTP error if either fails."""
    subscribed: Interests = []
    try:
        for channel, key in interests:
            await live.bus.subscribe(channel, key, watch)
            subscribed.append((channel, key))
        await watch.start()
    except BusUnavailable as exc:
        await _closed(live, subscribed, watch)
        raise _unavailable(str(exc)) from None
    except LookupError:
        await _closed(live, subscribed, watch)
        raise ApiError(404, "NotFound", "no such slot") from None
    except BaseException:
        await _closed(live, subscribed, watch)
        raise
    return subscribed


@contextlib.asynccontextmanager
async def _watching(
    request: web.Request,
    live: LiveConnections,
    interests: Interests,
    watch: AnyWatch,
    outbox: Outbox,
    ws: web.WebSocketResponse | None,
) -> AsyncIterator[None]:
    """One live connection, counted, subscribed and holding its first state, until it ends."""
    live.connections[outbox] = ws
    place: Place | None = None
    try:
        # First: a user at the cap costs no subscription and no snapshot.
        place = await _take_place(live, watch.user_id)
        subscribed = await _opened(request, interests, watch, live)
        try:
            yield
        finally:
            await _closed(live, subscribed, watch)
    finally:
        del live.connections[outbox]
        if live.limiter is not None:
            await live.limiter.give_back(place)


async def _take_place(live: LiveConnections, user_id: str) -> Place | None:
    if live.limiter is None:
        return None
    try:
        return await live.limiter.take(user_id)
    except TooManyConnections as exc:
        raise ApiError(
            429,
            "TooManyConnections",
            f"at most {exc.limit} live connections per user are open; close one first",
            details={"limit": exc.limit},
            retry_after_s=exc.retry_after_s,
        ) from None
    except ConnectionLimiterUnavailable:
        raise _unavailable("live updates are unavailable: Redis is unreachable") from None


async def _closed(live: LiveConnections, interests: Interests, watch: AnyWatch) -> None:
    for channel, key in interests:
        await live.bus.unsubscribe(channel, key, watch)
    await watch.close()


def _admit(request: web.Request) -> LiveConnections:
    live = request.app.get(LIVE_KEY)
    if live is None:
        raise _unavailable("live updates are not running")
    if live.open >= live.connections_max:
        raise _unavailable("too many live connections on this gateway; try another")
    return live


async def _serve_websocket(
    request: web.Request, interests: Interests, make_watch: Callable[[Outbox], AnyWatch]
) -> web.StreamResponse:
    live = _admit(request)
    ws = web.WebSocketResponse(
        heartbeat=live.heartbeat_s, compress=False, max_msg_size=CLIENT_MESSAGE_BYTES_MAX
    )
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "BadRequest", "this route takes a WebSocket upgrade")

    async def send(data: bytes) -> None:
        await ws.send_frame(data, WSMsgType.TEXT)

    outbox = Outbox(send, live.outbox_messages_max)
    async with _watching(request, live, interests, make_watch(outbox), outbox, ws):
        stamp_headers(request, ws)
        await ws.prepare(request)
        sender = asyncio.get_running_loop().create_task(_send_all(outbox, ws, live))
        try:
            # Reading stays in the handler's task (aiohttp's rule); clients send
            # nothing but control frames, which aiohttp answers itself.
            async for message in ws:
                if message.type is WSMsgType.ERROR:
                    break
        finally:
            outbox.close()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    return ws


async def _send_all(outbox: Outbox, ws: web.WebSocketResponse, live: LiveConnections) -> None:
    # A peer gone away ends the sending; the handler's read loop ends too.
    with contextlib.suppress(ConnectionError, RuntimeError):
        await outbox.run()
    if outbox.overflowed:
        live.slow_consumers_closed += 1
        await ws.close(code=CLOSE_TRY_AGAIN_LATER, message=b"too slow: reconnect to resume")


def _sse_frame(data: bytes) -> bytes:
    if not data:
        return b": heartbeat\n\n"
    # msgspec writes the tag first: {"type":"queue.position",...}
    kind = data[9 : data.index(b'"', 9)]
    return b"event: " + kind + b"\ndata: " + data + b"\n\n"


async def _serve_events(
    request: web.Request, interests: Interests, make_watch: Callable[[Outbox], AnyWatch]
) -> web.StreamResponse:
    live = _admit(request)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )

    async def send(data: bytes) -> None:
        await response.write(_sse_frame(data))

    outbox = Outbox(send, live.outbox_messages_max)
    async with _watching(request, live, interests, make_watch(outbox), outbox, None):
        stamp_headers(request, response)
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        beat = asyncio.get_running_loop().create_task(_heartbeats(outbox, live.heartbeat_s))
        try:
            with contextlib.suppress(ConnectionError):  # the client went away
                await outbox.run()
        finally:
            beat.cancel()
        if outbox.overflowed:
            live.slow_consumers_closed += 1
    return response


async def _heartbeats(outbox: Outbox, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        outbox.put(b"")


def _queue_watch(request: web.Request) -> tuple[Interests, Callable[[Outbox], AnyWatch]]:
    who = principal(request)
    user_id = acting_user(who, user_param(request))
    slot_id = request.match_info["slot_id"]
    app = request.app
    shard = shard_of(slot_id, app[ENGINE_KEY].shard_count)
    if shard is None:
        raise ApiError(404, "NotFound", "no such slot")
    namespace = _admit(request).bus.namespace
    return [(shard_channel(namespace, shard), slot_key(slot_id))], lambda outbox: QueueWatch(
        app[ENGINE_KEY], app[IDS_KEY], slot_id, user_id, outbox
    )


async def ws_queue(request: web.Request) -> web.StreamResponse:
    interests, make_watch = _queue_watch(request)
    return await _serve_websocket(request, interests, make_watch)


async def sse_queue(request: web.Request) -> web.StreamResponse:
    interests, make_watch = _queue_watch(request)
    return await _serve_events(request, interests, make_watch)


async def ws_bookings(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    user_id = acting_user(who, user_param(request))
    app = request.app
    namespace = _admit(request).bus.namespace
    return await _serve_websocket(
        request,
        [
            (shard_channel(namespace, shard), user_key(user_id))
            for shard in range(app[ENGINE_KEY].shard_count)
        ],
        lambda outbox: BookingWatch(app[ENGINE_KEY], app[IDS_KEY], user_id, outbox),
    )


def add_realtime(app: web.Application, live: LiveConnections | None = None) -> None:
    """The live routes (``create_app`` adds them) and, when given, the bus serving them.

    ``live`` may come later: set ``app[LIVE_KEY]`` on startup. Until then the
    live routes answer 503.
    """
    if live is not None:
        app[LIVE_KEY] = live
    if LIVE_ROUTES_KEY in app:
        return
    app[LIVE_ROUTES_KEY] = True

    async def close_connections(app: web.Application) -> None:
        running = app.get(LIVE_KEY)
        if running is not None:
            await running.close_all()

    app.on_shutdown.append(close_connections)
    app.router.add_get("/ws/queue/{slot_id}", ws_queue)
    app.router.add_get("/ws/bookings", ws_bookings)
    app.router.add_get("/api/slots/{slot_id}/queue/events", sse_queue)

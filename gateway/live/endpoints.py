"""The live endpoints: ``WS /ws/queue/{slotId}``, ``WS /ws/bookings`` and the SSE stream.

It owns admitting a live connection (this process's cap, the user's place in
``gateway/connlimit.py``, 429 ``TooManyConnections``, 503 while Redis or the
bus is away), its life (subscribe, snapshot, upgrade, heartbeat, close on a
slow consumer or on shutdown), what each connection listens to
(``Interests``: the channels of the shards its watch needs, by the partition
map) and following the map as partitions move (``LiveConnections.map_changed``:
a connection whose shards changed subscribes to the new ones and reads its
snapshot again, from the new owner, staying open), the SSE framing, and
``add_realtime``, which ``gateway.app.create_app`` calls; and keeping the
users who watch their queue places active (``LiveConnections.keep_active``:
every ``touch_every_s`` one ``TouchWaiting`` per shard names the places this
process's queue connections watch, so that a patient watcher is not expired
for inactivity). That touch is the only command it sends that changes
anything, and it changes only when a waiting user was last seen. It never
decides what a message says (the watches do).
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import WSMsgType, web

from config.redis_keys import slot_topic, user_topic
from engine.core import protocol as p
from engine.core.routing import PartitionMap
from engine.shell import limits
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.errors import ShellError
from gateway.auth.principal import acting_user
from gateway.connlimit import (
    ConnectionLimiter,
    ConnectionLimiterUnavailable,
    Place,
    TooManyConnections,
)
from gateway.handling import user_param
from gateway.http import ENGINE_KEY, IDS_KEY, ApiError, principal, stamp_headers
from gateway.live.bus import HEARTBEAT_S, RECONNECT_BACKOFF_MAX_S, BusUnavailable, EventBus
from gateway.live.outbox import OUTBOX_MESSAGES_MAX, Outbox
from gateway.live.watches import BookingWatch, QueueWatch

# Live connections per gateway process; past this, new ones get 503.
CONNECTIONS_MAX: Final = 50_000
# A client sends nothing but control frames: anything bigger is refused.
CLIENT_MESSAGE_BYTES_MAX: Final = 4_096

# A watcher is counted as seen at least this often, and at least three times
# within the shortest queue inactivity timeout of the domains served
# (``touch_every_s``): one late or lost touch never expires anyone.
TOUCH_EVERY_S_MAX: Final = 30.0
TOUCHES_PER_INACTIVITY: Final = 3
# Places named by one TouchWaiting: a batch of them stays a small message.
TOUCH_PLACES_MAX: Final = 1_000

CLOSE_GOING_AWAY: Final = 1001
CLOSE_TRY_AGAIN_LATER: Final = 1013

logger = logging.getLogger("slotengine.realtime")

AnyWatch = QueueWatch | BookingWatch


def touch_every_s(queue_inactivity_ms: int) -> float:
    """How often the watchers are touched, for the shortest inactivity timeout served."""
    return min(queue_inactivity_ms / 1000 / TOUCHES_PER_INACTIVITY, TOUCH_EVERY_S_MAX)


# What a connection listens to: (shard channel, key) pairs.
Channels = list[tuple[str, str]]


class Interests:
    """What one live connection listens to: the (shard channel, key) pairs its watch
    needs by a partition map (``wanted``), changed as the map changes.

    Invariant: the bus holds one subscription of ``watch`` for each pair of
    ``subscribed`` and no other; after ``close`` none. Changes are made one at a
    time (``_lock``): a map change and the connection's end never interleave.
    """

    __slots__ = ("_bus", "_closed", "_lock", "_wanted", "subscribed", "watch")

    def __init__(
        self, bus: EventBus, watch: AnyWatch, wanted: Callable[[PartitionMap], Channels]
    ) -> None:
        self._bus = bus
        self.watch = watch
        self._wanted = wanted
        self.subscribed: Channels = []
        self._lock = asyncio.Lock()
        self._closed = False

    async def follow(self, partition_map: PartitionMap) -> bool:
        """Subscribe to what ``partition_map`` asks for and not more; whether anything
        was added (then events may have been missed: the watch must read again).

        Raises ``BusUnavailable`` when a subscription cannot be confirmed (those made
        before it are kept).
        """
        async with self._lock:
            if self._closed:
                return False
            wanted = self._wanted(partition_map)
            added = False
            # Subscribed first, dropped second: a channel in use is never left
            # before its replacement hears everything.
            for channel, key in wanted:
                if (channel, key) not in self.subscribed:
                    await self._bus.subscribe(channel, key, self.watch)
                    self.subscribed.append((channel, key))
                    added = True
            for channel, key in [pair for pair in self.subscribed if pair not in wanted]:
                self.subscribed.remove((channel, key))
                await self._bus.unsubscribe(channel, key, self.watch)
            return added

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            subscribed, self.subscribed = self.subscribed, []
            for channel, key in subscribed:
                await self._bus.unsubscribe(channel, key, self.watch)
        await self.watch.close()


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
        touch_every_s: float = TOUCH_EVERY_S_MAX,
    ) -> None:
        self.bus = bus
        self.limiter = limiter
        self.heartbeat_s = heartbeat_s
        self.touch_every_s = touch_every_s
        # The task that touches the watched queue places (keep_active), once one opened.
        self._touching: asyncio.Task[None] | None = None
        self.touches_sent = 0
        self.connections_max = connections_max
        self.outbox_messages_max = outbox_messages_max
        self.slow_consumers_closed = 0
        # Every live connection's outbox and, for WebSockets, the socket: closed on shutdown.
        self.connections: dict[Outbox, web.WebSocketResponse | None] = {}
        # What each connection that holds its first state listens to: they follow the map.
        self.interests: set[Interests] = set()
        # The newest partition map told (map_changed), and the task making every
        # connection follow it; set again while it runs, it goes round once more.
        self._partition_map: PartitionMap | None = None
        self._following: asyncio.Task[None] | None = None
        self._follow_again = False

    @property
    def open(self) -> int:
        return len(self.connections)

    def map_changed(self, old: PartitionMap, new: PartitionMap) -> None:
        """The engine client took a new partition map (``EngineClient.on_map_changed``):
        every connection whose shards changed follows it, staying open. Never waits."""
        if self._partition_map is not None and self._partition_map.version > new.version:
            return
        self._partition_map = new
        if self._following is not None and not self._following.done():
            self._follow_again = True
            return
        self._following = asyncio.get_running_loop().create_task(
            self._follow_map(), name="live-follow-map"
        )

    async def _follow_map(self) -> None:
        while True:
            self._follow_again = False
            partition_map = self._partition_map
            assert partition_map is not None
            unfinished = False
            for interests in list(self.interests):
                try:
                    if await interests.follow(partition_map):
                        # Subscribed where the slot or the user's bookings are now: the
                        # snapshot, read from the new owner, turns its publishing on.
                        interests.watch.resync()
                except BusUnavailable as exc:
                    logger.warning("a live connection could not follow a map change: %s", exc)
                    unfinished = True
            if unfinished:
                # Redis is away: once it may be back, the connections left behind try again.
                await asyncio.sleep(RECONNECT_BACKOFF_MAX_S)
            elif not self._follow_again:
                return

    def keep_active(self, engine: EngineClient, ids: RequestIds) -> None:
        """Touch the watched queue places every ``touch_every_s`` from now on (once
        started, it runs until ``close_all``). Never waits."""
        if self._touching is None or self._touching.done():
            self._touching = asyncio.get_running_loop().create_task(
                self._touch_watchers(engine, ids), name="live-keep-active"
            )

    def watched_places(self) -> set[tuple[str, str]]:
        """The (slot, user) pairs this process's queue connections watch."""
        return {
            (watch.slot_id, watch.user_id)
            for watch in (interests.watch for interests in self.interests)
            if isinstance(watch, QueueWatch)
        }

    async def _touch_watchers(self, engine: EngineClient, ids: RequestIds) -> None:
        while True:
            await asyncio.sleep(self.touch_every_s)
            by_shard: dict[int, list[tuple[str, str]]] = {}
            for slot_id, user_id in sorted(self.watched_places()):
                shard = engine.shard_of(slot_id)
                if shard is not None:
                    by_shard.setdefault(shard, []).append((slot_id, user_id))
            touches = [
                self._touch(engine, shard, p.TouchWaiting(request_id=ids.next(), places=chunk))
                for shard, places in by_shard.items()
                for chunk in _chunks(places, TOUCH_PLACES_MAX)
            ]
            if touches:
                await asyncio.gather(*touches)

    async def _touch(self, engine: EngineClient, shard: int, touch: p.TouchWaiting) -> None:
        # A touch that does not arrive is made up by the next one, well within the timeout.
        try:
            await engine.execute(touch, shard=shard)
        except ShellError as exc:
            logger.warning("watched queue places not touched on shard %d: %r", shard, exc)
            return
        self.touches_sent += 1

    async def close_all(self) -> None:
        """Going away: close every connection (clients reconnect to another gateway)."""
        for task in (self._following, self._touching):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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


def _chunks(places: list[tuple[str, str]], size: int) -> list[list[tuple[str, str]]]:
    return [places[at : at + size] for at in range(0, len(places), size)]


def _unavailable(message: str) -> ApiError:
    return ApiError(503, "ServiceUnavailable", message, retry_after_s=limits.RETRY_AFTER_S)


async def _opened(request: web.Request, interests: Interests, live: LiveConnections) -> None:
    """Subscribe, then read the snapshot: the HTTP error if either fails."""
    engine = request.app[ENGINE_KEY]
    partition_map = engine.partition_map
    try:
        await interests.follow(partition_map)
        await interests.watch.start()
    except BusUnavailable as exc:
        await interests.close()
        raise _unavailable(str(exc)) from None
    except LookupError:
        await interests.close()
        raise ApiError(404, "NotFound", "no such slot") from None
    except BaseException:
        await interests.close()
        raise
    live.interests.add(interests)
    if isinstance(interests.watch, QueueWatch):
        live.keep_active(engine, request.app[IDS_KEY])
    if engine.partition_map is not partition_map:
        # The map changed while this connection opened: it follows like the others.
        live.map_changed(partition_map, engine.partition_map)


@contextlib.asynccontextmanager
async def _watching(
    request: web.Request,
    live: LiveConnections,
    interests: Interests,
    outbox: Outbox,
    ws: web.WebSocketResponse | None,
) -> AsyncIterator[None]:
    """One live connection, counted, subscribed and holding its first state, until it ends."""
    live.connections[outbox] = ws
    place: Place | None = None
    try:
        # First: a user at the cap costs no subscription and no snapshot.
        place = await _take_place(live, interests.watch.user_id)
        await _opened(request, interests, live)
        try:
            yield
        finally:
            live.interests.discard(interests)
            await interests.close()
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


def _admit(request: web.Request) -> LiveConnections:
    live = request.app.get(LIVE_KEY)
    if live is None:
        raise _unavailable("live updates are not running")
    if live.open >= live.connections_max:
        raise _unavailable("too many live connections on this gateway; try another")
    return live


async def _serve_websocket(
    request: web.Request,
    wanted: Callable[[PartitionMap], Channels],
    make_watch: Callable[[Outbox], AnyWatch],
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
    interests = Interests(live.bus, make_watch(outbox), wanted)
    async with _watching(request, live, interests, outbox, ws):
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
    request: web.Request,
    wanted: Callable[[PartitionMap], Channels],
    make_watch: Callable[[Outbox], AnyWatch],
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
    interests = Interests(live.bus, make_watch(outbox), wanted)
    async with _watching(request, live, interests, outbox, None):
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


def _queue_watch(
    request: web.Request,
) -> tuple[Callable[[PartitionMap], Channels], Callable[[Outbox], AnyWatch]]:
    who = principal(request)
    user_id = acting_user(who, user_param(request))
    slot_id = request.match_info["slot_id"]
    app = request.app
    if app[ENGINE_KEY].shard_of(slot_id) is None:
        raise ApiError(404, "NotFound", "no such slot")
    keys = _admit(request).bus.keys
    topic = slot_topic(slot_id)

    def wanted(partition_map: PartitionMap) -> Channels:
        # The channel of the shard serving the slot's partition now.
        shard = partition_map.shard_of(slot_id)
        return [] if shard is None else [(keys.shard_events(shard), topic)]

    return wanted, lambda outbox: QueueWatch(
        app[ENGINE_KEY], app[IDS_KEY], slot_id, user_id, outbox
    )


async def ws_queue(request: web.Request) -> web.StreamResponse:
    wanted, make_watch = _queue_watch(request)
    return await _serve_websocket(request, wanted, make_watch)


async def sse_queue(request: web.Request) -> web.StreamResponse:
    wanted, make_watch = _queue_watch(request)
    return await _serve_events(request, wanted, make_watch)


async def ws_bookings(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    user_id = acting_user(who, user_param(request))
    app = request.app
    keys = _admit(request).bus.keys
    topic = user_topic(user_id)

    def wanted(partition_map: PartitionMap) -> Channels:
        # Every shard the map names: any may serve one of the user's bookings.
        return [(keys.shard_events(shard), topic) for shard in range(partition_map.shard_count)]

    return await _serve_websocket(
        request,
        wanted,
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

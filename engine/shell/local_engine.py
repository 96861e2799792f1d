"""The in-process shards served to other processes of this machine over a Unix socket.

``serve --engine inproc --workers N`` runs the shards (an ``OwnedInProcessHost``:
leases, write-behind, timers, all as in one process) in an engine process of
their own, and N gateway processes reach them through ``LocalEngineTransport``,
the same call surface as the in-process host and the Ray actors. One machine
only: it is the single-process deployment with its HTTP work spread over
several cores, not a cluster (Ray is that).

Why a socket and not Ray here: a Ray actor call costs hundreds of microseconds
of CPU across the caller, the actor and Ray's threads, which at HTTP rates
(batches of a few commands) costs more than the HTTP work it would spread.
A frame on a local socket costs a write and a read on each side. (For that
reason the Ray shard actors serve their shard with the same frames to callers
of their own node: ``engine.shell.ray_actor``.)

Frames: a 4-byte big-endian length, then a msgpack array. A call is
``[call_id, op, shard, timeout_ms, data]``; its reply ``[call_id, error,
message, data, statistics, owner, shard_count, partial]`` where ``error`` is
the name of an ``engine.shell.errors`` class ("" when it succeeded). Calls on
one connection run concurrently and are answered in any order; each side
matches by id. A call of ``OP_BATCH_EARLY`` may get one partial reply
(``partial`` true, ``data`` a ``BatchCodec.encode_early``) before its reply:
the reads of a batch that waits for its changes to commit, whose answers are
durable already, leave without that wait. The socket is made readable by its
owner only (mode 0600).

It must never serve beyond this machine (a Unix socket, readable by its owner
only) nor decide a rule: the shards it hosts do.
"""

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import msgspec

from engine.shell import errors
from engine.shell.owner import OwnerStatistics
from engine.shell.runtime import RuntimeStatistics

logger = logging.getLogger("slotengine.engine.local")

OP_BATCH: Final = 0
OP_STATISTICS: Final = 1
OP_OWNER_STATISTICS: Final = 2
OP_CHECK_INVARIANTS: Final = 3
OP_SHARD_COUNT: Final = 4
# A batch whose durable reads may be answered ahead of its reply, in a partial reply.
OP_BATCH_EARLY: Final = 5

_LENGTH: Final = struct.Struct(">I")
# Frames larger than this are a broken peer, not a batch (batches are capped far below).
FRAME_BYTES_MAX: Final = 256 * 1024 * 1024
# How long a gateway waits for the engine process to listen, and for each connect.
CONNECT_TIMEOUT_S: Final = 120.0
CONNECT_RETRY_S: Final = 0.2

_ERRORS: Final[dict[str, type[errors.ShellError]]] = {
    cls.__name__: cls
    for cls in (
        errors.ShellError,
        errors.ShardUnavailable,
        errors.ShardUnreachable,
        errors.ShardBusy,
        errors.ShardCallTimeout,
        errors.ShardFailed,
        errors.BatchRejected,
        errors.Overloaded,
    )
}


class SocketUnreachable(errors.ShardUnreachable):
    """No connection to the socket could be made (or it was closed before the call
    was written): nothing was sent."""


class SocketBroke(errors.ShardUnavailable):
    """The connection broke with the call in flight: it may or may not have been applied."""


class Call(msgspec.Struct, array_like=True, frozen=True):
    call_id: int
    op: int
    shard: int
    timeout_ms: int
    data: bytes = b""


class Reply(msgspec.Struct, array_like=True, frozen=True):
    call_id: int
    error: str = ""
    message: str = ""
    data: bytes = b""
    statistics: RuntimeStatistics | None = None
    owner: OwnerStatistics | None = None
    shard_count: int = 0
    # Some answers of a batch ahead of its reply (OP_BATCH_EARLY); the reply follows.
    partial: bool = False


class _Framer:
    """Cuts a byte stream into frames."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        start = 0
        end = len(buffer)
        while end - start >= 4:
            (size,) = _LENGTH.unpack_from(buffer, start)
            if size > FRAME_BYTES_MAX:
                raise errors.ShardFailed(f"a frame of {size} bytes from the engine socket")
            if end - start - 4 < size:
                break
            frames.append(bytes(buffer[start + 4 : start + 4 + size]))
            start += 4 + size
        if start:
            del buffer[:start]
        return frames


def _frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


# -- the engine's side ------------------------------------------------------------------


class LocalEngineServer:
    """Serves a shard host (``OwnedInProcessHost``) on a Unix socket."""

    def __init__(self, host: Any) -> None:
        self._host = host
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_ServerProtocol] = set()

    async def start(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _ServerProtocol(self._host, self._connections), path
        )
        os.chmod(path, 0o600)

    async def close(self) -> None:
        """Stop listening and drop every connection (their calls in flight finish first)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for connection in list(self._connections):
            await connection.drain_and_close()


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, host: Any, connections: set["_ServerProtocol"]) -> None:
        self._host = host
        self._connections = connections
        self._framer = _Framer()
        self._decoder = msgspec.msgpack.Decoder(Call)
        self._encoder = msgspec.msgpack.Encoder()
        self._transport: asyncio.Transport | None = None
        self._calls: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._framer.feed(data)
            calls = [self._decoder.decode(frame) for frame in frames]
        except (errors.ShellError, msgspec.DecodeError) as exc:
            logger.warning("dropping a connection that sent an unreadable call: %r", exc)
            if self._transport is not None:
                self._transport.close()
            return
        loop = asyncio.get_running_loop()
        for call in calls:
            task = loop.create_task(self._serve(call))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _serve(self, call: Call) -> None:
        try:
            reply = await self._answer(call)
        except errors.ShellError as exc:
            reply = Reply(call.call_id, error=type(exc).__name__, message=str(exc))
        except Exception as exc:
            logger.exception("shard %d: call %d failed", call.shard, call.op)
            reply = Reply(call.call_id, error="ShardFailed", message=f"{exc!r}")
        self._write(reply)

    def _write(self, reply: Reply) -> None:
        if self._transport is not None:
            self._transport.write(_frame(self._encoder.encode(reply)))

    async def _answer(self, call: Call) -> Reply:
        host = self._host
        if call.op == OP_BATCH:
            data = await host.call_batch(call.shard, call.data, call.timeout_ms)
            return Reply(call.call_id, data=data)
        if call.op == OP_BATCH_EARLY:
            call_id = call.call_id

            def answer_early(early: bytes) -> None:
                self._write(Reply(call_id, data=early, partial=True))

            data = await host.call_batch(call.shard, call.data, call.timeout_ms, answer_early)
            return Reply(call_id, data=data)
        if call.op == OP_SHARD_COUNT:
            return Reply(call.call_id, shard_count=host.shard_count)
        if not 0 <= call.shard < host.shard_count:
            raise errors.ShardFailed(f"no shard {call.shard}")
        if call.op == OP_STATISTICS:
            statistics = await host.statistics(call.shard, call.timeout_ms)
            return Reply(call.call_id, statistics=statistics)
        if call.op == OP_OWNER_STATISTICS:
            # A host without owners (no storage) has no owner statistics to give.
            owner = getattr(host, "owner", None)
            return Reply(
                call.call_id, owner=None if owner is None else owner(call.shard).statistics()
            )
        if call.op == OP_CHECK_INVARIANTS:
            await host.check_invariants(call.shard, call.timeout_ms)
            return Reply(call.call_id)
        raise errors.ShardFailed(f"unknown operation {call.op}")

    async def drain_and_close(self) -> None:
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()


# -- the gateway's side ------------------------------------------------------------------


class LocalEngineTransport:
    """A ``ShardTransport`` to the shards of an engine process on this machine.

    One connection, reopened on the next call after it broke; calls in flight
    when it broke fail with ``ShardUnavailable`` (they may or may not have
    been applied: the coalescer resends, and the shards deduplicate). A call
    that finds no engine listening fails at once with ``ShardUnreachable``
    (nothing was sent).
    """

    def __init__(self, path: str, shard_count: int) -> None:
        self._path = path
        self._shard_count = shard_count
        self._protocol: _ClientProtocol | None = None
        self._connecting: asyncio.Task[_ClientProtocol] | None = None
        self._next_id = 0

    @classmethod
    async def connect(
        cls, path: str, *, timeout_s: float = CONNECT_TIMEOUT_S
    ) -> "LocalEngineTransport":
        """Connect, waiting up to ``timeout_s`` for the engine process to listen."""
        transport = cls(path, 0)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                reply = await transport._call(OP_SHARD_COUNT, 0, int(CONNECT_TIMEOUT_S * 1000))
                break
            except errors.ShardUnavailable:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(CONNECT_RETRY_S)
        transport._shard_count = reply.shard_count
        return transport

    @property
    def shard_count(self) -> int:
        return self._shard_count

    async def call_batch(
        self,
        shard: int,
        data: bytes,
        timeout_ms: int,
        on_early: Callable[[bytes], None] | None = None,
    ) -> bytes:
        if on_early is None:
            return (await self._call(OP_BATCH, shard, timeout_ms, data)).data
        return (await self._call(OP_BATCH_EARLY, shard, timeout_ms, data, on_early)).data

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics:
        statistics = (await self._call(OP_STATISTICS, shard, timeout_ms)).statistics
        if statistics is None:
            raise errors.ShardFailed(f"shard {shard}: no statistics in the reply")
        return statistics

    async def owner_statistics(self, shard: int, timeout_ms: int) -> OwnerStatistics | None:
        return (await self._call(OP_OWNER_STATISTICS, shard, timeout_ms)).owner

    async def check_invariants(self, shard: int, timeout_ms: int) -> None:
        await self._call(OP_CHECK_INVARIANTS, shard, timeout_ms)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    async def _call(
        self,
        op: int,
        shard: int,
        timeout_ms: int,
        data: bytes = b"",
        on_partial: Callable[[bytes], None] | None = None,
    ) -> Reply:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._open()
        self._next_id += 1
        call_id = self._next_id
        reply_future = protocol.send(Call(call_id, op, shard, timeout_ms, data), on_partial)
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                reply = await reply_future
        except TimeoutError as exc:
            protocol.forget(call_id)
            raise errors.ShardCallTimeout(f"shard {shard}: no answer in {timeout_ms} ms") from exc
        if reply.error:
            raise _ERRORS.get(reply.error, errors.ShardFailed)(reply.message)
        return reply

    async def _open(self) -> "_ClientProtocol":
        # Concurrent first calls share one connection attempt.
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._open_once())
        protocol = await asyncio.shield(self._connecting)
        self._protocol = protocol
        return protocol

    async def _open_once(self) -> "_ClientProtocol":
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_unix_connection(_ClientProtocol, self._path)
        except OSError as exc:
            raise SocketUnreachable(f"the engine process is not reachable: {exc}") from exc
        return protocol


class _ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._framer = _Framer()
        self._decoder = msgspec.msgpack.Decoder(Reply)
        self._encoder = msgspec.msgpack.Encoder()
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        # call id -> what takes its partial replies, while the call is pending.
        self._on_partial: dict[int, Callable[[bytes], None]] = {}
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        pending, self._pending = self._pending, {}
        self._on_partial.clear()
        for future in pending.values():
            if not future.done():
                future.set_exception(SocketBroke("the connection to the engine process broke"))

    def send(
        self, call: Call, on_partial: Callable[[bytes], None] | None = None
    ) -> "asyncio.Future[Reply]":
        if self._transport is None:
            raise SocketUnreachable("the connection to the engine process broke")
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[call.call_id] = future
        if on_partial is not None:
            self._on_partial[call.call_id] = on_partial
        self._transport.write(_frame(self._encoder.encode(call)))
        return future

    def forget(self, call_id: int) -> None:
        self._pending.pop(call_id, None)
        self._on_partial.pop(call_id, None)

    def data_received(self, data: bytes) -> None:
        try:
            replies = [self._decoder.decode(frame) for frame in self._framer.feed(data)]
        except (errors.ShellError, msgspec.DecodeError) as exc:
            logger.error("the engine process sent an unreadable reply: %r", exc)
            self.close()
            return
        for reply in replies:
            if reply.partial:
                self._take_partial(reply)
                continue
            self._on_partial.pop(reply.call_id, None)
            future = self._pending.pop(reply.call_id, None)
            if future is not None and not future.done():
                future.set_result(reply)

    def _take_partial(self, reply: Reply) -> None:
        on_partial = self._on_partial.get(reply.call_id)
        if on_partial is None:
            return
        try:
            on_partial(reply.data)
        except Exception:
            # The reply still carries every answer: nothing is lost but the head start.
            logger.exception("could not take the partial reply to call %d", reply.call_id)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def serve_engine(host: Any, path: str, stopped: Callable[[], Awaitable[object]]) -> None:
    """Start ``host``, serve it on ``path`` until ``stopped()`` returns, then close both."""
    await host.start()
    server = LocalEngineServer(host)
    await server.start(path)
    logger.info("the engine's %d shards are served on %s", host.shard_count, path)
    try:
        await stopped()
    finally:
        await server.close()
        await host.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

"""The caller side of the shard boundary: coalesces concurrent commands into batches.

``EngineClient.execute(command)`` routes a command to its shard and waits for
its result. Commands for one shard that arrive in the same turn of the event
loop leave together as one encoded batch (at most ``BATCH_COMMANDS_MAX``), with
up to ``BATCHES_IN_FLIGHT_MAX`` batches in flight per shard. A batch is flushed
on the next loop iteration, never on a timer, so a lone command pays no delay;
under load, a batch that is not full waits for the reply already in flight to
its shard and grows meanwhile (``PARTIAL_BATCHES_IN_FLIGHT_MAX``), because a
Ray call costs far more than a command. Reads do not wait like that: while
changes are held so, the reads waiting beside them leave as a batch of their
own (one such batch in flight per shard), and the shard answers it as soon as
what it read is durable, not after the changes in flight commit. Reads that
do share a batch with changes (the lane was free) are answered ahead of its
reply where the transport can (``on_early``), when what they read is durable
already, so they do not wait for the batch's changes to commit either.

It owns the per-shard queues of waiting commands and the retry policy. A batch
that failed because its actor died is resent as the same bytes (the same
request ids), so the shard's request-id memory applies it once. Backpressure
from the shard is waited out with backoff; every wait is bounded by a timeout.
A shard that cannot be reached is resent to for ``SHARD_UNAVAILABLE_PATIENCE_MS``
from the first failure, no longer: then the batch fails, as
``ShardUnavailable`` when an attempt may have been applied (its outcome is
unknown; a resend that timed out at the end of the patience counts so too) and
as the failure that applied nothing otherwise (``errors.may_have_applied``
tells them apart). A shard whose host gives no sign of life fails its call as
``ShardUnavailable`` (the Ray transport probes it), so a lost node costs a
caller at most ``SHARD_SILENT_ANSWER_MS``.
A command the wire cannot carry is answered 422 alone, and its batch leaves
without it.

It must never: build or change a command's request id on a retry; wait without
a limit; queue without a limit (``Overloaded`` instead); let one command fail
the others of its batch; import Ray (transports map their failures onto
``engine.shell.errors``).
"""

import asyncio
import itertools
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import msgspec

from engine.core import protocol, routing
from engine.core.errors import NotFound, ValidationFailed
from engine.core.protocol import (
    READ_ONLY_COMMANDS,
    ROUTING_FIELD,
    AnyCommand,
    AnyResult,
    BatchCodec,
    Failure,
    ListSlots,
)
from engine.core.storable import command_problems
from engine.shell import limits
from engine.shell.errors import (
    Overloaded,
    ShardBusy,
    ShardCallTimeout,
    ShardFailed,
    ShardUnavailable,
    ShardUnreachable,
    ShellError,
    may_have_applied,
)
from engine.shell.transport import ShardTransport

if TYPE_CHECKING:
    from engine.shell.tracing import Tracing

logger = logging.getLogger(__name__)

# The field that names the owning entity, per command type. List commands span
# slots and need an explicit shard (ListSlots by resource routes itself).


_READS: Final = frozenset(READ_ONLY_COMMANDS)


class RequestIds:
    """Request ids unique across processes: a random prefix per instance and a counter."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


def shard_for(command: AnyCommand, partition_map: routing.PartitionMap) -> int | None:
    """The shard that serves ``command``'s partition, or None when its id was never
    issued by the engine."""
    field = ROUTING_FIELD.get(type(command))
    if field is not None:
        entity_id: str = getattr(command, field)
        return partition_map.shard_of(entity_id)
    if isinstance(command, ListSlots) and command.resource_id is not None:
        return partition_map.shard_of_resource(command.resource_id)
    raise ValueError(f"{type(command).__name__} spans shards: pass shard= explicitly")


class ClientStatistics(msgspec.Struct, frozen=True, kw_only=True):
    coalesce: bool
    batches_sent: int
    commands_sent: int
    batch_size_max: int
    # Resends after the shard's owner died or restarted.
    retries: int
    # Resends after the shard pushed back (too many pending calls).
    busy_retries: int
    failed_batches: int
    overloaded: int
    # Answers that arrived ahead of their batch's reply (reads beside changes).
    answered_early: int
    pending_commands: tuple[int, ...]
    batches_in_flight: tuple[int, ...]
    # Commands a shard refused as not serving their partition, sent again where
    # the map read afresh says; and those reads of the stored map.
    redirected: int = 0
    map_reads: int = 0


class _Lane:
    """The commands waiting for one shard and the batches in flight to it."""

    __slots__ = (
        "changes",
        "commands",
        "flush_scheduled",
        "futures",
        "in_flight",
        "reads_in_flight",
        "shard",
    )

    def __init__(self, shard: int) -> None:
        self.shard = shard
        # Invariant: commands[i] is answered through futures[i]; both lists grow together.
        self.commands: list[AnyCommand] = []
        self.futures: list[asyncio.Future[AnyResult]] = []
        # How many of the waiting commands are not reads.
        self.changes = 0
        self.in_flight = 0
        # Of those in flight, the batches of reads alone.
        self.reads_in_flight = 0
        self.flush_scheduled = False


class EngineClient:
    """Sends commands to shards through a transport, batched per shard unless ``coalesce=False``.

    Without coalescing every command is its own call (the baseline the bench
    compares against), still bounded to ``SHARD_PENDING_CALLS_MAX`` calls in
    flight per shard so that the shard's backpressure is not tripped.
    """

    # Called with (old map, new map) once a fresher stored map is taken; synchronous,
    # it must not wait (the gateway's live updates follow the partitions with it).
    on_map_changed: Callable[[routing.PartitionMap, routing.PartitionMap], None] | None = None

    def __init__(
        self,
        transport: ShardTransport,
        *,
        partition_map: routing.PartitionMap | None = None,
        map_source: Callable[[], Awaitable[routing.PartitionMap]] | None = None,
        coalesce: bool = True,
        partial_batches_in_flight_max: int = limits.PARTIAL_BATCHES_IN_FLIGHT_MAX,
        pending_commands_max: int = limits.PENDING_COMMANDS_PER_SHARD_MAX,
        call_timeout_ms: int = limits.ACTOR_CALL_TIMEOUT_MS,
        retries_max: int = limits.BATCH_RETRIES_MAX,
        retry_backoff_ms: int = limits.BATCH_RETRY_BACKOFF_MS,
        unavailable_patience_ms: int = limits.SHARD_UNAVAILABLE_PATIENCE_MS,
        tracing: "Tracing | None" = None,
    ) -> None:
        self._transport = transport
        # None: tracing off, and nothing here spends anything on it but that test.
        self._tracing = tracing
        # With tracing on: id(command) -> the traceparent of its span, for the
        # commands under way whose span is sampled; their batch carries them.
        self._traces: dict[int, str] = {}
        if tracing is not None:
            # Off, ``execute`` is the plain method: not even a test per command.
            self.execute = self._execute_traced  # type: ignore[method-assign]
        self._shard_count = transport.shard_count
        # Which shard serves each partition: the database's map (None: one
        # partition per shard, as in a core built without one).
        self._partition_map = (
            routing.PartitionMap.spread(self._shard_count, self._shard_count)
            if partition_map is None
            else partition_map
        )
        if self._partition_map.shard_count > self._shard_count:
            raise ValueError(
                f"the partition map names {self._partition_map.shard_count} shards,"
                f" the transport has {self._shard_count}"
            )
        # Reads the stored map again when a shard says it does not serve a
        # partition (None: the map never changes under this client).
        self._map_source = map_source
        self._map_reading: asyncio.Task[None] | None = None
        self._map_reads = 0
        self._redirected = 0
        self._coalesce = coalesce
        self._batch_max = limits.BATCH_COMMANDS_MAX if coalesce else 1
        self._in_flight_max = (
            limits.BATCHES_IN_FLIGHT_MAX if coalesce else limits.SHARD_PENDING_CALLS_MAX
        )
        self._partial_in_flight_max = partial_batches_in_flight_max
        self._pending_max = pending_commands_max
        self._call_timeout_ms = call_timeout_ms
        self._retries_max = retries_max
        self._retry_backoff_ms = retry_backoff_ms
        self._unavailable_patience_ms = unavailable_patience_ms
        self._codec = BatchCodec()
        self._lanes = [_Lane(shard) for shard in range(self._shard_count)]
        self._tasks: set[asyncio.Task[None]] = set()
        self._batches_sent = 0
        self._commands_sent = 0
        self._batch_size_max = 0
        self._retries = 0
        self._busy_retries = 0
        self._failed_batches = 0
        self._overloaded = 0
        self._answered_early = 0

    @property
    def shard_count(self) -> int:
        """The shards the partition map names now (a scatter-gather asks each)."""
        return self._partition_map.shard_count

    @property
    def partition_map(self) -> routing.PartitionMap:
        return self._partition_map

    def shard_of(self, entity_id: str) -> int | None:
        """The shard serving a slot or booking id, None for an id the engine never issued."""
        return self._partition_map.shard_of(entity_id)

    def shard_of_resource(self, resource_id: str) -> int:
        return self._partition_map.shard_of_resource(resource_id)

    async def execute(self, command: AnyCommand, *, shard: int | None = None) -> AnyResult:
        """The command's result. Raises a ``ShellError`` if the batch could not be delivered.

        The wait is bounded: each attempt of the batch carrying this command has
        a timeout and the attempts are limited, and the batch always resolves
        every future it carries. A shard that does not serve the command's
        partition (it moved) applied nothing: the command follows the stored map
        for ``unavailable_patience_ms``, then ``ShardUnreachable``.

        With tracing on, ``_execute_traced`` takes this method's place.
        """
        try:
            result = await self._execute_once(command, shard)
        except ShellError:
            # A shard that failed may no longer be the one the map names (it was
            # scaled away): routed again if the stored map says so, else the failure.
            if shard is not None or not await self._routes_elsewhere_now(command):
                raise
            result = await self._execute_once(command, None)
        if protocol.not_served(result) is not None:
            # Only a command that routes by an id or a resource is ever refused so,
            # and routing it again is what its caller would do.
            return await self._follow_the_map(command, result)
        return result

    async def _execute_traced(self, command: AnyCommand, *, shard: int | None = None) -> AnyResult:
        """``execute`` with tracing on: the command has a span of its own (a child of
        the caller's, the HTTP request's), whose context its batch carries to the
        shard, and which records the answer's status."""
        tracing = self._tracing
        assert tracing is not None
        key = id(command)
        with tracing.command_span(type(command).__name__, command.request_id) as span:
            context = span.get_span_context()
            if context.trace_flags.sampled:
                self._traces[key] = tracing.traceparent(context)
            try:
                result = await EngineClient.execute(self, command, shard=shard)
            finally:
                self._traces.pop(key, None)
            tracing.answered(span, result.status)
            return result

    async def _follow_the_map(self, command: AnyCommand, refused: AnyResult) -> AnyResult:
        deadline = asyncio.get_running_loop().time() + self._unavailable_patience_ms / 1000
        while True:
            partition = protocol.not_served(refused)
            if partition is None:
                return refused
            self._redirected += 1
            if asyncio.get_running_loop().time() >= deadline:
                raise ShardUnreachable(
                    f"partition {partition} is moving: not served where the map says"
                )
            version = self._partition_map.version
            await self._read_map()
            if self._partition_map.version == version:
                # Not moved on yet (the move is under way): give it a moment.
                await asyncio.sleep(self._retry_backoff_ms / 1000)
            refused = await self._execute_once(command, None)

    async def _routes_elsewhere_now(self, command: AnyCommand) -> bool:
        if self._map_source is None:
            return False
        before = shard_for(command, self._partition_map)
        if before is None:
            return False
        await self._read_map()
        return shard_for(command, self._partition_map) != before

    async def refresh_map(self) -> None:
        """Read the stored map now (told that it changed, or to catch up after a while)."""
        await self._read_map()

    async def _read_map(self) -> None:
        """One read of the stored map at a time, shared by every command that asks."""
        if self._map_source is None:
            return
        reading = self._map_reading
        if reading is None or reading.done():
            reading = self._map_reading = asyncio.get_running_loop().create_task(
                self._take_map(self._map_source)
            )
        await asyncio.shield(reading)

    async def _take_map(self, source: Callable[[], Awaitable[routing.PartitionMap]]) -> None:
        self._map_reads += 1
        try:
            fresh = await source()
        except Exception as error:  # the next refusal asks again
            logger.warning("the partition map could not be read: %r", error)
            return
        if fresh.version > self._partition_map.version:
            # More shards than the map had: added by a scale (or scaled away before and
            # added again, with new actors).
            grows = fresh.shard_count > self._partition_map.shard_count
            if grows and not await self._reach(fresh.shard_count):
                return
            previous, self._partition_map = self._partition_map, fresh
            retire = getattr(self._transport, "retire_shards", None)
            if retire is not None and fresh.shard_count < self._shard_count:
                retire(fresh.shard_count)
            if self.on_map_changed is not None:
                try:
                    self.on_map_changed(previous, fresh)
                except Exception:  # the map is taken all the same
                    logger.exception("a partition map listener failed")

    async def _reach(self, shard_count: int) -> bool:
        """Lanes to shards up to ``shard_count`` (shards added by a scale, or added
        again after one scaled them away), if the transport can reach them."""
        connect = getattr(self._transport, "connect_shards", None)
        try:
            if connect is not None:
                await connect(shard_count)
        except Exception as error:
            logger.error("shards up to %d cannot be reached: %r", shard_count, error)
            return False
        if self._transport.shard_count < shard_count:
            logger.error(
                "the partition map names %d shards; this gateway reaches %d",
                shard_count,
                self._transport.shard_count,
            )
            return False
        self._lanes.extend(_Lane(shard) for shard in range(self._shard_count, shard_count))
        self._shard_count = max(self._shard_count, shard_count)
        return True

    async def _execute_once(self, command: AnyCommand, shard: int | None) -> AnyResult:
        if shard is None:
            shard = shard_for(command, self._partition_map)
            if shard is None:
                return Failure(status=NotFound.status, code=NotFound.code, message="unknown id")
        lane = self._lanes[shard]
        if len(lane.commands) >= self._pending_max:
            self._overloaded += 1
            raise Overloaded(f"{len(lane.commands)} commands already wait for shard {shard}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AnyResult] = loop.create_future()
        lane.commands.append(command)
        lane.futures.append(future)
        if type(command) not in _READS:
            lane.changes += 1
        if not lane.flush_scheduled:
            lane.flush_scheduled = True
            # The next iteration, not a timer: everything submitted in this turn of the
            # loop joins the batch, and a lone command waits for nothing.
            loop.call_soon(self._flush, lane)
        return await future

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            coalesce=self._coalesce,
            batches_sent=self._batches_sent,
            commands_sent=self._commands_sent,
            batch_size_max=self._batch_size_max,
            retries=self._retries,
            busy_retries=self._busy_retries,
            failed_batches=self._failed_batches,
            overloaded=self._overloaded,
            answered_early=self._answered_early,
            pending_commands=tuple(len(lane.commands) for lane in self._lanes),
            batches_in_flight=tuple(lane.in_flight for lane in self._lanes),
            redirected=self._redirected,
            map_reads=self._map_reads,
        )

    async def wait_idle(self, timeout_s: float) -> None:
        """Wait until every batch in flight has been answered (or failed)."""
        async with asyncio.timeout(timeout_s):
            while self._tasks:
                await asyncio.wait(set(self._tasks))

    def _schedule_flush(self, lane: _Lane) -> None:
        if not lane.flush_scheduled:
            lane.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, lane)

    def _flush(self, lane: _Lane) -> None:
        lane.flush_scheduled = False
        while lane.commands and lane.in_flight < self._in_flight_max:
            size = min(len(lane.commands), self._batch_max)
            reads_only = lane.changes == 0
            # A reply is on its way and will flush again: meanwhile the batch grows, and
            # fewer, fuller calls cost less per command on both sides. Not so the reads
            # (while no batch of reads alone is in flight): they need not wait for
            # changes to commit, so they leave by themselves.
            if (
                size < self._batch_max
                and lane.in_flight >= self._partial_in_flight_max
                and (not reads_only or lane.reads_in_flight)
            ):
                # The reads waiting beside held changes leave alone, once at a time.
                if not reads_only and not lane.reads_in_flight and lane.changes < size:
                    self._send_reads_alone(lane)
                break
            commands = lane.commands[:size]
            futures = lane.futures[:size]
            del lane.commands[:size]
            del lane.futures[:size]
            # Reads beside changes: they may be answered ahead of the batch's reply.
            mixed = False
            if not reads_only:
                changes = sum(1 for command in commands if type(command) not in _READS)
                lane.changes -= changes
                mixed = changes < size
            self._launch(lane, commands, futures, reads_only, mixed)

    def _launch(
        self,
        lane: _Lane,
        commands: list[AnyCommand],
        futures: list[asyncio.Future[AnyResult]],
        reads_only: bool,
        mixed: bool,
    ) -> None:
        """Count a batch in flight to its lane and send it in a task of its own."""
        lane.in_flight += 1
        lane.reads_in_flight += reads_only
        task = asyncio.get_running_loop().create_task(
            self._send(lane, commands, futures, reads_only, mixed)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_reads_alone(self, lane: _Lane) -> None:
        """Take the waiting reads out of the lane and send them as a batch of their own.

        Called only while fewer commands wait than a batch holds (a full batch
        would have left), so they all fit in one.
        """
        reads: list[AnyCommand] = []
        read_futures: list[asyncio.Future[AnyResult]] = []
        changes: list[AnyCommand] = []
        change_futures: list[asyncio.Future[AnyResult]] = []
        for command, future in zip(lane.commands, lane.futures, strict=True):
            if type(command) in _READS:
                reads.append(command)
                read_futures.append(future)
            else:
                changes.append(command)
                change_futures.append(future)
        lane.commands = changes
        lane.futures = change_futures
        self._launch(lane, reads, read_futures, True, False)

    async def _send(
        self,
        lane: _Lane,
        commands: list[AnyCommand],
        futures: list[asyncio.Future[AnyResult]],
        reads_only: bool,
        mixed: bool,
    ) -> None:
        try:
            # Encoded once: a resend carries exactly these bytes, so the same request ids.
            try:
                data = self._codec.encode_batch(
                    commands, self._batch_traces(commands) if self._traces else None
                )
            except Exception:
                # A command msgpack cannot carry (a lone surrogate, an integer past 64
                # bits) is refused alone; the others of the batch leave without it.
                commands, futures = self._refuse_unencodable(commands, futures)
                if not commands:
                    return
                data = self._codec.encode_batch(
                    commands, self._batch_traces(commands) if self._traces else None
                )
            size = len(commands)
            self._batches_sent += 1
            self._commands_sent += size
            self._batch_size_max = max(self._batch_size_max, size)
            on_early = self._early_answers(futures) if mixed else None
            reply = await self._call_with_retries(lane.shard, data, on_early)
            results = self._codec.decode_reply(reply)
            if len(results) != size:
                raise ShardFailed(f"shard {lane.shard} answered {len(results)} of {size}")
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:
            self._failed_batches += 1
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
        else:
            for future, result in zip(futures, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            lane.in_flight -= 1
            lane.reads_in_flight -= reads_only
            if lane.commands:
                # On the next iteration, so the callers this reply just woke can join.
                self._schedule_flush(lane)

    def _batch_traces(self, commands: list[AnyCommand]) -> list[str]:
        """The traceparents of the batch's traced commands (tracing on)."""
        traces = self._traces
        return [trace for command in commands if (trace := traces.get(id(command))) is not None]

    def _refuse_unencodable(
        self, commands: list[AnyCommand], futures: list[asyncio.Future[AnyResult]]
    ) -> tuple[list[AnyCommand], list[asyncio.Future[AnyResult]]]:
        """Answer each command that cannot be encoded with a 422; the others, to send."""
        kept: list[AnyCommand] = []
        kept_futures: list[asyncio.Future[AnyResult]] = []
        for command, future in zip(commands, futures, strict=True):
            try:
                self._codec.encode_batch([command])
            except Exception as exc:
                problems = command_problems(command) or {"command": f"cannot be encoded: {exc}"}
                if not future.done():
                    future.set_result(
                        Failure(
                            status=ValidationFailed.status,
                            code=ValidationFailed.code,
                            message=f"cannot be stored: {', '.join(problems)}",
                            details=problems,
                        )
                    )
            else:
                kept.append(command)
                kept_futures.append(future)
        return kept, kept_futures

    def _early_answers(self, futures: list[asyncio.Future[AnyResult]]) -> Callable[[bytes], None]:
        """What resolves the futures of a batch's answers that arrive ahead of its reply."""

        def answer(data: bytes) -> None:
            early = self._codec.decode_early(data)
            count = len(futures)
            for index, result in zip(early.indices, early.results, strict=True):
                if 0 <= index < count:
                    future = futures[index]
                    if not future.done():
                        future.set_result(result)
            self._answered_early += len(early.indices)

        return answer

    async def _call_with_retries(
        self, shard: int, data: bytes, on_early: Callable[[bytes], None] | None = None
    ) -> bytes:
        loop = asyncio.get_running_loop()
        busy_deadline = loop.time() + self._call_timeout_ms / 1000
        busy_backoff_ms = limits.BUSY_BACKOFF_FIRST_MS
        failures = 0
        timeout_ms = self._call_timeout_ms
        # Set by the first failure to reach the shard: every resend, and each pause
        # before one, ends by then.
        patience_deadline: float | None = None
        # Whether an attempt so far may have been applied: then the outcome is unknown.
        delivered = False
        call_batch = self._transport.call_batch
        while True:
            try:
                if on_early is None:
                    return await call_batch(shard, data, timeout_ms)
                return await call_batch(shard, data, timeout_ms, on_early)
            except ShardUnavailable as exc:
                delivered = delivered or may_have_applied(exc)
                failures += 1
                now = loop.time()
                if patience_deadline is None:
                    patience_deadline = now + self._unavailable_patience_ms / 1000
                backoff_s = _jittered_s(self._retry_backoff_ms * 2 ** (failures - 1))
                if failures > self._retries_max or now + backoff_s >= patience_deadline:
                    if delivered and not may_have_applied(exc):
                        raise _maybe_applied(shard, exc) from exc
                    raise
                self._retries += 1
                await asyncio.sleep(backoff_s)
                timeout_ms = max(1, int((patience_deadline - loop.time()) * 1000))
            except ShardCallTimeout as exc:
                if patience_deadline is None:
                    raise
                # A resend's timeout is what was left of the patience: it ran out.
                raise ShardUnavailable(
                    f"shard {shard}: unreachable for {self._unavailable_patience_ms} ms"
                    " after a failure (the batch may have been applied)"
                ) from exc
            except ShardBusy as exc:
                deadline = busy_deadline
                if patience_deadline is not None:
                    deadline = min(deadline, patience_deadline)
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    if delivered:
                        raise _maybe_applied(shard, exc) from exc
                    raise ShardBusy(
                        f"shard {shard} stayed busy for {self._call_timeout_ms} ms"
                    ) from exc
                self._busy_retries += 1
                await asyncio.sleep(min(_jittered_s(busy_backoff_ms), remaining_s))
                busy_backoff_ms = min(2 * busy_backoff_ms, limits.BUSY_BACKOFF_MAX_MS)


def _maybe_applied(shard: int, last: ShellError) -> ShardUnavailable:
    """The failure of a batch that an earlier attempt may have applied, though the
    last one (``last``) applied nothing: its outcome is unknown all the same."""
    return ShardUnavailable(
        f"shard {shard}: no answer to a batch that reached it, then {last}"
        " (the batch may have been applied)"
    )


def _jittered_s(backoff_ms: float) -> float:
    """Half to all of the backoff, so that callers failing together do not retry together."""
    return backoff_ms * random.uniform(0.5, 1.0) / 1000

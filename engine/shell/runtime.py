"""ShardRuntime: the async shell around one ShardCore, which hosts many slots.

It owns one shard's core, the single timer that wakes the core at its next
deadline, the handoff of the core's events to a sink, and the shard's counters.
A batch arrives as msgspec bytes, every command in it runs in order with one
reading of the clock, and the results leave as bytes.

It must never:
- await between decoding a batch and applying its last command: the event
  loop is the only lock, and an await there lets another batch interleave;
- touch the core from any thread but the one running its event loop;
- poll for timers: it sleeps until ``core.next_deadline_ms()``;
- decide a business rule: refusals come from the core as ``Failure`` results;
- keep serving after the core raised: the state may be half-changed, so the
  runtime stops and reports the failure (the actor then restarts and rebuilds).
"""

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

from engine.core.clock import Clock
from engine.core.errors import ServiceUnavailable, require
from engine.core.policy import DomainPolicy
from engine.core.protocol import (
    OUTCOME_DETAIL,
    OUTCOME_UNKNOWN,
    READ_ONLY_COMMANDS,
    AnyCommand,
    AnyEvent,
    AnyResult,
    AttemptRefused,
    BatchCodec,
    BookingChanged,
    BookingResult,
    Failure,
    GetBooking,
    GetSlot,
    KeyRecord,
    ListBookings,
    ListSlots,
    Origin,
    OutcomeRecord,
    QueueChanged,
    QueueMoved,
    QueuePosition,
    SlotChanged,
    TouchWaiting,
)
from engine.core.records import Booking, QueueEntry, ShardStatistics, StoredSlot
from engine.core.routing import PartitionSet
from engine.core.shard import ShardCore
from engine.shell import limits
from engine.shell.errors import BatchRejected, ShardFailed

if TYPE_CHECKING:
    from engine.shell.tracing import Tracing

logger = logging.getLogger(__name__)

# Batch sizes are counted in power-of-two buckets: 1, 2-3, 4-7, ..., up to the
# largest batch a caller may send.
BATCH_SIZE_BUCKETS: Final = limits.BATCH_COMMANDS_MAX.bit_length()


class EventSink(Protocol):
    """Where a shard's events go: storage, the fan-out bus, or memory in tests."""

    def publish(self, events: list[AnyEvent], origins: dict[str, Origin] | None = None) -> None:
        """Take events in order. Synchronous: it runs between state changes and must not wait.

        ``origins``: the origin of each change that carried one, by request id,
        for the audit only (never to be published with the events).
        """
        ...

    def remember(
        self,
        outcomes: list[OutcomeRecord],
        keys: list[KeyRecord],
        refused: list[AttemptRefused] | None = None,
    ) -> None:
        """Take the request outcomes and idempotency records the shard just remembered,
        and the reservation attempts it refused (audited, never published)."""
        ...

    @property
    def position(self) -> int:
        """A count of the hand-offs taken so far (``publish`` and ``remember`` calls)."""
        ...

    @property
    def durable_position(self) -> int:
        """Every hand-off up to this position is durable."""
        ...

    async def wait_durable(self, position: int | None = None) -> None:
        """Return once every hand-off up to ``position`` (default: all so far) is durable.

        Group commit waits here.
        """
        ...


class MemoryEventSink:
    """Keeps the last ``events_max`` events in memory; durable as soon as published."""

    def __init__(self, events_max: int = limits.MEMORY_SINK_EVENTS_MAX) -> None:
        self._events: collections.deque[AnyEvent] = collections.deque(maxlen=events_max)
        self._published = 0
        self._waiters: list[tuple[Callable[[AnyEvent], bool], asyncio.Future[AnyEvent]]] = []

    @property
    def published(self) -> int:
        return self._published

    @property
    def position(self) -> int:
        return self._published

    @property
    def durable_position(self) -> int:
        return self._published

    @property
    def dropped(self) -> int:
        """Events pushed out by newer ones."""
        return self._published - len(self._events)

    def events(self) -> list[AnyEvent]:
        return list(self._events)

    def publish(self, events: list[AnyEvent], origins: dict[str, Origin] | None = None) -> None:
        self._events.extend(events)
        self._published += len(events)
        if self._waiters:
            self._wake_waiters(events)

    def remember(
        self,
        outcomes: list[OutcomeRecord],
        keys: list[KeyRecord],
        refused: list[AttemptRefused] | None = None,
    ) -> None:
        return None

    async def wait_durable(self, position: int | None = None) -> None:
        return None

    async def wait_for(self, predicate: Callable[[AnyEvent], bool], timeout_s: float) -> AnyEvent:
        """The first kept or later event matching ``predicate``; TimeoutError after the limit."""
        for event in self._events:
            if predicate(event):
                return event
        if len(self._waiters) >= limits.MEMORY_SINK_WAITERS_MAX:
            raise RuntimeError("too many waiters on the in-memory event sink")
        future: asyncio.Future[AnyEvent] = asyncio.get_running_loop().create_future()
        waiter = (predicate, future)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake_waiters(self, events: list[AnyEvent]) -> None:
        still_waiting = []
        for predicate, future in self._waiters:
            if future.done():
                continue
            match = next((event for event in events if predicate(event)), None)
            if match is None:
                still_waiting.append((predicate, future))
            else:
                future.set_result(match)
        self._waiters = still_waiting


_READ_ONLY: Final = frozenset(READ_ONLY_COMMANDS)


def service_unavailable(reason: str, *, outcome_unknown: bool = False) -> Failure:
    """The answer to a command refused because a dependency is down: nothing was
    applied, or with ``outcome_unknown``, the change may have been applied all the
    same (its commit was under way when storage failed)."""
    return Failure(
        status=ServiceUnavailable.status,
        code=ServiceUnavailable.code,
        message=reason,
        details={OUTCOME_DETAIL: OUTCOME_UNKNOWN} if outcome_unknown else {},
        retry_after_s=limits.RETRY_AFTER_S,
    )


class InDoubt:
    """What a shard's reads may not show while its storage is unreachable: the slots,
    bookings and users that events not known to be committed touched (a failed
    flush may yet have committed; later hand-offs never will)."""

    def __init__(self, events: Iterable[AnyEvent]) -> None:
        self.slots: set[str] = set()
        self.bookings: set[str] = set()
        self.users: set[str] = set()
        for event in events:
            if type(event) is BookingChanged:
                booking = event.booking
                self.bookings.add(booking.id)
                self.slots.add(booking.slot_id)
                self.users.add(booking.user_id)
            elif type(event) is QueueChanged:
                self.slots.add(event.entry.slot_id)
                self.users.add(event.entry.user_id)
            elif type(event) is SlotChanged:
                self.slots.add(event.slot.id)
            elif type(event) is QueueMoved:
                self.slots.add(event.slot_id)

    def hides(self, command: AnyCommand, result: AnyResult) -> bool:
        """Whether the answer to the read ``command`` could show a change in doubt."""
        if isinstance(command, GetSlot | QueuePosition):
            return command.slot_id in self.slots
        if isinstance(command, GetBooking):
            if command.booking_id in self.bookings:
                return True
            return type(result) is BookingResult and result.booking.slot_id in self.slots
        if isinstance(command, ListBookings):
            return command.user_id in self.users
        if isinstance(command, ListSlots):
            return bool(self.slots)
        return False


class RuntimeStatistics(msgspec.Struct, frozen=True, kw_only=True):
    shard_id: int
    batches: int
    commands: int
    batch_size_max: int
    # batch_size_histogram[i] counts batches of 2**i to 2**(i+1) - 1 commands.
    batch_size_histogram: tuple[int, ...]
    events: int
    timer_firings: int
    # CPU time spent applying batches (decode, commands, events, encode): the shard's own work,
    # as against the transport's.
    apply_ns: int
    # Batches of reads answered at once: what they read was durable already.
    reads_unheld: int
    # Reads of batches with changes answered before those changes were durable
    # (``execute_batch(..., on_early=...)``): what they read was durable already.
    reads_answered_early: int
    # The deadline the timer is armed for (None: no timer armed).
    timer_deadline_ms: int | None
    failed: bool
    core: ShardStatistics
    # Batches applied whose replies wait for their changes to commit, and their
    # commands: what the shard is working on now (applying itself never waits).
    in_flight_batches: int = 0
    in_flight_commands: int = 0


class ShardRuntime:
    # Invariants:
    # - ``_timer`` is armed for ``_timer_deadline_ms`` and that deadline is no later than
    #   ``core.next_deadline_ms()`` when the loop is idle; both are None when the core has
    #   no timer or the runtime has not started.
    # - Once ``_fatal`` is set, the core is never called again.
    def __init__(
        self,
        core: ShardCore,
        *,
        shard_id: int,
        clock: Clock,
        sink: EventSink | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        write_gate: Callable[[], str | None] | None = None,
        on_watched: Callable[[], None] | None = None,
        tracing: "Tracing | None" = None,
    ) -> None:
        self._core = core
        # With tracing on, a batch that carries trace contexts has a span, and a
        # sink that takes them (the writer's ``trace_batch``) is told which
        # position its changes reach, so that the flush committing them links to it.
        self._tracing = tracing
        self._trace_batch: Callable[[int, Any], None] | None = (
            getattr(sink, "trace_batch", None) if tracing is not None else None
        )
        # Called in the batch whose read a live watch follows, before any later
        # change can commit: the event publisher publishes again from then on.
        self._on_watched = on_watched
        # Asked once per batch: None lets changes through, a reason refuses them
        # (503, nothing applied) while reads are still answered.
        self._write_gate = write_gate
        self._shard_id = shard_id
        self._clock = clock
        self._sink: EventSink = sink if sink is not None else MemoryEventSink()
        self._on_fatal = on_fatal
        self._codec = BatchCodec()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline_ms: int | None = None
        self._fatal: BaseException | None = None
        self._batches = 0
        self._commands = 0
        self._batch_size_max = 0
        self._batch_size_histogram = [0] * BATCH_SIZE_BUCKETS
        self._events = 0
        self._timer_firings = 0
        self._apply_ns = 0
        # slot id -> the sink's position just after the slot's latest change was handed
        # off. A batch of reads waits only for the changes of the slots it read: a
        # poll of a quiet slot is not held up by another slot's commit. Marks that are
        # durable already are dropped once there are many (_prune_marks).
        self._slot_marks: dict[str, int] = {}
        self._slot_marks_prune_at = limits.SLOT_MARKS_PRUNE_AT
        self._reads_unheld = 0
        self._reads_answered_early = 0
        self._last_batch_size = 0
        self._in_flight_batches = 0
        self._in_flight_commands = 0
        # Storage is unreachable: the core's time stands still (``freeze``).
        self._frozen = False

    @classmethod
    def create(
        cls,
        *,
        shard_id: int,
        shard_count: int,
        policies: dict[str, DomainPolicy],
        clock: Clock,
        sink: EventSink | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        on_watched: Callable[[], None] | None = None,
        tracing: "Tracing | None" = None,
    ) -> "ShardRuntime":
        core = ShardCore(
            shard_id=shard_id,
            shard_count=shard_count,
            policies=policies,
            now_ms=clock.now_ms(),
        )
        return cls(
            core,
            shard_id=shard_id,
            clock=clock,
            sink=sink,
            on_fatal=on_fatal,
            on_watched=on_watched,
            tracing=tracing,
        )

    @property
    def shard_id(self) -> int:
        return self._shard_id

    @property
    def sink(self) -> EventSink:
        return self._sink

    @property
    def failed(self) -> bool:
        return self._fatal is not None

    def start(self) -> None:
        """Bind to the running event loop, fire what is already due, arm the timer. Idempotent."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        # A core restored from storage may hold deadlines that passed while no one owned it.
        self._on_timer()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_deadline_ms = None

    def freeze(self) -> None:
        """Storage is unreachable: from now on no timer fires (an expiry could not
        commit, and must not be shown), and only ``answer_frozen`` is asked."""
        self._frozen = True
        self.close()

    @property
    def frozen(self) -> bool:
        return self._frozen

    def answer_frozen(self, data: bytes, in_doubt: InDoubt, refused: str) -> bytes:
        """The reads of a batch answered at the shard's frozen time, from the state
        committed before storage became unreachable; changes, and reads that could
        show a change in doubt, get 503 (nothing applied). Applies no change."""
        if self._fatal is not None:
            raise ShardFailed(f"shard {self._shard_id} stopped after a failure: {self._fatal!r}")
        try:
            commands = self._codec.decode_batch(data)
        except msgspec.DecodeError as exc:
            raise BatchRejected(f"malformed batch: {exc}") from exc
        if len(commands) > limits.BATCH_COMMANDS_MAX:
            raise BatchRejected(
                f"{len(commands)} commands in a batch, at most {limits.BATCH_COMMANDS_MAX}"
            )
        core = self._core
        # The core's own time: execute advances no timer, so no expiry is decided.
        now_ms = core.now_ms
        unavailable = service_unavailable(refused)
        doubtful = service_unavailable(
            "this read could show a change whose commit is in doubt while storage is unreachable"
        )
        results: list[AnyResult] = []
        try:
            for command in commands:
                if type(command) not in _READ_ONLY:
                    results.append(unavailable)
                    continue
                result = core.execute(command, now_ms)
                results.append(doubtful if in_doubt.hides(command, result) else result)
        except Exception as exc:
            self._stop(exc)
            raise ShardFailed(f"shard {self._shard_id} failed: {exc!r}") from exc
        if core.watched:
            core.watched = False
            if self._on_watched is not None:
                self._on_watched()
        self._batches += 1
        self._commands += len(commands)
        return self._codec.encode_reply(results)

    async def execute_batch(
        self, data: bytes, on_early: Callable[[bytes], None] | None = None
    ) -> bytes:
        """Apply a batch and answer once what its answers show is durable.

        With ``on_early``, the reads of a batch that must wait for its changes
        to commit are handed to it first (``BatchCodec.decode_early``), if what
        they read is durable already; the reply still carries every answer.
        """
        reply, position, early = self.apply(data, early=on_early is not None)
        if early is not None and on_early is not None:
            on_early(early)
        await self.wait_durable(position, self._last_batch_size)
        return reply

    @property
    def last_batch_size(self) -> int:
        """The commands of the batch ``apply`` took last (read it before any await)."""
        return self._last_batch_size

    async def wait_durable(self, position: int, commands: int) -> None:
        """``sink.wait_durable(position)`` for a batch of ``commands`` that ``apply``
        took, counted in flight until it returns."""
        if position <= self._sink.durable_position:
            return
        self._in_flight_batches += 1
        self._in_flight_commands += commands
        try:
            await self._sink.wait_durable(position)
        finally:
            self._in_flight_batches -= 1
            self._in_flight_commands -= commands

    def apply(self, data: bytes, *, early: bool = False) -> tuple[bytes, int, bytes | None]:
        """The single-writer section: decode, apply every command, hand off events, encode.

        Returns the encoded answers and the sink position they may leave at
        (``sink.wait_durable(position)``): a batch that may have changed anything
        waits for everything handed off so far, its own changes included; a batch
        of reads only for the latest changes of the slots it read, so that no
        answer shows a state that a crash could still take back. With ``early``,
        and when that position is not durable yet, also the answers that may
        leave now (``BatchCodec.encode_early``): the reads of slots whose latest
        changes are durable, this batch's changes included; else None.
        """
        if self._fatal is not None:
            raise ShardFailed(f"shard {self._shard_id} stopped after a failure: {self._fatal!r}")
        self.start()
        started_ns = time.thread_time_ns()
        try:
            batch = self._codec.decode_traced_batch(data)
        except msgspec.DecodeError as exc:
            raise BatchRejected(f"malformed batch: {exc}") from exc
        commands = batch.commands
        size = len(commands)
        if size > limits.BATCH_COMMANDS_MAX:
            raise BatchRejected(f"{size} commands in a batch, at most {limits.BATCH_COMMANDS_MAX}")
        if batch.traces and self._tracing is not None:
            return self._apply_traced(self._tracing, batch.traces, commands, early, started_ns)
        return self._apply(commands, early, started_ns)

    def _apply(
        self, commands: list[AnyCommand], early: bool, started_ns: int
    ) -> tuple[bytes, int, bytes | None]:
        size = len(commands)
        now_ms = self._clock.now_ms()
        execute = self._core.execute
        results: list[AnyResult]
        refused = self._write_gate() if self._write_gate is not None else None
        try:
            if refused is None:
                results = [execute(command, now_ms) for command in commands]
            else:
                unavailable = service_unavailable(refused)
                results = [
                    execute(command, now_ms) if type(command) in _READ_ONLY else unavailable
                    for command in commands
                ]
        except Exception as exc:
            self._stop(exc)
            raise ShardFailed(f"shard {self._shard_id} failed: {exc!r}") from exc
        if self._core.watched:
            self._core.watched = False
            if self._on_watched is not None:
                self._on_watched()
        self._hand_off_events()
        self._rearm()
        self._batches += 1
        self._commands += size
        self._last_batch_size = size
        if size:
            self._batch_size_histogram[size.bit_length() - 1] += 1
            self._batch_size_max = max(self._batch_size_max, size)
        reply = self._codec.encode_reply(results)
        position = self._release_position(commands, results)
        early_reply = None
        if early and position > self._sink.durable_position:
            early_reply = self._early_reply(commands, results)
        self._apply_ns += time.thread_time_ns() - started_ns
        return reply, position, early_reply

    def _apply_traced(
        self,
        tracing: "Tracing",
        traces: list[str],
        commands: list[AnyCommand],
        early: bool,
        started_ns: int,
    ) -> tuple[bytes, int, bytes | None]:
        """``_apply`` within the batch's span, linked to its traced commands' spans;
        the sink learns which position the batch's changes reach."""
        sink = self._sink
        before = sink.position
        span = tracing.batch_started(self._shard_id, traces, len(commands))
        try:
            answer = self._apply(commands, early, started_ns)
        except BaseException as exc:
            span.record_exception(exc)
            span.end()
            raise
        reached = sink.position
        if reached > before and self._trace_batch is not None:
            self._trace_batch(reached, span.get_span_context())
        tracing.batch_applied(span, answer[1])
        return answer

    def release_partitions(self, partitions: frozenset[int]) -> None:
        """The core stops serving ``partitions`` (a live move, ``ShardCore.release``):
        from now on it answers 503 ``partitionNotServed`` for their slots."""
        self._guarded(lambda: self._core.release(partitions))

    def adopt_partitions(
        self,
        partitions: PartitionSet,
        *,
        slots: Iterable[StoredSlot],
        bookings: Iterable[Booking],
        entries: Iterable[QueueEntry],
        keys: Iterable[KeyRecord] = (),
        outcomes: Iterable[OutcomeRecord] = (),
    ) -> None:
        """The core serves ``partitions`` (its new full set) with the records loaded of
        the ones added (``ShardCore.adopt``); deadlines already past fire now."""
        self._guarded(
            lambda: self._core.adopt(
                partitions,
                slots=slots,
                bookings=bookings,
                entries=entries,
                keys=keys,
                outcomes=outcomes,
            )
        )
        if self._loop is not None:
            self._on_timer()

    def _guarded(self, change: Callable[[], None]) -> None:
        if self._fatal is not None:
            raise ShardFailed(f"shard {self._shard_id} stopped after a failure: {self._fatal!r}")
        # Whatever the core has not handed off yet goes first: a release emits nothing.
        self._hand_off_events()
        try:
            change()
        except Exception as exc:
            self._stop(exc)
            raise ShardFailed(f"shard {self._shard_id} failed: {exc!r}") from exc
        self._hand_off_events()
        self._rearm()

    def statistics(self) -> RuntimeStatistics:
        return RuntimeStatistics(
            shard_id=self._shard_id,
            batches=self._batches,
            commands=self._commands,
            batch_size_max=self._batch_size_max,
            batch_size_histogram=tuple(self._batch_size_histogram),
            events=self._events,
            timer_firings=self._timer_firings,
            apply_ns=self._apply_ns,
            reads_unheld=self._reads_unheld,
            reads_answered_early=self._reads_answered_early,
            timer_deadline_ms=self._timer_deadline_ms,
            failed=self._fatal is not None,
            core=self._core.statistics(),
            in_flight_batches=self._in_flight_batches,
            in_flight_commands=self._in_flight_commands,
        )

    def check_invariants(self) -> None:
        """The core's invariants, and that no deadline of the core is left without a wake-up."""
        self._core.check_invariants(self._clock.now_ms())
        deadline_ms = self._core.next_deadline_ms()
        if self._loop is None or self._fatal is not None or deadline_ms is None:
            return
        armed_ms = self._timer_deadline_ms
        require(
            self._timer is not None and armed_ms is not None and armed_ms <= deadline_ms,
            f"shard {self._shard_id}: deadline {deadline_ms} but the timer is armed for {armed_ms}",
        )

    def _read_mark(self, command: AnyCommand, result: AnyResult) -> int | None:
        """The sink position a read's answer may leave at; None for anything else."""
        if isinstance(command, GetSlot | QueuePosition):
            # Whatever the answer (even "not in the queue"), it shows the slot's state.
            return self._slot_marks.get(command.slot_id, 0)
        if isinstance(command, GetBooking):
            # A booking changes only with its slot; an unknown id shows nothing.
            if type(result) is BookingResult:
                return self._slot_marks.get(result.booking.slot_id, 0)
            return 0
        if isinstance(command, TouchWaiting):
            # Its answer shows nothing of any slot's state.
            return 0
        return None

    def _release_position(self, commands: list[AnyCommand], results: list[AnyResult]) -> int:
        sink = self._sink
        position = 0
        read_mark = self._read_mark
        for command, result in zip(commands, results, strict=True):
            mark = read_mark(command, result)
            if mark is None:
                # A change, a replayed outcome or a read across slots: all of it.
                return sink.position
            position = max(position, mark)
        if position <= sink.durable_position:
            self._reads_unheld += 1
        return position

    def _early_reply(self, commands: list[AnyCommand], results: list[AnyResult]) -> bytes | None:
        durable = self._sink.durable_position
        read_mark = self._read_mark
        indices: list[int] = []
        for index, (command, result) in enumerate(zip(commands, results, strict=True)):
            mark = read_mark(command, result)
            if mark is not None and mark <= durable:
                indices.append(index)
        if not indices:
            return None
        self._reads_answered_early += len(indices)
        return self._codec.encode_early(indices, [results[index] for index in indices])

    def _hand_off_events(self) -> None:
        events = self._core.drain_events()
        origins, refused = self._core.drain_audit()
        if events:
            self._events += len(events)
            sink = self._sink
            sink.publish(events, origins)
            # Every change of a slot ends its batch's events with a SlotChanged of it.
            position = sink.position
            marks = self._slot_marks
            for event in events:
                if type(event) is SlotChanged:
                    marks[event.slot.id] = position
            if len(marks) > self._slot_marks_prune_at:
                self._prune_marks()
        outcomes, keys = self._core.drain_remembered()
        if outcomes or keys:
            # A refused attempt's outcome is remembered: its audit row goes with it.
            self._sink.remember(outcomes, keys, refused)

    def _prune_marks(self) -> None:
        durable = self._sink.durable_position
        self._slot_marks = {
            slot_id: mark for slot_id, mark in self._slot_marks.items() if mark > durable
        }
        self._slot_marks_prune_at = max(limits.SLOT_MARKS_PRUNE_AT, 2 * len(self._slot_marks))

    def _rearm(self) -> None:
        loop = self._loop
        if loop is None or self._fatal is not None:
            return
        deadline_ms = self._core.next_deadline_ms()
        if deadline_ms is None:
            self.close()
            return
        if self._timer is not None:
            armed_ms = self._timer_deadline_ms
            # An earlier wake-up is harmless (advance finds nothing and re-arms), so only a
            # sooner deadline moves the timer.
            if armed_ms is not None and armed_ms <= deadline_ms:
                return
            self._timer.cancel()
        delay_s = max(0, deadline_ms - self._clock.now_ms()) / 1000
        self._timer = loop.call_at(loop.time() + delay_s, self._on_timer)
        self._timer_deadline_ms = deadline_ms

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline_ms = None
        if self._fatal is not None or self._frozen:
            return
        try:
            self._core.advance(self._clock.now_ms())
        except Exception as exc:
            self._stop(exc)
            return
        self._timer_firings += 1
        self._hand_off_events()
        self._rearm()

    def _stop(self, exc: BaseException) -> None:
        logger.critical("shard %d stops: the core raised %r", self._shard_id, exc, exc_info=exc)
        self._fatal = exc
        self.close()
        if self._on_fatal is not None:
            self._on_fatal(exc)

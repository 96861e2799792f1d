"""The write-behind writer of one shard: group commit to PostgreSQL.

The shard runtime hands its events over synchronously (``publish``,
``remember``) between state changes; a flusher task folds everything handed
over since the last flush into rows (``FlushRows``) and commits them in one
transaction, after advancing the shard's fence row with the owner's token.
While a flush commits, new events gather for the next one: the busier the
shard, the bigger each commit (group commit), with no timer in the way.

``wait_durable`` returns once everything published before the call (or up
to the position it names) is committed. In ``relaxed`` durability it returns
at once: replies leave before their commit, and a crash loses what the buffer
held (at most ``WRITER_PENDING_EVENTS_MAX`` events, in practice one flush
interval).

A failed flush is never retried by the writer: the shard's memory is ahead
of the database, so every waiting reply fails with ``StorageUnavailable`` and
``on_failed`` tells the owner to rebuild the shard from PostgreSQL. A flush
that takes longer than ``WRITER_FLUSH_TIMEOUT_MS`` counts as failed, though it
may still commit: what waited on it is in doubt, not refused. A flush
refused by the fence calls ``on_fenced``: another owner took over.

Its statistics say how far behind it is: ``flush_lag_ms``, the age of the
oldest change handed over and not yet committed (0 when everything is), which
grows without bound while a flush hangs and stays 0 on an idle shard; and
``last_flush_ago_ms``, the time since the last commit, which tells an idle
writer (nothing pending) from one that commits nothing (changes pending).

With ``tracing`` (the shell's, OpenTelemetry's), each flush runs in a span of
its own, linked to the spans of the traced batches whose changes it commits
(``trace_batch`` names them as they are applied); the database's spans are its
children. Without it, nothing here spends anything on tracing.
"""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

import asyncpg
import msgspec

from engine.core.protocol import AnyEvent, AttemptRefused, KeyRecord, Origin, OutcomeRecord
from persistence import limits
from persistence import timings as t
from persistence.rows import FlushRows
from persistence.store import Codecs, FenceRejected, write_flush

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class FlushTracing(Protocol):
    def flush_span(self, shard: int, links: list[Any], events: int) -> AbstractContextManager[Any]:
        """The span one flush runs in (current within it), linked to ``links``."""
        ...


class StorageUnavailable(Exception):
    """PostgreSQL did not take a flush: the changes waiting on it are not durable."""


class WriterStatistics(msgspec.Struct, frozen=True, kw_only=True):
    flushes: int
    events_written: int
    flush_events_max: int
    pending_events: int
    failed: bool
    fenced: bool
    commit_ns_total: int
    # The age of the oldest change handed over and not committed yet; 0 when none is.
    flush_lag_ms: int = 0
    # Since the last flush committed; None before the first.
    last_flush_ago_ms: int | None = None


class ShardWriter:
    def __init__(
        self,
        connection: asyncpg.Connection,
        *,
        shard: int,
        token: int,
        owner: str,
        generation: int = 0,
        relaxed: bool = False,
        on_failed: Callable[[BaseException], None] | None = None,
        on_fenced: Callable[[BaseException], None] | None = None,
        before_flush: Callable[[], Awaitable[None]] | None = None,
        fence_check: bool = True,
        group_commit: bool = True,
        flush_events_max: int = limits.WRITER_FLUSH_EVENTS_MAX,
        on_committed: Callable[[list[AnyEvent]], None] | None = None,
        outbox: bool = True,
        tracing: FlushTracing | None = None,
        timings: t.Timings | None = None,
    ) -> None:
        """``timings``: where each flush's duration, size and commit lag are observed,
        and the connection's use (in use while a flush or a job runs)."""
        self._connection = connection
        self._tracing = tracing
        # (position, span context) of the traced batches not committed yet, in order.
        self._traced: deque[tuple[int, Any]] = deque(maxlen=limits.WRITER_TRACED_BATCHES_MAX)
        timings = timings if timings is not None else t.Timings()
        self._timings = timings
        self._flush_timing = timings.database(t.DATABASE_FLUSH)
        self._outbox = outbox
        self._shard = shard
        self._token = token
        self._owner = owner
        # The generation of the partition set the owner loaded (see write_flush).
        self._generation = generation
        self._relaxed = relaxed
        self._on_failed = on_failed
        self._on_fenced = on_fenced
        # A pause before each flush, for tests that need a late flush (a paused zombie).
        self._before_flush = before_flush
        self._fence_check = fence_check
        self._codecs = Codecs()
        self._pending = FlushRows(shard)
        # Without group commit (the benches' baseline) every hand-off is a flush of its own.
        self._group_commit = group_commit
        self._events_per_flush_limit = flush_events_max
        # Told each flush's events once they are committed (the real-time fan-out).
        self._on_committed = on_committed
        # (rows, the position they reach, when their first change was handed over).
        self._handoffs: deque[tuple[FlushRows, int, int]] = deque()
        # Monotonic ns of the first hand-off to _pending, of the rows being flushed
        # (None: nothing there), and of the last commit.
        self._pending_since: int | None = None
        self._flushing_since: int | None = None
        self._committed_at: int | None = None
        # Events are numbered as they are published; everything up to _durable is committed.
        self._published = 0
        self._durable = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        # Work on the connection between flushes (``exclusive``): each runs once
        # everything handed over before it was asked for has committed.
        self._jobs: deque[
            tuple[int, Callable[[asyncpg.Connection], Awaitable[Any]], asyncio.Future[Any], int]
        ] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._fenced = False
        self._closed = False
        # The rows of the flush running now, and, once the writer failed, the events
        # handed over that are not known to be committed (``in_doubt``).
        self._flushing: FlushRows | None = None
        self._in_doubt: list[AnyEvent] = []
        self._flushes = 0
        self._events_written = 0
        self._flush_events_max = 0
        self._commit_ns_total = 0

    # -- the runtime's side (synchronous, on the shard's event loop) ------------

    def publish(self, events: list[AnyEvent], origins: dict[str, Origin] | None = None) -> None:
        if self._error is not None or self._closed:
            return  # the owner is rebuilding; these changes die with the old state
        pending = self._pending
        if not pending.empty() and (
            not self._group_commit or pending.events >= self._events_per_flush_limit
        ):
            # A flush of its own for what is pending: no group commit (the benches'
            # baseline), or the group is as big as one transaction may be.
            self._handoffs.append((pending, self._published, self._since_pending()))
            self._pending = FlushRows(self._shard)
            self._pending_since = None
        self._pending.add(events, origins)
        self._published += 1
        if self._pending_since is None:
            self._pending_since = time.monotonic_ns()
        self._wake.set()

    def remember(
        self,
        outcomes: list[OutcomeRecord],
        keys: list[KeyRecord],
        refused: list[AttemptRefused] | None = None,
    ) -> None:
        if self._error is not None or self._closed:
            return
        self._pending.remember(outcomes, keys, refused)
        self._published += 1
        if self._pending_since is None:
            self._pending_since = time.monotonic_ns()
        self._wake.set()

    def trace_batch(self, position: int, context: Any) -> None:
        """A traced batch's changes reach ``position``: the flush that commits them
        links to ``context``, the batch's span (tracing on)."""
        if self._tracing is not None:
            self._traced.append((position, context))

    def _since_pending(self) -> int:
        since = self._pending_since
        return time.monotonic_ns() if since is None else since

    @property
    def position(self) -> int:
        """Hand-offs so far (``publish`` and ``remember`` calls)."""
        return self._published

    @property
    def durable_position(self) -> int:
        """Every hand-off up to this one is committed."""
        return self._durable

    async def wait_durable(self, position: int | None = None) -> None:
        """Return once every hand-off up to ``position`` (default: all so far) is committed."""
        if self._error is not None:
            raise StorageUnavailable(str(self._error)) from self._error
        if self._relaxed:
            return
        target = self._published if position is None else position
        if target <= self._durable:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        await future

    async def exclusive(
        self,
        job: Callable[[asyncpg.Connection], Awaitable[_T]],
        timeout_ms: int = limits.WRITER_FLUSH_TIMEOUT_MS,
    ) -> _T:
        """Run ``job`` on the writer's connection once every hand-off made so far has
        committed, with no flush running meanwhile; its result, or its exception.

        Flushes of later hand-offs wait for it. A job that fails (or outlasts
        ``timeout_ms``) fails the writer as a failed flush does (``on_failed``;
        ``on_fenced`` for ``FenceRejected``): the connection's state is unknown,
        and so is whether the job's transaction committed.
        """
        if self._error is not None:
            raise StorageUnavailable(str(self._error)) from self._error
        if self._closed:
            raise StorageUnavailable("the shard's writer stopped")
        if not self._pending.empty():
            self._handoffs.append((self._pending, self._published, self._since_pending()))
            self._pending = FlushRows(self._shard)
            self._pending_since = None
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._jobs.append((self._published, job, future, timeout_ms))
        self._wake.set()
        return await future

    def set_generation(self, generation: int) -> None:
        """The generation later flushes carry (a job moved the shard's partitions)."""
        self._generation = generation

    @property
    def accepting(self) -> bool:
        """False once the buffer is too far behind, or after a failure: refuse new changes."""
        return (
            self._error is None
            and not self._closed
            and self._pending.events < limits.WRITER_PENDING_EVENTS_MAX
            and len(self._handoffs) < limits.WRITER_PENDING_EVENTS_MAX
        )

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def in_doubt(self) -> list[AnyEvent]:
        """After a failure: the events handed over and not known to be committed (the
        failed flush's, which may yet have committed, and every later one's)."""
        return self._in_doubt

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"writer-{self._shard}"
            )

    async def close(self, *, flush: bool = True, timeout_s: float = 10.0) -> None:
        """Stop the flusher: after a last flush of what is pending, unless ``flush`` is False."""
        if flush and self._error is None and self._task is not None:
            target = self._published
            if target > self._durable:
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append((target, future))
                try:
                    async with asyncio.timeout(timeout_s):
                        await future
                except (TimeoutError, StorageUnavailable):
                    pass
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._fail_waiters(StorageUnavailable("the shard's writer stopped"))

    def statistics(self) -> WriterStatistics:
        now = time.monotonic_ns()
        # In hand-off order: the rows being flushed, those queued, then _pending.
        oldest = self._flushing_since
        if oldest is None and self._handoffs:
            oldest = self._handoffs[0][2]
        if oldest is None:
            oldest = self._pending_since
        committed = self._committed_at
        return WriterStatistics(
            flushes=self._flushes,
            events_written=self._events_written,
            flush_events_max=self._flush_events_max,
            pending_events=self._pending.events + sum(r.events for r, _, _ in self._handoffs),
            failed=self._error is not None,
            fenced=self._fenced,
            commit_ns_total=self._commit_ns_total,
            flush_lag_ms=0 if oldest is None else (now - oldest) // 1_000_000,
            last_flush_ago_ms=None if committed is None else (now - committed) // 1_000_000,
        )

    # -- the flusher ----------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closed:
            if self._jobs and self._jobs[0][0] <= self._durable:
                if not await self._run_job(*self._jobs.popleft()):
                    return
                continue
            if self._handoffs:
                rows, upto, since = self._handoffs.popleft()
            elif self._pending.empty():
                self._wake.clear()
                await self._wake.wait()
                continue
            else:
                rows, self._pending = self._pending, FlushRows(self._shard)
                upto, since = self._published, self._since_pending()
                self._pending_since = None
            self._flushing_since = since
            self._flushing = rows
            try:
                if self._tracing is None:
                    await self._flush(rows)
                else:
                    await self._traced_flush(self._tracing, rows, upto)
            except FenceRejected as exc:
                self._fenced = True
                self._stop(exc, self._on_fenced)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.error("shard %d: flush failed: %r", self._shard, exc)
                self._stop(exc, self._on_failed)
                return
            self._flushing_since = None
            self._flushing = None
            self._committed_at = committed_at = time.monotonic_ns()
            timings = self._timings
            timings.commit_lag.observe(committed_at - since)
            timings.flush_events.observe(rows.events)
            timings.flush_rows.observe(rows.row_count())
            self._durable = upto
            if self._on_committed is not None and rows.raw:
                self._on_committed(rows.raw)
            self._flushes += 1
            self._events_written += rows.events
            self._flush_events_max = max(self._flush_events_max, rows.events)
            waiters = self._waiters
            while waiters and waiters[0][0] <= upto:
                future = waiters.popleft()[1]
                if not future.done():
                    future.set_result(None)

    async def _run_job(
        self,
        _after: int,
        job: Callable[[asyncpg.Connection], Awaitable[Any]],
        future: asyncio.Future[Any],
        timeout_ms: int,
    ) -> bool:
        """Run one job; False when it failed the writer."""
        self._timings.connections_in_use += 1
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                result = await job(self._connection)
        except asyncio.CancelledError:
            if not future.done():
                future.set_exception(StorageUnavailable("the shard's writer stopped"))
            raise
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
            if isinstance(exc, FenceRejected):
                self._fenced = True
                self._stop(exc, self._on_fenced)
            else:
                logger.error("shard %d: work between flushes failed: %r", self._shard, exc)
                self._stop(exc, self._on_failed)
            return False
        finally:
            self._timings.connections_in_use -= 1
        if not future.done():
            future.set_result(result)
        return True

    async def _traced_flush(self, tracing: FlushTracing, rows: FlushRows, upto: int) -> None:
        links = []
        traced = self._traced
        while traced and traced[0][0] <= upto:
            links.append(traced.popleft()[1])
        with tracing.flush_span(self._shard, links, rows.events):
            await self._flush(rows)

    async def _flush(self, rows: FlushRows) -> None:
        if self._before_flush is not None:
            await self._before_flush()
        timings = self._timings
        timings.connections_in_use += 1
        started_ns = time.perf_counter_ns()
        try:
            # One statement outside a transaction block: its own transaction, one round trip.
            async with asyncio.timeout(limits.WRITER_FLUSH_TIMEOUT_MS / 1000):
                await write_flush(
                    self._connection,
                    rows,
                    self._token,
                    self._owner,
                    self._codecs,
                    generation=self._generation,
                    fence_check=self._fence_check,
                    outbox=self._outbox,
                )
        finally:
            took_ns = time.perf_counter_ns() - started_ns
            timings.connections_in_use -= 1
            self._flush_timing.observe(took_ns)
        self._commit_ns_total += took_ns

    def _stop(self, exc: BaseException, callback: Callable[[BaseException], None] | None) -> None:
        self._error = exc
        in_doubt = [] if self._flushing is None else list(self._flushing.raw)
        for rows, _, _ in self._handoffs:
            in_doubt.extend(rows.raw)
        in_doubt.extend(self._pending.raw)
        self._in_doubt = in_doubt
        self._flushing = None
        self._pending = FlushRows(self._shard)
        self._handoffs.clear()
        self._traced.clear()
        self._pending_since = self._flushing_since = None
        self._fail_waiters(StorageUnavailable(str(exc)))
        if callback is not None:
            callback(exc)

    def _fail_waiters(self, error: StorageUnavailable) -> None:
        while self._jobs:
            future = self._jobs.popleft()[2]
            if not future.done():
                future.set_exception(error)
        while self._waiters:
            future = self._waiters.popleft()[1]
            if not future.done():
                future.set_exception(error)

"""Operations endpoints: ``GET /health`` and ``GET /metrics`` (docs/api.md, "Operations").

Wiring (after ``create_app``, before the app starts)::

    app = create_app(engine, verifier)
    add_observability(
        app, engine=engine, transport=transport, database_url=..., redis_url=...
    )

``engine`` and ``transport`` may be None when they are only known on startup:
they are then read from ``app[ENGINE_KEY]`` / ``app[TRANSPORT_KEY]`` at request
time. Service URLs resolved on startup are given later with
``app[OBSERVABILITY_KEY].configure(database_url=..., redis_url=...)``.

Metrics live in a registry of the application's own (``app[METRICS_KEY]``),
never in prometheus-client's global one, so several apps in one process
(tests, workers) do not collide. Every label takes a bounded set of values:

- ``booking_reservations_total{status,outcome}``: answers of
  ``POST /api/bookings/reserve``. ``status`` is ``created`` (201),
  ``existing`` (200 with the user's hold), ``queued`` (202),
  ``already_queued`` (200 with the user's queue entry), else the API error
  code (``SlotFull``, ``QueueFull``, ``RateLimited``, ...; at most
  ``ERROR_CODES_MAX`` distinct codes, then ``other``). ``outcome`` is
  ``success``, ``queued`` or ``failure``.
- ``booking_confirmations_total``: ``POST /api/bookings/{booking_id}/confirm``
  answered 200 with a ``confirmedAt`` no earlier than the request's arrival
  (less ``CONFIRM_CLOCK_SKEW_S`` for clocks of other hosts), once per booking:
  a repeated confirm of a CONFIRMED booking (200, unchanged) or an idempotent
  replay is not counted again. Repeats soon after the first are recognised by
  the booking ids counted in the last ``CONFIRMED_IDS_KEPT_S`` seconds, later
  ones by their old ``confirmedAt``; only a repeat sent within the margin to
  another gateway counts twice.
- ``booking_expirations_total{shard}``: holds the engine expired (its shards'
  ``expirations_total``); a shard's count restarts at 0 when its owner
  reloads, which Prometheus treats as a counter reset.
- ``queue_waiting{shard}``: WAITING entries per shard (exact).
- ``queue_length{slot_id}``: the ``QUEUE_TOP_N`` longest queues. Found by
  paging ``ListSlots`` through shards that have anyone waiting, at most once
  per ``QUEUE_SCAN_EVERY_S`` and at most ``QUEUE_SCAN_SLOTS_MAX`` slots per
  shard (in start-time order): exact below that many slots per shard, the
  soonest slots' queues above it. ``queue_waiting`` stays exact.
- ``average_wait_time_seconds``: the mean ``estimatedWaitSeconds`` of the
  WAITING queue entries this gateway answered (reserve, join, position) in the
  last ``WAIT_WINDOW_S`` seconds; 0 when it answered none.
- ``engine_shard_up{shard}``: 1 when the shard answered its last statistics.
- ``http_request_duration_seconds{endpoint,method,status}``: ``endpoint`` is
  the route's template (``/api/bookings/{booking_id}/confirm``), ``unmatched``
  for requests no route takes. WebSocket and event-stream answers are not
  observed (their duration is a connection's lifetime).
- ``redis_operation_duration_seconds{operation}`` and
  ``database_query_duration_seconds{query_type}``: fed through
  ``observe_redis(operation)`` / ``observe_database(query_type)``, whose
  labels must be constant strings.

The engine's series (expirations, queue sizes, shard up) are the engine's,
not this gateway's: every gateway of a deployment reports the same values, so
aggregate them with ``max by (shard)`` (or ``max by (slot_id)``), not ``sum``.
They are fetched before a scrape is rendered (awaited, never blocking the
loop) and reused for ``STATISTICS_MAX_AGE_S``; a shard that does not answer
keeps its last values and reads ``engine_shard_up 0``.

``/health`` runs its checks concurrently, each within ``CHECK_TIMEOUT_S``:

- ``database``: ``SELECT 1`` on one connection, opened on first use and kept.
- ``redis``: ``PING``.
- ``engine``: every shard answers ``statistics`` through the transport and,
  where the host reports its owners, every owner is SERVING.
- ``queue``: the engine's background work on every shard: its runtime has not
  failed, the timer that expires holds and offers places is armed for the next
  deadline, and (where owners are reported) the write-behind writer has not
  failed nor been fenced and is not so far behind that changes are refused.

200 ``healthy`` when all are up; 503 ``unhealthy`` when the database or the
engine is down (nothing can be booked), 503 ``degraded`` when only Redis or
the queue is down (reads go on; new changes may be refused). A 503 carries
``retryAfter`` and ``Retry-After``. A component whose URL is not configured
reads ``down``.
"""

import asyncio
import collections
import contextlib
import functools
import heapq
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Literal, ParamSpec, Protocol, TypeVar, cast

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from engine.core import limits
from engine.core import protocol as p
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.owner import OwnerStatistics
from engine.shell.runtime import RuntimeStatistics
from gateway import schemas as s
from gateway.app import (
    ANSWER,
    ENGINE_KEY,
    ERROR_CODE,
    OBSERVER_KEY,
    TRANSPORT_KEY,
    Observer,
    serving_app,
)

logger = logging.getLogger("slotengine.gateway.observability")

# Each health check, and each shard's statistics, answers within this or counts as down.
CHECK_TIMEOUT_S: Final = 1.0
HEALTH_RETRY_AFTER_S: Final = 5
# Engine statistics are reused for this long by /metrics and /health.
STATISTICS_MAX_AGE_S: Final = 1.0
QUEUE_TOP_N: Final = 20
QUEUE_SCAN_EVERY_S: Final = 15.0
QUEUE_SCAN_SLOTS_MAX: Final = 2_000
QUEUE_SCAN_TIMEOUT_S: Final = 2.0
WAIT_WINDOW_S: Final = 300.0
WAIT_SAMPLES_MAX: Final = 10_000
CONFIRM_CLOCK_SKEW_S: Final = 1.0
CONFIRMED_IDS_KEPT_S: Final = 120.0
CONFIRMED_IDS_MAX: Final = 100_000
ERROR_CODES_MAX: Final = 50
LABEL_CHARS_MAX: Final = 64

CRITICAL_COMPONENTS: Final = frozenset({"database", "engine"})

HTTP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
STORE_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

# The routes whose answers feed the business metrics (gateway.app's templates).
RESERVE_ROUTE: Final = ("POST", "/api/bookings/reserve")
CONFIRM_ROUTE: Final = ("POST", "/api/bookings/{booking_id}/confirm")
QUEUE_ROUTES: Final = frozenset(
    {
        RESERVE_ROUTE,
        ("POST", "/api/slots/{slot_id}/queue"),
        ("GET", "/api/slots/{slot_id}/queue/position"),
    }
)
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

P = ParamSpec("P")
R = TypeVar("R")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the metrics ------------------------------------------------------------------


class Metrics:
    """The gateway's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reservations = Counter(
            "booking_reservations",
            "Answers to reservation requests, by status (created, existing, queued, "
            "already_queued or the error code) and outcome (success, queued, failure).",
            ["status", "outcome"],
            registry=self.registry,
        )
        self.confirmations = Counter(
            "booking_confirmations",
            "Holds confirmed through this gateway (repeats of a confirmed booking excluded).",
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration by route template, method and status.",
            ["endpoint", "method", "status"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        # (endpoint, method, status) -> its series: ``labels`` takes a lock and
        # builds a key on every call, and every request observes one.
        self._http_series: dict[tuple[str, str, int], Any] = {}
        self.redis_seconds = Histogram(
            "redis_operation_duration_seconds",
            "Duration of Redis operations by operation.",
            ["operation"],
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.database_seconds = Histogram(
            "database_query_duration_seconds",
            "Duration of database queries by query type.",
            ["query_type"],
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.average_wait = Gauge(
            "average_wait_time_seconds",
            f"Mean estimatedWaitSeconds of the WAITING queue entries answered in the last "
            f"{WAIT_WINDOW_S:.0f} s (0 when none).",
            registry=self.registry,
        )
        self.average_wait.set_function(self._average_wait_s)
        self._waits: collections.deque[tuple[float, float]] = collections.deque()
        self._waits_sum = 0.0
        self._error_codes: set[str] = set()
        # Booking ids counted as confirmed, oldest first, with when.
        self._confirmed: dict[str, float] = {}

    # -- business events --------------------------------------------------------

    def reservation(self, status: str) -> None:
        """Count one reservation answer. ``status``: created, existing, queued,
        already_queued, or an API error code.

        The reserve route is counted by the middleware already: call this only
        for reservations made some other way.
        """
        label = self._status_label(status)
        if label in ("created", "existing"):
            outcome = "success"
        elif label in ("queued", "already_queued"):
            outcome = "queued"
        else:
            outcome = "failure"
        self.reservations.labels(label, outcome).inc()

    def confirmation(self, booking_id: str | None = None) -> bool:
        """Count one confirmation, once per ``booking_id`` seen in the last
        ``CONFIRMED_IDS_KEPT_S``; False if it was counted already.

        The confirm route is counted by the middleware already: call this only
        for confirmations made some other way.
        """
        if booking_id is not None:
            now = time.monotonic()
            counted = self._confirmed
            while counted:
                oldest_id, at = next(iter(counted.items()))
                if at >= now - CONFIRMED_IDS_KEPT_S and len(counted) < CONFIRMED_IDS_MAX:
                    break
                del counted[oldest_id]
            if booking_id in counted:
                return False
            counted[booking_id] = now
        self.confirmations.inc()
        return True

    def queue_wait(self, seconds: float, *, now: float | None = None) -> None:
        """One WAITING entry's estimated wait, for ``average_wait_time_seconds``."""
        at = time.monotonic() if now is None else now
        self._prune_waits(at)
        if len(self._waits) >= WAIT_SAMPLES_MAX:
            _, oldest = self._waits.popleft()
            self._waits_sum -= oldest
        self._waits.append((at, seconds))
        self._waits_sum += seconds

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "OTHER"
        key = (endpoint, method, status)
        series = self._http_series.get(key)
        if series is None:
            # Bounded: endpoints are route templates (or "unmatched"), methods a fixed set.
            series = self._http_series[key] = self.http_seconds.labels(
                endpoint, method, str(status)
            )
        series.observe(seconds)

    # -- timing of stores -------------------------------------------------------

    def observe_redis(self, operation: str) -> "Observation":
        return Observation("redis", operation, self)

    def observe_database(self, query_type: str) -> "Observation":
        return Observation("database", query_type, self)

    # -- helpers ----------------------------------------------------------------

    def _status_label(self, status: str) -> str:
        if status in ("created", "existing", "queued", "already_queued"):
            return status
        if not status.isidentifier() or len(status) > LABEL_CHARS_MAX:
            return "other"
        if status not in self._error_codes:
            if len(self._error_codes) >= ERROR_CODES_MAX:
                return "other"
            self._error_codes.add(status)
        return status

    def _prune_waits(self, now: float) -> None:
        horizon = now - WAIT_WINDOW_S
        while self._waits and self._waits[0][0] < horizon:
            _, seconds = self._waits.popleft()
            self._waits_sum -= seconds

    def _average_wait_s(self) -> float:
        self._prune_waits(time.monotonic())
        if not self._waits:
            self._waits_sum = 0.0
            return 0.0
        return max(0.0, self._waits_sum / len(self._waits))


class Observation:
    """Times a Redis operation or a database query into its histogram.

    Use as ``with``/``async with`` (one block at a time per object) or as a
    decorator of a function or coroutine function (safe for concurrent calls).
    The metrics are the ones given, else those of the application serving the
    current request; without either, nothing is recorded.
    """

    __slots__ = ("_kind", "_label", "_metrics", "_started")

    def __init__(
        self, kind: Literal["redis", "database"], label: str, metrics: Metrics | None = None
    ) -> None:
        if not label or len(label) > LABEL_CHARS_MAX:
            raise ValueError(f"a {kind} label is 1 to {LABEL_CHARS_MAX} characters")
        self._kind = kind
        self._label = label
        self._metrics = metrics
        self._started: float | None = None

    def _record(self, started: float) -> None:
        metrics = self._metrics
        if metrics is None:
            app = serving_app()
            metrics = None if app is None else app.get(METRICS_KEY)
        if metrics is None:
            return
        histogram = metrics.redis_seconds if self._kind == "redis" else metrics.database_seconds
        histogram.labels(self._label).observe(time.perf_counter() - started)

    def __enter__(self) -> "Observation":
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        started, self._started = self._started, None
        if started is not None:
            self._record(started)

    async def __aenter__(self) -> "Observation":
        return self.__enter__()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.__exit__(kind, error, trace)

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def timed_coroutine(*args: P.args, **kwargs: P.kwargs) -> Any:
                started = time.perf_counter()
                try:
                    return await cast(Awaitable[Any], function(*args, **kwargs))
                finally:
                    self._record(started)

            return cast(Callable[P, R], timed_coroutine)

        @functools.wraps(function)
        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._record(started)

        return timed


def observe_redis(operation: str, metrics: Metrics | None = None) -> Observation:
    """Time a Redis operation: ``async with observe_redis("evalsha"): ...``."""
    return Observation("redis", operation, metrics)


def observe_database(query_type: str, metrics: Metrics | None = None) -> Observation:
    """Time a database query: ``async with observe_database("select"): ...``."""
    return Observation("database", query_type, metrics)


# -- the engine's statistics --------------------------------------------------------


class _StatisticsSource(Protocol):
    @property
    def shard_count(self) -> int: ...

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics: ...


@dataclass(frozen=True, slots=True)
class ShardSample:
    """What one shard answered (``runtime`` None: it did not answer in time)."""

    shard: int
    runtime: RuntimeStatistics | None
    # None when the host does not report its owners (or the call failed: see owner_failed).
    owner: OwnerStatistics | None
    owner_failed: bool

    @property
    def serving(self) -> bool:
        if self.runtime is None:
            return False
        return self.owner is None or self.owner.state == "serving"

    @property
    def background_ok(self) -> bool:
        runtime = self.runtime
        if runtime is None or not self.serving or runtime.failed or self.owner_failed:
            return False
        deadline_ms = runtime.core.next_deadline_ms
        armed_ms = runtime.timer_deadline_ms
        if deadline_ms is not None and (armed_ms is None or armed_ms > deadline_ms):
            return False
        if self.owner is None:
            return True
        writer = self.owner.writer
        return (
            writer is not None
            and not writer.failed
            and not writer.fenced
            and writer.pending_events < limits.WRITER_PENDING_EVENTS_MAX
        )


@dataclass(frozen=True, slots=True)
class EngineSample:
    at: float
    shards: tuple[ShardSample, ...]

    @property
    def engine_up(self) -> bool:
        return bool(self.shards) and all(shard.serving for shard in self.shards)

    @property
    def queue_up(self) -> bool:
        return bool(self.shards) and all(shard.background_ok for shard in self.shards)


async def _owner_statistics(transport: Any, shard: int) -> OwnerStatistics | None:
    fetch = getattr(transport, "owner_statistics", None)
    if callable(fetch):
        return cast(OwnerStatistics | None, await fetch(shard, int(CHECK_TIMEOUT_S * 1000)))
    owner = getattr(transport, "owner", None)
    if callable(owner):
        statistics = owner(shard).statistics()
        return statistics if isinstance(statistics, OwnerStatistics) else None
    return None


async def _sample_shard(transport: _StatisticsSource, shard: int) -> ShardSample:
    runtime: RuntimeStatistics | None = None
    owner: OwnerStatistics | None = None
    owner_failed = False
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            runtime_answer, owner_answer = await asyncio.gather(
                transport.statistics(shard, int(CHECK_TIMEOUT_S * 1000)),
                _owner_statistics(transport, shard),
                return_exceptions=True,
            )
    except TimeoutError:
        logger.debug("shard %d: no statistics within %.1f s", shard, CHECK_TIMEOUT_S)
        return ShardSample(shard=shard, runtime=None, owner=None, owner_failed=True)
    if isinstance(runtime_answer, RuntimeStatistics):
        runtime = runtime_answer
    elif isinstance(runtime_answer, BaseException):
        logger.debug("shard %d: statistics failed: %r", shard, runtime_answer)
    if isinstance(owner_answer, BaseException):
        owner_failed = True
        logger.debug("shard %d: owner statistics failed: %r", shard, owner_answer)
    else:
        owner = owner_answer
    return ShardSample(shard=shard, runtime=runtime, owner=owner, owner_failed=owner_failed)


class EngineSampler:
    """The engine's statistics, fetched on demand and reused for a short while.

    Concurrent callers share one fetch. It is also the collector of the
    engine's series: ``collect`` renders the last values and never waits.
    """

    def __init__(
        self,
        engine: Callable[[], EngineClient | None],
        transport: Callable[[], Any],
    ) -> None:
        self._engine = engine
        self._transport = transport
        self._ids = RequestIds()
        self._sample: EngineSample | None = None
        self._fetching: asyncio.Task[EngineSample] | None = None
        self._expirations: dict[int, int] = {}
        self._waiting: dict[int, int] = {}
        self._queues: dict[int, list[tuple[int, str]]] = {}
        self._queues_at: float | None = None
        self._scanning: asyncio.Task[None] | None = None

    async def sample(self, max_age_s: float = STATISTICS_MAX_AGE_S) -> EngineSample:
        loop = asyncio.get_running_loop()
        current = self._sample
        if current is not None and loop.time() - current.at < max_age_s:
            return current
        if self._fetching is None or self._fetching.done():
            self._fetching = loop.create_task(self._fetch(), name="engine-statistics")
        return await asyncio.shield(self._fetching)

    async def refresh_for_scrape(self) -> None:
        """Statistics no older than ``STATISTICS_MAX_AGE_S``, and the longest queues."""
        sample = await self.sample()
        loop = asyncio.get_running_loop()
        if self._queues_at is not None and loop.time() - self._queues_at < QUEUE_SCAN_EVERY_S:
            return
        if self._scanning is None or self._scanning.done():
            self._scanning = loop.create_task(self._scan_queues(sample), name="queue-scan")
        await asyncio.shield(self._scanning)

    async def close(self) -> None:
        for task in (self._fetching, self._scanning):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _fetch(self) -> EngineSample:
        loop = asyncio.get_running_loop()
        transport = cast(_StatisticsSource | None, self._transport())
        if transport is None:
            sample = EngineSample(at=loop.time(), shards=())
        else:
            shards = await asyncio.gather(
                *(_sample_shard(transport, shard) for shard in range(transport.shard_count))
            )
            sample = EngineSample(at=loop.time(), shards=tuple(shards))
        for shard in sample.shards:
            if shard.runtime is not None:
                self._expirations[shard.shard] = shard.runtime.core.expirations_total
                self._waiting[shard.shard] = shard.runtime.core.waiting
        self._sample = sample
        return sample

    async def _scan_queues(self, sample: EngineSample) -> None:
        engine = self._engine()
        loop = asyncio.get_running_loop()
        if engine is None:
            return
        busy = [
            sampled.shard
            for sampled in sample.shards
            if sampled.runtime is not None and sampled.runtime.core.waiting > 0
        ]
        for sampled in sample.shards:
            if sampled.runtime is not None and sampled.runtime.core.waiting == 0:
                self._queues[sampled.shard] = []
        answers = await asyncio.gather(
            *(self._scan_shard(engine, shard) for shard in busy), return_exceptions=True
        )
        for shard, answer in zip(busy, answers, strict=True):
            if isinstance(answer, BaseException):
                logger.debug("shard %d: queue scan failed: %r", shard, answer)
            else:
                self._queues[shard] = answer
        self._queues_at = loop.time()

    async def _scan_shard(self, engine: EngineClient, shard: int) -> list[tuple[int, str]]:
        found: list[tuple[int, str]] = []
        after: tuple[int, str] | None = None
        scanned = 0
        async with asyncio.timeout(QUEUE_SCAN_TIMEOUT_S):
            while scanned < QUEUE_SCAN_SLOTS_MAX:
                page = await engine.execute(
                    p.ListSlots(
                        request_id=self._ids.next(), limit=limits.LIST_LIMIT_MAX, after=after
                    ),
                    shard=shard,
                )
                if not isinstance(page, p.SlotPage):
                    raise RuntimeError(f"ListSlots answered {page!r}")
                found.extend((v.queue_length, v.id) for v in page.items if v.queue_length > 0)
                scanned += len(page.items)
                if len(page.items) < limits.LIST_LIMIT_MAX:
                    break
                last = page.items[-1]
                after = (last.start_ms, last.id)
        return heapq.nlargest(QUEUE_TOP_N, found)

    # -- the collector ----------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        expirations = CounterMetricFamily(
            "booking_expirations",
            "Holds the engine expired (per shard; restarts when a shard's owner reloads).",
            labels=["shard"],
        )
        for shard, total in sorted(self._expirations.items()):
            expirations.add_metric([str(shard)], total)
        yield expirations
        waiting = GaugeMetricFamily(
            "queue_waiting", "WAITING queue entries per shard.", labels=["shard"]
        )
        for shard, count in sorted(self._waiting.items()):
            waiting.add_metric([str(shard)], count)
        yield waiting
        lengths = GaugeMetricFamily(
            "queue_length",
            f"WAITING entries of the {QUEUE_TOP_N} longest queues (see queue_waiting for all).",
            labels=["slot_id"],
        )
        longest = heapq.nlargest(
            QUEUE_TOP_N, (entry for entries in self._queues.values() for entry in entries)
        )
        for length, slot_id in longest:
            lengths.add_metric([slot_id], length)
        yield lengths
        up = GaugeMetricFamily(
            "engine_shard_up", "1 when the shard answered its last statistics.", labels=["shard"]
        )
        if self._sample is not None:
            for sampled in self._sample.shards:
                up.add_metric([str(sampled.shard)], 1 if sampled.runtime is not None else 0)
        yield up


# -- the stores' probes ---------------------------------------------------------------


class _DatabaseProbe:
    """``SELECT 1`` on one connection, opened on first use and kept."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.url: str | None = None
        self._connection: Any = None
        self._lock = asyncio.Lock()

    def use(self, url: str | None) -> None:
        if url != self.url:
            self.url = url
            self._discard()

    async def check(self) -> bool:
        url = self.url
        if url is None:
            return False
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S), self._lock:
                try:
                    connection = self._connection
                    if connection is None or connection.is_closed():
                        self._connection = None
                        connection = await asyncpg.connect(url, timeout=CHECK_TIMEOUT_S)
                        self._connection = connection
                    with self._metrics.observe_database("health_check"):
                        value = await connection.fetchval("SELECT 1")
                except BaseException:
                    # Mid-query or broken: the next check starts on a new connection.
                    self._discard()
                    raise
        except Exception as exc:
            logger.debug("database check failed: %r", exc)
            return False
        return bool(value == 1)

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.terminate()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), CHECK_TIMEOUT_S)


class _RedisProbe:
    """``PING`` through a client created on first use and kept."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.url: str | None = None
        self._client: aioredis.Redis | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def use(self, url: str | None) -> None:
        if url == self.url:
            return
        self.url = url
        client, self._client = self._client, None
        if client is not None:
            # Closing needs the loop; outside it the client is simply dropped.
            with contextlib.suppress(RuntimeError):
                task = asyncio.get_running_loop().create_task(client.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def check(self) -> bool:
        if self.url is None:
            return False
        try:
            if self._client is None:
                self._client = aioredis.Redis.from_url(
                    self.url,
                    socket_timeout=CHECK_TIMEOUT_S,
                    socket_connect_timeout=CHECK_TIMEOUT_S,
                )
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                with self._metrics.observe_redis("ping"):
                    answer = await self._client.ping()
        except Exception as exc:
            logger.debug("redis check failed: %r", exc)
            return False
        return bool(answer)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()


# -- the application's part -------------------------------------------------------------


class Observability:
    """Health checks and metrics of one application (``app[OBSERVABILITY_KEY]``)."""

    def __init__(
        self,
        metrics: Metrics,
        sampler: EngineSampler,
        *,
        database_url: str | None,
        redis_url: str | None,
    ) -> None:
        self.metrics = metrics
        self.sampler = sampler
        self._database = _DatabaseProbe(metrics)
        self._redis = _RedisProbe(metrics)
        self._last: dict[str, str] | None = None
        self.configure(database_url=database_url, redis_url=redis_url)

    def configure(self, *, database_url: str | None, redis_url: str | None) -> None:
        """The services to check (when they are only known on startup)."""
        self._database.use(database_url)
        self._redis.use(redis_url)

    async def components(self) -> dict[str, str]:
        database, redis_up, sample = await asyncio.gather(
            self._database.check(), self._redis.check(), self.sampler.sample()
        )
        verdicts = {
            "database": database,
            "redis": redis_up,
            "engine": sample.engine_up,
            "queue": sample.queue_up,
        }
        components = {name: "up" if up else "down" for name, up in verdicts.items()}
        if components != self._last:
            down = sorted(name for name, state in components.items() if state == "down")
            if down:
                logger.warning("health: %s down", ", ".join(down))
            elif self._last is not None:
                logger.info("health: every component is up again")
            self._last = components
        return components

    async def close(self) -> None:
        await self.sampler.close()
        await self._database.close()
        await self._redis.close()


METRICS_KEY: Final = web.AppKey("metrics", Metrics)
OBSERVABILITY_KEY: Final = web.AppKey("observability", Observability)


def _endpoint(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return "unmatched" if resource is None else resource.canonical


def _count_business(
    metrics: Metrics, route: tuple[str, str], status: int, response: web.Response, started: float
) -> None:
    """The business metrics a reserve, confirm or queue answer carries."""
    answer = response.get(ANSWER)
    if route == RESERVE_ROUTE:
        if status == 201:
            metrics.reservation("created")
        elif status == 202:
            metrics.reservation("queued")
        elif status == 200:
            metrics.reservation(
                "already_queued" if isinstance(answer, s.QueueEnvelope) else "existing"
            )
        else:
            metrics.reservation(response.get(ERROR_CODE) or "other")
    if (
        route == CONFIRM_ROUTE
        and status == 200
        and isinstance(answer, s.BookingOut)
        and answer.confirmed_at is not None
    ):
        arrived_s = time.time() - (time.perf_counter() - started)
        confirmed_s = datetime.fromisoformat(answer.confirmed_at).timestamp()
        if confirmed_s >= arrived_s - CONFIRM_CLOCK_SKEW_S:
            metrics.confirmation(answer.id)
    if route in QUEUE_ROUTES and status in (200, 201, 202):
        entry = answer.queue if isinstance(answer, s.QueueEnvelope) else answer
        if (
            isinstance(entry, s.QueueEntryOut)
            and entry.status == "WAITING"
            and entry.estimated_wait_seconds is not None
        ):
            metrics.queue_wait(float(entry.estimated_wait_seconds))


def metrics_observer(metrics: Metrics) -> Observer:
    """Times every answer and counts reservations, confirmations and queue waits.

    ``request_context`` tells it of every answer with its final status,
    refusals included (``app[OBSERVER_KEY]``).
    """

    def observe(
        request: web.Request, status: int, response: web.StreamResponse | None, started: float
    ) -> None:
        endpoint = _endpoint(request)
        metrics.request(endpoint, request.method, status, time.perf_counter() - started)
        route = (request.method, endpoint)
        if (route == CONFIRM_ROUTE or route in QUEUE_ROUTES) and isinstance(response, web.Response):
            _count_business(metrics, route, status, response, started)

    return observe


# -- the handlers ----------------------------------------------------------------------


async def health_handler(request: web.Request) -> web.StreamResponse:
    components = await request.app[OBSERVABILITY_KEY].components()
    down = sorted(name for name, state in components.items() if state == "down")
    if not down:
        return web.json_response({"status": "healthy", "components": components})
    status = "unhealthy" if CRITICAL_COMPONENTS.intersection(down) else "degraded"
    response = web.json_response(
        {
            "status": status,
            "components": components,
            "error": "ServiceUnavailable",
            "message": f"{', '.join(down)} down",
            "details": {},
            "retryAfter": HEALTH_RETRY_AFTER_S,
        },
        status=503,
    )
    response.headers["Retry-After"] = str(HEALTH_RETRY_AFTER_S)
    return response


async def metrics_handler(request: web.Request) -> web.StreamResponse:
    observability = request.app[OBSERVABILITY_KEY]
    try:
        await observability.sampler.refresh_for_scrape()
    except Exception as exc:
        # The gateway's own series are still worth rendering; the engine's keep their last values.
        logger.warning("engine statistics for a scrape failed: %r", exc)
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = web.Response(body=encode(observability.metrics.registry))
    response.headers["Content-Type"] = content_type
    return response


def add_observability(
    app: web.Application,
    *,
    engine: EngineClient | None,
    transport: Any,
    database_url: str | None,
    redis_url: str | None,
) -> None:
    """Register ``GET /health``, ``GET /metrics`` and the timing middleware on ``app``.

    Call it after ``create_app`` and before the app starts. ``engine`` /
    ``transport`` None: read from ``app[ENGINE_KEY]`` / ``app[TRANSPORT_KEY]``
    when needed.
    """

    def current_engine() -> EngineClient | None:
        return engine if engine is not None else app.get(ENGINE_KEY)

    def current_transport() -> Any:
        if transport is not None:
            return transport
        return app.get(TRANSPORT_KEY)

    registry_metrics = Metrics()
    sampler = EngineSampler(current_engine, current_transport)
    registry_metrics.registry.register(sampler)
    observability = Observability(
        registry_metrics, sampler, database_url=database_url, redis_url=redis_url
    )
    app[METRICS_KEY] = registry_metrics
    app[OBSERVABILITY_KEY] = observability
    app[OBSERVER_KEY] = metrics_observer(registry_metrics)
    app.router.add_get("/health", health_handler, allow_head=False)
    app.router.add_get("/metrics", metrics_handler, allow_head=False)

    async def close(_: web.Application) -> None:
        await observability.close()

    app.on_cleanup.append(close)

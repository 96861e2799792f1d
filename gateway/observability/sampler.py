"""The engine's statistics, as ``/health`` and ``/metrics`` read them.

It owns ``EngineSampler`` (each shard's runtime and owner statistics, fetched
on demand and shared by concurrent callers, reused for
``STATISTICS_MAX_AGE_S``; the longest queues, scanned at most every
``QUEUE_SCAN_EVERY_S``) and the engine's series it renders as a collector:
per shard actor (label ``shard``, one value per actor, never per slot) its
owner's state, lease, fence token, rebuilds, commands in flight, how late
its timers are (holds kept past their TTL) and its writer's backlog and flush
lag, the durations of its Redis and database work, its flushes' sizes and
commit lag, its database connections' use; per shard, its queues' waiting
entries and offers; per slot, for the longest queues only, their length and
maximum size. The durations of this gateway's own Redis and database work
(``own_timings``) go in the same families, without ``shard``. It only reads the engine
(statistics and ``ListSlots``), never changes it, adds nothing to the request
path, and ``collect`` never waits.
"""

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from engine.core import limits
from engine.core import protocol as p
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.owner import OwnerStatistics
from engine.shell.owner_states import OwnerState
from engine.shell.runtime import RuntimeStatistics
from persistence import limits as storage_limits
from persistence import timings as t

logger = logging.getLogger("slotengine.gateway.observability")

# Each health check, and each shard's statistics, answers within this or counts as down.
CHECK_TIMEOUT_S: Final = 1.0
# Engine statistics are reused for this long by /metrics and /health.
STATISTICS_MAX_AGE_S: Final = 1.0
QUEUE_TOP_N: Final = 20
QUEUE_SCAN_EVERY_S: Final = 15.0
QUEUE_SCAN_SLOTS_MAX: Final = 2_000
QUEUE_SCAN_TIMEOUT_S: Final = 2.0
# The values of engine_shard_owner_state's ``state`` label: a fixed set.
OWNER_STATES: Final = tuple(state.value for state in OwnerState)


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
    def state(self) -> str:
        """The owner's state; ``in-memory`` for a shard without storage that
        answered, ``unknown`` for one that did not say."""
        if self.owner is not None:
            return self.owner.state
        if self.runtime is not None and not self.owner_failed:
            return "in-memory"
        return "unknown"

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
            and writer.pending_events < storage_limits.WRITER_PENDING_EVENTS_MAX
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
        *,
        queue_sizes: Mapping[str, int] | None = None,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        own_timings: Callable[[], t.TimingsSnapshot | None] | None = None,
    ) -> None:
        """``queue_sizes``: each domain's maximum queue size (``queue_max_size``
        is shown for the longest queues of the domains it names). ``wall_ms``:
        the wall clock the shards' timer deadlines are read against.
        ``own_timings``: this process's own Redis and database timings, rendered
        in the same families as the shards' (without ``shard``)."""
        self._own_timings = own_timings
        self._engine = engine
        self._transport = transport
        self._queue_sizes = dict(queue_sizes or {})
        self._wall_ms = wall_ms
        self._ids = RequestIds()
        self._sample: EngineSample | None = None
        self._fetching: asyncio.Task[EngineSample] | None = None
        self._expirations: dict[int, int] = {}
        self._waiting: dict[int, int] = {}
        self._overdue_ms: dict[int, int] = {}
        self._offers: dict[int, int] = {}
        # Per shard, its longest queues: (length, slot id, domain).
        self._queues: dict[int, list[tuple[int, str, str]]] = {}
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
        now_ms = self._wall_ms()
        for shard in sample.shards:
            if shard.runtime is not None:
                core = shard.runtime.core
                self._expirations[shard.shard] = core.expirations_total
                self._waiting[shard.shard] = core.waiting
                self._offers[shard.shard] = core.offers_total
                # The earliest deadline of a hold, claim or queue entry, passed and not
                # acted on yet (0: none passed).
                deadline_ms = core.next_deadline_ms
                self._overdue_ms[shard.shard] = (
                    0 if deadline_ms is None else max(0, now_ms - deadline_ms)
                )
            else:
                # Not known now (engine_shard_up reads 0): no stale value.
                self._overdue_ms.pop(shard.shard, None)
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

    async def _scan_shard(self, engine: EngineClient, shard: int) -> list[tuple[int, str, str]]:
        found: list[tuple[int, str, str]] = []
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
                found.extend(
                    (v.queue_length, v.id, v.domain) for v in page.items if v.queue_length > 0
                )
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
        offers = CounterMetricFamily(
            "queue_offers",
            "Seats offered to the head of a queue (per shard; restarts when a shard's owner "
            "reloads).",
            labels=["shard"],
        )
        for shard, total in sorted(self._offers.items()):
            offers.add_metric([str(shard)], total)
        yield offers
        lengths = GaugeMetricFamily(
            "queue_length",
            f"WAITING entries of the {QUEUE_TOP_N} longest queues (see queue_waiting for all).",
            labels=["slot_id"],
        )
        sizes = GaugeMetricFamily(
            "queue_max_size",
            "The maximum queue size of the slots queue_length shows (their domain's).",
            labels=["slot_id"],
        )
        longest = heapq.nlargest(
            QUEUE_TOP_N, (entry for entries in self._queues.values() for entry in entries)
        )
        for length, slot_id, domain in longest:
            lengths.add_metric([slot_id], length)
            size = self._queue_sizes.get(domain)
            if size is not None:
                sizes.add_metric([slot_id], size)
        yield lengths
        yield sizes
        overdue = GaugeMetricFamily(
            "engine_shard_timers_overdue_seconds",
            "How long ago the shard's earliest hold, claim or queue deadline passed without "
            "being acted on (0: none passed): a hold kept past its TTL shows here.",
            labels=["shard"],
        )
        for shard, late_ms in sorted(self._overdue_ms.items()):
            overdue.add_metric([str(shard)], late_ms / 1000)
        yield overdue
        up = GaugeMetricFamily(
            "engine_shard_up", "1 when the shard answered its last statistics.", labels=["shard"]
        )
        if self._sample is not None:
            for sampled in self._sample.shards:
                up.add_metric([str(sampled.shard)], 1 if sampled.runtime is not None else 0)
        yield up
        yield from self._actor_families()
        yield from self._timing_families()

    def _actor_families(self) -> Iterator[Metric]:
        """What each shard actor said of itself at the last sample; a shard that did
        not answer is left out (``engine_shard_up`` reads 0)."""
        shards = self._sample.shards if self._sample is not None else ()
        in_flight = GaugeMetricFamily(
            "engine_shard_in_flight_commands",
            "Commands the shard applied whose replies wait for their commit.",
            labels=["shard"],
        )
        states = GaugeMetricFamily(
            "engine_shard_owner_state",
            f"1 for the shard owner's state ({', '.join(OWNER_STATES)}), 0 for the others.",
            labels=["shard", "state"],
        )
        lease = GaugeMetricFamily(
            "engine_shard_lease_valid_seconds",
            "How much longer the owner may take changes on its lease, by its own clock "
            "(0: it refuses changes until Redis answers).",
            labels=["shard"],
        )
        token = GaugeMetricFamily(
            "engine_shard_fence_token", "The fencing token the owner writes with.", labels=["shard"]
        )
        rebuilds = CounterMetricFamily(
            "engine_shard_rebuilds",
            "Reloads of the shard from PostgreSQL by its current owner (failed flush, lapsed "
            "lease).",
            labels=["shard"],
        )
        pending = GaugeMetricFamily(
            "engine_shard_pending_events",
            "Events handed to the shard's writer and not committed yet.",
            labels=["shard"],
        )
        lag = GaugeMetricFamily(
            "engine_shard_flush_lag_seconds",
            "Age of the shard's oldest change not committed to PostgreSQL yet (0: none).",
            labels=["shard"],
        )
        last_flush = GaugeMetricFamily(
            "engine_shard_last_flush_age_seconds",
            "Time since the shard's writer last committed a flush.",
            labels=["shard"],
        )
        partitions = GaugeMetricFamily(
            "engine_shard_partitions",
            "Partitions the shard's owner loaded and serves.",
            labels=["shard"],
        )
        for sampled in shards:
            label = str(sampled.shard)
            if sampled.runtime is not None:
                in_flight.add_metric([label], sampled.runtime.in_flight_commands)
            owner = sampled.owner
            if owner is None:
                continue
            for state in OWNER_STATES:
                states.add_metric([label, state], 1 if owner.state == state else 0)
            lease.add_metric([label], owner.lease_valid_for_ms / 1000)
            if owner.token is not None:
                token.add_metric([label], owner.token)
            rebuilds.add_metric([label], owner.rebuilds)
            if owner.partitions is not None:
                partitions.add_metric([label], owner.partitions)
            writer = owner.writer
            if writer is None:
                continue
            pending.add_metric([label], writer.pending_events)
            lag.add_metric([label], writer.flush_lag_ms / 1000)
            if writer.last_flush_ago_ms is not None:
                last_flush.add_metric([label], writer.last_flush_ago_ms / 1000)
        yield from (in_flight, states, lease, token, rebuilds, partitions, pending, lag, last_flush)

    def _timing_families(self) -> Iterator[Metric]:
        """The durations of Redis operations and database statements (this process's
        own without ``shard``, each shard actor's with it), and per shard actor its
        flushes' sizes and commit lag and its database connections' use. Every
        label value is a constant of the code or a shard number."""
        redis, database = t.duration_families()
        flush_events = HistogramMetricFamily(
            "engine_shard_flush_events",
            "Events per flush (one transaction) of the shard's writer.",
            labels=["shard"],
        )
        flush_rows = HistogramMetricFamily(
            "engine_shard_flush_rows",
            "Rows per flush of the shard's writer (slots, bookings, queue entries, audit "
            "rows, idempotency records, request outcomes).",
            labels=["shard"],
        )
        commit_lag = HistogramMetricFamily(
            "engine_shard_commit_lag_seconds",
            "From the first change of a flush handed to the shard's writer to its commit.",
            labels=["shard"],
        )
        connections = GaugeMetricFamily(
            "engine_shard_db_connections",
            "The shard owner's PostgreSQL connections by state: in_use (a flush, a load, "
            "a partition move, a maintenance round), idle, max.",
            labels=["shard", "state"],
        )
        own = self._own_timings() if self._own_timings is not None else None
        if own is not None:
            t.add_durations(redis, database, own)
        shards = self._sample.shards if self._sample is not None else ()
        for sampled in shards:
            timings = sampled.owner.timings if sampled.owner is not None else None
            if timings is None:
                continue
            label = str(sampled.shard)
            t.add_durations(redis, database, timings, label)
            t.add_histogram(
                flush_events, {"shard": label}, timings.flush_events, t.FLUSH_SIZE_BOUNDS
            )
            t.add_histogram(flush_rows, {"shard": label}, timings.flush_rows, t.FLUSH_SIZE_BOUNDS)
            t.add_histogram(commit_lag, {"shard": label}, timings.commit_lag, t.COMMIT_LAG_BOUNDS_S)
            in_use = min(timings.connections_in_use, timings.connections_max)
            connections.add_metric([label, "in_use"], in_use)
            connections.add_metric([label, "idle"], timings.connections_max - in_use)
            connections.add_metric([label, "max"], timings.connections_max)
        yield from (redis, database, flush_events, flush_rows, commit_lag, connections)

"""The durations of the engine's Redis and database work, and the size and lag of its
flushes, as fixed-bucket histograms cheap enough for the hot path.

It owns ``Timings`` (one per owner of that work: a shard owner, a gateway
application), its ``Histogram`` (a plain list of bucket counts and a sum,
updated with ``bisect``: no lock, no label lookup per observation; a caller
takes its histogram once, by a constant label, and keeps it), the labels the
engine uses (``REDIS_*``, ``DATABASE_*``) and ``TimingsSnapshot``, the
cumulative counts that travel with a shard's statistics to the gateways, which
render them (``gateway/observability/sampler.py``), and how a histogram renders
as Prometheus samples (``add_histogram``; ``TimingsCollector`` for a process
that renders only its own, ``slotengine notify``).

Durations are observed in integer nanoseconds of ``time.perf_counter_ns`` and
rendered in seconds. Where the engine batches (a flush, a publish, a lease
renewal, a batch of rate-limit checks), the batch is timed, not each request.
The bounds are fixed here: both sides of a snapshot run the same release.

It must never read a clock itself in ``observe`` (the caller measures), never
take a lock, and never accept an unbounded label: a label is a constant of
the code, and a ``Timings`` refuses more than ``LABELS_MAX`` of a kind.
"""

import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Final

import msgspec
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.samples import Sample

# Upper bounds (le) of the duration buckets, in seconds: a Redis call answers
# in a millisecond, a flush in milliseconds to tens, a shard's load in seconds.
DURATION_BOUNDS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Upper bounds of a flush's events and rows: 1 on an idle shard, hundreds on a busy
# one, WRITER_FLUSH_EVENTS_MAX (5,000) at most for events.
FLUSH_SIZE_BOUNDS: Final = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000)
# Upper bounds of the commit lag (first change of a flush handed over -> its
# commit), in seconds.
COMMIT_LAG_BOUNDS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

_DURATION_BOUNDS_NS: Final = tuple(round(b * 1e9) for b in DURATION_BOUNDS_S)
_COMMIT_LAG_BOUNDS_NS: Final = tuple(round(b * 1e9) for b in COMMIT_LAG_BOUNDS_S)

# Distinct labels of one kind (Redis, database) a Timings takes.
LABELS_MAX: Final = 32

# -- the labels (``operation`` of redis_operation_duration_seconds) -------------------
# A shard owner's lease: SET NX with the next fencing token, its renewal, a new
# token for a reload, its release, and reading who holds it.
REDIS_LEASE_ACQUIRE: Final = "lease_acquire"
REDIS_LEASE_RENEW: Final = "lease_renew"
REDIS_LEASE_ADVANCE: Final = "lease_advance"
REDIS_LEASE_RELEASE: Final = "lease_release"
REDIS_LEASE_HOLDER: Final = "lease_holder"
# One flush's committed events to the shard's channel (PUBLISH).
REDIS_PUBLISH: Final = "publish"
# A gateway's: one script call deciding a batch of rate-limit checks; an
# Idempotency-Key's claim and release; a live connection's place taken, given
# back, and the places' renewal.
REDIS_RATE_LIMIT: Final = "rate_limit_check"
REDIS_IDEMPOTENCY_CLAIM: Final = "idempotency_claim"
REDIS_IDEMPOTENCY_RELEASE: Final = "idempotency_release"
REDIS_CONNECTION_TAKE: Final = "connection_place_take"
REDIS_CONNECTION_GIVE_BACK: Final = "connection_place_give_back"
REDIS_CONNECTION_RENEW: Final = "connection_place_renew"
# A gateway's /health.
REDIS_PING: Final = "ping"

# -- the labels (``query_type`` of database_query_duration_seconds) ------------------
# A shard owner's: one flush (write_shard_flush and the outbox, one statement);
# the fence row's token read before taking the lease; taking the shard over
# (fence + load, one transaction); the two sides of a live partition move.
DATABASE_FLUSH: Final = "flush"
DATABASE_FENCE_READ: Final = "fence_read"
DATABASE_SHARD_LOAD: Final = "shard_load"
DATABASE_HAND_OVER: Final = "partition_hand_over"
DATABASE_TAKE_PARTITIONS: Final = "partition_take"
# The owner of shard 0's periodic maintenance: the reconciliation checks and
# the retention purge.
DATABASE_RECONCILE: Final = "reconcile"
DATABASE_RETENTION_PURGE: Final = "retention_purge"
# A delivery worker's (engine/notify/worker.py): taking outbox batches to fan out
# (locked), writing their deliveries and marking them dispatched, claiming due
# deliveries, recording attempts, the outbox's state, purging what was delivered.
DATABASE_OUTBOX_TAKE: Final = "outbox_take"
DATABASE_DELIVERY_INSERT: Final = "delivery_insert"
DATABASE_DELIVERY_CLAIM: Final = "delivery_claim"
DATABASE_DELIVERY_RECORD: Final = "delivery_record"
DATABASE_OUTBOX_STATE: Final = "outbox_state"
# A gateway's /health (and its outbox, with DATABASE_OUTBOX_STATE).
DATABASE_HEALTH_CHECK: Final = "health_check"
# What a gateway keeps itself: contact details (read, written: by the API or from
# a token's email claim, erased), webhook endpoints (read, written), their
# deliveries (read, redelivered).
DATABASE_CONTACT_READ: Final = "contact_read"
DATABASE_CONTACT_WRITE: Final = "contact_write"
DATABASE_CONTACT_ERASE: Final = "contact_erase"
DATABASE_WEBHOOK_READ: Final = "webhook_read"
DATABASE_WEBHOOK_WRITE: Final = "webhook_write"
DATABASE_DELIVERY_READ: Final = "delivery_read"
DATABASE_DELIVERY_REDELIVER: Final = "delivery_redeliver"
DATABASE_DELIVERY_PURGE: Final = "delivery_purge"

REDIS_FAMILY: Final = "redis_operation_duration_seconds"
DATABASE_FAMILY: Final = "database_query_duration_seconds"


class HistogramSnapshot(msgspec.Struct, frozen=True, array_like=True):
    """Cumulative counts per bucket bound, the last one +Inf (so it is the count),
    and the sum in the histogram's unit (seconds for durations)."""

    cumulative: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0


class TimingsSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What a ``Timings`` holds, for a shard's statistics (bounds: this module's)."""

    redis: dict[str, HistogramSnapshot]
    database: dict[str, HistogramSnapshot]
    flush_events: HistogramSnapshot
    flush_rows: HistogramSnapshot
    commit_lag: HistogramSnapshot
    # The owner's PostgreSQL connections: in use now, and how many it may hold.
    connections_in_use: int = 0
    connections_max: int = 0


class Histogram:
    """Counts per bucket (not cumulative; the last is above every bound) and a sum."""

    __slots__ = ("bounds", "counts", "scale", "sum")

    def __init__(self, bounds: tuple[int, ...], scale: float = 1.0) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0
        # What one unit of ``observe``'s value is in the rendered unit.
        self.scale = scale

    def observe(self, value: int) -> None:
        """One value in the bounds' unit (nanoseconds for a duration)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def time(self) -> "Timer":
        """``with histogram.time(): ...``: the block's duration (also when it raises)."""
        return Timer(self)

    def snapshot(self) -> HistogramSnapshot:
        total = 0
        cumulative = []
        for count in self.counts:
            total += count
            cumulative.append(total)
        return HistogramSnapshot(tuple(cumulative), self.sum * self.scale)


class Timer:
    __slots__ = ("_histogram", "_started")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._started = 0

    def __enter__(self) -> "Timer":
        self._started = time.perf_counter_ns()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._histogram.observe(time.perf_counter_ns() - self._started)


def duration_histogram() -> Histogram:
    return Histogram(_DURATION_BOUNDS_NS, 1e-9)


class Timings:
    """One owner's histograms: Redis operations and database statements by label,
    its flushes' events, rows and commit lag, and its connections' use."""

    def __init__(self) -> None:
        self._redis: dict[str, Histogram] = {}
        self._database: dict[str, Histogram] = {}
        self.flush_events = Histogram(FLUSH_SIZE_BOUNDS)
        self.flush_rows = Histogram(FLUSH_SIZE_BOUNDS)
        self.commit_lag = Histogram(_COMMIT_LAG_BOUNDS_NS, 1e-9)
        self.connections_in_use = 0
        self.connections_max = 0

    def redis(self, operation: str) -> Histogram:
        """The histogram of a Redis operation (take it once and keep it)."""
        return self._labelled(self._redis, operation)

    def database(self, query_type: str) -> Histogram:
        """The histogram of a kind of database statement (take it once and keep it)."""
        return self._labelled(self._database, query_type)

    @staticmethod
    def _labelled(histograms: dict[str, Histogram], label: str) -> Histogram:
        histogram = histograms.get(label)
        if histogram is None:
            if not label or len(label) > 64 or not label.isidentifier():
                raise ValueError(f"not a timing label (an identifier, <= 64 chars): {label!r}")
            if len(histograms) >= LABELS_MAX:
                raise ValueError(f"more than {LABELS_MAX} timing labels of one kind")
            histogram = histograms[label] = duration_histogram()
        return histogram

    def snapshot(self) -> TimingsSnapshot:
        return TimingsSnapshot(
            redis={label: h.snapshot() for label, h in self._redis.items()},
            database={label: h.snapshot() for label, h in self._database.items()},
            flush_events=self.flush_events.snapshot(),
            flush_rows=self.flush_rows.snapshot(),
            commit_lag=self.commit_lag.snapshot(),
            connections_in_use=self.connections_in_use,
            connections_max=self.connections_max,
        )


def add_histogram(
    family: Metric,
    labels: Mapping[str, str],
    histogram: HistogramSnapshot,
    bounds: tuple[float, ...],
) -> None:
    """One histogram's samples (cumulative buckets, +Inf, count, sum) with ``labels``:
    the label names may differ between a family's series (a gateway's, a shard's)."""
    cumulative = histogram.cumulative
    if len(cumulative) != len(bounds) + 1:
        return  # another release's bounds: nothing rendered rather than wrong buckets
    name = family.name
    samples = family.samples
    for bound, count in zip(bounds, cumulative, strict=False):
        samples.append(Sample(f"{name}_bucket", {**labels, "le": str(bound)}, count))
    samples.append(Sample(f"{name}_bucket", {**labels, "le": "+Inf"}, cumulative[-1]))
    samples.append(Sample(f"{name}_count", dict(labels), cumulative[-1]))
    samples.append(Sample(f"{name}_sum", dict(labels), histogram.sum))


def duration_families() -> tuple[HistogramMetricFamily, HistogramMetricFamily]:
    """The empty families of Redis and database durations."""
    return (
        HistogramMetricFamily(
            REDIS_FAMILY,
            "Duration of Redis operations by operation (label shard: a shard actor's; "
            "none: this process's own).",
            labels=["operation"],
        ),
        HistogramMetricFamily(
            DATABASE_FAMILY,
            "Duration of database statements by query type (label shard: a shard actor's; "
            "none: this process's own).",
            labels=["query_type"],
        ),
    )


def add_durations(
    redis: Metric, database: Metric, snapshot: TimingsSnapshot, shard: str | None = None
) -> None:
    """A snapshot's Redis and database durations (with ``shard``, if given)."""
    extra = {} if shard is None else {"shard": shard}
    for family, name, histograms in (
        (redis, "operation", snapshot.redis),
        (database, "query_type", snapshot.database),
    ):
        for label, histogram in sorted(histograms.items()):
            add_histogram(family, {name: label, **extra}, histogram, DURATION_BOUNDS_S)


class TimingsCollector:
    """Renders one ``Timings``' Redis and database durations (no ``shard``): for a
    process whose registry has no engine sampler (``slotengine notify``)."""

    def __init__(self, timings: Timings) -> None:
        self._timings = timings

    def describe(self) -> Iterable[Metric]:
        return duration_families()

    def collect(self) -> Iterable[Metric]:
        redis, database = duration_families()
        add_durations(redis, database, self._timings.snapshot())
        return (redis, database)

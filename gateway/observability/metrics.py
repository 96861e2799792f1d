"""The gateway's metrics: its own registry, the business counters, the timings.

It owns ``Metrics`` (reservations, confirmations, queue waits, HTTP request
durations, and the ``Timings`` of this process's Redis and database work,
which ``gateway.observability.sampler`` renders beside the shards'),
``Observation`` / ``observe_redis`` /
``observe_database`` and ``metrics_observer``, which ``request_context``
(``gateway.http``) tells of every answer. It never calls the engine (the
engine's series are ``gateway.observability.sampler``'s), never reads a
response's body again (the answer rides on the response as ``ANSWER``), and
every label it makes takes a bounded set of values.
"""

import collections
import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Literal, ParamSpec, TypeVar, cast

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway import schemas as s
from gateway.http import (
    ANSWER,
    ERROR_CODE,
    Observer,
    serving_app,
)
from persistence.timings import Timings

WAIT_WINDOW_S: Final = 300.0
WAIT_SAMPLES_MAX: Final = 10_000
CONFIRM_CLOCK_SKEW_S: Final = 1.0
CONFIRMED_IDS_KEPT_S: Final = 120.0
CONFIRMED_IDS_MAX: Final = 100_000
ERROR_CODES_MAX: Final = 50
LABEL_CHARS_MAX: Final = 64

HTTP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)

# The routes whose answers feed the business metrics (the templates of gateway/routes/).
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
        # This process's Redis operations and database statements (the rate limits,
        # idempotency records, live connection places, the health probes, ...):
        # rendered by the engine sampler as redis_operation_duration_seconds and
        # database_query_duration_seconds, beside the shards' own.
        self.timings = Timings()
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
        if not label.isidentifier() or len(label) > LABEL_CHARS_MAX:
            raise ValueError(
                f"a {kind} label is an identifier of 1 to {LABEL_CHARS_MAX} characters"
            )
        self._kind = kind
        self._label = label
        self._metrics = metrics
        self._started: int | None = None

    def _record(self, started: int) -> None:
        metrics = self._metrics
        if metrics is None:
            app = serving_app()
            metrics = None if app is None else app.get(METRICS_KEY)
        if metrics is None:
            return
        timings = metrics.timings
        histogram = (
            timings.redis(self._label) if self._kind == "redis" else timings.database(self._label)
        )
        histogram.observe(time.perf_counter_ns() - started)

    def __enter__(self) -> "Observation":
        self._started = time.perf_counter_ns()
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
                started = time.perf_counter_ns()
                try:
                    return await cast(Awaitable[Any], function(*args, **kwargs))
                finally:
                    self._record(started)

            return cast(Callable[P, R], timed_coroutine)

        @functools.wraps(function)
        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter_ns()
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


METRICS_KEY: Final = web.AppKey("metrics", Metrics)


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

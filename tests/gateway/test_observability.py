"""GET /health and GET /metrics (docs/api.md, "Operations") over real PostgreSQL and Redis."""

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from engine.shell.coalescer import EngineClient
from engine.shell.errors import ShardUnavailable
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.owner import StorageSettings
from engine.shell.runtime import RuntimeStatistics
from gateway.app import create_app
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.observability.endpoints import add_observability
from gateway.observability.metrics import METRICS_KEY, observe_database, observe_redis
from tests.conftest import REDIS_URL
from tests.gateway.conftest import SECRET, SHARDS, Token
from tests.support.domain import POLICIES

Client = TestClient[Any, Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

METRIC_NAMES = (
    "booking_reservations_total",
    "booking_confirmations_total",
    "booking_expirations_total",
    "queue_length",
    "queue_waiting",
    "average_wait_time_seconds",
    "http_request_duration_seconds",
    "redis_operation_duration_seconds",
    "database_query_duration_seconds",
)
# What each shard actor says of itself (label ``shard``; owner_state also ``state``).
ACTOR_METRIC_NAMES = (
    "engine_shard_in_flight_commands",
    "engine_shard_owner_state",
    "engine_shard_lease_valid_seconds",
    "engine_shard_fence_token",
    "engine_shard_rebuilds_total",
    "engine_shard_partitions",
    "engine_shard_pending_events",
    "engine_shard_flush_lag_seconds",
    "engine_shard_last_flush_age_seconds",
)
SHARD_LINE_KEYS = {
    "shard", "up", "state", "token", "leaseValidMs", "partitions", "inFlight", "pendingEvents",
    "flushLagMs", "lastFlushAgoMs",
}  # fmt: skip
WAIT_LIMIT_S = 10.0


def _closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class _Tampered:
    """The host's statistics, unanswered or with the runtime marked failed."""

    def __init__(self, host: OwnedInProcessHost, *, answers: bool, failed: bool = False) -> None:
        self._host = host
        self._answers = answers
        self._failed = failed

    @property
    def shard_count(self) -> int:
        return self._host.shard_count

    async def statistics(self, shard: int, timeout_ms: int) -> RuntimeStatistics:
        if not self._answers and shard == 1:
            raise ShardUnavailable(f"shard {shard} is not serving")
        statistics = await self._host.statistics(shard, timeout_ms)
        return msgspec.structs.replace(statistics, failed=self._failed)


async def _timed_stores(request: web.Request) -> web.Response:
    # Other modules time their store calls without a handle on the metrics.
    async with observe_redis("get"):
        await asyncio.sleep(0)
    with observe_database("select"):
        pass
    return web.Response(text="ok")


@asynccontextmanager
async def _observed(
    host: OwnedInProcessHost, *, database_url: str, redis_url: str, transport: Any = None
) -> AsyncIterator[Client]:
    engine = EngineClient(host)
    app = create_app(engine, Verifier(AuthSettings(secret=SECRET)))
    app.router.add_get("/stores/{name}", _timed_stores)
    add_observability(
        app,
        engine=engine,
        transport=host if transport is None else transport,
        database_url=database_url,
        redis_url=redis_url,
    )
    async with TestClient(TestServer(app)) as client:
        yield client


@pytest.fixture
async def observed(host: OwnedInProcessHost, database_url: str) -> AsyncIterator[Client]:
    async with _observed(host, database_url=database_url, redis_url=REDIS_URL) as client:
        yield client


async def _scrape(client: Client) -> Samples:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {name.removesuffix("_total") for name in METRIC_NAMES} <= names, names
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _total(samples: Samples, name: str, predicate: Callable[[dict[str, str]], bool]) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and predicate(dict(labels)))


async def _slot(client: Client, token: Token, **fields: Any) -> dict[str, Any]:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    body = {
        "resourceId": f"room-{datetime.now(UTC).timestamp()}",
        "startTime": start.isoformat(),
        "endTime": (start + timedelta(hours=1)).isoformat(),
        "capacity": 1,
        **fields,
    }
    response = await client.post("/api/admin/slots", json=body, headers=token("root", "admin"))
    assert response.status == 201, await response.text()
    slot: dict[str, Any] = await response.json()
    return slot


async def test_metrics_count_answers_and_label_routes_by_template(
    observed: Client, token: Token
) -> None:
    slot = await _slot(observed, token)
    reserve = "/api/bookings/reserve"
    held = await observed.post(reserve, json={"slotId": slot["id"]}, headers=token("ann"))
    assert held.status == 201
    booking = (await held.json())["booking"]
    again = await observed.post(reserve, json={"slotId": slot["id"]}, headers=token("ann"))
    assert again.status == 200
    queued = await observed.post(reserve, json={"slotId": slot["id"]}, headers=token("bob"))
    assert queued.status == 202
    assert (await queued.json())["queue"]["estimatedWaitSeconds"] > 0
    unknown = await observed.post(reserve, json={"slotId": "nope"}, headers=token("ann"))
    assert unknown.status == 404
    for _ in range(2):  # the repeat answers 200 unchanged and is not a new confirmation
        url = f"/api/bookings/{booking['id']}/confirm"
        confirmed = await observed.post(url, headers=token("ann"))
        assert confirmed.status == 200 and (await confirmed.json())["status"] == "CONFIRMED"
    assert (await observed.get("/stores/x")).status == 200

    samples = await _scrape(observed)
    reservations = "booking_reservations_total"
    assert _value(samples, reservations, status="created", outcome="success") == 1
    assert _value(samples, reservations, status="existing", outcome="success") == 1
    assert _value(samples, reservations, status="queued", outcome="queued") == 1
    assert _value(samples, reservations, status="NotFound", outcome="failure") == 1
    assert _value(samples, "booking_confirmations_total") == 1
    assert _value(samples, "queue_length", slot_id=slot["id"]) == 1
    assert _total(samples, "queue_waiting", lambda _: True) == 1
    assert samples[("average_wait_time_seconds", frozenset())] > 0
    confirm_count = _value(
        samples,
        "http_request_duration_seconds_count",
        endpoint="/api/bookings/{booking_id}/confirm",
        method="POST",
        status="200",
    )
    assert confirm_count == 2
    assert _value(
        samples,
        "http_request_duration_seconds_count",
        endpoint="/api/bookings/reserve",
        method="POST",
        status="404",
    )
    endpoints = {
        labels["endpoint"]
        for (name, frozen), _ in samples.items()
        if name == "http_request_duration_seconds_count"
        for labels in [dict(frozen)]
    }
    assert not any(booking["id"] in endpoint or slot["id"] in endpoint for endpoint in endpoints)
    assert _value(samples, "redis_operation_duration_seconds_count", operation="get") == 1
    assert _value(samples, "database_query_duration_seconds_count", query_type="select") == 1
    # The registry is the app's own, not prometheus-client's global one.
    assert observed.app is not None
    assert observed.app[METRICS_KEY].registry is not None


async def test_expirations_come_from_the_engine(observed: Client, token: Token) -> None:
    slot = await _slot(observed, token, domain="short")
    held = await observed.post(
        "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("ann")
    )
    assert held.status == 201
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_LIMIT_S
    while True:
        samples = await _scrape(observed)
        if _total(samples, "booking_expirations_total", lambda _: True) >= 1:
            break
        assert loop.time() < deadline, "the hold never expired"
        await asyncio.sleep(0.2)
    shards = {dict(labels)["shard"] for name, labels in samples if name == "engine_shard_up"}
    assert shards == {"0", "1"}


async def test_health_is_healthy_on_real_services(observed: Client) -> None:
    response = await observed.get("/health")
    assert response.status == 200
    body = await response.json()
    shards = body.pop("shards")
    assert body.pop("outbox") == {
        "undispatchedEvents": 0, "oldestAgeMs": 0, "dueDeliveries": 0, "deadDeliveries": 0,
    }  # fmt: skip
    assert [line["shard"] for line in shards] == list(range(SHARDS))
    for line in shards:
        assert set(line) == SHARD_LINE_KEYS
        assert (line["up"], line["state"], line["inFlight"], line["flushLagMs"]) == (
            True, "serving", 0, 0,
        )  # fmt: skip
        assert line["token"] > 0 and line["leaseValidMs"] > 0 and line["pendingEvents"] == 0
    assert body == {
        "status": "healthy",
        "components": {"database": "up", "redis": "up", "engine": "up", "queue": "up"},
    }
    again = await observed.get("/health")  # the database connection is kept
    assert again.status == 200
    samples = await _scrape(observed)
    checks = "database_query_duration_seconds_count"
    assert _value(samples, checks, query_type="health_check") == 2
    assert _value(samples, "redis_operation_duration_seconds_count", operation="ping") == 2
    assert _value(
        samples, "http_request_duration_seconds_count", endpoint="/health", method="GET",
        status="200",
    ) == 2  # fmt: skip


async def test_health_is_unhealthy_when_the_database_is_down(
    host: OwnedInProcessHost, database_url: str
) -> None:
    bad_url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/nothing"
    async with _observed(host, database_url=bad_url, redis_url=REDIS_URL) as client:
        response = await client.get("/health")
        assert response.status == 503
        body = await response.json()
    assert body["status"] == "unhealthy"
    assert body["components"] == {
        "database": "down",
        "redis": "up",
        "engine": "up",
        "queue": "up",
    }
    assert body["retryAfter"] > 0 and response.headers["Retry-After"] == str(body["retryAfter"])


async def test_health_is_degraded_when_redis_is_down(
    host: OwnedInProcessHost, database_url: str
) -> None:
    bad_url = f"redis://127.0.0.1:{_closed_port()}/0"
    async with _observed(host, database_url=database_url, redis_url=bad_url) as client:
        response = await client.get("/health")
        assert response.status == 503
        body = await response.json()
    assert body["status"] == "degraded"
    assert body["components"]["redis"] == "down"
    assert body["components"]["database"] == "up"
    assert body["retryAfter"] > 0 and "Retry-After" in response.headers


async def test_health_reports_the_engine_and_the_queue(
    host: OwnedInProcessHost, database_url: str
) -> None:
    unanswered = _Tampered(host, answers=False)
    async with _observed(
        host, database_url=database_url, redis_url=REDIS_URL, transport=unanswered
    ) as client:
        response = await client.get("/health")
        body = await response.json()
        assert response.status == 503 and body["status"] == "unhealthy"
        assert body["components"]["engine"] == "down"
        samples = await _scrape(client)
        assert _value(samples, "engine_shard_up", shard="0") == 1
        assert _value(samples, "engine_shard_up", shard="1") == 0
    failed = _Tampered(host, answers=True, failed=True)
    async with _observed(
        host, database_url=database_url, redis_url=REDIS_URL, transport=failed
    ) as client:
        response = await client.get("/health")
        body = await response.json()
    assert response.status == 503 and body["status"] == "degraded"
    assert body["components"] == {"database": "up", "redis": "up", "engine": "up", "queue": "down"}


def _by_shard(samples: Samples, name: str) -> dict[str, float]:
    found = {dict(labels)["shard"]: value for (n, labels), value in samples.items() if n == name}
    assert set(found) <= {str(shard) for shard in range(SHARDS)}, found
    return found


async def test_a_writer_held_back_shows_its_commands_in_flight_and_a_growing_flush_lag(
    database_url: str, redis_namespace: str, token: Token
) -> None:
    frozen = False
    thawed = asyncio.Event()

    async def before_flush(shard: int) -> None:
        # A PostgreSQL that takes no commit, as the writer meets it.
        if frozen:
            await thawed.wait()

    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
    )
    host = OwnedInProcessHost(
        shard_count=SHARDS, policies=POLICIES, storage=storage, before_flush=before_flush
    )
    await host.start()
    reserving: asyncio.Future[Any] | None = None
    try:
        async with _observed(host, database_url=database_url, redis_url=REDIS_URL) as client:
            slot = await _slot(client, token)
            samples = await _scrape(client)
            names = {name for name, _ in samples}
            assert {name.removesuffix("_total") for name in ACTOR_METRIC_NAMES} <= {
                name.removesuffix("_total") for name in names
            }
            every = {str(shard) for shard in range(SHARDS)}
            for name in ACTOR_METRIC_NAMES:
                shown = set(_by_shard(samples, name))
                # A shard's last flush is shown once it has flushed (the slot's shard has).
                assert shown == every or (name.endswith("last_flush_age_seconds") and shown), name
            assert _by_shard(samples, "engine_shard_flush_lag_seconds") == dict.fromkeys(every, 0)
            assert _by_shard(samples, "engine_shard_in_flight_commands") == dict.fromkeys(every, 0)
            for shard in every:
                assert _value(samples, "engine_shard_owner_state", shard=shard, state="serving")
                assert not _value(
                    samples, "engine_shard_owner_state", shard=shard, state="rebuilding"
                )
            assert all(_by_shard(samples, "engine_shard_fence_token").values())

            frozen = True
            reserving = asyncio.ensure_future(
                client.post(
                    "/api/bookings/reserve", json={"slotId": slot["id"]}, headers=token("ann")
                )
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_LIMIT_S
            while True:
                samples = await _scrape(client)
                busy = [
                    shard
                    for shard, count in _by_shard(
                        samples, "engine_shard_in_flight_commands"
                    ).items()
                    if count > 0
                ]
                if busy:
                    break
                assert loop.time() < deadline, "the held reserve was never in flight"
                await asyncio.sleep(0.1)
            (shard,) = busy
            first_lag = _value(samples, "engine_shard_flush_lag_seconds", shard=shard)
            await asyncio.sleep(1.5)  # past the sampler's reuse of a sample
            samples = await _scrape(client)
            second_lag = _value(samples, "engine_shard_flush_lag_seconds", shard=shard)
            assert second_lag >= first_lag + 1.0, (first_lag, second_lag)
            assert _value(samples, "engine_shard_in_flight_commands", shard=shard) == 1
            health = await client.get("/health")
            report = await health.json()
            # Readiness keeps its meaning: a writer behind is reported, not failed.
            assert health.status == 200, report
            line = report["shards"][int(shard)]
            assert set(line) == SHARD_LINE_KEYS
            assert line["inFlight"] == 1 and line["flushLagMs"] >= second_lag * 1000
            assert line["state"] == "serving"

            thawed.set()
            response = await asyncio.wait_for(reserving, WAIT_LIMIT_S)
            assert response.status == 201, await response.text()
            await asyncio.sleep(1.1)
            samples = await _scrape(client)
            assert _value(samples, "engine_shard_flush_lag_seconds", shard=shard) == 0
            assert _value(samples, "engine_shard_in_flight_commands", shard=shard) == 0
            health = await client.get("/health")
            line = (await health.json())["shards"][int(shard)]
            assert (line["inFlight"], line["flushLagMs"]) == (0, 0)
    finally:
        thawed.set()
        if reserving is not None and not reserving.done():
            reserving.cancel()
        await host.close()

"""``/metrics`` measures the engine's real work (docs/operations.md, "Metrics"):
after real traffic through the application ``slotengine serve`` builds (the
in-process engine, on the test PostgreSQL and Redis), the durations of the
Redis operations and database statements the gateway and every shard owner
issued, the shards' flush sizes and commit lag, and their connections' use,
each with bounded labels."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from config.settings import load_settings
from gateway.auth.settings import AuthSettings
from gateway.http import ENGINE_KEY
from gateway.observability.sampler import STATISTICS_MAX_AGE_S
from gateway.ratelimit import RateLimits
from gateway.server import build_app
from persistence import timings as t
from persistence.migrate import deployment_namespace
from persistence.sealing import KeyRing, new_key
from tests.conftest import REDIS_URL, forget_namespace
from tests.gateway.conftest import SECRET, Token

Client = TestClient[Any, Any]

SHARDS = 2
# A lease is renewed every LEASE_RENEW_EVERY_MS (2 s): a renewal shows within this.
WAIT_LIMIT_S = 15.0
# The families of the engine's work, and the label names each may carry.
WORK_FAMILIES = {
    "redis_operation_duration_seconds": ("histogram", {"operation", "shard", "le"}),
    "database_query_duration_seconds": ("histogram", {"query_type", "shard", "le"}),
    "engine_shard_flush_events": ("histogram", {"shard", "le"}),
    "engine_shard_flush_rows": ("histogram", {"shard", "le"}),
    "engine_shard_commit_lag_seconds": ("histogram", {"shard", "le"}),
    "engine_shard_db_connections": ("gauge", {"shard", "state"}),
}
REDIS_OPERATIONS = {
    getattr(t, name) for name in dir(t) if name.startswith("REDIS_") and name.isupper()
} | {"ping"}
QUERY_TYPES = {
    getattr(t, name) for name in dir(t) if name.startswith("DATABASE_") and name.isupper()
} | {"health_check", "outbox_state"}


@pytest.fixture
async def served(database_url: str) -> AsyncIterator[Client]:
    """The application of ``slotengine serve --engine inproc`` (no notifications)."""
    settings = load_settings(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": REDIS_URL,
            "SLOTENGINE_SHARDS": str(SHARDS),
            "SLOTENGINE_NOTIFICATIONS": "false",
        }
    )
    app = build_app(
        settings,
        AuthSettings(secret=SECRET),
        RateLimits(),
        engine_kind="inproc",
        data_keys=KeyRing([new_key("k1")]),
    )
    try:
        async with TestClient(TestServer(app)) as client:
            yield client
    finally:
        connection = await asyncpg.connect(database_url)
        try:
            namespace = await deployment_namespace(connection)
        finally:
            await connection.close()
        await forget_namespace(namespace)


def _families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


async def _scrape(client: Client) -> dict[str, Any]:
    # The engine's statistics are reused for STATISTICS_MAX_AGE_S.
    await asyncio.sleep(STATISTICS_MAX_AGE_S)
    response = await client.get("/metrics")
    assert response.status == 200
    return _families(await response.text())


def _counts(family: Any, label: str) -> dict[tuple[str, str | None], float]:
    """(label value, shard or None) -> the series' count."""
    return {
        (sample.labels[label], sample.labels.get("shard")): sample.value
        for sample in family.samples
        if sample.name.endswith("_count")
    }


def _by_shard(family: Any, suffix: str, **labels: str) -> dict[str, float]:
    return {
        sample.labels["shard"]: sample.value
        for sample in family.samples
        if sample.name == family.name + suffix
        and all(sample.labels.get(k) == v for k, v in labels.items())
    }


async def _slot(client: Client, token: Token, resource: str) -> dict[str, Any]:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    body = {
        "resourceId": resource,
        "startTime": start.isoformat(),
        "endTime": (start + timedelta(hours=1)).isoformat(),
        "capacity": 1,
    }
    response = await client.post("/api/admin/slots", json=body, headers=token("root", "admin"))
    assert response.status == 201, await response.text()
    slot: dict[str, Any] = await response.json()
    return slot


async def test_the_engines_redis_and_database_work_is_measured_per_shard(
    served: Client, token: Token
) -> None:
    # Slots on both shards (a slot's shard is its id's routing key's), reserved
    # with an Idempotency-Key (rate limit, key claim, a flush, its publish), one
    # confirmed, the health probes once.
    assert served.app is not None
    engine = served.app[ENGINE_KEY]
    per_shard = 4
    resources = [
        [f"room-{index}" for index in range(64) if engine.shard_of_resource(f"room-{index}") == n]
        for n in range(SHARDS)
    ]
    slots = [
        await _slot(served, token, resource)
        for on_shard in resources
        for resource in on_shard[:per_shard]
    ]
    for index, slot in enumerate(slots):
        reserved = await served.post(
            "/api/bookings/reserve",
            json={"slotId": slot["id"]},
            headers={**token(f"user-{index}"), "Idempotency-Key": f"k-{index}"},
        )
        assert reserved.status == 201, await reserved.text()
    booking = (await reserved.json())["booking"]
    confirmed = await served.post(f"/api/bookings/{booking['id']}/confirm", headers=token("user-7"))
    assert confirmed.status == 200
    assert (await served.get("/health")).status == 200
    # What the gateway keeps itself: a contact address, webhook endpoints.
    me = token("user-0")
    put = await served.put("/api/me/contact", json={"email": "ann@example.com"}, headers=me)
    assert put.status == 200, await put.text()
    assert (await served.get("/api/me/contact", headers=me)).status == 200
    assert (await served.delete("/api/me/contact", headers=me)).status == 204
    listed = await served.get("/api/admin/webhooks", headers=token("root", "admin"))
    assert listed.status == 200, await listed.text()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_LIMIT_S
    while True:
        families = await _scrape(served)
        redis = _counts(families["redis_operation_duration_seconds"], "operation")
        if all(redis.get((t.REDIS_LEASE_RENEW, str(shard)), 0) > 0 for shard in range(SHARDS)):
            break
        assert loop.time() < deadline, f"no lease renewal of every shard: {redis}"
        await asyncio.sleep(0.5)

    for name, (kind, label_names) in WORK_FAMILIES.items():
        family = families[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) <= label_names, sample
            if "shard" in sample.labels:
                assert sample.labels["shard"] in {str(shard) for shard in range(SHARDS)}
            if "operation" in sample.labels:
                assert sample.labels["operation"] in REDIS_OPERATIONS, sample
            if "query_type" in sample.labels:
                assert sample.labels["query_type"] in QUERY_TYPES, sample

    # This gateway's own Redis work, without a shard label.
    for operation in (t.REDIS_RATE_LIMIT, t.REDIS_IDEMPOTENCY_CLAIM, "ping"):
        assert redis.get((operation, None), 0) > 0, (operation, redis)
    # Each shard owner's: its lease taken and renewed, its flushes published.
    for shard in map(str, range(SHARDS)):
        for operation in (t.REDIS_LEASE_ACQUIRE, t.REDIS_LEASE_RENEW, t.REDIS_PUBLISH):
            assert redis.get((operation, shard), 0) > 0, (operation, shard, redis)

    database = _counts(families["database_query_duration_seconds"], "query_type")
    assert database.get((t.DATABASE_HEALTH_CHECK, None), 0) == 1
    for query_type in (
        t.DATABASE_CONTACT_READ,
        t.DATABASE_CONTACT_WRITE,
        t.DATABASE_CONTACT_ERASE,
        t.DATABASE_WEBHOOK_READ,
    ):
        assert database.get((query_type, None), 0) >= 1, (query_type, database)
    for shard in map(str, range(SHARDS)):
        for query_type in (t.DATABASE_FENCE_READ, t.DATABASE_SHARD_LOAD, t.DATABASE_FLUSH):
            assert database.get((query_type, shard), 0) > 0, (query_type, shard, database)
    flushes = sum(database[(t.DATABASE_FLUSH, str(shard))] for shard in range(SHARDS))
    # Every slot created, every hold and the confirmation were committed (one
    # request at a time here: about a flush each, whatever group commit joined).
    assert 2 <= flushes <= len(slots) * 3

    # Flush sizes and commit lag, per shard: one observation per flush.
    events = families["engine_shard_flush_events"]
    rows = families["engine_shard_flush_rows"]
    lag = families["engine_shard_commit_lag_seconds"]
    for family in (events, rows, lag):
        counts = _by_shard(family, "_count")
        assert set(counts) == {"0", "1"}
        assert sum(counts.values()) == flushes
    # A slot created is at least a SlotChanged and its audit row; a hold, more.
    assert sum(_by_shard(events, "_sum").values()) >= len(slots) * 2
    assert sum(_by_shard(rows, "_sum").values()) >= len(slots) * 2
    assert all(value > 0 for value in _by_shard(lag, "_sum").values())
    # Buckets are cumulative and end with the count.
    for shard in ("0", "1"):
        buckets = [
            sample.value
            for sample in events.samples
            if sample.name == "engine_shard_flush_events_bucket" and sample.labels["shard"] == shard
        ]
        assert buckets == sorted(buckets)
        assert buckets[-1] == _by_shard(events, "_count")[shard]

    # Each shard owner's connection: one, idle between flushes.
    connections = families["engine_shard_db_connections"]
    assert _by_shard(connections, "", state="max") == {"0": 2.0, "1": 1.0}
    in_use = _by_shard(connections, "", state="in_use")
    idle = _by_shard(connections, "", state="idle")
    assert all(0 <= in_use[shard] <= 1 and in_use[shard] + idle[shard] >= 1 for shard in in_use)
    # The gateway's own pool is still its own series.
    assert families["slotengine_db_pool_connections"].samples

"""``GET /health``: the probes of PostgreSQL and Redis, and the verdict over them and the engine.

It owns the probes (one kept database connection, one Redis client), the
``Observability`` of an app (``app[OBSERVABILITY_KEY]``: the metrics, the
sampler and the probes, closed with the app) and the health answer (200
``healthy``, 503 ``unhealthy`` or ``degraded``, with a line per shard actor
from the same engine sample: its owner's state, lease, commands in flight,
flush lag). It never changes engine state and never writes to a store: a
probe only reads. The shards' lines never change the verdict.
"""

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from config.redis_client import redis_client
from gateway.observability.metrics import Metrics
from gateway.observability.sampler import CHECK_TIMEOUT_S, EngineSampler, ShardSample
from persistence import timings as t
from persistence.deliveries import outbox_state

logger = logging.getLogger("slotengine.gateway.observability")

HEALTH_RETRY_AFTER_S: Final = 5

CRITICAL_COMPONENTS: Final = frozenset({"database", "engine"})


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
                    with self._metrics.observe_database(t.DATABASE_HEALTH_CHECK):
                        value = await connection.fetchval("SELECT 1")
                except BaseException:
                    # Mid-query or broken: the next check starts on a new connection.
                    self._discard()
                    raise
        except Exception as exc:
            logger.debug("database check failed: %r", exc)
            return False
        return bool(value == 1)

    async def outbox(self) -> dict[str, Any] | None:
        """The transactional outbox's state, on the kept connection; None if it
        cannot be read now (the database check says why)."""
        connection = self._connection
        if connection is None or connection.is_closed():
            return None
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S), self._lock:
                with self._metrics.observe_database(t.DATABASE_OUTBOX_STATE):
                    now_ms = int(time.time() * 1000)
                    state = await outbox_state(connection, now_ms)
        except Exception as exc:
            logger.debug("outbox check failed: %r", exc)
            return None
        oldest = state.oldest_undispatched_ms
        return {
            "undispatchedEvents": state.undispatched_events,
            "oldestAgeMs": 0 if oldest is None else max(0, now_ms - oldest),
            "dueDeliveries": state.due_deliveries,
            "deadDeliveries": state.dead_deliveries,
        }

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
                self._client = redis_client(
                    self.url,
                    socket_timeout=CHECK_TIMEOUT_S,
                    socket_connect_timeout=CHECK_TIMEOUT_S,
                )
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                with self._metrics.observe_redis(t.REDIS_PING):
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
        return (await self.report())[0]

    async def outbox(self) -> dict[str, Any] | None:
        return await self._database.outbox()

    async def report(self) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """The components' verdicts, and a line per shard actor."""
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
        return components, [shard_line(shard) for shard in sample.shards]

    async def close(self) -> None:
        await self.sampler.close()
        await self._database.close()
        await self._redis.close()


def shard_line(sampled: ShardSample) -> dict[str, Any]:
    """One shard actor on ``/health`` (docs/api.md): null where it did not say."""
    runtime, owner = sampled.runtime, sampled.owner
    writer = owner.writer if owner is not None else None
    return {
        "shard": sampled.shard,
        "up": runtime is not None,
        "state": sampled.state,
        "token": owner.token if owner is not None else None,
        "leaseValidMs": owner.lease_valid_for_ms if owner is not None else None,
        "partitions": owner.partitions if owner is not None else None,
        "inFlight": runtime.in_flight_commands if runtime is not None else None,
        "pendingEvents": writer.pending_events if writer is not None else None,
        "flushLagMs": writer.flush_lag_ms if writer is not None else None,
        "lastFlushAgoMs": writer.last_flush_ago_ms if writer is not None else None,
    }


OBSERVABILITY_KEY: Final = web.AppKey("observability", Observability)


async def health_handler(request: web.Request) -> web.StreamResponse:
    observability = request.app[OBSERVABILITY_KEY]
    components, shards = await observability.report()
    # Read after the database check, on the connection it kept (none if it failed).
    outbox = await observability.outbox() if components["database"] == "up" else None
    down = sorted(name for name, state in components.items() if state == "down")
    if not down:
        return web.json_response(
            {"status": "healthy", "components": components, "shards": shards, "outbox": outbox}
        )
    status = "unhealthy" if CRITICAL_COMPONENTS.intersection(down) else "degraded"
    response = web.json_response(
        {
            "status": status,
            "components": components,
            "shards": shards,
            "outbox": outbox,
            "error": "ServiceUnavailable",
            "message": f"{', '.join(down)} down",
            "details": {},
            "retryAfter": HEALTH_RETRY_AFTER_S,
        },
        status=503,
    )
    response.headers["Retry-After"] = str(HEALTH_RETRY_AFTER_S)
    return response

"""``GET /metrics`` and ``add_observability``, which wires the operations endpoints into an app.

It owns the scrape (the engine's statistics refreshed first, then the
registry rendered) and the wiring: the metrics, the sampler and the probes
made, set on the app, closed with it. It never changes engine state.
"""

import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from engine.shell.coalescer import EngineClient
from gateway.http import (
    DATABASE_KEY,
    ENGINE_KEY,
    OBSERVER_KEY,
    TIMINGS_KEY,
    TRANSPORT_KEY,
)
from gateway.observability.health import OBSERVABILITY_KEY, Observability, health_handler
from gateway.observability.metrics import METRICS_KEY, Metrics, metrics_observer
from gateway.observability.pool import PoolCollector
from gateway.observability.sampler import EngineSampler

logger = logging.getLogger("slotengine.gateway.observability")


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
    queue_sizes: Mapping[str, int] | None = None,
) -> None:
    """Register ``GET /health``, ``GET /metrics`` and the timing middleware on ``app``.

    Call it after ``create_app`` and before the app starts. ``engine`` /
    ``transport`` None: read from ``app[ENGINE_KEY]`` / ``app[TRANSPORT_KEY]``
    when needed. ``queue_sizes``: each domain's maximum queue size, for
    ``queue_max_size``. The database pool's series read ``app[DATABASE_KEY]``.
    """

    def current_engine() -> EngineClient | None:
        return engine if engine is not None else app.get(ENGINE_KEY)

    def current_transport() -> Any:
        if transport is not None:
            return transport
        return app.get(TRANSPORT_KEY)

    registry_metrics = Metrics()
    sampler = EngineSampler(
        current_engine,
        current_transport,
        queue_sizes=queue_sizes,
        own_timings=registry_metrics.timings.snapshot,
    )
    registry_metrics.registry.register(sampler)
    registry_metrics.registry.register(PoolCollector(lambda: app.get(DATABASE_KEY)))
    observability = Observability(
        registry_metrics, sampler, database_url=database_url, redis_url=redis_url
    )
    app[METRICS_KEY] = registry_metrics
    app[TIMINGS_KEY] = registry_metrics.timings
    app[OBSERVABILITY_KEY] = observability
    app[OBSERVER_KEY] = metrics_observer(registry_metrics)
    app.router.add_get("/health", health_handler, allow_head=False)
    app.router.add_get("/metrics", metrics_handler, allow_head=False)

    async def close(_: web.Application) -> None:
        await observability.close()

    app.on_cleanup.append(close)

"""``slotengine serve``: the gateway process, with its engine.

It resolves the services (configured URLs, else the embedded PostgreSQL and
Redis under ``SLOTENGINE_DATA_DIR``), brings the schema up to date, starts the
engine (shard actors on Ray, or in-process shard owners with ``--engine
inproc``) and serves the API on uvloop. ``--workers N`` starts N processes
sharing the port (``SO_REUSEPORT``); they share the Ray shard actors, so it
needs the Ray engine: in-process shards live in exactly one process.

Bad settings fail before anything starts, with one line naming the setting.
"""

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from redis.backoff import NoBackoff
from redis.retry import Retry

from config.domains import load_policies
from config.settings import ConfigError, Settings
from engine.shell.coalescer import EngineClient
from engine.shell.owner import StorageSettings
from gateway.app import ENGINE_KEY, KEYS_KEY, LIMITER_KEY, TRANSPORT_KEY, create_app
from gateway.auth import AuthSettings, Verifier, auth_settings_from_env
from gateway.idempotency import KeyRegistry
from gateway.logs import configure_logging
from gateway.observability import OBSERVABILITY_KEY, add_observability
from gateway.ratelimit import RateLimiter, RateLimits, rate_limits_from_env
from gateway.realtime import LIVE_KEY, EventBus, LiveConnections

logger = logging.getLogger("slotengine.server")

EngineKind = Literal["ray", "inproc"]
# Ray namespace of the shard actors every gateway of one deployment shares.
RAY_NAMESPACE: Final = "slotengine"
SHUTDOWN_TIMEOUT_S: Final = 10.0
# A worker's graceful stop: aiohttp's shutdown, then the engine's wait for
# batches in flight (each up to SHUTDOWN_TIMEOUT_S), with a margin.
WORKERS_STOP_TIMEOUT_S: Final = 2 * SHUTDOWN_TIMEOUT_S + 5.0
# What stops `serve --workers N` gracefully.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
# Connections the kernel may hold for accept() (capped by net.core.somaxconn): a
# burst of a thousand users connecting at once must not find the queue full (a
# dropped SYN is retried after a second).
LISTEN_BACKLOG: Final = 4096
# Redis calls of the gateway (rate limits) fail fast: a request must not hang on them.
REDIS_TIMEOUT_S: Final = 0.5


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    engine: EngineKind
    workers: int


def check_options(options: ServeOptions) -> None:
    if options.workers < 1:
        raise ConfigError("--workers: must be at least 1")
    if options.workers > 1 and options.engine == "inproc":
        raise ConfigError(
            "--workers: in-process shards live in one process; use --engine ray for several workers"
        )
    if not 0 <= options.port <= 65_535:
        raise ConfigError("--port: must be between 0 and 65535")


async def storage_for(settings: Settings) -> StorageSettings:
    """The services to use (configured, else embedded), with the schema brought up to
    date, and the prefix of the deployment's keys in Redis."""
    import asyncpg

    from persistence.embedded import resolve_services
    from persistence.migrate import migrate
    from persistence.store import deployment_namespace

    database_url, redis_url = await asyncio.to_thread(
        resolve_services, settings.database_url, settings.redis_url, settings.data_dir
    )
    connection = await asyncpg.connect(database_url)
    try:
        applied = await migrate(connection)
        namespace = await deployment_namespace(connection)
    finally:
        await connection.close()
    if applied:
        logger.info("applied migrations %s", applied)
    logger.info("the deployment's keys in Redis start with %s:", namespace)
    return StorageSettings(
        database_url=database_url,
        redis_url=redis_url,
        relaxed=settings.durability == "relaxed",
        namespace=namespace,
    )


def build_app(
    settings: Settings, auth: AuthSettings, limits: RateLimits, engine_kind: EngineKind
) -> web.Application:
    """The application with its engine started on startup and stopped on cleanup."""
    verifier = Verifier(auth)

    async def engine_context(app: web.Application) -> AsyncIterator[None]:
        storage = await storage_for(settings)
        app[OBSERVABILITY_KEY].configure(
            database_url=storage.database_url, redis_url=storage.redis_url
        )
        policies = load_policies(settings)
        if engine_kind == "inproc":
            from engine.shell.inproc import OwnedInProcessHost

            host = OwnedInProcessHost(
                shard_count=settings.shards, policies=policies, storage=storage
            )
            await host.start()
            transport: Any = host
        else:
            import ray

            from engine.shell.ray_actor import RayShardTransport

            if not ray.is_initialized():
                ray.init(
                    address=settings.ray_address,
                    namespace=RAY_NAMESPACE,
                    log_to_driver=False,
                    include_dashboard=False,
                )
            transport = await RayShardTransport.connect(
                shard_count=settings.shards,
                policies=policies,
                namespace=RAY_NAMESPACE,
                storage=storage,
            )
        client = EngineClient(transport)
        # Set on startup, before the first request is served (aiohttp's pattern).
        app[ENGINE_KEY] = client
        app[TRANSPORT_KEY] = transport
        redis_client = aioredis.Redis.from_url(
            storage.redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        app[LIMITER_KEY] = RateLimiter(redis_client, limits, namespace=storage.namespace)
        app[KEYS_KEY] = KeyRegistry(redis_client, storage.namespace)
        # The live updates' pub/sub connection blocks on reads: no socket timeout
        # (the bus pings Redis itself when the channel is quiet).
        bus_client = aioredis.Redis.from_url(
            storage.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        bus = EventBus(bus_client, storage.namespace)
        await bus.start()
        app[LIVE_KEY] = LiveConnections(bus)
        logger.info(
            "serving with %d shards (%s engine, %s durability)",
            settings.shards,
            engine_kind,
            settings.durability,
        )
        yield
        await client.wait_idle(SHUTDOWN_TIMEOUT_S)
        await bus.close()
        await bus_client.aclose()
        await redis_client.aclose()
        if engine_kind == "inproc":
            await transport.close()

    app = create_app(None, verifier, cors_origins=settings.cors_origins)
    # The engine, its transport and the service URLs arrive on startup (engine_context).
    add_observability(app, engine=None, transport=None, database_url=None, redis_url=None)
    app.cleanup_ctx.append(engine_context)
    return app


def serve(settings: Settings, options: ServeOptions) -> None:
    """Run until interrupted. Raises ConfigError before starting anything on bad settings."""
    check_options(options)
    auth = auth_settings_from_env(os.environ, settings.data_dir)
    limits = rate_limits_from_env(os.environ)
    load_policies(settings)  # bad domain files fail here, not at the first request
    if options.workers == 1:
        _run_worker(settings, auth, limits, options)
        return
    # SIGINT and SIGTERM stop the parent, which stops its workers. Explicitly:
    # a process started in the background by a shell inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt for it; SIGTERM (what
    # `docker stop` and systemd send) would otherwise kill the parent alone.
    # After Ray's start, which installs a SIGTERM handler of its own (it aborts).
    settings = _shared_by_workers(settings)
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _interrupt)
    processes = [
        multiprocessing.get_context("spawn").Process(
            target=_run_worker, args=(settings, auth, limits, options), name=f"gateway-{n}"
        )
        for n in range(options.workers)
    ]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)  # stopping already
        stop_workers([p for p in processes if p.pid is not None], WORKERS_STOP_TIMEOUT_S)
    finally:
        _stop_local_ray()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop_local_ray() -> None:
    """The local Ray this parent started for its workers, if it did, with its shard actors.

    Left to the interpreter's exit it would go too, but only if nothing
    before it hangs; and its actors hold the shards' leases while they live.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def stop_workers(processes: list[Any], timeout_s: float) -> None:
    """Ask every worker to stop, wait ``timeout_s`` for all, then kill those left.

    A worker that hangs in its shutdown must not hang the parent: the
    interpreter's exit would otherwise wait for it without end.
    """
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            logger.warning("worker %s did not stop in %.0f s: killed", process.name, timeout_s)
            process.kill()
            process.join()


def _shared_by_workers(settings: Settings) -> Settings:
    """What several workers must share, settled once before they start.

    Left to themselves, each worker would start its own embedded services and
    its own local Ray, and so its own shard actors. The parent resolves the
    services and starts the local Ray (when none is configured), and the
    workers connect to those.
    """
    from persistence.embedded import resolve_services

    database_url, redis_url = resolve_services(
        settings.database_url, settings.redis_url, settings.data_dir
    )
    ray_address = settings.ray_address
    if ray_address is None:
        import ray

        ray.init(namespace=RAY_NAMESPACE, log_to_driver=False, include_dashboard=False)
        ray_address = str(ray.get_runtime_context().gcs_address)
        logger.info("started a local Ray at %s for the workers", ray_address)
    return msgspec.structs.replace(
        settings, database_url=database_url, redis_url=redis_url, ray_address=ray_address
    )


def _run_worker(
    settings: Settings, auth: AuthSettings, limits: RateLimits, options: ServeOptions
) -> None:
    import uvloop

    from engine.shell.gc_tuning import tune_gc

    log_writer = configure_logging(settings.log_level)
    app = build_app(settings, auth, limits, options.engine)
    # Each live connection is some hundred tracked objects: with the default
    # thresholds a full collection stalls a busy gateway for most of a second.
    tune_gc()
    web.run_app(
        app,
        host=options.host,
        port=options.port,
        reuse_port=options.workers > 1,
        backlog=LISTEN_BACKLOG,
        loop=uvloop.new_event_loop(),
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        print=logger.info,
        access_log=None,
    )
    log_writer.stop()

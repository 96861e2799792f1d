"""``slotengine serve``: the gateway process, with its engine.

It resolves the services (configured URLs, else the embedded PostgreSQL and
Redis under ``SLOTENGINE_DATA_DIR``), brings the schema up to date, starts the
engine (shard actors on Ray, or in-process shard owners with ``--engine
inproc``) and serves the API on uvloop. ``--workers N`` starts N processes
sharing the port (``SO_REUSEPORT``). With the Ray engine they share the shard
actors; with ``--engine inproc`` the shards run in one engine process of their
own, which the workers reach over a Unix socket (``engine.shell.local_engine``),
and which this process restarts if it dies.

The embedded services outlive the server (a restart reuses them at once)
unless ``stop_services_on_exit`` is set; it says so when it starts them.

Bad settings fail before anything starts, with one line naming the setting;
shard actors that are not the deployment's, or cannot start, fail the start
with one line too (``EngineStartFailed``).

It must never handle a request itself: every route is the app's
(``gateway.app``, ``gateway.observability``, ``gateway.openapi``).
"""

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

import asyncpg
import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from config.domains import load_policies
from config.redis_client import redis_client
from config.settings import ConfigError, Settings
from engine.core.routing import PartitionMap
from engine.notify.mail import TemplateError, templates_for
from engine.shell.actor_identity import RAY_NAMESPACE
from engine.shell.coalescer import EngineClient
from engine.shell.errors import ShellError
from engine.shell.limits import REDIS_CALL_TIMEOUT_MS
from engine.shell.owner import StorageSettings
from engine.shell.tracing import (
    Tracing,
    TracingConfigError,
    check_tracing_environment,
    configure_tracing,
)
from gateway.app import create_app
from gateway.auth.environment import auth_settings_from_env
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.connection import STOP_SIGNALS, ReadTimeouts, serve_app
from gateway.connlimit import ConnectionLimiter
from gateway.http import DATABASE_KEY, ENGINE_KEY, KEYS_KEY, LIMITER_KEY, TRANSPORT_KEY
from gateway.idempotency import KeyRegistry
from gateway.live.bus import EventBus
from gateway.live.endpoints import LIVE_KEY, LiveConnections, touch_every_s
from gateway.logs import configure_logging
from gateway.observability.endpoints import add_observability
from gateway.observability.health import OBSERVABILITY_KEY
from gateway.ratelimit import RateLimiter, RateLimits, rate_limits_from_env
from persistence.sealing import DATA_KEY_SETTING, DATA_KEYS_FILE, KeyRing, load_key_ring

logger = logging.getLogger("slotengine.server")

EngineKind = Literal["ray", "inproc"]
SHUTDOWN_TIMEOUT_S: Final = 10.0
# A worker's graceful stop: aiohttp's shutdown, then the engine's wait for
# batches in flight (each up to SHUTDOWN_TIMEOUT_S), with a margin.
WORKERS_STOP_TIMEOUT_S: Final = 2 * SHUTDOWN_TIMEOUT_S + 5.0
# Connections the kernel may hold for accept() (capped by net.core.somaxconn): a
# burst of a thousand users connecting at once must not find the queue full (a
# dropped SYN is retried after a second).
LISTEN_BACKLOG: Final = 4096
# Redis calls of the gateway (rate limits, idempotency keys) fail fast: a request
# must not hang on them (each call is bounded by the same limit in its own code).
REDIS_TIMEOUT_S: Final = REDIS_CALL_TIMEOUT_MS / 1000
# Redis calls one gateway process may have in flight at once (rate limits,
# idempotency records, live-connection places). redis-py's asyncio pool refuses
# a call past its size at once (MaxConnectionsError; 100 by default), which a
# burst of a few hundred WebSocket connects or keyed requests reaches: past this
# many a call waits for a connection instead, within the call's own timeout.
REDIS_CONNECTIONS_MAX: Final = 256
# How often the gateway reads the partition map even when told nothing: the
# coordinator's notice (MAP_CHANGED on the bus channel) may have been lost
# (Redis away, a gateway restarting), and a live watch would then hear nothing of
# a moved slot until a command for it was refused. One small read per process.
MAP_REFRESH_EVERY_S: Final = 10.0
# The gateway's own connections to the deployment's database (contact details):
# a few small statements now and then, never on a booking's path.
DATABASE_POOL_MAX: Final = 4


def gateway_redis(url: str, *, timeout_s: float = REDIS_TIMEOUT_S) -> aioredis.Redis:
    """The gateway's client for its short Redis calls: bounded, not retried, pooled.

    ``timeout_s`` bounds each wait (for a pooled connection, a connect, an
    answer); the gateway keeps the default, tests whose machine may be slow
    set a longer one.
    """
    return redis_client(
        url,
        max_connections=REDIS_CONNECTIONS_MAX,
        pool_timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


async def follow_the_map(client: EngineClient, live: LiveConnections) -> None:
    """Keep ``client``'s partition map fresh and the live connections following it,
    until cancelled (with the app).

    The map is read when the bus says it changed (``MAP_CHANGED``) and every
    ``MAP_REFRESH_EVERY_S`` besides; each newer map the client takes is handed
    to the live connections (``LiveConnections.map_changed``).
    """
    changed = asyncio.Event()
    live.bus.on_map_changed = changed.set
    client.on_map_changed = live.map_changed
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), MAP_REFRESH_EVERY_S)
            changed.clear()
            await client.refresh_map()
    finally:
        live.bus.on_map_changed = None
        client.on_map_changed = None


class EngineStartFailed(Exception):
    """The engine did not start (its shard actors are another deployment's, or
    could not start); the message is one line for the operator."""


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    engine: EngineKind
    workers: int
    # Stop the embedded PostgreSQL and Redis (those with no URL configured) on exit.
    stop_services_on_exit: bool = False
    # Run a delivery worker of the notifications (in the first gateway process).
    notify: bool = True


def check_options(options: ServeOptions) -> None:
    if options.workers < 1:
        raise ConfigError("--workers: must be at least 1")
    if not 0 <= options.port <= 65_535:
        raise ConfigError("--port: must be between 0 and 65535")


def check_address_free(options: ServeOptions) -> None:
    """Refuse, before anything starts, an address the gateway could not listen on.

    Starting the services and the engine first costs seconds, and the bind
    error would then come as a traceback. Bound as the gateway binds
    (``SO_REUSEADDR``, and ``SO_REUSEPORT`` with several workers), and
    released at once: a port taken between this check and the gateway's own
    bind still fails there.
    """
    if options.port == 0:
        return  # any free port
    address = f"{options.host}:{options.port}"
    try:
        candidates = socket.getaddrinfo(
            options.host or None, options.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ConfigError(f"--host: cannot resolve {options.host!r} ({error.strerror})") from None
    for family, kind, protocol, _, where in candidates:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if options.workers > 1:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(where)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"--port: {address} is already in use (another server?); "
                        "choose another with --port"
                    ) from None
                raise ConfigError(
                    f"--host: cannot listen on {address} ({error.strerror})"
                ) from None


def resolve_storage_urls(settings: Settings, *, stop_on_exit: bool) -> tuple[str, str]:
    """The (database URL, Redis URL): configured, else the embedded services, started
    if they are not running, with one line saying how long they live and what stops them."""
    from persistence.services import resolve_services

    urls = resolve_services(settings.database_url, settings.redis_url, settings.data_dir)
    embedded = " and ".join(
        name
        for name, url in (("PostgreSQL", settings.database_url), ("Redis", settings.redis_url))
        if not url
    )
    if embedded and stop_on_exit:
        logger.info(
            "embedded %s in %s: stopped when the server exits (--stop-services-on-exit)",
            embedded,
            settings.data_dir.resolve(),
        )
    elif embedded:
        logger.info(
            "embedded %s in %s: left running when the server exits, so a restart reuses "
            "them; `slotengine services stop` stops them (`slotengine services status` "
            "shows them)",
            embedded,
            settings.data_dir.resolve(),
        )
    return urls


def stop_embedded_services(settings: Settings) -> None:
    """Stop the embedded services ``settings`` leave to the server (no URL configured)."""
    from persistence.services import (
        POSTGRES_SUBDIR,
        REDIS_SUBDIR,
        EmbeddedServiceError,
        stop_postgres,
        stop_redis,
    )

    try:
        if not settings.redis_url:
            stop_redis(settings.data_dir / REDIS_SUBDIR)
        if not settings.database_url:
            stop_postgres(settings.data_dir / POSTGRES_SUBDIR)
    except EmbeddedServiceError as error:
        logger.error("the embedded services did not stop: %s", error)


async def storage_for(
    settings: Settings, *, stop_services_on_exit: bool = False
) -> StorageSettings:
    """The services to use (configured, else embedded), with the schema brought up to
    date, and the prefix of the deployment's keys in Redis."""
    storage, _ = await storage_and_partitions(settings, stop_services_on_exit=stop_services_on_exit)
    return storage


async def storage_and_partitions(
    settings: Settings, *, stop_services_on_exit: bool = False
) -> tuple[StorageSettings, PartitionMap]:
    """``storage_for``, and the database's partition map (created at the first
    start; re-spread over ``settings.shards`` shards when that setting changed,
    else as ``slotengine cluster scale`` left it: its ``shard_count`` is the
    number of shards to serve). Raises ``EngineStartFailed`` when the
    database's partitions cannot serve them."""
    from persistence.migrate import deployment_namespace, migrate
    from persistence.partitioning import PartitioningError, establish_partitions

    database_url, redis_url = await asyncio.to_thread(
        functools.partial(resolve_storage_urls, settings, stop_on_exit=stop_services_on_exit)
    )
    connection = await asyncpg.connect(database_url)
    try:
        applied = await migrate(connection)
        namespace = await deployment_namespace(connection)
        try:
            partition_map, moved = await establish_partitions(
                connection, partitions=settings.partitions, shard_count=settings.shards
            )
        except PartitioningError as error:
            raise EngineStartFailed(str(error)) from error
    finally:
        await connection.close()
    if applied:
        logger.info("applied migrations %s", applied)
    logger.info("the deployment's keys in Redis start with %s:", namespace)
    if moved:
        logger.warning(
            "SLOTENGINE_SHARDS changed: %d of %d partitions moved to serve %d shards",
            len(moved),
            partition_map.partitions,
            settings.shards,
        )
    elif partition_map.shard_count != settings.shards:
        logger.warning(
            "serving %d shards, as the cluster was last scaled (SLOTENGINE_SHARDS=%d is"
            " unchanged since the previous start)",
            partition_map.shard_count,
            settings.shards,
        )
    storage = StorageSettings(
        database_url=database_url,
        redis_url=redis_url,
        relaxed=settings.durability == "relaxed",
        namespace=namespace,
        partitions=partition_map.partitions,
        outbox=settings.notifications,
        outage_hold_grace_ms=settings.outage_hold_grace_seconds * 1000,
    )
    return storage, partition_map


def data_keys_for(settings: Settings) -> KeyRing:
    """The data keys (``SLOTENGINE_DATA_KEY``, else the key kept in the data dir),
    with one line saying which, and whether the data dir's was just made.
    Raises ``ConfigError`` naming the setting or the file."""
    path = settings.data_dir.resolve() / DATA_KEYS_FILE
    created = not settings.data_key and not path.exists()
    ring = load_key_ring(settings.data_key, settings.data_dir)
    if settings.data_key:
        logger.info("contact details are sealed with data key %s", ring.primary_id)
    elif created:
        logger.warning(
            "%s is unset: generated a data key in %s; contact details sealed with it open"
            " only with it (keep the file, or set %s on every gateway)",
            DATA_KEY_SETTING,
            path,
            DATA_KEY_SETTING,
        )
    else:
        logger.info("contact details are sealed with the data key in %s", path)
    return ring


def build_app(
    settings: Settings,
    auth: AuthSettings,
    limits: RateLimits,
    engine_kind: EngineKind,
    engine_socket: str | None = None,
    stop_services_on_exit: bool = False,
    data_keys: KeyRing | None = None,
    notify: bool = False,
    tracing: Tracing | None = None,
) -> web.Application:
    """The application with its engine started on startup and stopped on cleanup.

    ``engine_socket``: the in-process shards are an engine process's, reached
    on this Unix socket, instead of this process's own.
    ``stop_services_on_exit``: only changes what the start says about the
    embedded services; the caller stops them.
    ``data_keys``: the key ring sealing contact details (without it, the
    contact routes answer 503).
    ``notify``: run a delivery worker of the notifications beside the gateway
    (with ``data_keys``, and unless SLOTENGINE_NOTIFICATIONS is off).
    ``tracing``: this process's, when the OTEL_* variables turn it on (the
    in-process shards trace with it; shard actors configure their own).
    """
    verifier = Verifier(auth)

    async def engine_context(app: web.Application) -> AsyncIterator[None]:
        storage, partition_map = await storage_and_partitions(
            settings, stop_services_on_exit=stop_services_on_exit
        )
        app[OBSERVABILITY_KEY].configure(
            database_url=storage.database_url, redis_url=storage.redis_url
        )
        policies = load_policies(settings)
        rebalancing: asyncio.Task[None] | None = None
        if engine_socket is not None:
            from engine.shell.local_engine import LocalEngineTransport

            transport: Any = await LocalEngineTransport.connect(engine_socket)
        elif engine_kind == "inproc":
            from engine.shell.inproc import OwnedInProcessHost

            host = OwnedInProcessHost(
                shard_count=partition_map.shard_count,
                policies=policies,
                storage=storage,
                tracing=tracing,
            )
            await host.start()
            transport = host
        else:
            import ray

            from engine.shell.ray_actor import RayShardTransport, default_ray_health_checks

            if not ray.is_initialized():
                default_ray_health_checks()
                with _stop_signals_kept():
                    ray.init(
                        # "local": a Ray of its own, never one already on the machine
                        # (another deployment's, or a test run's).
                        address=settings.ray_address or "local",
                        namespace=RAY_NAMESPACE,
                        log_to_driver=False,
                        include_dashboard=False,
                    )
            try:
                # The deployment's own actors: named after it, and proving it.
                transport = await RayShardTransport.connect(
                    shard_count=partition_map.shard_count,
                    policies=policies,
                    namespace=RAY_NAMESPACE,
                    storage=storage,
                )
            except ShellError as error:
                # An actor's own failure arrives wrapped in Ray's, with its traceback.
                cause = getattr(error, "cause", None) or error
                raise EngineStartFailed(f"the shard actors did not start: {cause}") from error
            if settings.auto_rebalance:
                from engine.shell.actor_identity import deployment_prefix
                from engine.shell.scaling import auto_rebalance

                rebalancing = asyncio.get_running_loop().create_task(
                    auto_rebalance(
                        policies=policies,
                        storage=storage,
                        name_prefix=deployment_prefix(storage.namespace),
                        namespace=RAY_NAMESPACE,
                    ),
                    name="auto-rebalance",
                )
        from persistence.partitioning import read_partition_map

        client = EngineClient(
            transport,
            partition_map=partition_map,
            map_source=functools.partial(read_partition_map, storage.database_url),
            tracing=tracing,
        )
        # Set on startup, before the first request is served (aiohttp's pattern).
        app[ENGINE_KEY] = client
        app[TRANSPORT_KEY] = transport
        shared_redis = gateway_redis(storage.redis_url)
        # This process's Redis work is timed with its metrics (/metrics).
        timings = app[OBSERVABILITY_KEY].metrics.timings
        app[LIMITER_KEY] = RateLimiter(
            shared_redis, limits, namespace=storage.namespace, timings=timings
        )
        app[KEYS_KEY] = KeyRegistry(shared_redis, storage.namespace, timings)
        # The live updates' pub/sub connection blocks on reads: no socket timeout
        # (the bus pings Redis itself when the channel is quiet).
        bus_client = redis_client(storage.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S)
        bus = EventBus(bus_client, storage.namespace)
        await bus.start()
        live = app[LIVE_KEY] = LiveConnections(
            bus,
            # Watchers stay active within the shortest inactivity timeout served.
            touch_every_s=touch_every_s(
                min(policy.queue_inactivity_ms for policy in policies.values())
            ),
            limiter=ConnectionLimiter(
                shared_redis,
                settings.live_connections_per_user_max,
                namespace=storage.namespace,
                timings=timings,
            ),
        )
        # The gateway's own database connections (contact details).
        database = app[DATABASE_KEY] = await asyncpg.create_pool(
            storage.database_url, min_size=1, max_size=DATABASE_POOL_MAX
        )
        notifier = None
        if notify and settings.notifications and data_keys is not None:
            from engine.notify.service import start_notifier

            notifier = await start_notifier(
                settings,
                storage.database_url,
                data_keys,
                app[OBSERVABILITY_KEY].metrics.registry,
                timings,
            )
        following = asyncio.get_running_loop().create_task(
            follow_the_map(client, live), name="follow-the-map"
        )
        logger.info(
            "serving with %d shards (%s engine, %s durability)",
            partition_map.shard_count,
            engine_kind,
            settings.durability,
        )
        yield
        if rebalancing is not None:
            rebalancing.cancel()
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        await client.wait_idle(SHUTDOWN_TIMEOUT_S)
        await bus.close()
        await bus_client.aclose()
        await shared_redis.aclose()
        # The in-process shards, the engine socket or the links to the actors' sockets.
        await transport.close()
        if notifier is not None:
            # After the engine: what it committed last is delivered by the next worker.
            await notifier.close()
        await database.close()

    policies = load_policies(settings)
    app = create_app(
        None,
        verifier,
        cors_origins=settings.cors_origins,
        domains=list(policies),
        data_keys=data_keys,
        entities={name: policy.entity_name for name, policy in policies.items()},
        webhook_allow_private=settings.webhook_allow_private,
        tracing=tracing,
        trusted_proxy_header=settings.trusted_proxy_header,
        trusted_proxies=settings.trusted_proxies,
    )
    # The engine, its transport and the service URLs arrive on startup (engine_context).
    add_observability(
        app,
        engine=None,
        transport=None,
        database_url=None,
        redis_url=None,
        queue_sizes={name: policy.queue_size_max for name, policy in policies.items()},
    )
    app.cleanup_ctx.append(engine_context)
    return app


def check_templates(settings: Settings) -> None:
    """The email templates load (``engine.notify.mail``), or ``ConfigError`` naming the file."""
    try:
        templates_for(settings)
    except TemplateError as error:
        raise ConfigError(str(error)) from None


def serve(settings: Settings, options: ServeOptions) -> None:
    """Run until interrupted. Raises ConfigError before starting anything on bad settings."""
    check_options(options)
    check_address_free(options)
    # In the server's log format: which token secret it verifies with, or that
    # it generated one (the processes that serve configure their own logs).
    start_logs = configure_logging(settings.log_level)
    try:
        # Bad domain files, email templates and tracing variables fail here, not
        # at the first request, and before the token secret is generated.
        try:
            check_tracing_environment(os.environ)
        except TracingConfigError as error:
            raise ConfigError(str(error)) from None
        load_policies(settings)
        check_templates(settings)
        auth = auth_settings_from_env(os.environ, settings.data_dir)
        limits = rate_limits_from_env(os.environ)
        data_keys_for(settings)  # a bad key fails here; the data dir's is made once, here
    finally:
        start_logs.stop()
    if options.workers == 1:
        _run_worker(settings, auth, limits, options)
        return
    log_writer = configure_logging(settings.log_level)
    try:
        _serve_workers(settings, auth, limits, options)
    finally:
        if options.stop_services_on_exit:
            stop_embedded_services(settings)
        log_writer.stop()


def _serve_workers(
    settings: Settings, auth: AuthSettings, limits: RateLimits, options: ServeOptions
) -> None:
    settings = _shared_by_workers(
        settings, options.engine, stop_services_on_exit=options.stop_services_on_exit
    )
    # SIGINT and SIGTERM stop the parent, which stops its workers. Explicitly:
    # a process started in the background by a shell inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt for it; SIGTERM (what
    # `docker stop` and systemd send) would otherwise kill the parent alone.
    # After Ray's start, which installs a SIGTERM handler of its own (it aborts).
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _interrupt)
    engine_socket: str | None = None
    if options.engine == "inproc":
        engine_socket = os.path.join(tempfile.mkdtemp(prefix="slotengine-"), "engine.sock")
    # Every engine process started, the latest last (it is started again if it dies).
    engines: list[Any] = []
    processes = [
        _spawn(
            _run_worker,
            (settings, auth, limits, _nth_worker(options, n), engine_socket),
            f"gateway-{n}",
        )
        for n in range(options.workers)
    ]
    try:
        if engine_socket is not None:
            _start_engine(engines, settings, engine_socket)
        for process in processes:
            process.start()
        if engine_socket is None:
            for process in processes:
                process.join()
        else:
            _supervise(engines, processes, settings, engine_socket)
    except KeyboardInterrupt as interrupt:
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)  # stopping already
        logger.info(
            "%s received: stopping the workers gracefully, then the engine",
            interrupt.args[0] if interrupt.args else "SIGINT",
        )
        # The workers first: their requests in flight still reach the engine.
        stop_workers([p for p in processes if p.pid is not None], WORKERS_STOP_TIMEOUT_S)
    finally:
        # The engine last, also when the workers ended by themselves.
        stop_workers([e for e in engines if e.pid is not None], WORKERS_STOP_TIMEOUT_S)
        _stop_local_ray()
        if engine_socket is not None:
            # With the socket, if a killed engine process left it behind.
            shutil.rmtree(os.path.dirname(engine_socket), ignore_errors=True)


def _nth_worker(options: ServeOptions, n: int) -> ServeOptions:
    """The options of gateway process ``n``: the server's one delivery worker is the first's."""
    return dataclasses.replace(options, notify=options.notify and n == 0)


def _spawn(target: Any, args: tuple[Any, ...], name: str) -> Any:
    return multiprocessing.get_context("spawn").Process(target=target, args=args, name=name)


def _supervise(
    engines: list[Any], workers: list[Any], settings: Settings, engine_socket: str
) -> None:
    """Wait for the workers to end, starting the engine process again whenever it dies.

    Until its replacement has taken the shards over (their leases lapse
    first), the workers answer 503 and the clients retry.
    """
    while any(worker.is_alive() for worker in workers):
        engine = engines[-1]
        ready = multiprocessing.connection.wait(
            [engine.sentinel, *(w.sentinel for w in workers if w.is_alive())]
        )
        if engine.sentinel in ready:
            logger.error("the engine process exited with %s: starting it again", engine.exitcode)
            _start_engine(engines, settings, engine_socket)


def _start_engine(engines: list[Any], settings: Settings, engine_socket: str) -> None:
    engine = _spawn(_run_engine, (settings, engine_socket), "engine")
    engines.append(engine)
    engine.start()
    logger.info("engine process %d serves the shards on %s", engine.pid, engine_socket)


@contextlib.contextmanager
def _stop_signals_kept() -> Iterator[None]:
    """Whatever handles SIGINT and SIGTERM before the block handles them after it.

    ``ray.init`` installs handlers of its own (SIGTERM's dumps a stack trace and
    aborts): the server's graceful stop must stay the one that runs, also while
    the rest of the start goes on.
    """
    kept = {stop_signal: signal.getsignal(stop_signal) for stop_signal in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop_signal, handler in kept.items():
            if handler is not None:  # None: not installed from Python, nothing to restore
                signal.signal(stop_signal, handler)


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


def _shared_by_workers(
    settings: Settings, engine_kind: EngineKind, *, stop_services_on_exit: bool
) -> Settings:
    """What several workers must share, settled once before they start.

    Left to themselves, each worker would start its own embedded services and
    its own local Ray, and so its own shard actors. The parent resolves the
    services and starts the local Ray (when none is configured and the Ray
    engine is asked for), and the workers connect to those.
    """
    database_url, redis_url = resolve_storage_urls(settings, stop_on_exit=stop_services_on_exit)
    ray_address = settings.ray_address
    if ray_address is None and engine_kind == "ray":
        import ray

        from engine.shell.ray_actor import default_ray_health_checks

        default_ray_health_checks()
        ray.init(
            address="local", namespace=RAY_NAMESPACE, log_to_driver=False, include_dashboard=False
        )
        ray_address = str(ray.get_runtime_context().gcs_address)
        logger.info("started a local Ray at %s for the workers", ray_address)
    return msgspec.structs.replace(
        settings, database_url=database_url, redis_url=redis_url, ray_address=ray_address
    )


def _run_worker(
    settings: Settings,
    auth: AuthSettings,
    limits: RateLimits,
    options: ServeOptions,
    engine_socket: str | None = None,
) -> None:
    import uvloop

    from engine.shell.gc_tuning import tune_gc

    log_writer = configure_logging(settings.log_level)
    # Before the app exists: aiohttp's instrumentation wraps the applications
    # created from then on. None (and nothing instrumented) unless OTEL_* asks.
    tracing = configure_tracing(http_server=True)
    app = build_app(
        settings,
        auth,
        limits,
        options.engine,
        engine_socket,
        options.stop_services_on_exit,
        # Read again (the key ring cannot cross to a worker process): checked
        # and, when generated, made by serve() already.
        load_key_ring(settings.data_key, settings.data_dir),
        notify=options.notify,
        tracing=tracing,
    )
    # Each live connection is some hundred tracked objects: with the default
    # thresholds a full collection stalls a busy gateway for most of a second.
    tune_gc()
    try:
        serve_app(
            app,
            host=options.host,
            port=options.port,
            read_timeouts=ReadTimeouts(
                header_s=settings.header_timeout_seconds, body_s=settings.body_timeout_seconds
            ),
            reuse_port=options.workers > 1,
            backlog=LISTEN_BACKLOG,
            shutdown_timeout_s=SHUTDOWN_TIMEOUT_S,
            loop_factory=uvloop.new_event_loop,
        )
    finally:
        # Only a single server stops anything here: the workers of `--workers N`
        # are handed the URLs the parent resolved, and the parent stops them.
        if options.stop_services_on_exit and not (settings.database_url and settings.redis_url):
            _stop_local_ray()  # its shard actors first: they hold connections and leases
            stop_embedded_services(settings)
        if tracing is not None:
            tracing.shutdown()  # exports the spans still buffered
        log_writer.stop()


def _run_engine(settings: Settings, engine_socket: str) -> None:
    """The engine process of ``--engine inproc --workers N``: the shards, served on a socket.

    It ignores SIGINT (a terminal's Ctrl-C reaches every process of the group):
    the parent stops it with SIGTERM once the workers have stopped.
    """
    import uvloop

    from engine.shell.gc_tuning import tune_gc

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log_writer = configure_logging(settings.log_level)
    tune_gc()
    tracing = configure_tracing()
    try:
        uvloop.run(_serve_engine(settings, engine_socket, tracing))
    finally:
        if tracing is not None:
            tracing.shutdown()
        log_writer.stop()


async def _serve_engine(
    settings: Settings, engine_socket: str, tracing: Tracing | None = None
) -> None:
    from engine.shell.inproc import OwnedInProcessHost
    from engine.shell.local_engine import serve_engine

    storage, partition_map = await storage_and_partitions(settings)
    host = OwnedInProcessHost(
        shard_count=partition_map.shard_count,
        policies=load_policies(settings),
        storage=storage,
        tracing=tracing,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await serve_engine(host, engine_socket, stop.wait)

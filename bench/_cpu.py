"""The server's CPU by process while an HTTP scenario runs, from Linux's ``/proc``.

A started server is a tree of processes: its gateway workers (those that
listen on its port), the engine process of ``--engine inproc``, the parent
that supervises them, and with Ray the GCS, the raylet, Ray's agents and its
worker processes (the shard actors among them). PostgreSQL's processes (the
backends of the run's database and the server's own background processes)
and the Redis server the run uses sit outside the tree and are counted as
well: they serve the run too. ``CpuByRole.sample()`` reads every process's
user and system time; ``spent`` gives the CPU seconds of each role between
two samples.

It only reads ``/proc``; it must never signal, renice or otherwise touch the
processes it watches. Where ``/proc`` is missing it reports nothing.
"""

import contextlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Final

PROC: Final = Path("/proc")
# The roles, in the order a report lists them.
ROLES: Final = (
    "gateways",
    "engine_process",
    "serve_parent",
    "ray_shard_actors",
    "ray_other_workers",
    "raylet",
    "ray_gcs",
    "ray_other",
    "postgres",
    "redis",
    "delivery_worker",
    "other",
)
_TCP_LISTEN: Final = "0A"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, user + system ticks) of a process, None when it is gone."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _cmdline(pid: int) -> str:
    try:
        return (
            (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (PROC / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                listening = len(fields) > 9 and fields[3] == _TCP_LISTEN
                if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    if not inodes:
        return False
    with contextlib.suppress(OSError):
        for fd in (PROC / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return True
    return False


class CpuByRole:
    """Watches a server's process tree, PostgreSQL's processes of the run's database and
    the run's Redis server."""

    def __init__(
        self, root_pid: int | None, port: int | None, database: str | None, redis_port: int | None
    ) -> None:
        self._root = root_pid
        self._port = port
        self._database = database
        self._redis_port = redis_port
        self._roles: dict[int, str] = {}
        # Processes of the bench's own with a role of their own (pid -> role).
        self.named: dict[int, str] = {}

    def _role(self, pid: int, in_tree: bool, cmdline: str, gateway_inodes: set[str]) -> str | None:
        if pid in self.named:
            return self.named[pid]
        if in_tree:
            if _holds_socket(pid, gateway_inodes):
                return "gateways"
            if cmdline.startswith("ray::ShardActor"):
                return "ray_shard_actors"
            if cmdline.startswith("ray::"):
                return "ray_other_workers"
            if "/raylet" in cmdline.split(" ", 1)[0]:
                return "raylet"
            if "gcs_server" in cmdline.split(" ", 1)[0]:
                return "ray_gcs"
            if "ray" in cmdline:
                return "ray_other"
            if pid == self._root:
                return "serve_parent"
            if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
                return "engine_process"
            return "other"
        if cmdline.startswith("postgres: ") or "/postgres " in cmdline or "bin/postgres" in cmdline:
            # A backend reads "postgres: user database host(port) state"; the server's
            # own processes (writer, WAL writer, checkpointer, ...) have no "(".
            if "(" not in cmdline or (self._database and f" {self._database} " in cmdline):
                return "postgres"
            return None
        if "redis-server" in cmdline and self._redis_port and f":{self._redis_port}" in cmdline:
            return "redis"
        return None

    def sample(self) -> dict[int, tuple[str, int]]:
        """pid -> (role, CPU ticks so far) of every watched process."""
        parents: dict[int, int] = {}
        ticks: dict[int, int] = {}
        try:
            pids = [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]
        except OSError:
            return {}
        for pid in pids:
            found = _stat(pid)
            if found is not None:
                parents[pid], ticks[pid] = found
        tree: set[int] = set()
        if self._root is not None and self._root in parents:
            children: dict[int, list[int]] = defaultdict(list)
            for pid, parent in parents.items():
                children[parent].append(pid)
            pending = [self._root]
            while pending:
                current = pending.pop()
                tree.add(current)
                pending.extend(children.get(current, ()))
        gateway_inodes = _listening_inodes(self._port) if self._port else set()
        sampled: dict[int, tuple[str, int]] = {}
        for pid, spent in ticks.items():
            role = self._roles.get(pid)
            if role is None or role == "other":
                cmdline = _cmdline(pid)
                if not cmdline:
                    continue
                found_role = self._role(pid, pid in tree, cmdline, gateway_inodes)
                if found_role is None:
                    continue
                role = self._roles[pid] = found_role
            sampled[pid] = (role, spent)
        return sampled


def spent(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]
) -> dict[str, dict[str, float]]:
    """Per role: CPU seconds between two samples and how many processes took part."""
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = defaultdict(float)
    processes: dict[str, int] = defaultdict(int)
    for pid, (role, ticks) in after.items():
        earlier = before.get(pid)
        used = ticks - (earlier[1] if earlier is not None else 0)
        if used > 0:
            seconds[role] += used * tick_s
            processes[role] += 1
    return {
        role: {"cpu_s": round(seconds[role], 2), "processes": processes[role]}
        for role in ROLES
        if role in seconds
    }

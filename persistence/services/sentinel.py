"""A Redis master, a replica and three sentinels of the calling process's own, for
fault tests and the chaos soak: failovers and restarts on loopback.

``SentinelGroup`` starts, on five distinct free ports of 127.0.0.1 and in a
directory of its own, a master, one replica of it and three sentinels watching
them (quorum 2, a master judged down after ``DOWN_AFTER_MS``), with no
persistence. Clients reach it through ``url`` (``redis+sentinel://``, the form
``config.redis_client`` takes). ``kill_master`` SIGKILLs the master (the
sentinels then promote the replica: ``promoted``); ``rejoin`` starts the lost
server again as a replica of the new master, so that the group can fail over
once more; ``restart_master`` kills the master and starts it again at once on
its port, empty (too fast for the sentinels to fail over: the replica resyncs
from it and loses what it held too, as a Redis restart without persistence).

Owns: those processes only; ``close`` SIGKILLs every one of them. Must never
touch a Redis it did not start, nor know the engine's keys.
"""

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import redis

from persistence.services.process import HOST, free_port
from persistence.services.redis import find_redis_server

__all__ = ["DOWN_AFTER_MS", "QUORUM", "SERVICE", "SentinelGroup"]

SERVICE: Final = "slotengine-main"
QUORUM: Final = 2
# A master silent this long is down to a sentinel; a failover that stalls is
# tried again after the timeout. Small, so that a failover takes seconds.
DOWN_AFTER_MS: Final = 1_000
FAILOVER_TIMEOUT_MS: Final = 5_000
# Generous limits for conditions that take seconds on a quiet machine.
START_WAIT_S: Final = 30.0
FAILOVER_WAIT_S: Final = 60.0
POLL_S: Final = 0.1
_SENTINELS: Final = 3


class SentinelGroup:
    """A master, a replica and three sentinels watching them, as child processes."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        self.directory = directory
        self.executable = str(find_redis_server())
        # Five different ports (the system may hand out a freed one again).
        ports: list[int] = []
        while len(ports) < 2 + _SENTINELS:
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.master_port, self.replica_port, *self.sentinel_ports = ports
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> None:
        self._server(self.master_port)
        self._server(self.replica_port, "--replicaof", HOST, str(self.master_port))
        # The sentinels find the replica in the master's INFO: start them once it is there.
        self._until(self._replica_in_sync, "the replica is in sync with the master")
        for port in self.sentinel_ports:
            config = self.directory / f"sentinel-{port}.conf"
            config.write_text(
                f"port {port}\n"
                f"bind {HOST}\n"
                f"dir {self.directory}\n"
                f"sentinel monitor {SERVICE} {HOST} {self.master_port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self._spawn(port, [self.executable, str(config), "--sentinel"])
        self._until(self._sentinels_ready, "every sentinel knows the replica and the others")

    def _server(self, port: int, *arguments: str) -> None:
        self._spawn(
            port,
            [
                self.executable,
                "--port", str(port), "--bind", HOST, "--dir", str(self.directory),
                "--save", "", "--appendonly", "no", "--dbfilename", f"dump-{port}.rdb",
                *arguments,
            ],
        )  # fmt: skip

    def _spawn(self, port: int, command: list[str]) -> None:
        log = (self.directory / f"{port}.log").open("ab")
        with log:
            self.processes[port] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def _until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                if condition():
                    return
            for port, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"the server on port {port} exited: see {port}.log")
            time.sleep(POLL_S)  # the start is synchronous: no event loop runs
        raise RuntimeError(f"not within {START_WAIT_S:g} s: {what}")

    def _replica_in_sync(self) -> bool:
        with redis.Redis(host=HOST, port=self.replica_port, socket_timeout=1) as replica:
            info = replica.info("replication")
        return bool(info.get("master_link_status") == "up")

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            with redis.Redis(host=HOST, port=port, socket_timeout=1) as sentinel:
                state = sentinel.sentinel_master(SERVICE)
                replicas = sentinel.sentinel_slaves(SERVICE)
            if int(state["port"]) != self.master_port:
                return False
            if int(state["num-other-sentinels"]) < _SENTINELS - 1:
                return False
            # The replica known, and not (or no longer) judged down.
            if not any(
                int(r["port"]) == self.replica_port and "down" not in r["flags"] for r in replicas
            ):
                return False
        return True

    def _follow_sentinels(self) -> None:
        """Take the master from the sentinels (a quorum of them): they may have failed
        over by themselves (a restarted master slow to answer)."""
        servers = {self.master_port, self.replica_port}
        for port in servers:
            if self._votes_for(port) >= QUORUM:
                self.master_port = port
                (self.replica_port,) = servers - {port}
                return

    def kill_master(self) -> None:
        """SIGKILL the master: no goodbye to its clients, its replica or the sentinels."""
        self._follow_sentinels()
        process = self.processes.pop(self.master_port)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def restart_master(self) -> None:
        """Kill the master and start it again on its port at once, empty; returns once
        it answers (the replica then resyncs from it)."""
        self.kill_master()
        self._server(self.master_port)
        self._until(self._master_answers, "the restarted master answers")

    def _master_answers(self) -> bool:
        with redis.Redis(host=HOST, port=self.master_port, socket_timeout=1) as master:
            return bool(master.ping())

    def _votes_for(self, port: int) -> int:
        votes = 0
        for sentinel_port in self.sentinel_ports:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                with redis.Redis(host=HOST, port=sentinel_port, socket_timeout=1) as sentinel:
                    address = sentinel.sentinel_get_master_addr_by_name(SERVICE)
                votes += address is not None and int(address[1]) == port
        return votes

    async def promoted(self, timeout_s: float = FAILOVER_WAIT_S) -> None:
        """Wait until a quorum of sentinels names the replica as the master."""
        async with asyncio.timeout(timeout_s):
            while await asyncio.to_thread(self._votes_for, self.replica_port) < QUORUM:
                await asyncio.sleep(POLL_S)

    def rejoin(self) -> None:
        """After a failover: the promoted replica is the master from now on, and the lost
        master starts again as its replica; returns once the sentinels know it in sync."""
        self.master_port, self.replica_port = self.replica_port, self.master_port
        self._server(self.replica_port, "--replicaof", HOST, str(self.master_port))
        self._until(self._replica_in_sync, "the old master is in sync as a replica")
        self._until(self._sentinels_ready, "every sentinel knows the new replica")

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
        self.processes.clear()

"""What the HTTP scenarios share: the server under test, users and tokens, latency
records, the ledger of acknowledged answers, the database check, CPU and memory.

By default a scenario starts ``slotengine serve`` itself, on a database of the
run's own (created on ``DATABASE_URL``'s server, or the embedded one, and
dropped at the end unless ``--keep-database``) and the configured or embedded
Redis, with a fresh JWT secret; ``--url`` targets a running server instead
(then ``SLOTENGINE_JWT_SECRET`` must be its secret, and ``DATABASE_URL`` its
database for the check). Loopback only: the harness refuses other hosts.

The check after a scenario reads PostgreSQL, the source of truth: no slot
holds more than its capacity, no user has two active bookings of one slot, and
every hold or confirmation a client was given is there with the acknowledged
status or a later one (``lost_acks``).

It must never drive a server off this machine (``--url`` takes loopback only),
nor leave a run's database behind unless ``--keep-database`` asks.
"""

import argparse
import asyncio
import contextlib
import gc
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import asyncpg

from bench._database import create_run_database, drop_database
from gateway.auth.issue import issue_token

if TYPE_CHECKING:
    import aiohttp

SERVER_START_TIMEOUT_S: Final = 240.0
SERVER_STOP_TIMEOUT_S: Final = 60.0
TOKEN_TTL_S: Final = 6 * 3600
LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "::1")
SLOT_LENGTH: Final = timedelta(minutes=30)
# Shards of a started server when --shards is not given, by engine.
INPROC_SHARDS: Final = 1
RAY_SHARDS: Final = 4
# What a status may become after it was acknowledged (a later state, never an earlier one).
LATER_STATUSES: Final = {
    "RESERVED": {"RESERVED", "CONFIRMED", "EXPIRED", "CANCELLED", "COMPLETED"},
    "CONFIRMED": {"CONFIRMED", "CANCELLED", "COMPLETED"},
    "CANCELLED": {"CANCELLED"},
    "EXPIRED": {"EXPIRED"},
}


def add_server_arguments(
    parser: argparse.ArgumentParser,
    *,
    engine: str = "ray",
    workers: int = 1,
    several_engines: bool = False,
    ray_shards: int = RAY_SHARDS,
) -> None:
    """The options of the server a scenario starts; ``engine``, ``workers`` and
    ``ray_shards`` (its shards with Ray) are the scenario's defaults (its best
    configuration on two cores). With ``several_engines``,
    ``--engine`` may name several engines, comma-separated (the scenario runs each)."""
    parser.add_argument("--url", help="a running server on loopback (default: start one)")
    if several_engines:
        parser.add_argument(
            "--engine",
            type=_engines,
            default=engine,
            help=f"engine of the started server [{engine}]; several, comma-separated "
            "(ray,inproc), run in turn in one invocation and compared",
        )
    else:
        parser.add_argument(
            "--engine",
            choices=("ray", "inproc"),
            default=engine,
            help=f"engine of the started server [{engine}]",
        )
    parser.add_argument(
        "--workers",
        type=int,
        default=workers,
        help=f"gateway processes of the started server [{workers}]",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help=f"shards of the started server [{INPROC_SHARDS} with --engine inproc, whose "
        "shards share one event loop, so that more would only split its batches and commits; "
        f"{ray_shards} with ray]",
    )
    parser.set_defaults(ray_shards=ray_shards)
    parser.add_argument(
        "--keep-database", action="store_true", help="keep the run's database for inspection"
    )


ENGINES: Final = ("ray", "inproc")


def _engines(value: str) -> str:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in ENGINES]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{value!r}: one or more of {', '.join(ENGINES)}, comma-separated, each once"
        )
    return ",".join(names)


@dataclass
class Target:
    base: str
    secret: str
    database_url: str | None
    server: "subprocess.Popen[bytes] | None" = None
    log_path: Path | None = None
    redis_url: str | None = None

    def token(self, sub: str, role: str = "user") -> str:
        return issue_token(self.secret, sub, role, TOKEN_TTL_S)  # type: ignore[arg-type]

    def headers(self, sub: str, role: str = "user") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(sub, role)}"}

    def server_pids(self) -> list[int]:
        return [] if self.server is None else _process_tree(self.server.pid)


def shard_count(args: argparse.Namespace) -> int:
    """The shards of the server a scenario starts: ``--shards``, else the engine's best."""
    if args.shards is not None:
        return int(args.shards)
    if args.engine == "inproc":
        return INPROC_SHARDS
    return int(getattr(args, "ray_shards", RAY_SHARDS))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def target(
    args: argparse.Namespace,
    run_name: str,
    extra_env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> AsyncIterator[Target]:
    """The server under test, started (and stopped) here unless ``--url`` names one;
    ``extra_env``, ``extra_args``: settings and ``serve`` options of the started
    server beyond the bench's own."""
    if args.url:
        host = urlsplit(args.url).hostname
        if host not in LOOPBACK_HOSTS:
            raise SystemExit(f"--url: the bench runs on loopback only, not {host}")
        secret = os.environ.get("SLOTENGINE_JWT_SECRET")
        if not secret:
            raise SystemExit("--url needs SLOTENGINE_JWT_SECRET: the server's token secret")
        yield Target(args.url.rstrip("/"), secret, os.environ.get("DATABASE_URL"))
        return
    from config.settings import load_settings
    from persistence.services import resolve_services

    settings = load_settings()
    database_url, redis_url = await asyncio.to_thread(
        resolve_services, settings.database_url, settings.redis_url, settings.data_dir
    )
    bench_url = await create_run_database(database_url, run_name)
    database = urlsplit(bench_url).path.lstrip("/")
    port = _free_port()
    secret = secrets.token_hex(32)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{database}.log"
    env = {
        **os.environ,
        "DATABASE_URL": bench_url,
        "REDIS_URL": redis_url,
        "SLOTENGINE_JWT_SECRET": secret,
        "SLOTENGINE_SHARDS": str(shard_count(args)),
        # One log line per request would be part of what is measured.
        "SLOTENGINE_LOG_LEVEL": os.environ.get("SLOTENGINE_LOG_LEVEL", "warning"),
        **(extra_env or {}),
    }
    command = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port),
               "--engine", args.engine, "--workers", str(args.workers), *extra_args]  # fmt: skip
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    found = Target(f"http://127.0.0.1:{port}", secret, bench_url, server, log_path, redis_url)
    try:
        await _wait_healthy(found)
        yield found
    finally:
        server.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(server.wait, SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
        if not args.keep_database:
            await drop_database(bench_url)


async def _wait_healthy(found: Target) -> None:
    assert found.server is not None
    await wait_answering(
        f"{found.base}/health", found.server, SERVER_START_TIMEOUT_S, "the server", found.log_path
    )


async def wait_answering(
    url: str,
    process: subprocess.Popen[bytes],
    timeout_s: float,
    what: str,
    log_path: Path | None,
) -> None:
    """Wait until ``url`` answers 200, while ``process`` (what serves it) runs; a
    ``SystemExit`` naming ``what`` and its log when it exits or ``timeout_s`` passes."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"{what} exited; its log: {log_path}")
            try:
                async with session.get(url) as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"{what} did not start answering; its log: {log_path}")


async def create_slot(
    session: "aiohttp.ClientSession",
    target: Target,
    resource_id: str,
    capacity: int,
    start: datetime,
) -> str:
    """A 30-minute slot starting at ``start``, created by an admin; its id."""
    async with session.post(
        f"{target.base}/api/admin/slots",
        json={"resourceId": resource_id, "capacity": capacity,
              "startTime": start.isoformat(),
              "endTime": (start + SLOT_LENGTH).isoformat()},
        headers=target.headers("bench-admin", "admin"),
    ) as created:  # fmt: skip
        if created.status != 201:
            raise SystemExit(f"creating a slot failed: {created.status} {await created.text()}")
        slot_id: str = (await created.json())["id"]
        return slot_id


def tomorrow() -> datetime:
    """A whole second a day from now: slots there are open for booking in every domain."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)


# -- processes ------------------------------------------------------------------------


def _process_tree(pid: int) -> list[int]:
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            pending.extend(int(child) for child in children)
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def load_generator_collector() -> Iterator[None]:
    """No cyclic collection in the load generator while it measures.

    Latency is timed here, so a pause of this process reads as a slow answer:
    with CPython's default thresholds its full collections (the users, their
    tokens and connections, every latency kept) took 30-70 ms during a run.
    What exists when the load starts is frozen, and the collector stays off
    until it ends; what the load generator throws away is almost all acyclic
    and freed at once anyway. Afterwards everything is collected as usual.
    """
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


# -- latencies and outcomes -------------------------------------------------------------


@dataclass
class Latencies:
    """Per operation: every latency (ns) and every outcome ("201", "409 QueueFull", "error")."""

    samples: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    # (seconds since start, operation) of every answer, for throughput over time.
    timeline: list[tuple[float, str]] = field(default_factory=list)

    def record(self, operation: str, latency_ns: int, outcome: str, at_s: float) -> None:
        self.samples[operation].append(latency_ns)
        self.outcomes[operation][outcome] += 1
        self.timeline.append((at_s, operation))

    @property
    def errors(self) -> int:
        return sum(
            count
            for counts in self.outcomes.values()
            for outcome, count in counts.items()
            if outcome == "error" or outcome.startswith("5")
        )

    def summary(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for operation, samples in sorted(self.samples.items()):
            ordered = sorted(samples)
            result[operation] = {
                "count": len(ordered),
                "p50_ms": quantile_ms(ordered, 0.50),
                "p90_ms": quantile_ms(ordered, 0.90),
                "p99_ms": quantile_ms(ordered, 0.99),
                "max_ms": round(ordered[-1] / 1e6, 2) if ordered else None,
                "outcomes": dict(sorted(self.outcomes[operation].items())),
            }
        return result


def quantile_ms(sorted_ns: list[int], q: float) -> float | None:
    if not sorted_ns:
        return None
    index = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return round(sorted_ns[index] / 1e6, 2)


def outcome_of(status: int, body: Any) -> str:
    if status >= 400 and isinstance(body, dict) and "error" in body:
        return f"{status} {body['error']}"
    return str(status)


# -- the ledger and the database check ------------------------------------------------------


@dataclass
class Ledger:
    """The latest status each booking was acknowledged with, as the clients saw it."""

    acknowledged: dict[str, str] = field(default_factory=dict)

    def saw(self, booking: dict[str, Any]) -> None:
        self.acknowledged[booking["id"]] = booking["status"]


async def check_database(database_url: str | None, ledger: Ledger) -> dict[str, Any]:
    """``invariant_violations`` and ``lost_acks`` as PostgreSQL has them (None: not checked)."""
    if database_url is None:
        return {"invariant_violations": None, "lost_acks": None, "checked": False}
    connection = await asyncpg.connect(database_url)
    try:
        over_capacity = await connection.fetch(
            """SELECT s.id FROM slots s
               JOIN (SELECT slot_id, count(*) AS active FROM bookings
                     WHERE status IN ('RESERVED', 'CONFIRMED') GROUP BY slot_id) b
                 ON b.slot_id = s.id
               WHERE b.active > s.capacity OR s.confirmed_count + s.held_count > s.capacity"""
        )
        doubled = await connection.fetch(
            """SELECT user_id, slot_id FROM bookings WHERE status IN ('RESERVED', 'CONFIRMED')
               GROUP BY user_id, slot_id HAVING count(*) > 1"""
        )
        stored = dict(
            await connection.fetch(
                "SELECT id, status FROM bookings WHERE id = ANY($1::text[])",
                list(ledger.acknowledged),
            )
        )
    finally:
        await connection.close()
    lost = [
        booking_id
        for booking_id, status in ledger.acknowledged.items()
        if stored.get(booking_id) not in LATER_STATUSES.get(status, {status})
    ]
    return {
        "checked": True,
        "invariant_violations": len(over_capacity) + len(doubled),
        "slots_over_capacity": len(over_capacity),
        "users_with_two_active_bookings": len(doubled),
        "acknowledged_bookings": len(ledger.acknowledged),
        "lost_acks": len(lost),
        "lost_ack_examples": lost[:5],
    }

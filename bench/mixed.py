"""Mixed traffic over HTTP: reserve, confirm, cancel, queue join, position and leave
over 1,000 slots, at a fixed offered rate (open loop) or as fast as C clients go.

Every user is a small state machine driven by the answers it gets: an idle
user reserves a random slot (or joins its queue); with a hold it confirms;
with a booking it cancels; queued, it asks its position (and takes an offered
hold) or leaves. Open loop (default): a request is sent every ``1/rate``
seconds to a user that has nothing in flight, and its latency counts from the
time it was scheduled, so a server that falls behind shows it (no coordinated
omission). Over the unmeasured warm-up the rate climbs from 0 to ``rate``
(``sent_by``), so the server opens its connections and checks its users'
tokens as a rising load brings them, and the measured window is the steady
state at ``rate``. ``--clients C`` runs a closed loop instead: C clients, each sending
its next request when the previous one is answered, to find the maximum.

The per-user rate limits stay on; the user pool is large enough that they are
not what limits throughput. Afterwards the database is checked: no slot over
capacity, no user with two active bookings of one slot, every acknowledged
hold and confirmation present with its status or a later one.

Targets at 5,000/s offered on the 2-core machine: >= 99% achieved, p99 within
reserve 200 ms, queue join 100 ms, confirm 300 ms, position 50 ms, cancel
200 ms, 0 errors, 0 violations.

It must never drive a server off this machine, nor leave the database of the
run behind unless ``--keep-database`` asks.
"""

import argparse
import asyncio
import collections
import contextlib
import math
import os
import random
import secrets
import statistics
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench import _cpu
from bench import _http as h
from bench._machine import calibration_ms
from bench._progress import Progress, progress_bar
from bench._receivers import Received, webhook_receiver
from bench._report import add_report_argument, write_report
from bench._wire import Connection, WireError
from bench._worker import delivery_worker
from config.redis_client import is_sentinel_url
from persistence.sealing import format_key, new_key

P99_TARGETS_MS = {
    "reserve": 200.0,
    "queue_join": 100.0,
    "confirm": 300.0,
    "position": 50.0,
    "cancel": 200.0,
}
ACHIEVED_TARGET = 0.99
# Keep-alive connections of the load generator at most (as many clients).
CONNECTIONS_MAX = 2_000
# The open loop's scheduler wakes at most this often and sends what is due.
SCHEDULER_TICK_S = 0.001
# Shard actors of a started server with Ray (unless --shards).
MIXED_RAY_SHARDS = 1
# Roles of ``bench._cpu`` outside the started server: the services it uses, and
# the delivery worker of --notify-process (as if on another machine).
SERVICE_ROLES = frozenset({"postgres", "redis"})
APART_ROLES = frozenset({"delivery_worker"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Two gateway workers and the shards in an engine process of their own: the
    # configuration that answers 5,000 requests/s on two cores (one process serves
    # near 3,400-5,000/s). With Ray, one shard actor: on two cores more actors only
    # split the batches and the commits, as more shards do in the engine process
    # (closed loop, 200 clients: 356-390 us of server CPU a request with four actors,
    # 237-260 with one; docs/performance-notes.md).
    h.add_server_arguments(
        parser, engine="inproc", workers=2, several_engines=True, ray_shards=MIXED_RAY_SHARDS
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with several engines: how many times each runs, in turns (ray, inproc, ray, ...)",
    )
    parser.add_argument(
        "--notifications",
        type=_notification_modes,
        default="",
        help="on: a webhook endpoint subscribed to every event, on a local receiver, gets "
        "every change; off: SLOTENGINE_NOTIFICATIONS=false (no outbox); on,off: both, in "
        "turns, compared [the server's defaults: outbox and worker on, no endpoint]",
    )
    parser.add_argument(
        "--webhook-events",
        default="*",
        help="with --notifications on: the event types the endpoint subscribes to, "
        "comma-separated [*: every event, a webhook per change]",
    )
    parser.add_argument(
        "--notify-process",
        action="store_true",
        help="with --notifications on: the server runs no delivery worker (--no-notify) and "
        "a `slotengine notify` process of the bench's delivers, its CPU counted apart "
        "(delivery_worker_cpu_us_per_request): what the server's machine pays when the "
        "workers run elsewhere",
    )
    parser.add_argument("--rate", type=float, default=5_000, help="requests/s offered")
    parser.add_argument("--clients", type=int, default=0, help="closed loop with C clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=5.0,
        help="unmeasured start (open loop: the rate climbs from 0 to --rate over it)",
    )
    parser.add_argument("--slots", type=int, default=1_000, help="slots (default 1000)")
    parser.add_argument("--capacity", type=int, default=5, help="capacity of each slot")
    parser.add_argument("--users", type=int, default=20_000, help="the user pool")
    parser.add_argument("--seed", type=int, default=1)
    add_report_argument(parser)


NOTIFICATION_MODES = ("on", "off")


def _notification_modes(value: str) -> str:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if any(name not in NOTIFICATION_MODES for name in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{value!r}: on, off, or on,off")
    return ",".join(names)


class User:
    __slots__ = ("booking", "name", "slot", "state", "token")

    def __init__(self, name: str, token: bytes) -> None:
        self.name = name
        self.token = token
        self.state = "idle"  # idle | held | booked | queued
        self.slot: str | None = None
        self.booking: str | None = None


class Mixed:
    def __init__(
        self,
        target: h.Target,
        slots: list[str],
        users: list[User],
        seed: int,
    ) -> None:
        address = urlsplit(target.base)
        self.host, self.port = address.hostname or "127.0.0.1", address.port or 80
        # Idle keep-alive connections; a request takes one (or opens one, up to
        # CONNECTIONS_MAX) and gives it back; past the limit it waits for one.
        self.connections: list[Connection] = []
        self.open_connections = 0
        self.connection_waiters: collections.deque[asyncio.Future[Connection]] = collections.deque()
        self.slots = slots
        self.idle_users = list(users)
        self.random = random.Random(seed)
        self.latencies = h.Latencies()
        # Per measured request: from its scheduled time to its write (waiting for a
        # connection included); latencies count from the scheduled time.
        self.send_lags_ns: list[int] = []
        self.ledger = h.Ledger()
        self.measuring_since: float | None = None
        self.skipped = 0
        # Every request answered (or failed), warm-up included: the CPU per request
        # divides the CPU of the whole load by it.
        self.completed = 0
        self.progress: Progress | None = None

    def take_user(self) -> User | None:
        users = self.idle_users
        if not users:
            return None
        index = self.random.randrange(len(users))
        users[index], users[-1] = users[-1], users[index]
        return users.pop()

    async def act(self, user: User, scheduled: float) -> None:
        try:
            operation, method, path, body = self._next_request(user)
            connection = await self._connection()
            if self.measuring_since is not None and scheduled >= self.measuring_since:
                # How late the load generator itself sent it: its share of the latency.
                self.send_lags_ns.append(int((time.perf_counter() - scheduled) * 1e9))
            try:
                status, payload = await connection.request(method, path, user.token, body)
                outcome = h.outcome_of(status, payload)
                self._give_back(connection)
            except (WireError, OSError, ValueError):
                connection.close()
                self.open_connections -= 1
                if self.connection_waiters:
                    self._give_back(self._new_connection())
                status, payload, outcome = 0, None, "error"
            now = time.perf_counter()
            if self.measuring_since is not None and scheduled >= self.measuring_since:
                self.latencies.record(
                    operation, int((now - scheduled) * 1e9), outcome, now - self.measuring_since
                )
            self._advance(user, operation, status, payload)
            self.completed += 1
            if self.progress is not None:
                self.progress.update()
                if outcome == "error" or outcome.startswith("5"):
                    self.progress.set_postfix(errors=self.latencies.errors, refresh=False)
        finally:
            self.idle_users.append(user)

    async def _connection(self) -> Connection:
        """An idle connection, a new one while fewer than CONNECTIONS_MAX are open, else
        the next one given back (first come, first served).

        A bounded pool, as a fixed set of clients has: when the server falls
        behind, requests wait for a connection (and the wait counts in their
        latency) instead of opening thousands more, whose handshakes would
        overflow the server's accept queue and stall for the kernel's retries.
        """
        if self.connections:
            return self.connections.pop()
        if self.open_connections < CONNECTIONS_MAX:
            return self._new_connection()
        waiter: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self.connection_waiters.append(waiter)
        return await waiter

    def _new_connection(self) -> Connection:
        self.open_connections += 1
        return Connection(self.host, self.port)

    def _give_back(self, connection: Connection) -> None:
        while self.connection_waiters:
            waiter = self.connection_waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self.connections.append(connection)

    def _next_request(self, user: User) -> tuple[str, str, str, Any]:
        if user.state == "held":
            return "confirm", "POST", f"/api/bookings/{user.booking}/confirm", None
        if user.state == "booked":
            return ("cancel", "POST", f"/api/bookings/{user.booking}/cancel",
                    {"reason": "plans changed"})  # fmt: skip
        if user.state == "queued":
            if self.random.random() < 0.75:
                return "position", "GET", f"/api/slots/{user.slot}/queue/position", None
            return "leave", "DELETE", f"/api/slots/{user.slot}/queue", None
        user.slot = self.random.choice(self.slots)
        if self.random.random() < 0.2:
            return "queue_join", "POST", f"/api/slots/{user.slot}/queue", None
        return "reserve", "POST", "/api/bookings/reserve", {"slotId": user.slot}

    def _advance(self, user: User, operation: str, status: int, payload: Any) -> None:
        if status in {0, 429} or status >= 500:
            return  # try the same step again later
        if operation == "reserve":
            if status in (200, 201):
                self.ledger.saw(payload["booking"])
                user.state, user.booking = "held", payload["booking"]["id"]
            elif status == 202:
                user.state = "queued"
            else:
                user.state = "idle"
        elif operation == "queue_join":
            user.state = "queued" if status in (200, 201) else "idle"
        elif operation == "confirm":
            if status == 200:
                self.ledger.saw(payload)
                user.state = "booked"
            else:
                user.state = "idle"
        elif operation == "cancel":
            if status == 200:
                self.ledger.saw(payload)
            user.state = "idle"
        elif operation == "position":
            if status != 200:
                user.state = "idle"
            elif payload["status"] == "NOTIFIED" and payload["bookingId"]:
                user.state, user.booking = "held", payload["bookingId"]
            elif payload["status"] != "WAITING":
                user.state = "idle"
        elif operation == "leave":
            user.state = "idle"


async def _create_slots(session: aiohttp.ClientSession, target: h.Target, count: int,
                        capacity: int) -> list[str]:  # fmt: skip
    base = h.tomorrow()
    gate = asyncio.Semaphore(50)

    async def create(n: int) -> str:
        async with gate:
            start = base + h.SLOT_LENGTH * (n % 48)
            return await h.create_slot(session, target, f"mixed-{n}", capacity, start)

    return list(await asyncio.gather(*(create(n) for n in range(count))))


def send_lag_ms(lags_ns: list[int]) -> dict[str, float | None]:
    """p50 / p99 / max of how late requests left the load generator."""
    ordered = sorted(lags_ns)
    return {
        "p50": h.quantile_ms(ordered, 0.50),
        "p99": h.quantile_ms(ordered, 0.99),
        "max": h.quantile_ms(ordered, 1.0),
    }


def sent_by(elapsed_s: float, rate: float, warmup_s: float) -> int:
    """Requests the open loop has sent ``elapsed_s`` into the run.

    The offered rate climbs linearly from 0 to ``rate`` over the warm-up, then
    holds: the server meets its connections and its users' tokens as a real
    day would bring them, not two thousand connections in the first second,
    and what the measured window sees is the steady state at ``rate``.
    """
    if elapsed_s <= 0:
        return 0
    if elapsed_s < warmup_s:
        return int(rate * elapsed_s * elapsed_s / (2 * warmup_s))
    return int(rate * (warmup_s / 2 + elapsed_s - warmup_s))


def scheduled_at(index: int, rate: float, warmup_s: float) -> float:
    """When the ``index``-th request (from 0) is due, in seconds into the run: ``sent_by``'s
    inverse."""
    ramp_requests = rate * warmup_s / 2
    if index < ramp_requests:
        return math.sqrt(2 * warmup_s * index / rate)
    return warmup_s + (index - ramp_requests) / rate


async def _open_loop(mixed: Mixed, rate: float, warmup_s: float, seconds_s: float) -> None:
    start = time.perf_counter()
    end = start + warmup_s + seconds_s
    mixed.measuring_since = start + warmup_s
    tasks: set[asyncio.Task[None]] = set()
    sent = 0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        due = sent_by(now - start, rate, warmup_s) + 1
        while sent < due:
            scheduled = start + scheduled_at(sent, rate, warmup_s)
            sent += 1
            user = mixed.take_user()
            if user is None:
                mixed.skipped += 1
                continue
            task = asyncio.create_task(mixed.act(user, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        # At least a tick: the event loop's timers round a shorter wait to none,
        # and the generator would spin between sends, taking the server's CPU.
        # Each request's latency still counts from its own scheduled time.
        next_at = start + scheduled_at(sent, rate, warmup_s)
        await asyncio.sleep(max(SCHEDULER_TICK_S, next_at - time.perf_counter()))
    await asyncio.gather(*tasks)


async def _closed_loop(mixed: Mixed, clients: int, warmup_s: float, seconds_s: float) -> None:
    start = time.perf_counter()
    end = start + warmup_s + seconds_s
    mixed.measuring_since = start + warmup_s

    async def client() -> None:
        while time.perf_counter() < end:
            user = mixed.take_user()
            if user is None:
                await asyncio.sleep(0.001)
                continue
            await mixed.act(user, time.perf_counter())

    await asyncio.gather(*(client() for _ in range(clients)))


async def _run_one(args: argparse.Namespace) -> dict[str, Any]:
    mode = args.notifications or None
    received = Received()
    async with contextlib.AsyncExitStack() as stack:
        env: dict[str, str] = {}
        hook_url = None
        if mode == "on":
            hook_url = await stack.enter_async_context(webhook_receiver(received))
            env = {"SLOTENGINE_NOTIFICATIONS": "true", "SLOTENGINE_WEBHOOK_ALLOW_PRIVATE": "true"}
            if args.notify_process:
                # The server and the worker unseal the endpoint's secret with one key.
                env["SLOTENGINE_DATA_KEY"] = format_key(new_key("bench"))
        elif mode == "off":
            env = {"SLOTENGINE_NOTIFICATIONS": "false"}
        result = await _measure(args, env, hook_url, mode == "on" and args.notify_process)
    result["notifications"] = mode
    if mode == "on":
        result["webhook_events"] = args.webhook_events
        result["webhooks_received"] = len(received.webhooks)
        result["notify_process"] = args.notify_process
    return result


async def _measure(
    args: argparse.Namespace, env: dict[str, str], hook_url: str | None, notify_process: bool
) -> dict[str, Any]:
    run_name = f"mixed_{secrets.token_hex(4)}"
    async with contextlib.AsyncExitStack() as stack:
        target = await stack.enter_async_context(
            h.target(args, run_name, env, ["--no-notify"] if notify_process else [])
        )
        worker_pid = None
        if notify_process:
            assert target.database_url is not None and target.log_path is not None
            worker = await stack.enter_async_context(
                delivery_worker(
                    {**os.environ, **env, "DATABASE_URL": target.database_url,
                     "SLOTENGINE_LOG_LEVEL": "warning"},
                    target.log_path.with_suffix(".worker.log"),
                )
            )  # fmt: skip
            worker_pid = worker.pid
        return await _measure_on(args, target, hook_url, worker_pid)


async def _measure_on(
    args: argparse.Namespace, target: h.Target, hook_url: str | None, worker_pid: int | None
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=CONNECTIONS_MAX, limit_per_host=CONNECTIONS_MAX)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        if hook_url is not None:
            async with session.post(
                f"{target.base}/api/admin/webhooks",
                headers=target.headers("bench", "admin"),
                json={"url": hook_url, "events": args.webhook_events.split(",")},
            ) as created:
                assert created.status == 201, await created.text()
        slots = await _create_slots(session, target, args.slots, args.capacity)
        users = [User(f"mixed-{n}", target.token(f"mixed-{n}").encode()) for n in range(args.users)]
        mixed = Mixed(target, slots, users, args.seed)
        watch = _cpu_watch(target)
        if worker_pid is not None:
            watch.named[worker_pid] = "delivery_worker"
        cpu_before = h.self_cpu_seconds()
        by_role_before = watch.sample()
        wall_before = time.perf_counter()
        planned = sent_by(args.warmup_seconds + args.seconds, args.rate, args.warmup_seconds)
        mixed.progress = progress_bar(
            total=None if args.clients else planned, desc="mixed", unit="req", mininterval=0.5
        )
        with h.load_generator_collector():
            if args.clients:
                await _closed_loop(mixed, args.clients, args.warmup_seconds, args.seconds)
            else:
                await _open_loop(mixed, args.rate, args.warmup_seconds, args.seconds)
        wall_s = time.perf_counter() - wall_before
        loadgen_cpu_s = h.self_cpu_seconds() - cpu_before
        by_role = _cpu.spent(by_role_before, watch.sample())
        mixed.progress.close()
        for connection in mixed.connections:
            connection.close()
    check = await h.check_database(target.database_url, mixed.ledger)
    summary = mixed.latencies.summary()
    answered = sum(op["count"] for op in summary.values())
    throughput = answered / args.seconds
    p99_ok = all(
        summary.get(op, {}).get("p99_ms") is not None and summary[op]["p99_ms"] <= target_ms
        for op, target_ms in P99_TARGETS_MS.items()
    )
    errors = mixed.latencies.errors
    offered = None if args.clients else args.rate
    achieved_ok = offered is None or throughput >= ACHIEVED_TARGET * offered
    server_cpu_s = sum(
        role["cpu_s"]
        for name, role in by_role.items()
        if name not in SERVICE_ROLES and name not in APART_ROLES
    )
    worker_cpu_s = sum(role["cpu_s"] for name, role in by_role.items() if name in APART_ROLES)
    services_cpu_s = sum(role["cpu_s"] for name, role in by_role.items() if name in SERVICE_ROLES)
    per_request = 1e6 / max(1, mixed.completed)
    for role in by_role.values():
        role["us_per_request"] = round(role["cpu_s"] * per_request, 1)
    result = {
        "scenario": "mixed",
        "mode": "closed" if args.clients else "open",
        "engine": args.engine,
        "workers": args.workers,
        "shards": None if args.url else h.shard_count(args),
        "offered_rps": offered,
        "clients": args.clients or None,
        "throughput_rps": round(throughput, 1),
        "seconds": args.seconds,
        "operations": summary,
        "p99_targets_ms": P99_TARGETS_MS,
        "errors": errors,
        "skipped_no_idle_user": mixed.skipped,
        "loadgen_cpu_s": round(loadgen_cpu_s, 2),
        "loadgen_cpu_share": round(loadgen_cpu_s / (wall_s * 2), 3),
        "loadgen_send_lag_ms": send_lag_ms(mixed.send_lags_ns),
        "server_cpu_s": round(server_cpu_s, 2),
        "requests_completed": mixed.completed,
        # The started server's processes, then PostgreSQL's (the run database's
        # backends and the server's own processes) and Redis's, per request answered
        # over the whole load (warm-up included).
        "server_cpu_us_per_request": round(server_cpu_s * per_request, 1),
        "services_cpu_us_per_request": round(services_cpu_s * per_request, 1),
        # --notify-process: the bench's own delivery worker, not counted above.
        "delivery_worker_cpu_us_per_request": round(worker_cpu_s * per_request, 1),
        "cpu_by_process": by_role,
        **check,
        "meets_target": achieved_ok
        and p99_ok
        and errors == 0
        and check["invariant_violations"] == 0
        and check["lost_acks"] == 0,
    }
    if args.report:
        files = write_report(args.report, "mixed", result, mixed.latencies)
        result["report"] = [str(path) for path in files]
    return result


def _cpu_watch(target: h.Target) -> _cpu.CpuByRole:
    address = urlsplit(target.base)
    database = urlsplit(target.database_url).path.lstrip("/") if target.database_url else None
    # Through Sentinel the master may move: its CPU is not watched.
    redis_port = (
        urlsplit(target.redis_url).port
        if target.redis_url and not is_sentinel_url(target.redis_url)
        else None
    )
    return _cpu.CpuByRole(
        target.server.pid if target.server is not None else None,
        address.port,
        database,
        redis_port,
    )


def _variant(engine: str, mode: str, engines: int, modes: int) -> str:
    """A run's name in a comparison: what differs between the runs."""
    if modes == 1:
        return engine
    named = f"notifications {mode}"
    return named if engines == 1 else f"{engine}, {named}"


def _compare(runs: list[dict[str, Any]], engines: list[str]) -> dict[str, Any]:
    """Each variant's (engine's, notification mode's) throughput over its runs, and every
    other one's against the last one's: per round (the runs taken in turns) and of the
    medians."""
    by_engine: dict[str, list[dict[str, Any]]] = {engine: [] for engine in engines}
    for one in runs:
        by_engine[one.get("variant", one["engine"])].append(one)
    engines_summary: dict[str, Any] = {}
    for engine, own in by_engine.items():
        throughputs = [one["throughput_rps"] for one in own]
        engines_summary[engine] = {
            "throughput_rps": throughputs,
            "throughput_median_rps": statistics.median(throughputs),
            "server_cpu_us_per_request": [one["server_cpu_us_per_request"] for one in own],
            "services_cpu_us_per_request": [one["services_cpu_us_per_request"] for one in own],
        }
    ratios: dict[str, Any] = {}
    base = engines[-1]
    for engine in engines[:-1]:
        pairs = zip(by_engine[engine], by_engine[base], strict=True)
        ratios[f"{engine}/{base}"] = {
            "per_round": [
                round(one["throughput_rps"] / max(0.1, other["throughput_rps"]), 3)
                for one, other in pairs
            ],
            "of_medians": round(
                engines_summary[engine]["throughput_median_rps"]
                / max(0.1, engines_summary[base]["throughput_median_rps"]),
                3,
            ),
        }
    return {"engines": engines_summary, "throughput_ratio": ratios}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    engines = args.engine.split(",")
    modes = args.notifications.split(",") if args.notifications else [""]
    if len(engines) == 1 and len(modes) == 1:
        return await _run_one(args)
    if args.url:
        raise SystemExit("--url serves one engine: name one with --engine")
    # Every engine with every notification mode, in turns.
    variants = [(engine, mode) for engine in engines for mode in modes]
    names = [_variant(engine, mode, len(engines), len(modes)) for engine, mode in variants]
    runs: list[dict[str, Any]] = []
    for _ in range(max(1, args.rounds)):
        for (engine, mode), name in zip(variants, names, strict=True):
            # The machine's speed just before each run: runs of one invocation compare by it.
            calibration = calibration_ms()
            one = await _run_one(
                argparse.Namespace(**{**vars(args), "engine": engine, "notifications": mode})
            )
            one["calibration_before_ms"] = calibration
            one["variant"] = name
            runs.append(one)
            print(
                f"mixed {name}: {one['throughput_rps']} req/s, server "
                f"{one['server_cpu_us_per_request']} us/request (calibration {calibration} ms)",
                file=sys.stderr,
                flush=True,
            )
    return {
        "scenario": "mixed",
        "mode": "closed" if args.clients else "open",
        "compare": names,
        **_compare(runs, names),
        "meets_target": all(one["meets_target"] for one in runs),
        "runs": runs,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_run(args))

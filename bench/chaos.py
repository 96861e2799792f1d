"""Chaos soak: faults injected at random under load, the ledger and the database checked after each.

It owns every service it breaks: a PostgreSQL of its own (``PrivatePostgres``,
a fresh cluster on a free port), a Redis of its own (``--redis sentinel``, the
default: a master, a replica and three sentinels, ``SentinelGroup``, reached
through a ``redis+sentinel://`` URL; ``--redis single``: one ``PrivateRedis``;
no persistence either way), and its own engine: a local Ray (``ray.init`` on a
temporary directory; ``RAY_ADDRESS`` is ignored) on which ``--shards`` durable
shard actors hold short Redis leases (``--lease-ms``) and write behind to that
PostgreSQL, or with ``--engine process`` the shards in one engine process
(``bench._engine_process``) reached over its Unix socket, with the same
leases. Callers reserve, confirm, cancel, join and leave queues through the
engine's client, keeping a ledger of every change they were acknowledged (the
failover scenario's); one prober per shard makes a change on a slot of its
shard (a hold, then its release) every ``PROBE_EVERY_S``.

Each of ``--cycles`` cycles picks a fault at random (the order is fixed by
``--seed``) among ``--faults``:

- ``actor_kill`` (``--engine ray``): SIGKILL of one shard actor's process (Ray
  restarts it);
- ``engine_kill`` (``--engine process``): SIGKILL of the engine process that
  serves every shard, and another started at once on its socket (as ``serve``
  restarts it), whose shards wait for the dead one's leases to lapse;
- ``owner_pause``: SIGSTOP of one shard actor's process (of the engine process,
  with ``--engine process``) for longer than its
  lease (``--lease-ms`` plus ``--pause-extra-ms``); meanwhile a new owner in
  this process takes the shard over (the lapsed lease, a newer fencing token,
  a reload), makes ``CONTENDER_CHANGES`` changes (in the ledger like every
  other) and hands the lease back; then SIGCONT: the old owner, whose token is
  out of date, must not write, and must take the shard again with a new token
  before it serves;
- ``postgres_restart``: an immediate stop of PostgreSQL (every process quits at
  once, crash recovery at the next start) and a start on the same port;
- ``redis_restart``: SIGKILL of Redis (the master) and a start on the same port
  at once, empty (no lease, no token counter; a replica resyncs from it);
- ``redis_failover`` (``--redis sentinel`` only): SIGKILL of the master; the
  sentinels promote the replica. Once recovered, the lost master starts again
  as the new master's replica, so that the next failover has one.

A fault ends when what the soak does is done: at once for a kill, at the
SIGCONT for a pause, once the server answers again for a restart, once a
quorum of sentinels names the new master for a failover. After each fault it
waits for the recovery (every shard makes a change again, one sent after the
fault ended) and checks PostgreSQL: every acknowledged change there at its
status or a later one (``lost_acks``), no slot over capacity, no user with two
active bookings of a slot (``double_bookings``), and the reconciliation checks
of ``persistence.checks``. It reports the cycles, per fault kind the recovery
time (from the injection to the last shard's first change sent after the fault
ended; ``p50``, ``max``) and the outage (the longest any shard went without an
acknowledged change meanwhile), and the totals. The target: every recovery
within ``TARGET_RECOVERY_S``, 0 lost acks, 0 violations.

It must never touch a PostgreSQL, Redis or Ray it did not start, and it stops
all of them, paused processes included, at its end (also on SIGTERM).
"""

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from engine.core import protocol as p
from persistence.services.sentinel import SentinelGroup

FAULTS: Final = (
    "engine_kill",
    "actor_kill",
    "owner_pause",
    "postgres_restart",
    "redis_restart",
    "redis_failover",
)
# What each engine can do: shard actors are Ray's, the engine process is --engine process's.
ENGINE_FAULTS: Final = {
    "ray": tuple(kind for kind in FAULTS if kind != "engine_kill"),
    "process": tuple(kind for kind in FAULTS if kind != "actor_kill"),
}
# The faults that strike one shard (drawn at random); the others strike them all.
SHARD_FAULTS: Final = ("actor_kill", "owner_pause")
PROBE_EVERY_S: Final = 0.05
TARGET_RECOVERY_S: Final = 10.0
RAY_NAMESPACE: Final = "slotengine-chaos"
SHARDS_START_TIMEOUT_MS: Final = 180_000
IDENTITY_TIMEOUT_MS: Final = 60_000
DRAIN_TIMEOUT_S: Final = 60.0
# The owners' lease timing, scaled from --lease-ms as the degradation tests set it.
LEASE_MARGIN_SHARE: Final = 0.2
LEASE_RENEW_SHARE: Final = 0.2
REBUILD_RETRY_MS: Final = 200
# owner_pause: the changes the new owner makes while the old one is paused, and how
# long its start and those changes may take.
CONTENDER_CHANGES: Final = 3
CONTENDER_TIMEOUT_S: Final = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cycles", type=int, default=200, help="faults injected (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the faults and callers")
    parser.add_argument(
        "--faults",
        default=None,
        help="the fault kinds drawn from, comma-separated (default: all the engine and the"
        f" Redis allow: {','.join(ENGINE_FAULTS['ray'])} with --engine ray; engine_kill"
        " instead of actor_kill with --engine process; no redis_failover with --redis single)",
    )
    parser.add_argument(
        "--engine",
        choices=("ray", "process"),
        default="ray",
        help="shard actors on a Ray of the run's own (default), or the shards in one engine"
        " process of the run's own reached over its Unix socket, as serve --engine inproc"
        " --workers N runs them",
    )
    parser.add_argument(
        "--redis",
        choices=("sentinel", "single"),
        default="sentinel",
        help="a master, a replica and three sentinels (default), or one Redis",
    )
    parser.add_argument("--shards", type=int, default=2, help="shard actors (default 2)")
    parser.add_argument("--concurrency", type=int, default=8, help="callers (default 8)")
    parser.add_argument(
        "--slots-per-shard", type=int, default=4, help="load slots on each shard (default 4)"
    )
    parser.add_argument("--capacity", type=int, default=2, help="load slots' capacity (default 2)")
    parser.add_argument(
        "--lease-ms", type=int, default=1_500, help="the owners' lease TTL (default 1500)"
    )
    parser.add_argument(
        "--pause-extra-ms",
        type=int,
        default=1_000,
        help="an owner_pause lasts the lease TTL plus this (default 1000)",
    )
    parser.add_argument(
        "--steady-seconds",
        type=float,
        default=0.5,
        help="load between a recovery and the next fault (default 0.5)",
    )
    parser.add_argument(
        "--recovery-timeout-s",
        type=float,
        default=60.0,
        help="a fault not recovered from within this counts as not recovered (default 60)",
    )


def fault_plan(seed: int, cycles: int, kinds: list[str]) -> list[str]:
    """The faults of a run, in order: the same for the same seed. Every kind comes
    once in each round of ``len(kinds)`` cycles, in an order drawn per round."""
    rng = random.Random(seed)
    plan: list[str] = []
    while len(plan) < cycles:
        round_ = list(kinds)
        rng.shuffle(round_)
        plan += round_
    return plan[:cycles]


def parse_faults(value: str | None, redis: str = "sentinel", engine: str = "ray") -> list[str]:
    """The fault kinds of ``--faults`` (None: every kind the engine and Redis allow)."""
    allowed = [
        kind for kind in ENGINE_FAULTS[engine] if redis == "sentinel" or kind != "redis_failover"
    ]
    if value is None:
        return allowed
    kinds = [kind.strip() for kind in value.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in allowed]
    if not kinds or unknown:
        raise SystemExit(
            f"--faults: one or more of {', '.join(allowed)} (with --engine {engine}"
            f" --redis {redis}), not {value!r}"
        )
    return kinds


class EngineProcess:
    """The shards in a process of the run's own (``bench._engine_process``), served on
    a Unix socket; killed as a fault and started again on the same socket."""

    def __init__(self, directory: Path, shards: int, storage: Any) -> None:
        import msgspec

        self.path = str(directory / "engine.sock")
        self.log_path = directory / "engine.log"
        self.shards = shards
        self.storage_json = msgspec.json.encode(storage).decode()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a killed process leaves its socket file
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench._engine_process", self.path, str(self.shards),
                 self.storage_json],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
                self.process.kill()
            self.process.wait()


# -- the probers: one change per shard, over and over -----------------------------


@dataclass
class Probes:
    """When each shard last made a change: (sent, answered) of every probe hold acknowledged."""

    served: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    # What a probe raised instead of an answer (anything but the 503s the ledger counts).
    errors: list[str] = field(default_factory=list)

    def longest_gap(self, shard: int, start: float, end: float) -> float:
        """The longest ``shard`` went without a change acknowledged between ``start`` and
        ``end``: from the last answer before each gap (or ``start``) to the next one."""
        answers = [answered for _, answered in self.served.get(shard, [])]
        before = [at for at in answers if at < start]
        previous = before[-1] if before else start
        longest = 0.0
        for at in answers:
            if start <= at <= end:
                longest = max(longest, at - previous)
                previous = at
        return round(longest, 3)

    def first_after(self, shard: int, since: float) -> float | None:
        """When the first change of ``shard`` sent at ``since`` or later was answered."""
        for sent, answered in self.served.get(shard, []):
            if sent >= since:
                return answered
        return None


async def change_prober(load: Any, probes: Probes, shard: int, slot_id: str) -> None:
    """A hold on ``slot_id`` by a new user each time, released at once: a change of the
    shard, acknowledged or not, as often as it answers."""
    served = probes.served.setdefault(shard, [])
    n = 0
    while not load.stopping.is_set():
        n += 1
        user = f"probe-{shard}-{n}"
        sent = time.monotonic()
        try:
            held = await load.execute(
                p.Reserve(request_id=load.ids.next(), slot_id=slot_id, user_id=user), slot_id
            )
            if isinstance(held, p.BookingResult) and held.status == 201:
                served.append((sent, time.monotonic()))
                await load.execute(
                    p.ReleaseHold(
                        request_id=load.ids.next(), booking_id=held.booking.id, user_id=user
                    ),
                    held.booking.id,
                )
        except Exception as error:  # the prober must outlive anything a fault raises
            probes.errors.append(f"shard {shard}: {error!r}")
            print(f"prober of shard {shard}: {error!r}", file=sys.stderr, flush=True)
        await asyncio.sleep(PROBE_EVERY_S)


# -- the faults ----------------------------------------------------------------------


@dataclass
class Contender:
    """What a new owner needs to take a paused owner's shard over: the owners' storage
    and domains, each shard's probe slot, and the ledger its answers go to."""

    storage: Any
    policies: dict[str, Any]
    shard_count: int
    probe_slots: list[str]
    load: Any
    # How many changes new owners were acknowledged, and how many takeovers failed.
    acknowledged: int = 0
    failed: int = 0

    async def take_over(self, shard: int, changes: int = CONTENDER_CHANGES) -> None:
        """A new owner of ``shard`` in this process: it takes the lapsed lease with a
        newer fencing token, loads the shard, makes ``changes`` changes (holds on the
        probe slot, each released: in the ledger like every other answer) and closes,
        handing the lease back."""
        from engine.shell.clock import SystemClock
        from engine.shell.owner import ShardOwner

        codec = p.BatchCodec()
        owner = ShardOwner(
            shard_id=shard,
            shard_count=self.shard_count,
            policies=self.policies,
            clock=SystemClock(),
            storage=self.storage,
        )

        async def one(command: p.AnyCommand) -> p.AnyResult:
            reply = await owner.execute_batch(codec.encode_batch([command]))
            result = codec.decode_reply(reply)[0]
            self.load.ledger.record(command, result)
            return result

        try:
            async with asyncio.timeout(CONTENDER_TIMEOUT_S):
                await owner.start()
                slot_id = self.probe_slots[shard]
                for n in range(changes):
                    user = f"contender-{shard}-{self.load.ids.next()}-{n}"
                    held = await one(
                        p.Reserve(request_id=self.load.ids.next(), slot_id=slot_id, user_id=user)
                    )
                    if isinstance(held, p.BookingResult) and held.status == 201:
                        self.acknowledged += 1
                        await one(
                            p.ReleaseHold(
                                request_id=self.load.ids.next(),
                                booking_id=held.booking.id,
                                user_id=user,
                            )
                        )
        except (TimeoutError, OSError, RuntimeError) as error:
            self.failed += 1
            print(f"a new owner of shard {shard} did not serve: {error!r}", file=sys.stderr)
        finally:
            with contextlib.suppress(Exception):
                await owner.close()


@dataclass
class Services:
    """What the soak breaks: its PostgreSQL, its Redis, its shard actors."""

    postgres: Any
    redis: Any
    transport: Any
    lease_ms: int
    pause_extra_ms: int
    contender: Contender
    engine: EngineProcess | None
    # Processes stopped and not yet continued: continued (or killed) at the end.
    stopped: set[int] = field(default_factory=set)

    async def actor_pid(self, shard: int) -> int:
        """The process serving ``shard``: its actor's, or the engine process."""
        if self.engine is not None:
            return self.engine.pid
        identity = await self.transport.identity(shard, IDENTITY_TIMEOUT_MS)
        return int(identity.pid)

    async def engine_kill(self, shard: int) -> None:
        """SIGKILL of the engine process; another starts at once (as ``serve`` restarts
        it), whose shards wait for the dead one's leases to lapse."""
        assert self.engine is not None
        await asyncio.to_thread(self.engine.kill)
        await asyncio.to_thread(self.engine.start)

    async def actor_kill(self, shard: int) -> None:
        os.kill(await self.actor_pid(shard), signal.SIGKILL)

    async def owner_pause(self, shard: int) -> None:
        pid = await self.actor_pid(shard)
        os.kill(pid, signal.SIGSTOP)
        self.stopped.add(pid)
        try:
            await asyncio.sleep((self.lease_ms + self.pause_extra_ms) / 1000)
            # Its lease lapsed: a new owner takes the shard, serves and hands it back
            # before the paused one wakes, whose fencing token is then out of date.
            await self.contender.take_over(shard)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.stopped.discard(pid)

    async def postgres_restart(self, shard: int) -> None:
        await self.postgres.arestart("immediate")

    async def redis_restart(self, shard: int) -> None:
        if isinstance(self.redis, SentinelGroup):
            await asyncio.to_thread(self.redis.restart_master)
        else:
            await self.redis.arestart("kill")

    async def redis_failover(self, shard: int) -> None:
        """The master killed, and the sentinels' failover: ends once they name the replica."""
        await asyncio.to_thread(self.redis.kill_master)
        await self.redis.promoted()

    async def heal(self, kind: str) -> None:
        """After the recovery from ``kind``: what the next fault needs back (a failed-over
        group's lost master, as the new master's replica)."""
        if kind == "redis_failover":
            await asyncio.to_thread(self.redis.rejoin)

    def fault(self, kind: str) -> Callable[[int], Awaitable[None]]:
        method: Callable[[int], Awaitable[None]] = getattr(self, kind)
        return method

    def release_stopped(self) -> None:
        for pid in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stopped.clear()


@dataclass
class Cycle:
    kind: str
    shard: int | None
    recovery_s: float | None
    outage_s: float | None
    lost_acks: int
    violations: int


async def wait_recovered(
    probes: Probes, shards: int, injected_at: float, ended_at: float, timeout_s: float
) -> float | None:
    """Seconds from the injection until every shard made a change sent after the fault
    ended; None if one did not within ``timeout_s`` of its end."""
    deadline = ended_at + timeout_s
    while True:
        answered = [probes.first_after(shard, ended_at) for shard in range(shards)]
        if all(at is not None for at in answered):
            return max(at for at in answered if at is not None) - injected_at
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(PROBE_EVERY_S / 2)


def summarise(cycles: list[Cycle], kinds: list[str]) -> dict[str, Any]:
    """Per fault kind: how many, and the recovery's p50 and max (None: one not recovered)."""
    by_kind: dict[str, Any] = {}
    for kind in kinds:
        times = [c.recovery_s for c in cycles if c.kind == kind]
        measured = sorted(t for t in times if t is not None)
        outages = sorted(c.outage_s for c in cycles if c.kind == kind and c.outage_s is not None)
        by_kind[kind] = {
            "count": len(times),
            "not_recovered": len(times) - len(measured),
            "recovery_p50_s": round(statistics.median(measured), 3) if measured else None,
            "recovery_max_s": measured[-1] if measured else None,
            "outage_p50_s": round(statistics.median(outages), 3) if outages else None,
            "outage_max_s": outages[-1] if outages else None,
        }
    return by_kind


def human_summary(result: dict[str, Any]) -> str:
    lines = [
        f"chaos: {result['cycles']} cycles (seed {result['seed']}), "
        f"{result['acknowledged_changes']} acknowledged changes, "
        f"{result['requests_503']} answers 503",
        f"{'fault':<18}{'count':>6}{'recovery p50 s':>16}{'max s':>8}"
        f"{'outage p50 s':>14}{'max s':>8}{'not recovered':>15}",
    ]

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for kind, figures in result["faults"].items():
        lines.append(
            f"{kind:<18}{figures['count']:>6}{shown(figures['recovery_p50_s']):>16}"
            f"{shown(figures['recovery_max_s']):>8}{shown(figures['outage_p50_s']):>14}"
            f"{shown(figures['outage_max_s']):>8}{figures['not_recovered']:>15}"
        )
    lines.append(
        f"lost acks {result['lost_acks']}, slots over capacity {result['slots_over_capacity']},"
        f" double bookings {result['double_bookings']}, violations {result['violations']}"
        f" (reconciliation: {result['reconcile_findings'] or 'none'});"
        f" every recovery within {TARGET_RECOVERY_S:g} s: {result['recoveries_within_target']}"
    )
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------


async def soak(args: argparse.Namespace, postgres: Any, redis: Any) -> dict[str, Any]:
    """The load, the faults and the checks, on the PostgreSQL and Redis already started."""
    import asyncpg

    from bench._ledger import Ledger, Load, check_database, resource_on
    from bench.ray import create_slot
    from config.domains import load_policies
    from config.settings import load_settings
    from engine.shell.coalescer import EngineClient, RequestIds
    from engine.shell.local_engine import LocalEngineTransport
    from engine.shell.owner import StorageSettings
    from engine.shell.ray_actor import RayShardTransport
    from persistence.migrate import migrate_url
    from persistence.partitioning import establish_partitions

    kinds = parse_faults(args.faults, args.redis, args.engine)
    plan = fault_plan(args.seed, args.cycles, kinds)
    database_url = postgres.url
    await migrate_url(database_url)
    connection = await asyncpg.connect(database_url)
    try:
        await establish_partitions(connection, partitions=args.shards, shard_count=args.shards)
    finally:
        await connection.close()
    storage = StorageSettings(
        database_url=database_url,
        redis_url=redis.url,
        namespace=RAY_NAMESPACE,
        partitions=args.shards,
        lease_ttl_ms=args.lease_ms,
        lease_margin_ms=int(args.lease_ms * LEASE_MARGIN_SHARE),
        lease_renew_every_ms=int(args.lease_ms * LEASE_RENEW_SHARE),
        rebuild_retry_ms=REBUILD_RETRY_MS,
    )
    policies = dict(load_policies(load_settings({})))
    engine: EngineProcess | None = None
    if args.engine == "process":
        engine = EngineProcess(Path(args.temp_dir), args.shards, storage)
        engine.start()
        args.engine_process = engine
        transport: Any = await LocalEngineTransport.connect(engine.path)
    else:
        transport = await RayShardTransport.connect(
            shard_count=args.shards,
            policies=policies,
            name_prefix=RAY_NAMESPACE,
            storage=storage,
            timeout_ms=SHARDS_START_TIMEOUT_MS,
        )
    stopped: set[int] = set()
    try:
        client = EngineClient(transport)
        ledger = Ledger()
        load = Load(client, ledger, args.shards)
        probes = Probes()
        setup = RequestIds()
        load_slots: list[str] = []
        probe_slots: list[str] = []
        for shard in range(args.shards):
            for _ in range(args.slots_per_shard):
                resource = resource_on(shard, args.shards, "chaos-room")
                load_slots.append(
                    await create_slot(client, setup, resource, capacity=args.capacity)
                )
            resource = resource_on(shard, args.shards, "chaos-probe")
            probe_slots.append(await create_slot(client, setup, resource, capacity=1_000))
        contender = Contender(storage, policies, args.shards, probe_slots, load)
        services = Services(
            postgres,
            redis,
            transport,
            args.lease_ms,
            args.pause_extra_ms,
            contender,
            engine,
            stopped,
        )
        rng = random.Random(args.seed)
        tasks = [
            asyncio.create_task(load.caller(f"user-{n}", load_slots, rng.random()))
            for n in range(args.concurrency)
        ]
        tasks += [
            asyncio.create_task(change_prober(load, probes, shard, probe_slots[shard]))
            for shard in range(args.shards)
        ]
        cycles: list[Cycle] = []
        first_loss: int | None = None
        try:
            for number, kind in enumerate(plan, start=1):
                await asyncio.sleep(args.steady_seconds)
                struck = rng.randrange(args.shards) if kind in SHARD_FAULTS else None
                injected_at = time.monotonic()
                await services.fault(kind)(struck or 0)
                ended_at = time.monotonic()
                recovery = await wait_recovered(
                    probes, args.shards, injected_at, ended_at, args.recovery_timeout_s
                )
                outage = None
                if recovery is not None:
                    # Up to the last shard's first change, that change included.
                    recovered_at = injected_at + recovery
                    outage = max(
                        probes.longest_gap(n, injected_at, recovered_at) for n in range(args.shards)
                    )
                    recovery = round(recovery, 3)
                checked = await check_database(database_url, ledger)
                await services.heal(kind)
                cycles.append(
                    Cycle(
                        kind,
                        struck,
                        recovery,
                        outage,
                        checked["lost_acks"],
                        checked["violations"],
                    )
                )
                if first_loss is None and (checked["lost_acks"] or checked["violations"]):
                    first_loss = number
                print(
                    f"cycle {number}/{len(plan)} {kind}"
                    f"{'' if struck is None else f' shard {struck}'}: recovered in "
                    f"{'-' if recovery is None else f'{recovery:.3f}'} s (longest without a"
                    f" change {'-' if outage is None else f'{outage:.3f}'} s), lost acks "
                    f"{checked['lost_acks']}, violations {checked['violations']}",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            services.release_stopped()
            load.stopping.set()
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await asyncio.gather(*tasks, return_exceptions=True)
            await client.wait_idle(DRAIN_TIMEOUT_S)
        final = await check_database(database_url, ledger)
    finally:
        # The actors themselves die with the run's Ray (``run``).
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    recoveries = [c.recovery_s for c in cycles]
    result: dict[str, Any] = {
        "scenario": "chaos",
        "seed": args.seed,
        "cycles": len(cycles),
        "engine": args.engine,
        "shards": args.shards,
        "concurrency": args.concurrency,
        "lease_ms": args.lease_ms,
        "faults": summarise(cycles, kinds),
        "recovery_max_s": max((t for t in recoveries if t is not None), default=None),
        "not_recovered": sum(1 for t in recoveries if t is None),
        "recoveries_within_target": all(
            t is not None and t <= TARGET_RECOVERY_S for t in recoveries
        ),
        "requests_answered": ledger.answered,
        "requests_503": ledger.unavailable,
        # Callers and probes that ended with an error instead of an answer.
        "callers_failed": [
            repr(task.exception())
            for task in tasks
            if task.done() and not task.cancelled() and task.exception() is not None
        ],
        "probe_errors": len(probes.errors),
        "probe_error_examples": probes.errors[:5],
        # owner_pause: changes new owners were acknowledged while the old one was
        # paused, and takeovers that did not serve.
        "new_owner_changes": contender.acknowledged,
        "new_owner_failures": contender.failed,
        "acknowledged_changes": final["acknowledged_changes"],
        "acknowledged_bookings": final["acknowledged_bookings"],
        "lost_acks": final["lost_acks"],
        "lost_ack_examples": final["lost_ack_examples"],
        "slots_over_capacity": final["slots_over_capacity"],
        "double_bookings": final["users_with_two_active_bookings"],
        "violations": final["violations"],
        "reconcile_findings": final["reconcile_findings"],
        # The worst any check after a cycle found, and the first cycle it was found in.
        "lost_acks_max_after_a_cycle": max((c.lost_acks for c in cycles), default=0),
        "violations_max_after_a_cycle": max((c.violations for c in cycles), default=0),
        "first_cycle_with_a_finding": first_loss,
        "plan": [c.kind if c.shard is None else f"{c.kind}:{c.shard}" for c in cycles],
        "recovery_s": recoveries,
        "outage_s": [c.outage_s for c in cycles],
    }
    result["meets_target"] = (
        result["recoveries_within_target"]
        and result["lost_acks"] == 0
        and result["violations"] == 0
        and result["lost_acks_max_after_a_cycle"] == 0
        and result["violations_max_after_a_cycle"] == 0
    )
    return result


def _terminate(signal_number: int, frame: Any) -> None:
    # A SIGTERM ends the run as Ctrl-C does: every service is stopped on the way out
    # (a second one must not cut that short).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signal_number)


def _raylet_pids() -> list[int]:
    """The raylets of the local Ray this process started."""
    import ray._private.worker

    node = ray._private.worker._global_node
    infos: list[Any] = [] if node is None else node.all_processes.get("raylet", [])
    return [info.process.pid for info in infos]


def kill_workers_of(raylets: list[int]) -> list[int]:
    """SIGKILL every process a raylet of ``raylets`` started (its environment names
    it: ``RAY_RAYLET_PID``), such as shard actors still running after their Ray
    stopped; their pids."""
    marks = {f"RAY_RAYLET_PID={pid}".encode() for pid in raylets}
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if marks & environment:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from engine.shell.ray_actor import default_ray_health_checks
    from persistence.services import PrivatePostgres, PrivateRedis

    signal.signal(signal.SIGTERM, _terminate)
    parse_faults(args.faults, args.redis, args.engine)
    args.engine_process = None
    postgres = PrivatePostgres(database="chaos")
    redis: PrivateRedis | SentinelGroup | None = None
    temp_dir = None
    raylets: list[int] = []
    try:
        # Short: Ray's Unix socket paths must fit in 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
        if args.redis == "sentinel":
            redis = SentinelGroup(Path(temp_dir) / "redis")
        else:
            redis = PrivateRedis()
        args.temp_dir = temp_dir
        postgres.start()
        redis.start()
        if args.engine == "ray":
            default_ray_health_checks()
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                _temp_dir=temp_dir,
                namespace=RAY_NAMESPACE,
                log_to_driver=False,
            )
            raylets = _raylet_pids()
            # Ray's own SIGTERM handler aborts the process, leaving the servers behind.
            signal.signal(signal.SIGTERM, _terminate)
        result = asyncio.run(soak(args, postgres, redis))
        print(human_summary(result), flush=True)
        return result
    finally:
        if args.engine_process is not None:
            args.engine_process.kill()
        ray.shutdown()
        kill_workers_of(raylets)
        if redis is not None:
            redis.close()
        postgres.close()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)

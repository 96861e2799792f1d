"""Scaling under load: the shard count changes while callers book, partitions moving live.

It creates a database of the run's own (on ``DATABASE_URL``'s server or the
embedded one, dropped at the end unless ``--keep-database``) with
``--partitions`` partitions, starts ``--shards``'s first count of durable
shards (``--engine inproc``: owners in this process; ``--engine ray``: shard
actors on a local Ray of the run's own), and runs callers that reserve,
confirm, cancel, join and leave queues with a client ledger (``bench._ledger``).
Before the first change of the shard count, holds of ``--hold-ms`` that
nobody confirms and, behind each, a queue join whose offer nobody claims,
are left to expire across the moves. Then the shard count goes through
``--shards`` (``2,4,3,1``: up to 4, down to 3, down to 1), ``--phase-seconds``
of load between changes, each change moving partitions live
(``engine.shell.rebalance``; on Ray ``engine.shell.scaling``, as ``slotengine
cluster scale`` does).

It reports, per change, the partitions moved, the steps and how long the
change took; per operation kind, the p99 latency of the requests in flight
during a change, and outside; the requests answered 503 (every one with
``retryAfter`` at the gateway), any other error, the acknowledged changes
missing from PostgreSQL (``lost_acks``), the invariant violations, and
whether the holds and offers left to expire expired on time.

It must never touch a database, shard or Ray cluster it did not start, and it
stops all of them at its end.
"""

import argparse
import asyncio
import contextlib
import functools
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

from bench._ledger import PAUSE_AFTER_503_S, Ledger, Load, check_database
from bench.failover import Expiring, check_expiries, leave_to_expire
from engine.core import protocol as p
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.errors import ShellError

EXPIRING_DOMAIN: Final = "rebalance-expiring"
# --join-node auto: how often the automatic rebalance looks, and how long it may take.
AUTO_EVERY_S: Final = 0.5
AUTO_DEADLINE_S: Final = 60.0
# The Ray namespace of the run's own local Ray (``--engine ray``).
RAY_SPACE: Final = "slotengine-bench"
DRAIN_TIMEOUT_S: Final = 60.0
EXPIRY_DEADLINE_S: Final = 90.0
# A caller refused (already booked, the queue full) tries again after this.
REFUSED_PAUSE_S: Final = 0.05
SHARDS_START_TIMEOUT_MS: Final = 180_000
# Targets (issue: "p99 ≤ 1 s during moves, 0 lost acks and 0 violations").
TARGET_P99_DURING_MOVES_MS: Final = 1_000.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=("inproc", "ray"),
        default="inproc",
        help="durable owners in this process (default), or shard actors on a local Ray",
    )
    parser.add_argument(
        "--shards",
        default="2,4,3,1",
        help="the shard counts to go through, the first to start with (default 2,4,3,1)",
    )
    parser.add_argument(
        "--partitions", type=int, default=256, help="P of the run's database (default 256)"
    )
    parser.add_argument(
        "--step-partitions",
        type=int,
        default=32,
        help="partitions a losing shard hands over per step (default 32)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=100, help="concurrent callers (default 100)"
    )
    parser.add_argument("--slots", type=int, default=64, help="load slots (default 64)")
    parser.add_argument("--capacity", type=int, default=2, help="load slots' capacity (default 2)")
    parser.add_argument(
        "--expiring", type=int, default=8, help="holds left to expire across moves (default 8)"
    )
    parser.add_argument(
        "--hold-ms", type=int, default=6_000, help="TTL of the holds left to expire (default 6000)"
    )
    parser.add_argument(
        "--claim-ms", type=int, default=4_000, help="TTL of their queue offers (default 4000)"
    )
    parser.add_argument(
        "--on-time-ms",
        type=int,
        default=1_000,
        help="an expiry later than this after its deadline counts as late (default 1000)",
    )
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=2.0,
        help="load before, between and after the changes (default 2)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="--engine ray: a Ray cluster of the run's own on this machine, a head with no"
        " CPU for the actors and this many worker nodes (default 0: a plain local Ray)",
    )
    parser.add_argument(
        "--join-node",
        choices=("command", "auto"),
        default=None,
        help="--engine ray with --nodes: after the last change, one more worker node joins"
        " and the actors are evened over the nodes under the same load, by `cluster"
        " rebalance` (command) or by the automatic rebalance of SLOTENGINE_AUTO_REBALANCE"
        " (auto)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the callers' choices")
    parser.add_argument(
        "--keep-database",
        action="store_true",
        help="keep the run's database (slotengine_bench_<run>) for inspection",
    )


def shard_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if len(counts) < 2 or min(counts) < 1:
        raise ValueError(f"--shards: at least two shard counts of 1 or more, got {text!r}")
    return counts


class TimedLoad(Load):
    """``Load`` that also keeps each request's kind, start and end, and any error
    other than a 503."""

    def __init__(self, client: EngineClient, ledger: Ledger, shard_count: int) -> None:
        super().__init__(client, ledger, shard_count)
        self.timings: list[tuple[str, float, float]] = []
        self.other_errors: list[str] = []

    async def execute(self, command: p.AnyCommand, routed_by: str) -> p.AnyResult | None:
        started = time.monotonic()
        try:
            result = await super().execute(command, routed_by)
        except Exception as error:  # anything but a ShellError: a 500 at the gateway
            self.other_errors.append(f"{type(command).__name__}: {error!r}")
            return None
        self.timings.append((type(command).__name__, started, time.monotonic()))
        if isinstance(result, p.Failure) and result.status >= 500 and result.status != 503:
            self.other_errors.append(f"{type(command).__name__}: {result.status} {result.code}")
        return result

    async def caller(self, user: str, slots: list[str], seed: float) -> None:
        """Reserve; a hold is confirmed and then cancelled, and a queue place (the
        slot was full) looked at and left: the places keep turning over (an offer
        nobody claims would hold one for its claim TTL), so every kind of change
        goes on through the moves."""
        rng = random.Random(seed)
        ids = self.ids
        while not self.stopping.is_set():
            slot_id = rng.choice(slots)
            held = await self.execute(
                p.Reserve(request_id=ids.next(), slot_id=slot_id, user_id=user), slot_id
            )
            if isinstance(held, p.BookingResult) and held.status == 201:
                booking_id = held.booking.id
                confirmed = await self.execute(
                    p.Confirm(request_id=ids.next(), booking_id=booking_id, user_id=user),
                    booking_id,
                )
                if isinstance(confirmed, p.BookingResult):
                    await self.execute(
                        p.Cancel(request_id=ids.next(), booking_id=booking_id, user_id=user),
                        booking_id,
                    )
            elif isinstance(held, p.QueueResult):
                await self.execute(
                    p.QueuePosition(request_id=ids.next(), slot_id=slot_id, user_id=user), slot_id
                )
                await self.execute(
                    p.LeaveQueue(request_id=ids.next(), slot_id=slot_id, user_id=user), slot_id
                )
            elif held is None:
                await asyncio.sleep(PAUSE_AFTER_503_S)
            else:
                await asyncio.sleep(REFUSED_PAUSE_S)


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 2)


def latencies(
    timings: list[tuple[str, float, float]], windows: list[tuple[float, float]]
) -> dict[str, dict[str, Any]]:
    """Per kind: p50/p99 (ms) of the requests in flight during a window, and outside."""
    kinds: dict[str, dict[str, list[float]]] = {}
    for kind, started, ended in timings:
        during = any(started < end and ended > start for start, end in windows)
        bucket = kinds.setdefault(kind, {"during": [], "outside": []})
        bucket["during" if during else "outside"].append((ended - started) * 1000)
    return {
        kind: {
            "requests_during_moves": len(b["during"]),
            "p50_during_moves_ms": percentile(b["during"], 0.50),
            "p99_during_moves_ms": percentile(b["during"], 0.99),
            "p99_outside_ms": percentile(b["outside"], 0.99),
        }
        for kind, b in sorted(kinds.items())
    }


class _Engine:
    """The shards under test and how their count changes."""

    transport: Any
    scale: Callable[[int], Awaitable[dict[str, Any]]]
    close: Callable[[], Awaitable[None]]
    check_invariants: Callable[[], Awaitable[None]]
    # Ray with nodes of its own: a node joins, then the actors are evened over the nodes.
    join_and_rebalance: Callable[[], Awaitable[dict[str, Any]]] | None = None
    cluster: Any = None


async def _inproc_engine(storage: Any, policies: Any, first: int, step: int) -> _Engine:
    from engine.shell.inproc import OwnedInProcessHost
    from engine.shell.rebalance import rebalance

    host = OwnedInProcessHost(shard_count=first, policies=policies, storage=storage)
    await host.start()
    engine = _Engine()
    engine.transport = host

    async def scale(count: int) -> dict[str, Any]:
        if count > host.shard_count:
            await host.grow(count)
        report = await rebalance(storage.database_url, host, count, step_partitions=step)
        if count < host.shard_count:
            await host.shrink(count)
        return {"moved": report.moved, "steps": len(report.steps), "forced": report.forced}

    async def invariants() -> None:
        for shard in range(host.shard_count):
            await host.check_invariants(shard, 10_000)

    engine.scale = scale
    engine.close = host.close
    engine.check_invariants = invariants
    return engine


async def _ray_engine(
    storage: Any, policies: Any, first: int, step: int, prefix: str, namespace: str, how: str
) -> _Engine:
    from engine.shell import scaling
    from engine.shell.ray_actor import RayShardTransport, kill_shard_actors, placement_nodes

    transport = await RayShardTransport.connect(
        shard_count=first,
        policies=policies,
        namespace=namespace,
        name_prefix=prefix,
        storage=storage,
        timeout_ms=SHARDS_START_TIMEOUT_MS,
    )
    engine = _Engine()
    engine.transport = transport
    largest = [first]
    current = [first]

    async def scale(count: int) -> dict[str, Any]:
        largest[0] = max(largest[0], count)
        current[0] = count
        report = await scaling.scale(
            shard_count=count,
            policies=policies,
            storage=storage,
            name_prefix=prefix,
            namespace=namespace,
            step_partitions=step,
        )
        return {
            "moved": report.moves.moved,
            "steps": len(report.moves.steps),
            "forced": report.moves.forced,
            "added": report.added,
            "ended": report.ended,
        }

    async def invariants() -> None:
        await transport.connect_shards(current[0])
        for shard in range(current[0]):
            await transport.check_invariants(shard, 10_000)

    async def close() -> None:
        await transport.close()
        kill_shard_actors(shard_count=largest[0], namespace=namespace, name_prefix=prefix)

    async def join_and_rebalance() -> dict[str, Any]:
        cluster = engine.cluster
        if cluster is None:
            raise RuntimeError("--join-node needs --nodes")
        before = scaling.actor_nodes(current[0], prefix, namespace)
        automatic = None
        if how == "auto":
            # What a gateway started with SLOTENGINE_AUTO_REBALANCE runs, looking often.
            automatic = asyncio.create_task(
                scaling.auto_rebalance(
                    policies=policies,
                    storage=storage,
                    name_prefix=prefix,
                    namespace=namespace,
                    every_s=AUTO_EVERY_S,
                )
            )
            await asyncio.sleep(2 * AUTO_EVERY_S)  # it has seen the nodes of before
        # On the loop's thread: Ray sets signal handlers (the load stalls meanwhile).
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        started = time.monotonic()
        relocations: list[dict[str, Any]] = []
        if automatic is None:
            report = await scaling.rebalance_cluster(
                policies=policies,
                storage=storage,
                name_prefix=prefix,
                namespace=namespace,
                step_partitions=step,
            )
            relocations = [
                {"shard": r.shard, "seconds": round(r.duration_ms / 1000, 3)}
                for r in report.relocations
            ]
        else:
            try:
                deadline = time.monotonic() + AUTO_DEADLINE_S
                while time.monotonic() < deadline:
                    await asyncio.sleep(AUTO_EVERY_S)
                    placed = scaling.actor_nodes(current[0], prefix, namespace)
                    if None not in placed.values() and _per_node(placed) == _even(
                        current[0], len(placement_nodes())
                    ):
                        break
            finally:
                automatic.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await automatic
        after = scaling.actor_nodes(current[0], prefix, namespace)
        return {
            "how": how,
            "seconds": round(time.monotonic() - started, 3),
            "relocations": relocations,
            "actors_per_node_before": _per_node(before),
            "actors_per_node_after": _per_node(after),
        }

    engine.scale = scale
    engine.close = close
    engine.check_invariants = invariants
    engine.join_and_rebalance = join_and_rebalance
    return engine


def _even(actors: int, nodes: int) -> list[int]:
    base, extra = divmod(actors, nodes)
    return sorted([base + (1 if n < extra else 0) for n in range(nodes)], reverse=True)


def _per_node(placed: dict[int, str | None]) -> list[int]:
    counts: dict[str, int] = {}
    for node in placed.values():
        counts[node or "-"] = counts.get(node or "-", 0) + 1
    return sorted(counts.values(), reverse=True)


async def scenario(args: argparse.Namespace, cluster: Any = None) -> dict[str, Any]:
    import msgspec

    from bench.ray import _bench_storage, _drop_database, create_slot
    from config.domains import load_policies
    from config.settings import load_settings
    from persistence.partitioning import read_partition_map

    counts = shard_counts(args.shards)
    settings = load_settings()
    policies = dict(load_policies(settings))
    policies[EXPIRING_DOMAIN] = msgspec.structs.replace(
        policies["default"],
        name=EXPIRING_DOMAIN,
        hold_ttl_ms=args.hold_ms,
        claim_ttl_ms=args.claim_ms,
    )
    prefix = f"rebalance-{uuid.uuid4().hex[:8]}"
    storage = await _bench_storage(settings, prefix, counts[0], args.partitions)
    engine: _Engine | None = None
    try:
        if args.engine == "inproc":
            engine = await _inproc_engine(storage, policies, counts[0], args.step_partitions)
        else:
            engine = await _ray_engine(
                storage,
                policies,
                counts[0],
                args.step_partitions,
                prefix,
                RAY_SPACE,
                args.join_node or "command",
            )
            engine.cluster = cluster
        client = EngineClient(
            engine.transport,
            partition_map=await read_partition_map(storage.database_url),
            map_source=functools.partial(read_partition_map, storage.database_url),
        )
        ledger = Ledger()
        load = TimedLoad(client, ledger, counts[0])
        setup = RequestIds()
        load_slots = [
            await create_slot(client, setup, f"rebalance-room-{n}", capacity=args.capacity)
            for n in range(args.slots)
        ]
        expiring_slots = [
            await create_slot(
                client, setup, f"rebalance-expiring-{n}", capacity=1, domain=EXPIRING_DOMAIN
            )
            for n in range(args.expiring)
        ]
        rng = random.Random(args.seed)
        tasks = [
            asyncio.create_task(load.caller(f"user-{n}", load_slots, rng.random()))
            for n in range(args.concurrency)
        ]
        changes: list[dict[str, Any]] = []
        joined: dict[str, Any] | None = None
        join_window: list[tuple[float, float]] = []
        windows: list[tuple[float, float]] = []
        expiring = Expiring()
        try:
            await asyncio.sleep(args.phase_seconds)
            expiring = await leave_to_expire(load, expiring_slots)
            for count in counts[1:]:
                started = time.monotonic()
                moved = await engine.scale(count)
                ended = time.monotonic()
                windows.append((started, ended))
                changes.append({"shards": count, "seconds": round(ended - started, 3), **moved})
                await asyncio.sleep(args.phase_seconds)
            if args.join_node and engine.join_and_rebalance is not None:
                started = time.monotonic()
                joined = await engine.join_and_rebalance()
                join_window.append((started, time.monotonic()))
                await asyncio.sleep(args.phase_seconds)
        finally:
            load.stopping.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        crashed = [repr(r) for r in results if isinstance(r, BaseException)]
        with contextlib.suppress(ShellError, TimeoutError):
            await client.wait_idle(DRAIN_TIMEOUT_S)
        invariants_error = None
        try:
            await engine.check_invariants()
        except ShellError as error:
            invariants_error = str(error)
        expiries = await check_expiries(
            storage.database_url, expiring, args.on_time_ms, EXPIRY_DEADLINE_S
        )
        checked = await check_database(storage.database_url, ledger)
        final_map = await read_partition_map(storage.database_url)
    finally:
        if engine is not None:
            await engine.close()
        if not args.keep_database:
            await _drop_database(storage.database_url)
    by_kind = latencies(load.timings, windows)
    if joined is not None:
        # Actors restarted on the new node: their partitions pause for each restart.
        during_join = latencies(load.timings, join_window)
        joined["p99_during_ms"] = max(
            (k["p99_during_moves_ms"] for k in during_join.values() if k["p99_during_moves_ms"]),
            default=None,
        )
    p99_during = max(
        (k["p99_during_moves_ms"] for k in by_kind.values() if k["p99_during_moves_ms"]),
        default=None,
    )
    result: dict[str, Any] = {
        "engine": args.engine,
        "partitions": args.partitions,
        "shards": counts,
        "changes": changes,
        "node_joined": joined,
        "final_partitions_per_shard": {str(s): n for s, n in sorted(final_map.counts().items())},
        "requests": ledger.answered,
        "requests_503": ledger.unavailable,
        "other_errors": len(load.other_errors) + len(crashed),
        "other_error_examples": (load.other_errors + crashed)[:5],
        "latency_by_kind": by_kind,
        "p99_during_moves_ms": p99_during,
        "invariants_error": invariants_error,
        **checked,
        **expiries,
        "database": storage.database_url.rsplit("/", 1)[-1] if args.keep_database else None,
    }
    result["meets_target"] = (
        p99_during is not None
        and p99_during <= TARGET_P99_DURING_MOVES_MS
        and result["lost_acks"] == 0
        and result["violations"] == 0
        and result["other_errors"] == 0
        and invariants_error is None
        and result["expired_early"] == result["expired_late"] == 0
        and result["holds_expired"] == result["holds_left_to_expire"]
        and result["offers_expired"] == result["offers_expected"]
    )
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    shard_counts(args.shards)  # refused before anything starts
    if args.engine == "inproc":
        return asyncio.run(scenario(args))
    import ray

    if not args.nodes:
        ray.init(namespace=RAY_SPACE, log_to_driver=False, include_dashboard=False)
        try:
            return asyncio.run(scenario(args))
        finally:
            ray.shutdown()
    from ray.cluster_utils import Cluster

    from engine.shell.ray_actor import ray_health_check_config

    # Short: Ray's Unix socket paths must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    cluster: Any = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "temp_dir": temp_dir,
            "include_dashboard": False,
            "_system_config": ray_health_check_config(),
        },
    )
    try:
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=RAY_SPACE, log_to_driver=False)
        return asyncio.run(scenario(args, cluster))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

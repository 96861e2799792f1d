"""Failover after a lost Ray node: durable shard actors on several nodes, one node lost under load.

It starts a Ray cluster of its own on this machine (``ray.cluster_utils.Cluster``:
a head and ``--nodes`` worker nodes, the head with the engine's health-check
settings, ``ray_health_check_config``), a database of the run's own (on
``DATABASE_URL``'s server or the embedded one, dropped at the end unless
``--keep-database``) and ``--shards`` shard actors that write behind to it and
hold Redis leases, wherever Ray places them. Callers reserve, confirm, cancel,
join and leave queues, keeping a ledger of every change they were acknowledged;
one prober per shard reads a slot of its shard every ``PROBE_EVERY_S``. Shortly
before the loss, every shard gets holds of a short TTL (``--hold-ms``) that
nobody confirms and, behind each, a queue join whose offer nobody claims, and
one more such pair whose hold is due within the outage (``--due-hold-ms``). Then
the worker node hosting the most shards is lost: its processes killed
(``--loss kill``, ``Cluster.remove_node``) or frozen (``--loss freeze``: SIGSTOP,
a machine that went silent, found only by Ray's health checks).

It reports, per shard, its node and how long after the loss it answered a
prober again (``unavailable_s``; ``p50`` and ``max`` over the lost node's
shards), the requests that failed with 503 (every ``ShellError``: the gateway
answers each with 503 and ``retryAfter``), the acknowledged changes missing from
PostgreSQL (``lost_acks``: a booking not at its acknowledged status or a later
one, or an acknowledged change whose request has no audit row), the invariant
violations (no slot over capacity, no user with two active bookings, and the
reconciliation checks of ``persistence.checks``), and whether the holds and
offers acknowledged before the loss expired on time: never before their
deadline, and within ``--on-time-ms`` after it (plus their shard's outage, for
the holds due within it).

It must never touch a Ray cluster, shard actors or a database it did not start
(``RAY_ADDRESS`` is ignored), and it stops all of them, frozen processes
included, at its end.
"""

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

from bench._ledger import Ledger, Load, check_database, resource_on
from engine.core import protocol as p
from engine.core.routing import shard_of
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.limits import NODE_FAILOVER_MS

# The domain of the holds and offers left to expire (its TTLs are --hold-ms, --claim-ms).
EXPIRING_DOMAIN: Final = "failover-expiring"
# The domain of the holds made just before the loss whose deadline falls within it
# (--due-hold-ms): on a lost shard they expire once its new owner has loaded it.
DUE_DOMAIN: Final = "failover-due"
# Ray checks a node's health only once it has been up for its initial delay (5 s,
# Ray's default, which the engine keeps): the loss waits for it, and a margin.
HEALTH_CHECK_INITIAL_DELAY_S: Final = 5.5
# The run's own bounds, generous for a loaded machine.
SHARDS_START_TIMEOUT_MS: Final = 180_000
DRAIN_TIMEOUT_S: Final = 60.0
EXPIRY_DEADLINE_S: Final = 90.0
POLL_S: Final = 0.2
TARGET_FAILOVER_S: Final = NODE_FAILOVER_MS / 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument(
        "--node-cpus",
        type=int,
        default=1,
        help="CPUs each node declares (default 1; the shard actors reserve none, but a"
        " raylet starts at most that many worker processes at once)",
    )
    parser.add_argument("--shards", type=int, default=4, help="shard actors (default 4)")
    parser.add_argument(
        "--concurrency", type=int, default=100, help="concurrent callers (default 100)"
    )
    parser.add_argument(
        "--slots-per-shard", type=int, default=8, help="load slots on each shard (default 8)"
    )
    parser.add_argument("--capacity", type=int, default=2, help="load slots' capacity (default 2)")
    parser.add_argument(
        "--expiring-per-shard",
        type=int,
        default=2,
        help="holds (each with a queue join behind it) left to expire on each shard (default 2)",
    )
    parser.add_argument(
        "--hold-ms", type=int, default=8_000, help="TTL of the holds left to expire (default 8000)"
    )
    parser.add_argument(
        "--claim-ms", type=int, default=4_000, help="TTL of their queue offers (default 4000)"
    )
    parser.add_argument(
        "--due-hold-ms",
        type=int,
        default=1_000,
        help="TTL of one hold on each shard made just before the loss, due during the"
        " lost shards' outage (default 1000)",
    )
    parser.add_argument(
        "--on-time-ms",
        type=int,
        default=1_000,
        help="an expiry later than this after its deadline counts as late (default 1000)",
    )
    parser.add_argument(
        "--before-seconds", type=float, default=3.0, help="load before the loss (default 3)"
    )
    parser.add_argument(
        "--after-seconds", type=float, default=12.0, help="load after the loss (default 12)"
    )
    parser.add_argument(
        "--loss",
        choices=("kill", "freeze"),
        default="kill",
        help="kill the node's processes (default) or freeze them (SIGSTOP: a silent machine)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the callers' choices")
    parser.add_argument(
        "--keep-database",
        action="store_true",
        help="keep the run's database (slotengine_bench_<run>) for inspection",
    )


# -- the cluster -------------------------------------------------------------------


def actor_node(handle: Any) -> str:
    """The id of the node the actor runs on now, as Ray's GCS has it."""
    import ray._private.state

    info = ray._private.state.actors(handle._actor_id.hex())
    return str(info["Address"]["NodeID"])


@dataclass
class Expiring:
    """The holds and queue joins left to expire, acknowledged before the loss."""

    holds: dict[str, int] = field(default_factory=dict)  # booking id -> expires_at_ms
    waiters: list[tuple[str, str]] = field(default_factory=list)  # (slot id, user id)


async def leave_to_expire(load: Load, slots: list[str], tag: str = "") -> Expiring:
    """On each slot (capacity 1): a hold nobody confirms, and a queue join behind it
    (by users ``keeper-<tag><n>`` and ``waiter-<tag><n>``)."""
    expiring = Expiring()

    async def one(n: int, slot_id: str) -> None:
        hold = await load.execute(
            p.Reserve(request_id=load.ids.next(), slot_id=slot_id, user_id=f"keeper-{tag}{n}"),
            slot_id,
        )
        if not isinstance(hold, p.BookingResult) or hold.status != 201:
            raise RuntimeError(f"a hold to leave to expire was refused: {hold}")
        expiring.holds[hold.booking.id] = hold.booking.expires_at_ms
        waiter = f"waiter-{tag}{n}"
        joined = await load.execute(
            p.JoinQueue(request_id=load.ids.next(), slot_id=slot_id, user_id=waiter), slot_id
        )
        if not isinstance(joined, p.QueueResult):
            raise RuntimeError(f"a queue join to leave to expire was refused: {joined}")
        expiring.waiters.append((slot_id, waiter))

    await asyncio.gather(*(one(n, slot_id) for n, slot_id in enumerate(slots)))
    return expiring


def lose_node(cluster: Any, node: Any, loss: str, actor_pids: list[int], frozen: list[int]) -> None:
    """Kill ``node``'s processes, or freeze them and its actors' (their pids into ``frozen``)."""
    if loss == "kill":
        cluster.remove_node(node, allow_graceful=False)
        return
    pids = actor_pids + [
        info.process.pid for infos in node.all_processes.values() for info in infos
    ]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)


async def watch_recovery(
    node_id: str, handles: list[Any], lost_at: float, marks: dict[str, float]
) -> None:
    """Into ``marks``: when (seconds after ``lost_at``) Ray's GCS had the node dead, and
    when the last actor of ``handles`` was alive again on another node (the detection
    and the restarts apart)."""
    import ray
    import ray._private.state

    restarted: dict[int, float] = {}

    def look() -> None:
        if "node_dead_s" not in marks and any(
            n["NodeID"] == node_id and not n["Alive"]
            for n in ray.nodes()  # type: ignore[no-untyped-call]
        ):
            marks["node_dead_s"] = round(time.monotonic() - lost_at, 3)
        for n, handle in enumerate(handles):
            info = ray._private.state.actors(handle._actor_id.hex())
            if (
                n not in restarted
                and info.get("State") == "ALIVE"
                and info["Address"]["NodeID"] != node_id
            ):
                restarted[n] = time.monotonic() - lost_at
        if len(restarted) == len(handles):
            marks["actors_alive_max_s"] = round(max(restarted.values()), 3)

    while "node_dead_s" not in marks or "actors_alive_max_s" not in marks:
        await asyncio.to_thread(look)
        await asyncio.sleep(POLL_S / 2)


# -- the checks ----------------------------------------------------------------------


async def check_expiries(
    database_url: str,
    expiring: Expiring,
    on_time_ms: int,
    deadline_s: float,
    outage_ms: dict[int, int] | None = None,
    shard_count: int = 0,
) -> dict[str, Any]:
    """Wait (up to ``deadline_s``) until every hold and offer left to expire has expired;
    how late each was after its deadline, from the audit log. An expiry is late past
    ``on_time_ms``, plus its shard's ``outage_ms`` when its deadline fell within it."""
    import asyncpg

    connection = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + deadline_s
        while True:
            offers = {
                row["booking_id"]
                for row in await connection.fetch(
                    "SELECT booking_id FROM queue_entries"
                    " WHERE (slot_id, user_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
                    " AND booking_id IS NOT NULL",
                    [slot for slot, _ in expiring.waiters],
                    [user for _, user in expiring.waiters],
                )
            }
            bookings = list(expiring.holds) + sorted(offers)
            rows = await connection.fetch(
                "SELECT b.id, b.status, b.expires_at_ms, a.at_ms FROM bookings b"
                " LEFT JOIN audit_log a ON a.entity_id = b.id AND a.to_status = 'EXPIRED'"
                " WHERE b.id = ANY($1::text[])",
                bookings,
            )
            done = len(offers) == len(expiring.waiters) and all(
                row["status"] == "EXPIRED" for row in rows
            )
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
    finally:
        await connection.close()
    lateness = {row["id"]: row["at_ms"] - row["expires_at_ms"] for row in rows if row["at_ms"]}
    hold_late = [lateness[b] for b in expiring.holds if b in lateness]
    offer_late = [lateness[b] for b in offers if b in lateness]
    outage_ms = outage_ms or {}

    def allowed_ms(booking_id: str) -> int:
        shard = shard_of(booking_id, shard_count) if shard_count else None
        return on_time_ms + (outage_ms.get(shard, 0) if shard is not None else 0)

    return {
        "holds_left_to_expire": len(expiring.holds),
        "holds_expired": len(hold_late),
        "offers_expected": len(expiring.waiters),
        "offers_made": len(offers),
        "offers_expired": len(offer_late),
        "expired_early": sum(1 for ms in [*hold_late, *offer_late] if ms < 0),
        "expired_late": sum(1 for b, ms in lateness.items() if ms > allowed_ms(b)),
        "hold_lateness_max_ms": max(hold_late, default=None),
        "offer_lateness_max_ms": max(offer_late, default=None),
    }


# -- the run -------------------------------------------------------------------------


async def scenario(args: argparse.Namespace, cluster: Any, workers: list[Any]) -> dict[str, Any]:
    import msgspec

    from bench.ray import _bench_storage, _drop_database, create_slot
    from config.domains import load_policies
    from config.settings import load_settings
    from engine.shell.ray_actor import RayShardTransport

    settings = load_settings()
    policies = dict(load_policies(settings))
    for name, hold_ms in ((EXPIRING_DOMAIN, args.hold_ms), (DUE_DOMAIN, args.due_hold_ms)):
        policies[name] = msgspec.structs.replace(
            policies["default"], name=name, hold_ttl_ms=hold_ms, claim_ttl_ms=args.claim_ms
        )
    prefix = f"failover-{uuid.uuid4().hex[:8]}"
    storage = await _bench_storage(settings, prefix, args.shards)
    frozen: list[int] = []
    try:
        transport = await RayShardTransport.connect(
            shard_count=args.shards,
            policies=policies,
            name_prefix=prefix,
            storage=storage,
            timeout_ms=SHARDS_START_TIMEOUT_MS,
        )
        nodes_before = [actor_node(transport.handle(n)) for n in range(args.shards)]
        pids = [(await transport.identity(n, 30_000)).pid for n in range(args.shards)]
        worker_ids = [w.node_id for w in workers]
        hosted = {w: [n for n, node in enumerate(nodes_before) if node == w] for w in worker_ids}
        lost_id = max(worker_ids, key=lambda w: len(hosted[w]))
        lost_shards = hosted[lost_id]
        if not lost_shards:
            raise RuntimeError(f"no shard actor on a worker node: {nodes_before}")
        lost_node = workers[worker_ids.index(lost_id)]

        client = EngineClient(transport)
        ledger = Ledger()
        load = Load(client, ledger, args.shards)
        setup = RequestIds()
        load_slots: list[str] = []
        expiring_slots: list[str] = []
        due_slots: list[str] = []
        for shard in range(args.shards):
            for _ in range(args.slots_per_shard):
                resource = resource_on(shard, args.shards, "failover-room")
                load_slots.append(
                    await create_slot(client, setup, resource, capacity=args.capacity)
                )
            for _ in range(args.expiring_per_shard):
                resource = resource_on(shard, args.shards, "failover-expiring")
                expiring_slots.append(
                    await create_slot(client, setup, resource, capacity=1, domain=EXPIRING_DOMAIN)
                )
            resource = resource_on(shard, args.shards, "failover-due")
            due_slots.append(
                await create_slot(client, setup, resource, capacity=1, domain=DUE_DOMAIN)
            )
        rng = random.Random(args.seed)
        tasks = [
            asyncio.create_task(load.caller(f"user-{n}", load_slots, rng.random()))
            for n in range(args.concurrency)
        ]
        tasks += [
            asyncio.create_task(load.prober(shard, load_slots[shard * args.slots_per_shard]))
            for shard in range(args.shards)
        ]
        try:
            await asyncio.sleep(args.before_seconds)
            expiring = await leave_to_expire(load, expiring_slots)
            # The node is checked by Ray only after its initial delay.
            await asyncio.sleep(
                max(0.0, HEALTH_CHECK_INITIAL_DELAY_S - (time.monotonic() - args.joined_at))
            )
            due = await leave_to_expire(load, due_slots, "due-")
            acknowledged_before = len(ledger.changes)
            recovery: dict[str, float] = {}
            lost_at = time.monotonic()
            await asyncio.to_thread(
                lose_node,
                cluster,
                lost_node,
                args.loss,
                [pids[n] for n in lost_shards],
                frozen,
            )
            watched = asyncio.create_task(
                watch_recovery(
                    lost_id, [transport.handle(n) for n in lost_shards], lost_at, recovery
                )
            )
            await asyncio.sleep(args.after_seconds)
        finally:
            load.stopping.set()
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await asyncio.gather(*tasks, return_exceptions=True)
            await client.wait_idle(DRAIN_TIMEOUT_S)
        watched.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watched
        nodes_after = [actor_node(transport.handle(n)) for n in range(args.shards)]
        unavailable = {n: load.unavailable_s(n, lost_at) for n in range(args.shards)}
        expiries = await check_expiries(
            storage.database_url, expiring, args.on_time_ms, EXPIRY_DEADLINE_S
        )
        due_expiries = await check_expiries(
            storage.database_url,
            due,
            args.on_time_ms,
            EXPIRY_DEADLINE_S,
            outage_ms={n: int((s or 0.0) * 1000) for n, s in unavailable.items()},
            shard_count=args.shards,
        )
        checked = await check_database(storage.database_url, ledger)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not args.keep_database:
            await _drop_database(storage.database_url)
        with contextlib.suppress(Exception):
            from engine.shell.ray_actor import kill_shard_actors

            kill_shard_actors(shard_count=args.shards, name_prefix=prefix)

    lost_unavailable = [unavailable[n] for n in lost_shards]
    measured = [s for s in lost_unavailable if s is not None]
    worst = None if len(measured) < len(lost_unavailable) else max(measured, default=None)
    node_names = {cluster.head_node.node_id: "head"} | {
        w: f"worker-{i}" for i, w in enumerate(worker_ids)
    }
    result: dict[str, Any] = {
        "scenario": "failover",
        "loss": args.loss,
        "nodes": args.nodes,
        "node_cpus": args.node_cpus,
        "shards": args.shards,
        "concurrency": args.concurrency,
        "placement": [node_names.get(node, node[:8]) for node in nodes_before],
        "nodes_hosting_shards": len(set(nodes_before)),
        "lost_node": node_names[lost_id],
        "lost_shards": lost_shards,
        "placement_after": [node_names.get(node, node[:8]) for node in nodes_after],
        "moved": all(nodes_after[n] != lost_id for n in lost_shards),
        "unavailable_s": {str(n): unavailable[n] for n in range(args.shards)},
        # Ray's part: its GCS had the node dead, then every lost actor alive elsewhere.
        "node_dead_after_s": recovery.get("node_dead_s"),
        "actors_alive_after_s": recovery.get("actors_alive_max_s"),
        "unavailable_p50_s": round(statistics.median(measured), 3) if measured else None,
        "unavailable_max_s": worst,
        "unavailable_others_max_s": max(
            (s or 0.0 for n, s in unavailable.items() if n not in lost_shards), default=None
        ),
        "requests_answered": ledger.answered,
        "requests_503": ledger.unavailable,
        "requests_503_by_shard": {
            str(n): c for n, c in sorted(ledger.unavailable_by_shard.items())
        },
        # When the callers' last 503 of each shard came, after the loss.
        "last_503_s": {
            str(n): round(max(at) - lost_at, 3) for n, at in sorted(ledger.failed_at.items())
        },
        "acknowledged_before_loss": acknowledged_before,
        **checked,
        **expiries,
        # The holds due within the outage, and the offers made when they expired.
        **{f"due_{key}": value for key, value in due_expiries.items()},
        "database": storage.database_url.rsplit("/", 1)[-1] if args.keep_database else None,
    }
    result["meets_target"] = (
        worst is not None
        and worst <= TARGET_FAILOVER_S
        and result["lost_acks"] == 0
        and result["violations"] == 0
        and all(
            result[f"{due}expired_early"] == result[f"{due}expired_late"] == 0
            and result[f"{due}holds_expired"] == result[f"{due}holds_left_to_expire"]
            and result[f"{due}offers_expired"] == result[f"{due}offers_expected"]
            for due in ("", "due_")
        )
    )
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from engine.shell.ray_actor import ray_health_check_config

    # Short: Ray's Unix socket paths must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rf-", dir="/tmp")
    node_args: dict[str, Any] = {"num_cpus": args.node_cpus, "temp_dir": temp_dir}
    cluster: Any = Cluster(
        initialize_head=True,
        head_node_args={
            **node_args,
            "include_dashboard": False,
            "_system_config": ray_health_check_config(),
        },
    )
    try:
        workers = [cluster.add_node(**node_args) for _ in range(args.nodes)]
        cluster.wait_for_nodes()
        args.joined_at = time.monotonic()
        ray.init(address=cluster.address, namespace="slotengine-bench", log_to_driver=False)
        return asyncio.run(scenario(args, cluster, workers))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

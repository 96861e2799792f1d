"""``slotengine cluster``: see, scale, rebalance, stop and remove a deployment's shard actors.

It attaches to the running Ray cluster that ``--address`` or ``RAY_ADDRESS``
names, names the deployment by its database (``DATABASE_URL``, else the
embedded PostgreSQL if it runs, like every command: ``deployment_namespace``
in ``persistence/migrate.py``), and hands the work to ``engine.shell.cluster``.
Here are only the arguments, attaching, printing and the outcome.

- ``status [--json]``: the Ray nodes; each shard's actor (state, node, pid,
  restarts, its owner's state, commands in flight, uncommitted events, flush
  lag, time since its last commit), lease holder with its age and fencing
  tokens (docs/operations.md, "Reading the cluster status").
- ``stop``: each actor flushes and releases its lease, then is ended for good.
- ``reset``: every actor of the deployment is ended, whatever its state.
- ``scale --shards N``: serve with N shard actors, moving partitions live
  (``engine.shell.scaling``).
- ``rebalance``: even the partitions over the actors, and the actors over the
  nodes.

It must never start a Ray cluster (no address: it refuses) or the embedded
services, and never import Ray before a verb runs.
"""

import argparse
import asyncio
import logging
import re
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config.settings import Settings
    from engine.shell.cluster import ClusterStatus, ShardEnd, ShardStatus

logger = logging.getLogger(__name__)

# How long naming the deployment waits for the database, and attaching for the
# cluster's first answer.
CONNECT_TIMEOUT_S = 10.0


class ClusterUnusable(Exception):
    """The command cannot run (no cluster, no database); one line for the operator."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=None,
        help="the Ray cluster to attach to, e.g. 10.0.0.2:6379 [RAY_ADDRESS]",
    )
    verbs = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = verbs.add_parser(
        "status",
        parents=[common],
        help="the Ray nodes, the deployment's shard actors, their leases and fences",
        description="The Ray nodes; for each shard, its actor (Ray's state, node, pid, "
        "restarts, its owner's state, commands in flight, events not committed yet, flush "
        "lag: the age of the oldest uncommitted change, and the time since its last commit), "
        "the lease holder in Redis with its age, the fencing counter in Redis and the fence "
        "token in PostgreSQL, each where reachable. Exit 0.",
    )
    status.add_argument(
        "--json", action="store_true", help="print the status as JSON instead of tables"
    )
    scale = verbs.add_parser(
        "scale",
        parents=[common],
        help="change the number of shard actors while the engine serves",
        description="Serve the deployment with N shard actors, moving partitions live: "
        "new actors start serving nothing, then partitions move to them in steps (each "
        "partition pauses only for its own step: requests for it wait or get 503 with "
        "retryAfter; the others are served throughout); actors scaled away hand every "
        "partition over, keep answering for a moment, and are stopped gracefully. Every "
        "gateway is told of the new map. Holds, queue places, offers and Idempotency-Keys "
        "move with their partition. A later start configured with the same SLOTENGINE_SHARDS "
        "as before keeps N (docs/operations.md, 'Scaling'). Exit 0 done, 1 a step failed.",
    )
    scale.add_argument("--shards", type=int, required=True, help="the shard actors to serve with")
    _move_arguments(scale)
    rebalance = verbs.add_parser(
        "rebalance",
        parents=[common],
        help="even partitions over the shard actors, and the actors over the nodes",
        description="Move the fewest partitions so that every shard actor serves its share, "
        "live, then restart actors one at a time from the nodes with more than their share "
        "on those with the fewest (a node that joined gets its share; each restart pauses "
        "that shard's partitions for about a second). Exit 0 done, 1 a step failed.",
    )
    _move_arguments(rebalance)
    verbs.add_parser(
        "stop",
        parents=[common],
        help="stop the deployment's shard actors gracefully (flush, release the lease, end)",
        description="Ask each shard actor to flush what it holds and release its lease, then "
        "end it for good. Stop the gateways first: a running gateway starts the actors again "
        "at its next request. Exit 0 every actor stopped with its changes flushed (also when "
        "none ran), 1 otherwise (those that did not stop keep running: `slotengine cluster "
        "reset` ends them).",
    )
    verbs.add_parser(
        "reset",
        parents=[common],
        help="end every shard actor of the deployment, whatever its state",
        description="End every shard actor of the deployment for good, also one that is "
        "wedged, restarting or left by a failed start, without a flush (changes it "
        "acknowledged are committed already, unless SLOTENGINE_DURABILITY=relaxed). Exit 0 "
        "none is left, 1 one would not end.",
    )


def _move_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--step-partitions",
        type=int,
        default=256,
        help="partitions one shard hands over per step (default 256): fewer, shorter pauses"
        " per partition; more, fewer steps",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def service_urls(settings: "Settings") -> tuple[str, str | None]:
    """(database URL, Redis URL): the configured ones, else those of the embedded
    services if they run; never started here. Redis may be missing (None)."""
    database_url, redis_url = settings.database_url, settings.redis_url
    if database_url is None or redis_url is None:
        from persistence.services import services_status

        running = {s.name: s.url for s in services_status(settings.data_dir) if s.running}
        database_url = database_url or running.get("postgresql")
        redis_url = redis_url or running.get("redis")
    if database_url is None:
        raise ClusterUnusable(
            "DATABASE_URL is not set and no embedded PostgreSQL runs under"
            f" {settings.data_dir.resolve()}: the deployment is named by its database"
        )
    return database_url, redis_url


def run(
    args: argparse.Namespace, *, settings: "Settings", database_url: str, redis_url: str | None
) -> bool:
    """Attach, do the verb, print what it found or did; True when all of it was done.

    Raises ``ClusterUnusable`` when it cannot start.
    """
    address = args.address or settings.ray_address
    if not address:
        raise ClusterUnusable(
            "no Ray cluster to attach to: set RAY_ADDRESS or pass --address"
            " (this command never starts one)"
        )
    deployment = asyncio.run(_deployment(database_url))
    _attach(address)
    import ray

    try:
        return asyncio.run(_verb(args, settings, deployment, database_url, redis_url))
    finally:
        ray.shutdown()


async def _deployment(database_url: str) -> str:
    import asyncpg

    from persistence.migrate import deployment_namespace

    try:
        connection = await asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT_S)
        try:
            return await deployment_namespace(connection)
        finally:
            await connection.close()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise ClusterUnusable(
            f"cannot name the deployment: its database does not answer"
            f" ({type(error).__name__}: {error})"
        ) from None


def _attach(address: str) -> None:
    import ray

    from engine.shell.actor_identity import RAY_NAMESPACE

    # Ray waits minutes for a GCS that does not answer: ask its port first.
    found = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address)
    if found is not None:
        try:
            with socket.create_connection(
                (found.group(1), int(found.group(2))), timeout=CONNECT_TIMEOUT_S
            ):
                pass
        except OSError as error:
            raise ClusterUnusable(
                f"cannot attach to the Ray cluster at {address}: {error.strerror or error}"
            ) from None
    try:
        ray.init(
            address=address,
            namespace=RAY_NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterUnusable(f"cannot attach to the Ray cluster at {address}: {error}") from None


async def _verb(
    args: argparse.Namespace,
    settings: "Settings",
    deployment: str,
    database_url: str,
    redis_url: str | None,
) -> bool:
    from engine.shell import cluster
    from engine.shell.actor_identity import RAY_NAMESPACE, deployment_prefix

    prefix = deployment_prefix(deployment)
    if args.action == "status":
        status = await cluster.cluster_status(
            deployment=deployment,
            name_prefix=prefix,
            database_url=database_url,
            redis_url=redis_url,
            shard_count=settings.shards,
        )
        if args.json:
            import msgspec

            print(msgspec.json.encode(status).decode())
        else:
            _print_status(status)
        return True
    if args.action in ("scale", "rebalance"):
        return await _move(args, settings, deployment, database_url, redis_url)
    if args.action == "stop":
        ends = await cluster.stop_actors(prefix)
    else:
        ends = await cluster.remove_actors(prefix)
    if not ends:
        print(f"no shard actor of {deployment} runs (Ray namespace {RAY_NAMESPACE})")
        return True
    for end in ends:
        print(_said(end, args.action))
    return all(end.ended and end.flushed is not False for end in ends)


async def _move(
    args: argparse.Namespace,
    settings: "Settings",
    deployment: str,
    database_url: str,
    redis_url: str | None,
) -> bool:
    import msgspec

    from config.domains import load_policies
    from engine.shell import scaling
    from engine.shell.actor_identity import RAY_NAMESPACE, deployment_prefix
    from engine.shell.owner import StorageSettings
    from engine.shell.rebalance import MoveStep, read_map

    if redis_url is None:
        raise ClusterUnusable("REDIS_URL is not set and no embedded Redis runs: shards need it")
    if args.action == "scale" and args.shards < 1:
        raise ClusterUnusable(f"--shards: at least 1, got {args.shards}")
    current = await read_map(database_url)
    storage = StorageSettings(
        database_url=database_url,
        redis_url=redis_url,
        relaxed=settings.durability == "relaxed",
        namespace=deployment,
        partitions=current.partitions,
        outage_hold_grace_ms=settings.outage_hold_grace_seconds * 1000,
    )

    def said(step: MoveStep) -> None:
        if not args.json:
            forced = f", by force from {step.forced_from}" if step.forced_from else ""
            print(f"moved {step.partitions} partitions in {step.duration_ms:.0f} ms{forced}")

    common = {
        "policies": load_policies(settings),
        "storage": storage,
        "name_prefix": deployment_prefix(deployment),
        "namespace": RAY_NAMESPACE,
        "step_partitions": args.step_partitions,
        "on_step": said,
    }
    try:
        if args.action == "scale":
            report = await scaling.scale(shard_count=args.shards, **common)
        else:
            report = await scaling.rebalance_cluster(**common)
    except scaling.RebalanceBusy as busy:
        print(f"cluster {args.action}: {busy}")
        return False
    except Exception as error:
        # Whatever moved is in the map, and a partition half way is adopted by the
        # next run: one line, exit 1, and the operator runs it again.
        logger.exception("cluster %s failed", args.action)
        print(f"cluster {args.action} stopped: {error}; run it again to finish")
        return False
    if args.json:
        print(msgspec.json.encode(report).decode())
        return True
    moves = report.moves
    print(
        f"{report.shards_before} -> {report.shards_after} shards: {moves.moved} of"
        f" {moves.partitions} partitions moved in {len(moves.steps)} steps,"
        f" {moves.duration_ms / 1000:.1f} s (map version {moves.map_version_before} ->"
        f" {moves.map_version_after})"
    )
    if report.added:
        print(f"started shards {', '.join(map(str, report.added))}")
    if report.ended:
        print(f"stopped shards {', '.join(map(str, report.ended))}")
    for relocation in report.relocations:
        print(
            f"shard {relocation.shard} restarted on node {relocation.to_node[:12]}"
            f" in {relocation.duration_ms / 1000:.1f} s"
        )
    counts = ", ".join(f"{shard}: {n}" for shard, n in moves.counts.items())
    print(f"partitions per shard: {counts}")
    if moves.forced:
        print(f"{moves.forced} partitions moved by force (their shard did not answer)")
    return True


def _said(end: "ShardEnd", action: str) -> str:
    if not end.ended and end.error is not None:
        return (
            f"{end.name}: not stopped ({end.error}); it keeps running:"
            " `slotengine cluster reset` ends it without a flush"
        )
    if not end.ended:
        return f"{end.name}: asked to end, but Ray has not reported it dead"
    if action == "reset":
        return f"{end.name}: removed"
    if end.flushed is False:
        return f"{end.name}: stopped, but its last flush failed or left changes unwritten"
    return f"{end.name}: stopped (flushed, lease released)"


def _print_status(status: "ClusterStatus") -> None:
    print(
        f"deployment {status.deployment}: actors {status.actor_prefix}-<shard>"
        f" in Ray namespace {status.ray_namespace}"
    )
    if status.partitions is not None:
        print(f"{status.partitions} partitions, map version {status.partition_map_version}")
    _table(
        ("NODE", "ADDRESS", "STATE", "CPUS"),
        [
            (node.node_id[:12], node.address, "alive" if node.alive else "dead", f"{node.cpus:g}")
            for node in status.nodes
        ],
    )
    print()
    rows = []
    for shard in status.shards:
        actor, lease, fence = shard.actor, shard.lease, shard.fence
        rows.append(
            (
                str(shard.shard),
                "-" if actor is None else actor.state,
                "-" if actor is None else (actor.node_address or "-"),
                "-" if actor is None or actor.pid is None else str(actor.pid),
                "-" if actor is None else str(actor.restarts),
                "-" if actor is None else (actor.owner_state or "no answer"),
                _partitions(shard),
                "-" if actor is None else _or_dash(actor.in_flight_commands),
                "-" if actor is None else _or_dash(actor.pending_events),
                "-" if actor is None else _seconds(actor.flush_lag_ms),
                "-" if actor is None else _seconds(actor.last_flush_ago_ms),
                "-" if lease is None else lease.holder,
                "-" if lease is None else _seconds(lease.age_ms),
                _or_dash(shard.redis_token),
                "-" if fence is None else f"{fence.token}/{fence.generation}",
            )
        )
    _table(
        ("SHARD", "ACTOR", "NODE", "PID", "RESTARTS", "OWNER", "PARTITIONS", "IN FLIGHT",
         "PENDING", "FLUSH LAG", "LAST FLUSH", "LEASE HOLDER", "AGE", "REDIS TOKEN",
         "FENCE TOKEN/GEN"),
        rows,
    )  # fmt: skip
    for line in status.unreachable:
        print(f"unreachable: {line}")


def _partitions(shard: "ShardStatus") -> str:
    """The map's count for the shard; "loaded/mapped" while its owner has not caught up."""
    mapped, actor = shard.partitions, shard.actor
    loaded = None if actor is None else actor.partitions
    if mapped is None:
        return _or_dash(loaded)
    if loaded is None or loaded == mapped:
        return str(mapped)
    return f"{loaded}/{mapped}"


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _seconds(ms: int | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f}s"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())

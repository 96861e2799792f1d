"""A deployment's shard actors on a running Ray cluster, as an operator sees them.

The work behind ``slotengine cluster status|stop|reset``: find the
deployment's actors by their names (``engine.shell.actor_identity``) in the
Ray namespace; report the Ray nodes and, for each shard, its actor (state in
Ray's actor table, node, pid, restarts; what its owner says of itself: state,
token, its lease's validity, commands in flight, the writer's backlog and
flush lag), its lease in Redis (holder, age, time left, the fencing counter)
and its fence row in PostgreSQL (token, owner, age of its last write), each
where reachable; stop the actors gracefully (each flushes
and releases its lease, then is ended for good), or remove them whatever
their state.

The caller attaches to the cluster (``ray.init``) and names the deployment;
this module must never start a Ray cluster, create an actor, or write a
lease, a fence or a row: ending actors is the only change it makes.
"""

import asyncio
import contextlib
from datetime import UTC
from typing import Any, Final, cast

import asyncpg
import msgspec
import ray
import ray.exceptions
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from config.redis_client import redis_client
from config.redis_keys import RedisKeys
from engine.core.routing import PartitionMap
from engine.shell import limits
from engine.shell.actor_identity import RAY_NAMESPACE, shard_of
from engine.shell.owner import OwnerStatistics
from engine.shell.ray_actor import end_shard_actors
from persistence import limits as storage_limits
from persistence.partitioning import load_partition_map

# An actor that does not say how its owner is within this long is reported as
# not answering: the status must not hang on a wedged actor.
OWNER_QUESTION_TIMEOUT_MS: Final = 2_000


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    address: str
    alive: bool
    cpus: float


class ActorStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One shard actor: where Ray runs it, and what its owner says of itself.

    Its facts are the actor's as a whole (today it serves one shard). Those
    from ``owner_token`` on are its own answer, None when it did not answer
    (or has no storage, or no writer while it starts or reloads).
    """

    name: str
    # Ray's actor state: ALIVE, RESTARTING, PENDING_CREATION, DEPENDENCIES_UNREADY, DEAD.
    state: str
    node_id: str | None
    node_address: str | None
    pid: int | None
    restarts: int
    # The shard owner's state (starting, serving, rebuilding, degraded, stopped), "in-memory"
    # for a shard without storage, None when the actor did not answer.
    owner_state: str | None
    owner_token: int | None = None
    # How much longer the owner may take changes on its lease, by its own clock
    # (renewed every 2 s; 0: it refuses changes until Redis answers again).
    lease_valid_for_ms: int | None = None
    # Reloads from PostgreSQL after a failed flush or a lapsed lease, since it started.
    rebuilds: int | None = None
    # Batches applied whose replies wait for their commit, and their commands.
    in_flight_batches: int | None = None
    in_flight_commands: int | None = None
    # Events handed to the writer and not committed yet.
    pending_events: int | None = None
    # The age of the oldest change not committed yet (0: everything is committed).
    flush_lag_ms: int | None = None
    # Since its writer's last commit (None: none yet).
    last_flush_ago_ms: int | None = None
    # The partitions its owner loaded, and the generation of that set: behind the
    # map's count (ShardStatus.partitions) until it has reloaded after a move.
    partitions: int | None = None
    partitions_generation: int | None = None


class LeaseStatus(msgspec.Struct, frozen=True, kw_only=True):
    holder: str
    # Since the holder last took or renewed it (renewed every 2 s while healthy).
    age_ms: int
    expires_in_ms: int


class FenceStatus(msgspec.Struct, frozen=True, kw_only=True):
    token: int
    owner: str
    # When it last moved or was written with (ISO 8601 UTC): every flush writes it.
    updated_at: str
    # Since then, by PostgreSQL's clock: the age of the shard's last commit.
    age_ms: int
    # Raised whenever a partition leaves or joins the shard: a flush must carry it.
    generation: int = 0


class ShardStatus(msgspec.Struct, frozen=True, kw_only=True):
    shard: int
    actor: ActorStatus | None
    lease: LeaseStatus | None
    # The fencing counter in Redis: the token the next owner builds on.
    redis_token: int | None
    fence: FenceStatus | None
    # The partitions the stored map gives the shard (None: PostgreSQL unread).
    partitions: int | None = None


class ClusterStatus(msgspec.Struct, frozen=True, kw_only=True):
    deployment: str
    ray_namespace: str
    actor_prefix: str
    nodes: list[NodeStatus]
    shards: list[ShardStatus]
    # What could not be read, one line each ("redis: ...", "postgresql: ...").
    unreachable: list[str]
    # P, and the version of the stored partition map (None: none yet, or unread).
    partitions: int | None = None
    partition_map_version: int | None = None


class ShardEnd(msgspec.Struct, frozen=True, kw_only=True):
    """What became of one actor asked to stop or removed."""

    shard: int
    name: str
    ended: bool
    # After a graceful stop: its last flush left nothing pending and did not fail.
    flushed: bool | None = None
    error: str | None = None


def deployment_actors(
    name_prefix: str, namespace: str = RAY_NAMESPACE
) -> list[tuple[int, str, Any]]:
    """(shard, name, handle) of every live actor named for the deployment, by shard."""
    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        shard = shard_of(entry["name"], name_prefix)
        if entry["namespace"] != namespace or shard is None:
            continue
        try:
            handle = ray.get_actor(entry["name"], namespace=namespace)
        except ValueError:
            continue  # ended since it was listed
        found.append((shard, entry["name"], handle))
    return sorted(found, key=lambda item: item[0])


async def cluster_status(
    *,
    deployment: str,
    name_prefix: str,
    database_url: str,
    redis_url: str | None,
    shard_count: int,
    namespace: str = RAY_NAMESPACE,
) -> ClusterStatus:
    nodes = [
        NodeStatus(
            node_id=node["NodeID"],
            address=node["NodeManagerAddress"],
            alive=bool(node["Alive"]),
            cpus=float(node.get("Resources", {}).get("CPU", 0.0)),
        )
        for node in ray.nodes()  # type: ignore[no-untyped-call]
    ]
    addresses = {node.node_id: node.address for node in nodes}
    found = deployment_actors(name_prefix, namespace)
    # Asked all at once: wedged actors cost one question's timeout, not one each.
    answers = await asyncio.gather(
        *(_actor_status(name, handle, addresses) for _, name, handle in found)
    )
    actors = {shard: answer for (shard, _, _), answer in zip(found, answers, strict=True)}
    unreachable: list[str] = []
    fences, stored_map = await _fences(database_url, unreachable)
    owned = stored_map.counts() if stored_map is not None else {}
    # The shards the map names (``shard_count``, the configured count, without a map);
    # a fence row left by a shard scaled away is history, not a shard.
    counted = shard_count if stored_map is None else stored_map.shard_count
    shards = sorted({*range(counted), *actors, *owned})
    leases = await _leases(redis_url, deployment, shards, unreachable)
    return ClusterStatus(
        deployment=deployment,
        ray_namespace=namespace,
        actor_prefix=name_prefix,
        nodes=nodes,
        shards=[
            ShardStatus(
                shard=shard,
                actor=actors.get(shard),
                lease=leases.get(shard, (None, None))[0],
                redis_token=leases.get(shard, (None, None))[1],
                fence=fences.get(shard),
                partitions=None if stored_map is None else owned.get(shard, 0),
            )
            for shard in shards
        ],
        unreachable=unreachable,
        partitions=None if stored_map is None else stored_map.partitions,
        partition_map_version=None if stored_map is None else stored_map.version,
    )


async def stop_actors(name_prefix: str, namespace: str = RAY_NAMESPACE) -> list[ShardEnd]:
    """Stop every actor of the deployment gracefully, then end it for good.

    An actor that does not stop in time is left running (its changes may not
    be flushed yet): ``remove_actors`` ends it whatever its state.
    """
    found = deployment_actors(name_prefix, namespace)
    asked = await asyncio.gather(*(_stop(handle) for _, _, handle in found), return_exceptions=True)
    stopped = [
        handle for (_, _, handle), answer in zip(found, asked, strict=True) if _stopped(answer)
    ]
    dead = await _end(stopped)
    ends = []
    for (shard, name, handle), answer in zip(found, asked, strict=True):
        if not _stopped(answer):
            ends.append(ShardEnd(shard=shard, name=name, ended=False, error=_why(answer)))
            continue
        statistics = cast(OwnerStatistics | None, answer)
        writer = statistics.writer if statistics is not None else None
        ends.append(
            ShardEnd(
                shard=shard,
                name=name,
                ended=dead.get(id(handle), False),
                flushed=writer is None or (writer.pending_events == 0 and not writer.failed),
            )
        )
    return ends


async def remove_actors(name_prefix: str, namespace: str = RAY_NAMESPACE) -> list[ShardEnd]:
    """End every actor of the deployment for good, whatever its state (no flush)."""
    found = deployment_actors(name_prefix, namespace)
    dead = await _end([handle for _, _, handle in found])
    return [
        ShardEnd(shard=shard, name=name, ended=dead.get(id(handle), False))
        for shard, name, handle in found
    ]


async def _stop(handle: Any) -> OwnerStatistics | None:
    async with asyncio.timeout(limits.ACTOR_STOP_TIMEOUT_MS / 1000):
        return cast(OwnerStatistics | None, await handle.stop.remote())


def _stopped(answer: object) -> bool:
    return not isinstance(answer, BaseException)


def _why(answer: object) -> str:
    if isinstance(answer, TimeoutError):
        return f"did not stop within {limits.ACTOR_STOP_TIMEOUT_MS} ms"
    return " ".join(repr(answer).split())


async def _end(handles: list[Any]) -> dict[int, bool]:
    """Whether each actor (by ``id`` of its handle) is dead for good."""

    async def end(handle: Any) -> bool:
        try:
            await end_shard_actors([handle], timeout_ms=limits.ACTOR_END_TIMEOUT_MS)
        except TimeoutError:
            return False
        return True

    outcomes = await asyncio.gather(*(end(handle) for handle in handles))
    return {id(handle): dead for handle, dead in zip(handles, outcomes, strict=True)}


async def _actor_status(name: str, handle: Any, addresses: dict[str, str]) -> ActorStatus:
    # Ray's actor table, read from the GCS (the state API needs the dashboard).
    entry: dict[str, Any] = ray._private.state.actors(actor_id=handle._actor_id.hex())
    address = entry.get("Address") or {}
    node_id = address.get("NodeID") or None
    owner_state: str | None = None
    statistics: OwnerStatistics | None = None
    if entry.get("State") == "ALIVE":
        with contextlib.suppress(TimeoutError, ray.exceptions.RayError):
            async with asyncio.timeout(OWNER_QUESTION_TIMEOUT_MS / 1000):
                statistics = await handle.owner_statistics.remote()
            owner_state = "in-memory" if statistics is None else statistics.state
    return ActorStatus(
        name=name,
        state=str(entry.get("State", "UNKNOWN")),
        node_id=node_id,
        node_address=addresses.get(node_id or "") or address.get("IPAddress") or None,
        pid=entry.get("Pid") or None,
        restarts=int(entry.get("NumRestarts", 0)),
        owner_state=owner_state,
        **owner_facts(statistics),
    )


def owner_facts(statistics: OwnerStatistics | None) -> dict[str, Any]:
    """The fields of ``ActorStatus`` an owner's statistics give (None: unknown)."""
    if statistics is None:
        return {}
    runtime, writer = statistics.runtime, statistics.writer
    return {
        "owner_token": statistics.token,
        "lease_valid_for_ms": statistics.lease_valid_for_ms,
        "rebuilds": statistics.rebuilds,
        "in_flight_batches": None if runtime is None else runtime.in_flight_batches,
        "in_flight_commands": None if runtime is None else runtime.in_flight_commands,
        "pending_events": None if writer is None else writer.pending_events,
        "flush_lag_ms": None if writer is None else writer.flush_lag_ms,
        "last_flush_ago_ms": None if writer is None else writer.last_flush_ago_ms,
        "partitions": statistics.partitions,
        "partitions_generation": statistics.partitions_generation,
    }


async def _fences(
    database_url: str, unreachable: list[str]
) -> tuple[dict[int, FenceStatus], PartitionMap | None]:
    """Each shard's fence row, and the stored partition map."""
    try:
        connection = await asyncpg.connect(
            database_url, timeout=storage_limits.DATABASE_CONNECT_TIMEOUT_MS / 1000
        )
        try:
            stored_map = await load_partition_map(connection)
            rows = await connection.fetch(
                "SELECT shard, token, owner, generation, updated_at,"
                " (extract(epoch FROM now() - updated_at) * 1000)::bigint AS age_ms"
                " FROM shard_fences ORDER BY shard",
                timeout=storage_limits.DATABASE_STATEMENT_TIMEOUT_MS / 1000,
            )
        finally:
            await connection.close()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        unreachable.append(f"postgresql: {type(error).__name__}: {error}")
        return {}, None
    fences = {
        row["shard"]: FenceStatus(
            token=int(row["token"]),
            owner=row["owner"],
            updated_at=row["updated_at"].astimezone(UTC).isoformat(timespec="milliseconds"),
            age_ms=max(0, int(row["age_ms"])),
            generation=int(row["generation"]),
        )
        for row in rows
    }
    return fences, stored_map


async def _leases(
    redis_url: str | None, deployment: str, shards: list[int], unreachable: list[str]
) -> dict[int, tuple[LeaseStatus | None, int | None]]:
    """Each shard's (lease, fencing counter) in Redis."""
    if redis_url is None:
        unreachable.append("redis: no REDIS_URL")
        return {}
    timeout_s = limits.REDIS_CALL_TIMEOUT_MS / 1000
    client = redis_client(
        redis_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    keys = RedisKeys(deployment)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.get(keys.shard_owner(shard))
                pipe.pttl(keys.shard_owner(shard))
                pipe.get(keys.shard_token(shard))
            answers = await pipe.execute()
    except (OSError, TimeoutError, redis.exceptions.RedisError) as error:
        unreachable.append(f"redis: {type(error).__name__}: {error}")
        return {}
    finally:
        with contextlib.suppress(OSError, redis.exceptions.RedisError):
            await client.aclose()
    found: dict[int, tuple[LeaseStatus | None, int | None]] = {}
    for index, shard in enumerate(shards):
        holder, ttl_ms, token = answers[3 * index : 3 * index + 3]
        lease = None
        if holder is not None and ttl_ms is not None and ttl_ms > 0:
            lease = LeaseStatus(
                holder=holder.decode() if isinstance(holder, bytes) else str(holder),
                age_ms=max(0, storage_limits.LEASE_TTL_MS - int(ttl_ms)),
                expires_in_ms=int(ttl_ms),
            )
        found[shard] = (lease, None if token is None else int(token))
    return found

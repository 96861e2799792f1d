"""Scaling a deployment's shard actors on a running Ray cluster while they serve.

The work behind ``slotengine cluster scale --shards N`` and ``slotengine
cluster rebalance``. Scaling up creates the actors of the new shards (named,
placed and proven like those of a start: ``engine.shell.ray_actor``), which
start serving no partition, then moves partitions to them live
(``engine.shell.rebalance``). Scaling down moves every partition of the shards
that go to those that stay, leaves them serving nothing for
``RETIRE_AFTER_MS`` (a gateway that still routes there by an older map is
told ``partitionNotServed`` and reads the new one), then stops each
gracefully and ends it. Every gateway is told of each new map on its bus
channel in Redis (``MAP_CHANGED``), and reads it again.

Rebalancing evens the partitions over the actors the map names, and the
actors over the nodes: an actor on a node with more than its share
(``ceil(actors / nodes)``) is restarted on the node with the fewest, one at
a time, gracefully (flushed, its lease released, its partitions loaded by the
new incarnation), so that a node that joined gets its share.

The caller attaches to the cluster (``ray.init``); this module must never
start a Ray cluster, nor end an actor that still serves a partition.
"""

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import msgspec
import ray
import ray.exceptions

from config.redis_client import redis_client
from config.redis_keys import MAP_CHANGED, RedisKeys
from engine.core.policy import DomainPolicy
from engine.shell import limits
from engine.shell.actor_identity import RAY_NAMESPACE, actor_name
from engine.shell.owner import StorageSettings
from engine.shell.ray_actor import (
    end_shard_actors,
    placement_nodes,
    spawn_shard_actor,
    spawn_shard_actors,
    wait_shards_ready,
)
from engine.shell.rebalance import (
    STEP_PARTITIONS_DEFAULT,
    MoveStep,
    RebalanceReport,
    read_map,
    rebalance,
)
from persistence.migrate import database_fingerprint_of

logger = logging.getLogger(__name__)

# How long a release or an adoption may take before the coordinator treats the
# shard as unreachable (a release then moves by force, fenced).
MOVE_CALL_TIMEOUT_MS: Final = 30_000
# How long shards scaled away keep answering partitionNotServed before they end.
RETIRE_AFTER_MS: Final = 3_000
# How often a gateway with SLOTENGINE_AUTO_REBALANCE looks for a node that joined,
# and how long a claim to rebalance (one scale or rebalance at a time) lasts at most.
AUTO_REBALANCE_EVERY_S: Final = 5.0
REBALANCE_CLAIM_TTL_MS: Final = 600_000


class Relocation(msgspec.Struct, frozen=True, kw_only=True):
    shard: int
    from_node: str | None
    to_node: str
    duration_ms: float


class ScaleReport(msgspec.Struct, frozen=True, kw_only=True):
    shards_before: int
    shards_after: int
    added: list[int]
    ended: list[int]
    moves: RebalanceReport
    relocations: list[Relocation] = []


class RayShardMoves:
    """``ShardMoves`` over the deployment's named actors."""

    def __init__(self, name_prefix: str, namespace: str = RAY_NAMESPACE) -> None:
        self._name_prefix = name_prefix
        self._namespace = namespace

    def _handle(self, shard: int) -> Any:
        return ray.get_actor(actor_name(shard, self._name_prefix), namespace=self._namespace)

    async def release(self, shard: int, moves: dict[int, int]) -> list[int]:
        async with asyncio.timeout(MOVE_CALL_TIMEOUT_MS / 1000):
            answer: list[int] = await self._handle(shard).release_partitions.remote(moves)
        return answer

    async def adopt(self, shard: int) -> list[int]:
        async with asyncio.timeout(MOVE_CALL_TIMEOUT_MS / 1000):
            answer: list[int] = await self._handle(shard).adopt_partitions.remote()
        return answer


class RebalanceBusy(RuntimeError):
    """Another scale or rebalance of the deployment is under way (one line)."""


@contextlib.asynccontextmanager
async def rebalance_claim(storage: StorageSettings) -> AsyncIterator[None]:
    """Hold the deployment's claim to move partitions and actors (``RedisKeys.
    rebalance_claim``, ``REBALANCE_CLAIM_TTL_MS`` at most) while the block runs:
    ``cluster scale``, ``cluster rebalance`` and the automatic rebalance never run
    two at a time. Raises ``RebalanceBusy`` when another holds it."""
    claim = RedisKeys(storage.namespace).rebalance_claim
    me = secrets.token_hex(8).encode()
    client = redis_client(storage.redis_url)
    try:
        async with asyncio.timeout(limits.REDIS_CALL_TIMEOUT_MS / 1000):
            claimed = await client.set(claim, me, nx=True, px=REBALANCE_CLAIM_TTL_MS)
            holder = None if claimed else await client.get(claim)
        if not claimed:
            raise RebalanceBusy(
                "another scale or rebalance of this deployment is under way"
                f" (claim {claim} held by {holder!r}; it lapses within"
                f" {REBALANCE_CLAIM_TTL_MS // 1000} s)"
            )
        try:
            yield
        finally:
            async with asyncio.timeout(limits.REDIS_CALL_TIMEOUT_MS / 1000):
                if await client.get(claim) == me:
                    await client.delete(claim)
    finally:
        await client.aclose()


async def announce_map(storage: StorageSettings) -> None:
    """Tell every gateway that the partition map changed (they read it again)."""
    client = redis_client(storage.redis_url)
    try:
        async with asyncio.timeout(limits.REDIS_CALL_TIMEOUT_MS / 1000):
            await client.publish(RedisKeys(storage.namespace).bus_channel, MAP_CHANGED)
    except Exception as error:  # the gateways find out at their next refusal or poll
        logger.warning("the map change could not be announced: %r", error)
    finally:
        await client.aclose()


async def scale(
    *,
    shard_count: int,
    policies: dict[str, DomainPolicy],
    storage: StorageSettings,
    name_prefix: str,
    namespace: str = RAY_NAMESPACE,
    step_partitions: int = STEP_PARTITIONS_DEFAULT,
    on_step: Callable[[MoveStep], None] | None = None,
) -> ScaleReport:
    """Serve the deployment with ``shard_count`` shard actors, moving partitions live
    (holding ``rebalance_claim``)."""
    if shard_count < 1:
        raise ValueError("at least one shard")
    async with rebalance_claim(storage):
        return await _scale(
            shard_count,
            policies,
            storage,
            name_prefix,
            namespace,
            step_partitions,
            on_step,
        )


async def _scale(
    shard_count: int,
    policies: dict[str, DomainPolicy],
    storage: StorageSettings,
    name_prefix: str,
    namespace: str,
    step_partitions: int,
    on_step: Callable[[MoveStep], None] | None,
) -> ScaleReport:
    before = (await read_map(storage.database_url)).shard_count
    if shard_count > before:
        await _add_actors(before, shard_count, policies, storage, name_prefix, namespace)

    def step_done(step: MoveStep) -> None:
        asyncio.get_running_loop().create_task(announce_map(storage))
        if on_step is not None:
            on_step(step)

    moves = await rebalance(
        storage.database_url,
        RayShardMoves(name_prefix, namespace),
        shard_count,
        step_partitions=step_partitions,
        on_step=step_done,
    )
    await announce_map(storage)
    ended: list[int] = []
    if shard_count < before:
        await asyncio.sleep(RETIRE_AFTER_MS / 1000)
        ended = await _end_actors(range(shard_count, before), storage, name_prefix, namespace)
    return ScaleReport(
        shards_before=before,
        shards_after=shard_count,
        added=list(range(before, shard_count)),
        ended=ended,
        moves=moves,
    )


async def rebalance_cluster(
    *,
    policies: dict[str, DomainPolicy],
    storage: StorageSettings,
    name_prefix: str,
    namespace: str = RAY_NAMESPACE,
    step_partitions: int = STEP_PARTITIONS_DEFAULT,
    on_step: Callable[[MoveStep], None] | None = None,
) -> ScaleReport:
    """Even the partitions over the map's shards, then the actors over the nodes
    (holding ``rebalance_claim``)."""
    async with rebalance_claim(storage):
        report = await _scale(
            (await read_map(storage.database_url)).shard_count,
            policies,
            storage,
            name_prefix,
            namespace,
            step_partitions,
            on_step,
        )
        relocations = await even_nodes(
            shard_count=report.shards_after,
            policies=policies,
            storage=storage,
            name_prefix=name_prefix,
            namespace=namespace,
        )
    return msgspec.structs.replace(report, relocations=relocations)


def actor_nodes(shard_count: int, name_prefix: str, namespace: str) -> dict[int, str | None]:
    """The node each shard's actor runs on (None: not running)."""
    import ray._private.state

    nodes: dict[int, str | None] = {}
    for shard in range(shard_count):
        try:
            handle = ray.get_actor(actor_name(shard, name_prefix), namespace=namespace)
        except ValueError:
            nodes[shard] = None
            continue
        entry: dict[str, Any] = ray._private.state.actors(actor_id=handle._actor_id.hex())
        address = entry.get("Address") or {}
        alive = entry.get("State") == "ALIVE"
        nodes[shard] = (address.get("NodeID") or None) if alive else None
    return nodes


def uneven_shard(nodes: list[str], placed: dict[int, str | None]) -> tuple[int, str] | None:
    """An actor to move and the node it goes to, or None when every node holds at
    most ``ceil(actors / nodes)`` and at least ``floor(actors / nodes)``."""
    if not nodes:
        return None
    counts = dict.fromkeys(nodes, 0)
    for node in placed.values():
        if node in counts:
            counts[node] += 1
    ceiling = math.ceil(len(placed) / len(nodes))
    floor = len(placed) // len(nodes)
    fullest = max(nodes, key=lambda node: (counts[node], node))
    emptiest = min(nodes, key=lambda node: (counts[node], node))
    if counts[fullest] <= ceiling and counts[emptiest] >= floor:
        return None
    if counts[fullest] - counts[emptiest] < 2:
        return None
    shard = max(shard for shard, node in placed.items() if node == fullest)
    return shard, emptiest


async def even_nodes(
    *,
    shard_count: int,
    policies: dict[str, DomainPolicy],
    storage: StorageSettings,
    name_prefix: str,
    namespace: str = RAY_NAMESPACE,
) -> list[Relocation]:
    """Restart actors, one at a time, from the fullest nodes on the emptiest."""
    relocations: list[Relocation] = []
    for _ in range(shard_count):
        placed = actor_nodes(shard_count, name_prefix, namespace)
        move = uneven_shard(placement_nodes(), placed)
        if move is None:
            break
        shard, node = move
        started = time.perf_counter()
        await _end_actors([shard], storage, name_prefix, namespace, serving_ok=True)
        handle = spawn_shard_actor(
            shard,
            shard_count=shard_count,
            policies=policies,
            namespace=namespace,
            name_prefix=name_prefix,
            storage=storage,
            node=node,
        )
        await _ready([handle], shard, storage, name_prefix)
        relocations.append(
            Relocation(
                shard=shard,
                from_node=placed[shard],
                to_node=node,
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        )
        logger.info("shard %d moved from node %s to %s", shard, placed[shard], node)
    return relocations


async def _add_actors(
    before: int,
    shard_count: int,
    policies: dict[str, DomainPolicy],
    storage: StorageSettings,
    name_prefix: str,
    namespace: str,
) -> None:
    handles = spawn_shard_actors(
        shard_count=shard_count,
        policies=policies,
        namespace=namespace,
        name_prefix=name_prefix,
        storage=storage,
        first_shard=before,
    )
    await _ready(handles, before, storage, name_prefix)


async def _ready(handles: list[Any], first: int, storage: StorageSettings, prefix: str) -> None:
    await wait_shards_ready(
        handles,
        timeout_ms=limits.ACTOR_START_TIMEOUT_MS,
        deployment=storage.namespace,
        database=await database_fingerprint_of(storage.database_url),
        name_prefix=prefix,
        first_shard=first,
    )


async def _end_actors(
    shards: "range | list[int]",
    storage: StorageSettings,
    name_prefix: str,
    namespace: str,
    *,
    serving_ok: bool = False,
) -> list[int]:
    """Stop the shards' actors gracefully and end them; unless ``serving_ok`` (a
    restart elsewhere), only those the map leaves without a partition."""
    current = await read_map(storage.database_url)
    ended = []
    for shard in shards:
        if not serving_ok and shard in current.counts():
            raise RuntimeError(f"shard {shard} still serves partitions: it is not ended")
        try:
            handle = ray.get_actor(actor_name(shard, name_prefix), namespace=namespace)
        except ValueError:
            continue
        try:
            async with asyncio.timeout(limits.ACTOR_STOP_TIMEOUT_MS / 1000):
                await handle.stop.remote()
        except (TimeoutError, ray.exceptions.RayError) as error:
            logger.warning("shard %d did not stop gracefully: %r; ending it", shard, error)
        await end_shard_actors([handle], timeout_ms=limits.ACTOR_END_TIMEOUT_MS)
        ended.append(shard)
    return ended


async def auto_rebalance(
    *,
    policies: dict[str, DomainPolicy],
    storage: StorageSettings,
    name_prefix: str,
    namespace: str = RAY_NAMESPACE,
    every_s: float = AUTO_REBALANCE_EVERY_S,
) -> None:
    """Until cancelled: when a node that takes actors joins, even the actors over the
    nodes (``even_nodes``), one gateway of the deployment at a time (a claim in
    Redis, ``RedisKeys.rebalance_claim``). A lost node is not a reason: its actors
    restart elsewhere by themselves, and a node coming back counts as joining."""
    known: frozenset[str] | None = None
    while True:
        await asyncio.sleep(every_s)
        try:
            nodes = frozenset(await asyncio.to_thread(placement_nodes))
            joined = known is not None and not nodes <= known
            known = nodes
            if not joined:
                continue
            async with rebalance_claim(storage):
                shard_count = (await read_map(storage.database_url)).shard_count
                moved = await even_nodes(
                    shard_count=shard_count,
                    policies=policies,
                    storage=storage,
                    name_prefix=name_prefix,
                    namespace=namespace,
                )
            logger.info("a node joined: %d shard actors moved to even the nodes", len(moved))
        except asyncio.CancelledError:
            raise
        except RebalanceBusy:
            continue  # another gateway (or an operator) does it
        except Exception as error:  # the next round tries again
            logger.warning("automatic rebalance failed: %r", error)
            known = None

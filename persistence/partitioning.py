"""The partition map in PostgreSQL: P, recorded once, and which shard serves each partition.

A slot's partition is ``routing key % P`` (``engine/core/routing.py``); P is
chosen when the database is created (``SLOTENGINE_PARTITIONS``, default
``PARTITIONS_DEFAULT``) and never changes, so a start that asks for another P
is refused. The map (the ``partitions`` rows, versioned by ``partition_map``)
says which shard serves each partition. Moving a partition raises the fence
generation of every shard whose set changes, in the transaction that moves
it (see ``0003_partitions.sql``): the shard that lost it can no longer commit
anything, and the shard that gained it reloads before it serves it.

This module owns those rows and that transaction. It must never read or
write a partition's data (``persistence/store.py`` loads and flushes it), nor
decide on its own that a partition should move: starts and operators do.
"""

import asyncio
from collections.abc import Mapping

import asyncpg

from engine.core.routing import PARTITIONS_DEFAULT, PARTITIONS_MAX, PartitionMap
from persistence import limits


class PartitioningError(RuntimeError):
    """The database's partitions cannot serve what was asked (one line, for the operator)."""


async def load_partition_map(connection: asyncpg.Connection) -> PartitionMap | None:
    """The stored map, or None for a database that has none yet."""
    version = await connection.fetchval("SELECT version FROM partition_map")
    if version is None:
        return None
    owners = await connection.fetch("SELECT shard FROM partitions ORDER BY partition")
    return PartitionMap(tuple(row["shard"] for row in owners), version)


async def read_partition_map(database_url: str) -> PartitionMap:
    """The stored map, on a connection of its own, every wait bounded as a shard
    owner's (a gateway asks when a shard says a partition has moved)."""
    connection = await asyncpg.connect(
        database_url, timeout=limits.DATABASE_CONNECT_TIMEOUT_MS / 1000
    )
    try:
        async with asyncio.timeout(limits.DATABASE_STATEMENT_TIMEOUT_MS / 1000):
            stored = await load_partition_map(connection)
    finally:
        await connection.close()
    if stored is None:
        raise PartitioningError("the database has no partition map")
    return stored


async def ensure_partition_map(
    connection: asyncpg.Connection, *, partitions: int | None, shard_count: int
) -> PartitionMap:
    """The stored map; a database without one gets P = ``partitions`` (or the
    default) spread over ``shard_count`` shards. Refuses a ``partitions`` other
    than the recorded P. Never moves a partition."""
    async with connection.transaction():
        return await _ensure(connection, partitions=partitions, shard_count=shard_count)


async def establish_partitions(
    connection: asyncpg.Connection, *, partitions: int | None, shard_count: int
) -> tuple[PartitionMap, dict[int, tuple[int, int]]]:
    """At a start configured with ``shard_count`` shards: the map to serve, and the
    partitions it moved.

    As ``ensure_partition_map``. A start configured as the previous one was
    serves the map as it is, with the shard count it has (``slotengine
    cluster scale`` may have changed it while the engine ran). A start
    configured with another ``shard_count`` (the deployment's setting changed)
    moves the fewest partitions so that every shard of ``0..shard_count-1``
    serves its share, and records the setting. Raises ``PartitioningError``
    for a P other than the recorded one, or more shards than partitions.
    """
    async with connection.transaction():
        current = await _ensure(connection, partitions=partitions, shard_count=shard_count)
        configured = await connection.fetchval("SELECT configured_shards FROM partition_map")
        if configured == shard_count:
            return current, {}
        await connection.execute(
            "UPDATE partition_map SET configured_shards = $1, updated_at = now()", shard_count
        )
        if shard_count > current.partitions:
            raise PartitioningError(
                f"{shard_count} shards cannot share the database's {current.partitions}"
                " partitions: lower SLOTENGINE_SHARDS"
            )
        if set(current.owners) == set(range(shard_count)):
            return current, {}
        target = current.respread(shard_count)
        moved = current.moved(target)
        return await _reassign(connection, {p: to for p, (_, to) in moved.items()}), moved


async def move_partitions(
    connection: asyncpg.Connection, moves: Mapping[int, int], *, gainers_reload: bool = True
) -> PartitionMap:
    """Serve each partition of ``moves`` by its shard from now on, by force (its old
    owner does not hand it over); returns the new map.

    One transaction: the fence generation of every shard that loses a
    partition goes up (waiting for a flush of it in progress), so the loser can
    never commit again with what it loaded. So does the generation of every
    shard that gains one, unless ``gainers_reload`` is False: its next flush is
    then refused and it reloads, serving what it gained; the coordinator of a
    live move passes False, since it has the gainers adopt their partitions
    (``ShardOwner.adopt``) without a reload.
    """
    async with connection.transaction():
        await connection.execute("SELECT 1 FROM partition_map FOR UPDATE")
        return await _reassign(connection, moves, gainers_reload=gainers_reload)


async def _ensure(
    connection: asyncpg.Connection, *, partitions: int | None, shard_count: int
) -> PartitionMap:
    recorded = await connection.fetchval("SELECT partitions FROM partition_map FOR UPDATE")
    if recorded is None:
        count = PARTITIONS_DEFAULT if partitions is None else partitions
        if not 1 <= count <= PARTITIONS_MAX:
            raise PartitioningError(
                f"SLOTENGINE_PARTITIONS={count} is out of range (1..{PARTITIONS_MAX})"
            )
        if shard_count > count:
            raise PartitioningError(
                f"{shard_count} shards cannot share {count} partitions: raise"
                " SLOTENGINE_PARTITIONS or lower SLOTENGINE_SHARDS"
            )
        spread = PartitionMap.spread(count, shard_count)
        inserted = await connection.fetchval(
            "INSERT INTO partition_map (partitions, configured_shards) VALUES ($1, $2)"
            " ON CONFLICT (singleton) DO NOTHING RETURNING partitions",
            count,
            shard_count,
        )
        if inserted is not None:
            await connection.executemany(
                "INSERT INTO partitions (partition, shard) VALUES ($1, $2)",
                list(enumerate(spread.owners)),
            )
        recorded = await connection.fetchval("SELECT partitions FROM partition_map FOR UPDATE")
    if partitions is not None and partitions != recorded:
        raise PartitioningError(
            f"the database was created with {recorded} partitions, not"
            f" SLOTENGINE_PARTITIONS={partitions}: P never changes (unset it)"
        )
    stored = await load_partition_map(connection)
    assert stored is not None
    return stored


async def _reassign(
    connection: asyncpg.Connection, moves: Mapping[int, int], *, gainers_reload: bool = True
) -> PartitionMap:
    """Within the caller's transaction, holding the map row's lock."""
    rows = await connection.fetch(
        "SELECT partition, shard FROM partitions WHERE partition = ANY($1::int[])", list(moves)
    )
    if len(rows) != len(moves):
        raise PartitioningError("a move names a partition the database does not have")
    changed = {row["partition"]: (row["shard"], moves[row["partition"]]) for row in rows}
    changed = {p: shards for p, shards in changed.items() if shards[0] != shards[1]}
    if changed:
        touched = sorted(
            {shard for pair in changed.values() for shard in (pair if gainers_reload else pair[:1])}
        )
        # Movers hold the map row's lock, so they never wait for each other here; a
        # flush holds one fence row, so this waits for at most the flushes in progress.
        await connection.execute(
            "UPDATE shard_fences SET generation = generation + 1, updated_at = now()"
            " WHERE shard = ANY($1::int[])",
            touched,
        )
        await connection.execute(
            "UPDATE partitions p SET shard = m.shard, previous_shard = p.shard, moved_at = now()"
            " FROM unnest($1::int[], $2::int[]) AS m (partition, shard)"
            " WHERE p.partition = m.partition",
            list(changed),
            [to for _, to in changed.values()],
        )
        await connection.execute(
            "UPDATE partition_map SET version = version + 1, updated_at = now()"
        )
    stored = await load_partition_map(connection)
    assert stored is not None
    return stored

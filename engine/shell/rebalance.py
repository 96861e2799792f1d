"""Live partition moves: spreading the partitions over a number of shards while they serve.

The coordinator of a move. It reads the stored partition map, works out the
fewest moves that give every shard of ``0..shard_count-1`` its fair share
(``PartitionMap.respread``), and carries them out in steps of at most
``step_partitions`` partitions per losing shard, so that each partition is
unavailable only for the moment of its own step and the others serve on:

1. every losing shard ``release``s its step's partitions, in parallel: it
   stops taking changes for them, lets what it took commit, and reassigns
   them in the map in one transaction that raises its own fence generation
   (``persistence.store.hand_over``);
2. every gaining shard ``adopt``s: it loads only the partitions the map now
   gives it, merges them into its running core and re-arms their timers
   (``persistence.store.take_partitions``).

A losing shard that cannot be reached (dead, frozen) loses its partitions by
force instead: ``persistence.partitioning.move_partitions`` raises its fence
generation, so a late flush of the unreachable owner is refused in
PostgreSQL, and the gaining shard adopts as usual. Before the
first step and after the last, every shard adopts whatever the map gives it:
a coordinator that stopped half way (between a release and its adoption)
leaves nothing unserved once the next one has run.

It talks to the shards only through ``ShardMoves`` (the in-process host and
the Ray actors both implement it) and to PostgreSQL only for the map; it must
never change a shard's state itself, nor move a partition without either the
old owner's hand-over or the fence of a forced move.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final, Protocol

import asyncpg
import msgspec

from engine.core.routing import PartitionMap
from persistence import limits as storage_limits
from persistence.partitioning import load_partition_map, move_partitions

logger = logging.getLogger(__name__)

# Partitions one losing shard hands over per step: the larger, the fewer steps;
# the smaller, the shorter each partition's pause (its step's release and load).
STEP_PARTITIONS_DEFAULT: Final = 256


class ShardMoves(Protocol):
    """What the coordinator asks of a deployment's shards."""

    async def release(self, shard: int, moves: dict[int, int]) -> list[int]:
        """The shard hands ``moves`` (partition -> new shard) over; the partitions it
        handed over. Raises if it cannot be reached."""
        ...

    async def adopt(self, shard: int) -> list[int]:
        """The shard takes what the map gives it beyond what it serves; the partitions taken."""
        ...


class MoveStep(msgspec.Struct, frozen=True, kw_only=True):
    partitions: int
    # Losing shards that could not be reached: their partitions moved by force.
    forced_from: list[int]
    duration_ms: float


class RebalanceReport(msgspec.Struct, frozen=True, kw_only=True):
    shard_count: int
    partitions: int
    map_version_before: int
    map_version_after: int
    # Partitions that changed shard, and how many of them by force.
    moved: int
    forced: int
    steps: list[MoveStep]
    duration_ms: float
    # Partitions per shard afterwards.
    counts: dict[int, int]


async def read_map(database_url: str) -> PartitionMap:
    connection = await _connect(database_url)
    try:
        stored = await load_partition_map(connection)
    finally:
        await connection.close()
    if stored is None:
        raise LookupError("the database has no partition map yet: start the engine first")
    return stored


async def rebalance(
    database_url: str,
    shards: ShardMoves,
    shard_count: int,
    *,
    step_partitions: int = STEP_PARTITIONS_DEFAULT,
    on_step: Callable[[MoveStep], None] | None = None,
) -> RebalanceReport:
    """Spread the partitions evenly over shards ``0..shard_count-1``, moving the fewest.

    Every shard of ``0..shard_count-1`` must be serving (a new one with no
    partitions yet). Shards beyond ``shard_count`` lose all of theirs; the
    caller ends them afterwards.
    """
    if step_partitions < 1:
        raise ValueError("step_partitions must be at least 1")
    started = time.perf_counter()
    before = await read_map(database_url)
    await _adopt_everywhere(shards, range(max(shard_count, before.shard_count)))
    current = await read_map(database_url)
    target = current.respread(shard_count)
    losers: dict[int, dict[int, int]] = {}
    for partition, (source, destination) in sorted(current.moved(target).items()):
        losers.setdefault(source, {})[partition] = destination
    steps: list[MoveStep] = []
    moved = forced = 0
    while losers:
        chunk = {shard: _first(moves, step_partitions) for shard, moves in losers.items()}
        step = await _step(database_url, shards, chunk)
        steps.append(step)
        moved += step.partitions
        forced += sum(len(chunk[shard]) for shard in step.forced_from)
        if on_step is not None:
            on_step(step)
        for shard, moves in chunk.items():
            remaining = losers[shard]
            for partition in moves:
                del remaining[partition]
            if not remaining:
                del losers[shard]
    await _adopt_everywhere(shards, range(max(shard_count, current.shard_count)))
    after = await read_map(database_url)
    return RebalanceReport(
        shard_count=shard_count,
        partitions=after.partitions,
        map_version_before=before.version,
        map_version_after=after.version,
        moved=moved,
        forced=forced,
        steps=steps,
        duration_ms=(time.perf_counter() - started) * 1000,
        counts=dict(sorted(after.counts().items())),
    )


async def _step(
    database_url: str, shards: ShardMoves, chunk: dict[int, dict[int, int]]
) -> MoveStep:
    started = time.perf_counter()
    losers = list(chunk)
    answers = await asyncio.gather(
        *(shards.release(shard, chunk[shard]) for shard in losers), return_exceptions=True
    )
    forced_from: list[int] = []
    for shard, answer in zip(losers, answers, strict=True):
        if not isinstance(answer, BaseException):
            continue
        if isinstance(answer, asyncio.CancelledError):
            raise answer
        # Unreachable, or its hand-over failed (it then reloads what the map says):
        # whatever of its step is still its own moves by force, fenced.
        logger.warning("shard %d did not hand its partitions over: %r", shard, answer)
        current = await read_map(database_url)
        still = {p: to for p, to in chunk[shard].items() if current.owners[p] == shard}
        if still:
            connection = await _connect(database_url)
            try:
                await move_partitions(connection, still, gainers_reload=False)
            finally:
                await connection.close()
            forced_from.append(shard)
    gainers = sorted({to for moves in chunk.values() for to in moves.values()})
    await _adopt_everywhere(shards, gainers)
    return MoveStep(
        partitions=sum(len(moves) for moves in chunk.values()),
        forced_from=forced_from,
        duration_ms=(time.perf_counter() - started) * 1000,
    )


async def _adopt_everywhere(shards: ShardMoves, which: "range | list[int]") -> None:
    answers = await asyncio.gather(
        *(shards.adopt(shard) for shard in which), return_exceptions=True
    )
    for shard, answer in zip(which, answers, strict=True):
        if isinstance(answer, asyncio.CancelledError):
            raise answer
        if isinstance(answer, BaseException):
            # It is reloading or restarting: a load reads the map, so it takes them then.
            logger.warning("shard %d did not adopt its partitions now: %r", shard, answer)


def _first(moves: dict[int, int], count: int) -> dict[int, int]:
    return dict(list(moves.items())[:count])


async def _connect(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        database_url,
        timeout=storage_limits.DATABASE_CONNECT_TIMEOUT_MS / 1000,
        command_timeout=storage_limits.DATABASE_STATEMENT_TIMEOUT_MS / 1000,
    )

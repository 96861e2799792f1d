"""A seeded simulation of the live move protocol, with a crash at every step of it.

Three durable owners (real PostgreSQL and Redis, in this event loop) serve
P = 8 partitions while two clients reserve, confirm, cancel and queue, and a
ledger keeps every change they were told of. A seeded sequence of moves
(random partitions of a random shard to random other shards) runs through
the real coordinator step (``engine.shell.rebalance._step``) and the real
owner methods; each move carries one fault, drawn so that every seed meets
every fault once:

- the old owner killed after its core released the partitions (before the
  hand-over), after the hand-over committed (before its reply), or after its
  reply; a new incarnation with a new token takes its shard over, at once or
  only after the next move;
- the old owner paused: as a whole with a flush of a moving partition held
  back (the coordinator moves the partitions by force; the paused owner still
  holds them in memory, then wakes and its late writes are refused), with
  such a flush held back while its release waits for it (moved by force as
  well), inside its hand-over before the commit, or after the commit before
  its reply;
- the new owner killed before the coordinator asks it, before its load, after
  its load (before its core adopts), or after its core adopted;
- the coordinator stopped after the releases, before any adoption: a fresh
  ``rebalance`` heals it.

The steps are observed where they happen: ``hand_over`` and
``take_partitions`` are wrapped where the owner calls them, and the
coordinator talks to the owners through this module's ``ShardMoves``. After
every step the single-writer invariant is checked: for each partition, of
the live owners holding it in memory at most one could commit a write for it
(asked of PostgreSQL itself: an empty flush with the owner's token, owner
and generation, rolled back), and that one is the owner of the shard the
stored map names. A paused owner may still hold a moved partition, but any
write it attempts is refused: its replies are 503, never a 2xx.

At the end (after a final ``rebalance``) every partition is served by the
shard the map names and by nobody else, every acknowledged change is in
PostgreSQL, the reconciliation checks find nothing, and the holds acknowledged
before the moves expired, none early. The negative control pauses an owner
whose fence check is disabled: the invariant check reports it, and its late
write is acknowledged.

Last, a change committed by an owner that dies before replying is resent with
the same request id, as the coalescer does: a replacement of the same shard
answers it as the first time, and so does a shard the partition was moved to by
force meanwhile (request outcomes follow their partition: ``take_partitions``
adopts those its previous shard remembered lately), whether it adopts the
partition or reloads.

Crashes use the owner's own stop (``ShardOwner._stop``: core and writer
dropped without a flush, lease forgotten, not released) and a terminated
connection: what a killed process leaves behind, seen from outside.
"""

import asyncio
import itertools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg
import pytest

from engine.core import protocol as p
from engine.core.routing import PartitionMap, partition_of
from engine.core.states import BookingStatus
from engine.shell.clock import SystemClock
from engine.shell.errors import ShardUnreachable, ShellError
from engine.shell.owner import ShardOwner
from engine.shell.owner_states import OwnerState
from engine.shell.rebalance import _step, rebalance
from persistence.partitioning import (
    establish_partitions,
    load_partition_map,
    move_partitions,
    read_partition_map,
)
from persistence.rows import FlushRows
from persistence.store import Codecs, FenceRejected, hand_over, take_partitions, write_flush
from tests.persistence.helpers import Driver, create_slot, make_owner, request_id, slot_on
from tests.persistence.test_zombie import Gate
from tests.support.integrity import assert_consistent

logger = logging.getLogger(__name__)

P: Final = 8
SHARDS: Final = 3
HOLD_MS: Final = 5_000
CAPACITY: Final = 2
USERS: Final = 24
# How long the coordinator waits for a release, as a remote call's timeout would.
RELEASE_PATIENCE_S: Final = 0.6
# Bounds on waits for an owner to serve again (a reload) and for a hold to lapse.
SERVE_WAIT_S: Final = 20.0
EXPIRY_WAIT_S: Final = 30.0
COMMAND_TIMEOUT_S: Final = 2.0
SEEDS: Final = (11, 23, 37)

FAULTS: Final = (
    "old-killed-after-core-release",
    "old-killed-after-hand-over",
    "old-killed-after-reply",
    "old-paused-with-a-flush",
    "old-paused-flush-in-release",
    "old-paused-in-hand-over",
    "old-paused-after-hand-over",
    "new-killed-before-ask",
    "new-killed-before-load",
    "new-killed-after-load",
    "new-killed-after-adopt",
    "coordinator-stops-after-release",
    "none",
)


class Killed(Exception):
    """The owner's process is gone: nothing after this point of it runs."""


class Ledger:
    """What the clients were told: the newest acknowledged state of each booking,
    and the queue places acknowledged."""

    def __init__(self) -> None:
        self.bookings: dict[str, p.BookingResult] = {}
        self.joined: set[tuple[str, str]] = set()
        self.acknowledged = 0

    def record(self, result: p.AnyResult | None) -> None:
        if result is None or result.status >= 300:
            return
        if isinstance(result, p.BookingResult):
            self.acknowledged += 1
            known = self.bookings.get(result.booking.id)
            if known is None or known.booking.version <= result.booking.version:
                self.bookings[result.booking.id] = result
        elif isinstance(result, p.QueueResult):
            self.acknowledged += 1
            self.joined.add((result.entry.slot_id, result.entry.user_id))


class Simulation:
    """The shards' owners (every incarnation), the faults, and the invariant checks.

    It is the coordinator's ``ShardMoves``: a release is awaited for
    ``RELEASE_PATIENCE_S`` and otherwise reported unreachable while it runs on,
    as a remote call that timed out would."""

    def __init__(
        self,
        database_url: str,
        namespace: str,
        probe: asyncpg.Connection,
        rng: random.Random,
        *,
        fence_check: bool = True,
    ) -> None:
        self.database_url = database_url
        self.namespace = namespace
        self.probe = probe
        self.rng = rng
        self.fence_check = fence_check
        self.current: dict[int, ShardOwner] = {}
        self.everyone: dict[str, ShardOwner] = {}
        self.gates: dict[str, Gate] = {}
        self.killed: set[str] = set()
        self.incarnations = itertools.count(1)
        self.partition_map: PartitionMap | None = None
        # The fault of the move under way, where it strikes, and whether it struck.
        self.fault = "none"
        self.victim: int | None = None
        self.struck = False
        self.faults_struck: list[str] = []
        self.thaw = asyncio.Event()
        self.coordinator: asyncio.Task[Any] | None = None
        self.background: list[asyncio.Task[Any]] = []
        self.violations: list[str] = []
        self.checks = 0
        # Changes a paused owner took, then answered 503 (refused in PostgreSQL).
        self.late_refused = 0
        self._checking = asyncio.Lock()

    # -- owners ---------------------------------------------------------------

    async def start_owner(self, shard: int, succeeds: str = "") -> ShardOwner:
        name = f"shard{shard}-{next(self.incarnations)}"
        gate = Gate()
        owner = make_owner(
            self.database_url,
            self.namespace,
            shard=shard,
            shard_count=SHARDS,
            owner=name,
            succeeds=succeeds,
            before_flush=gate,
            fence_check=self.fence_check,
            hold_ttl_ms=HOLD_MS,
        )
        self.everyone[name] = owner
        self.gates[name] = gate
        await owner.start()
        self.current[shard] = owner
        return owner

    def kill(self, owner: ShardOwner) -> None:
        """The owner's process dies: nothing pending is flushed, its lease stays in
        Redis until it lapses, and its connection goes."""
        self.killed.add(owner.owner)
        connection = owner._connection
        owner._stop("the process was killed")
        if connection is not None:
            connection.terminate()
        logger.info("killed %s", owner.owner)

    async def replace_killed(self) -> None:
        for shard, owner in sorted(self.current.items()):
            if owner.owner in self.killed:
                # It knows its previous incarnation is gone: it takes the lease at once.
                await self.start_owner(shard, succeeds=owner.owner)
                await self.check(f"shard {shard} taken over after a kill")

    def dead(self) -> list[int]:
        return [s for s, owner in sorted(self.current.items()) if owner.owner in self.killed]

    def live(self) -> list[ShardOwner]:
        return [o for o in self.everyone.values() if o.owner not in self.killed]

    async def wait_serving(self) -> None:
        async with asyncio.timeout(SERVE_WAIT_S):
            while any(
                o.state is not OwnerState.SERVING
                for o in self.current.values()
                if o.owner not in self.killed
            ):
                await asyncio.sleep(0.02)

    # -- the invariant ----------------------------------------------------------

    async def _would_commit(self, owner: ShardOwner) -> bool:
        """Whether PostgreSQL takes a flush from ``owner`` now: an empty one with its
        writer's token, owner and generation, in a transaction rolled back."""
        writer = owner._writer
        if writer is None:
            return False
        try:
            async with self.probe.transaction():
                await write_flush(
                    self.probe,
                    FlushRows(owner.shard_id),
                    writer._token,
                    writer._owner,
                    Codecs(),
                    generation=writer._generation,
                    fence_check=writer._fence_check,
                )
                raise _RollBack
        except _RollBack:
            return True
        except FenceRejected:
            return False

    async def check(self, step: str) -> None:
        """The single-writer invariant after ``step``."""
        async with self._checking:
            self.checks += 1
            stored = await load_partition_map(self.probe)
            assert stored is not None
            holders: dict[int, list[ShardOwner]] = {}
            for owner in self.live():
                for partition in _held(owner):
                    holders.setdefault(partition, []).append(owner)
            for partition, owners in sorted(holders.items()):
                writers = [o for o in owners if await self._would_commit(o)]
                mapped = stored.owners[partition]
                if len(writers) > 1 or any(o.shard_id != mapped for o in writers):
                    self.violations.append(
                        f"after {step!r} (fault {self.fault}): partition {partition} of shard"
                        f" {mapped} could be written by {[o.owner for o in writers]}"
                        f" (held by {[o.owner for o in owners]})"
                    )

    async def read_map(self) -> PartitionMap:
        async with self._checking:
            stored = await load_partition_map(self.probe)
        assert stored is not None
        return stored

    async def assert_served_as_mapped(self) -> None:
        """Every partition held by the owner of the shard the map names, by nobody
        else, and that owner's writes are taken (the probe is no tautology)."""
        stored = await self.read_map()
        for partition in range(P):
            mapped = self.current[stored.owners[partition]]
            holders = [o.owner for o in self.live() if partition in _held(o)]
            assert holders == [mapped.owner], (partition, stored.owners[partition], holders)
            async with self._checking:
                assert await self._would_commit(mapped), mapped.owner

    # -- faults -----------------------------------------------------------------

    def strikes(self, fault: str, shard: int) -> bool:
        if self.fault != fault or self.victim != shard or self.struck:
            return False
        self.struck = True
        self.faults_struck.append(fault)
        logger.info("fault %s strikes shard %d", fault, shard)
        return True

    async def hand_over(
        self, real: Callable[..., Awaitable[int]], connection: Any, shard: int, *args: Any
    ) -> int:
        owner = self.everyone[args[1]]
        await self.check("the old owner's core released")
        if self.strikes("old-killed-after-core-release", shard):
            self.kill(owner)
            raise Killed
        if self.strikes("old-paused-in-hand-over", shard):
            await self.thaw.wait()
        raised = await real(connection, shard, *args)
        await self.check("the hand-over committed")
        if self.strikes("old-killed-after-hand-over", shard):
            self.kill(owner)
            raise Killed
        if self.strikes("old-paused-after-hand-over", shard):
            await self.thaw.wait()
        return raised

    async def take_partitions(
        self, real: Callable[..., Awaitable[Any]], connection: Any, shard: int, *args: Any
    ) -> Any:
        owner = self.everyone[args[1]]
        if self.strikes("new-killed-before-load", shard):
            self.kill(owner)
            raise Killed
        snapshot = await real(connection, shard, *args)
        await self.check("the new owner loaded")
        if self.strikes("new-killed-after-load", shard):
            self.kill(owner)
            raise Killed
        return snapshot

    # -- ShardMoves ---------------------------------------------------------------

    async def release(self, shard: int, moves: dict[int, int]) -> list[int]:
        owner = self.current[shard]
        if self.strikes("old-paused-with-a-flush", shard):
            # Paused as a whole: the call never reaches it.
            await asyncio.sleep(RELEASE_PATIENCE_S)
            raise ShardUnreachable(f"shard {shard}: no answer")
        # Reached while a flush of a moving partition is held back: the release waits.
        self.strikes("old-paused-flush-in-release", shard)
        running = asyncio.create_task(owner.release(moves))
        self.background.append(running)
        done, _ = await asyncio.wait([running], timeout=RELEASE_PATIENCE_S)
        if not done:
            raise ShardUnreachable(f"shard {shard}: no answer in {RELEASE_PATIENCE_S} s")
        released = running.result()
        await self.check("the old owner replied")
        if self.strikes("old-killed-after-reply", shard):
            self.kill(owner)
        return released

    async def adopt(self, shard: int) -> list[int]:
        if self.fault == "coordinator-stops-after-release" and self.coordinator is not None:
            if not self.struck:
                self.struck = True
                self.faults_struck.append(self.fault)
                self.coordinator.cancel()
            await asyncio.sleep(SERVE_WAIT_S)  # cancelled with the coordinator
        owner = self.current[shard]
        await self.check("the coordinator asks the new owner")
        if self.strikes("new-killed-before-ask", shard):
            self.kill(owner)
            raise ShardUnreachable(f"shard {shard}: no answer")
        taken = await owner.adopt()
        await self.check("the new owner's core adopted")
        if self.strikes("new-killed-after-adopt", shard):
            self.kill(owner)
        return taken

    # -- clients ----------------------------------------------------------------

    async def send(self, command: p.AnyCommand, slot_id: str) -> p.AnyResult | None:
        """``command`` to the shard the map names, following the map when told; None
        when nothing was answered (the outcome unknown)."""
        for _ in range(4):
            if self.partition_map is None:
                self.partition_map = await read_partition_map(self.database_url)
            shard = self.partition_map.shard_of(slot_id)
            assert shard is not None
            owner = self.current[shard]
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT_S):
                    reply = await Driver(owner).one(command)
            except ShellError:
                await asyncio.sleep(0.05)
                continue
            except TimeoutError:
                return None
            if p.not_served(reply) is not None:
                self.partition_map = None
                await asyncio.sleep(0.02)
                continue
            return reply
        return None


def _held(owner: ShardOwner) -> frozenset[int]:
    """The partitions ``owner`` holds in memory: those its core answers for, and those
    the owner says it serves."""
    runtime, served = owner.runtime, owner.partitions
    if runtime is None:
        return frozenset()
    return runtime._core.partitions.owned | (served.owned if served is not None else frozenset())


class _RollBack(Exception):
    pass


async def _client(
    sim: Simulation, ledger: Ledger, slots: list[str], seed: int, stop: asyncio.Event
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        slot_id = rng.choice(slots)
        user = f"u{rng.randrange(USERS)}"
        roll = rng.random()
        if roll < 0.6:
            held = await sim.send(
                p.Reserve(request_id=request_id(), slot_id=slot_id, user_id=user), slot_id
            )
            ledger.record(held)
            if isinstance(held, p.BookingResult) and held.status < 300 and rng.random() < 0.6:
                ledger.record(
                    await sim.send(
                        p.Confirm(
                            request_id=request_id(), booking_id=held.booking.id, user_id=user
                        ),
                        slot_id,
                    )
                )
        elif roll < 0.8:
            ledger.record(
                await sim.send(
                    p.JoinQueue(request_id=request_id(), slot_id=slot_id, user_id=user), slot_id
                )
            )
        elif ledger.bookings:
            known = rng.choice(sorted(ledger.bookings))
            booking = ledger.bookings[known].booking
            if booking.status in (BookingStatus.RESERVED, BookingStatus.CONFIRMED):
                ledger.record(
                    await sim.send(
                        p.Cancel(
                            request_id=request_id(), booking_id=booking.id, user_id=booking.user_id
                        ),
                        booking.slot_id,
                    )
                )
        await asyncio.sleep(0.005)


def _random_move(
    rng: random.Random, stored: PartitionMap, loser: int | None, towards: int | None
) -> dict[int, int]:
    """1 to 3 partitions of ``loser`` (a random shard if None) to random other shards,
    the first of them to ``towards`` if given."""
    counts = stored.counts()
    if loser is None or not counts.get(loser):
        loser = rng.choice(sorted(s for s, n in counts.items() if n and s != towards))
    owned = [partition for partition, shard in enumerate(stored.owners) if shard == loser]
    moving = sorted(rng.sample(owned, rng.randint(1, min(3, len(owned)))))
    others = [s for s in range(SHARDS) if s != loser]
    moves = {partition: rng.choice(others) for partition in moving}
    if towards is not None:
        moves[moving[0]] = towards
    return moves


async def _move(
    sim: Simulation, rng: random.Random, fault: str, slots_by_partition: dict[int, str]
) -> None:
    """One move with ``fault``, then the owners killed are replaced (or left dead for
    one more move) and paused ones woken."""
    # At most one shard is dead (killed, not replaced yet) at a time, and the others
    # serve: the fault's victim (the old owner, or a new one) is one of them. A move
    # without a fault may take partitions from the dead one (by force) or give it some.
    stored = await sim.read_map()
    if len(sim.dead()) > 1 or (fault != "none" and all(s in sim.dead() for s in stored.counts())):
        await sim.replace_killed()
    await sim.wait_serving()
    stored = await sim.read_map()
    alive = [s for s in range(SHARDS) if s not in sim.dead()]
    loser: int | None = None
    towards: int | None = None
    if fault.startswith("new-"):
        # A new owner that some other shard can give a partition to.
        towards = rng.choice([t for t in alive if any(s != t for s in stored.counts())])
        losers = [s for s in alive if s != towards and stored.counts().get(s)]
        loser = rng.choice(losers) if losers else None
    elif fault != "none":
        loser = rng.choice([s for s in alive if stored.counts().get(s)])
    moves = _random_move(rng, stored, loser, towards)
    loser = stored.owners[next(iter(moves))]
    sim.fault, sim.struck = fault, False
    sim.victim = loser if towards is None else towards
    sim.thaw.clear()
    zombie = sim.current[loser]
    late: list[asyncio.Task[p.AnyResult]] = []
    if fault in ("old-paused-with-a-flush", "old-paused-flush-in-release"):
        # A change of a moving partition applied in the paused owner's memory, its
        # flush held back.
        gate = sim.gates[zombie.owner]
        gate.waiting.clear()
        gate.open.clear()
        slot_id = slots_by_partition[next(iter(moves))]
        late.append(
            asyncio.create_task(
                Driver(zombie).one(
                    p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="zed")
                )
            )
        )
        await asyncio.wait_for(gate.waiting.wait(), 10)
    logger.info("move %s from shard %d, fault %s on %s", moves, loser, fault, sim.victim)
    sim.coordinator = asyncio.create_task(_step(sim.database_url, sim, {loser: moves}))
    await asyncio.wait([sim.coordinator])
    coordinator_stopped = sim.coordinator.cancelled()
    if not coordinator_stopped:
        sim.coordinator.result()
    sim.coordinator = None
    await sim.check("the move")
    if late:
        # The paused owner still holds the moved partitions in memory; a client with
        # an old map sends it one more change of them.
        slot_id = slots_by_partition[next(iter(moves))]
        late.append(
            asyncio.create_task(
                Driver(zombie).one(
                    p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="zoe")
                )
            )
        )
        late.append(
            asyncio.create_task(
                Driver(zombie).one(
                    p.JoinQueue(request_id=request_id(), slot_id=slot_id, user_id="zoe")
                )
            )
        )
        await asyncio.sleep(0.05)
        await sim.check("a paused owner holding moved partitions took more changes")
        sim.gates[zombie.owner].open.set()
        for reply in await asyncio.gather(*late):
            if reply.status == 503:
                sim.late_refused += 1
            if reply.status < 300:
                sim.violations.append(
                    f"a paused owner's late change was acknowledged after its partitions"
                    f" moved: {reply}"
                )
    sim.thaw.set()
    sim.fault, sim.victim = "none", None
    if coordinator_stopped:
        await sim.check("the coordinator stopped between release and adoption")
        await sim.replace_killed()
        await sim.wait_serving()
        await rebalance(sim.database_url, sim, SHARDS, step_partitions=2)
        await sim.assert_served_as_mapped()
    # A killed owner is replaced now, or only after the next move (it then loses
    # partitions by force, and gains none until it is back).
    if rng.random() < 0.6:
        await sim.replace_killed()
    await asyncio.sleep(0.05)
    await sim.check(f"after the move with fault {fault}")


async def _serve_every_partition(
    database_url: str, redis_namespace: str, db: asyncpg.Connection, seed: int
) -> tuple[Simulation, Ledger, str, list[p.BookingResult], list[str], dict[int, str]]:
    await establish_partitions(db, partitions=P, shard_count=SHARDS)
    probe = await asyncpg.connect(database_url)
    sim = Simulation(database_url, redis_namespace, probe, random.Random(seed))
    for shard in range(SHARDS):
        await sim.start_owner(shard)
    now_ms = SystemClock().now_ms()
    slots_by_partition: dict[int, str] = {}
    for partition in range(P):
        slot_id = slot_on(partition, P)
        assert partition_of(slot_id, P) == partition
        created = await sim.send(create_slot(slot_id, now_ms, capacity=CAPACITY), slot_id)
        assert created is not None and created.status == 201, created
        slots_by_partition[partition] = slot_id
    ledger = Ledger()
    # Holds acknowledged before the moves (never confirmed, a hold cannot be
    # cancelled): one on a slot of its own, on a partition that moves first, and
    # one on every partition's slot.
    early_slot = slot_on(0, P, resource="early")
    created = await sim.send(create_slot(early_slot, now_ms, capacity=1), early_slot)
    assert created is not None and created.status == 201, created
    holds = []
    for n, slot_id in enumerate([early_slot, *slots_by_partition.values()]):
        hold = await sim.send(
            p.Reserve(request_id=request_id(), slot_id=slot_id, user_id=f"early-{n}"), slot_id
        )
        assert isinstance(hold, p.BookingResult) and hold.status == 201, hold
        ledger.record(hold)
        holds.append(hold)
    return sim, ledger, early_slot, holds, list(slots_by_partition.values()), slots_by_partition


def _hook(monkeypatch: pytest.MonkeyPatch, sim: Simulation) -> None:
    """``hand_over`` and ``take_partitions`` observed where the owner calls them."""

    async def observed_hand_over(connection: Any, shard: int, *args: Any) -> int:
        return await sim.hand_over(hand_over, connection, shard, *args)

    async def observed_take(connection: Any, shard: int, *args: Any, **kw: Any) -> Any:
        assert not kw
        return await sim.take_partitions(take_partitions, connection, shard, *args)

    monkeypatch.setattr("engine.shell.owner.hand_over", observed_hand_over)
    monkeypatch.setattr("engine.shell.owner.take_partitions", observed_take)


async def _close(sim: Simulation) -> None:
    sim.thaw.set()
    for gate in sim.gates.values():
        gate.open.set()
    await asyncio.gather(*sim.background, return_exceptions=True)
    for owner in sim.everyone.values():
        await owner.close()
    await sim.probe.close()


@pytest.mark.parametrize("seed", SEEDS)
async def test_moves_with_a_crash_at_every_step_keep_one_writer_and_lose_nothing(
    seed: int,
    database_url: str,
    redis_namespace: str,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim, ledger, early_slot, holds, slots, slots_by_partition = await _serve_every_partition(
        database_url, redis_namespace, db, seed
    )
    _hook(monkeypatch, sim)
    rng = random.Random(seed)
    stop = asyncio.Event()
    clients = [
        asyncio.create_task(_client(sim, ledger, [*slots, early_slot], seed * 100 + n, stop))
        for n in range(2)
    ]
    try:
        # The hold's partition moves first, with no fault.
        early_partition = partition_of(early_slot, P)
        assert early_partition is not None
        stored = await sim.read_map()
        first = {early_partition: (stored.owners[early_partition] + 1) % SHARDS}
        await _step(database_url, sim, {stored.owners[early_partition]: first})
        await sim.check("the first move")
        faults = list(FAULTS)
        rng.shuffle(faults)
        for fault in faults:
            await _move(sim, rng, fault, slots_by_partition)
        stop.set()
        await asyncio.gather(*clients)

        # Heal: every shard back, a last rebalance, and everything served as mapped.
        await sim.replace_killed()
        await sim.wait_serving()
        await rebalance(database_url, sim, SHARDS, step_partitions=2)
        await sim.check("the final rebalance")
        await sim.assert_served_as_mapped()
        assert sim.violations == [], "\n".join(sim.violations)
        # Every fault struck where it was meant to.
        assert sim.late_refused >= 1
        assert sorted(sim.faults_struck) == sorted(f for f in FAULTS if f != "none")
        assert sim.checks > 6 * len(FAULTS)
        assert ledger.acknowledged > 20, "the clients ran while the partitions moved"

        # Every acknowledged change is in PostgreSQL: at the acknowledged version with
        # the acknowledged status, or at a later version (an expiry, a cancellation).
        rows = {r["id"]: r for r in await db.fetch("SELECT id, status, version FROM bookings")}
        lost = []
        for booking_id, result in ledger.bookings.items():
            row, acked = rows.get(booking_id), result.booking
            if (
                row is None
                or row["version"] < acked.version
                or (row["version"] == acked.version and row["status"] != acked.status.value)
            ):
                lost.append((booking_id, acked.status.value, acked.version, row and dict(row)))
        assert lost == []
        places = {
            (r["slot_id"], r["user_id"])
            for r in await db.fetch("SELECT slot_id, user_id FROM queue_entries")
        }
        assert ledger.joined <= places, ledger.joined - places

        # The holds acknowledged before the moves lapse, whichever owner's timer
        # runs them, and none (nor any other) before its time.
        ids = [hold.booking.id for hold in holds]
        async with asyncio.timeout(EXPIRY_WAIT_S):
            while await db.fetchval(
                "SELECT count(*) FROM bookings WHERE id = ANY($1::text[]) AND status = $2",
                ids,
                BookingStatus.EXPIRED.value,
            ) < len(ids):
                await asyncio.sleep(0.05)
        early = await db.fetch(
            "SELECT b.id, b.expires_at_ms, a.at_ms FROM bookings b"
            " JOIN audit_log a ON a.entity_id = b.id AND a.to_status = 'EXPIRED'"
            " WHERE a.at_ms < b.expires_at_ms"
        )
        assert early == []

        # Memory agrees with itself and with the database.
        counts = {}
        for slot_id in [*slots, early_slot]:
            view = await sim.send(p.GetSlot(request_id=request_id(), slot_id=slot_id), slot_id)
            assert isinstance(view, p.SlotResult), view
            counts[slot_id] = (view.slot.current_bookings, view.slot.held_count)
        for owner in sim.current.values():
            owner.check_invariants()
        await assert_consistent(db, engine_counts=counts)
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        await _close(sim)


async def test_the_check_reports_a_paused_owner_whose_fence_check_is_off(
    database_url: str,
    redis_namespace: str,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The negative control: without the fence, a paused owner of a moved partition
    can still commit, the check says so, and its late change is acknowledged."""
    await establish_partitions(db, partitions=P, shard_count=SHARDS)
    probe = await asyncpg.connect(database_url)
    sim = Simulation(database_url, redis_namespace, probe, random.Random(0), fence_check=False)
    try:
        for shard in range(SHARDS):
            await sim.start_owner(shard)
        _hook(monkeypatch, sim)
        now_ms = SystemClock().now_ms()
        slots_by_partition = {}
        for partition in range(P):
            slot_id = slot_on(partition, P)
            created = await sim.send(create_slot(slot_id, now_ms, capacity=CAPACITY), slot_id)
            assert created is not None and created.status == 201, created
            slots_by_partition[partition] = slot_id
        await sim.check("the start")
        assert sim.violations == []
        await _move(sim, random.Random(0), "old-paused-with-a-flush", slots_by_partition)
        assert any("could be written by" in v for v in sim.violations), sim.violations
        assert any("was acknowledged" in v for v in sim.violations), sim.violations
    finally:
        await _close(sim)


@pytest.mark.parametrize("how", ["replaced-in-place", "moved-and-adopted", "moved-and-reloaded"])
async def test_a_resent_change_after_its_owner_died_gets_its_first_answer(
    how: str,
    database_url: str,
    redis_namespace: str,
    db: asyncpg.Connection,
) -> None:
    """A change committed by an owner that dies before it replies is resent with the
    same request id, as the coalescer does (to the shard's next owner, or where the
    stored map now routes it: ``EngineClient.execute``). Its answer must be the
    first one. A replacement of the same shard loads the shard's request outcomes
    and answers so. When the coordinator moved the partition by force meanwhile
    (its owner was unreachable), the new shard adopts the partition with the
    request outcomes its previous shard remembered of it lately, and answers
    the same: not a second run (a 409 for a cancellation that is durable)."""
    await establish_partitions(db, partitions=P, shard_count=2)
    owners = [
        make_owner(database_url, redis_namespace, shard=s, shard_count=2, owner=f"s{s}")
        for s in (0, 1)
    ]
    replacement: ShardOwner | None = None
    for owner in owners:
        await owner.start()
    try:
        slot_id = slot_on(0, P)  # partition 0, shard 0
        drive = Driver(owners[0])
        assert (await drive.one(create_slot(slot_id, SystemClock().now_ms()))).status == 201
        held = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="ann"))
        assert isinstance(held, p.BookingResult) and held.status == 201, held
        confirmed = await drive.one(
            p.Confirm(request_id=request_id(), booking_id=held.booking.id, user_id="ann")
        )
        assert confirmed.status == 200, confirmed
        cancel = p.Cancel(request_id=request_id(), booking_id=held.booking.id, user_id="ann")
        first = await drive.one(cancel)  # committed; the reply dies with the owner
        assert isinstance(first, p.BookingResult) and first.status == 200, first
        assert first.booking.status is BookingStatus.CANCELLED
        owners[0]._stop("the process was killed")
        if how == "moved-and-adopted":
            await move_partitions(db, {0: 1}, gainers_reload=False)
            assert await owners[1].adopt() == [0]
            serving = owners[1]
        elif how == "moved-and-reloaded":
            await move_partitions(db, {0: 1})
            # Its generation rose: its next flush is refused, and it reloads with 0.
            other = slot_on(1, P)
            refused = await Driver(owners[1]).one(create_slot(other, SystemClock().now_ms()))
            assert refused.status == 503, refused
            async with asyncio.timeout(20):
                while owners[1].state is not OwnerState.SERVING:
                    await asyncio.sleep(0.02)
            assert owners[1].statistics().rebuilds == 1
            serving = owners[1]
        else:
            replacement = make_owner(
                database_url, redis_namespace, shard=0, shard_count=2, owner="s0-2", succeeds="s0"
            )
            await replacement.start()
            serving = replacement
        again = await Driver(serving).one(cancel)
        assert again == first, again
        assert (
            await db.fetchval("SELECT status FROM bookings WHERE id = $1", held.booking.id)
            == BookingStatus.CANCELLED.value
        )
    finally:
        for owner in [*owners, *([replacement] if replacement else [])]:
            await owner.close()

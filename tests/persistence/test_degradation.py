"""Degradation: Redis or PostgreSQL goes away under load and comes back.

One in-process shard owner serves a steady load (reservations, confirmations,
cancellations, queue joins and leaves, reads) from several tasks while a
private server under it is stopped and started again on the same port:

- Redis down: once the lease can no longer be confirmed, every change is
  refused with 503 ``ServiceUnavailable`` and a ``retry_after_s``, while reads
  keep answering 200 from memory and confirmed bookings stay confirmed in
  PostgreSQL. Redis comes back empty (no lease key, no token counter): the
  same owner object takes the lease again with a token above the fence and
  serves changes again.
- PostgreSQL down ("fast" and "immediate" stops): no change is acknowledged
  (503 instead), nothing half-applied lands in the database, reads of
  committed state keep answering 200 from the owner's frozen memory, and the
  same owner object reloads the shard by itself once PostgreSQL is back. A
  hold acknowledged before the outage, whose deadline passes during it, is
  not expired by it: after the recovery it lasts the outage grace at least
  (an ``outage_grace`` transition in the audit log), then expires, never
  before its new deadline.

Every acknowledged booking reply goes to a ledger that is checked against the
database at the end, and the owner's view of every slot is compared with the
stored counts. Waits poll with generous limits; nothing asserts on durations.
"""

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import pytest
import redis.asyncio as aioredis

from config.redis_keys import RedisKeys
from engine.core import protocol as p
from engine.core.policy import DomainPolicy
from engine.core.records import Booking
from engine.core.states import BookingStatus
from engine.shell.clock import SystemClock
from engine.shell.owner import OwnerState, ShardOwner, StorageSettings
from persistence.migrate import migrate_url
from persistence.services import PostgresStopMode, PrivatePostgres, PrivateRedis, create_database
from tests.persistence.conftest import REDIS_URL
from tests.persistence.helpers import Driver, create_slot, policies, request_id, slot_on
from tests.support.domain import policy
from tests.support.integrity import assert_consistent

pytest_plugins = ["tests.support.fixtures"]

# Short leases, so that an owner cut off from Redis closes its write gate soon.
LEASE: Final[dict[str, Any]] = {
    "lease_ttl_ms": 1_500,
    "lease_margin_ms": 300,
    "lease_renew_every_ms": 300,
    "rebuild_retry_ms": 200,
}
WAIT_S: Final = 30.0
USERS: Final = 8
SLOTS: Final = 4
# Every user fits into every slot: the load keeps changing bookings instead of queueing.
CAPACITY: Final = USERS
# Acknowledged changes the load must reach before an outage and again after the recovery.
PROGRESS: Final = 20
# Refusals the load must see while the service is down.
REFUSALS: Final = 20
EXPIRING_HOLD_MS: Final = 2_000
# Short, so that the hold given grace after the outage then expires within the test.
OUTAGE_GRACE_MS: Final = 2_000
_READS: Final = (p.GetSlot, p.GetBooking)


def _now_ms() -> int:
    return SystemClock().now_ms()


async def eventually(
    check: Callable[[], Awaitable[bool]],
    what: str,
    timeout_s: float = WAIT_S,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``check`` until it holds; fail with ``what`` after a generous limit."""
    try:
        async with asyncio.timeout(timeout_s):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"not within {timeout_s:g} s: {what} {describe()}")


def is_unavailable(result: p.AnyResult) -> bool:
    """A refusal because a dependency is down: 503 ServiceUnavailable with a retry hint."""
    return (
        isinstance(result, p.Failure)
        and result.status == 503
        and result.code == "ServiceUnavailable"
        and result.retry_after_s is not None
        and result.retry_after_s > 0
    )


@dataclass
class Outcome:
    sent: float  # time.monotonic() when the command went out
    command: p.AnyCommand
    result: p.AnyResult


@dataclass
class Ledger:
    """The newest acknowledged state of every booking, and every outcome the load saw."""

    bookings: dict[str, Booking] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    acknowledged: int = 0
    refused: int = 0

    def record(self, sent: float, command: p.AnyCommand, result: p.AnyResult) -> None:
        self.outcomes.append(Outcome(sent, command, result))
        if is_unavailable(result):
            self.refused += 1
        elif isinstance(result, p.BookingResult) and not isinstance(command, _READS):
            self.acknowledged += 1
            known = self.bookings.get(result.booking.id)
            if known is None or known.version <= result.booking.version:
                self.bookings[result.booking.id] = result.booking

    def between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in self.outcomes if start <= o.sent < end]


class Load:
    """Users reserving, confirming, cancelling, queueing and reading, until stopped."""

    def __init__(self, drive: Driver, slots: list[str], full_slot: str) -> None:
        self.drive = drive
        self.slots = slots
        self.full_slot = full_slot
        self.ledger = Ledger()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._user(f"user-{n}"), name=f"load-{n}") for n in range(USERS)
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def cancel(self) -> None:
        """End the users at once (a test that failed midway): leave no task behind."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def check_alive(self) -> None:
        """Raise what ended a user task early: the load must run all through."""
        for task in self._tasks:
            if task.done():
                task.result()
                raise AssertionError(f"{task.get_name()} ended before the load was stopped")

    def describe(self) -> str:
        stacks = []
        for task in self._tasks:
            frames = task.get_stack(limit=3)
            where = [f"{f.f_code.co_filename}:{f.f_lineno}" for f in frames]
            stacks.append(f"{task.get_name()}: {where}")
        return "; ".join(stacks)

    async def send(self, command: p.AnyCommand) -> p.AnyResult:
        sent = time.monotonic()
        result = await self.drive.one(command)
        self.ledger.record(sent, command, result)
        return result

    async def _user(self, user: str) -> None:
        rng = random.Random(user)
        # The user's confirmed bookings by slot: the next visit to that slot cancels,
        # so the load keeps changing bookings instead of running into "already held".
        kept: dict[str, str] = {}
        last_booking: str | None = None
        queued = False
        while not self._stop.is_set():
            roll = rng.random()
            slot_id = rng.choice(self.slots)
            if roll < 0.15:
                command: p.AnyCommand = (
                    p.LeaveQueue(request_id=request_id(), slot_id=self.full_slot, user_id=user)
                    if queued
                    else p.JoinQueue(request_id=request_id(), slot_id=self.full_slot, user_id=user)
                )
                result = await self.send(command)
                if result.status in (200, 201, 204):
                    queued = isinstance(command, p.JoinQueue)
            elif roll < 0.35:
                await self.send(p.GetSlot(request_id=request_id(), slot_id=slot_id))
                if last_booking is not None:
                    await self.send(
                        p.GetBooking(request_id=request_id(), booking_id=last_booking, user_id=user)
                    )
            elif slot_id in kept:
                cancelled = await self.send(
                    p.Cancel(request_id=request_id(), booking_id=kept[slot_id], user_id=user)
                )
                if not is_unavailable(cancelled):
                    del kept[slot_id]
            else:
                held = await self.send(
                    p.Reserve(request_id=request_id(), slot_id=slot_id, user_id=user)
                )
                if isinstance(held, p.BookingResult):
                    last_booking = kept[slot_id] = held.booking.id
                    await self.send(
                        p.Confirm(request_id=request_id(), booking_id=last_booking, user_id=user)
                    )
            # Refusals come back at once: do not spin on them.
            refused = bool(self.ledger.outcomes) and is_unavailable(self.ledger.outcomes[-1].result)
            await asyncio.sleep(0.02 if refused else 0.002)


@dataclass
class Scene:
    owner: ShardOwner
    drive: Driver
    load: Load
    slots: list[str]
    full_slot: str
    probe_slot: str
    carol: Booking  # confirmed before any outage, never touched by the load


async def set_scene(owner: ShardOwner) -> Scene:
    """Slots for the load, a full slot to queue on, a probe slot, and one confirmed booking."""
    drive = Driver(owner)
    now_ms = _now_ms()

    async def slot(capacity: int, **fields: Any) -> str:
        slot_id = slot_on(0, 1)
        created = await drive.one(create_slot(slot_id, now_ms, capacity=capacity, **fields))
        assert created.status == 201, created
        return slot_id

    slots = [await slot(CAPACITY) for _ in range(SLOTS)]
    full_slot = await slot(1)
    probe_slot = await slot(1_000)
    carol_slot = await slot(1)
    taken = await drive.one(p.Reserve(request_id=request_id(), slot_id=full_slot, user_id="holder"))
    assert isinstance(taken, p.BookingResult), taken
    held = await drive.one(p.Reserve(request_id=request_id(), slot_id=carol_slot, user_id="carol"))
    assert isinstance(held, p.BookingResult), held
    confirmed = await drive.one(
        p.Confirm(request_id=request_id(), booking_id=held.booking.id, user_id="carol")
    )
    assert isinstance(confirmed, p.BookingResult), confirmed
    assert confirmed.booking.status is BookingStatus.CONFIRMED
    load = Load(drive, slots, full_slot)
    return Scene(owner, drive, load, slots, full_slot, probe_slot, confirmed.booking)


async def probe_reserve(scene: Scene) -> p.AnyResult:
    """A reservation by a new user on a roomy slot: 201 whenever the shard takes changes."""
    return await scene.load.send(
        p.Reserve(
            request_id=request_id(),
            slot_id=scene.probe_slot,
            user_id=f"probe-{secrets.token_hex(4)}",
        )
    )


async def wait_for_progress(load: Load, what: str) -> None:
    mark = load.ledger.acknowledged

    async def moved() -> bool:
        load.check_alive()
        return load.ledger.acknowledged >= mark + PROGRESS

    await eventually(moved, what, describe=load.describe)


async def wait_for_refusals(load: Load, since: float, what: str) -> None:
    async def refused() -> bool:
        return sum(is_unavailable(o.result) for o in load.ledger.between(since, 1e18)) >= REFUSALS

    await eventually(refused, what)


def changes_acknowledged(outcomes: list[Outcome]) -> list[Outcome]:
    """Changes that were not refused with 503: none may exist while a dependency is down."""
    return [
        o for o in outcomes if not isinstance(o.command, _READS) and not is_unavailable(o.result)
    ]


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


async def memory_agrees_with_database(scene: Scene, db: asyncpg.Connection) -> bool:
    """Every slot's counts as the owner answers them equal the stored ones."""
    for slot_id in [*scene.slots, scene.full_slot, scene.probe_slot]:
        view = await scene.drive.one(p.GetSlot(request_id=request_id(), slot_id=slot_id))
        assert isinstance(view, p.SlotResult), view
        row = await db.fetchrow(
            """
            SELECT s.confirmed_count, s.held_count,
                   (SELECT count(*) FROM queue_entries q
                     WHERE q.slot_id = s.id AND q.status = 'WAITING') AS waiting
              FROM slots s WHERE s.id = $1
            """,
            slot_id,
        )
        stored = (row["confirmed_count"], row["held_count"], row["waiting"])
        if (view.slot.current_bookings, view.slot.held_count, view.slot.queue_length) != stored:
            return False
    return True


async def check_database(ledger: Ledger, db: asyncpg.Connection) -> None:
    """Nothing acknowledged is lost, nothing is half-applied, no slot is over capacity."""
    rows = {r["id"]: r for r in await db.fetch("SELECT id, status, version FROM bookings")}
    lost = []
    for booking_id, acked in ledger.bookings.items():
        row = rows.get(booking_id)
        if (
            row is None
            or row["version"] < acked.version
            or (row["version"] == acked.version and row["status"] != acked.status.value)
        ):
            lost.append((booking_id, acked.status.value, acked.version, row and dict(row)))
    assert lost == []

    # Nothing contradicts the engine's invariants (no slot over capacity, no drift).
    await assert_consistent(db)
    # Each booking row and its transitions in the audit log were written together:
    # one audit row per version, the newest one leading to the stored status.
    torn = await db.fetch(
        """
        SELECT b.id, b.status, b.version, count(a.id) AS transitions,
               (array_agg(a.to_status ORDER BY a.id DESC))[1] AS last_status
          FROM bookings b LEFT JOIN audit_log a ON a.entity = 'booking' AND a.entity_id = b.id
         GROUP BY b.id, b.status, b.version
        HAVING count(a.id) <> b.version
            OR (array_agg(a.to_status ORDER BY a.id DESC))[1] IS DISTINCT FROM b.status
        """
    )
    assert [dict(r) for r in torn] == []


def make_owner(storage: StorageSettings, shard_policies: dict[str, DomainPolicy]) -> ShardOwner:
    return ShardOwner(
        shard_id=0, shard_count=1, policies=shard_policies, clock=SystemClock(), storage=storage
    )


# -- Redis ----------------------------------------------------------------------------


async def test_redis_down_refuses_changes_serves_reads_and_recovers_by_itself(
    private_redis: PrivateRedis, database_url: str, db: asyncpg.Connection
) -> None:
    storage = StorageSettings(
        database_url=database_url,
        redis_url=private_redis.url,
        namespace=f"degradation-{secrets.token_hex(4)}",
        **LEASE,
    )
    owner = make_owner(storage, policies())
    await owner.start()
    scene: Scene | None = None
    try:
        scene = await set_scene(owner)
        load = scene.load
        token_before = owner.statistics().token
        assert token_before is not None
        load.start()
        await wait_for_progress(load, "the load makes progress before the outage")

        await private_redis.astop()

        # Within the lease, changes may still go through; once the lease can no
        # longer be confirmed, the write gate closes.
        async def refused() -> bool:
            return is_unavailable(await probe_reserve(scene))

        await eventually(refused, "reservations are refused once the lease cannot be renewed")
        gate_closed = time.monotonic()

        # Reservations, queue joins and other changes: 503 with a retry hint.
        refusals = [
            await probe_reserve(scene),
            await scene.drive.one(
                p.JoinQueue(request_id=request_id(), slot_id=scene.full_slot, user_id="quinn")
            ),
            await scene.drive.one(
                p.Cancel(request_id=request_id(), booking_id=scene.carol.id, user_id="carol")
            ),
            await scene.drive.one(create_slot(slot_on(0, 1), _now_ms())),
        ]
        for result in refusals:
            assert is_unavailable(result), result
        # Reads answer from memory, with the right data.
        seen = await scene.drive.one(
            p.GetBooking(request_id=request_id(), booking_id=scene.carol.id, user_id="carol")
        )
        assert isinstance(seen, p.BookingResult) and seen.status == 200, seen
        assert seen.booking == scene.carol
        assert (
            await db.fetchval("SELECT status FROM bookings WHERE id = $1", scene.carol.id)
            == "CONFIRMED"
        )

        async def agrees() -> bool:
            return await memory_agrees_with_database(scene, db)

        await eventually(agrees, "the owner's slot views agree with the database")
        await wait_for_refusals(load, gate_closed, "the load runs on against the closed gate")
        assert owner.state is OwnerState.SERVING
        outage_end = time.monotonic()

        # Redis comes back empty: no lease key, no token counter.
        await private_redis.astart()

        async def serves() -> bool:
            return (await probe_reserve(scene)).status == 201

        await eventually(serves, "reservations are taken again after Redis returned")
        await wait_for_progress(load, "the load makes progress again after the recovery")
        await load.stop()

        statistics = owner.statistics()
        assert statistics.state == OwnerState.SERVING.value and statistics.stop_reason is None
        assert statistics.token is not None and statistics.token > token_before
        assert await db.fetchval("SELECT token FROM shard_fences WHERE shard = 0") == (
            statistics.token
        )

        during = load.ledger.between(gate_closed, outage_end)
        assert changes_acknowledged(during) == []
        reads = [o for o in during if isinstance(o.command, _READS)]
        assert reads, "the load read while Redis was down"
        assert [o for o in reads if o.result.status != 200] == []

        await check_database(load.ledger, db)
        assert await memory_agrees_with_database(scene, db)
        owner.check_invariants()
    finally:
        if scene is not None:
            await scene.load.cancel()
        await owner.close()


async def test_a_lease_lost_while_the_shard_reloads_is_taken_again_and_the_owner_serves(
    private_redis: PrivateRedis, database_url: str, db: asyncpg.Connection
) -> None:
    """Redis loses the lease twice: first the owner's (it reloads), then, while that
    reload waits for PostgreSQL, the new one it took (the master killed and back
    without the key, as a failover to a replica that never got it). The renewal
    finds it gone while the load runs; the load must not serve under it but take
    the lease again, and the owner take changes once Redis answers. (The soak's
    stall: such an owner served under a forgotten lease that nothing renewed and
    nothing reloaded, refusing every change for good.) The load is held at the
    takeover by a lock on the shard's fence row, released once the renewal has
    forgotten the lease: the order is the one that stalled, every time."""
    namespace = f"degradation-{secrets.token_hex(4)}"
    storage = StorageSettings(
        database_url=database_url, redis_url=private_redis.url, namespace=namespace, **LEASE
    )
    owner = make_owner(storage, policies())
    probes = Driver(owner)
    locker = await asyncpg.connect(database_url)
    lock: Any = None
    await owner.start()
    try:
        probe_slot = slot_on(0, 1)
        created = await probes.one(create_slot(probe_slot, _now_ms(), capacity=1_000))
        assert created.status == 201, created

        async def reserve() -> p.AnyResult:
            return await probes.one(
                p.Reserve(
                    request_id=request_id(),
                    slot_id=probe_slot,
                    user_id=f"probe-{secrets.token_hex(4)}",
                )
            )

        assert (await reserve()).status == 201
        first_token = owner.statistics().token
        assert first_token is not None

        # The takeover of the next load waits for this lock on the fence row.
        lock = locker.transaction()
        await lock.start()
        await locker.execute("SELECT token FROM shard_fences WHERE shard = 0 FOR UPDATE")

        # Redis loses the lease: the owner finds it lapsed, takes a new one and loads.
        await private_redis.arestart("kill")

        async def loading_under_a_new_lease() -> bool:
            token = owner.statistics().token
            waiting = await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return (
                owner.state is OwnerState.REBUILDING
                and token is not None
                and token != first_token
                and waiting >= 1
            )

        await eventually(loading_under_a_new_lease, "the reload waits at the takeover")
        assert is_unavailable(await reserve())

        # Redis loses the new lease while the load waits: the renewal finds it gone.
        await private_redis.arestart("kill")

        async def forgotten() -> bool:
            return owner.statistics().token is None

        await eventually(forgotten, "the renewal finds the new lease gone")
        assert owner.state is OwnerState.REBUILDING
        await lock.commit()
        lock = None

        # The load completes; the owner takes the lease again and serves changes.
        async def serves() -> bool:
            return (await reserve()).status == 201

        await eventually(serves, "reservations are taken again after Redis lost the lease")
        statistics = owner.statistics()
        assert statistics.state == OwnerState.SERVING.value and statistics.stop_reason is None
        assert statistics.token is not None and statistics.token > first_token
        assert await db.fetchval("SELECT token FROM shard_fences WHERE shard = 0") == (
            statistics.token
        )
        client = aioredis.Redis.from_url(private_redis.url)
        try:
            holder = await client.get(RedisKeys(namespace).shard_owner(0))
        finally:
            await client.aclose()
        assert holder == owner.owner.encode()
        await assert_consistent(db)
        owner.check_invariants()
    finally:
        if lock is not None:
            await lock.rollback()
        await locker.close()
        await owner.close()


# -- PostgreSQL -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_down_refuses_changes_applies_nothing_half_and_recovers_by_itself(
    mode: PostgresStopMode, private_postgres_module: PrivatePostgres, redis_namespace: str
) -> None:
    server = private_postgres_module
    database_url = server.url_for(f"degradation_{secrets.token_hex(4)}")
    await create_database(database_url)
    await migrate_url(database_url)
    storage = StorageSettings(
        database_url=database_url,
        redis_url=REDIS_URL,
        namespace=redis_namespace,
        outage_hold_grace_ms=OUTAGE_GRACE_MS,
        **LEASE,
    )
    shard_policies = {
        **policies(),
        "expiring": policy("expiring", hold_ttl_ms=EXPIRING_HOLD_MS),
    }
    owner = make_owner(storage, shard_policies)
    await owner.start()
    scene: Scene | None = None
    try:
        scene = await set_scene(owner)
        load = scene.load
        expiring_slot = slot_on(0, 1)
        created = await scene.drive.one(
            create_slot(expiring_slot, _now_ms(), capacity=1, domain="expiring")
        )
        assert created.status == 201, created
        load.start()
        await wait_for_progress(load, "the load makes progress before the outage")

        # A hold acknowledged just before the outage; its deadline passes during it.
        hold = await scene.drive.one(
            p.Reserve(request_id=request_id(), slot_id=expiring_slot, user_id="late-larry")
        )
        assert isinstance(hold, p.BookingResult) and hold.status == 201, hold

        await server.astop(mode)
        stopped = time.monotonic()

        refusals = [
            await probe_reserve(scene),
            await scene.drive.one(
                p.JoinQueue(request_id=request_id(), slot_id=scene.full_slot, user_id="quinn")
            ),
            await scene.drive.one(
                p.Confirm(request_id=request_id(), booking_id=hold.booking.id, user_id="late-larry")
            ),
        ]
        for result in refusals:
            assert is_unavailable(result), result
        assert owner.state is OwnerState.DEGRADED
        await wait_for_refusals(load, stopped, "the load runs on while PostgreSQL is down")

        async def hold_deadline_passed() -> bool:
            return _now_ms() > hold.booking.expires_at_ms

        await eventually(hold_deadline_passed, "the hold's deadline passes during the outage")
        outage_end = time.monotonic()
        assert owner.state is OwnerState.DEGRADED
        # Reads of committed state answer from memory; the hold is not expired by
        # the outage (no expiry could commit).
        seen = await scene.drive.one(
            p.GetBooking(request_id=request_id(), booking_id=scene.carol.id, user_id="carol")
        )
        assert isinstance(seen, p.BookingResult) and seen.booking == scene.carol, seen
        still = await scene.drive.one(
            p.GetBooking(request_id=request_id(), booking_id=hold.booking.id, user_id="late-larry")
        )
        assert isinstance(still, p.BookingResult), still
        assert still.booking.status is BookingStatus.RESERVED

        recovery_ms = _now_ms()
        await server.astart()

        async def serves() -> bool:
            return (await probe_reserve(scene)).status == 201

        await eventually(serves, "reservations are taken again after PostgreSQL returned")
        await wait_for_progress(load, "the load makes progress again after the recovery")
        await load.stop()

        statistics = owner.statistics()
        assert statistics.state == OwnerState.SERVING.value and statistics.stop_reason is None
        assert statistics.rebuilds >= 1

        # No change sent while PostgreSQL was down was acknowledged.
        during = load.ledger.between(stopped, outage_end)
        assert changes_acknowledged(during) == []
        assert [o for o in during if not is_unavailable(o.result) and o.result.status != 200] == []

        async with connected(database_url) as db:
            await check_database(load.ledger, db)
            assert (
                await db.fetchval("SELECT status FROM bookings WHERE id = $1", scene.carol.id)
                == "CONFIRMED"
            )
            seen = await scene.drive.one(
                p.GetBooking(request_id=request_id(), booking_id=scene.carol.id, user_id="carol")
            )
            assert isinstance(seen, p.BookingResult) and seen.booking == scene.carol, seen

            # The hold whose deadline fell in the outage got the grace after the
            # recovery, recorded in the audit log; then it expires, not before.
            graced = await db.fetchrow(
                "SELECT at_ms, from_status, to_status FROM audit_log"
                " WHERE entity_id = $1 AND trigger = 'outage_grace'",
                hold.booking.id,
            )
            assert graced is not None
            assert (graced["from_status"], graced["to_status"]) == ("RESERVED", "RESERVED")
            assert graced["at_ms"] >= recovery_ms
            assert owner.statistics().outage_grace_holds >= 1

            async def expired() -> bool:
                status = await db.fetchval(
                    "SELECT status FROM bookings WHERE id = $1", hold.booking.id
                )
                return bool(status == "EXPIRED")

            await eventually(expired, "the hold acknowledged before the outage expires")
            expired_at_ms = await db.fetchval(
                "SELECT at_ms FROM audit_log WHERE entity_id = $1 AND to_status = 'EXPIRED'",
                hold.booking.id,
            )
            assert expired_at_ms >= graced["at_ms"] + OUTAGE_GRACE_MS
            assert (
                await db.fetchval(
                    "SELECT expires_at_ms FROM bookings WHERE id = $1", hold.booking.id
                )
                >= recovery_ms + OUTAGE_GRACE_MS
            )
            assert await memory_agrees_with_database(scene, db)
        owner.check_invariants()
    finally:
        if scene is not None:
            await scene.load.cancel()
        await owner.close()
        # The server is shared by the module: leave it running, without this test's database.
        if not server.running:
            await server.astart()
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            await _drop_database(server, database_url)


async def _drop_database(server: PrivatePostgres, database_url: str) -> None:
    name = database_url.rsplit("/", 1)[1]
    async with connected(server.url_for("postgres")) as admin:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _outage_database(server: PrivatePostgres) -> str:
    database_url = server.url_for(f"degradation_{secrets.token_hex(4)}")
    await create_database(database_url)
    await migrate_url(database_url)
    return database_url


def _outage_storage(database_url: str, namespace: str) -> StorageSettings:
    return StorageSettings(
        database_url=database_url,
        redis_url=REDIS_URL,
        namespace=namespace,
        outage_hold_grace_ms=OUTAGE_GRACE_MS,
        **LEASE,
    )


async def test_an_owner_taking_over_after_the_outage_grants_the_grace_too(
    private_postgres_module: PrivatePostgres, redis_namespace: str
) -> None:
    """The owner that lived through the outage is gone when PostgreSQL returns: the
    one that loads the shard then finds the outage marked in Redis, and gives the
    hold whose deadline fell in it the grace all the same."""
    server = private_postgres_module
    database_url = await _outage_database(server)
    storage = _outage_storage(database_url, redis_namespace)
    shard_policies = {**policies(), "expiring": policy("expiring", hold_ttl_ms=EXPIRING_HOLD_MS)}
    first = make_owner(storage, shard_policies)
    second = make_owner(storage, shard_policies)
    marker = RedisKeys(redis_namespace).shard_storage_lost(0)
    redis_client = aioredis.Redis.from_url(REDIS_URL)
    await first.start()
    try:
        drive = Driver(first)
        expiring_slot, probe_slot = slot_on(0, 1), slot_on(0, 1)
        for slot_id, domain in ((expiring_slot, "expiring"), (probe_slot, "default")):
            created = await drive.one(create_slot(slot_id, _now_ms(), capacity=5, domain=domain))
            assert created.status == 201, created
        hold = await drive.one(
            p.Reserve(request_id=request_id(), slot_id=expiring_slot, user_id="larry")
        )
        assert isinstance(hold, p.BookingResult), hold

        await server.astop("fast")

        async def degraded() -> bool:
            await drive.one(p.Reserve(request_id=request_id(), slot_id=probe_slot, user_id="probe"))
            return first.state is OwnerState.DEGRADED and bool(await redis_client.exists(marker))

        await eventually(degraded, "the owner notices the outage and marks it")
        # The owner dies during the outage; the hold's deadline passes meanwhile.
        await first.close()

        async def deadline_passed() -> bool:
            return _now_ms() > hold.booking.expires_at_ms

        await eventually(deadline_passed, "the hold's deadline passes during the outage")
        recovered_ms = _now_ms()
        await server.astart()
        await second.start()
        seen = await Driver(second).one(
            p.GetBooking(request_id=request_id(), booking_id=hold.booking.id, user_id="larry")
        )
        assert isinstance(seen, p.BookingResult), seen
        assert seen.booking.status is BookingStatus.RESERVED
        assert seen.booking.expires_at_ms >= recovered_ms + OUTAGE_GRACE_MS
        confirmed = await Driver(second).one(
            p.Confirm(request_id=request_id(), booking_id=hold.booking.id, user_id="larry")
        )
        assert isinstance(confirmed, p.BookingResult), confirmed
        assert confirmed.booking.status is BookingStatus.CONFIRMED

        async def unmarked() -> bool:
            return not await redis_client.exists(marker)

        await eventually(unmarked, "the marker goes once the grace has committed")
        async with connected(database_url) as db:
            graced = await db.fetchval(
                "SELECT count(*) FROM audit_log WHERE entity_id = $1 AND trigger = 'outage_grace'",
                hold.booking.id,
            )
            assert graced == 1
            await assert_consistent(db)
    finally:
        await second.close()
        await first.close()
        await redis_client.delete(marker)
        await redis_client.aclose()
        if not server.running:
            await server.astart()
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            await _drop_database(server, database_url)


async def test_a_read_never_shows_a_change_whose_commit_is_in_doubt(
    private_postgres: PrivatePostgres, redis_namespace: str
) -> None:
    """PostgreSQL frozen: a reservation is applied in memory and its flush times out
    (it may yet commit). While the database is unreachable, reads of what it
    touched answer 503; reads of everything else answer from memory."""
    database_url = await _outage_database(private_postgres)
    owner = make_owner(_outage_storage(database_url, redis_namespace), policies())
    await owner.start()
    try:
        drive = Driver(owner)
        touched, quiet = slot_on(0, 1), slot_on(0, 1)
        for slot_id in (touched, quiet):
            created = await drive.one(create_slot(slot_id, _now_ms(), capacity=5))
            assert created.status == 201, created
        kept = await drive.one(p.Reserve(request_id=request_id(), slot_id=quiet, user_id="kim"))
        assert isinstance(kept, p.BookingResult), kept
        quiet_view = await drive.one(p.GetSlot(request_id=request_id(), slot_id=quiet))

        private_postgres.pause()
        try:
            doubtful = await drive.one(
                p.Reserve(request_id=request_id(), slot_id=touched, user_id="dora")
            )
            assert is_unavailable(doubtful) and p.OUTCOME_DETAIL in doubtful.details, doubtful
            assert owner.state is OwnerState.DEGRADED
            reads = await drive.run(
                p.GetSlot(request_id=request_id(), slot_id=touched),
                p.QueuePosition(request_id=request_id(), slot_id=touched, user_id="dora"),
                p.ListBookings(request_id=request_id(), user_id="dora"),
                p.ListSlots(request_id=request_id()),
            )
            for result in reads:
                assert is_unavailable(result), result
            shown = await drive.run(
                p.GetSlot(request_id=request_id(), slot_id=quiet),
                p.GetBooking(request_id=request_id(), booking_id=kept.booking.id, user_id="kim"),
                p.ListBookings(request_id=request_id(), user_id="kim"),
            )
            assert shown[0] == quiet_view
            assert isinstance(shown[1], p.BookingResult) and shown[1].booking == kept.booking
            assert isinstance(shown[2], p.BookingPage), shown[2]
            assert [b.id for b in shown[2].items] == [kept.booking.id]
        finally:
            private_postgres.resume()

        async def serves() -> bool:
            view = await drive.one(p.GetSlot(request_id=request_id(), slot_id=touched))
            return owner.state is OwnerState.SERVING and view.status == 200

        await eventually(serves, "the shard serves again once PostgreSQL thawed")
        async with connected(database_url) as db:
            await assert_consistent(db)
    finally:
        await owner.close()

"""Shard actors SIGKILLed under load lose nothing they acknowledged.

Real Ray actors own the shards and write behind to a real PostgreSQL; a
client ledger records every acknowledged booking reply. The actor processes
are killed several times while the load runs; Ray restarts them, they take
the shard over from PostgreSQL, and the coalescer resends the batches that
died with them (the same request ids, so nothing applies twice). Afterwards
the database holds every acknowledged change, no slot is over capacity, and a
hold acknowledged before a kill still expires, never early, after it.
"""

import asyncio
import functools
import os
import random
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import pytest

from engine.core import protocol as p
from engine.core.policy import DomainPolicy
from engine.core.routing import make_slot_id
from engine.core.states import BookingStatus
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.errors import ShardUnavailable, ShellError
from engine.shell.owner import StorageSettings
from engine.shell.ray_actor import RayShardTransport, kill_shard_actors
from tests.persistence.conftest import REDIS_URL
from tests.support.domain import DAY_MS, HOUR_MS, policy
from tests.support.integrity import assert_consistent

pytestmark = pytest.mark.ray

SHARDS = 2
SLOTS = 12
USERS = 60
CAPACITY = 10
KILLS = 3
EXPIRING_HOLD_MS = 4_000
# A killed actor's restart (a new process, its lease, its reload) takes as long as
# the machine is slow: the test's own calls wait for it, bounded by a count of
# resends and a deadline generous for a loaded machine, never by its usual speed.
# The client resends a batch up to 8 times (backoff 0.1 s doubling: ~25 s in all)
# within the patience; a direct call to an actor is tried again every pause.
CLIENT_RETRIES_MAX = 8
CLIENT_PATIENCE_MS = 60_000
RESTART_ATTEMPTS_MAX = 240
RESTART_PAUSE_S = 0.5
RESTART_DEADLINE_S = 120.0

_T = TypeVar("_T")
POLICIES = {
    "default": policy(),
    "expiring": policy("expiring", hold_ttl_ms=EXPIRING_HOLD_MS),
}


class Ledger:
    """The newest acknowledged state of every booking, as the clients saw it."""

    def __init__(self) -> None:
        self.bookings: dict[str, p.BookingResult] = {}
        self.acknowledged = 0
        self.unavailable = 0

    def record(self, result: p.AnyResult) -> None:
        if isinstance(result, p.BookingResult):
            self.acknowledged += 1
            known = self.bookings.get(result.booking.id)
            if known is None or known.booking.version <= result.booking.version:
                self.bookings[result.booking.id] = result
        elif isinstance(result, p.Failure) and result.status == 503:
            self.unavailable += 1


async def _user(
    client: EngineClient,
    ids: RequestIds,
    user: str,
    slots: list[str],
    ledger: Ledger,
    stop: asyncio.Event,
) -> None:
    rng = random.Random(user)
    while not stop.is_set():
        slot_id = rng.choice(slots)
        try:
            held = await client.execute(
                p.Reserve(request_id=ids.next(), slot_id=slot_id, user_id=user)
            )
            ledger.record(held)
            if isinstance(held, p.BookingResult) and held.booking.status is BookingStatus.RESERVED:
                confirmed = await client.execute(
                    p.Confirm(request_id=ids.next(), booking_id=held.booking.id, user_id=user)
                )
                ledger.record(confirmed)
                if isinstance(confirmed, p.BookingResult) and rng.random() < 0.5:
                    ledger.record(
                        await client.execute(
                            p.Cancel(
                                request_id=ids.next(), booking_id=held.booking.id, user_id=user
                            )
                        )
                    )
        except ShellError:
            ledger.unavailable += 1  # the outcome is unknown: nothing was acknowledged
            await asyncio.sleep(0.05)


async def _while_restarting(call: Callable[[], Awaitable[_T]]) -> _T:
    """``call()``, made again while a shard actor is restarting or its owner could not
    start yet (``ShardUnavailable``): at most ``RESTART_ATTEMPTS_MAX`` times, within
    ``RESTART_DEADLINE_S``."""
    async with asyncio.timeout(RESTART_DEADLINE_S):
        for _ in range(RESTART_ATTEMPTS_MAX - 1):
            try:
                return await call()
            except ShardUnavailable:
                await asyncio.sleep(RESTART_PAUSE_S)
        return await call()


async def connect_owned_shards(
    shard_count: int, policies: dict[str, DomainPolicy], prefix: str, storage: StorageSettings
) -> RayShardTransport:
    """The named shard actors, with storage, once all serve."""
    # On a loaded machine a new owner's first Redis call (its lease) can time out:
    # its start fails (ShardUnreachable), and connecting again (the same named
    # actors) waits for it again.
    return await _while_restarting(
        functools.partial(
            RayShardTransport.connect,
            shard_count=shard_count,
            policies=policies,
            name_prefix=prefix,
            storage=storage,
            timeout_ms=60_000,
        )
    )


async def _kill(transport: RayShardTransport, shard: int) -> int:
    # The shard may still be restarting from an earlier kill: its new process is killed.
    identity = await _while_restarting(
        functools.partial(transport.identity, shard, timeout_ms=60_000)
    )
    os.kill(identity.pid, signal.SIGKILL)
    return identity.pid


async def test_sigkilled_shard_actors_lose_no_acknowledged_change(
    ray_cluster: str, database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    prefix = f"crash-{uuid.uuid4().hex[:8]}"
    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
    )
    transport = await connect_owned_shards(SHARDS, POLICIES, prefix, storage)
    client = EngineClient(
        transport, retries_max=CLIENT_RETRIES_MAX, unavailable_patience_ms=CLIENT_PATIENCE_MS
    )
    ids = RequestIds()
    try:
        start_ms = _now_ms() + DAY_MS
        slots = []
        for n in range(SLOTS):
            resource = f"room-{n}-{uuid.uuid4().hex[:6]}"
            slot_id = make_slot_id(resource, uuid.uuid4().hex)
            created = await client.execute(
                p.CreateSlot(
                    request_id=ids.next(),
                    slot_id=slot_id,
                    resource_id=resource,
                    domain="default",
                    start_ms=start_ms,
                    end_ms=start_ms + HOUR_MS,
                    capacity=CAPACITY,
                )
            )
            assert created.status == 201, created
            slots.append(slot_id)
        # A hold with a short TTL, acknowledged before the first kill.
        resource = f"expiring-{uuid.uuid4().hex[:6]}"
        expiring_slot = make_slot_id(resource, uuid.uuid4().hex)
        await client.execute(
            p.CreateSlot(
                request_id=ids.next(),
                slot_id=expiring_slot,
                resource_id=resource,
                domain="expiring",
                start_ms=start_ms,
                end_ms=start_ms + HOUR_MS,
                capacity=1,
            )
        )
        hold = await client.execute(
            p.Reserve(request_id=ids.next(), slot_id=expiring_slot, user_id="late-larry")
        )
        assert isinstance(hold, p.BookingResult) and hold.status == 201

        ledger = Ledger()
        stop = asyncio.Event()
        users = [
            asyncio.create_task(_user(client, ids, f"user-{n}", slots, ledger, stop))
            for n in range(USERS)
        ]
        killed = []
        expiring_shard = _shard_of(client, expiring_slot)
        for kill in range(KILLS):
            await asyncio.sleep(2.5)
            shard = expiring_shard if kill == 0 else kill % SHARDS
            killed.append(await _kill(transport, shard))
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*users)
        await client.wait_idle(60)

        assert len(set(killed)) == KILLS, "every kill hit a live process"
        assert ledger.acknowledged > 100, "the load ran while the actors were killed"

        # Every acknowledged change is in PostgreSQL: the booking exists, and at
        # the acknowledged version it has the acknowledged status (later versions
        # are later changes, such as an expiry or a cancellation).
        rows = {
            row["id"]: row for row in await db.fetch("SELECT id, status, version FROM bookings")
        }
        lost = []
        for booking_id, result in ledger.bookings.items():
            row = rows.get(booking_id)
            acked = result.booking
            if (
                row is None
                or row["version"] < acked.version
                or (row["version"] == acked.version and row["status"] != acked.status.value)
            ):
                lost.append((booking_id, acked.status.value, acked.version, row and dict(row)))
        assert lost == []
        # Nothing contradicts the engine's invariants (no slot over capacity, no drift).
        await assert_consistent(db)

        # The hold acknowledged before the first kill expires after it, not before its time.
        # A restarted actor starts its owner (the reload, the timers) as soon as it is
        # created; waiting here until each serves bounds the wait below by the restart.
        for shard in range(SHARDS):
            await _while_restarting(functools.partial(transport.identity, shard, timeout_ms=60_000))
        async with asyncio.timeout(RESTART_DEADLINE_S):
            while True:
                status = await db.fetchval(
                    "SELECT status FROM bookings WHERE id = $1", hold.booking.id
                )
                if status == "EXPIRED":
                    break
                await asyncio.sleep(0.1)
        expired_at_ms = await db.fetchval(
            "SELECT at_ms FROM audit_log WHERE entity_id = $1 AND to_status = 'EXPIRED'",
            hold.booking.id,
        )
        assert expired_at_ms >= hold.booking.expires_at_ms

        # The engine's memory agrees with itself and with the database.
        for shard in range(SHARDS):
            await _while_restarting(
                functools.partial(transport.check_invariants, shard, timeout_ms=60_000)
            )
        engine_counts = {}
        for slot_id in [*slots, expiring_slot]:
            view = await client.execute(p.GetSlot(request_id=ids.next(), slot_id=slot_id))
            assert isinstance(view, p.SlotResult)
            engine_counts[slot_id] = (view.slot.current_bookings, view.slot.held_count)
        await assert_consistent(db, engine_counts=engine_counts)
    finally:
        kill_shard_actors(shard_count=SHARDS, name_prefix=prefix)


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


def _shard_of(client: EngineClient, slot_id: str) -> int:
    from engine.core.routing import shard_of

    return shard_of(slot_id, client.shard_count)

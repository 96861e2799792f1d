"""A paused old owner and a new owner of one shard: the fence stops the zombie.

Owner A serves the shard, applies a confirmation in memory, and freezes before
its flush reaches PostgreSQL (its lease renewals stop too, as in a process
pause). Its lease lapses; owner B takes the shard over (new token, reload).
Then A wakes and sends its late flush. With the fence, the database refuses
it: A answers 503 and stops serving, and what clients were told agrees with
the database. The negative control runs the same scenario with the fence
check disabled in A: A acknowledges the confirmation, and the booking then
expires under B, which never heard of it: an acknowledged confirmation is
lost. So the test can fail, and the fence is what makes it pass.
"""

import asyncio
import os
import secrets
import signal

import asyncpg
import pytest

from engine.core import protocol as p
from engine.core.states import BookingStatus
from engine.shell.clock import SystemClock
from engine.shell.owner import OwnerState
from persistence.migrate import migrate_url
from persistence.services import PrivatePostgres, create_database
from tests.persistence.helpers import Driver, create_slot, make_owner, request_id, slot_on
from tests.support.integrity import assert_consistent

pytest_plugins = ["tests.support.fixtures"]

LEASE_TTL_MS = 1_500
LEASE_MARGIN_MS = 300
LEASE_RENEW_MS = 300
HOLD_MS = 3_000


async def slot_counts(drive: Driver, slot_id: str) -> dict[str, tuple[int, int]]:
    """The slot's (confirmed, held) as its owner answers them."""
    view = await drive.one(p.GetSlot(request_id=request_id(), slot_id=slot_id))
    assert isinstance(view, p.SlotResult), view
    return {slot_id: (view.slot.current_bookings, view.slot.held_count)}


class Gate:
    """Holds flushes back while closed: the owner's process is 'paused'."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.waiting = asyncio.Event()

    async def __call__(self) -> None:
        if not self.open.is_set():
            self.waiting.set()
            await self.open.wait()


async def hold_then_freeze(
    zombie: Driver, gate: Gate, slot_id: str
) -> "tuple[p.BookingResult, asyncio.Task[p.AnyResult]]":
    """The start of a zombie scenario: ann holds the one place of a new slot; the
    zombie applies her confirmation in memory, then freezes before its flush."""
    await zombie.one(create_slot(slot_id, SystemClock().now_ms(), capacity=1))
    held = await zombie.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="ann"))
    assert isinstance(held, p.BookingResult) and held.status == 201
    gate.open.clear()
    late_reply = asyncio.create_task(
        zombie.one(p.Confirm(request_id=request_id(), booking_id=held.booking.id, user_id="ann"))
    )
    await asyncio.wait_for(gate.waiting.wait(), 10)
    return held, late_reply


async def wake_the_zombie(
    db: asyncpg.Connection,
    successor: Driver,
    gate: Gate,
    late_reply: "asyncio.Task[p.AnyResult]",
    booking_id: str,
) -> tuple[p.AnyResult, bool, int]:
    """The end of a zombie scenario: the successor holds ``booking_id`` as a hold;
    the zombie's late confirmation goes out, then the hold lapses under the
    successor. Returns the zombie's reply, whether it acknowledged the
    confirmation, and how many acknowledgements the database lost (0 or 1)."""
    seen = await successor.one(
        p.GetBooking(request_id=request_id(), booking_id=booking_id, user_id="ann")
    )
    assert isinstance(seen, p.BookingResult), seen
    assert seen.booking.status is BookingStatus.RESERVED
    # The zombie wakes up and its late flush goes out.
    gate.open.set()
    reply = await asyncio.wait_for(late_reply, 10)
    # The successor's hold timer runs its course: the hold it knows of lapses.
    async with asyncio.timeout(20):
        while await db.fetchval("SELECT status FROM bookings WHERE id = $1", booking_id) not in (
            "EXPIRED",
        ):
            await asyncio.sleep(0.05)
    acknowledged = (
        isinstance(reply, p.BookingResult) and reply.booking.status is BookingStatus.CONFIRMED
    )
    stored = await db.fetchval("SELECT status FROM bookings WHERE id = $1", booking_id)
    return reply, acknowledged, int(acknowledged and stored != "CONFIRMED")


@pytest.mark.parametrize("fence_check", [True, False], ids=["fenced", "fence-disabled"])
async def test_a_paused_owner_whose_lease_lapsed_cannot_write_after_a_takeover(
    fence_check: bool, database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    lease = {
        "lease_ttl_ms": LEASE_TTL_MS,
        "lease_margin_ms": LEASE_MARGIN_MS,
        "lease_renew_every_ms": LEASE_RENEW_MS,
    }
    gate = Gate()
    zombie = make_owner(
        database_url,
        redis_namespace,
        owner="owner-a",
        before_flush=gate,
        fence_check=fence_check,
        hold_ttl_ms=HOLD_MS,
        **lease,
    )
    await zombie.start()
    a = Driver(zombie)
    slot_id = slot_on(0, 1)
    held, late_reply = await hold_then_freeze(a, gate, slot_id)
    zombie.pause_lease_renewal()
    await asyncio.sleep((LEASE_TTL_MS + 200) / 1000)

    # B takes over: a new lease, a newer token, the state as PostgreSQL has it.
    successor = make_owner(
        database_url, redis_namespace, owner="owner-b", hold_ttl_ms=HOLD_MS, **lease
    )
    await successor.start()
    assert successor.statistics().token == 2
    b = Driver(successor)
    reply, acknowledged_confirmation, lost_acknowledgements = await wake_the_zombie(
        db, b, gate, late_reply, held.booking.id
    )

    if fence_check:
        assert isinstance(reply, p.Failure) and reply.status == 503, reply
        assert zombie.state is OwnerState.STOPPED
        assert "fenced" in (zombie.statistics().stop_reason or "")
        assert lost_acknowledgements == 0
        # A stopped serving for good: it answers nothing any more.
        with pytest.raises(Exception, match="stopped"):
            await a.one(p.GetSlot(request_id=request_id(), slot_id=slot_id))
        # The database keeps the engine's invariants, and agrees with B's memory.
        await assert_consistent(db, engine_counts=await slot_counts(b, slot_id))
    else:
        # The negative control: without the fence the zombie's write lands and
        # the client holds a confirmation the database no longer has.
        assert acknowledged_confirmation
        assert lost_acknowledgements == 1
    assert successor.state is OwnerState.SERVING
    await successor.close()
    await zombie.close()


async def test_a_flush_that_timed_out_and_commits_after_the_reload_is_fenced_off(
    private_postgres: PrivatePostgres, redis_namespace: str
) -> None:
    """An owner's own flush in doubt: it timed out, the owner reloaded, then it ran.

    The flush's backend is frozen with the statement in its socket: the flush
    times out, its reply is 503 with the outcome unknown, and the owner reloads
    the shard (without the change). Then the backend wakes and runs the
    statement. Had the reload kept the token, the fence would take it (same
    token, same owner) and the database would hold a hold the owner's memory
    lacks: a slot that is full on disk and free in memory. The reload takes a
    new token, so the late flush is refused.
    """
    database_url = private_postgres.url_for(f"zombie_{secrets.token_hex(4)}")
    await create_database(database_url)
    await migrate_url(database_url)
    owner = make_owner(database_url, redis_namespace, owner="owner-a")
    await owner.start()
    db = await asyncpg.connect(database_url)
    frozen: int | None = None
    try:
        drive = Driver(owner)
        slot_id = slot_on(0, 1)
        assert (await drive.one(create_slot(slot_id, SystemClock().now_ms(), capacity=1))).status
        token_before = owner.statistics().token
        # The owner's one connection: the only other client of this database.
        frozen = await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)

        doubt = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="zed"))
        assert isinstance(doubt, p.Failure) and doubt.status == 503, doubt
        assert p.outcome_unknown(doubt.details)
        async with asyncio.timeout(30):
            while owner.state is not OwnerState.SERVING:
                await asyncio.sleep(0.02)
        token_after = owner.statistics().token
        assert token_before is not None and token_after is not None
        assert token_after > token_before

        # The frozen backend wakes, runs the late flush, and goes.
        os.kill(frozen, signal.SIGCONT)
        async with asyncio.timeout(30):
            while await db.fetchval("SELECT 1 FROM pg_stat_activity WHERE pid = $1", frozen):
                await asyncio.sleep(0.02)
        frozen = None

        assert await db.fetchval("SELECT count(*) FROM bookings WHERE slot_id = $1", slot_id) == 0
        view = await drive.one(p.GetSlot(request_id=request_id(), slot_id=slot_id))
        assert isinstance(view, p.SlotResult) and view.slot.held_count == 0
        held = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="amy"))
        assert isinstance(held, p.BookingResult) and held.status == 201, held
        counts = await slot_counts(drive, slot_id)
        assert counts == {slot_id: (0, 1)}
        # Full on disk as in memory: the database agrees with the owner's counts.
        await assert_consistent(db, engine_counts=counts)
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        await db.close()
        await owner.close()

"""The transactional outbox and the delivery worker's bookkeeping, on real PostgreSQL.

The channels here record what they are handed and fail on demand: what is
checked is which deliveries exist, when they are attempted, and how their
outcomes are recorded. Real receivers (webhooks, SMTP) are in test_delivery.py.
"""

import asyncio
import zlib
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from engine.core import protocol as p
from engine.core.protocol import AnyEvent
from engine.notify.events import EVENT_TYPES
from engine.notify.metrics import NotifyMetrics
from engine.notify.notifications import notifications
from engine.notify.worker import DeliveryWorker, WorkerOptions
from engine.shell.clock import SystemClock
from persistence.deliveries import ClaimedDelivery, outbox_state, purge_delivered
from persistence.rows import FlushRows
from persistence.store import Codecs, FenceRejected, write_flush
from persistence.timings import TimingsCollector
from tests.persistence.helpers import Driver, create_slot, make_owner, request_id, slot_on

EVERY_CHANNEL = {"default": frozenset({"websocket", "webhook", "email"})}


class Recording:
    """A channel that fails the first ``failures`` attempts of every delivery."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.sent: list[ClaimedDelivery] = []

    async def prepare(self, deliveries: list[ClaimedDelivery]) -> None:
        pass

    async def send(self, delivery: ClaimedDelivery) -> str | None:
        self.sent.append(delivery)
        return "HTTP 500" if delivery.attempt <= self.failures else None


class Clock:
    def __init__(self) -> None:
        self.now = SystemClock().now_ms() / 1000

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as created:
        yield created


async def _endpoint(db: asyncpg.Connection, endpoint_id: str, events: list[str]) -> None:
    await db.execute(
        "INSERT INTO webhook_endpoints (id, url, events, secret, created_at_ms)"
        " VALUES ($1, 'http://receiver.invalid/hook', $2, '\\x00', 0)",
        endpoint_id,
        events,
    )


async def _outbox_events(db: asyncpg.Connection) -> list[AnyEvent]:
    decode = msgspec.msgpack.Decoder(list[AnyEvent]).decode
    rows = await db.fetch("SELECT events, payload FROM outbox_batches ORDER BY id")
    events: list[AnyEvent] = []
    for row in rows:
        batch = decode(zlib.decompress(row["payload"]))
        assert len(batch) == row["events"]
        events.extend(batch)
    return events


async def _story(database_url: str, redis_namespace: str) -> tuple[str, str]:
    """A slot, a hold confirmed then cancelled, a queue offer that is claimed, an update."""
    owner = make_owner(database_url, redis_namespace, hold_ttl_ms=None)
    await owner.start()
    try:
        drive = Driver(owner)
        now_ms = SystemClock().now_ms()
        slot_id = slot_on(0, 1)
        await drive.one(create_slot(slot_id, now_ms, capacity=1))
        held = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="ann"))
        assert isinstance(held, p.BookingResult)
        queued = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="bob"))
        assert isinstance(queued, p.QueueResult)
        booking_id = held.booking.id
        await drive.one(p.Confirm(request_id=request_id(), booking_id=booking_id, user_id="ann"))
        await drive.one(
            p.Cancel(request_id=request_id(), booking_id=booking_id, user_id="ann", reason="ill")
        )
        offered = await drive.one(
            p.QueuePosition(request_id=request_id(), slot_id=slot_id, user_id="bob")
        )
        assert isinstance(offered, p.QueueResult) and offered.entry.booking_id is not None
        await drive.one(
            p.Confirm(request_id=request_id(), booking_id=offered.entry.booking_id, user_id="bob")
        )
        await drive.one(
            p.UpdateSlot(request_id=request_id(), slot_id=slot_id, capacity=2, actor="admin:root")
        )
        return slot_id, booking_id
    finally:
        await owner.close()


async def test_every_committed_change_is_in_the_outbox_in_order(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    slot_id, booking_id = await _story(database_url, redis_namespace)
    made = notifications(await _outbox_events(db))
    assert [n.type for n in made] == [
        "slot.created",
        "booking.reserved",
        "queue.joined",
        "booking.confirmed",
        "booking.cancelled",
        "booking.reserved",
        "queue.offer",
        "booking.confirmed",
        "queue.converted",
        "slot.updated",
    ]
    assert {n.type for n in made} <= set(EVERY_TYPE)
    ann = [n for n in made if n.subject == booking_id]
    assert [n.seq for n in ann] == sorted(n.seq for n in ann) and len({n.seq for n in ann}) == 3
    cancelled = next(n for n in made if n.type == "booking.cancelled")
    assert cancelled.data["cancelledBy"] == "ann" and cancelled.data["reason"] == "ill"
    assert cancelled.data["refundPercentage"] == 100 and cancelled.data["status"] == "CANCELLED"
    offer = next(n for n in made if n.type == "queue.offer")
    assert offer.user_id == "bob" and offer.data["bookingId"] and offer.data["claimDeadline"]
    assert len({n.id for n in made}) == len(made)
    assert all(n.slot_id == slot_id for n in made)


EVERY_TYPE = EVENT_TYPES


async def test_a_flush_that_is_refused_leaves_nothing_in_the_outbox(
    database_url: str, redis_namespace: str, db: asyncpg.Connection
) -> None:
    await _story(database_url, redis_namespace)
    before = await db.fetchval("SELECT count(*) FROM outbox_batches")
    events = await _outbox_events(db)
    rows = FlushRows(shard=0)
    rows.add(events[:3])
    stored_token = await db.fetchval("SELECT token FROM shard_fences WHERE shard = 0")
    with pytest.raises(FenceRejected):
        await write_flush(db, rows, stored_token - 1, "an-old-owner", Codecs())
    assert await db.fetchval("SELECT count(*) FROM outbox_batches") == before


async def test_events_fanned_out_again_leave_their_deliveries_as_they_are(
    database_url: str, redis_namespace: str, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """The same events in a second batch (a flush written again) make the same
    delivery ids: the copy that writes them conflicts, and the deliveries already
    there keep their state while the new ones are added, in the same transaction."""
    await _story(database_url, redis_namespace)
    await _endpoint(db, "we_all", ["*"])
    worker = DeliveryWorker(pool, {"webhook": Recording()}, EVERY_CHANNEL)
    assert await worker.dispatch_once(attempt=True) == 10
    assert await db.fetchval("SELECT count(*) FROM deliveries WHERE status = 'delivered'") == 10
    await _endpoint(db, "we_later", ["*"])
    await db.execute(
        "INSERT INTO outbox_batches (shard, committed_ms, events, payload)"
        " SELECT shard, committed_ms, events, payload FROM outbox_batches ORDER BY id"
    )
    assert await worker.dispatch_once() == 10
    rows = await db.fetch("SELECT endpoint_id, status, attempts FROM deliveries")
    assert sorted((r["endpoint_id"], r["status"], r["attempts"]) for r in rows) == (
        [("we_all", "delivered", 1)] * 10 + [("we_later", "pending", 0)] * 10
    )
    assert await db.fetchval("SELECT count(*) FROM outbox_batches WHERE dispatched_ms IS NULL") == 0


async def test_batches_become_deliveries_for_subscribed_endpoints_once(
    database_url: str, redis_namespace: str, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await _story(database_url, redis_namespace)
    await _endpoint(db, "we_all", ["*"])
    await _endpoint(db, "we_bookings", ["booking.confirmed", "booking.cancelled"])
    await db.execute(
        "INSERT INTO contacts (user_id, email, key_id, source, updated_at_ms)"
        " VALUES ('bob', '\\x00', 'k1', 'api', 0)"
    )
    worker = DeliveryWorker(pool, {"webhook": Recording(), "email": Recording()}, EVERY_CHANNEL)
    assert await worker.dispatch_once() == 10
    assert await worker.dispatch_once() == 0
    rows = await db.fetch("SELECT * FROM deliveries ORDER BY event_type, endpoint_id")
    by_endpoint = {
        endpoint: sorted(r["event_type"] for r in rows if r["endpoint_id"] == endpoint)
        for endpoint in ("we_all", "we_bookings")
    }
    assert len(by_endpoint["we_all"]) == 10
    assert by_endpoint["we_bookings"] == [
        "booking.cancelled", "booking.confirmed", "booking.confirmed",
    ]  # fmt: skip
    # Email only to a user with contact details, and only for the events mailed.
    emails = sorted(r["event_type"] for r in rows if r["channel"] == "email")
    assert emails == ["booking.confirmed", "queue.offer"]
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in rows)
    assert await db.fetchval("SELECT count(*) FROM outbox_batches WHERE dispatched_ms IS NULL") == 0

    # A domain that does not list a channel gets none of it.
    await db.execute("UPDATE outbox_batches SET dispatched_ms = NULL")
    await db.execute("DELETE FROM deliveries")
    quiet = DeliveryWorker(pool, {"webhook": Recording()}, {"default": frozenset({"websocket"})})
    await quiet.dispatch_once()
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0


async def test_failed_attempts_follow_the_schedule_then_the_delivery_is_dead(
    database_url: str, redis_namespace: str, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await _story(database_url, redis_namespace)
    await _endpoint(db, "we_all", ["slot.created"])
    clock = Clock()
    channel = Recording(failures=99)
    options = WorkerOptions(retry_seconds=(5, 30))
    worker = DeliveryWorker(pool, {"webhook": channel}, EVERY_CHANNEL, options=options, clock=clock)
    await worker.dispatch_once()
    for attempt, delay_s in ((1, 5), (2, 30)):
        assert await worker.deliver_once() == 1
        row = await db.fetchrow("SELECT * FROM deliveries")
        assert (row["status"], row["attempts"], row["last_error"]) == (
            "failed",
            attempt,
            "HTTP 500",
        )
        wait_ms = row["next_attempt_ms"] - int(clock.now * 1000)
        assert delay_s * 800 <= wait_ms <= delay_s * 1200  # the delay, with its jitter
        assert await worker.deliver_once() == 0  # not due yet
        clock.now += delay_s * 1.2 + 0.01
    assert await worker.deliver_once() == 1
    row = await db.fetchrow("SELECT * FROM deliveries")
    assert (row["status"], row["attempts"]) == ("dead", 3)
    clock.now += 10_000
    assert await worker.deliver_once() == 0  # dead stays dead
    assert len({d.event_id for d in channel.sent}) == 1 and len(channel.sent) == 3


async def test_a_lapsed_lease_is_claimed_again_and_the_late_answer_changes_nothing(
    database_url: str, redis_namespace: str, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await _story(database_url, redis_namespace)
    await _endpoint(db, "we_all", ["slot.created"])
    clock = Clock()
    options = WorkerOptions(lease_s=30)
    slow_channel, fast_channel = Recording(), Recording()
    release = asyncio.Event()

    async def slow_send(delivery: ClaimedDelivery) -> str | None:
        slow_channel.sent.append(delivery)
        await release.wait()
        return None

    slow_channel.send = slow_send  # type: ignore[method-assign]
    first = DeliveryWorker(
        pool, {"webhook": slow_channel}, EVERY_CHANNEL, options=options, clock=clock
    )
    second = DeliveryWorker(
        pool, {"webhook": fast_channel}, EVERY_CHANNEL, options=options, clock=clock
    )
    await first.dispatch_once()
    stuck = asyncio.ensure_future(first.deliver_once())
    while not slow_channel.sent:
        await asyncio.sleep(0.01)
    assert await second.deliver_once() == 0  # leased: nobody else attempts it meanwhile
    clock.now += 31
    assert await second.deliver_once() == 1  # the lease lapsed: attempted again, same event id
    assert fast_channel.sent[0].event_id == slow_channel.sent[0].event_id
    assert fast_channel.sent[0].attempt == 2
    release.set()
    await stuck
    assert first.counts.stale == 1
    row = await db.fetchrow("SELECT status, attempts FROM deliveries")
    assert (row["status"], row["attempts"]) == ("delivered", 2)


async def test_a_redelivered_dead_delivery_is_attempted_again(
    database_url: str, redis_namespace: str, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await _story(database_url, redis_namespace)
    await _endpoint(db, "we_all", ["slot.updated"])
    clock = Clock()
    receiver = Recording(failures=1)
    worker = DeliveryWorker(
        pool, {"webhook": receiver}, EVERY_CHANNEL,
        options=WorkerOptions(retry_seconds=()), clock=clock,
    )  # fmt: skip
    await worker.dispatch_once()
    await worker.deliver_once()
    assert await db.fetchval("SELECT status FROM deliveries") == "dead"
    receiver.failures = 0
    await db.execute(
        "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_ms = 0,"
        " lease_until_ms = NULL"
    )
    await worker.deliver_once()
    assert await db.fetchval("SELECT status FROM deliveries") == "delivered"


async def test_the_metrics_count_outcomes_and_lag_and_the_purge_keeps_what_is_not_done(
    database_url: str, redis_namespace: str, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    await _story(database_url, redis_namespace)
    await _endpoint(db, "we_all", ["*"])
    await _endpoint(db, "we_slots", ["slot.created", "slot.updated"])
    clock = Clock()
    registry = CollectorRegistry()
    metrics = NotifyMetrics(registry)
    # Its statements' durations, rendered as slotengine notify renders them.
    registry.register(TimingsCollector(metrics.timings))
    channels = {"webhook": Recording()}
    worker = DeliveryWorker(
        pool, channels, EVERY_CHANNEL, options=WorkerOptions(retry_seconds=()),
        metrics=metrics, clock=clock,
    )  # fmt: skip
    await worker.dispatch_once()
    later = "UPDATE deliveries SET next_attempt_ms = 9000000000000000 WHERE endpoint_id = $1"
    await db.execute(later, "we_all")
    channels["webhook"].failures = 1
    assert await worker.deliver_once() == 2  # we_slots' two fail: dead at once (no retries)
    await db.execute("UPDATE deliveries SET next_attempt_ms = 0 WHERE endpoint_id = 'we_all'")
    channels["webhook"].failures = 0
    assert await worker.deliver_once() == 10

    def value(name: str, **labels: str) -> float:
        found = registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    assert value("slotengine_deliveries_total", channel="webhook", outcome="dead") == 2
    assert value("slotengine_deliveries_total", channel="webhook", outcome="delivered") == 10
    assert value("slotengine_delivery_lag_seconds_count", channel="webhook") == 10
    # One fan-out (taken, written), two claims and two records of their attempts.
    statements = "database_query_duration_seconds_count"
    assert value(statements, query_type="outbox_take") == 1
    assert value(statements, query_type="delivery_insert") == 1
    assert value(statements, query_type="delivery_claim") == 2
    assert value(statements, query_type="delivery_record") == 2
    assert value("database_query_duration_seconds_sum", query_type="delivery_claim") > 0
    async with pool.acquire() as connection:
        state = await outbox_state(connection, int(clock.now * 1000))
    metrics.observe_state(state, int(clock.now * 1000))
    assert value("slotengine_deliveries_dead") == 2
    assert value("slotengine_outbox_undispatched_events") == 0

    # Past the retention, what was delivered goes and the dead stay.
    batches = await db.fetchval("SELECT count(*) FROM outbox_batches")
    async with pool.acquire() as connection:
        purged = await purge_delivered(connection, int(clock.now * 1000) + 1)
    assert purged == 10 + batches
    assert await db.fetchval("SELECT count(*) FROM outbox_batches") == 0
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 2
    assert await db.fetchval("SELECT count(*) FROM deliveries WHERE status = 'dead'") == 2

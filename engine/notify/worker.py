"""A delivery worker: fans the outbox out into deliveries and delivers them, at least once.

Any number run at once, on any machine (``slotengine notify``; one inside
``slotengine serve`` unless ``--no-notify``); PostgreSQL keeps them apart
(persistence/deliveries.py):

1. **Dispatch.** Undispatched outbox batches, locked ``FOR UPDATE SKIP
   LOCKED``, become deliveries: one per webhook endpoint subscribed to the
   event, one per email recipient, when the slot's domain lists that channel
   (``queueSettings.notificationChannels``). The batch is marked dispatched in
   the same transaction.
2. **Delivery.** Due deliveries are leased (the attempt counted), sent
   concurrently, and their outcomes recorded: delivered; failed, with the next
   attempt due after the retry schedule's delay for that attempt (with
   jitter); or dead after the schedule's last delay. A worker killed
   mid-delivery loses nothing: its lease lapses and another worker attempts
   again, under the same event id. A lease outlasts every channel's timeout,
   so two workers never send one attempt at once.

It must never decide what an event says (engine/notify/events.py does) nor
hold a delivery it cannot send: everything is in PostgreSQL between rounds.
"""

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import asyncpg
import msgspec

from engine.core.protocol import AnyEvent
from engine.notify.events import ALL_EVENTS, EVENT_TYPES
from engine.notify.metrics import NotifyMetrics
from engine.notify.notifications import Notification, notifications
from gateway.schemas import rfc3339
from persistence import deliveries as store
from persistence import timings as t
from persistence.deliveries import ClaimedDelivery, DeliveryResult, NewDelivery

logger = logging.getLogger(__name__)

# The retry schedule's default: seconds before the 2nd, 3rd... attempt; after the
# last, a delivery is dead (SLOTENGINE_DELIVERY_RETRY_SECONDS).
RETRY_SECONDS_DEFAULT: Final = (5, 30, 120, 600, 3600)
# Each delay varies by up to this fraction either way, so that deliveries that
# failed together (a receiver down) do not all come back at the same instant.
JITTER: Final = 0.2
# The events an email is sent for; booking.expired only when the hold lapsed.
EMAIL_EVENTS: Final = frozenset(
    {"queue.offer", "booking.confirmed", "booking.cancelled", "booking.expired"}
)
LAPSED_TRIGGERS: Final = frozenset({"hold_ttl", "claim_ttl"})
# Slots whose facts are kept at most (the cache starts over past this).
SLOT_FACTS_KEPT: Final = 50_000
_decode_events = msgspec.msgpack.Decoder(list[AnyEvent]).decode
_json = msgspec.json.Encoder()


class Channel(Protocol):
    """Sends one claimed delivery: None when it was received, else why not (short text).

    ``prepare`` is told of each round's deliveries of the channel before they
    are sent, so that what they need is read once for all of them."""

    async def prepare(self, deliveries: list[ClaimedDelivery]) -> None: ...

    async def send(self, delivery: ClaimedDelivery) -> str | None: ...


@dataclass(frozen=True)
class WorkerOptions:
    retry_seconds: tuple[int, ...] = RETRY_SECONDS_DEFAULT
    # How often an idle worker looks for new outbox batches, and for due retries
    # (the earliest retry is seconds away; a redelivery waits at most this).
    poll_s: float = 0.1
    retry_poll_s: float = 0.5
    # After a fan-out that found less than ``batch_limit`` batches, the loop waits
    # this long: a round's fixed cost (a transaction; the endpoints, slots and
    # contacts read) is then shared by the events of many flushes instead of a
    # few, for at most this much more lag.
    gather_s: float = 0.2
    # A slot's facts (its domain for the channels, its times for email) are read
    # again after this: a slot's domain never changes, its times rarely.
    slot_facts_s: float = 5.0
    # Outbox batches fanned out per transaction, deliveries claimed per round.
    batch_limit: int = 100
    claim_limit: int = 200
    # Fan-outs (with their first attempts) and rounds of later attempts under way
    # at once: a round's slow deliveries (an SMTP server, a receiver taking its
    # time) do not hold the next round back.
    dispatch_loops: int = 2
    delivery_loops: int = 2
    # Deliveries in flight at once, over all rounds.
    concurrency: int = 256
    # Twice any channel's timeout at least (engine/notify/service.py), with room to
    # record the outcome (SLOTENGINE_DELIVERY_LEASE_SECONDS).
    lease_s: float = 60.0
    # Delivered deliveries and dispatched batches are purged after this.
    retention_s: float = 72 * 3600.0
    # How often the outbox's state is read (metrics, health) and old rows purged.
    state_every_s: float = 5.0
    purge_every_s: float = 600.0


@dataclass
class WorkerCounts:
    dispatched_events: int = 0
    deliveries_made: int = 0
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    stale: int = 0
    lag_ms: list[int] = field(default_factory=list)


class DeliveryWorker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        channels: Mapping[str, Channel],
        domain_channels: Mapping[str, frozenset[str]],
        *,
        options: WorkerOptions | None = None,
        metrics: NotifyMetrics | None = None,
        clock: Callable[[], float] = time.time,
        keep_lags: bool = False,
    ) -> None:
        self._pool = pool
        self._channels = dict(channels)
        self._domain_channels = dict(domain_channels)
        self.options = options or WorkerOptions()
        self._metrics = metrics
        timings = metrics.timings if metrics is not None else t.Timings()
        self._take_timing = timings.database(t.DATABASE_OUTBOX_TAKE)
        self._insert_timing = timings.database(t.DATABASE_DELIVERY_INSERT)
        self._claim_timing = timings.database(t.DATABASE_DELIVERY_CLAIM)
        self._record_timing = timings.database(t.DATABASE_DELIVERY_RECORD)
        self._state_timing = timings.database(t.DATABASE_OUTBOX_STATE)
        self._purge_timing = timings.database(t.DATABASE_DELIVERY_PURGE)
        self._clock = clock
        self._keep_lags = keep_lags
        self.counts = WorkerCounts()
        self._semaphore = asyncio.Semaphore(self.options.concurrency)
        self.state: store.OutboxState | None = None
        self._round_full = False
        # Slot id -> (when read, by the monotonic clock; its row, None if unknown).
        self._slots: dict[str, tuple[float, Any]] = {}

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- 1. dispatch --------------------------------------------------------------

    async def dispatch_once(self, *, attempt: bool = False) -> int:
        """Fan out up to ``batch_limit`` outbox batches; returns how many events they held.

        ``attempt``: make each delivery's first attempt at once, in the same
        transaction, and write the delivery with its outcome (delivered, or
        failed with its next attempt due): one write a delivery instead of
        three, and no wait for the next claim. The batch's row stays locked
        while the attempts run, so no other worker sends them meanwhile; a
        worker that dies half way leaves the batch undispatched, and another
        fans it out and sends it again (at least once)."""
        async with self._pool.acquire() as connection, connection.transaction():
            with self._take_timing.time():
                batches = await store.take_batches(connection, self.options.batch_limit)
            self._round_full = len(batches) >= self.options.batch_limit
            if not batches:
                return 0
            now_ms = self._now_ms()
            endpoints = await store.subscribed_endpoints(connection)
            wanted = self._wanted(endpoints)
            made: list[tuple[store.OutboxBatch, Notification]] = []
            for batch in batches:
                events = _decode_events(zlib.decompress(batch.payload))
                made.extend((batch, n) for n in notifications(events, wanted))
            slots = await self._slot_facts(connection, {n.slot_id for _, n in made})
            mailable = sorted(
                {n.user_id for _, n in made if n.user_id is not None and n.type in EMAIL_EVENTS}
            )
            with_contacts = (
                await store.users_with_contacts(connection, mailable)
                if mailable and "email" in self._channels
                else set()
            )
            deliveries = [
                delivery
                for batch, n in made
                for delivery in self._fan_out(n, batch, slots, endpoints, with_contacts, now_ms)
            ]
            if attempt and deliveries:
                deliveries = await self._first_attempts(deliveries)
            with self._insert_timing.time():
                await store.add_deliveries(connection, deliveries)
                await store.mark_dispatched(connection, [b.id for b in batches], now_ms)
        self.counts.dispatched_events += len(made)
        self.counts.deliveries_made += len(deliveries)
        return max(len(made), len(batches))

    async def _slot_facts(
        self, connection: asyncpg.Connection, slot_ids: set[str]
    ) -> dict[str, Any]:
        """The slots' rows, from what was read in the last ``slot_facts_s`` or read now."""
        now = time.monotonic()
        fresh_after = now - self.options.slot_facts_s
        found: dict[str, Any] = {}
        missing: list[str] = []
        for slot_id in slot_ids:
            known = self._slots.get(slot_id)
            if known is not None and known[0] >= fresh_after:
                if known[1] is not None:
                    found[slot_id] = known[1]
            else:
                missing.append(slot_id)
        if missing:
            if len(self._slots) >= SLOT_FACTS_KEPT:
                self._slots.clear()
            read = await store.slot_facts(connection, sorted(missing))
            for slot_id in missing:
                row = read.get(slot_id)
                self._slots[slot_id] = (now, row)
                if row is not None:
                    found[slot_id] = row
        return found

    def _wanted(self, endpoints: list[tuple[str, frozenset[str]]]) -> frozenset[str]:
        """The event types some channel here would deliver."""
        wanted: set[str] = set()
        if "webhook" in self._channels:
            for _, events in endpoints:
                wanted |= set(EVENT_TYPES) if ALL_EVENTS in events else events
        if "email" in self._channels:
            wanted |= EMAIL_EVENTS
        return frozenset(wanted)

    async def _first_attempts(self, deliveries: list[NewDelivery]) -> list[NewDelivery]:
        results = await self._send([d.first_attempt() for d in deliveries])
        return [d.attempted(result) for d, result in zip(deliveries, results, strict=True)]

    def _fan_out(
        self,
        n: Notification,
        batch: store.OutboxBatch,
        slots: Mapping[str, Any],
        endpoints: list[tuple[str, frozenset[str]]],
        with_contacts: set[str],
        now_ms: int,
    ) -> list[NewDelivery]:
        slot = slots.get(n.slot_id)
        domain = n.domain or (slot["domain"] if slot is not None else "default")
        wanted = self._domain_channels.get(domain, frozenset())
        out: list[NewDelivery] = []
        if "webhook" in wanted and "webhook" in self._channels:
            body = n.body()
            for endpoint_id, events in endpoints:
                if ALL_EVENTS in events or n.type in events:
                    out.append(self._delivery(n, batch, "webhook", endpoint_id, None, body, now_ms))
        if (
            "email" in wanted
            and n.user_id in with_contacts
            and n.type in EMAIL_EVENTS
            and (n.type != "booking.expired" or n.data.get("trigger") in LAPSED_TRIGGERS)
        ):
            body = _json.encode(
                {
                    "type": n.type,
                    "atMs": n.at_ms,
                    "domain": domain,
                    "data": n.data,
                    "slot": _slot_resource(slot) if slot is not None else None,
                }
            )
            out.append(self._delivery(n, batch, "email", None, n.user_id, body, now_ms))
        return out

    @staticmethod
    def _delivery(
        n: Notification,
        batch: store.OutboxBatch,
        channel: str,
        endpoint_id: str | None,
        user_id: str | None,
        body: bytes,
        now_ms: int,
    ) -> NewDelivery:
        target = f"{n.id}\0{channel}\0{endpoint_id or ''}\0{user_id or ''}"
        return NewDelivery(
            id="dlv_" + hashlib.blake2b(target.encode(), digest_size=12).hexdigest(),
            event_id=n.id,
            event_type=n.type,
            channel=channel,
            endpoint_id=endpoint_id,
            user_id=user_id,
            subject=n.subject,
            seq=n.seq,
            body=body,
            next_attempt_ms=now_ms,
            committed_ms=batch.committed_ms,
            created_at_ms=now_ms,
        )

    # -- 2. delivery --------------------------------------------------------------

    async def deliver_once(self) -> int:
        """Claim due deliveries, send them, record the outcomes; returns how many."""
        lease_ms = int(self.options.lease_s * 1000)
        async with self._pool.acquire() as connection:
            with self._claim_timing.time():
                claimed = await store.claim_due(
                    connection, self._now_ms(), lease_ms, self.options.claim_limit
                )
        if not claimed:
            return 0
        results = await self._send(claimed)
        async with self._pool.acquire() as connection:
            with self._record_timing.time():
                held = await store.record_results(connection, list(results))
        self.counts.stale += len(results) - held
        return len(claimed)

    async def _send(self, claimed: list[ClaimedDelivery]) -> list[DeliveryResult]:
        for name, channel in self._channels.items():
            mine = [d for d in claimed if d.channel == name]
            if mine:
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await channel.prepare(mine)  # else each send reads for itself
        return list(await asyncio.gather(*(self._attempt(d) for d in claimed)))

    async def _attempt(self, delivery: ClaimedDelivery) -> DeliveryResult:
        channel = self._channels.get(delivery.channel)
        async with self._semaphore:
            if channel is None:
                error: str | None = f"channel {delivery.channel} is not configured here"
            else:
                try:
                    error = await channel.send(delivery)
                except Exception as exc:  # a channel's own bug fails the attempt, not the worker
                    logger.exception("delivery %s: the %s channel failed", delivery.id,
                                     delivery.channel)  # fmt: skip
                    error = f"internal error: {type(exc).__name__}"
        now_ms = self._now_ms()
        if error is None:
            self.counts.delivered += 1
            lag_ms = max(0, now_ms - delivery.committed_ms)
            if self._keep_lags:
                self.counts.lag_ms.append(lag_ms)
            if self._metrics is not None:
                self._metrics.delivered(delivery.channel, lag_ms / 1000)
            return DeliveryResult(
                delivery.id, delivery.attempt, store.DELIVERED, now_ms, None, now_ms
            )
        retries = self.options.retry_seconds
        if delivery.attempt > len(retries):
            self.counts.dead += 1
            if self._metrics is not None:
                self._metrics.outcome(delivery.channel, "dead")
            logger.warning(
                "delivery %s of %s (%s) is dead after %d attempts: %s",
                delivery.id, delivery.event_type, delivery.channel, delivery.attempt, error,
            )  # fmt: skip
            return DeliveryResult(delivery.id, delivery.attempt, store.DEAD, now_ms, error, now_ms)
        self.counts.failed += 1
        if self._metrics is not None:
            self._metrics.outcome(delivery.channel, "failed")
        delay_s = retries[delivery.attempt - 1] * random.uniform(1 - JITTER, 1 + JITTER)
        next_ms = now_ms + int(delay_s * 1000)
        return DeliveryResult(delivery.id, delivery.attempt, store.FAILED, next_ms, error, now_ms)

    # -- running ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch and deliver until ``stop`` is set; a database outage is waited out."""
        tasks = [
            *(
                asyncio.create_task(
                    self._loop(
                        functools.partial(self.dispatch_once, attempt=True), stop, self._gather
                    ),
                    name=f"notify-dispatch-{n}",
                )
                for n in range(self.options.dispatch_loops)
            ),
            *(
                asyncio.create_task(
                    self._loop(self.deliver_once, stop, idle_s=self.options.retry_poll_s),
                    name=f"notify-deliver-{n}",
                )
                for n in range(self.options.delivery_loops)
            ),
            asyncio.create_task(self._housekeeping(stop), name="notify-housekeeping"),
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _gather(self) -> float:
        return 0.0 if self._round_full else self.options.gather_s

    async def _loop(
        self,
        step: Callable[[], Any],
        stop: asyncio.Event,
        pause: Callable[[], float] | None = None,
        *,
        idle_s: float | None = None,
    ) -> None:
        """Run ``step`` until stopped: again at once while it finds work (or after
        ``pause()`` seconds), after ``idle_s`` (``poll_s``) when it found none."""
        failures = 0
        while not stop.is_set():
            try:
                done = await step()
                failures = 0
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                failures += 1
                if failures == 1 or failures % 50 == 0:
                    logger.warning("notifications wait for PostgreSQL: %s", exc)
                await _sleep_or_stop(stop, min(5.0, 0.2 * failures))
                continue
            except Exception:
                # A bug must not stop the deliveries for good: said, then tried again.
                failures += 1
                logger.exception("a round of deliveries failed")
                await _sleep_or_stop(stop, min(5.0, 0.2 * failures))
                continue
            if not done:
                await _sleep_or_stop(stop, self.options.poll_s if idle_s is None else idle_s)
            elif pause is not None and (pause_s := pause()) > 0:
                await _sleep_or_stop(stop, pause_s)

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        last_purge = 0.0
        while not stop.is_set():
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                async with self._pool.acquire() as connection:
                    now_ms = self._now_ms()
                    with self._state_timing.time():
                        self.state = await store.outbox_state(connection, now_ms)
                    if self._metrics is not None:
                        self._metrics.observe_state(self.state, now_ms)
                    if time.monotonic() - last_purge >= self.options.purge_every_s:
                        cut_ms = now_ms - int(self.options.retention_s * 1000)
                        with self._purge_timing.time():
                            await store.purge_delivered(connection, cut_ms)
                        last_purge = time.monotonic()
            await _sleep_or_stop(stop, self.options.state_every_s)


def _slot_resource(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "resourceId": row["resource_id"],
        "domain": row["domain"],
        "startTime": rfc3339(row["start_ms"]),
        "endTime": rfc3339(row["end_ms"]),
        "capacity": row["capacity"],
        "metadata": msgspec.json.decode(row["metadata"]),
    }


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

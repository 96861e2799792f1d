"""Notifications end to end: a shard's committed changes reach a real HTTP receiver, signed,
and real mailboxes (aiosmtpd), through the delivery worker's own channels."""

import asyncio
import email
import email.policy
import time
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from typing import Any

import asyncpg
import icalendar
import msgspec
import pytest
from aiosmtpd.controller import Controller
from standardwebhooks.webhooks import Webhook

from engine.core import protocol as p
from engine.notify.channels import EmailChannel, WebhookChannel
from engine.notify.events import EVENT_TYPES
from engine.notify.mail import load_templates
from engine.notify.webhooks import new_secret
from engine.notify.worker import DeliveryWorker, WorkerOptions
from engine.shell.clock import SystemClock
from engine.shell.owner import ShardOwner
from persistence.contacts import put_contact
from persistence.sealing import KeyRing, new_key
from persistence.webhooks import create_endpoint, list_deliveries, redeliver
from tests.persistence.helpers import Driver, create_slot, request_id, slot_on, storage
from tests.support.domain import policy
from tests.support.ray_head import free_port
from tests.support.receivers import Receiver

EVERYWHERE = {"default": frozenset({"websocket", "webhook", "email"})}
CLAIM_TTL_MS = 400
USERS = ("ann", "bob", "cat", "dan", "eve")


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, str]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, f"smtp://127.0.0.1:{port}"
    controller.stop()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=6) as created:
        yield created


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def _every_event(database_url: str, namespace: str) -> dict[str, str]:
    """A scene that makes every event type once at least; answers the booking ids."""
    owner = ShardOwner(
        shard_id=0,
        shard_count=1,
        policies={"default": policy(claim_ttl_ms=CLAIM_TTL_MS)},
        clock=SystemClock(),
        storage=storage(database_url, namespace),
    )
    await owner.start()
    drive = Driver(owner)
    ids: dict[str, str] = {}
    try:
        now_ms = SystemClock().now_ms()
        slot = slot_on(0, 1)
        await drive.one(create_slot(slot, now_ms, capacity=1))

        async def reserve(user: str) -> p.AnyResult:
            return await drive.one(p.Reserve(request_id=request_id(), slot_id=slot, user_id=user))

        held = await reserve("ann")
        assert isinstance(held, p.BookingResult)
        ids["ann"] = held.booking.id
        assert isinstance(await reserve("bob"), p.QueueResult)
        for command in (p.ExtendHold, p.ReleaseHold):
            done = await drive.one(
                command(request_id=request_id(), booking_id=ids["ann"], user_id="ann")
            )
            assert isinstance(done, p.BookingResult), done
        # bob is offered ann's place, and lets the offer lapse.
        await asyncio.sleep(CLAIM_TTL_MS / 1000 + 0.6)
        held = await reserve("cat")
        assert isinstance(held, p.BookingResult), held
        ids["cat"] = held.booking.id
        await drive.one(p.Confirm(request_id=request_id(), booking_id=ids["cat"], user_id="cat"))
        assert isinstance(await reserve("dan"), p.QueueResult)
        await drive.one(
            p.Cancel(request_id=request_id(), booking_id=ids["cat"], user_id="cat", reason="flu")
        )
        offer = await drive.one(
            p.QueuePosition(request_id=request_id(), slot_id=slot, user_id="dan")
        )
        assert isinstance(offer, p.QueueResult) and offer.entry.booking_id is not None
        ids["dan"] = offer.entry.booking_id
        await drive.one(p.Confirm(request_id=request_id(), booking_id=ids["dan"], user_id="dan"))
        await drive.one(
            p.UpdateSlot(request_id=request_id(), slot_id=slot, capacity=2, actor="admin:root")
        )
        # A slot that ends at once: its confirmed booking completes.
        short = slot_on(0, 1, resource="short")
        now_ms = SystemClock().now_ms()
        created = await drive.one(
            create_slot(short, now_ms, capacity=1, start_ms=now_ms + 300, end_ms=now_ms + 600)
        )
        assert created.status == 201, created
        held = await drive.one(p.Reserve(request_id=request_id(), slot_id=short, user_id="eve"))
        assert isinstance(held, p.BookingResult), held
        await drive.one(
            p.Confirm(request_id=request_id(), booking_id=held.booking.id, user_id="eve")
        )
        await asyncio.sleep(1.2)
        deleted = await drive.one(
            p.DeleteSlot(request_id=request_id(), slot_id=short, actor="admin:root")
        )
        assert deleted.status in (200, 204), deleted
        return ids
    finally:
        await owner.close()


async def _drain(worker: DeliveryWorker, rounds: int = 50, *, attempt: bool = False) -> None:
    """Fan out and deliver until nothing is left; ``attempt``: as a running worker does,
    the first attempts made with the fan-out."""
    for _ in range(rounds):
        if not (await worker.dispatch_once(attempt=attempt) or await worker.deliver_once()):
            return


async def test_every_event_reaches_the_webhook_signed_and_the_users_mailboxes(
    database_url: str,
    redis_namespace: str,
    pool: asyncpg.Pool,
    receiver: Receiver,
    mailbox: tuple[Mailbox, str],
) -> None:
    box, smtp_url = mailbox
    ring = KeyRing([new_key("k1")])
    secret = new_secret()
    await create_endpoint(pool, ring, receiver.url, ["*"], secret, 0)
    for user in USERS:
        await put_contact(pool, ring, user, f"{user}@example.com", "api", 0)
    ids = await _every_event(database_url, redis_namespace)

    webhook = WebhookChannel(pool, ring, allow_private=True)
    mail = EmailChannel(
        pool, ring, smtp_url, "bookings@example.com", load_templates(domains=["default"])
    )
    worker = DeliveryWorker(pool, {"webhook": webhook, "email": mail}, EVERYWHERE)
    try:
        await _drain(worker, attempt=True)
    finally:
        await webhook.close()
        await mail.close()

    assert set(receiver.types()) == set(EVENT_TYPES)
    verifier = Webhook(secret)
    for _, headers, body in receiver.requests:
        verified = verifier.verify(body, headers)
        assert verified["type"] in EVENT_TYPES and "data" in verified
    with pytest.raises(Exception):  # noqa: B017 (the library's own verification error)
        _, headers, body = receiver.requests[0]
        verifier.verify(body.replace(b'"type"', b'"typo"'), headers)
    assert await pool.fetchval("SELECT count(*) FROM deliveries WHERE status <> 'delivered'") == 0

    # The mailed events, to the user each concerns.
    subjects = {user: [m["Subject"] for m in box.to(f"{user}@example.com")] for user in USERS}
    assert len(subjects["ann"]) == 0  # reserved, extended, released: no email
    assert len(subjects["bob"]) == 2  # the offer, then its lapse
    offer = next(m for m in box.to("bob@example.com") if "X-Slotengine-Event-Id" in m)
    bob_events = [
        msgspec.json.decode(body)
        for _, _, body in receiver.requests
        if msgspec.json.decode(body)["type"] == "queue.offer"
        and msgspec.json.decode(body)["data"]["userId"] == "bob"
    ]
    deadline = bob_events[0]["data"]["claimDeadline"]
    texts = [
        part.get_content()
        for m in box.to("bob@example.com")
        for part in m.walk()
        if part.get_content_type() == "text/plain"
    ]
    assert any(deadline[11:16] in text for text in texts), (deadline, texts)
    assert offer["X-Slotengine-Event-Id"].startswith("msg_")
    cat = box.to("cat@example.com")
    assert len(cat) == 2  # confirmed, cancelled (with the reason and refund)
    cancelled_text = "\n".join(
        part.get_content()
        for m in cat
        for part in m.walk()
        if part.get_content_type() == "text/plain"
    )
    assert "flu" in cancelled_text and "100" in cancelled_text
    dan = box.to("dan@example.com")
    assert len(dan) == 2  # the offer, then the confirmation of the claimed offer
    calendars = [
        part for m in dan for part in m.walk() if part.get_content_type() == "text/calendar"
    ]
    assert len(calendars) == 1
    payload = calendars[0].get_payload(decode=True)
    assert isinstance(payload, bytes)
    calendar = icalendar.Calendar.from_ical(payload)
    event = next(iter(calendar.walk("VEVENT")))
    assert str(event["UID"]).startswith(ids["dan"])


async def test_a_receiver_that_recovers_gets_everything_and_one_that_never_does_ends_dead(
    database_url: str, redis_namespace: str, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    ring = KeyRing([new_key("k1")])
    endpoint = await create_endpoint(pool, ring, receiver.url, ["slot.created"], new_secret(), 0)
    owner = ShardOwner(
        shard_id=0, shard_count=1, policies={"default": policy()}, clock=SystemClock(),
        storage=storage(database_url, redis_namespace),
    )  # fmt: skip
    await owner.start()
    try:
        drive = Driver(owner)
        now_ms = SystemClock().now_ms()
        for n in range(3):
            await drive.one(create_slot(slot_on(0, 1, resource=f"r{n}"), now_ms + n * 10_000_000))
    finally:
        await owner.close()

    clock = Clock()
    channel = WebhookChannel(pool, ring, allow_private=True)
    options = WorkerOptions(retry_seconds=(5, 30))
    worker = DeliveryWorker(
        pool, {"webhook": channel}, {"default": frozenset({"webhook"})}, options=options,
        clock=clock,
    )  # fmt: skip
    attempts_at: list[float] = []
    try:
        receiver.status = 500
        await worker.dispatch_once()
        for delay_s in (0.0, 5 * 1.2, 30 * 1.2):  # the first attempt, then the schedule
            clock.now += delay_s
            sent = len(receiver.requests)
            assert await worker.deliver_once() == 3
            assert len(receiver.requests) == sent + 3
            attempts_at.append(clock.now)
            clock.now += 0.001
            assert await worker.deliver_once() == 0  # nothing due before the next delay
            if delay_s == 5 * 1.2:
                receiver.status = 204  # recovers for the last attempt
        delivered, _ = await list_deliveries(pool, endpoint.id, "delivered", None, 10)
        assert len(delivered) == 3 and all(d.attempts == 3 for d in delivered)
        # The attempts came on the schedule: each after its delay, none before.
        assert attempts_at[1] - attempts_at[0] >= 5 * 0.8
        assert attempts_at[2] - attempts_at[1] >= 30 * 0.8
        # Every attempt of one event carried its one id.
        by_id: dict[str, int] = {}
        for _, headers, _ in receiver.requests:
            by_id[headers["webhook-id"]] = by_id.get(headers["webhook-id"], 0) + 1
        assert sorted(by_id.values()) == [3, 3, 3]

        # A receiver that never recovers: dead after the schedule, listed, redelivered.
        await pool.execute("UPDATE outbox_batches SET dispatched_ms = NULL")
        await pool.execute("DELETE FROM deliveries")
        receiver.status = 503
        await worker.dispatch_once()
        for delay_s in (0.0, 5 * 1.2, 30 * 1.2):
            clock.now += delay_s
            assert await worker.deliver_once() == 3
        dead, _ = await list_deliveries(pool, endpoint.id, "dead", None, 10)
        assert len(dead) == 3 and all(d.attempts == 3 for d in dead)
        assert {d.last_error for d in dead} == {"HTTP 503"}
        clock.now += 10_000
        assert await worker.deliver_once() == 0
        receiver.status = 204
        assert await redeliver(pool, dead[0].id, int(clock.now * 1000))
        assert await worker.deliver_once() == 1
        again, _ = await list_deliveries(pool, endpoint.id, "delivered", None, 10)
        assert [d.id for d in again] == [dead[0].id]
    finally:
        await channel.close()


async def test_two_workers_never_send_one_attempt_at_once(
    database_url: str, redis_namespace: str, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    ring = KeyRing([new_key("k1")])
    await create_endpoint(pool, ring, receiver.url, ["*"], new_secret(), 0)
    owner = ShardOwner(
        shard_id=0, shard_count=1, policies={"default": policy()}, clock=SystemClock(),
        storage=storage(database_url, redis_namespace),
    )  # fmt: skip
    await owner.start()
    try:
        drive = Driver(owner)
        now_ms = SystemClock().now_ms()
        slot = slot_on(0, 1)
        await drive.one(create_slot(slot, now_ms, capacity=200))
        await drive.run(
            *(p.Reserve(request_id=request_id(), slot_id=slot, user_id=f"u{n}") for n in range(150))
        )
    finally:
        await owner.close()
    receiver.delay_s = 0.005
    channels = [WebhookChannel(pool, ring, allow_private=True) for _ in range(2)]
    workers = [
        DeliveryWorker(pool, {"webhook": c}, {"default": frozenset({"webhook"})},
                       options=WorkerOptions(claim_limit=20, batch_limit=1))
        for c in channels
    ]  # fmt: skip
    try:
        await asyncio.gather(*(_drain(w, rounds=200) for w in workers))
    finally:
        for channel in channels:
            await channel.close()
    ids = [headers["webhook-id"] for _, headers, _ in receiver.requests]
    assert len(ids) == 151 and len(set(ids)) == 151  # each event once: no attempt twice
    assert receiver.overlaps == []
    assert all(w.counts.delivered > 0 for w in workers)  # both took part

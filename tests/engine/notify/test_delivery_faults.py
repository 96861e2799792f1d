"""Faults under load: a delivery worker SIGKILLed mid-delivery, then PostgreSQL restarted.

A shard books on a PostgreSQL of the test's own while ``slotengine notify``
processes deliver every event to a real HTTP receiver that answers slowly
(so that deliveries are in flight when the worker dies). Afterwards every
event of the outbox has reached the receiver at least once, and each one that
arrived twice arrived under its one ``webhook-id`` with the same body.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import msgspec
import pytest

from engine.core import protocol as p
from engine.core.protocol import AnyEvent
from engine.notify.notifications import notifications
from engine.notify.webhooks import new_secret
from engine.shell.clock import SystemClock
from engine.shell.owner import ShardOwner
from persistence.migrate import migrate_url
from persistence.sealing import KeyRing, format_key, new_key
from persistence.services import PrivatePostgres, create_database
from persistence.webhooks import create_endpoint
from tests.persistence.helpers import Driver, create_slot, request_id, slot_on, storage
from tests.support.domain import policy
from tests.support.fixtures import private_postgres  # noqa: F401 (a fixture)
from tests.support.receivers import Receiver

ROOT = Path(__file__).resolve().parents[3]
# Short, so that a killed worker's deliveries come back within seconds.
LEASE_S = 4
SETTLE_TIMEOUT_S = 120.0


@contextlib.contextmanager
def _worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "notify"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


Check = Callable[[], Awaitable[bool]]


async def _until(predicate: Check, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out: {what}")


@contextlib.asynccontextmanager
async def _load(owner: ShardOwner) -> AsyncIterator[list[str]]:
    """Reservations, one every few milliseconds, for as long as the block runs; yields
    the ids of the holds acknowledged (a refusal while PostgreSQL is away is fine)."""
    drive = Driver(owner)
    slot = slot_on(0, 1)
    created = await drive.one(create_slot(slot, SystemClock().now_ms(), capacity=100_000))
    assert created.status == 201, created
    acknowledged: list[str] = []
    stop = asyncio.Event()

    async def book() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            result = await drive.one(
                p.Reserve(request_id=request_id(), slot_id=slot, user_id=f"user-{n}")
            )
            if isinstance(result, p.BookingResult):
                acknowledged.append(result.booking.id)
            await asyncio.sleep(0.005)

    task = asyncio.ensure_future(book())
    try:
        yield acknowledged
    finally:
        stop.set()
        await task


async def test_a_killed_worker_and_a_restarted_database_lose_no_notification(
    private_postgres: PrivatePostgres,  # noqa: F811
    receiver: Receiver,
    redis_namespace: str,
    tmp_path: Path,
) -> None:
    database_url = private_postgres.url_for("notify_faults")
    await create_database(database_url)
    await migrate_url(database_url)
    key = new_key("k1")
    ring = KeyRing([key])
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as pool:
        await create_endpoint(pool, ring, receiver.url, ["*"], new_secret(), 0)
    receiver.delay_s = 0.05  # deliveries stay in flight a while
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SLOTENGINE_DATA_KEY": format_key(key),
        "SLOTENGINE_WEBHOOK_ALLOW_PRIVATE": "true",
        "SLOTENGINE_DELIVERY_LEASE_SECONDS": str(LEASE_S),
        "SLOTENGINE_DELIVERY_RETRY_SECONDS": "1,1,1,1,1,1,1,1,1,1",
        "SLOTENGINE_DATA_DIR": str(tmp_path / "data"),
    }
    owner = ShardOwner(
        shard_id=0, shard_count=1, policies={"default": policy()}, clock=SystemClock(),
        storage=storage(database_url, redis_namespace),
    )  # fmt: skip
    await owner.start()
    log = tmp_path / "workers.log"
    try:
        async with _load(owner) as acknowledged:
            with _worker(env, log) as first:

                async def in_flight() -> bool:
                    return len(receiver.requests) >= 20 and any(receiver.in_flight.values())

                await _until(in_flight, "the first worker delivers", 60)
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
            got_before_restart = len(receiver.requests)
            with _worker(env, log):
                await _until(
                    _more_than(receiver, got_before_restart + 20), "the second worker delivers", 60
                )
                await private_postgres.arestart("immediate")
                await _until(
                    _more_than(receiver, len(receiver.requests) + 20),
                    "deliveries go on after the restart",
                    60,
                )
                await asyncio.sleep(0.5)
        # The load has stopped; a worker delivers whatever is left.
        with _worker(env, log) as third:
            try:
                await _until(_settled(database_url), "delivered", SETTLE_TIMEOUT_S)
            except AssertionError:
                raise AssertionError(await _state(database_url)) from None
            assert third.poll() is None, log.read_text()[-3000:]
        assert len(acknowledged) > 50
    finally:
        await owner.close()

    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT payload FROM outbox_batches ORDER BY id")
        statuses = dict(
            await connection.fetch("SELECT status, count(*) FROM deliveries GROUP BY status")
        )
    finally:
        await connection.close()
    decode = msgspec.msgpack.Decoder(list[AnyEvent]).decode
    expected = {
        n.id: n for row in rows for n in notifications(decode(zlib.decompress(row["payload"])))
    }
    bodies: dict[str, bytes] = {}
    duplicates = 0
    for _, headers, body in receiver.requests:
        event_id = headers["webhook-id"]
        if event_id in bodies:
            duplicates += 1
            assert bodies[event_id] == body  # a duplicate is the same event, byte for byte
        bodies[event_id] = body
    assert set(expected) <= set(bodies), "an event of the outbox never reached the receiver"
    assert set(bodies) <= set(expected)
    reserved = {
        msgspec.json.decode(body)["data"]["id"]
        for body in bodies.values()
        if msgspec.json.decode(body)["type"] == "booking.reserved"
    }
    assert set(acknowledged) <= reserved  # every acknowledged hold was told
    assert statuses == {"delivered": len(expected)}, statuses
    assert receiver.overlaps == []


def _more_than(receiver: Receiver, count: int) -> Check:
    async def check() -> bool:
        return len(receiver.requests) > count

    return check


async def _state(database_url: str) -> str:
    connection = await asyncpg.connect(database_url)
    try:
        batches = await connection.fetchval(
            "SELECT count(*) FROM outbox_batches WHERE dispatched_ms IS NULL"
        )
        rows = await connection.fetch(
            "SELECT status, attempts, last_error, lease_until_ms, next_attempt_ms, count(*)"
            " FROM deliveries WHERE status <> 'delivered'"
            " GROUP BY 1, 2, 3, 4, 5 ORDER BY 6 DESC LIMIT 10"
        )
        activity = await connection.fetch(
            "SELECT pid, state, backend_start, xact_start, left(query, 120) AS q"
            " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        rows = [*rows, *activity]
    finally:
        await connection.close()
    now_ms = int(time.time() * 1000)
    return (
        f"not delivered (now {now_ms}): {batches} batches undispatched, {[tuple(r) for r in rows]}"
    )


def _settled(database_url: str) -> Check:
    async def check() -> bool:
        try:
            connection = await asyncpg.connect(database_url)
        except (OSError, asyncpg.PostgresError):
            return False
        try:
            waiting = await connection.fetchval(
                "SELECT (SELECT count(*) FROM outbox_batches WHERE dispatched_ms IS NULL)"
                " + (SELECT count(*) FROM deliveries WHERE status <> 'delivered')"
            )
        finally:
            await connection.close()
        return bool(waiting == 0)

    return check


pytestmark = pytest.mark.timeout(400)

"""A backup taken while the engine serves load restores into a database the engine serves.

The procedures of ``docs/operations.md`` ("Backups and restore"), performed:
an owner serves a few small slots (confirmed bookings, holds, waiting queues)
while users reserve, confirm, cancel and join in the background, and the
database is backed up meanwhile: logically (``pg_dump --format=custom``,
restored with ``pg_restore`` into a fresh database) and physically
(``pg_basebackup -X stream`` of a PostgreSQL of the test's own, checked with
``pg_verifybackup`` and started as a server of its own), and to a point in
time (a base backup, then WAL archived with ``archive_command`` and replayed
with ``restore_command`` up to ``recovery_target_time``: a change acknowledged
after the target is not there). A new owner (another owner id, another Redis
prefix) starts on the restored database. Then:

- every change the engine acknowledged before the backup began is there: the
  bookings with their status, the holds, the queue places in join order;
- the engine serves exactly the restored rows: every booking and queue entry
  of the database is answered with the same state, no slot is over capacity,
  no user has two active bookings of one slot;
- the timers are re-armed: a hold of the backup's moment lapses once its
  deadline passes, with nobody calling the engine, and its place is offered
  to the head of the slot's queue.

The restored owner's clock runs ahead of the wall clock by nearly the
expiring hold's TTL, so that hold (ten minutes, certainly still held when the
backup is taken) lapses a few seconds after the new owner starts (at once if
the restore took longer), while every other hold and offer (an hour) stays.
"""

import asyncio
import contextlib
import datetime
import os
import random
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from engine.core import protocol as p
from engine.core.records import Booking
from engine.core.states import BookingStatus, QueueStatus
from engine.shell.clock import SystemClock
from engine.shell.owner import ShardOwner
from persistence.migrate import migrate_url
from persistence.services import PrivatePostgres, create_database, find_postgres_bindir
from tests.conftest import DATABASE_URL, forget_namespace, with_database
from tests.persistence.helpers import Driver, create_slot, make_owner, request_id, slot_on
from tests.support.domain import HOUR_MS, MINUTE_MS, SECOND_MS, policy
from tests.support.integrity import assert_consistent

pytestmark = pytest.mark.slow

# Holds and offers of the load outlive the test, whatever the restored clock reads.
LONG_TTL_MS = HOUR_MS
# The hold made just before the backup: long enough to be held at the backup's
# moment on any machine; the restored owner's clock runs EXPIRING_HOLD_MS -
# EXPIRY_LEAD_MS ahead, so it lapses about EXPIRY_LEAD_MS after the restore.
EXPIRING_HOLD_MS = 10 * MINUTE_MS
EXPIRY_LEAD_MS = 3 * SECOND_MS
DOMAINS = {
    "default": policy(hold_ttl_ms=LONG_TTL_MS, claim_ttl_ms=LONG_TTL_MS),
    "expiring": policy("expiring", hold_ttl_ms=EXPIRING_HOLD_MS, claim_ttl_ms=LONG_TTL_MS),
}
LOAD_SLOTS = 4
LOAD_CAPACITY = 3
LOAD_USERS = 12
LOAD_PAUSE_S = 0.005
# Acknowledged replies of the load before the backup starts.
ACKNOWLEDGED_BEFORE_BACKUP = 400
# Bounds generous for a loaded machine, never expectations of its speed.
LOAD_DEADLINE_S = 120.0
EXPIRY_DEADLINE_S = 120.0
POLL_S = 0.1
COMMAND_TIMEOUT_S = 600.0
CHUNK = 200
ACTIVE = ("RESERVED", "CONFIRMED")


@dataclass
class Ledger:
    """The newest acknowledged state of every booking and queue place, as users saw it."""

    bookings: dict[str, Booking] = field(default_factory=dict)
    places: dict[tuple[str, str], int] = field(default_factory=dict)  # -> seq
    acknowledged: int = 0

    def record(self, result: p.AnyResult) -> None:
        if isinstance(result, p.BookingResult):
            self.acknowledged += 1
            known = self.bookings.get(result.booking.id)
            if known is None or known.version <= result.booking.version:
                self.bookings[result.booking.id] = result.booking
        elif isinstance(result, p.QueueResult):
            self.acknowledged += 1
            key = (result.entry.slot_id, result.entry.user_id)
            self.places[key] = max(self.places.get(key, 0), result.entry.seq)

    def copy(self) -> "Ledger":
        return Ledger(dict(self.bookings), dict(self.places), self.acknowledged)


@dataclass
class Moment:
    """What the engine had acknowledged when the backup began."""

    ledger: Ledger
    confirmed: Booking  # ann's, on the fixed slot
    held: Booking  # bob's, on the fixed slot
    waiting: list[tuple[str, str, int]]  # (slot, user, seq) in join order
    expiring: Booking  # fay's hold, made just before the backup
    next_in_line: str  # gus, behind fay


async def _user(
    drive: Driver, user: str, slots: list[str], ledger: Ledger, stop: asyncio.Event
) -> None:
    """Reserves, confirms, releases, cancels and joins queues at random until ``stop``."""
    rng = random.Random(user)
    mine: dict[str, Booking] = {}  # slot -> this user's active booking there
    while not stop.is_set():
        slot_id = rng.choice(slots)
        booking = mine.get(slot_id)
        roll = rng.random()
        command: p.AnyCommand
        if booking is not None and booking.status is BookingStatus.RESERVED:
            kind = p.Confirm if roll < 0.6 else p.ReleaseHold
            command = kind(request_id=request_id(), booking_id=booking.id, user_id=user)
        elif booking is not None:
            command = p.Cancel(request_id=request_id(), booking_id=booking.id, user_id=user)
        elif roll < 0.15:
            command = p.JoinQueue(request_id=request_id(), slot_id=slot_id, user_id=user)
        else:
            command = p.Reserve(request_id=request_id(), slot_id=slot_id, user_id=user)
        result = await drive.one(command)
        ledger.record(result)
        if isinstance(result, p.BookingResult):
            if result.booking.status.value in ACTIVE:
                mine[slot_id] = result.booking
            else:
                mine.pop(slot_id, None)
        await asyncio.sleep(LOAD_PAUSE_S)


async def _serve_and_back_up(
    database_url: str,
    namespace: str,
    back_up: Callable[[Driver], Awaitable[None]],
    *,
    before: Callable[[], Awaitable[None]] | None = None,
) -> Moment:
    """Serve the fixed slots and the load on ``database_url``, and ``back_up(drive)``
    under load; ``before()`` runs under load too, before the expiring hold is made."""
    owner = make_owner(database_url, namespace, owner="owner-a", domains=DOMAINS)
    await owner.start()
    try:
        drive = Driver(owner)
        now_ms = SystemClock().now_ms()

        fixed = slot_on(0, 1, "fixed")
        assert (await drive.one(create_slot(fixed, now_ms, capacity=2))).status == 201
        confirmed = await _reserve(drive, fixed, "ann")
        done = await drive.one(
            p.Confirm(request_id=request_id(), booking_id=confirmed.id, user_id="ann")
        )
        assert isinstance(done, p.BookingResult)
        held = await _reserve(drive, fixed, "bob")
        waiting = []
        for user in ("cat", "dan", "eve"):
            command = (p.Reserve if user != "eve" else p.JoinQueue)(
                request_id=request_id(), slot_id=fixed, user_id=user
            )
            queued = await drive.one(command)
            assert isinstance(queued, p.QueueResult) and queued.status in (201, 202), queued
            waiting.append((fixed, user, queued.entry.seq))

        slots = [slot_on(0, 1, f"load{n}") for n in range(LOAD_SLOTS)]
        for slot_id in slots:
            created = await drive.one(create_slot(slot_id, now_ms, capacity=LOAD_CAPACITY))
            assert created.status == 201
        ledger = Ledger()
        stop = asyncio.Event()
        users = [
            asyncio.create_task(_user(drive, f"user-{n}", slots, ledger, stop))
            for n in range(LOAD_USERS)
        ]
        try:
            async with asyncio.timeout(LOAD_DEADLINE_S):
                while ledger.acknowledged < ACKNOWLEDGED_BEFORE_BACKUP:
                    await asyncio.sleep(POLL_S)
            if before is not None:
                await before()
            # A hold that will lapse after the restore, and the user next in line for it.
            expiring_slot = slot_on(0, 1, "expiring")
            created = await drive.one(
                create_slot(expiring_slot, now_ms, capacity=1, domain="expiring")
            )
            assert created.status == 201
            expiring = await _reserve(drive, expiring_slot, "fay")
            behind = await drive.one(
                p.Reserve(request_id=request_id(), slot_id=expiring_slot, user_id="gus")
            )
            assert isinstance(behind, p.QueueResult) and behind.status == 202
            waiting.append((expiring_slot, "gus", behind.entry.seq))

            moment = Moment(
                ledger=ledger.copy(),
                confirmed=done.booking,
                held=held,
                waiting=waiting,
                expiring=expiring,
                next_in_line="gus",
            )
            await back_up(drive)
            acknowledged_during = ledger.acknowledged - moment.ledger.acknowledged
        finally:
            stop.set()
            await asyncio.gather(*users)
        assert acknowledged_during > 0, "the load went on while the backup ran"
        owner.check_invariants()
        return moment
    finally:
        await owner.close()


async def _reserve(drive: Driver, slot_id: str, user: str) -> Booking:
    held = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id=user))
    assert isinstance(held, p.BookingResult) and held.status == 201, held
    return held.booking


async def _check_restored_rows(db: asyncpg.Connection, moment: Moment) -> None:
    """Every change acknowledged before the backup began is in the restored rows."""
    bookings = {
        row["id"]: row for row in await db.fetch("SELECT id, status, version FROM bookings")
    }
    for booking, status in [
        (moment.confirmed, "CONFIRMED"),
        (moment.held, "RESERVED"),
        (moment.expiring, "RESERVED"),
    ]:
        assert bookings[booking.id]["status"] == status
    places = {
        (row["slot_id"], row["user_id"]): row
        for row in await db.fetch("SELECT slot_id, user_id, seq, status FROM queue_entries")
    }
    for slot_id, user, seq in moment.waiting:
        assert (places[slot_id, user]["seq"], places[slot_id, user]["status"]) == (seq, "WAITING")

    lost = []
    for booking_id, acked in moment.ledger.bookings.items():
        row = bookings.get(booking_id)
        if (
            row is None
            or row["version"] < acked.version
            or (row["version"] == acked.version and row["status"] != acked.status.value)
        ):
            lost.append((booking_id, acked.status.value, acked.version, row and dict(row)))
    for (slot_id, user), seq in moment.ledger.places.items():
        place = places.get((slot_id, user))
        if place is None or place["seq"] < seq:
            lost.append((slot_id, user, seq, place and dict(place)))
    assert lost == []


async def _check_engine_on_restored(database_url: str, moment: Moment) -> None:
    """A new owner on the restored database re-arms its timers and serves exactly its rows."""
    namespace = f"slotengine-test-{secrets.token_hex(4)}"
    ahead_ns = (EXPIRING_HOLD_MS - EXPIRY_LEAD_MS) * 1_000_000
    clock = SystemClock(wall_ns=lambda: time.time_ns() + ahead_ns)
    owner: ShardOwner | None = None
    db = await asyncpg.connect(database_url)
    try:
        await _check_restored_rows(db, moment)

        owner = make_owner(database_url, namespace, owner="owner-b", domains=DOMAINS, clock=clock)
        await owner.start()
        # Nobody calls the engine until the hold of the backup's moment has lapsed.
        async with asyncio.timeout(EXPIRY_DEADLINE_S):
            while (
                await db.fetchval("SELECT status FROM queue_entries WHERE user_id = $1", "gus")
                != "NOTIFIED"
            ):
                await asyncio.sleep(POLL_S)
        status = await db.fetchval("SELECT status FROM bookings WHERE id = $1", moment.expiring.id)
        assert status == "EXPIRED"
        expired_at_ms = await db.fetchval(
            "SELECT at_ms FROM audit_log WHERE entity_id = $1 AND to_status = 'EXPIRED'",
            moment.expiring.id,
        )
        assert expired_at_ms >= moment.expiring.expires_at_ms

        drive = Driver(owner)
        offer = await drive.one(
            p.QueuePosition(request_id=request_id(), slot_id=moment.expiring.slot_id, user_id="gus")
        )
        assert isinstance(offer, p.QueueResult) and offer.entry.status is QueueStatus.NOTIFIED
        assert offer.entry.booking_id is not None
        offered = await drive.one(
            p.GetBooking(request_id=request_id(), booking_id=offer.entry.booking_id, user_id="gus")
        )
        assert isinstance(offered, p.BookingResult)
        assert offered.booking.status is BookingStatus.RESERVED and offered.booking.via_queue

        # The fixed slot's queue, in join order.
        for position, (slot_id, user, _seq) in enumerate(moment.waiting[:3], start=1):
            place = await drive.one(
                p.QueuePosition(request_id=request_id(), slot_id=slot_id, user_id=user)
            )
            assert isinstance(place, p.QueueResult)
            assert (place.entry.status, place.entry.position) == (QueueStatus.WAITING, position)

        await _check_engine_serves_rows(db, drive)
        owner.check_invariants()
        counts = {}
        for slot_id in await db.fetch("SELECT id FROM slots"):
            view = await drive.one(p.GetSlot(request_id=request_id(), slot_id=slot_id["id"]))
            assert isinstance(view, p.SlotResult)
            counts[view.slot.id] = (view.slot.current_bookings, view.slot.held_count)
            assert view.slot.current_bookings + view.slot.held_count <= view.slot.capacity
        await assert_consistent(db, engine_counts=counts, now_ms=clock.now_ms())
        twice = await db.fetch(
            "SELECT slot_id, user_id FROM bookings WHERE status = ANY($1::text[])"
            " GROUP BY slot_id, user_id HAVING count(*) > 1",
            list(ACTIVE),
        )
        assert twice == []
    finally:
        if owner is not None:
            await owner.close()
        await db.close()
        await forget_namespace(namespace)


async def _check_engine_serves_rows(db: asyncpg.Connection, drive: Driver) -> None:
    """Every booking and queue entry of the database, answered by the engine as it is stored."""
    rows = await db.fetch("SELECT id, user_id, status, version FROM bookings ORDER BY id")
    assert rows
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        results = await drive.run(
            *(
                p.GetBooking(
                    request_id=request_id(),
                    booking_id=row["id"],
                    user_id=row["user_id"],
                    as_admin=True,
                )
                for row in chunk
            )
        )
        for row, result in zip(chunk, results, strict=True):
            assert isinstance(result, p.BookingResult), (dict(row), result)
            assert (result.booking.status.value, result.booking.version) == (
                row["status"],
                row["version"],
            )
    entries = await db.fetch(
        "SELECT slot_id, user_id, status, booking_id, rank() OVER (PARTITION BY slot_id,"
        " status = 'WAITING' ORDER BY seq) AS position FROM queue_entries"
        " WHERE status IN ('WAITING', 'NOTIFIED') ORDER BY slot_id, seq"
    )
    assert entries
    for start in range(0, len(entries), CHUNK):
        chunk = entries[start : start + CHUNK]
        results = await drive.run(
            *(
                p.QueuePosition(
                    request_id=request_id(), slot_id=row["slot_id"], user_id=row["user_id"]
                )
                for row in chunk
            )
        )
        for row, result in zip(chunk, results, strict=True):
            assert isinstance(result, p.QueueResult), (dict(row), result)
            entry = result.entry
            expected_position = row["position"] if row["status"] == "WAITING" else None
            assert (entry.status.value, entry.position, entry.booking_id) == (
                row["status"],
                expected_position,
                row["booking_id"],
            ), dict(row)


# -- the logical backup --------------------------------------------------------


def _server_on_copy(directory: Path, primary: PrivatePostgres) -> PrivatePostgres:
    """A server on a copied data directory, its files made the account's the primary
    runs as (the server runs as that account)."""
    owner = os.stat(primary.data_dir)
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
    return PrivatePostgres(directory)


async def _run(*arguments: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *arguments,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    async with asyncio.timeout(COMMAND_TIMEOUT_S):
        output, _ = await process.communicate()
    assert process.returncode == 0, f"{arguments[0]} failed:\n{output.decode(errors='replace')}"


@pytest.fixture
def backup_directory() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="slotengine-backup-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    """A database created empty (from ``template0``) on the tests' server, dropped afterwards."""
    name = f"slotengine_restored_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(with_database(DATABASE_URL, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        yield with_database(DATABASE_URL, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.mark.timeout(600)
async def test_a_logical_backup_under_load_restores_every_acknowledged_change(
    database_url: str, redis_namespace: str, empty_database: str, backup_directory: Path
) -> None:
    bindir = find_postgres_bindir()
    dump = backup_directory / "slotengine.dump"

    async def back_up(_drive: Driver) -> None:
        await _run(str(bindir / "pg_dump"), "--format=custom", f"--file={dump}", database_url)

    moment = await _serve_and_back_up(database_url, redis_namespace, back_up)
    await _run(str(bindir / "pg_restore"), "--no-owner", f"--dbname={empty_database}", str(dump))
    await _check_engine_on_restored(empty_database, moment)


# -- the physical backup -------------------------------------------------------


@pytest.fixture
def primary() -> Iterator[PrivatePostgres]:
    """A PostgreSQL of the test's own that serves replication connections (its
    ``pg_hba.conf`` as initdb writes it allows them from 127.0.0.1)."""
    with PrivatePostgres(settings={"wal_level": "replica", "max_wal_senders": "4"}) as server:
        yield server


@pytest.mark.timeout(600)
async def test_a_physical_backup_under_load_starts_as_a_server_with_every_acknowledged_change(
    primary: PrivatePostgres, redis_namespace: str, backup_directory: Path
) -> None:
    bindir = find_postgres_bindir()
    database_url = primary.url_for("slotengine")
    await create_database(database_url)
    await migrate_url(database_url)
    data = backup_directory / "data"

    async def back_up(_drive: Driver) -> None:
        await _run(
            str(bindir / "pg_basebackup"),
            f"--dbname={primary.url_for('postgres')}",
            f"--pgdata={data}",
            "--wal-method=stream",
            "--checkpoint=fast",
            "--no-sync",
        )

    moment = await _serve_and_back_up(database_url, redis_namespace, back_up)
    await _run(str(bindir / "pg_verifybackup"), str(data))
    restored = _server_on_copy(backup_directory, primary)
    try:
        await restored.astart()
        await _check_engine_on_restored(restored.url_for("slotengine"), moment)
    finally:
        with contextlib.suppress(Exception):
            restored.close()


# -- point-in-time recovery ----------------------------------------------------


@pytest.fixture
def archiving_primary() -> Iterator[PrivatePostgres]:
    """A PostgreSQL of the test's own that archives every completed WAL segment
    into ``archive/`` of its directory."""
    server = PrivatePostgres(settings={"wal_level": "replica", "archive_mode": "on"})
    try:
        archive = server.directory / "archive"
        archive.mkdir()
        owner = os.stat(server.directory)
        os.chown(archive, owner.st_uid, owner.st_gid)
        server.settings["archive_command"] = f"test ! -f {archive}/%f && cp %p {archive}/%f"
        server.start()
        yield server
    finally:
        server.close()


@pytest.mark.timeout(600)
async def test_a_point_in_time_recovery_restores_the_changes_acknowledged_before_its_target(
    archiving_primary: PrivatePostgres, redis_namespace: str, backup_directory: Path
) -> None:
    primary = archiving_primary
    bindir = find_postgres_bindir()
    archive = primary.directory / "archive"
    database_url = primary.url_for("slotengine")
    await create_database(database_url)
    await migrate_url(database_url)
    base = backup_directory / "base"
    target: datetime.datetime | None = None
    after_target = slot_on(0, 1, "after")

    async def base_backup() -> None:
        await _run(
            str(bindir / "pg_basebackup"),
            f"--dbname={primary.url_for('postgres')}",
            f"--pgdata={base}",
            "--wal-method=stream",
            "--checkpoint=fast",
            "--no-sync",
        )

    async def mark_target(drive: Driver) -> None:
        nonlocal target
        db = await asyncpg.connect(database_url)
        try:
            target = await db.fetchval("SELECT clock_timestamp()")
            # A change acknowledged after the target: the recovery stops before it.
            created = await drive.one(create_slot(after_target, SystemClock().now_ms()))
            assert created.status == 201
            # The segment holding the target and the change after it goes to the archive.
            segment = await db.fetchval("SELECT pg_walfile_name(pg_switch_wal())")
            async with asyncio.timeout(EXPIRY_DEADLINE_S):
                while (
                    await db.fetchval("SELECT last_archived_wal FROM pg_stat_archiver") or ""
                ) < segment:
                    await asyncio.sleep(POLL_S)
        finally:
            await db.close()

    moment = await _serve_and_back_up(
        database_url, redis_namespace, mark_target, before=base_backup
    )
    assert target is not None
    await _run(str(bindir / "pg_verifybackup"), str(base))

    data = backup_directory / "data"
    shutil.copytree(base, data, symlinks=True)
    with (data / "postgresql.auto.conf").open("a") as conf:
        conf.write(
            f"restore_command = 'cp {archive}/%f %p'\n"
            f"recovery_target_time = '{target.isoformat()}'\n"
            "recovery_target_action = 'promote'\n"
        )
    (data / "recovery.signal").touch()
    restored = _server_on_copy(backup_directory, primary)
    try:
        await restored.astart()
        url = restored.url_for("slotengine")
        # The server answers while it recovers (read-only); it writes once promoted.
        async with asyncio.timeout(EXPIRY_DEADLINE_S):
            while await _in_recovery(url):
                await asyncio.sleep(POLL_S)
        db = await asyncpg.connect(url)
        try:
            assert await db.fetchval("SELECT 1 FROM slots WHERE id = $1", after_target) is None
        finally:
            await db.close()
        await _check_engine_on_restored(url, moment)
    finally:
        with contextlib.suppress(Exception):
            restored.close()


async def _in_recovery(url: str) -> bool:
    db = await asyncpg.connect(url)
    try:
        return bool(await db.fetchval("SELECT pg_is_in_recovery()"))
    finally:
        await db.close()

"""Fuzzing the flush path: commands with any content, through a durable engine, into PostgreSQL.

A shard commits the changes of many users in one transaction, so one value the
database refuses would answer 503 to every command of the flush. Here commands
carry hostile values (U+0000, lone surrogates, astral characters, integers past
64 bits, huge floats, deep and large metadata, text too long for an index) beside
clean ones, all in the same batches and flushes, through a durable engine of each
kind: shards in this process, shards in an engine process reached over its Unix
socket, and Ray shard actors. Whatever they carry:

- every command is answered, below 500, and the clean ones beside them succeed;
- a command built from values the gateway accepts succeeds, and its rows are in
  PostgreSQL as sent (read back with SQL);
- a command PostgreSQL could not store is refused (422) and changed nothing (no
  audit row, no row, the entity as it was);
- after a restart the engine loads everything it acknowledged, as it was.

One engine per test (a durable engine takes seconds to start), driven from a sync
hypothesis test through one long-lived event loop.
"""

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import asyncpg
import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core import protocol as p
from engine.core.routing import make_slot_id, routing_key
from engine.core.storable import command_problems
from engine.shell.coalescer import EngineClient, RequestIds
from engine.shell.owner import StorageSettings
from gateway import schemas as s
from gateway.handling import decode_json, idempotency_key
from gateway.http import ApiError
from tests.conftest import REDIS_URL
from tests.engine.shell.conftest import SHARDS
from tests.support.domain import DAY_MS, HOUR_MS, POLICIES
from tests.support.fuzz import FUZZ, metadata, texts, to_bytes

T = TypeVar("T")

ROOT: Final = Path(__file__).resolve().parents[2]
# Starting durable shards (a Ray actor's process, an engine process) and loading them.
START_LIMIT_S: Final = 120.0
CALL_LIMIT_S: Final = 60.0
# Text no btree index can hold (a row of at most ~2.7 kB): hex digests, which
# PostgreSQL cannot compress either.
LONG_TEXT_CHARS: Final = 6_400

# The engine process of the "local" kind: durable in-process shards served on the socket
# named by argv[1], storage from argv[2], until SIGTERM (as ``serve --engine inproc`` runs it).
ENGINE_PROCESS: Final = """
import asyncio, signal, sys
import msgspec
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.local_engine import serve_engine
from engine.shell.owner import StorageSettings
from tests.engine.shell.conftest import SHARDS
from tests.support.domain import POLICIES

async def main():
    storage = msgspec.json.decode(sys.argv[2], type=StorageSettings)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    host = OwnedInProcessHost(shard_count=SHARDS, policies=POLICIES, storage=storage)
    await serve_engine(host, sys.argv[1], stop.wait)

asyncio.run(main())
"""


class DurableEngine:
    """One durable engine of one kind on this test's database, from a sync test.

    ``run`` drives a coroutine on the engine's event loop; ``restart`` stops the
    engine's shards and starts them again, so that they load from PostgreSQL.
    """

    def __init__(self, kind: str, storage: StorageSettings, socket_path: str) -> None:
        self.kind = kind
        self.storage = storage
        self.socket_path = socket_path
        self._runner = asyncio.Runner()
        self._transport: Any = None
        self._process: subprocess.Popen[bytes] | None = None
        self._prefix = f"fuzz-{uuid.uuid4().hex[:10]}"
        self.client: EngineClient | None = None
        self.db: asyncpg.Connection | None = None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coroutine)

    async def start(self) -> None:
        if self.kind == "inproc":
            from engine.shell.inproc import OwnedInProcessHost

            self._transport = OwnedInProcessHost(
                shard_count=SHARDS, policies=POLICIES, storage=self.storage
            )
            await asyncio.wait_for(self._transport.start(), START_LIMIT_S)
        elif self.kind == "local":
            from engine.shell.local_engine import LocalEngineTransport

            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    ENGINE_PROCESS,
                    self.socket_path,
                    msgspec.json.encode(self.storage).decode(),
                ],
                cwd=ROOT,
            )
            self._transport = await LocalEngineTransport.connect(
                self.socket_path, timeout_s=START_LIMIT_S
            )
            # Connected is not serving yet: the shards answer once they have loaded.
            for shard in range(SHARDS):
                await self._transport.check_invariants(shard, int(START_LIMIT_S * 1000))
        else:
            from engine.shell.ray_actor import RayShardTransport

            self._transport = await RayShardTransport.connect(
                shard_count=SHARDS,
                policies=POLICIES,
                name_prefix=self._prefix,
                storage=self.storage,
                timeout_ms=int(START_LIMIT_S * 1000),
            )
        self.client = EngineClient(self._transport)
        if self.db is None:
            self.db = await asyncpg.connect(self.storage.database_url)

    async def restart(self) -> None:
        """Every shard stops and starts again: what it serves next it loaded from PostgreSQL."""
        assert self.client is not None
        await self.client.wait_idle(CALL_LIMIT_S)
        if self.kind == "ray":
            import ray

            from engine.shell.ray_actor import ShardIdentity

            before = [
                await self._transport.identity(shard, int(CALL_LIMIT_S * 1000))
                for shard in range(SHARDS)
            ]
            for shard in range(SHARDS):
                # Killed, restarted by Ray under the same actor id: it takes the lease
                # over at once and loads the shard.
                ray.kill(self._transport.handle(shard), no_restart=False)

            async def restarted(shard: int) -> ShardIdentity:
                async with asyncio.timeout(START_LIMIT_S):
                    while True:
                        try:
                            now = await self._transport.identity(shard, 5_000)
                        except Exception:  # restarting: unavailable for a moment
                            now = None
                        if now is not None and now.pid != before[shard].pid:
                            return now
                        await asyncio.sleep(0.1)

            for shard in range(SHARDS):
                await restarted(shard)
            return
        await self._stop_shards()
        await self.start()

    async def _stop_shards(self) -> None:
        if self.kind == "inproc":
            await self._transport.close()
        elif self.kind == "local":
            await self._transport.close()
            assert self._process is not None
            self._process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self._process.wait, CALL_LIMIT_S)
            self._process = None

    async def close(self) -> None:
        try:
            if self.client is not None:
                await self.client.wait_idle(CALL_LIMIT_S)
            if self.kind == "ray":
                from engine.shell.ray_actor import kill_shard_actors

                kill_shard_actors(shard_count=SHARDS, name_prefix=self._prefix)
            elif self._transport is not None:
                await self._stop_shards()
        finally:
            if self._process is not None:
                self._process.kill()
                self._process.wait()
            if self.db is not None:
                await self.db.close()

    def shutdown(self) -> None:
        try:
            self.run(self.close())
        finally:
            self._runner.close()


@pytest.fixture(params=["inproc", "local", pytest.param("ray", marks=pytest.mark.ray)])
def engine(
    request: pytest.FixtureRequest, database_url: str, redis_namespace: str, tmp_path: Path
) -> Iterator[DurableEngine]:
    kind: str = request.param
    if kind == "ray":
        request.getfixturevalue("ray_cluster")
    storage = StorageSettings(
        database_url=database_url,
        redis_url=REDIS_URL,
        namespace=redis_namespace,
        maintenance_every_s=0,
    )
    # A short path: a Unix socket's path is limited to about 100 bytes.
    durable = DurableEngine(kind, storage, f"/tmp/fuzz-{uuid.uuid4().hex[:8]}.sock")
    try:
        durable.run(durable.start())
        yield durable
    finally:
        durable.shutdown()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(durable.socket_path)


# -- what the fuzz sends ------------------------------------------------------------------


def long_texts() -> st.SearchStrategy[str]:
    """Text far past what an index row holds, and incompressible."""
    return st.integers(0, 2**32).map(
        lambda seed: "".join(
            hashlib.sha256(f"{seed}-{n}".encode()).hexdigest() for n in range(LONG_TEXT_CHARS // 64)
        )
    )


def values(typical: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A string field: as a client means it, hostile, or too long for the database."""
    return st.one_of(typical, texts(max_size=16), long_texts())


def optional_values(typical: st.SearchStrategy[str]) -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), values(typical))


@dataclass
class Creation:
    resource_id: str
    domain: str
    metadata: dict[str, Any]
    actor: str


@dataclass
class Round:
    """One example: commands sent together, so that they share batches and flushes."""

    creations: list[Creation]
    update_metadata: dict[str, Any] | None
    update_actor: str
    reservations: list[tuple[str, str | None]]
    cancel_reason: str | None


ROUNDS: Final = st.builds(
    Round,
    creations=st.lists(
        st.builds(
            Creation,
            resource_id=values(st.sampled_from(["room-1", "Zoë's 🦷 chair"])),
            domain=values(st.sampled_from(["default", "short", "noqueue"])),
            metadata=metadata(),
            actor=values(st.just("admin:root")),
        ),
        min_size=1,
        max_size=2,
    ),
    update_metadata=st.one_of(st.none(), metadata()),
    update_actor=values(st.just("admin:root")),
    reservations=st.lists(
        st.tuples(values(st.sampled_from(["ann", "bob"])), optional_values(st.just("key-1"))),
        min_size=1,
        max_size=3,
    ),
    cancel_reason=optional_values(st.sampled_from(["ill", "\u2028 changed plans 🦷"])),
)


# -- what the gateway would accept ----------------------------------------------------------


def _decodes(schema: type[msgspec.Struct], body: dict[str, Any]) -> msgspec.Struct | None:
    raw = to_bytes(json.dumps(body, ensure_ascii=False, allow_nan=True))
    try:
        return decode_json(raw, "application/json", schema)
    except (ApiError, msgspec.ValidationError):
        return None


def gateway_accepts_slot(creation: Creation) -> bool:
    body = {
        "resourceId": creation.resource_id,
        "startTime": "2031-01-02T09:00:00Z",
        "endTime": "2031-01-02T10:00:00Z",
        "capacity": 1,
        "domain": creation.domain,
        "metadata": creation.metadata,
    }
    return (
        _decodes(s.CreateSlotBody, body) is not None
        and creation.domain in POLICIES
        and creation.actor == "admin:root"
    )


def gateway_accepts(schema: type[msgspec.Struct], **fields: Any) -> bool:
    return (
        _decodes(schema, {name: value for name, value in fields.items() if value is not None})
        is not None
    )


def gateway_accepts_key(key: str | None) -> bool:
    if key is None:
        return True
    try:
        idempotency_key(make_mocked_request("POST", "/", headers={"Idempotency-Key": key}))
    except ApiError:
        return False
    return True


# -- checking what PostgreSQL holds --------------------------------------------------------


def same_json(left: Any, right: Any) -> bool:
    """JSON equality; numbers by value (jsonb gives 1e18 back as 1000000000000000000)."""
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same_json(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(same_json, left, right))
    numbers = (int, float)
    if (
        isinstance(left, numbers)
        and isinstance(right, numbers)
        and not isinstance(left, bool)
        and not isinstance(right, bool)
    ):
        # The decimal jsonb keeps is the float's shortest form: the same float again.
        return left == right or float(left) == float(right)
    return type(left) is type(right) and left == right


def unencodable(command: p.AnyCommand) -> bool:
    """Whether the command cannot cross the engine's wire at all (msgpack refuses it)."""
    try:
        msgspec.msgpack.encode(command)
    except (UnicodeEncodeError, OverflowError):
        return True
    return False


@dataclass
class Expected:
    """What the engine acknowledged, to be found again after a restart."""

    slots: dict[str, tuple[str, str, dict[str, Any]]] = field(default_factory=dict)
    bookings: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)


class Fuzz:
    def __init__(self, engine: DurableEngine) -> None:
        self.engine = engine
        self.ids = RequestIds()
        self.rounds = itertools.count()
        self.base_ms = int(time.time() * 1000) + DAY_MS
        self.expected = Expected()
        self.keys: set[tuple[str, str | None]] = set()

    @property
    def client(self) -> EngineClient:
        assert self.engine.client is not None
        return self.engine.client

    @property
    def db(self) -> asyncpg.Connection:
        assert self.engine.db is not None
        return self.engine.db

    def window(self, round_number: int, index: int) -> tuple[int, int]:
        """A time of its own for every slot: no two ever overlap, whatever their resource."""
        start_ms = self.base_ms + (round_number * 8 + index) * HOUR_MS
        return start_ms, start_ms + HOUR_MS // 2

    async def execute(self, command: p.AnyCommand) -> p.AnyResult:
        async with asyncio.timeout(CALL_LIMIT_S):
            return await self.client.execute(command)

    async def setup(self, n: int) -> tuple[str, str, str]:
        """A clean slot with a confirmed booking: what the round's commands act on."""
        resource = f"base-{n}-{uuid.uuid4().hex[:6]}"
        slot_id = make_slot_id(resource, uuid.uuid4().hex)
        start_ms, end_ms = self.window(n, 0)
        created = await self.execute(
            p.CreateSlot(
                request_id=self.ids.next(),
                slot_id=slot_id,
                resource_id=resource,
                domain="default",
                start_ms=start_ms,
                end_ms=end_ms,
                # The owner's booking and one hold fill it: later reserves join its queue.
                capacity=2,
                actor="admin:root",
            )
        )
        assert created.status == 201, created
        owner = f"owner-{n}"
        held = await self.execute(
            p.Reserve(request_id=self.ids.next(), slot_id=slot_id, user_id=owner)
        )
        assert isinstance(held, p.BookingResult), held
        confirmed = await self.execute(
            p.Confirm(request_id=self.ids.next(), booking_id=held.booking.id, user_id=owner)
        )
        assert isinstance(confirmed, p.BookingResult) and confirmed.status == 200, confirmed
        self.expected.slots[slot_id] = (resource, "default", {})
        self.expected.bookings[held.booking.id] = (owner, "CONFIRMED", None)
        return slot_id, held.booking.id, owner

    async def play(self, round_: Round) -> None:
        n = next(self.rounds)
        slot_id, booking_id, owner = await self.setup(n)
        # (command, must it succeed: built from values the gateway accepts)
        sent: list[tuple[p.AnyCommand, bool]] = []
        for index, creation in enumerate(round_.creations, start=1):
            start_ms, end_ms = self.window(n, index)
            # The gateway's slot id: the resource's routing key, then a unique part.
            key = routing_key(creation.resource_id) if _utf8(creation.resource_id) else 0
            sent.append(
                (
                    p.CreateSlot(
                        request_id=self.ids.next(),
                        slot_id=f"{key:08x}-s{uuid.uuid4().hex}",
                        resource_id=creation.resource_id,
                        domain=creation.domain,
                        start_ms=start_ms,
                        end_ms=end_ms,
                        capacity=1,
                        metadata=creation.metadata,
                        actor=creation.actor,
                    ),
                    gateway_accepts_slot(creation),
                )
            )
        sent.append(
            (
                p.UpdateSlot(
                    request_id=self.ids.next(),
                    slot_id=slot_id,
                    metadata=round_.update_metadata,
                    actor=round_.update_actor,
                ),
                gateway_accepts(s.UpdateSlotBody, metadata=round_.update_metadata)
                and round_.update_actor == "admin:root",
            )
        )
        users = set()
        for user, key in round_.reservations:
            # A user's second hold on one slot answers the first; a key used in an
            # earlier round, for another slot, is IdempotencyKeyReused.
            fresh = user not in users and (user, key) not in self.keys
            users.add(user)
            if key is not None:
                self.keys.add((user, key))
            sent.append(
                (
                    p.Reserve(
                        request_id=self.ids.next(),
                        slot_id=slot_id,
                        user_id=user,
                        idempotency_key=key,
                    ),
                    fresh
                    and gateway_accepts(s.ReserveBody, slotId=slot_id, userId=user)
                    and gateway_accepts_key(key),
                )
            )
        sent.append(
            (
                p.Cancel(
                    request_id=self.ids.next(),
                    booking_id=booking_id,
                    user_id=owner,
                    reason=round_.cancel_reason,
                ),
                gateway_accepts(s.CancelBody, reason=round_.cancel_reason),
            )
        )
        # Clean commands beside the hostile ones, in the same batches: they must succeed.
        witness_start, witness_end = self.window(n, 7)
        witness_resource = f"witness-{n}-{uuid.uuid4().hex[:6]}"
        sent.append(
            (
                p.CreateSlot(
                    request_id=self.ids.next(),
                    slot_id=make_slot_id(witness_resource, uuid.uuid4().hex),
                    resource_id=witness_resource,
                    domain="default",
                    start_ms=witness_start,
                    end_ms=witness_end,
                    capacity=1,
                    actor="admin:root",
                ),
                True,
            )
        )
        sent.append(
            (p.Reserve(request_id=self.ids.next(), slot_id=slot_id, user_id=f"witness-{n}"), True)
        )

        outcomes = await asyncio.gather(
            *(self.execute(command) for command, _ in sent), return_exceptions=True
        )

        for (command, clean), outcome in zip(sent, outcomes, strict=True):
            assert not isinstance(outcome, BaseException), (type(command).__name__, outcome)
            assert outcome.status < 500, (command, outcome)
            if unencodable(command) or command_problems(command) is not None:
                assert outcome.status == 422, (command, outcome)
            if clean:
                assert 200 <= outcome.status < 300, (command, outcome)
            if 200 <= outcome.status < 300:
                await self.written(command, outcome)
            else:
                await self.unchanged(command, outcome, booking_id)

    async def written(self, command: p.AnyCommand, outcome: p.AnyResult) -> None:
        """The rows of an acknowledged change, as sent."""
        # A slot's changes are its admin's, a booking's its user's; a reserve answered
        # with what was there already (the user's hold or place, a key's replay) changed
        # nothing.
        actor = command.actor if isinstance(command, p.CreateSlot | p.UpdateSlot) else None
        actors = await self.db.fetch(
            "SELECT DISTINCT actor FROM audit_log WHERE request_id = $1", command.request_id
        )
        changed = not isinstance(command, p.Reserve) or (
            outcome.status == 202
            if isinstance(outcome, p.QueueResult)
            else isinstance(outcome, p.BookingResult)
            and outcome.booking.id not in self.expected.bookings
        )
        expected_actors = [actor or getattr(command, "user_id", "")] if changed else []
        assert [row["actor"] for row in actors] == expected_actors, command
        if isinstance(command, p.CreateSlot | p.UpdateSlot):
            row = await self.db.fetchrow(
                "SELECT resource_id, domain, metadata::text AS metadata FROM slots WHERE id = $1",
                command.slot_id,
            )
            assert row is not None, command
            resource, domain, kept = self.expected.slots.get(
                command.slot_id, (row["resource_id"], row["domain"], {})
            )
            if isinstance(command, p.CreateSlot):
                resource, domain, kept = command.resource_id, command.domain, command.metadata
            elif command.metadata is not None:
                kept = command.metadata
            assert (row["resource_id"], row["domain"]) == (resource, domain), command
            assert same_json(json.loads(row["metadata"]), kept), (row["metadata"], kept)
            self.expected.slots[command.slot_id] = (resource, domain, kept)
        elif isinstance(command, p.Reserve) and isinstance(outcome, p.QueueResult):
            status = await self.db.fetchval(
                "SELECT status FROM queue_entries WHERE slot_id = $1 AND user_id = $2",
                command.slot_id,
                command.user_id,
            )
            # (The cancel of the same round may have offered it the freed place already.)
            assert status in ("WAITING", "NOTIFIED"), (command, status)
        elif isinstance(command, p.Reserve | p.Cancel):
            assert isinstance(outcome, p.BookingResult), outcome
            row = await self.db.fetchrow(
                "SELECT user_id, status, cancel_reason FROM bookings WHERE id = $1",
                outcome.booking.id,
            )
            assert row is not None, command
            expected = (
                command.user_id,
                outcome.booking.status.value,
                command.reason if isinstance(command, p.Cancel) else None,
            )
            assert tuple(row) == expected, (tuple(row), expected)
            self.expected.bookings[outcome.booking.id] = expected
            if command.idempotency_key is not None:
                keys = await self.db.fetch(
                    "SELECT user_id, key FROM idempotency_records WHERE command = 'Reserve'"
                )
                assert (command.user_id, command.idempotency_key) in {tuple(k) for k in keys}

    async def unchanged(self, command: p.AnyCommand, outcome: p.AnyResult, booking_id: str) -> None:
        """A refused command changed nothing: no slot, the booking as it was, and no
        audit row but a refused reservation attempt's own (entity 'attempt')."""
        audit = await self.db.fetch(
            "SELECT entity, to_status, trigger, details->>'reason' AS reason"
            " FROM audit_log WHERE request_id = $1",
            command.request_id,
        )
        if (
            isinstance(command, p.Reserve | p.JoinQueue)
            and isinstance(outcome, p.Failure)
            # (What cannot be stored is refused before any decision, and not audited.)
            and not outcome.message.startswith("cannot be stored")
        ):
            assert [tuple(row) for row in audit] == [("attempt", None, "refused", outcome.code)], (
                command,
                outcome,
            )
        else:
            assert audit == [], (command, outcome)
        if isinstance(command, p.CreateSlot):
            assert not await self.db.fetchval(
                "SELECT count(*) FROM slots WHERE id = $1", command.slot_id
            ), command
        elif isinstance(command, p.UpdateSlot):
            row = await self.db.fetchval(
                "SELECT metadata::text FROM slots WHERE id = $1", command.slot_id
            )
            assert same_json(json.loads(row), self.expected.slots[command.slot_id][2]), row
        elif isinstance(command, p.Cancel):
            status = await self.db.fetchval("SELECT status FROM bookings WHERE id = $1", booking_id)
            assert status == "CONFIRMED", (command, outcome)

    async def reloaded(self) -> None:
        """After a restart, every acknowledged slot and booking as it was acknowledged."""
        await self.engine.restart()
        for slot_id, (resource, domain, kept) in self.expected.slots.items():
            found = await self.execute(p.GetSlot(request_id=self.ids.next(), slot_id=slot_id))
            assert isinstance(found, p.SlotResult), (slot_id, found)
            view = found.slot
            assert (view.resource_id, view.domain) == (resource, domain)
            assert same_json(view.metadata_dict(), kept), (view.metadata_dict(), kept)
        for booking_id, expected in self.expected.bookings.items():
            found = await self.execute(
                p.GetBooking(
                    request_id=self.ids.next(), booking_id=booking_id, user_id="root", as_admin=True
                )
            )
            assert isinstance(found, p.BookingResult), (booking_id, found)
            booking = found.booking
            user_id, status, reason = expected
            # A hold may have lapsed meanwhile on a slow machine: that is a change of its own.
            statuses = ("RESERVED", "EXPIRED") if status == "RESERVED" else (status,)
            assert booking.user_id == user_id and booking.status.value in statuses, booking
            assert booking.cancel_reason == reason, booking


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# A round is a few flushes and a dozen queries (a few milliseconds here, over Ray about
# ten times that): 150 keep every kind of engine well within a minute.
ROUNDS_PER_TEST: Final = 150


def test_no_command_fails_a_flush_and_every_acknowledged_one_is_stored_as_sent(
    engine: DurableEngine,
) -> None:
    fuzz = Fuzz(engine)

    # One engine for every example (an inner test: hypothesis runs it, this test owns it).
    @settings(FUZZ, max_examples=ROUNDS_PER_TEST)
    @given(round_=ROUNDS)
    def rounds(round_: Round) -> None:
        engine.run(fuzz.play(round_))

    rounds()
    engine.run(fuzz.reloaded())

"""Faults answer fast: the engine process killed, PostgreSQL or Redis frozen, a shard actor killed.

Each test puts a gateway in front of durable shards and takes something away
while requests are in flight, then checks that

- every request is answered within a few seconds, where it used to wait out
  the fault: 503 ``ServiceUnavailable`` with ``retryAfter`` and ``Retry-After``;
- a change that reached its shard and got no answer says that its outcome is
  unknown (``details.outcome == "unknown"``), and one that never reached it
  does not;
- a retry with the same ``Idempotency-Key`` returns what really happened (the
  booking, if it committed), and the key keeps standing for that request: the
  same key with another body is refused;
- service comes back by itself once the fault ends, and the database holds
  nothing contradictory.

The bounds on answer times are generous (several times what the code needs)
and only prove that nothing waits out the fault.
"""

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from engine.core.protocol import OUTCOME_DETAIL, OUTCOME_UNKNOWN
from engine.shell.coalescer import EngineClient
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.local_engine import LocalEngineTransport
from engine.shell.owner import StorageSettings
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.idempotency import KeyRegistry
from gateway.ratelimit import RateLimiter, RateLimits
from persistence.migrate import migrate_url
from persistence.services import PrivatePostgres, PrivateRedis, create_database
from tests.conftest import REDIS_URL
from tests.gateway.conftest import SECRET
from tests.support.domain import POLICIES
from tests.support.integrity import assert_consistent

pytest_plugins = ["tests.support.fixtures"]

Client = TestClient[Any, Any]

ROOT = Path(__file__).resolve().parents[2]
# What a request may take while the engine process is gone or Redis is frozen:
# far below the 9 to 11 s it used to wait, far above what the code needs (about
# a second).
ANSWER_LIMIT_S: Final = 3.0
# While PostgreSQL is frozen: a change waits for its flush to time out (2 s).
DATABASE_ANSWER_LIMIT_S: Final = 5.0
# A shard actor's death reaches its caller through Ray, which takes about 1.5 s to
# tell (measured) before the caller's own second of patience starts.
RAY_ANSWER_LIMIT_S: Final = 5.0
# How long the service may take to come back after the fault ends.
RECOVERY_LIMIT_S: Final = 60.0
POLL_EVERY_S: Final = 0.1
# Short leases, so that an engine process started after one was killed takes the
# shards over within a couple of seconds instead of waiting ten.
SHORT_LEASE: Final[dict[str, Any]] = {
    "lease_ttl_ms": 1_500,
    "lease_renew_every_ms": 300,
    "lease_margin_ms": 300,
    "rebuild_retry_ms": 200,
}


def bearer(sub: str, role: str = "user") -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, sub, role, 3600)}"}


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    retry_after: str | None
    # time.monotonic() when the request was sent, and when its answer was read.
    sent_at: float
    answered_at: float

    @property
    def outcome_unknown(self) -> bool:
        return bool(self.body.get("details", {}).get(OUTCOME_DETAIL) == OUTCOME_UNKNOWN)

    def assert_unavailable(
        self, limit_s: float, *, outcome_unknown: bool, since: float | None = None
    ) -> None:
        """503 with a retry hint, within ``limit_s`` of being sent (or of ``since``)."""
        assert self.status == 503, self
        assert self.body["error"] == "ServiceUnavailable", self
        assert self.body["retryAfter"] >= 1 and self.retry_after == str(self.body["retryAfter"])
        assert self.answered_at - (self.sent_at if since is None else since) < limit_s, self
        assert self.outcome_unknown is outcome_unknown, self


async def ask(
    api: Client,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any = None,
    limit_s: float = 30.0,
) -> Answer:
    """One request, timed; a request that hangs fails the test after ``limit_s``."""
    sent_at = time.monotonic()
    try:
        async with asyncio.timeout(limit_s):
            response = await api.request(method, path, json=body, headers=headers)
            text = await response.text()
    except TimeoutError:
        pytest.fail(f"{method} {path} had no answer within {limit_s:g} s")
    decoded = msgspec.json.decode(text) if text else {}
    retry_after = response.headers.get("Retry-After")
    return Answer(response.status, decoded, retry_after, sent_at, time.monotonic())


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        async with asyncio.timeout(RECOVERY_LIMIT_S):
            while not await check():
                await asyncio.sleep(POLL_EVERY_S)
    except TimeoutError:
        pytest.fail(f"not within {RECOVERY_LIMIT_S:g} s: {what}")


async def create_slot(api: Client, resource: str, capacity: int = 10) -> str:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    created = await ask(
        api,
        "POST",
        "/api/admin/slots",
        bearer("root", "admin"),
        {
            "resourceId": f"{resource}-{uuid.uuid4().hex[:8]}",
            "startTime": start.isoformat(),
            "endTime": (start + timedelta(hours=1)).isoformat(),
            "capacity": capacity,
        },
    )
    assert created.status == 201, created
    return str(created.body["id"])


async def reserve(
    api: Client, slot_id: str, user: str, key: str | None = None, limit_s: float = 30.0
) -> Answer:
    headers = bearer(user) if key is None else {**bearer(user), "Idempotency-Key": key}
    return await ask(
        api, "POST", "/api/bookings/reserve", headers, {"slotId": slot_id}, limit_s=limit_s
    )


async def serves(api: Client, slot_id: str) -> bool:
    return (await ask(api, "GET", f"/api/slots/{slot_id}", bearer("probe"))).status == 200


async def stored_bookings(db: asyncpg.Connection, slot_id: str, user: str) -> list[str]:
    rows = await db.fetch(
        "SELECT id FROM bookings WHERE slot_id = $1 AND user_id = $2", slot_id, user
    )
    return [row["id"] for row in rows]


@pytest.fixture
async def gateway_redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


def gateway(engine: EngineClient, keys: KeyRegistry, limiter: RateLimiter | None = None) -> Client:
    app = create_app(engine, Verifier(AuthSettings(secret=SECRET)), limiter, keys=keys)
    return TestClient(TestServer(app))


# -- the engine process killed ------------------------------------------------------------

# An engine process as `serve --engine inproc --workers N` runs it: durable shards
# served on the socket named by argv[1]. With argv[3], it dies (SIGKILL) right after
# committing a flush that holds a booking of a user whose id starts with argv[3]:
# its changes are durable, their answers never leave.
ENGINE_PROCESS = """
import asyncio, os, signal, sys
import msgspec
from engine.core.protocol import BookingChanged
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.local_engine import serve_engine
from engine.shell.owner import StorageSettings
import persistence.writer
from tests.support.domain import POLICIES

path, settings, doomed = sys.argv[1], sys.argv[2], sys.argv[3]
if doomed:
    write_flush = persistence.writer.write_flush

    async def commit_then_die(connection, rows, *args, **kwargs):
        await write_flush(connection, rows, *args, **kwargs)
        if any(
            type(event) is BookingChanged and event.booking.user_id.startswith(doomed)
            for event in rows.raw
        ):
            os.kill(os.getpid(), signal.SIGKILL)

    persistence.writer.write_flush = commit_then_die

storage = msgspec.json.decode(settings, type=StorageSettings)
host = OwnedInProcessHost(shard_count=2, policies=POLICIES, storage=storage)
asyncio.run(serve_engine(host, path, asyncio.Event().wait))
"""


def start_engine_process(path: str, storage: StorageSettings, doomed: str = "") -> Any:
    return subprocess.Popen(
        [sys.executable, "-c", ENGINE_PROCESS, path, msgspec.json.encode(storage).decode(), doomed],
        cwd=ROOT,
    )


async def test_engine_process_killed_in_flight_requests_answer_fast_and_retries_learn_the_truth(
    database_url: str,
    redis_namespace: str,
    db: asyncpg.Connection,
    gateway_redis: aioredis.Redis,
    tmp_path: Path,
) -> None:
    socket_path = str(tmp_path / "engine.sock")
    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace, **SHORT_LEASE
    )
    engines = [start_engine_process(socket_path, storage, doomed="doomed")]
    transport = await LocalEngineTransport.connect(socket_path, timeout_s=RECOVERY_LIMIT_S)
    try:
        keys = KeyRegistry(gateway_redis, redis_namespace)
        async with gateway(EngineClient(transport), keys) as api:
            slot_id = await create_slot(api, "ward")
            other_slot = await create_slot(api, "annex")
            # Committed, then the engine dies before a word of the answer leaves.
            doomed = ["doomed-ann", "doomed-bob", "doomed-cid"]
            in_flight = await asyncio.gather(
                *(reserve(api, slot_id, user, key=f"key-{user}") for user in doomed)
            )
            assert engines[0].wait(timeout=30) == -signal.SIGKILL
            committed = {user: await stored_bookings(db, slot_id, user) for user in doomed}
            assert any(committed.values()), "the engine died after a commit"
            for user, answer in zip(doomed, in_flight, strict=True):
                # Those that reached the engine (all that committed) are in doubt; those
                # still waiting in the gateway when it died were refused as never sent.
                reached = answer.outcome_unknown or bool(committed[user])
                answer.assert_unavailable(ANSWER_LIMIT_S, outcome_unknown=reached)

            # Nobody listens now: nothing is sent, and the answer says nothing is in doubt.
            late = await reserve(api, slot_id, "late-lou", key="key-late")
            late.assert_unavailable(ANSWER_LIMIT_S, outcome_unknown=False)
            read = await ask(api, "GET", f"/api/slots/{slot_id}", bearer("probe"))
            read.assert_unavailable(ANSWER_LIMIT_S, outcome_unknown=False)

            engines.append(start_engine_process(socket_path, storage))
            await eventually(lambda: serves(api, slot_id), "a new engine process serves")

            for user in doomed:
                again = await reserve(api, slot_id, user, key=f"key-{user}")
                assert again.status == 201, again
                booking_id = again.body["booking"]["id"]
                # The booking that committed, if one did; else the one made now. Never two.
                assert await stored_bookings(db, slot_id, user) == [booking_id]
                if committed[user]:
                    assert committed[user] == [booking_id]
                # The key stands for that request: another body with it is refused.
                reused = await reserve(api, other_slot, user, key=f"key-{user}")
                assert reused.status == 409, reused
                assert reused.body["error"] == "IdempotencyKeyReused"
            assert (await reserve(api, slot_id, "late-lou", key="key-late")).status == 201
            await assert_consistent(db)
    finally:
        await transport.close()
        for engine in engines:
            if engine.poll() is None:
                engine.kill()
            engine.wait()


# -- PostgreSQL frozen ---------------------------------------------------------------------


@pytest.fixture
async def frozen_database(private_postgres: PrivatePostgres) -> AsyncIterator[str]:
    url = private_postgres.url_for(f"faults_{secrets.token_hex(4)}")
    await create_database(url)
    await migrate_url(url)
    yield url
    private_postgres.resume()


async def test_changes_answer_fast_while_postgres_is_frozen_and_the_truth_survives_it(
    private_postgres: PrivatePostgres,
    frozen_database: str,
    redis_namespace: str,
    gateway_redis: aioredis.Redis,
) -> None:
    storage = StorageSettings(
        database_url=frozen_database, redis_url=REDIS_URL, namespace=redis_namespace
    )
    host = OwnedInProcessHost(shard_count=1, policies=POLICIES, storage=storage)
    await host.start()
    try:
        keys = KeyRegistry(gateway_redis, redis_namespace)
        async with gateway(EngineClient(host), keys) as api:
            slot_id = await create_slot(api, "clinic")
            other_slot = await create_slot(api, "lab")
            held = await reserve(api, slot_id, "carol")
            assert held.status == 201, held
            carol_booking = held.body["booking"]["id"]

            private_postgres.pause()
            try:
                # Applied in memory, then their flush cannot commit.
                paula, carol = await asyncio.gather(
                    reserve(api, slot_id, "paula", key="key-paula"),
                    ask(
                        api,
                        "POST",
                        f"/api/bookings/{carol_booking}/confirm",
                        {**bearer("carol"), "Idempotency-Key": "key-carol"},
                    ),
                )
                # The first to reach the shard was applied there and handed to the flush
                # that timed out: in doubt. The other, held back in the gateway behind
                # it, may have been sent only after: refused before it was applied.
                for answer in (paula, carol):
                    answer.assert_unavailable(
                        DATABASE_ANSWER_LIMIT_S, outcome_unknown=answer.outcome_unknown
                    )
                assert paula.outcome_unknown or carol.outcome_unknown
                # The shard is reloading now: refused before anything is applied.
                quinn = await reserve(api, slot_id, "quinn", key="key-quinn")
                quinn.assert_unavailable(DATABASE_ANSWER_LIMIT_S, outcome_unknown=False)
            finally:
                private_postgres.resume()

            await eventually(
                lambda: _reserved(reserve(api, slot_id, f"probe-{secrets.token_hex(3)}")),
                "reservations are taken again after PostgreSQL thawed",
            )
            # A 503 that did not say its outcome was unknown applied nothing.
            db = await asyncpg.connect(frozen_database)
            try:
                if not paula.outcome_unknown:
                    assert await stored_bookings(db, slot_id, "paula") == []
                if not carol.outcome_unknown:
                    status = "SELECT status FROM bookings WHERE id = $1"
                    assert await db.fetchval(status, carol_booking) == "RESERVED"
            finally:
                await db.close()
            again = await reserve(api, slot_id, "paula", key="key-paula")
            assert again.status == 201, again
            reused = await reserve(api, other_slot, "paula", key="key-paula")
            assert reused.status == 409, reused
            confirmed = await ask(
                api,
                "POST",
                f"/api/bookings/{carol_booking}/confirm",
                {**bearer("carol"), "Idempotency-Key": "key-carol"},
            )
            assert confirmed.status == 200 and confirmed.body["status"] == "CONFIRMED", confirmed
            assert (await reserve(api, slot_id, "quinn", key="key-quinn")).status == 201

        db = await asyncpg.connect(frozen_database)
        try:
            assert await stored_bookings(db, slot_id, "paula") == [again.body["booking"]["id"]]
            assert (
                await db.fetchval("SELECT status FROM bookings WHERE id = $1", carol_booking)
                == "CONFIRMED"
            )
            await assert_consistent(db)
        finally:
            await db.close()
    finally:
        await host.close()


async def _reserved(answer: Awaitable[Answer]) -> bool:
    return (await answer).status == 201


# -- Redis frozen --------------------------------------------------------------------------


async def test_requests_that_need_redis_answer_fast_while_it_is_frozen(
    private_redis: PrivateRedis, database_url: str, redis_namespace: str
) -> None:
    storage = StorageSettings(
        database_url=database_url, redis_url=private_redis.url, namespace=redis_namespace
    )
    host = OwnedInProcessHost(shard_count=1, policies=POLICIES, storage=storage)
    await host.start()
    # A client with redis-py's defaults (no timeouts, retries): the bounds are the
    # gateway's own, whatever the client it is given.
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        limiter = RateLimiter(client, RateLimits(), namespace=redis_namespace)
        keys = KeyRegistry(client, redis_namespace)
        async with gateway(EngineClient(host), keys, limiter) as api:
            slot_id = await create_slot(api, "court")
            held = await reserve(api, slot_id, "carol")
            assert held.status == 201, held
            carol_booking = held.body["booking"]["id"]

            private_redis.pause()
            try:
                # Rate-limited (fail closed) and keyed: both need Redis first.
                refused = [
                    await reserve(api, slot_id, "rita", limit_s=10),
                    await ask(
                        api,
                        "POST",
                        f"/api/bookings/{carol_booking}/confirm",
                        {**bearer("carol"), "Idempotency-Key": "key-carol"},
                        limit_s=10,
                    ),
                    await ask(
                        api,
                        "POST",
                        f"/api/slots/{slot_id}/queue",
                        bearer("quentin"),
                        limit_s=10,
                    ),
                ]
                for answer in refused:
                    answer.assert_unavailable(ANSWER_LIMIT_S, outcome_unknown=False)
                # What needs no Redis is answered as usual.
                read = await ask(api, "GET", f"/api/slots/{slot_id}", bearer("rita"), limit_s=10)
                assert read.status == 200, read
            finally:
                private_redis.resume()

            await eventually(
                lambda: _reserved(reserve(api, slot_id, f"probe-{secrets.token_hex(3)}")),
                "reservations are taken again after Redis thawed",
            )
            confirmed = await ask(
                api,
                "POST",
                f"/api/bookings/{carol_booking}/confirm",
                {**bearer("carol"), "Idempotency-Key": "key-carol"},
            )
            assert confirmed.status == 200, confirmed
    finally:
        await client.aclose()
        await host.close()


# -- a shard actor killed --------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize("restart", ["slow", "quick"])
async def test_a_shard_actor_killed_mid_batch_answers_fast_and_a_retry_learns_the_truth(
    restart: str,
    ray_cluster: str,
    private_redis: PrivateRedis,
    database_url: str,
    redis_namespace: str,
    db: asyncpg.Connection,
    gateway_redis: aioredis.Redis,
) -> None:
    """Ray restarts the actor; "slow": its Redis (a private one, holding the lease) is
    frozen meanwhile, so the new incarnation cannot take the shard over at once."""
    from engine.shell.ray_actor import RayShardTransport, kill_shard_actors

    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    storage = StorageSettings(
        database_url=database_url, redis_url=private_redis.url, namespace=redis_namespace
    )
    transport = await RayShardTransport.connect(
        shard_count=1, policies=POLICIES, name_prefix=prefix, storage=storage, timeout_ms=60_000
    )
    try:
        engine = EngineClient(transport)
        keys = KeyRegistry(gateway_redis, redis_namespace)
        async with gateway(engine, keys) as api:
            slot_id = await create_slot(api, "gym")
            other_slot = await create_slot(api, "pool")
            identity = await transport.identity(0, timeout_ms=60_000)

            # Stopped, the actor cannot answer, so the batch is surely in flight when it dies.
            os.kill(identity.pid, signal.SIGSTOP)
            try:
                pending = asyncio.ensure_future(reserve(api, slot_id, "kim", key="key-kim"))
                async with asyncio.timeout(30):
                    while engine.statistics().batches_in_flight != (1,):
                        await asyncio.sleep(0.01)
                # Ray pushes the call to the actor's socket right after submitting it.
                await asyncio.sleep(0.3)
                if restart == "slow":
                    private_redis.pause()
            finally:
                os.kill(identity.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            try:
                answer = await pending
            finally:
                private_redis.resume()
            if restart == "slow":
                answer.assert_unavailable(RAY_ANSWER_LIMIT_S, outcome_unknown=True, since=killed_at)
            else:
                # Resent to the restarted actor within the patience: the real answer,
                # or 503 in doubt if the restart took longer.
                assert answer.answered_at - killed_at < RAY_ANSWER_LIMIT_S, answer
                if answer.status != 201:
                    answer.assert_unavailable(
                        RAY_ANSWER_LIMIT_S, outcome_unknown=True, since=killed_at
                    )

            await eventually(lambda: serves(api, slot_id), "the restarted actor serves")
            again = await reserve(api, slot_id, "kim", key="key-kim")
            assert again.status == 201, again
            booking_id = again.body["booking"]["id"]
            assert await stored_bookings(db, slot_id, "kim") == [booking_id]
            if answer.status == 201:
                assert answer.body["booking"]["id"] == booking_id
            reused = await reserve(api, other_slot, "kim", key="key-kim")
            assert reused.status == 409, reused
            await assert_consistent(db)
    finally:
        kill_shard_actors(shard_count=1, name_prefix=prefix)

"""Redis through Sentinel: the URL's form, and the engine across a failover.

Each failover test runs a group of real servers of its own on free ports of
127.0.0.1, in a temporary directory (``persistence.services.sentinel``): a
master, one replica and three sentinels (quorum 2, a master judged down after
a second). The master is killed with SIGKILL; the sentinels promote the
replica. Then:

- a client from ``config.redis_client`` carries on against the new master,
  with what was replicated before the failover;
- a shard owner under load, holding its lease through the sentinel URL,
  serves changes again (it reloads if its lease lapsed), renews its lease on
  the new master, a rate-limit check is metered there, and every change it
  acknowledged is in PostgreSQL (fencing in PostgreSQL guards ownership);
- the gateway's event bus, subscribed before the failover, receives an event
  published after it.

The servers are always killed at the end, whatever happened. Waits poll with
generous limits; nothing asserts on durations.
"""

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Final

import asyncpg
import pytest
import redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.sentinel import SentinelConnectionPool

from config.redis_client import redis_client, redis_sync_client
from config.redis_keys import RedisKeys, slot_topic
from config.settings import (
    SENTINEL_PORT_DEFAULT,
    ConfigError,
    SentinelTarget,
    load_settings,
    parse_sentinel_url,
)
from engine.core import protocol as p
from engine.shell.events import EventPublisher
from engine.shell.owner import OwnerState, StorageSettings
from gateway.live.bus import EventBus
from gateway.ratelimit import UNLIMITED, RateLimiter, RateLimiterUnavailable, RateLimits
from gateway.server import gateway_redis
from persistence.services.sentinel import SentinelGroup
from tests.gateway.test_bus import Recorder
from tests.persistence.helpers import policies
from tests.persistence.test_degradation import (
    LEASE,
    check_database,
    make_owner,
    probe_reserve,
    set_scene,
    wait_for_progress,
)

# Generous limits for conditions that take seconds on a quiet machine.
FAILOVER_WAIT_S: Final = 60.0
POLL_S: Final = 0.1
# Each client call's own bound in the tests.
CALL_TIMEOUT_S: Final = 2.0
START_ATTEMPTS: Final = 3


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = FAILOVER_WAIT_S
) -> None:
    """Poll ``check`` (an exception counts as "not yet") until it holds."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    if await check():
                        return
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        pytest.fail(f"not within {timeout_s:g} s: {what}")


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    # A free port may be taken before a server binds it: then start again on others.
    for attempt in range(START_ATTEMPTS):
        group = SentinelGroup(tmp_path / f"attempt-{attempt}")
        try:
            group.start()
        except RuntimeError:
            group.close()
            if attempt + 1 == START_ATTEMPTS:
                raise
            continue
        try:
            yield group
        finally:
            group.close()
        return


# -- the URL ----------------------------------------------------------------------------


def test_a_sentinel_url_names_the_sentinels_the_service_the_database_and_the_password() -> None:
    assert parse_sentinel_url("redis+sentinel://a:26380,b,[::1]:26381/main/3") == SentinelTarget(
        sentinels=(("a", 26380), ("b", SENTINEL_PORT_DEFAULT), ("::1", 26381)),
        service="main",
        db=3,
        password=None,
    )
    target = parse_sentinel_url("redis+sentinel://:p%40ss@h:1/main")
    assert (target.password, target.db) == ("p@ss", 0)
    assert "p@ss" not in repr(target)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h:1", "expected the service name after the sentinels"),
        ("redis+sentinel://h:1/", "expected the service name after the sentinels"),
        ("redis+sentinel:///main", "expected at least one sentinel host"),
        ("redis+sentinel://h:1,,h:2/main", "expected at least one sentinel host"),
        ("redis+sentinel://h:x/main", "expected a port between 1 and 65535 for 'h'"),
        ("redis+sentinel://h:70000/main", "expected a port between 1 and 65535 for 'h'"),
        ("redis+sentinel://h:1/main/x", "expected an integer between 0 and 1000"),
        ("redis+sentinel://h:1/main/0/1", "expected at most a database after the service"),
        ("redis+sentinel://user:pw@h:1/main", "expected a password only"),
        ("redis+sentinel://h:1/main?db=1", "expected no query or fragment"),
    ],
)
def test_a_bad_sentinel_url_stops_the_start_with_one_line(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"REDIS_URL": url})
    assert str(raised.value).startswith("REDIS_URL: ")
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_password_in_a_bad_sentinel_url_is_not_shown() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"REDIS_URL": "redis+sentinel://:secret@h:1"})
    assert "secret" not in str(raised.value)


def test_the_sentinel_variables_stand_for_a_sentinel_url() -> None:
    settings = load_settings(
        {
            "SLOTENGINE_REDIS_SENTINELS": "10.0.0.1:26379, 10.0.0.2",
            "SLOTENGINE_REDIS_SENTINEL_SERVICE": "main",
        }
    )
    assert settings.redis_url == "redis+sentinel://10.0.0.1:26379,10.0.0.2/main"
    assert parse_sentinel_url(settings.redis_url).sentinels == (
        ("10.0.0.1", 26379),
        ("10.0.0.2", SENTINEL_PORT_DEFAULT),
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"SLOTENGINE_REDIS_SENTINELS": "h:1"},
            "SLOTENGINE_REDIS_SENTINEL_SERVICE: expected the name of the master",
        ),
        (
            {"SLOTENGINE_REDIS_SENTINEL_SERVICE": "main"},
            "SLOTENGINE_REDIS_SENTINEL_SERVICE: set only with SLOTENGINE_REDIS_SENTINELS",
        ),
        (
            {
                "SLOTENGINE_REDIS_SENTINELS": "h:1",
                "SLOTENGINE_REDIS_SENTINEL_SERVICE": "main",
                "REDIS_URL": "redis://h:6379/0",
            },
            "SLOTENGINE_REDIS_SENTINELS: set either it or REDIS_URL, not both",
        ),
        (
            {"SLOTENGINE_REDIS_SENTINELS": "h:port", "SLOTENGINE_REDIS_SENTINEL_SERVICE": "m"},
            "SLOTENGINE_REDIS_SENTINELS: expected a port between 1 and 65535 for 'h'",
        ),
    ],
)
def test_the_sentinel_variables_are_checked(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ)
    assert str(raised.value).startswith(message)


async def test_the_factory_gives_each_caller_its_options_whatever_the_url() -> None:
    options = {"socket_timeout": 1.5, "socket_connect_timeout": 0.5, "decode_responses": True}
    for url in ("redis://127.0.0.1:1/2", "redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/main/2"):
        client = redis_client(url, **options)
        kwargs = client.connection_pool.connection_kwargs
        assert {key: kwargs[key] for key in options} == options, url
        assert kwargs["db"] == 2, url
        await client.aclose()
    bounded = redis_client(
        "redis+sentinel://127.0.0.1:1/main", max_connections=3, pool_timeout=0.25
    )
    pool = bounded.connection_pool
    assert isinstance(pool, BlockingConnectionPool) and isinstance(pool, SentinelConnectionPool)
    assert (pool.max_connections, pool.timeout) == (3, 0.25)
    await bounded.aclose()
    with pytest.raises(ValueError, match="expected the service name"):
        redis_client("redis+sentinel://127.0.0.1:1")


# -- a failover ---------------------------------------------------------------------------


async def test_a_client_follows_a_failover_to_the_promoted_replica(
    sentinels: SentinelGroup,
) -> None:
    client = redis_client(
        sentinels.url, socket_timeout=CALL_TIMEOUT_S, socket_connect_timeout=CALL_TIMEOUT_S
    )
    try:
        await client.set("before", "kept")
        # Acknowledged by the replica: it survives the master.
        assert await client.execute_command("WAIT", 1, 10_000) == 1
        assert (await client.info("server"))["tcp_port"] == sentinels.master_port
        # A connection kept out of the pool (as the rate limiter keeps one).
        kept = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]

        sentinels.kill_master()
        await sentinels.promoted()

        async def kept_reconnects() -> bool:
            await kept.send_command("INFO", "server")
            info = (await kept.read_response()).decode()
            return f"tcp_port:{sentinels.replica_port}" in info

        await eventually(kept_reconnects, "a kept connection reconnects to the new master")
        await client.connection_pool.release(kept)

        async def writes() -> bool:
            return bool(await client.set("after", "written"))

        await eventually(writes, "the client writes again after the failover")
        assert (await client.info("server"))["tcp_port"] == sentinels.replica_port
        assert (await client.info("replication"))["role"] == "master"
        assert await client.get("before") == b"kept"
        assert await client.get("after") == b"written"
    finally:
        await client.aclose()
    # The command line's blocking client finds the new master too.
    with redis_sync_client(sentinels.url, socket_timeout=CALL_TIMEOUT_S) as sync_client:
        assert sync_client.info("server")["tcp_port"] == sentinels.replica_port


async def test_an_owner_under_load_carries_on_across_a_failover_and_loses_nothing(
    sentinels: SentinelGroup, database_url: str, db: asyncpg.Connection
) -> None:
    namespace = f"sentinel-{secrets.token_hex(4)}"
    keys = RedisKeys(namespace)
    storage = StorageSettings(
        database_url=database_url, redis_url=sentinels.url, namespace=namespace, **LEASE
    )
    owner = make_owner(storage, policies())
    client = redis_client(
        sentinels.url, socket_timeout=CALL_TIMEOUT_S, socket_connect_timeout=CALL_TIMEOUT_S
    )
    # The gateway's own pool, as the rate limiter uses it.
    gateway_client = gateway_redis(sentinels.url, timeout_s=CALL_TIMEOUT_S)
    limiter = RateLimiter(
        gateway_client,
        RateLimits(reserve=3, period_s=60),
        namespace=namespace,
    )
    await owner.start()
    scene = None
    try:
        scene = await set_scene(owner)
        load = scene.load
        load.start()
        await wait_for_progress(load, "the load makes progress before the failover")
        assert (await limiter.check("reserve", "before")).remaining == 2

        sentinels.kill_master()
        await sentinels.promoted()

        async def serves() -> bool:
            return (await probe_reserve(scene)).status == 201

        await eventually(serves, "reservations are taken again after the failover")
        await wait_for_progress(load, "the load makes progress again after the failover")
        load.check_alive()
        await load.stop()

        # The lease is on the new master, the owner's, and renewed there: its
        # remaining time goes up again.
        async def held_on_new_master() -> bool:
            port = (await client.info("server"))["tcp_port"]
            return (
                port == sentinels.replica_port
                and await client.get(keys.shard_owner(0)) == owner.owner.encode()
            )

        await eventually(held_on_new_master, "the lease is held on the new master")
        remaining = [await client.pttl(keys.shard_owner(0))]

        async def renewed() -> bool:
            remaining.append(await client.pttl(keys.shard_owner(0)))
            return remaining[-1] > remaining[-2] > 0

        await eventually(renewed, "the lease is renewed on the new master")
        statistics = owner.statistics()
        assert statistics.state == OwnerState.SERVING.value and statistics.stop_reason is None
        assert await db.fetchval("SELECT token FROM shard_fences WHERE shard = 0") == (
            statistics.token
        )

        # A rate limit is metered on the new master. A check on a connection to
        # the lost master may fail first (the reservation's limit fails closed: 503).
        async def metered() -> bool:
            try:
                decision = await limiter.check("reserve", f"probe-{secrets.token_hex(4)}")
            except RateLimiterUnavailable:
                return False
            return decision.remaining != UNLIMITED

        await eventually(metered, "rate-limit checks reach the new master")
        decisions = [await limiter.check("reserve", "after") for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]

        # Every change the engine acknowledged, before, during and after the
        # failover, is in PostgreSQL.
        await check_database(load.ledger, db)
        owner.check_invariants()
    finally:
        if scene is not None:
            await scene.load.cancel()
        await owner.close()
        await gateway_client.aclose()
        await client.aclose()


async def test_a_subscriber_from_before_a_failover_receives_events_published_after_it(
    sentinels: SentinelGroup,
) -> None:
    namespace = f"sentinel-{secrets.token_hex(4)}"
    channel = RedisKeys(namespace).shard_events(0)
    bus_client = redis_client(sentinels.url, socket_connect_timeout=CALL_TIMEOUT_S)
    bus = EventBus(bus_client, namespace)
    await bus.start()
    watch = Recorder()
    publisher_client = redis_client(
        sentinels.url, socket_timeout=CALL_TIMEOUT_S, socket_connect_timeout=CALL_TIMEOUT_S
    )
    publisher = EventPublisher(publisher_client, namespace, shard=0)
    try:
        await bus.subscribe(channel, slot_topic("s1"), watch)

        sentinels.kill_master()
        await sentinels.promoted()
        await eventually(lambda: _true(watch.resyncs >= 1), "the bus resubscribes")

        # Published on the new master until the bus hears it.
        async def heard() -> bool:
            publisher.watched()
            publisher.committed([_moved("s1", 1)])
            await asyncio.sleep(POLL_S)
            return bool(watch.events)

        await eventually(heard, "an event published after the failover reaches the watch")
        assert bus.statistics().connected and bus.statistics().reconnects >= 1
        port = (await publisher_client.info("server"))["tcp_port"]
        assert port == sentinels.replica_port
    finally:
        await publisher.close()
        await publisher_client.aclose()
        await bus.close()
        await bus_client.aclose()


async def _true(value: bool) -> bool:
    return value


def _moved(slot_id: str, departures: int) -> p.QueueMoved:
    return p.QueueMoved(
        at_ms=1, request_id="r", actor="system", slot_id=slot_id, removed_seq=departures,
        total_in_queue=10 - departures, epoch="e", departures=departures,
    )  # fmt: skip

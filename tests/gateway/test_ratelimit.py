"""Rate limits against the real Redis: GCRA budgets, sharing, expiry and outages."""

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from config.settings import ConfigError
from gateway.ratelimit import (
    ENDPOINTS,
    ENV_VARIABLES,
    UNLIMITED,
    Decision,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimits,
    rate_limits_from_env,
)
from persistence.services import PrivateRedis
from tests.conftest import REDIS_URL

pytest_plugins = ["tests.support.fixtures"]

# Generous: only a failure waits this long.
ADMIT_TIMEOUT_S = 5.0


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    connection = aioredis.Redis.from_url(REDIS_URL)
    yield connection
    await connection.aclose()


@pytest.fixture
async def dead_client() -> AsyncIterator[aioredis.Redis]:
    """A client of a port nobody listens on, failing at once (no retries)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    connection = aioredis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    yield connection
    await connection.aclose()


async def checks(limiter: RateLimiter, endpoint: str, user: str, count: int) -> list[Decision]:
    return [await limiter.check(endpoint, user) for _ in range(count)]


async def test_a_burst_of_the_limit_passes_and_the_next_request_waits(
    client: aioredis.Redis, redis_namespace: str
) -> None:
    limiter = RateLimiter(client, RateLimits(), namespace=redis_namespace)
    burst = await checks(limiter, "reserve", "alice", 10)
    assert all(d.allowed for d in burst)
    assert [d.remaining for d in burst] == list(range(9, -1, -1))
    assert all(d.retry_after_s == 0 for d in burst)

    refused = await limiter.check("reserve", "alice")
    assert not refused.allowed
    assert refused.remaining == 0
    # One emission interval (6 s for 10/min), whole seconds rounded up.
    assert 1 <= refused.retry_after_s <= 60
    assert refused.retry_after_s == 6

    # A refusal does not lengthen the wait.
    again = await limiter.check("reserve", "alice")
    assert not again.allowed
    assert again.retry_after_s <= refused.retry_after_s


async def test_every_endpoint_has_its_own_default_budget(
    client: aioredis.Redis, redis_namespace: str
) -> None:
    limiter = RateLimiter(client, RateLimits(), namespace=redis_namespace)
    for endpoint, limit in (("reserve", 10), ("queue_join", 20), ("position", 100), ("cancel", 5)):
        decisions = await checks(limiter, endpoint, "alice", limit + 1)
        assert [d.allowed for d in decisions] == [True] * limit + [False], endpoint
        assert 1 <= decisions[-1].retry_after_s <= 60


async def test_users_and_endpoints_are_independent(
    client: aioredis.Redis, redis_namespace: str
) -> None:
    limiter = RateLimiter(client, RateLimits(reserve=2, cancel=2), namespace=redis_namespace)
    await checks(limiter, "reserve", "alice", 2)
    assert not (await limiter.check("reserve", "alice")).allowed

    bob = await limiter.check("reserve", "bob")
    assert bob.allowed
    assert bob.remaining == 1
    assert (await limiter.check("cancel", "alice")).allowed
    assert (await limiter.check("queue_join", "alice")).allowed
    # A user id that looks like another key's suffix is still its own user.
    assert (await limiter.check("reserve", "alice:x")).allowed


async def test_two_gateways_share_one_budget(redis_namespace: str) -> None:
    first_client = aioredis.Redis.from_url(REDIS_URL)
    second_client = aioredis.Redis.from_url(REDIS_URL)
    try:
        first = RateLimiter(first_client, RateLimits(), namespace=redis_namespace)
        second = RateLimiter(second_client, RateLimits(), namespace=redis_namespace)
        decisions = [
            await (first if i % 2 else second).check("reserve", "alice") for i in range(10)
        ]
        assert all(d.allowed for d in decisions)
        assert not (await first.check("reserve", "alice")).allowed
        assert not (await second.check("reserve", "alice")).allowed

        # Concurrent requests through both never overspend the budget.
        racing = await asyncio.gather(
            *((first if i % 2 else second).check("cancel", "bob") for i in range(30))
        )
        assert sum(d.allowed for d in racing) == 5
    finally:
        await first_client.aclose()
        await second_client.aclose()


async def test_a_refused_user_is_admitted_again_after_the_emission_interval(
    client: aioredis.Redis, redis_namespace: str
) -> None:
    limiter = RateLimiter(client, RateLimits(reserve=2, period_s=1), namespace=redis_namespace)
    assert all(d.allowed for d in await checks(limiter, "reserve", "alice", 2))
    refused = await limiter.check("reserve", "alice")
    assert not refused.allowed
    assert refused.retry_after_s == 1

    async def admitted() -> Decision:
        while not (decision := await limiter.check("reserve", "alice")).allowed:
            assert decision.retry_after_s == 1
            await asyncio.sleep(0.05)
        return decision

    decision = await asyncio.wait_for(admitted(), ADMIT_TIMEOUT_S)
    # One interval freed one request, not a whole new burst.
    assert decision.remaining == 0
    assert not (await limiter.check("reserve", "alice")).allowed


async def test_keys_expire_and_hold_redis_time(
    client: aioredis.Redis, redis_namespace: str
) -> None:
    limiter = RateLimiter(client, RateLimits(), namespace=redis_namespace)
    await limiter.check("position", "alice")
    key = limiter.key("position", "alice")
    assert key == f"{redis_namespace}:rl:position:alice"
    # One interval of 100/min: 600 ms.
    assert 0 < await client.pttl(key) <= 600
    seconds, micros = await client.time()
    now_us = seconds * 1_000_000 + micros
    stored = await client.get(key)
    assert stored is not None
    tat_us = int(stored)
    assert 0 < tat_us - now_us <= 600_000

    await checks(limiter, "reserve", "alice", 10)
    assert 0 < await client.pttl(limiter.key("reserve", "alice")) <= 60_000


async def test_unlimited_endpoints_never_touch_redis(
    client: aioredis.Redis, dead_client: aioredis.Redis, redis_namespace: str
) -> None:
    unlimited = RateLimits(reserve=0, queue_join=0, position=0, cancel=0)
    # A Redis that is down would fail reserve closed: no exception means no call.
    offline = RateLimiter(dead_client, unlimited, namespace=redis_namespace)
    for endpoint in ENDPOINTS:
        for _ in range(50):
            decision = await offline.check(endpoint, "alice")
            assert decision == Decision(allowed=True, retry_after_s=0, remaining=UNLIMITED)

    online = RateLimiter(client, unlimited, namespace=redis_namespace)
    for endpoint in ENDPOINTS:
        assert (await online.check(endpoint, "alice")).allowed
    assert [key async for key in client.scan_iter(f"{redis_namespace}:*")] == []


async def test_redis_down_fails_reads_open_and_changes_closed(
    dead_client: aioredis.Redis, redis_namespace: str
) -> None:
    limiter = RateLimiter(dead_client, RateLimits(), namespace=redis_namespace)
    for _ in range(3):
        decision = await limiter.check("position", "alice")
        assert decision.allowed
        assert decision.remaining == UNLIMITED
    for endpoint in ("reserve", "queue_join", "cancel"):
        with pytest.raises(RateLimiterUnavailable):
            await limiter.check(endpoint, "alice")


async def test_an_unknown_endpoint_is_a_programming_error(
    client: aioredis.Redis, redis_namespace: str
) -> None:
    limiter = RateLimiter(client, RateLimits(), namespace=redis_namespace)
    with pytest.raises(ValueError, match="confirm"):
        await limiter.check("confirm", "alice")


def test_limits_refuse_impossible_values() -> None:
    with pytest.raises(ValueError, match="reserve"):
        RateLimits(reserve=-1)
    with pytest.raises(ValueError, match="period_s"):
        RateLimits(period_s=0)


def test_env_defaults_follow_the_api_contract() -> None:
    assert rate_limits_from_env({}) == RateLimits(
        reserve=10, queue_join=20, position=100, cancel=5, period_s=60
    )
    blank = dict.fromkeys(ENV_VARIABLES.values(), "  ")
    assert rate_limits_from_env(blank) == RateLimits()


def test_env_overrides_every_limit_and_zero_is_unlimited() -> None:
    limits = rate_limits_from_env(
        {
            "SLOTENGINE_RATE_LIMIT_RESERVE_PER_MIN": "3",
            "SLOTENGINE_RATE_LIMIT_QUEUE_JOIN_PER_MIN": " 4 ",
            "SLOTENGINE_RATE_LIMIT_POSITION_PER_MIN": "0",
            "SLOTENGINE_RATE_LIMIT_CANCEL_PER_MIN": "1000",
            "UNRELATED": "x",
        }
    )
    assert limits == RateLimits(reserve=3, queue_join=4, position=0, cancel=1000, period_s=60)


@pytest.mark.parametrize("name", sorted(ENV_VARIABLES.values()))
@pytest.mark.parametrize("raw", ["ten", "-1", "1.5", "0x10", "99999999999"])
def test_env_errors_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rate_limits_from_env({name: raw})
    message = str(caught.value)
    assert message.startswith(f"{name}: ")
    assert repr(raw) in message
    assert "\n" not in message


async def test_concurrent_checks_go_in_one_call_and_are_decided_in_order(
    client: aioredis.Redis, redis_namespace: str
) -> None:
    limiter = RateLimiter(client, RateLimits(), namespace=redis_namespace)
    # A burst: one user 15 times, and 600 other users once each, all in one turn.
    decisions = await asyncio.gather(
        *(limiter.check("reserve", "burst") for _ in range(15)),
        *(limiter.check("reserve", f"user-{n}") for n in range(600)),
    )
    own, others = decisions[:15], decisions[15:]
    assert [d.allowed for d in own] == [True] * 10 + [False] * 5
    assert [d.remaining for d in own[:10]] == list(range(9, -1, -1))
    assert all(d.allowed and d.remaining == 9 for d in others)
    assert limiter.calls == 2  # 615 checks, at most 500 a call


async def test_checks_arriving_while_a_call_is_in_flight_wait_and_leave_together(
    private_redis: PrivateRedis, redis_namespace: str
) -> None:
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=ADMIT_TIMEOUT_S)
    try:
        limiter = RateLimiter(client, RateLimits(), namespace=redis_namespace)
        assert (await limiter.check("reserve", "warm-up")).allowed  # connected, script loaded
        private_redis.pause()
        try:
            first = asyncio.ensure_future(limiter.check("reserve", "first"))
            later = []
            # Ten checks, each in a turn of its own, while the first call waits for Redis.
            for n in range(10):
                await asyncio.sleep(0)
                later.append(asyncio.ensure_future(limiter.check("reserve", f"later-{n}")))
            await asyncio.sleep(0.05)
            assert not first.done()
        finally:
            private_redis.resume()
        decisions = await asyncio.gather(first, *later)
        assert all(d.allowed and d.remaining == 9 for d in decisions)
        assert limiter.calls == 3  # the warm-up, the first, and the ten together
    finally:
        await client.aclose()


async def test_a_restarted_redis_is_reconnected_and_given_the_script_again(
    private_redis: PrivateRedis, redis_namespace: str
) -> None:
    client = aioredis.Redis.from_url(
        private_redis.url, socket_timeout=ADMIT_TIMEOUT_S, retry=Retry(NoBackoff(), 0)
    )
    try:
        limiter = RateLimiter(client, RateLimits(), namespace=redis_namespace)
        assert [d.remaining for d in await checks(limiter, "cancel", "alice", 2)] == [4, 3]

        await private_redis.astop()
        assert (await limiter.check("position", "alice")).remaining == UNLIMITED  # open
        with pytest.raises(RateLimiterUnavailable):
            await limiter.check("cancel", "alice")  # closed

        # A new, empty Redis: no budget spent, and no script loaded.
        await private_redis.astart()
        assert [d.remaining for d in await checks(limiter, "cancel", "alice", 5)] == [4, 3, 2, 1, 0]
        assert not (await limiter.check("cancel", "alice")).allowed
    finally:
        await client.aclose()


async def test_a_flushed_script_cache_is_loaded_again(
    client: aioredis.Redis, redis_namespace: str
) -> None:
    limiter = RateLimiter(client, RateLimits(), namespace=redis_namespace)
    assert (await limiter.check("reserve", "alice")).remaining == 9
    await client.script_flush()
    assert (await limiter.check("reserve", "alice")).remaining == 8

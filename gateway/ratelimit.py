"""Per-user, per-endpoint rate limits, shared by every gateway through Redis.

docs/api.md, "Rate limits": reserve 10/min, queue join 20/min, position 100/min,
cancel 5/min, over a rolling window; every authenticated request to the
endpoint counts; a refusal is 429 ``RateLimited`` with ``Retry-After`` =
seconds until the next request would be allowed.

Algorithm: GCRA (the generic cell rate algorithm), with a burst equal to the
limit. For ``limit`` requests per ``period`` the emission interval is
``T = period / limit``; each user and endpoint has one key holding its
theoretical arrival time ``TAT``. A request at ``now`` would move it to
``max(TAT, now) + T``, and is admitted when that is at most ``now + limit * T``
(= ``now + period``). So ``limit`` requests at once pass, the next one waits
``T``, and the sustained rate is ``limit`` per ``period`` over any rolling
window. A refused request leaves ``TAT`` alone: it does not lengthen its own
wait, so ``Retry-After`` is exact for a client that honours it.

One script call (``EVALSHA``) decides a batch of checks: the script reads
the clock, decides and writes each new ``TAT`` in one atomic step, so
concurrent requests on several gateways cannot both take the last unit of
budget. The clock is Redis's (``TIME``), never the gateway's, so gateways
with skewed clocks agree. Keys are ``{namespace}:rl:{endpoint}:{user}``
(``config/redis_keys.py``) and expire when
``TAT`` is reached (``SET ... PX``): an idle user's key is then worth nothing
and vanishes. Times are integer microseconds, written with ``%d`` because Lua
would print a large number in ``%.14g``. Needs Redis 5 or later (a script that
reads ``TIME`` and then writes is replicated by its effects).

A limit of 0 means unlimited: the check then answers without Redis.

When Redis is unreachable (connection refused, reset, timed out):

* ``position`` fails open: the request is admitted. It is a read of the
  caller's own queue entry, served from shard memory; it changes nothing and
  costs the engine little, so an unmetered minute does no harm, while refusing
  it would blind every waiting client during a Redis outage for no gain.
* ``reserve``, ``queue_join`` and ``cancel`` fail closed: ``check`` raises
  ``RateLimiterUnavailable``, which the gateway answers with 503
  ``ServiceUnavailable`` and a ``Retry-After``. These change state and are the
  endpoints the limits protect; letting them through unmetered would hand an
  abusive client exactly the outage window to flood them. And with Redis down
  the engine cannot renew shard leases, so (DESIGN.md, "Ownership and
  fencing") new reservations are refused with 503 anyway: the limiter answers
  the same thing, earlier, without loading the shards.

One call is in flight at a time, on a connection of its own: the checks
that arrive meanwhile wait for it and leave together in the next call. Under
load the calls grow instead of multiplying, and each call skips the client's
per-command layers (pool checkout, retries, instrumentation), which cost
several times the round trip's own CPU.

Each call is bounded by ``REDIS_CALL_TIMEOUT_MS`` whatever the client's own
options, so a frozen Redis answers as an unreachable one does. Build the
client with short ``socket_connect_timeout`` / ``socket_timeout`` and few or
no retries all the same (redis-py retries a failed connection three times with
backoff by default): a call that gives up early leaves room for the next one.
"""

import asyncio
import contextlib
import hashlib
import math
import os
from collections.abc import Mapping
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection

from config.redis_keys import NAMESPACE_DEFAULT, RedisKeys
from config.settings import ConfigError
from engine.shell import limits as shell_limits
from persistence import timings as t

ENDPOINTS: Final[tuple[str, ...]] = ("reserve", "queue_join", "position", "cancel")
# Endpoints admitted without a check while Redis is unreachable (see above).
FAIL_OPEN_ENDPOINTS: Final[frozenset[str]] = frozenset({"position"})

# Environment variables, by endpoint; their values are requests per minute.
ENV_VARIABLES: Final[Mapping[str, str]] = {
    "reserve": "SLOTENGINE_RATE_LIMIT_RESERVE_PER_MIN",
    "queue_join": "SLOTENGINE_RATE_LIMIT_QUEUE_JOIN_PER_MIN",
    "position": "SLOTENGINE_RATE_LIMIT_POSITION_PER_MIN",
    "cancel": "SLOTENGINE_RATE_LIMIT_CANCEL_PER_MIN",
}
ENV_PERIOD_S: Final = 60
LIMIT_MAX: Final = 1_000_000
# ``Decision.remaining`` of a request not metered (no limit, or failed open).
UNLIMITED: Final = -1

_MICROS: Final = 1_000_000

# KEYS[1]: the user's key. ARGV[1]: emission interval, ARGV[2]: burst window
# (limit * interval), both in microseconds.
# Returns {allowed (0/1), microseconds until admitted, remaining}. Numbers given
# to redis.call are formatted with %d; the replies are integers already.
# One call decides a batch: KEYS[i] with ARGV[2i-1] (interval) and ARGV[2i]
# (window); the answer is three numbers per key, in order. The same key twice
# in a batch is decided twice, in order, as two calls would.
_GCRA: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local out = {}
for i, key in ipairs(KEYS) do
    local interval = tonumber(ARGV[2 * i - 1])
    local window = tonumber(ARGV[2 * i])
    local tat = tonumber(redis.call('GET', key) or '0') or 0
    if tat < now then
        tat = now
    end
    local next_tat = tat + interval
    local admitted_at = next_tat - window
    if admitted_at > now then
        out[#out + 1] = 0
        out[#out + 1] = admitted_at - now
        out[#out + 1] = 0
    else
        local ttl_ms = math.ceil((next_tat - now) / 1000)
        redis.call('SET', key, string.format('%d', next_tat), 'PX', string.format('%d', ttl_ms))
        out[#out + 1] = 1
        out[#out + 1] = 0
        out[#out + 1] = math.floor((now + window - next_tat) / interval)
    end
end
return out
"""
# Checks decided by one script call, at most; more wait for the next call.
CHECKS_PER_CALL_MAX: Final = 500


class RateLimiterUnavailable(Exception):
    """Redis could not be reached to check a limit that fails closed; answer 503."""


class RateLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Requests allowed per ``period_s``, by endpoint; 0 means unlimited."""

    reserve: int = 10
    queue_join: int = 20
    position: int = 100
    cancel: int = 5
    period_s: int = 60

    def __post_init__(self) -> None:
        if not 0 < self.period_s <= 86_400:
            raise ValueError(f"period_s must be between 1 and 86400, got {self.period_s}")
        for endpoint in ENDPOINTS:
            value = getattr(self, endpoint)
            if not 0 <= value <= LIMIT_MAX:
                raise ValueError(f"{endpoint} must be between 0 and {LIMIT_MAX}, got {value}")

    def limit(self, endpoint: str) -> int:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"no rate limit for endpoint {endpoint!r}")
        value: int = getattr(self, endpoint)
        return value


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to one request.

    ``retry_after_s``: whole seconds (rounded up, at least 1) until a request
    would be admitted, when refused; 0 when allowed. ``remaining``: how many
    more requests would be admitted right now; ``UNLIMITED`` when the request
    was not metered (the endpoint has no limit, or it failed open).
    """

    allowed: bool
    retry_after_s: int
    remaining: int


_UNMETERED: Final = Decision(allowed=True, retry_after_s=0, remaining=UNLIMITED)


def rate_limits_from_env(environ: Mapping[str, str] | None = None) -> RateLimits:
    """The per-minute limits from ``environ`` (default: ``os.environ``).

    An unset or blank variable keeps the default; 0 means unlimited. Raises
    ``ConfigError`` naming the variable on a value that is not an integer
    between 0 and ``LIMIT_MAX``.
    """
    if environ is None:
        environ = os.environ
    defaults = RateLimits()
    values: dict[str, int] = {}
    for endpoint, name in ENV_VARIABLES.items():
        raw = environ.get(name, "").strip()
        if not raw:
            values[endpoint] = defaults.limit(endpoint)
            continue
        try:
            value = int(raw, 10)
        except ValueError:
            value = -1
        if not 0 <= value <= LIMIT_MAX:
            raise ConfigError(
                f"{name}: expected an integer between 0 (unlimited) and {LIMIT_MAX}, got {raw!r}"
            )
        values[endpoint] = value
    return RateLimits(period_s=ENV_PERIOD_S, **values)


class RateLimiter:
    """Checks requests against ``limits``: one script call at a time decides every
    check that waits, on a connection of its own from ``client``'s pool."""

    def __init__(
        self,
        client: "aioredis.Redis",
        limits: RateLimits,
        namespace: str = NAMESPACE_DEFAULT,
        timings: t.Timings | None = None,
    ) -> None:
        """``timings``: where each script call's duration is observed (one per batch
        of checks: ``rate_limit_check``)."""
        self.limits = limits
        self._timing = (timings if timings is not None else t.Timings()).redis(t.REDIS_RATE_LIMIT)
        self._keys = RedisKeys(namespace)
        self._pool = client.connection_pool
        self._sha = hashlib.sha1(_GCRA.encode()).hexdigest()
        self._connection: AbstractConnection | None = None
        # Checks waiting for the next script call; whether one is in flight.
        self._pending: list[tuple[str, str, asyncio.Future[Decision]]] = []
        self._flush_scheduled = False
        self._call: asyncio.Task[None] | None = None
        self._calls = 0
        # Per endpoint: (emission interval, burst window) in microseconds. The
        # interval is rounded up, so the sustained rate never exceeds the limit.
        self._shape: dict[str, tuple[int, int]] = {}
        for endpoint in ENDPOINTS:
            limit = limits.limit(endpoint)
            if limit:
                interval = -(-limits.period_s * _MICROS // limit)
                self._shape[endpoint] = (interval, interval * limit)

    @property
    def calls(self) -> int:
        """Script calls made so far (each decides up to ``CHECKS_PER_CALL_MAX`` checks)."""
        return self._calls

    def key(self, endpoint: str, user_id: str) -> str:
        return self._keys.rate_limit(endpoint, user_id)

    async def check(self, endpoint: str, user_id: str) -> Decision:
        """Count one request of ``user_id`` to ``endpoint`` and say whether it may pass.

        The checks asked for while a call is in flight, or in one turn of the
        event loop, go to Redis together, in one script call: a burst of a
        thousand reserves is a few round trips, not a thousand.

        Raises ``ValueError`` for an unknown endpoint, and
        ``RateLimiterUnavailable`` when Redis cannot be reached for an endpoint
        that fails closed.
        """
        if not self.limits.limit(endpoint):
            return _UNMETERED
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        self._pending.append((endpoint, self.key(endpoint, user_id), future))
        if self._call is None and not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._call is not None or not self._pending:
            return
        batch = self._pending[:CHECKS_PER_CALL_MAX]
        del self._pending[:CHECKS_PER_CALL_MAX]
        self._call = asyncio.get_running_loop().create_task(self._decide(batch))

    async def _decide(self, batch: list[tuple[str, str, "asyncio.Future[Decision]"]]) -> None:
        try:
            await self._decide_batch(batch)
        finally:
            self._call = None
            if self._pending and not self._flush_scheduled:
                # On the next iteration, so the callers this call just woke can join.
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _decide_batch(self, batch: list[tuple[str, str, "asyncio.Future[Decision]"]]) -> None:
        args: list[int] = []
        for endpoint, _, _ in batch:
            args.extend(self._shape[endpoint])
        try:
            with self._timing.time():
                async with asyncio.timeout(shell_limits.REDIS_CALL_TIMEOUT_MS / 1000):
                    reply = await self._evaluate([key for _, key, _ in batch], args)
        except (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            TimeoutError,
        ) as error:
            for endpoint, _, future in batch:
                if future.done():
                    continue
                if endpoint in FAIL_OPEN_ENDPOINTS:
                    future.set_result(_UNMETERED)
                else:
                    future.set_exception(
                        RateLimiterUnavailable(f"rate limits unavailable: {error!r}")
                    )
            return
        except BaseException as error:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            raise
        for index, (_, _, future) in enumerate(batch):
            allowed, wait_us, remaining = reply[3 * index : 3 * index + 3]
            if future.done():
                continue
            if int(allowed):
                future.set_result(Decision(allowed=True, retry_after_s=0, remaining=int(remaining)))
            else:
                future.set_result(
                    Decision(
                        allowed=False,
                        retry_after_s=max(1, math.ceil(int(wait_us) / _MICROS)),
                        remaining=0,
                    )
                )

    async def _evaluate(self, keys: list[str], args: list[int]) -> Any:
        """One ``EVALSHA`` of the script (loaded first if Redis does not know it)."""
        self._calls += 1
        connection = self._connection
        if connection is None:
            # Taken from the pool for good: the client's close disconnects it.
            connection = self._connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        evalsha: tuple[str | int, ...] = ("EVALSHA", self._sha, len(keys), *keys, *args)
        try:
            try:
                return await self._run(connection, *evalsha)
            except redis.exceptions.NoScriptError:
                # A restarted (or flushed) Redis: load the script, then call it again.
                await self._run(connection, "SCRIPT", "LOAD", _GCRA)
                return await self._run(connection, *evalsha)
        except (redis.exceptions.ResponseError, redis.exceptions.ConnectionError):
            raise
        except BaseException:
            # Cancelled or failed between a command and its reply: the connection
            # would hand the next call this call's answer.
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            raise

    @staticmethod
    async def _run(connection: AbstractConnection, *command: str | int) -> Any:
        await connection.send_command(*command)
        return await connection.read_response()

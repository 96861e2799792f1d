"""A shard owner's lease in Redis, and the fencing token that comes with it.

``acquire`` sets ``{ns}:shard:{n}:owner`` to this owner's id with ``SET NX PX``
and, in the same script, takes the next value of ``{ns}:shard:{n}:token``
(both named in ``config/redis_keys.py``): a counter that
only grows, raised past a floor when the caller knows of a newer token (Redis
lost its data, the database kept the fence). ``renew`` extends the lease only
while this owner still holds it. Both are Lua scripts, so each is one atomic
step in Redis.

``holds(now_ms)`` answers from the local clock: the lease counts as held until
its last confirmed renewal plus the TTL minus a drift margin, measured from
when the renewal was *sent*. An owner that cannot reach Redis therefore stops
taking changes before another owner can possibly get the lease.

``advance`` gives the holder a new token, renewing the lease in the same
script: an owner that reloads its shard (after a failed flush) writes with a
token its previous state never had, so a flush of that state still running in
PostgreSQL is fenced off instead of landing after the reload.

Every call is bounded by ``REDIS_CALL_TIMEOUT_MS`` whatever the client's own
options (``TimeoutError``): a frozen Redis never holds an owner up.
"""

import asyncio
import time
from collections.abc import Awaitable
from enum import Enum
from typing import Final, TypeVar

import redis.asyncio as aioredis

from config.redis_keys import NAMESPACE_DEFAULT, RedisKeys
from engine.shell import limits
from persistence import limits as storage_limits
from persistence import timings as t

_ACQUIRE: Final = """
local holder = redis.call('GET', KEYS[1])
local takeover = ARGV[4] ~= '' and holder and string.sub(holder, 1, #ARGV[4]) == ARGV[4]
if takeover then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if takeover or redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    local token = redis.call('INCR', KEYS[2])
    local floor = tonumber(ARGV[3])
    if token <= floor then
        token = floor + 1
        redis.call('SET', KEYS[2], token)
    end
    return token
end
return false
"""

_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_ADVANCE: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return false
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local token = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3])
if token <= floor then
    token = floor + 1
    redis.call('SET', KEYS[2], token)
end
return token
"""

_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class Renewal(Enum):
    RENEWED = "renewed"
    # The key is gone (it lapsed, or Redis lost it): nobody holds the lease.
    LAPSED = "lapsed"
    # Another owner holds it.
    TAKEN = "taken"


_T = TypeVar("_T")


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


async def _bounded(call: Awaitable[_T]) -> _T:
    async with asyncio.timeout(limits.REDIS_CALL_TIMEOUT_MS / 1000):
        return await call


class ShardLease:
    def __init__(
        self,
        client: "aioredis.Redis",
        *,
        shard: int,
        owner: str,
        namespace: str = NAMESPACE_DEFAULT,
        ttl_ms: int = storage_limits.LEASE_TTL_MS,
        margin_ms: int = limits.LEASE_DRIFT_MARGIN_MS,
        timings: t.Timings | None = None,
    ) -> None:
        """``timings``: where each call's duration is observed (by operation)."""
        if not 0 < margin_ms < ttl_ms:
            raise ValueError("the drift margin must be shorter than the lease")
        self._client = client
        self.shard = shard
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.margin_ms = margin_ms
        keys = RedisKeys(namespace)
        self._owner_key = keys.shard_owner(shard)
        self._token_key = keys.shard_token(shard)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._advance = client.register_script(_ADVANCE)
        self._release = client.register_script(_RELEASE)
        timings = timings if timings is not None else t.Timings()
        self._acquire_timing = timings.redis(t.REDIS_LEASE_ACQUIRE)
        self._renew_timing = timings.redis(t.REDIS_LEASE_RENEW)
        self._advance_timing = timings.redis(t.REDIS_LEASE_ADVANCE)
        self._release_timing = timings.redis(t.REDIS_LEASE_RELEASE)
        self._holder_timing = timings.redis(t.REDIS_LEASE_HOLDER)
        self.token: int | None = None
        # Monotonic ms until which this owner may take changes.
        self._valid_until_ms = 0

    def holds(self, now_ms: int | None = None) -> bool:
        if self.token is None:
            return False
        return (now_ms if now_ms is not None else _monotonic_ms()) < self._valid_until_ms

    @property
    def valid_for_ms(self) -> int:
        return max(0, self._valid_until_ms - _monotonic_ms())

    async def acquire(self, floor: int = 0, succeeds: str = "") -> int | None:
        """Take the lease if nobody holds it; returns the new fencing token, or None.

        ``succeeds``: a prefix of owner ids this owner replaces even while their
        lease runs, because it knows they are gone (a restarted actor and its
        previous incarnation). The new token fences their late writes off all
        the same, should they be alive after all.
        """
        sent_ms = _monotonic_ms()
        with self._acquire_timing.time():
            token = await _bounded(
                self._acquire(
                    keys=[self._owner_key, self._token_key],
                    args=[self.owner, self.ttl_ms, floor, succeeds],
                )
            )
        if token is None:
            return None
        self.token = int(token)
        self._valid_until_ms = sent_ms + self.ttl_ms - self.margin_ms
        return self.token

    async def renew(self) -> Renewal:
        """Extend the lease. Should it be taken anew (``acquire``) or forgotten while
        the renewal runs, the answer changes nothing here: it was of the old lease."""
        token, sent_ms = self.token, _monotonic_ms()
        with self._renew_timing.time():
            renewed = await _bounded(
                self._renew(keys=[self._owner_key], args=[self.owner, self.ttl_ms])
            )
        current = self.token == token
        if renewed:
            if current:
                self._valid_until_ms = sent_ms + self.ttl_ms - self.margin_ms
            return Renewal.RENEWED
        if current:
            self._valid_until_ms = 0
        holder = await self.holder()
        return Renewal.LAPSED if holder is None else Renewal.TAKEN

    async def holder(self) -> bytes | str | None:
        """Who holds the lease now, by Redis (None: nobody)."""
        with self._holder_timing.time():
            holder: bytes | str | None = await _bounded(self._client.get(self._owner_key))
        return holder

    async def advance(self) -> int | None:
        """A new fencing token for the lease this owner holds, which is renewed with
        it; None (and the lease forgotten) if this owner does not hold it any more."""
        sent_ms = _monotonic_ms()
        with self._advance_timing.time():
            token = await _bounded(
                self._advance(
                    keys=[self._owner_key, self._token_key],
                    args=[self.owner, self.ttl_ms, self.token or 0],
                )
            )
        if token is None:
            self.forget()
            return None
        self.token = int(token)
        self._valid_until_ms = sent_ms + self.ttl_ms - self.margin_ms
        return self.token

    async def release(self) -> None:
        self._valid_until_ms = 0
        with self._release_timing.time():
            await _bounded(self._release(keys=[self._owner_key], args=[self.owner]))

    def forget(self) -> None:
        """Stop counting on the lease (after losing it), without asking Redis."""
        self._valid_until_ms = 0
        self.token = None

"""Client ``Idempotency-Key``s across shards: one fingerprint per (user, endpoint, key).

The shard that runs a command keeps its key's first outcome and replays it
(``engine/core/remembered.py``, durable with the shard's state). But one user's
requests with one key may name slots or bookings on different shards, and a
shard only knows its own keys. So before a keyed command goes to its shard,
the gateway records the request's fingerprint under
``{namespace}:idem:{endpoint}:{len(user)}:{user}:{key}`` in Redis
(``config/redis_keys.py``; one script: set if
absent, else compare, atomically, shared by every gateway), and answers
``IdempotencyKeyReused`` when the key already stands for another request.

Requests without a key never touch Redis. A record lives as long as the
shard keeps the outcome (24 h). An answer the contract says is not stored
(5xx) releases the record it created, so a retry may carry another body;
unless the request may have been applied all the same (a 503 whose outcome
is unknown): then the key keeps standing for it, and the retry with the same
key learns its outcome from the shard. Redis down or frozen: a keyed request
cannot be checked across shards, and is refused with 503 like the other
state changes that need Redis, within ``REDIS_CALL_TIMEOUT_MS`` whatever the
client's own timeouts.
"""

import asyncio
import contextlib
import enum
import hashlib
import time
from typing import Final

import redis.asyncio as aioredis
import redis.exceptions

from config.redis_keys import NAMESPACE_DEFAULT, RedisKeys
from engine.core import limits
from engine.core.fingerprint import fingerprint as shard_fingerprint
from engine.core.protocol import AnyCommand
from engine.shell import limits as shell_limits
from persistence import timings as t

RECORD_TTL_S: Final = limits.IDEMPOTENCY_RETENTION_MS // 1000
_CALL_TIMEOUT_S: Final = shell_limits.REDIS_CALL_TIMEOUT_MS / 1000

# KEYS[1] the record; ARGV[1] the fingerprint, ARGV[2] the TTL in seconds.
# Answers 1 created, 2 the same request again, 0 another request.
_CLAIM: Final = """
local stored = redis.call('GET', KEYS[1])
if not stored then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  return 1
end
if stored == ARGV[1] then
  return 2
end
return 0
"""


class Claim(enum.Enum):
    CREATED = 1
    SAME = 2
    OTHER = 0


class KeyRegistryUnavailable(Exception):
    """Redis could not be reached to check a key across shards; answer 503."""


class KeyRegistry:
    def __init__(
        self,
        client: "aioredis.Redis",
        namespace: str = NAMESPACE_DEFAULT,
        timings: t.Timings | None = None,
    ) -> None:
        """``timings``: where each claim's and release's duration is observed."""
        timings = timings if timings is not None else t.Timings()
        self._claim_timing = timings.redis(t.REDIS_IDEMPOTENCY_CLAIM)
        self._release_timing = timings.redis(t.REDIS_IDEMPOTENCY_RELEASE)
        self._keys = RedisKeys(namespace)
        self._script = client.register_script(_CLAIM)
        self._client = client

    def _record(self, endpoint: str, user_id: str, key: str) -> str:
        return self._keys.idempotency(endpoint, user_id, key)

    async def claim(self, endpoint: str, user_id: str, key: str, command: AnyCommand) -> Claim:
        """Record ``command`` as what ``key`` stands for, or compare with what it does."""
        # Once per keyed request: timed without a context manager's allocation.
        started_ns = time.perf_counter_ns()
        try:
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                answer = await self._script(
                    keys=[self._record(endpoint, user_id, key)],
                    args=[fingerprint(command), RECORD_TTL_S],
                )
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise KeyRegistryUnavailable(repr(exc)) from exc
        finally:
            self._claim_timing.observe(time.perf_counter_ns() - started_ns)
        return Claim(int(answer))

    async def release(self, endpoint: str, user_id: str, key: str) -> None:
        """Forget a record this request created (its answer is not kept)."""
        # On failure it expires by itself; a retry with another body waits for that.
        with (
            contextlib.suppress(redis.exceptions.RedisError, OSError, TimeoutError),
            self._release_timing.time(),
        ):
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                await self._client.delete(self._record(endpoint, user_id, key))


def fingerprint(command: AnyCommand) -> str:
    """The request's fingerprint (``engine.core.fingerprint``), hashed short for Redis."""
    return hashlib.blake2b(shard_fingerprint(command), digest_size=16).hexdigest()

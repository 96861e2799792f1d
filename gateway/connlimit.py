"""Live connections per user, counted in Redis across every gateway of a deployment.

One token must not hold thousands of WebSockets: each costs the gateway a
socket, an outbox and a watch. So every live connection (``WS /ws/bookings``,
``WS /ws/queue/{slotId}``, the SSE stream) takes a place in its user's record
before it subscribes or upgrades, and past ``SLOTENGINE_LIVE_CONNECTIONS_PER_USER_MAX``
places the request is refused. The record is shared by every worker and every
gateway of the deployment, so the cap holds however the connections spread.

Theory of operation
-------------------
A user's record is a sorted set ``{namespace}:live:{user}``
(``config/redis_keys.py``): one member per
place (the holding gateway process's random id and a counter), scored with
the time the place lapses, in Redis's clock (``TIME``), so gateways with skewed
clocks agree. Taking a place is one script, atomic across gateways: drop the
lapsed places, count the rest, add one if the count is below the cap. A closed
connection removes its place at once (``ZREM``). A live one keeps its place by
renewal: each gateway process renews all of its places every ``renew_every_s``
in a few batched script calls (not one call per connection), each pushing the
place's lapse ``lease_ms`` ahead. So a gateway that dies without closing its
connections leaves places that lapse by themselves within ``lease_ms``, and
the record's key expires with its last place.

A renewal also adds a place back that Redis lost (a restart without
persistence, a gateway stalled past its lease): a live connection counts,
even if that puts its user over the cap until one closes.

Redis unreachable: a new live connection cannot take a place and is refused
with 503, as it would be anyway (live updates need Redis pub/sub, which is
away too). Connections already open stay open and keep their places; the
renewals retry on their period.

This module never closes a connection: it only counts and decides.
"""

import asyncio
import contextlib
import itertools
import logging
import secrets
from typing import Final

import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from config.redis_keys import NAMESPACE_DEFAULT, RedisKeys
from persistence import timings as t

logger = logging.getLogger("slotengine.connlimit")

# How long a place outlives its gateway's last renewal: a crashed gateway's
# users get their places back within a minute, while two renewals in a row may
# fail (a Redis blip) before a live connection's place lapses.
LEASE_MS: Final = 60_000
RENEW_EVERY_S: Final = 20.0
# Places renewed by one script call, at most: a call stays well under a
# millisecond of Redis time even for a gateway holding tens of thousands.
RENEWALS_PER_CALL_MAX: Final = 1_000

# KEYS[1]: the user's record. ARGV[1]: the new place, ARGV[2]: the cap, ARGV[3]:
# the lease in milliseconds. Answers {1, places held now} when the place is
# taken, {0, places held, milliseconds until the earliest of them lapses} when
# refused. Numbers given to redis.call are formatted with %d (Lua would print a
# large one in %.14g).
_TAKE: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local key = KEYS[1]
redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now))
local held = redis.call('ZCARD', key)
if held >= tonumber(ARGV[2]) then
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return {0, held, tonumber(first[2]) - now}
end
local lease = tonumber(ARGV[3])
redis.call('ZADD', key, string.format('%d', now + lease), ARGV[1])
redis.call('PEXPIRE', key, string.format('%d', lease))
return {1, held + 1}
"""

# KEYS: user records. ARGV[1]: the lease in milliseconds; then, for each key in
# order, the number of its places followed by the places. Each place lapses a
# lease from now again (added back if Redis lost it), and so does each record.
_RENEW: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease = tonumber(ARGV[1])
local lapses = string.format('%d', now + lease)
local at = 2
for _, key in ipairs(KEYS) do
    local count = tonumber(ARGV[at])
    at = at + 1
    for _ = 1, count do
        redis.call('ZADD', key, lapses, ARGV[at])
        at = at + 1
    end
    redis.call('PEXPIRE', key, string.format('%d', lease))
end
return 0
"""

_REDIS_ERRORS: Final = (redis.exceptions.RedisError, OSError)


class TooManyConnections(Exception):
    """The user holds the cap's number of live connections already."""

    def __init__(self, user_id: str, limit: int, retry_after_s: int) -> None:
        super().__init__(f"{user_id!r} holds {limit} live connections already")
        self.limit = limit
        self.retry_after_s = retry_after_s


class ConnectionLimiterUnavailable(Exception):
    """Redis could not be reached to count a user's live connections; answer 503."""


class Place(msgspec.Struct, frozen=True):
    """One live connection's place in its user's record."""

    key: str
    member: str


class ConnectionLimiterStatistics(msgspec.Struct, frozen=True, kw_only=True):
    held: int
    taken: int
    refused: int
    renewals: int
    renewal_failures: int


class ConnectionLimiter:
    """This gateway process's places in the users' records, taken, renewed and given back.

    Invariant: ``_held`` maps every place this process took and has not given
    back to its record's key; those and only those are renewed. A cap of 0
    means no cap: no place is taken, Redis is not asked.
    """

    def __init__(
        self,
        client: "aioredis.Redis",
        per_user_max: int,
        *,
        namespace: str = NAMESPACE_DEFAULT,
        lease_ms: int = LEASE_MS,
        renew_every_s: float = RENEW_EVERY_S,
        timings: t.Timings | None = None,
    ) -> None:
        """``timings``: where each Redis call's duration is observed (a place taken,
        given back, a batch of renewals)."""
        timings = timings if timings is not None else t.Timings()
        self._take_timing = timings.redis(t.REDIS_CONNECTION_TAKE)
        self._give_back_timing = timings.redis(t.REDIS_CONNECTION_GIVE_BACK)
        self._renew_timing = timings.redis(t.REDIS_CONNECTION_RENEW)
        if per_user_max < 0:
            raise ValueError(f"per_user_max must be 0 (no cap) or more, got {per_user_max}")
        if not 0 < renew_every_s * 1000 < lease_ms:
            raise ValueError("renewals must come more often than places lapse")
        self.per_user_max = per_user_max
        self.lease_ms = lease_ms
        self.renew_every_s = renew_every_s
        self._client = client
        self._keys = RedisKeys(namespace)
        self._take = client.register_script(_TAKE)
        self._renew = client.register_script(_RENEW)
        # Distinct from any other process's places, also across restarts.
        self._process = secrets.token_hex(8)
        self._counter = itertools.count(1)
        self._held: dict[str, str] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._giving_back: set[asyncio.Task[None]] = set()
        self._closed = False
        self._taken = 0
        self._refused = 0
        self._renewals = 0
        self._renewal_failures = 0

    def record(self, user_id: str) -> str:
        """The Redis key of ``user_id``'s record (the user id last: no two users share one)."""
        return self._keys.live_connections(user_id)

    def statistics(self) -> ConnectionLimiterStatistics:
        return ConnectionLimiterStatistics(
            held=len(self._held),
            taken=self._taken,
            refused=self._refused,
            renewals=self._renewals,
            renewal_failures=self._renewal_failures,
        )

    async def take(self, user_id: str) -> Place | None:
        """A place for one more live connection of ``user_id`` (None: no cap).

        Raises ``TooManyConnections`` at the cap, and
        ``ConnectionLimiterUnavailable`` when Redis cannot be reached.
        """
        if not self.per_user_max:
            return None
        key = self.record(user_id)
        place = Place(key, f"{self._process}:{next(self._counter)}")
        try:
            with self._take_timing.time():
                answer = await self._take(
                    keys=[key], args=[place.member, self.per_user_max, self.lease_ms]
                )
        except _REDIS_ERRORS as exc:
            raise ConnectionLimiterUnavailable(
                f"live connections cannot be counted: {exc!r}"
            ) from None
        if not int(answer[0]):
            self._refused += 1
            first_lapse_s = -(-int(answer[2]) // 1000)
            raise TooManyConnections(user_id, self.per_user_max, max(1, first_lapse_s))
        self._taken += 1
        self._held[place.member] = key
        self._start_renewing()
        return place

    async def give_back(self, place: Place | None) -> None:
        """Free ``place`` at once; it is never renewed again.

        The removal goes on if the caller is cancelled meanwhile; if Redis
        cannot be reached, the place lapses by itself.
        """
        if place is None or self._held.pop(place.member, None) is None:
            return
        task = asyncio.get_running_loop().create_task(self._remove([place]))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)
        await asyncio.shield(task)

    async def close(self) -> None:
        """Stop renewing (places still held then lapse unless given back)."""
        self._closed = True
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        if self._giving_back:
            await asyncio.gather(*self._giving_back, return_exceptions=True)

    async def renew(self) -> None:
        """Push every held place's lapse ``lease_ms`` ahead, in batched script calls."""
        by_key: dict[str, list[str]] = {}
        for member, key in self._held.items():
            by_key.setdefault(key, []).append(member)
        batch: list[tuple[str, list[str]]] = []
        size = 0
        for key, members in by_key.items():
            batch.append((key, members))
            size += len(members)
            if size >= RENEWALS_PER_CALL_MAX:
                await self._renew_batch(batch)
                batch, size = [], 0
        if batch:
            await self._renew_batch(batch)
        self._renewals += 1

    async def _renew_batch(self, batch: list[tuple[str, list[str]]]) -> None:
        args: list[str | int] = [self.lease_ms]
        for _, members in batch:
            args.append(len(members))
            args.extend(members)
        with self._renew_timing.time():
            await self._renew(keys=[key for key, _ in batch], args=args)
        # A place given back while this call was on its way may have been removed
        # before the call added it back: remove it again.
        again = [
            Place(key, member)
            for key, members in batch
            for member in members
            if member not in self._held
        ]
        if again:
            await self._remove(again)

    async def _remove(self, places: list[Place]) -> None:
        try:
            with self._give_back_timing.time():
                async with self._client.pipeline(transaction=False) as pipe:
                    for place in places:
                        pipe.zrem(place.key, place.member)
                    await pipe.execute()
        except _REDIS_ERRORS as exc:
            logger.warning("%d live connection places left to lapse: %r", len(places), exc)

    def _start_renewing(self) -> None:
        if self._renewer is None and not self._closed:
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_forever(), name="live-connection-renewals"
            )

    async def _renew_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.renew_every_s)
            try:
                await self.renew()
            except _REDIS_ERRORS as exc:
                self._renewal_failures += 1
                if not failing:
                    logger.warning("live connection places not renewed: %r", exc)
                failing = True
            else:
                failing = False

"""Redis clients built from the configured URL, the one place that builds them.

``redis://``, ``rediss://`` and ``unix://`` URLs give a client of that server,
as ``Redis.from_url`` does. A ``redis+sentinel://`` URL (``config.settings.
parse_sentinel_url`` gives its form) gives a client of the master the
sentinels name: each new connection asks them where the master is, so after
a failover the client's next connections go to the promoted replica (a
command that fails on a connection to the lost master raises, as any lost
connection does; its caller tries again as it would then).

Every caller passes its own options (timeouts, retries, decoding) and gets
them whatever the URL. A pool of bounded size that waits for a free
connection (``max_connections``) is had the same way.

It never connects: a client connects on its first command. It never reads the
environment (``config.settings`` does) and never names a key
(``config.redis_keys`` does).

Why in ``config``: the shell, persistence, the gateway and the CLI all build
clients, and ``config`` is the package every one of them may import.
"""

from typing import Any

import redis
import redis.asyncio as aioredis
import redis.sentinel
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from config.settings import SentinelTarget, parse_sentinel_url

SENTINEL_SCHEME = "redis+sentinel"


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names Redis through Sentinel."""
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


class _SentinelRedis(aioredis.Redis):
    """A client of a Sentinel-managed master that closes its sentinels' clients too."""

    _sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            sentinel, self._sentinel = self._sentinel, None
            if sentinel is not None:
                await sentinel.aclose()


class _MasterConnection(SentinelManagedConnection):
    """A connection to the master that asks the sentinels where it is whenever it
    connects, also when its holder reconnects it outside the pool.

    redis-py's own reconnects a connection that broke (sending a command on it
    again) to the address it had: the lost master's, for good, for a caller that
    keeps one connection (the rate limiter's script calls do).
    """

    # Set while connecting to an address just asked for (the pool's way in).
    _address_fresh = False

    async def connect_to(self, address: tuple[str, int]) -> None:
        self._address_fresh = True
        try:
            await super().connect_to(address)  # type: ignore[no-untyped-call]
        finally:
            self._address_fresh = False

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not (self.is_connected or self._address_fresh) and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


class _BlockingSentinelConnectionPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection when all are in use."""


def redis_client(
    url: str,
    *,
    max_connections: int | None = None,
    pool_timeout: float | None = None,
    **options: Any,
) -> aioredis.Redis:
    """An asyncio client of ``url`` with ``options`` (``decode_responses``,
    ``socket_timeout``, ``socket_connect_timeout``, ``retry``...).

    With ``max_connections`` the pool holds at most that many connections and a
    caller waits up to ``pool_timeout`` seconds for one. Raises ``ValueError``
    on a malformed ``redis+sentinel://`` URL.
    """
    blocking = max_connections is not None
    if blocking:
        options = {**options, "max_connections": max_connections, "timeout": pool_timeout}
    if not is_sentinel_url(url):
        if blocking:
            return aioredis.Redis.from_pool(
                aioredis.BlockingConnectionPool.from_url(url, **options)
            )
        return aioredis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=_sentinel_options(options))
    client = sentinel.master_for(
        target.service,
        redis_class=_SentinelRedis,
        connection_pool_class=(
            _BlockingSentinelConnectionPool if blocking else SentinelConnectionPool
        ),
        connection_class=_MasterConnection,
        db=target.db,
        password=target.password,
        **options,
    )
    assert isinstance(client, _SentinelRedis)
    client._sentinel = sentinel
    return client


def redis_sync_client(url: str, **options: Any) -> redis.Redis:
    """A blocking client of ``url`` with ``options``, for the command line's checks."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    target: SentinelTarget = parse_sentinel_url(url)
    sentinel = redis.sentinel.Sentinel(
        list(target.sentinels), sentinel_kwargs=_sentinel_options(options)
    )
    client: redis.Redis = sentinel.master_for(
        target.service, db=target.db, password=target.password, **options
    )
    return client


def _sentinel_options(options: dict[str, Any]) -> dict[str, Any]:
    """The caller's timeouts also bound each question to a sentinel."""
    return {key: value for key, value in options.items() if key.startswith("socket_")}

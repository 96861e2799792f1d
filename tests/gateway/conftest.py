"""A gateway over durable in-process shards on the test PostgreSQL and Redis.

``api`` is an aiohttp test client on a real socket; ``token(sub, role)`` makes
a bearer header signed with the test secret.
"""

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from engine.shell.coalescer import EngineClient
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.owner import StorageSettings
from gateway.app import create_app
from gateway.auth.issue import issue_token
from gateway.auth.settings import AuthSettings
from gateway.auth.verify import Verifier
from gateway.idempotency import KeyRegistry
from gateway.ratelimit import RateLimiter, RateLimits
from tests.conftest import REDIS_URL
from tests.support.domain import POLICIES

SECRET = "test-secret-0123456789abcdef0123456789abcdef"
SHARDS = 2

Token = Callable[..., dict[str, str]]


@pytest.fixture
def token() -> Token:
    def make(sub: str = "alice", role: str = "user", **claims: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {issue_token(SECRET, sub, role, 3600, **claims)}"}

    return make


@pytest.fixture
async def host(database_url: str, redis_namespace: str) -> AsyncIterator[OwnedInProcessHost]:
    storage = StorageSettings(
        database_url=database_url, redis_url=REDIS_URL, namespace=redis_namespace
    )
    engine_host = OwnedInProcessHost(shard_count=SHARDS, policies=POLICIES, storage=storage)
    await engine_host.start()
    yield engine_host
    await engine_host.close()


@pytest.fixture
def rate_limits() -> RateLimits:
    """docs/api.md's defaults; a test parametrizes ``rate_limits`` to set its own."""
    return RateLimits()


@pytest.fixture
async def api(
    host: OwnedInProcessHost, redis_namespace: str, rate_limits: RateLimits
) -> AsyncIterator[TestClient[Any, Any]]:
    verifier = Verifier(AuthSettings(secret=SECRET))
    redis_client = aioredis.Redis.from_url(REDIS_URL)
    limiter = RateLimiter(redis_client, rate_limits, namespace=redis_namespace)
    keys = KeyRegistry(redis_client, redis_namespace)
    app = create_app(EngineClient(host), verifier, limiter, keys=keys)
    async with TestClient(TestServer(app)) as client:
        yield client
    await redis_client.aclose()

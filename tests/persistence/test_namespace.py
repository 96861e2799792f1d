"""Each deployment's keys in Redis are named by its database (real PostgreSQL and
Redis): two deployments on one Redis own their shards side by side, while two
owners on one namespace contend, as fencing requires."""

from collections.abc import AsyncIterator

import asyncpg
import pytest

from config.redis_keys import NAMESPACE_DEFAULT
from config.settings import Settings
from engine.shell.errors import ShardUnavailable
from engine.shell.inproc import OwnedInProcessHost
from engine.shell.owner import OwnerState
from gateway.server import storage_for
from persistence.migrate import deployment_namespace
from tests.conftest import (
    DATABASE_URL,
    REDIS_URL,
    _create_database,
    _drop_database,
    forget_namespace,
    with_database,
)
from tests.persistence.helpers import policies

# Short: the contending owner gives up quickly instead of waiting out a lease.
LEASE_ACQUIRE_TIMEOUT_MS = 300


@pytest.fixture
async def other_database_url(template_database: str) -> AsyncIterator[str]:
    name = await _create_database(template_database)
    yield with_database(DATABASE_URL, name)
    await _drop_database(name)


async def _namespace(url: str) -> str:
    connection = await asyncpg.connect(url)
    try:
        return await deployment_namespace(connection)
    finally:
        await connection.close()


async def test_a_database_names_one_namespace_and_another_database_another(
    database_url: str, other_database_url: str
) -> None:
    first, again = await _namespace(database_url), await _namespace(database_url)
    other = await _namespace(other_database_url)
    assert first == again
    assert first != other
    for namespace in (first, other):
        prefix, digest = namespace.split(":")
        assert prefix == NAMESPACE_DEFAULT and len(digest) == 12
        int(digest, 16)


async def test_two_deployments_on_one_redis_both_own_their_shards(
    database_url: str, other_database_url: str
) -> None:
    storages = [
        await storage_for(Settings(database_url=url, redis_url=REDIS_URL))
        for url in (database_url, other_database_url)
    ]
    assert storages[0].namespace != storages[1].namespace
    hosts = [
        OwnedInProcessHost(shard_count=2, policies=policies(), storage=storage)
        for storage in storages
    ]
    try:
        for host in hosts:
            await host.start()
        for host in hosts:
            assert all(host.owner(shard).state is OwnerState.SERVING for shard in range(2))
    finally:
        for host in hosts:
            await host.close()
        for storage in storages:
            await forget_namespace(storage.namespace)


async def test_two_owners_on_one_namespace_contend_for_its_shards(
    database_url: str, other_database_url: str
) -> None:
    """The control: what sharing one prefix did to two deployments."""
    import msgspec

    storage = await storage_for(Settings(database_url=database_url, redis_url=REDIS_URL))
    shared = msgspec.structs.replace(
        await storage_for(Settings(database_url=other_database_url, redis_url=REDIS_URL)),
        namespace=storage.namespace,
        lease_acquire_timeout_ms=LEASE_ACQUIRE_TIMEOUT_MS,
    )
    first = OwnedInProcessHost(shard_count=1, policies=policies(), storage=storage)
    second = OwnedInProcessHost(shard_count=1, policies=policies(), storage=shared)
    try:
        await first.start()
        with pytest.raises(ShardUnavailable):
            await second.start()
        assert second.owner(0).state is not OwnerState.SERVING
    finally:
        await second.close()
        await first.close()
        await forget_namespace(storage.namespace)

"""Fixtures every test package may use: one real local Ray for the whole run, and
real PostgreSQL and Redis.

``DATABASE_URL`` / ``REDIS_URL`` name the servers (CI sets them; locally the
defaults are the usual ports). Each test that asks for ``database_url`` gets a
database of its own, copied from a template migrated once per run, and
``redis_namespace`` a Redis key prefix of its own, so tests never see each
other's rows or leases.
"""

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from persistence.migrate import load_migrations, migrate

DATABASE_URL = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
# How long a template of another schema is kept (see _ensure_template).
TEMPLATE_KEPT_S = 86_400


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def _template_name() -> str:
    digest = hashlib.sha256("".join(m.checksum for m in load_migrations()).encode())
    return f"slotengine_tpl_{digest.hexdigest()[:12]}"


async def _ensure_template() -> str:
    name = _template_name()
    admin = await asyncpg.connect(with_database(DATABASE_URL, "postgres"))
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            building = f"{name}_build_{secrets.token_hex(3)}"
            await admin.execute(f'CREATE DATABASE "{building}"')
            connection = await asyncpg.connect(with_database(DATABASE_URL, building))
            try:
                await migrate(connection)
            finally:
                await connection.close()
            await admin.execute(f"COMMENT ON DATABASE \"{building}\" IS '{int(time.time())}'")
            try:
                await admin.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
            except asyncpg.DuplicateDatabaseError:
                await admin.execute(f'DROP DATABASE "{building}"')
        # Templates of other schemas are of no further use once nobody can be using
        # them: a run of another revision on the same server (a branch beside main)
        # keeps its own for a day. A template's comment is when it was built.
        for stale in await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'slotengine\\_tpl\\_%'"
            " AND datname <> $1 AND datname NOT LIKE '%\\_build\\_%'"
            " AND shobj_description(oid, 'pg_database') ~ '^[0-9]+$'"
            " AND shobj_description(oid, 'pg_database')::bigint < $2",
            name,
            int(time.time()) - TEMPLATE_KEPT_S,
        ):
            with contextlib.suppress(asyncpg.PostgresError):
                await admin.execute(f'DROP DATABASE "{stale["datname"]}"')
    finally:
        await admin.close()
    return name


@pytest.fixture(scope="session")
def template_database() -> str:
    return asyncio.run(_ensure_template())


async def _create_database(template: str) -> str:
    name = f"slotengine_t_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(with_database(DATABASE_URL, "postgres"))
    try:
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        except asyncpg.InvalidCatalogNameError:
            # Dropped by a run of an older revision on the same server: build it again.
            await _ensure_template()
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return name


async def _drop_database(name: str) -> None:
    admin = await asyncpg.connect(with_database(DATABASE_URL, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def database_url(template_database: str) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    name = asyncio.run(_create_database(template_database))
    yield with_database(DATABASE_URL, name)
    asyncio.run(_drop_database(name))


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@pytest.fixture
def redis_namespace() -> Iterator[str]:
    namespace = f"slotengine-test-{secrets.token_hex(4)}"
    yield namespace
    asyncio.run(forget_namespace(namespace))


async def forget_namespace(namespace: str) -> None:
    """Delete every key under ``namespace`` from the shared Redis."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(f"{namespace}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A real local Ray for the whole test run; yields its namespace."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-")
    namespace = f"slotengine-test-{uuid.uuid4().hex[:12]}"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        namespace=namespace,
        log_to_driver=False,
    )
    try:
        yield namespace
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

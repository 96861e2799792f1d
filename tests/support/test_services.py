"""The private servers fault tests rely on: stopped, crashed, frozen and restarted for real."""

import asyncio
import os
import shutil
import socket
import tempfile
from pathlib import Path

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from persistence.services import (
    PostgresStopMode,
    PrivatePostgres,
    PrivateRedis,
    RedisStopMode,
    find_postgres_bindir,
)

pytest_plugins = ["tests.support.fixtures"]

pytestmark = pytest.mark.timeout(60)


async def connect(postgres: PrivatePostgres, timeout: float = 10) -> asyncpg.Connection:
    return await asyncpg.connect(postgres.url, timeout=timeout)


async def fetch(postgres: PrivatePostgres, sql: str) -> object:
    connection = await connect(postgres)
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


# -- PostgreSQL ----------------------------------------------------------------


async def test_postgres_stop_refuses_connections_and_start_brings_the_data_back(
    private_postgres: PrivatePostgres,
) -> None:
    url = private_postgres.url
    port = private_postgres.port
    connection = await connect(private_postgres)
    try:
        await connection.execute("CREATE TABLE kept (value text)")
        await connection.execute("INSERT INTO kept VALUES ('committed')")
    finally:
        await connection.close()

    await private_postgres.astop()
    assert not private_postgres.running
    with pytest.raises(ConnectionRefusedError):
        await connect(private_postgres)
    private_postgres.stop()  # already stopped: nothing to do

    await private_postgres.astart()
    assert private_postgres.running
    assert (private_postgres.url, private_postgres.port) == (url, port)
    assert await fetch(private_postgres, "SELECT value FROM kept") == "committed"


@pytest.mark.parametrize("mode", ["immediate", "kill"])
async def test_postgres_crash_keeps_committed_data_and_drops_the_rest(
    private_postgres: PrivatePostgres, mode: PostgresStopMode
) -> None:
    connection = await connect(private_postgres)
    await connection.execute("CREATE TABLE ledger (value int)")
    await connection.execute("INSERT INTO ledger SELECT generate_series(1, 1000)")
    in_flight = connection.transaction()
    await in_flight.start()
    await connection.execute("INSERT INTO ledger VALUES (-1)")
    pid = private_postgres.pid

    await private_postgres.astop(mode)
    assert not private_postgres.running
    connection.terminate()  # its server is gone

    await private_postgres.astart()
    assert private_postgres.pid != pid
    assert await fetch(private_postgres, "SELECT count(*) FROM ledger") == 1000
    assert await fetch(private_postgres, "SELECT min(value) FROM ledger") == 1


def test_postgres_restart_keeps_the_url_and_the_data(private_postgres: PrivatePostgres) -> None:
    url = private_postgres.url
    asyncio.run(fetch(private_postgres, "CREATE TABLE t AS SELECT 7 AS value"))
    modes: tuple[PostgresStopMode, ...] = ("fast", "immediate", "kill")
    for mode in modes:
        private_postgres.restart(mode)
        assert private_postgres.url == url
        assert asyncio.run(fetch(private_postgres, "SELECT value FROM t")) == 7


async def test_postgres_paused_hangs_connections_until_resumed(
    private_postgres: PrivatePostgres,
) -> None:
    private_postgres.pause()
    assert private_postgres.paused
    try:
        with pytest.raises(TimeoutError):
            await connect(private_postgres, timeout=0.5)
    finally:
        private_postgres.resume()
    assert not private_postgres.paused
    assert await fetch(private_postgres, "SELECT 1") == 1


async def test_postgres_paused_hangs_the_statements_of_open_connections_too(
    private_postgres: PrivatePostgres,
) -> None:
    connection = await connect(private_postgres)
    try:
        private_postgres.pause()
        try:
            with pytest.raises(TimeoutError):
                await connection.fetchval("SELECT 1", timeout=0.5)
        finally:
            private_postgres.resume()
    finally:
        connection.terminate()
    assert await fetch(private_postgres, "SELECT 1") == 1


async def test_postgres_a_paused_server_still_stops(private_postgres: PrivatePostgres) -> None:
    private_postgres.pause()
    await private_postgres.astop("fast")
    await private_postgres.astart()
    assert await fetch(private_postgres, "SELECT 1") == 1


async def test_postgres_runs_with_the_settings_for_tests(
    private_postgres_module: PrivatePostgres,
) -> None:
    postgres = private_postgres_module
    assert postgres.host == "127.0.0.1"
    assert postgres.url == f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    assert await fetch(postgres, "SHOW fsync") == "off"
    assert await fetch(postgres, "SHOW synchronous_commit") == "on"
    assert await fetch(postgres, "SHOW listen_addresses") == "127.0.0.1"
    assert await fetch(postgres, "SELECT current_user") == "postgres"
    if os.geteuid() == 0:
        pid = postgres.pid
        assert pid is not None
        assert Path(f"/proc/{pid}").stat().st_uid != 0  # not root


async def test_postgres_creates_the_database_it_is_asked_for() -> None:
    with PrivatePostgres(database="slot engine") as postgres:
        assert postgres.url.endswith("/slot%20engine")
        assert await fetch(postgres, "SELECT current_database()") == "slot engine"
        postgres.restart()
        assert await fetch(postgres, "SELECT current_database()") == "slot engine"


def test_postgres_close_deletes_everything_and_is_idempotent() -> None:
    postgres = PrivatePostgres()
    postgres.start()
    directory = postgres.directory
    assert (postgres.data_dir / "PG_VERSION").is_file()
    postgres.close()
    postgres.close()
    assert not directory.exists()
    assert not postgres.running
    with pytest.raises(RuntimeError, match="closed"):
        postgres.start()


def test_postgres_in_a_given_directory_leaves_the_directory() -> None:
    directory = Path(tempfile.mkdtemp(prefix="slotengine-given-"))
    try:
        with PrivatePostgres(directory) as postgres:
            assert postgres.data_dir == directory.resolve() / "data"
            assert asyncio.run(fetch(postgres, "SELECT 1")) == 1
        assert directory.is_dir()
        assert not (directory / "data").exists()
    finally:
        shutil.rmtree(directory)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root needs another user")
def test_postgres_as_root_refuses_a_directory_its_user_cannot_reach(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(PermissionError, match="out of reach of the user"):
        PrivatePostgres(private / "cluster")
    assert not (private / "cluster").exists()


def test_postgres_on_the_binaries_pgserver_bundles() -> None:
    pgserver = pytest.importorskip("pgserver")
    bindir = Path(pgserver.__file__).parent / "pginstall" / "bin"
    if bindir == find_postgres_bindir():
        pytest.skip("pgserver's binaries are the default here, tested everywhere else")
    with PrivatePostgres(bindir=bindir) as postgres:
        version = asyncio.run(fetch(postgres, "SHOW server_version"))
        assert isinstance(version, str)
        postgres.restart("immediate")
        assert asyncio.run(fetch(postgres, "SELECT 1")) == 1


# -- Redis ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shutdown", "kill"])
async def test_redis_stop_refuses_connections_and_start_answers_on_the_same_url(
    private_redis: PrivateRedis, mode: RedisStopMode
) -> None:
    url = private_redis.url
    client = aioredis.Redis.from_url(url, socket_timeout=5)
    try:
        assert await client.ping() is True
        await client.set("lease", "owner")

        await private_redis.astop(mode)
        assert not private_redis.running
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((private_redis.host, private_redis.port), timeout=5)
        fresh = aioredis.Redis.from_url(url, socket_timeout=5)
        try:
            with pytest.raises(redis.ConnectionError):
                await fresh.ping()
        finally:
            await fresh.aclose()
        private_redis.stop()  # already stopped: nothing to do

        await private_redis.astart()
        assert private_redis.url == url
    finally:
        await client.aclose()
    # A new client: a pooled connection to the old server fails its next command.
    client = aioredis.Redis.from_url(url, socket_timeout=5)
    try:
        assert await client.ping() is True
        assert await client.get("lease") is None  # nothing persisted
    finally:
        await client.aclose()


async def test_redis_paused_times_out_until_resumed(private_redis: PrivateRedis) -> None:
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=0.5)
    try:
        assert await client.ping() is True
        private_redis.pause()
        try:
            with pytest.raises(redis.TimeoutError):
                await client.ping()
        finally:
            private_redis.resume()
        assert await client.ping() is True
    finally:
        await client.aclose()


def test_redis_restart_and_close(private_redis_module: PrivateRedis) -> None:
    redis_server = PrivateRedis()
    with redis_server:
        url = redis_server.url
        directory = redis_server.directory
        redis_server.restart()
        assert redis_server.url == url
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            assert client.ping() is True
        finally:
            client.close()
    assert not redis_server.running
    assert not directory.exists()
    redis_server.close()  # idempotent
    # The module's shared server is another one, untouched.
    assert private_redis_module.running
    assert private_redis_module.port != redis_server.port

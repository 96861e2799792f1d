"""SQL migrations: the files in ``persistence/migrations``, applied in order.

A migration is a file named ``NNNN_what.sql``. Each runs in its own
transaction and is recorded in ``schema_migrations`` with a checksum, so
re-running is safe (applied files are skipped) and an applied file that was
edited afterwards is refused rather than silently diverging. A session-level
advisory lock serialises concurrent starts (several gateways, ``slotengine
migrate`` during a deploy). Beside the schema it names the deployment the
database holds (``deployment_namespace``), read once at every start, from the
database's fingerprint (``database_fingerprint``), by which a shard actor shows
which database it serves.

It must never apply an edited migration, apply one twice, or undo one: there
are no down migrations.
"""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncpg

from config.redis_keys import namespace_for_database
from persistence import limits

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
# An arbitrary constant shared by every process that migrates this schema.
MIGRATION_LOCK_KEY: Final = 0x510E_E461
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """The schema cannot be brought up to date (a changed or misnamed file)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_what.sql")
        migrations.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version number in {directory}")
    return migrations


async def migrate(connection: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every migration not applied yet; returns the names applied now."""
    migrations = load_migrations(directory)
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await connection.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied = {
            row["version"]: row
            for row in await connection.fetch(
                "SELECT version, name, checksum FROM schema_migrations"
            )
        }
        done: list[str] = []
        for migration in migrations:
            row = applied.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"{migration.name} was changed after it was applied"
                        f" (applied as {row['name']}): add a new migration instead"
                    )
                continue
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            done.append(migration.name)
        return done
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def migrate_url(url: str) -> list[str]:
    # Every shard owner runs this at its start: a database that does not answer
    # fails the start at once (the caller tries again) rather than hanging it.
    # Statements keep no limit: a migration may rewrite a large table, and
    # waiting for another process's migration is waiting for the lock.
    connection = await asyncpg.connect(url, timeout=limits.DATABASE_CONNECT_TIMEOUT_MS / 1000)
    try:
        return await migrate(connection)
    finally:
        await connection.close()


async def deployment_namespace(connection: asyncpg.Connection) -> str:
    """The prefix of the Redis keys of the deployment this database holds: its
    shard leases and fencing counters, rate limits, idempotency keys and event
    channels (``slotengine:<12 hex digits>``).

    Who may write a shard is decided per database (its fence rows), so the keys
    that coordinate it are per database too: two deployments sharing one Redis
    (staging beside production, a bench beside a test run) never contend for
    each other's leases or see each other's events. The digest is of the
    cluster's system identifier and the database's name: the same for every
    process of a deployment, across restarts and after a standby is promoted
    (it keeps the identifier), and different for a copy restored elsewhere.
    """
    return namespace_for_database(await database_fingerprint(connection))


async def database_fingerprint(connection: asyncpg.Connection) -> str:
    """12 hex digits naming the database ``connection`` is connected to: a digest
    of the cluster's system identifier and the database's name (see
    ``deployment_namespace``). Two URLs of one database (another host name, a
    socket) give the same fingerprint; two databases never do."""
    row = await connection.fetchrow(
        "SELECT (SELECT system_identifier FROM pg_control_system()) AS system,"
        " current_database() AS database"
    )
    assert row is not None
    identity = f"{row['system']}/{row['database']}".encode()
    return hashlib.sha256(identity).hexdigest()[:12]


async def database_fingerprint_of(url: str) -> str:
    """``database_fingerprint`` of the database ``url`` names, on a connection of its
    own, bounded like every connect of a shard owner."""
    connection = await asyncpg.connect(url, timeout=limits.DATABASE_CONNECT_TIMEOUT_MS / 1000)
    try:
        return await database_fingerprint(connection)
    finally:
        await connection.close()

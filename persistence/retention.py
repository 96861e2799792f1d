"""The retention purge: rows past their retention leave the database, here and only here.

This module owns deleting what the engine no longer needs: audit rows older
than the audit retention (through ``purge_audit_log``, the only way rows leave
the audit log), idempotency records older than ``IDEMPOTENCY_RETENTION_MS`` and
request outcomes older than ``REQUEST_OUTCOMES_RETENTION_MS`` (shards never
load older ones). It is the one purge of each of those tables: the shard
owners and their writers never delete them. When it runs is the shell's
decision (``engine.shell.maintenance``).

It must never delete a slot, a booking or a queue entry, nor a row a shard may
still load, and never hold many row locks or block a flush for long: each
statement deletes at most ``batch_rows`` rows in its own short transaction.
"""

from typing import Final

import asyncpg
import msgspec

from engine.core import limits

# Audit rows are kept 90 days.
AUDIT_RETENTION_DEFAULT_MS: Final = 90 * 86_400_000
# Rows deleted per purge statement (each its own short transaction), and the
# most statements one purge runs per table; the next run goes on from there.
PURGE_BATCH_ROWS_DEFAULT: Final = 10_000
PURGE_BATCHES_MAX: Final = 1_000


class PurgeReport(msgspec.Struct, kw_only=True):
    audit_rows: int
    idempotency_records: int
    request_outcomes: int
    # False when a table still had old rows after ``batches_max`` statements.
    complete: bool


async def purge(
    connection: asyncpg.Connection,
    *,
    now_ms: int,
    audit_retention_ms: int = AUDIT_RETENTION_DEFAULT_MS,
    batch_rows: int = PURGE_BATCH_ROWS_DEFAULT,
    batches_max: int = PURGE_BATCHES_MAX,
) -> PurgeReport:
    """Delete rows past their retention, ``batch_rows`` per statement.

    Audit rows older than ``audit_retention_ms`` go through ``purge_audit_log``;
    idempotency records older than ``limits.IDEMPOTENCY_RETENTION_MS`` and
    request outcomes older than ``limits.REQUEST_OUTCOMES_RETENTION_MS``
    (shards never load older ones) are deleted. Each statement is its own short
    transaction, so a purge never holds many row locks or blocks a flush for
    long; a flush refreshing an idempotency record at the same moment keeps it.
    """
    if batch_rows < 1 or batches_max < 1:
        raise ValueError("batch_rows and batches_max must be >= 1")
    audit, audit_done = await _drain(
        connection,
        "SELECT purge_audit_log($1, $2)",
        now_ms - audit_retention_ms,
        batch_rows,
        batches_max,
    )
    keys, keys_done = await _drain(
        connection,
        """
        WITH gone AS (
            DELETE FROM idempotency_records
             WHERE ctid = ANY (ARRAY (SELECT ctid FROM idempotency_records
                                       WHERE at_ms < $1 LIMIT $2))
               AND at_ms < $1
            RETURNING 1
        )
        SELECT count(*) FROM gone
        """,
        now_ms - limits.IDEMPOTENCY_RETENTION_MS,
        batch_rows,
        batches_max,
    )
    outcomes, outcomes_done = await _drain(
        connection,
        """
        WITH gone AS (
            DELETE FROM request_outcomes
             WHERE id IN (SELECT id FROM request_outcomes WHERE at_ms < $1 ORDER BY id LIMIT $2)
            RETURNING 1
        )
        SELECT count(*) FROM gone
        """,
        now_ms - limits.REQUEST_OUTCOMES_RETENTION_MS,
        batch_rows,
        batches_max,
    )
    return PurgeReport(
        audit_rows=audit,
        idempotency_records=keys,
        request_outcomes=outcomes,
        complete=audit_done and keys_done and outcomes_done,
    )


async def _drain(
    connection: asyncpg.Connection,
    statement: str,
    cutoff_ms: int,
    batch_rows: int,
    batches_max: int,
) -> tuple[int, bool]:
    """Runs ``statement`` until a batch comes back short; (rows deleted, all gone)."""
    total = 0
    for _ in range(batches_max):
        deleted = int(await connection.fetchval(statement, cutoff_ms, batch_rows))
        total += deleted
        if deleted < batch_rows:
            return total, True
    return total, False

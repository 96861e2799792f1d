"""The retention purge against a real database: only rows past their retention go,
a batch at a time, and the purge says when it stopped before the end.
"""

import asyncpg
import pytest

from engine.core import limits
from persistence.retention import PurgeReport, purge
from tests.persistence.test_schema import NOW_MS, add_audit


async def test_purge_removes_only_rows_past_their_retention(db: asyncpg.Connection) -> None:
    retention = 90 * 86_400_000
    for n in range(5):
        await add_audit(db, NOW_MS - retention - n - 1, f"old-{n}")
    await add_audit(db, NOW_MS - retention, "kept-at-the-edge")
    await add_audit(db, NOW_MS, "kept")
    for n, age_ms in enumerate(
        [limits.IDEMPOTENCY_RETENTION_MS + 1, limits.IDEMPOTENCY_RETENTION_MS + 50, 0]
        + [limits.IDEMPOTENCY_RETENTION_MS] * 2
    ):
        await db.execute(
            "INSERT INTO idempotency_records VALUES (0, $1, 'reserve', 'k', $2, '\\x00', '\\x00')",
            f"u-{n}",
            NOW_MS - age_ms,
        )
    for age_ms in [limits.REQUEST_OUTCOMES_RETENTION_MS + 1] * 3 + [0, 1]:
        await db.execute(
            "INSERT INTO request_outcomes (shard, at_ms, requests, outcomes)"
            " VALUES (0, $1, 1, '\\x00')",
            NOW_MS - age_ms,
        )

    report = await purge(db, now_ms=NOW_MS, audit_retention_ms=retention, batch_rows=2)
    assert report == PurgeReport(
        audit_rows=5, idempotency_records=2, request_outcomes=3, complete=True
    )
    assert [
        r["entity_id"] for r in await db.fetch("SELECT entity_id FROM audit_log ORDER BY id")
    ] == [
        "kept-at-the-edge",
        "kept",
    ]
    assert await db.fetchval("SELECT count(*) FROM idempotency_records") == 3
    assert (
        await db.fetchval("SELECT min(at_ms) FROM idempotency_records")
        == NOW_MS - limits.IDEMPOTENCY_RETENTION_MS
    )
    assert await db.fetchval("SELECT count(*) FROM request_outcomes") == 2
    assert await purge(db, now_ms=NOW_MS, audit_retention_ms=retention) == PurgeReport(
        audit_rows=0, idempotency_records=0, request_outcomes=0, complete=True
    )
    # The audit log is still append-only afterwards.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.execute("DELETE FROM audit_log")


async def test_a_purge_stops_after_its_batches_and_says_so(db: asyncpg.Connection) -> None:
    for n in range(5):
        await add_audit(db, NOW_MS - 10 - n, f"old-{n}")
    report = await purge(db, now_ms=NOW_MS, audit_retention_ms=1, batch_rows=2, batches_max=2)
    assert (report.audit_rows, report.complete) == (4, False)
    report = await purge(db, now_ms=NOW_MS, audit_retention_ms=1, batch_rows=2, batches_max=2)
    assert (report.audit_rows, report.complete) == (1, True)
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 0

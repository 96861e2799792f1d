"""The periodic maintenance against a real database: each round reports what the
checks find and purges, a failed round is logged and the next one runs, and
only cancellation ends it. It reports and never repairs.
"""

import asyncio
import logging

import asyncpg
import pytest

from engine.shell.maintenance import run_periodically
from persistence.checks import ReconcileReport
from persistence.retention import PurgeReport
from persistence.timings import DATABASE_RECONCILE, DATABASE_RETENTION_PURGE, Timings
from tests.persistence.test_reconcile import GRACE_MS, kinds, plant_holds, status
from tests.persistence.test_schema import NOW_MS, add_audit


async def test_the_periodic_job_reports_purges_survives_failures_and_stops_when_cancelled(
    db: asyncpg.Connection, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await plant_holds(db, shard=0)
    await add_audit(db, NOW_MS - 100 * 86_400_000, "old")
    attempts = 0

    async def connect() -> asyncpg.Connection:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("the database is down")
        return await asyncpg.connect(database_url)

    rounds: list[tuple[ReconcileReport, PurgeReport]] = []
    two_rounds = asyncio.Event()

    def on_round(report: ReconcileReport, purged: PurgeReport) -> None:
        rounds.append((report, purged))
        if len(rounds) == 2:
            two_rounds.set()

    caplog.set_level(logging.INFO, logger="engine.shell.maintenance")
    timings = Timings()
    job = asyncio.create_task(
        run_periodically(
            connect,
            0.02,
            hold_grace_ms=GRACE_MS,
            clock_ms=lambda: NOW_MS,
            on_round=on_round,
            timings=timings,
        )
    )
    await asyncio.wait_for(two_rounds.wait(), timeout=30)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert job.cancelled()

    assert attempts >= 3
    # Each round that connected timed its checks and its purge, on a connection
    # counted in use only meanwhile.
    checks = timings.database(DATABASE_RECONCILE).snapshot()
    purges = timings.database(DATABASE_RETENTION_PURGE).snapshot()
    assert checks.count >= 2 and purges.count >= 2
    assert checks.sum > 0 and purges.sum > 0
    assert timings.connections_in_use == 0
    assert any("round failed" in r.message and r.exc_info for r in caplog.records)
    (first, purged), (second, _) = rounds[:2]
    assert kinds(first) == kinds(second) == [("hold_past_deadline", "s-1", "b-stale")]
    assert purged.audit_rows == 1
    warnings = [r for r in caplog.records if getattr(r, "reconcile", None)]
    assert warnings
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert warnings[0].reconcile["kind"] == "hold_past_deadline"  # type: ignore[attr-defined]
    assert warnings[0].reconcile["booking_id"] == "b-stale"  # type: ignore[attr-defined]
    # Report only: the hold is still there.
    assert (await status(db, "b-stale"))[0] == "RESERVED"

"""The periodic maintenance of a deployment: the reconciliation report and the
retention purge, on a timer.

This module owns when they run and what a round does with its results:
every ``interval_s`` one round opens a fresh connection, runs the checks
(``persistence.checks``, report only) and the purge (``persistence.retention``),
and logs what they found. One process of the whole engine runs it: the owner
of shard 0 (``ShardOwner``, by its lease), every ``maintenance_every_s``.

It must never repair (a repair behind a running owner is unsafe; that is
``slotengine reconcile --repair``'s, run by an operator), never share a shard
owner's connection, and never end on a failed round: only cancellation stops it.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import asyncpg
import msgspec

from persistence.checks import HOLD_GRACE_DEFAULT_MS, ReconcileReport, check
from persistence.reconcile import wall_clock_ms
from persistence.retention import (
    AUDIT_RETENTION_DEFAULT_MS,
    PURGE_BATCH_ROWS_DEFAULT,
    PurgeReport,
    purge,
)
from persistence.timings import DATABASE_RECONCILE, DATABASE_RETENTION_PURGE, Timings

logger = logging.getLogger(__name__)

# How often a round runs, and how long one round may take.
MAINTENANCE_EVERY_DEFAULT_S: Final = 300.0
ROUND_TIMEOUT_S: Final = 600.0
CLOSE_TIMEOUT_S: Final = 10.0


async def run_periodically(
    connect: Callable[[], Awaitable[asyncpg.Connection]],
    interval_s: float = MAINTENANCE_EVERY_DEFAULT_S,
    *,
    hold_grace_ms: int = HOLD_GRACE_DEFAULT_MS,
    audit_retention_ms: int = AUDIT_RETENTION_DEFAULT_MS,
    batch_rows: int = PURGE_BATCH_ROWS_DEFAULT,
    round_timeout_s: float = ROUND_TIMEOUT_S,
    clock_ms: Callable[[], int] = wall_clock_ms,
    on_round: Callable[[ReconcileReport, PurgeReport], None] | None = None,
    timings: Timings | None = None,
) -> None:
    """Every ``interval_s``: the checks (report only) and the purge, on a fresh connection.

    Each finding is logged as a warning with the finding's fields in
    ``extra={"reconcile": {...}}``; the purge's counts at info. A round that
    fails (database down, a timeout after ``round_timeout_s``) is logged and the
    next one runs on time: nothing but cancellation ends the loop.
    ``on_round`` is called after every round that completed. ``timings``: where
    the checks' and the purge's durations are observed, and the round's
    connection counted in use.
    """
    if interval_s <= 0 or round_timeout_s <= 0:
        raise ValueError("interval_s and round_timeout_s must be > 0")
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            async with asyncio.timeout(round_timeout_s):
                report, purged = await _round(
                    connect,
                    clock_ms(),
                    hold_grace_ms,
                    audit_retention_ms,
                    batch_rows,
                    timings if timings is not None else Timings(),
                )
            _log_round(report, purged)
            if on_round is not None:
                on_round(report, purged)
        except Exception:
            logger.exception("reconcile round failed; the next one runs in %.0f s", interval_s)
        await asyncio.sleep(max(0.0, started + interval_s - loop.time()))


async def _round(
    connect: Callable[[], Awaitable[asyncpg.Connection]],
    now_ms: int,
    hold_grace_ms: int,
    audit_retention_ms: int,
    batch_rows: int,
    timings: Timings,
) -> tuple[ReconcileReport, PurgeReport]:
    connection = await connect()
    timings.connections_in_use += 1
    try:
        with timings.database(DATABASE_RECONCILE).time():
            report = await check(connection, now_ms=now_ms, hold_grace_ms=hold_grace_ms)
        with timings.database(DATABASE_RETENTION_PURGE).time():
            purged = await purge(
                connection,
                now_ms=now_ms,
                audit_retention_ms=audit_retention_ms,
                batch_rows=batch_rows,
            )
    except BaseException:
        # Failed, timed out or cancelled: do not wait on a connection in doubt.
        connection.terminate()
        raise
    finally:
        timings.connections_in_use -= 1
    await connection.close(timeout=CLOSE_TIMEOUT_S)
    return report, purged


def _log_round(report: ReconcileReport, purged: PurgeReport) -> None:
    for finding in report.findings:
        logger.warning(
            "reconcile %s: shard=%s slot=%s booking=%s user=%s: %s",
            finding.kind,
            finding.shard,
            finding.slot_id,
            finding.booking_id,
            finding.user_id,
            finding.detail,
            extra={"reconcile": msgspec.structs.asdict(finding)},
        )
    unlisted = sum(report.found.values()) - len(report.findings)
    if unlisted:
        logger.warning(
            "reconcile: %d more findings not listed",
            unlisted,
            extra={"reconcile": {"found": report.found}},
        )
    logger.info(
        "purge: %d audit rows, %d idempotency records, %d request outcomes%s",
        purged.audit_rows,
        purged.idempotency_records,
        purged.request_outcomes,
        "" if purged.complete else " (more left for the next round)",
    )

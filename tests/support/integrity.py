"""The integrity check of the fault tests: the reconciliation's own checks, not SQL of their own.

After a fault, a test asks ``persistence.checks.check`` (the code
``slotengine reconcile`` and the periodic maintenance run) whether the stored
state keeps the engine's invariants, optionally against the counts the live
shards answer, and fails on any finding, listing them. What only one test
cares about (a ledger of acknowledged replies, the audit trail of a booking)
stays in that test.
"""

from collections.abc import Mapping

import asyncpg

from persistence.checks import HOLD_GRACE_DEFAULT_MS, ReconcileReport, check
from persistence.reconcile import wall_clock_ms


def describe(report: ReconcileReport) -> str:
    found = {kind: n for kind, n in report.found.items() if n}
    lines = [
        f"{f.kind}: slot={f.slot_id} booking={f.booking_id}: {f.detail}" for f in report.findings
    ]
    return "\n".join([f"the reconciliation checks found {found}", *lines])


async def assert_consistent(
    db: asyncpg.Connection,
    *,
    engine_counts: Mapping[str, tuple[int, int]] | None = None,
    hold_grace_ms: int = HOLD_GRACE_DEFAULT_MS,
    now_ms: int | None = None,
) -> ReconcileReport:
    """No finding at all (a notice included) in the database, nor between it and
    ``engine_counts`` (slot id -> (confirmed, held) as the shards answer them)."""
    report = await check(
        db,
        now_ms=wall_clock_ms() if now_ms is None else now_ms,
        engine_counts=engine_counts,
        hold_grace_ms=hold_grace_ms,
    )
    assert not any(report.found.values()), describe(report)
    return report

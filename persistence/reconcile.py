"""One reconciliation: the checks, then, when asked, the safe repairs.

This module owns putting the two together, as ``slotengine reconcile`` runs
them: ``persistence.checks`` reads the stored state in one snapshot and reports
what contradicts the engine's rules (the kinds of finding are listed there);
``persistence.repairs`` fixes what needs no business decision, on shards no
owner holds. The retention purge is apart (``persistence.retention``), and so
is the periodic run of the report and the purge, which is the shell's
(``engine.shell.maintenance``).

It must never repair unless asked, nor decide on its own which shards have an
owner: the caller says (``owned_shards``).
"""

import time
from collections.abc import Mapping
from collections.abc import Set as AbstractSet

import asyncpg

from persistence import repairs
from persistence.checks import (
    FINDINGS_PER_CHECK_MAX,
    HOLD_GRACE_DEFAULT_MS,
    ReconcileReport,
    check,
)
from persistence.repairs import OwnerCheck


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


async def reconcile(
    connection: asyncpg.Connection,
    *,
    now_ms: int,
    repair: bool,
    engine_counts: Mapping[str, tuple[int, int]] | None = None,
    hold_grace_ms: int = HOLD_GRACE_DEFAULT_MS,
    owned_shards: AbstractSet[int] | OwnerCheck | None = None,
    findings_max: int = FINDINGS_PER_CHECK_MAX,
) -> ReconcileReport:
    """Check the database (and ``engine_counts``) and, with ``repair``, repair it.

    ``owned_shards`` says which shards have an owner: a set (a snapshot the
    caller took), or a coroutine function asked per shard right before a
    repair, after the shard's fence token is read (the safe form: see
    ``persistence.repairs``). ``None`` counts every shard as owned, so no hold
    is repaired. ``connection`` must not be inside a transaction.
    """
    report = await check(
        connection,
        now_ms=now_ms,
        engine_counts=engine_counts,
        hold_grace_ms=hold_grace_ms,
        findings_max=findings_max,
    )
    if repair:
        await repairs.repair(
            connection,
            report.findings,
            now_ms=now_ms,
            hold_grace_ms=hold_grace_ms,
            owned_shards=owned_shards,
        )
        report.repair = True
    return report

"""The reconciliation checks: what in the stored state contradicts the engine's rules.

This module owns the checks, the kinds of finding and the report they make.
``check`` reads the database in one consistent snapshot (a read-only,
repeatable-read transaction) and reports:

``booking_without_slot``
    an active (RESERVED or CONFIRMED) booking whose slot is deleted
    (``deleted_at_ms`` set) or, with the foreign key bypassed, missing. A
    forced delete expires the slot's holds and cancels its bookings in the same
    flush, so this means a slot was deleted behind the engine's back.
``slot_over_capacity``
    the slot's RESERVED and CONFIRMED bookings, counted from the bookings
    themselves, exceed its capacity.
``counter_drift``
    the trigger-kept ``confirmed_count`` / ``held_count`` of a slot differ from
    its bookings (the triggers were bypassed, e.g. ``session_replication_role``
    or ``TRUNCATE``): the capacity CHECK then guards the wrong numbers.
``hold_past_deadline``
    a RESERVED hold whose ``expires_at_ms`` is more than ``hold_grace_ms`` in the
    past. A live owner expires holds within a second, so this means the shard has
    no owner, or its owner is stuck.
``notified_entry_without_hold``
    a NOTIFIED queue entry whose ``booking_id`` is not an active RESERVED hold of
    the same user and slot offered from the queue. A shard refuses to load such a
    state (``ShardCore.restore``), so this one keeps a shard from starting.
``engine_counts_differ``
    with ``engine_counts`` (slot id -> (confirmed, held) read from the live
    shards): a slot whose counts in memory differ from the stored counters.
    Take the counts from quiet shards: a shard applies a change in memory before
    its flush commits, so a busy shard is legitimately ahead for a few
    milliseconds.
``engine_slot_unknown``
    a slot in ``engine_counts`` the database does not have. Not a violation by
    itself (a flush creating it may be in flight); still missing on the next run,
    it is a lost flush.

Every kind but ``engine_slot_unknown`` is a violation (``Finding.violation``).
Times in a finding's ``detail`` (text for people) are ISO 8601 UTC.

The checks must never write: they run in a read-only transaction, and what to
do about a finding is for ``persistence.repairs`` or an operator to decide.
"""

from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, TypeAlias, get_args

import asyncpg
import msgspec

from engine.core.limits import require_relation
from persistence.limits import LEASE_TTL_MS, WRITER_FLUSH_TIMEOUT_MS

# -- defaults (this module's own; persistence/limits.py holds storage's) --------
# A live owner expires a hold within a second of its deadline and commits it
# within a flush (at most WRITER_FLUSH_TIMEOUT_MS); an owner that lost Redis
# stops within LEASE_TTL_MS. A minute is past both with room.
HOLD_GRACE_DEFAULT_MS: Final = 60_000
require_relation(
    HOLD_GRACE_DEFAULT_MS > LEASE_TTL_MS + WRITER_FLUSH_TIMEOUT_MS + 1_000,
    "HOLD_GRACE_DEFAULT_MS > LEASE_TTL_MS + WRITER_FLUSH_TIMEOUT_MS + 1 s: a hold a"
    " live or lapsing owner is still expiring is not reported as stale",
)
# Findings listed per check; the report still counts every one found.
FINDINGS_PER_CHECK_MAX: Final = 1_000

FindingKind: TypeAlias = Literal[
    "booking_without_slot",
    "slot_over_capacity",
    "counter_drift",
    "hold_past_deadline",
    "notified_entry_without_hold",
    "engine_counts_differ",
    "engine_slot_unknown",
]
FINDING_KINDS: Final[tuple[str, ...]] = get_args(FindingKind)
NOTICE_KINDS: Final = frozenset({"engine_slot_unknown"})
VIOLATION_KINDS: Final = frozenset(FINDING_KINDS) - NOTICE_KINDS

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class Finding(msgspec.Struct, kw_only=True):
    kind: FindingKind
    detail: str
    shard: int | None = None
    slot_id: str | None = None
    booking_id: str | None = None
    user_id: str | None = None
    # The booking's (or for a queue entry, the entry's) status when checked.
    status: str | None = None
    violation: bool = True
    repaired: bool = False


class ReconcileReport(msgspec.Struct, kw_only=True):
    at_ms: int
    repair: bool
    # At most FINDINGS_PER_CHECK_MAX per check ...
    findings: list[Finding]
    # ... and how many of each kind were found, listed or not.
    found: dict[str, int]

    @property
    def violations(self) -> list[Finding]:
        """The listed findings that are violations, repaired or not."""
        return [f for f in self.findings if f.violation]

    @property
    def unresolved(self) -> list[Finding]:
        """The listed violations a repair did not fix."""
        return [f for f in self.findings if f.violation and not f.repaired]

    @property
    def repaired(self) -> list[Finding]:
        return [f for f in self.findings if f.repaired]

    @property
    def violations_left(self) -> int:
        """Violations still in the database: the unrepaired listed ones and the
        ones found past the listing limit."""
        found = sum(n for kind, n in self.found.items() if kind in VIOLATION_KINDS)
        return len(self.unresolved) + found - len(self.violations)


def iso_utc(ms: int) -> str:
    """An epoch-milliseconds instant as ISO 8601 UTC: ``2026-12-07T10:45:00.123Z``."""
    moment = _EPOCH + timedelta(milliseconds=ms)
    return moment.isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"


async def check(
    connection: asyncpg.Connection,
    *,
    now_ms: int,
    engine_counts: Mapping[str, tuple[int, int]] | None = None,
    hold_grace_ms: int = HOLD_GRACE_DEFAULT_MS,
    findings_max: int = FINDINGS_PER_CHECK_MAX,
) -> ReconcileReport:
    """Check the database (and ``engine_counts``) against the engine's invariants.

    ``connection`` must not be inside a transaction: the checks run in a
    read-only repeatable-read transaction of their own. The report says
    ``repair=False``; nothing is changed.
    """
    if hold_grace_ms < 0 or findings_max < 1:
        raise ValueError("hold_grace_ms must be >= 0 and findings_max >= 1")
    findings: list[Finding] = []
    found: dict[str, int] = dict.fromkeys(FINDING_KINDS, 0)
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        await _check_counts(connection, findings, found, findings_max)
        await _check_bookings_without_slot(connection, findings, found, findings_max)
        await _check_holds(
            connection, findings, found, findings_max, now_ms, now_ms - hold_grace_ms
        )
        await _check_notified_entries(connection, findings, found, findings_max)
        if engine_counts:
            await _check_engine_counts(connection, engine_counts, findings, found, findings_max)
    return ReconcileReport(at_ms=now_ms, repair=False, findings=findings, found=found)


def _add(
    findings: list[Finding],
    kind: FindingKind,
    detail: str,
    *,
    shard: int | None,
    slot_id: str | None,
    booking_id: str | None = None,
    user_id: str | None = None,
    status: str | None = None,
) -> None:
    findings.append(
        Finding(
            kind=kind,
            detail=detail,
            shard=shard,
            slot_id=slot_id,
            booking_id=booking_id,
            user_id=user_id,
            status=status,
            violation=kind in VIOLATION_KINDS,
        )
    )


async def _check_counts(
    connection: asyncpg.Connection,
    findings: list[Finding],
    found: dict[str, int],
    limit: int,
) -> None:
    rows = await connection.fetch(
        """
        WITH actual AS (
            SELECT slot_id,
                   count(*) FILTER (WHERE status = 'CONFIRMED')::int AS confirmed,
                   count(*) FILTER (WHERE status = 'RESERVED')::int AS held
              FROM bookings
             WHERE status IN ('RESERVED', 'CONFIRMED')
             GROUP BY slot_id
        ), compared AS (
            SELECT s.id,
                   (SELECT pm.shard FROM partitions pm WHERE pm.partition = s.partition) AS shard,
                   s.capacity, s.confirmed_count, s.held_count,
                   coalesce(a.confirmed, 0) AS confirmed, coalesce(a.held, 0) AS held
              FROM slots s LEFT JOIN actual a ON a.slot_id = s.id
        ), odd AS (
            SELECT *,
                   confirmed_count <> confirmed OR held_count <> held AS drifted,
                   confirmed + held > capacity AS over
              FROM compared
             WHERE confirmed_count <> confirmed OR held_count <> held
                OR confirmed + held > capacity
        )
        SELECT *,
               count(*) FILTER (WHERE drifted) OVER () AS drifted_total,
               count(*) FILTER (WHERE over) OVER () AS over_total
          FROM odd
         ORDER BY id
         LIMIT $1
        """,
        limit,
    )
    if rows:
        found["counter_drift"] += rows[0]["drifted_total"]
        found["slot_over_capacity"] += rows[0]["over_total"]
    for row in rows:
        stored = f"{row['confirmed_count']} confirmed + {row['held_count']} held"
        actual = f"{row['confirmed']} confirmed + {row['held']} held"
        if row["over"]:
            _add(
                findings,
                "slot_over_capacity",
                f"bookings say {actual}, over its capacity {row['capacity']}",
                shard=row["shard"],
                slot_id=row["id"],
            )
        if row["drifted"]:
            _add(
                findings,
                "counter_drift",
                f"stored counters say {stored}, its bookings say {actual}",
                shard=row["shard"],
                slot_id=row["id"],
            )


async def _check_bookings_without_slot(
    connection: asyncpg.Connection,
    findings: list[Finding],
    found: dict[str, int],
    limit: int,
) -> None:
    rows = await connection.fetch(
        """
        SELECT b.id, b.slot_id, b.user_id, b.status, s.deleted_at_ms,
               (SELECT pm.shard FROM partitions pm WHERE pm.partition = s.partition) AS shard,
               s.id IS NULL AS missing, count(*) OVER () AS total
          FROM bookings b LEFT JOIN slots s ON s.id = b.slot_id
         WHERE b.status IN ('RESERVED', 'CONFIRMED')
           AND (s.id IS NULL OR s.deleted_at_ms IS NOT NULL)
         ORDER BY b.id
         LIMIT $1
        """,
        limit,
    )
    if rows:
        found["booking_without_slot"] += rows[0]["total"]
    for row in rows:
        where = (
            "is missing" if row["missing"] else f"was deleted at {iso_utc(row['deleted_at_ms'])}"
        )
        _add(
            findings,
            "booking_without_slot",
            f"{row['status']} booking, but its slot {where}",
            shard=row["shard"],
            slot_id=row["slot_id"],
            booking_id=row["id"],
            user_id=row["user_id"],
            status=row["status"],
        )


async def _check_holds(
    connection: asyncpg.Connection,
    findings: list[Finding],
    found: dict[str, int],
    limit: int,
    now_ms: int,
    cutoff_ms: int,
) -> None:
    # Holds on deleted slots are already reported as bookings without a slot.
    rows = await connection.fetch(
        """
        SELECT b.id, b.slot_id, b.user_id, b.expires_at_ms,
               (SELECT pm.shard FROM partitions pm WHERE pm.partition = s.partition) AS shard,
               count(*) OVER () AS total
          FROM bookings b JOIN slots s ON s.id = b.slot_id
         WHERE b.status = 'RESERVED' AND b.expires_at_ms < $1 AND s.deleted_at_ms IS NULL
         ORDER BY b.expires_at_ms, b.id
         LIMIT $2
        """,
        cutoff_ms,
        limit,
    )
    if rows:
        found["hold_past_deadline"] += rows[0]["total"]
    for row in rows:
        _add(
            findings,
            "hold_past_deadline",
            f"RESERVED {(now_ms - row['expires_at_ms']) / 1000:.0f} s past its deadline"
            f" {iso_utc(row['expires_at_ms'])}",
            shard=row["shard"],
            slot_id=row["slot_id"],
            booking_id=row["id"],
            user_id=row["user_id"],
            status="RESERVED",
        )


async def _check_notified_entries(
    connection: asyncpg.Connection,
    findings: list[Finding],
    found: dict[str, int],
    limit: int,
) -> None:
    rows = await connection.fetch(
        """
        SELECT q.slot_id, q.user_id, q.booking_id,
               (SELECT pm.shard FROM partitions pm WHERE pm.partition = s.partition) AS shard,
               b.id AS found_id, b.status, b.via_queue, b.user_id AS booking_user,
               b.slot_id AS booking_slot, count(*) OVER () AS total
          FROM queue_entries q
          LEFT JOIN slots s ON s.id = q.slot_id
          LEFT JOIN bookings b ON b.id = q.booking_id
         WHERE q.status = 'NOTIFIED'
           AND (b.id IS NULL OR b.status <> 'RESERVED' OR NOT b.via_queue
                OR b.user_id <> q.user_id OR b.slot_id <> q.slot_id)
         ORDER BY q.slot_id, q.user_id
         LIMIT $1
        """,
        limit,
    )
    if rows:
        found["notified_entry_without_hold"] += rows[0]["total"]
    for row in rows:
        if row["found_id"] is None:
            why = "does not exist"
        elif row["booking_user"] != row["user_id"] or row["booking_slot"] != row["slot_id"]:
            why = f"belongs to {row['booking_user']} on slot {row['booking_slot']}"
        elif row["status"] != "RESERVED":
            why = f"is {row['status']}"
        else:
            why = "was not offered from the queue"
        _add(
            findings,
            "notified_entry_without_hold",
            f"NOTIFIED queue entry; its offered booking {row['booking_id']} {why}",
            shard=row["shard"],
            slot_id=row["slot_id"],
            booking_id=row["booking_id"],
            user_id=row["user_id"],
            status="NOTIFIED",
        )


async def _check_engine_counts(
    connection: asyncpg.Connection,
    engine_counts: Mapping[str, tuple[int, int]],
    findings: list[Finding],
    found: dict[str, int],
    limit: int,
) -> None:
    rows = await connection.fetch(
        "SELECT s.id, (SELECT pm.shard FROM partitions pm WHERE pm.partition = s.partition)"
        " AS shard, s.confirmed_count, s.held_count FROM slots s"
        " WHERE s.id = ANY($1::text[])",
        list(engine_counts),
    )
    stored = {row["id"]: row for row in rows}
    listed: dict[str, int] = defaultdict(int)
    for slot_id in sorted(engine_counts):
        confirmed, held = engine_counts[slot_id]
        row = stored.get(slot_id)
        kind: FindingKind
        if row is None:
            kind = "engine_slot_unknown"
            detail = f"the engine counts {confirmed} confirmed + {held} held; no such slot stored"
        elif (row["confirmed_count"], row["held_count"]) != (confirmed, held):
            kind = "engine_counts_differ"
            detail = (
                f"the engine counts {confirmed} confirmed + {held} held, the database"
                f" {row['confirmed_count']} confirmed + {row['held_count']} held"
            )
        else:
            continue
        found[kind] += 1
        listed[kind] += 1
        if listed[kind] <= limit:
            _add(
                findings,
                kind,
                detail,
                shard=None if row is None else row["shard"],
                slot_id=slot_id,
            )

"""Reconciliation: checks that the stored state keeps the engine's invariants, and
the retention purge.

``reconcile`` reads the database in one consistent snapshot and reports what
contradicts the engine's rules:

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

Repairs (``repair=True``) are made only where no business decision is needed
and the single writer of a shard cannot be overtaken:

* drifted counters are recomputed from the bookings, under the slot row's
  lock, so a concurrent flush's trigger adds its change on top of the
  recomputed value. The counters belong to the database (the engine never
  writes them), so this is safe while an owner runs. A slot whose bookings
  exceed its capacity keeps its counters: the CHECK would refuse the truth,
  and which booking goes is an operator's decision.
* holds past their deadline, and holds on deleted slots, are expired (status
  EXPIRED, version + 1, ``updated_at_ms``, an audit row with trigger
  ``reconcile``), one transaction per shard, only when the shard has no owner.
  An owner keeps its shard in memory and would not see a change made behind
  its back (single writer); it expires its holds itself. To be sure no owner
  takes the shard over during the repair, the shard's fence token is read
  before ownership is asked, and the repair transaction locks the fence row
  and goes ahead only if the token is unchanged: a takeover writes a newer
  token to that row before it loads the shard, so it either happened before
  (the repair is skipped) or waits for the repair and loads its result.
  Two kinds of holds are left to the next owner, which expires them at once
  on takeover and does what the engine does next: offers from the queue
  (``via_queue``), whose queue entry must move with them, and holds on a live
  slot where users wait, whose freed place goes to the first of them.
* nothing else is repaired: CONFIRMED bookings on deleted slots (cancelling one
  is a refund decision), over-capacity slots, queue entries and the engine's
  counts are reported for an operator.

``purge`` deletes what is past its retention: audit rows (through
``purge_audit_log``, the only way rows leave the audit log), idempotency
records and request outcomes. ``run_periodically`` runs both on a timer.
"""

import asyncio
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import Final, Literal, TypeAlias, get_args

import asyncpg
import msgspec

from engine.core import limits

logger = logging.getLogger(__name__)

# -- defaults (this module's own; engine.core.limits holds the engine's) --------
# A live owner expires a hold within a second of its deadline and commits it
# within a flush (at most limits.WRITER_FLUSH_TIMEOUT_MS); an owner that lost
# Redis stops within limits.LEASE_TTL_MS. A minute is past both with room.
HOLD_GRACE_DEFAULT_MS: Final = 60_000
# Audit rows are kept 90 days.
AUDIT_RETENTION_DEFAULT_MS: Final = 90 * 86_400_000
# Rows deleted per purge statement (each its own short transaction), and the
# most statements one purge runs per table; the next run goes on from there.
PURGE_BATCH_ROWS_DEFAULT: Final = 10_000
PURGE_BATCHES_MAX: Final = 1_000
# Findings listed per check; the report still counts every one found.
FINDINGS_PER_CHECK_MAX: Final = 1_000
# The periodic job: how often, and how long one round may take.
RECONCILE_INTERVAL_DEFAULT_S: Final = 300.0
RECONCILE_ROUND_TIMEOUT_S: Final = 600.0
CLOSE_TIMEOUT_S: Final = 10.0
# What a repair writes to the audit log.
REPAIR_ACTOR: Final = "reconcile"
REPAIR_TRIGGER: Final = "reconcile"

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

# Whether a shard has an owner now (True when that cannot be known).
OwnerCheck: TypeAlias = Callable[[int], Awaitable[bool]]


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


class PurgeReport(msgspec.Struct, kw_only=True):
    audit_rows: int
    idempotency_records: int
    request_outcomes: int
    # False when a table still had old rows after ``batches_max`` statements.
    complete: bool


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# -- reconcile --------------------------------------------------------------------


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
    """Check the database (and ``engine_counts``) against the engine's invariants.

    ``owned_shards`` says which shards have an owner: a set (a snapshot the
    caller took), or a coroutine function asked per shard right before a
    repair, after the shard's fence token is read (the safe form: see the module
    docstring). ``None`` counts every shard as owned, so no hold is repaired.
    ``connection`` must not be inside a transaction: the checks run in a
    read-only repeatable-read transaction of their own, each repair in its own.
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
    if repair:
        await _repair_counters(connection, findings, now_ms)
        await _repair_holds(connection, findings, now_ms, now_ms - hold_grace_ms, owned_shards)
    return ReconcileReport(at_ms=now_ms, repair=repair, findings=findings, found=found)


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
            SELECT s.id, s.shard, s.capacity, s.confirmed_count, s.held_count,
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
        SELECT b.id, b.slot_id, b.user_id, b.status, s.shard, s.deleted_at_ms,
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
        where = "is missing" if row["missing"] else f"was deleted at {row['deleted_at_ms']}"
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
        SELECT b.id, b.slot_id, b.user_id, b.expires_at_ms, s.shard,
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
            f" {row['expires_at_ms']}",
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
        SELECT q.slot_id, q.user_id, q.booking_id, s.shard,
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
        "SELECT id, shard, confirmed_count, held_count FROM slots WHERE id = ANY($1::text[])",
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


# -- repairs ----------------------------------------------------------------------


def _request_id(now_ms: int) -> str:
    return f"reconcile-{now_ms}-{secrets.token_hex(4)}"


async def _repair_counters(
    connection: asyncpg.Connection, findings: list[Finding], now_ms: int
) -> None:
    request_id = _request_id(now_ms)
    for finding in findings:
        if finding.kind != "counter_drift" or finding.slot_id is None:
            continue
        # One slot per transaction: a flush locks the slots it counts in its own
        # order, and holding one lock at a time cannot deadlock with it.
        try:
            async with connection.transaction():
                # The row lock first (NO KEY: bookings may still reference the slot),
                # then the count, in a statement of its own: its snapshot is taken
                # after the lock, so it sees every booking committed before, and a
                # flush committing after adds its change to the recomputed value.
                was = await connection.fetchrow(
                    "SELECT shard, confirmed_count, held_count FROM slots"
                    " WHERE id = $1 FOR NO KEY UPDATE",
                    finding.slot_id,
                )
                if was is None:
                    continue
                fixed = await connection.fetchrow(
                    """
                    UPDATE slots s
                       SET confirmed_count = a.confirmed, held_count = a.held
                      FROM (SELECT count(*) FILTER (WHERE status = 'CONFIRMED')::int AS confirmed,
                                   count(*) FILTER (WHERE status = 'RESERVED')::int AS held
                              FROM bookings
                             WHERE slot_id = $1 AND status IN ('RESERVED', 'CONFIRMED')) a
                     WHERE s.id = $1 AND a.confirmed + a.held <= s.capacity
                    RETURNING s.confirmed_count, s.held_count
                    """,
                    finding.slot_id,
                )
                if fixed is None:
                    finding.detail += "; not repaired: its bookings exceed its capacity"
                    continue
                await connection.execute(
                    """
                    INSERT INTO audit_log (at_ms, shard, request_id, actor, entity, entity_id,
                                           slot_id, trigger, details)
                    VALUES ($1, $2, $3, $4, 'slot', $5, $5, $6, $7::jsonb)
                    """,
                    now_ms,
                    was["shard"],
                    request_id,
                    REPAIR_ACTOR,
                    finding.slot_id,
                    REPAIR_TRIGGER,
                    msgspec.json.encode(
                        {
                            "repair": "counters",
                            "confirmedCount": [was["confirmed_count"], fixed["confirmed_count"]],
                            "heldCount": [was["held_count"], fixed["held_count"]],
                        }
                    ).decode(),
                )
                finding.repaired = True
                finding.detail += (
                    f"; counters set to {fixed['confirmed_count']} confirmed"
                    f" + {fixed['held_count']} held"
                )
        except asyncpg.PostgresError as error:
            finding.detail += f"; repair failed: {error}"


async def _repair_holds(
    connection: asyncpg.Connection,
    findings: list[Finding],
    now_ms: int,
    cutoff_ms: int,
    owned_shards: AbstractSet[int] | OwnerCheck | None,
) -> None:
    by_shard: dict[int, list[Finding]] = defaultdict(list)
    for finding in findings:
        if finding.booking_id is None:
            continue
        if finding.kind == "booking_without_slot" and finding.status == "CONFIRMED":
            finding.detail += "; not repaired: cancelling a booking is an operator's decision"
            continue
        if finding.kind == "hold_past_deadline" or (
            finding.kind == "booking_without_slot" and finding.status == "RESERVED"
        ):
            if finding.shard is None:
                finding.detail += "; not repaired: its slot row is missing, so its shard is unknown"
            else:
                by_shard[finding.shard].append(finding)
    for shard, held in sorted(by_shard.items()):
        try:
            await _expire_holds(connection, shard, held, now_ms, cutoff_ms, owned_shards)
        except asyncpg.PostgresError as error:
            for finding in held:
                finding.detail += f"; repair failed: {error}"


async def _is_owned(shard: int, owned_shards: AbstractSet[int] | OwnerCheck | None) -> bool:
    if owned_shards is None:
        return True
    if isinstance(owned_shards, AbstractSet):
        return shard in owned_shards
    return await owned_shards(shard)


async def _expire_holds(
    connection: asyncpg.Connection,
    shard: int,
    held: list[Finding],
    now_ms: int,
    cutoff_ms: int,
    owned_shards: AbstractSet[int] | OwnerCheck | None,
) -> None:
    # The token first, then the owner: a takeover between the two shows as a
    # changed token below.
    token_before = await _fence_token(connection, shard, lock=False)
    if await _is_owned(shard, owned_shards):
        for finding in held:
            finding.detail += f"; not repaired: shard {shard} has an owner, which expires it"
        return
    async with connection.transaction():
        if await _fence_token(connection, shard, lock=True) != token_before:
            for finding in held:
                finding.detail += f"; not repaired: shard {shard} was taken over meanwhile"
            return
        rows = await connection.fetch(
            """
            WITH expired AS (
                UPDATE bookings b
                   SET status = 'EXPIRED', version = b.version + 1, updated_at_ms = $2
                  FROM slots s
                 WHERE b.id = ANY($1::text[]) AND s.id = b.slot_id AND s.shard = $3
                   AND b.status = 'RESERVED' AND NOT b.via_queue
                   AND (s.deleted_at_ms IS NOT NULL
                        OR (b.expires_at_ms < $4
                            AND NOT EXISTS (SELECT 1 FROM queue_entries q
                                             WHERE q.slot_id = b.slot_id
                                               AND q.status = 'WAITING')))
                RETURNING b.id, b.slot_id, b.user_id, b.version, s.deleted_at_ms
            )
            INSERT INTO audit_log (at_ms, shard, request_id, actor, entity, entity_id, slot_id,
                                   user_id, from_status, to_status, trigger, details)
            SELECT $2, $3, $5, $6, 'booking', id, slot_id, user_id, 'RESERVED', 'EXPIRED', $7,
                   jsonb_build_object(
                       'repair',
                       CASE WHEN deleted_at_ms IS NULL THEN 'hold past its deadline'
                            ELSE 'hold on a deleted slot' END,
                       'version', version)
              FROM expired
            RETURNING entity_id
            """,
            [f.booking_id for f in held],
            now_ms,
            shard,
            cutoff_ms,
            _request_id(now_ms),
            REPAIR_ACTOR,
            REPAIR_TRIGGER,
        )
        expired = {row["entity_id"] for row in rows}
        left = [f.booking_id for f in held if f.booking_id not in expired]
        reasons: dict[str, str] = {}
        if left:
            reasons = {
                row["id"]: _why_kept(row)
                for row in await connection.fetch(
                    """
                    SELECT b.id, b.status, b.via_queue,
                           EXISTS (SELECT 1 FROM queue_entries q
                                    WHERE q.slot_id = b.slot_id AND q.status = 'WAITING')
                               AS waiting
                      FROM bookings b WHERE b.id = ANY($1::text[])
                    """,
                    left,
                )
            }
    for finding in held:
        if finding.booking_id in expired:
            finding.repaired = True
            finding.detail += "; expired"
        else:
            finding.detail += f"; not repaired: {reasons.get(finding.booking_id or '', 'gone')}"


def _why_kept(row: asyncpg.Record) -> str:
    if row["status"] != "RESERVED":
        return f"it is {row['status']} by now"
    if row["via_queue"]:
        return "a queue offer: the next owner expires it and offers the next user"
    if row["waiting"]:
        return "users wait for the slot: the next owner expires it and offers the place"
    return "it changed meanwhile"


async def _fence_token(connection: asyncpg.Connection, shard: int, *, lock: bool) -> int:
    if not lock:
        token = await connection.fetchval("SELECT token FROM shard_fences WHERE shard = $1", shard)
        return int(token or 0)
    token = await connection.fetchval(
        "SELECT token FROM shard_fences WHERE shard = $1 FOR UPDATE", shard
    )
    if token is None:
        # No row to lock: a first takeover would insert one. Lock out every fence
        # write until this transaction ends (a few statements), then look again.
        await connection.execute("LOCK TABLE shard_fences IN SHARE ROW EXCLUSIVE MODE")
        token = await connection.fetchval("SELECT token FROM shard_fences WHERE shard = $1", shard)
    return int(token or 0)


# -- purge ------------------------------------------------------------------------


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


# -- the periodic job ---------------------------------------------------------------


async def run_periodically(
    connect: Callable[[], Awaitable[asyncpg.Connection]],
    interval_s: float = RECONCILE_INTERVAL_DEFAULT_S,
    *,
    hold_grace_ms: int = HOLD_GRACE_DEFAULT_MS,
    audit_retention_ms: int = AUDIT_RETENTION_DEFAULT_MS,
    batch_rows: int = PURGE_BATCH_ROWS_DEFAULT,
    round_timeout_s: float = RECONCILE_ROUND_TIMEOUT_S,
    clock_ms: Callable[[], int] = wall_clock_ms,
    on_round: Callable[[ReconcileReport, PurgeReport], None] | None = None,
) -> None:
    """Every ``interval_s``: reconcile (report only) and purge, on a fresh connection.

    Each finding is logged as a warning with the finding's fields in
    ``extra={"reconcile": {...}}``; the purge's counts at info. A round that
    fails (database down, a timeout after ``round_timeout_s``) is logged and the
    next one runs on time: nothing but cancellation ends the loop.
    ``on_round`` is called after every round that completed.
    """
    if interval_s <= 0 or round_timeout_s <= 0:
        raise ValueError("interval_s and round_timeout_s must be > 0")
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            async with asyncio.timeout(round_timeout_s):
                report, purged = await _round(
                    connect, clock_ms(), hold_grace_ms, audit_retention_ms, batch_rows
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
) -> tuple[ReconcileReport, PurgeReport]:
    connection = await connect()
    try:
        report = await reconcile(
            connection, now_ms=now_ms, repair=False, hold_grace_ms=hold_grace_ms
        )
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

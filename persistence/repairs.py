"""The reconciliation's repairs: what may be fixed without a business decision.

This module owns changing stored state after a check (``persistence.checks``)
found it wrong, and only where no business decision is needed and the single
writer of a shard cannot be overtaken:

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

Each repaired finding is marked ``repaired``, and every finding left alone
says why in its ``detail``. A repair must never cancel a booking, choose which
booking of a full slot goes, touch a queue entry, write to a shard an owner
holds, or change a row without an audit row.
"""

import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from typing import Final, TypeAlias

import asyncpg
import msgspec

from persistence.checks import Finding

# What a repair writes to the audit log.
REPAIR_ACTOR: Final = "reconcile"
REPAIR_TRIGGER: Final = "reconcile"

# Whether a shard has an owner now (True when that cannot be known).
OwnerCheck: TypeAlias = Callable[[int], Awaitable[bool]]


async def repair(
    connection: asyncpg.Connection,
    findings: list[Finding],
    *,
    now_ms: int,
    hold_grace_ms: int,
    owned_shards: AbstractSet[int] | OwnerCheck | None,
) -> None:
    """Repair what is safe among ``findings`` (marking them), explain the rest.

    ``owned_shards`` says which shards have an owner: a set (a snapshot the
    caller took), or a coroutine function asked per shard right before a
    repair, after the shard's fence token is read (the safe form: see the module
    docstring). ``None`` counts every shard as owned, so no hold is repaired.
    ``connection`` must not be inside a transaction: each repair runs in its own.
    """
    await _repair_counters(connection, findings, now_ms)
    await _repair_holds(connection, findings, now_ms, now_ms - hold_grace_ms, owned_shards)


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
                    "SELECT (SELECT pm.shard FROM partitions pm WHERE pm.partition = s.partition)"
                    " AS shard, s.confirmed_count, s.held_count FROM slots s"
                    " WHERE s.id = $1 FOR NO KEY UPDATE OF s",
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
                 WHERE b.id = ANY($1::text[]) AND s.id = b.slot_id
                   AND s.partition IN (SELECT partition FROM partitions WHERE shard = $3)
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

"""The core's limits: every bound of a business rule, with its unit last in the name.

A limit is a promise about the worst case: each queue, table and wait in the
core is bounded by one of these. Settings and domain files may narrow a
default (the domain's queue size, the hold TTL) but never go past a ``*_MAX``.

The other layers keep their limits beside their code: the shell's (batching,
actors, leases, Redis calls) in ``engine/shell/limits.py``, persistence's (the
writer, database timeouts, the lease TTL) in ``persistence/limits.py``, the
gateway's in its modules (``gateway/handling.py``, ``gateway/http.py``, ...),
and the bounds of a setting in ``config/settings.py``.

The relations between limits that the code relies on are checked when the
module is imported (``check``), each with its reason; ``require_relation`` is the one
helper every layer's limits use for that (this module is the lowest one they
may all import). A broken relation raises ``LimitRelationBroken`` even under
``python -O``, which strips ``assert``.

This module must never import anything outside the core.
"""

from collections.abc import Mapping
from typing import Any, Final


class LimitRelationBroken(AssertionError):
    """Two limits contradict what the code relies on; the message says which and why."""


def require_relation(holds: bool, why: str) -> None:
    """Refuse a broken relation between limits (not stripped by ``python -O``)."""
    if not holds:
        raise LimitRelationBroken(f"limits: {why}")


# -- time ------------------------------------------------------------------
# One tick of the timer wheel. Deadlines are whole milliseconds, so a 1 ms tick
# makes expiry exact: a timer fires at its deadline, never before, and the
# shell decides how late (it wakes at the wheel's next deadline).
TIMER_TICK_MS: Final = 1
# 64 buckets a level (6 bits) keeps a level's scan cheap; 7 levels cover
# 64**7 ms (about 139 years), so nothing ever lands in an overflow list.
TIMER_WHEEL_BUCKETS: Final = 64
TIMER_WHEEL_LEVELS: Final = 7

# -- holds and queues (defaults from the specification) ---------------------
HOLD_TTL_DEFAULT_S: Final = 120
CLAIM_TTL_DEFAULT_S: Final = 120
# A hold shorter than a second cannot be confirmed by a human; longer than a
# day is a booking, not a hold.
HOLD_TTL_MIN_S: Final = 1
HOLD_TTL_MAX_S: Final = 86_400
# A hold may be extended (POST .../extend) this much at a time, this many times:
# one more minute, twice, lets a user finish a form without holding a place
# for long. 0 extensions switches extending off; a hold never outlives its
# slot's start, whatever these say.
HOLD_EXTENSION_DEFAULT_S: Final = 60
HOLD_EXTENSIONS_DEFAULT: Final = 2
# Bounded like a hold's TTL; a smallint column keeps the count.
HOLD_EXTENSION_MAX_S: Final = HOLD_TTL_MAX_S
HOLD_EXTENSIONS_MAX: Final = 100
QUEUE_SIZE_DEFAULT: Final = 100
# The position structure is O(log n); this cap bounds memory per slot.
QUEUE_SIZE_MAX: Final = 100_000
QUEUE_INACTIVITY_DEFAULT_S: Final = 14_400
QUEUE_INACTIVITY_MAX_S: Final = 30 * 86_400
# How many recent queue advances feed the wait estimate (a moving window).
WAIT_ESTIMATE_SAMPLES_MAX: Final = 32

# -- slots -------------------------------------------------------------------
SLOT_CAPACITY_MAX: Final = 100_000
ADVANCE_BOOKING_DAYS_DEFAULT: Final = 365
ADVANCE_BOOKING_DAYS_MAX: Final = 3_650
# A slot may not last longer than this (a week is already generous).
SLOT_DURATION_MAX_MS: Final = 7 * 86_400_000
# Metadata is a few labels for display (a room, a language), not a document;
# measured as its compact JSON encoding.
SLOT_METADATA_BYTES_MAX: Final = 4_096
# Nesting of any JSON a client sends (a body, a slot's metadata): decoders and
# checks recurse once a level, and no booking needs more than a few levels.
JSON_DEPTH_MAX: Final = 32
ID_CHARS_MAX: Final = 128
CANCEL_REASON_CHARS_MAX: Final = 500
# The longest string a shard stores from a command (a cancellation's reason: up to
# CANCEL_REASON_CHARS_MAX): a btree index row holds at most ~2.7 kB, and a user id
# and an idempotency key share one (4 bytes a character at worst). Room above the
# API's own limits (ids 128 characters, an admin actor "admin:" and one, keys 200).
COMMAND_TEXT_CHARS_MAX: Final = 256

# -- idempotency and retries -----------------------------------------------
# Client Idempotency-Keys are kept at least 24 h (docs/api.md).
IDEMPOTENCY_RETENTION_MS: Final = 24 * 3_600_000
IDEMPOTENCY_KEY_CHARS_MAX: Final = 200
# A key record costs ~600 B in a shard's memory (measured), so this bounds it
# near 120 MB; under a flood of keyed requests the oldest keys go before 24 h
# unless storage keeps them.
IDEMPOTENCY_RECORDS_MAX: Final = 200_000
# Outcomes by request id, so that a batch retried across an actor failure
# never applies twice. Ten minutes covers every retry the coalescer makes.
REQUEST_OUTCOMES_RETENTION_MS: Final = 10 * 60_000
REQUEST_OUTCOMES_MAX: Final = 200_000

# -- listing -----------------------------------------------------------------
# A page of a list, at most (the gateway's default page is smaller).
LIST_LIMIT_MAX: Final = 200

# -- memory of finished work -------------------------------------------------
# Final bookings (EXPIRED, CANCELLED, COMPLETED) stay readable in memory this
# long, then only the database has them.
FINAL_BOOKING_RETENTION_MS: Final = 24 * 3_600_000
# An ended slot stays in memory this long after its end time.
ENDED_SLOT_RETENTION_MS: Final = 24 * 3_600_000

# PostgreSQL's largest btree index row (8 kB pages), which a user id and an
# idempotency key share (COMMAND_TEXT_CHARS_MAX above).
_BTREE_ROW_BYTES_MAX: Final = 2_704
# UTF-8 takes at most 4 bytes a character.
_UTF8_BYTES_PER_CHAR_MAX: Final = 4
# What the gateway puts before an administrator's id as a command's actor.
_ADMIN_ACTOR_PREFIX: Final = "admin:"


def check(v: Mapping[str, Any]) -> None:
    """Refuse limits ``v`` (a module's names) whose relations the code relies on break."""
    require_relation(
        v["HOLD_TTL_MIN_S"] <= v["HOLD_TTL_DEFAULT_S"] <= v["HOLD_TTL_MAX_S"],
        "HOLD_TTL_DEFAULT_S within [HOLD_TTL_MIN_S, HOLD_TTL_MAX_S]: settings use the"
        " default when unset and refuse a value outside these bounds",
    )
    require_relation(
        v["HOLD_TTL_MIN_S"] <= v["CLAIM_TTL_DEFAULT_S"] <= v["HOLD_TTL_MAX_S"],
        "CLAIM_TTL_DEFAULT_S within [HOLD_TTL_MIN_S, HOLD_TTL_MAX_S]: a claim is a hold,"
        " and settings refuse a value outside these bounds",
    )
    require_relation(
        1 <= v["QUEUE_SIZE_DEFAULT"] <= v["QUEUE_SIZE_MAX"],
        "QUEUE_SIZE_DEFAULT within [1, QUEUE_SIZE_MAX]: settings refuse a size outside it",
    )
    require_relation(
        1 <= v["QUEUE_INACTIVITY_DEFAULT_S"] <= v["QUEUE_INACTIVITY_MAX_S"],
        "QUEUE_INACTIVITY_DEFAULT_S within [1, QUEUE_INACTIVITY_MAX_S]: settings refuse"
        " a value outside it",
    )
    require_relation(
        1 <= v["ADVANCE_BOOKING_DAYS_DEFAULT"] <= v["ADVANCE_BOOKING_DAYS_MAX"],
        "ADVANCE_BOOKING_DAYS_DEFAULT within [1, ADVANCE_BOOKING_DAYS_MAX]: domain files"
        " refuse a value outside it",
    )
    require_relation(
        v["COMMAND_TEXT_CHARS_MAX"]
        >= max(v["ID_CHARS_MAX"] + len(_ADMIN_ACTOR_PREFIX), v["IDEMPOTENCY_KEY_CHARS_MAX"]),
        "COMMAND_TEXT_CHARS_MAX >= every text the API admits into a command (an id, an"
        " admin actor, an Idempotency-Key): else a valid request fails at its shard",
    )
    require_relation(
        2 * _UTF8_BYTES_PER_CHAR_MAX * v["COMMAND_TEXT_CHARS_MAX"] <= _BTREE_ROW_BYTES_MAX,
        "a user id and an idempotency key of COMMAND_TEXT_CHARS_MAX each fit one btree"
        " index row: else one value fails the whole group commit",
    )
    require_relation(
        v["TIMER_WHEEL_BUCKETS"] & (v["TIMER_WHEEL_BUCKETS"] - 1) == 0,
        "TIMER_WHEEL_BUCKETS is a power of two: the wheel indexes a level by bits",
    )


check(globals())
